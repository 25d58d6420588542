"""Python conventions a user expects of every public class."""
import gctrack
from conftest import require


def test_every_public_object_has_a_repr_that_says_what_it_is(arena):
    require("pagemap_scan")
    with gctrack.Heap(1 << 20, backend="software") as heap:
        mutators = gctrack.NativeMutators(heap, threads=2, rate=1000)
        watch = gctrack.WriteWatch(arena, backend="pagemap_scan")
        shown = {
            "Collector": repr(gctrack.Collector(heap)),
            "NativeMutators": repr(mutators),
            "WriteWatch": repr(watch),
        }
        with gctrack.Arena(1 << 16) as other:
            shown["BarrierVerifier"] = repr(gctrack.BarrierVerifier(
                other, gctrack.CardTable.for_arena(other)))
        for name, text in shown.items():
            assert text.startswith(f"<gctrack.{name} ") and " object at 0x" not in text, text
        assert "2 threads" in shown["NativeMutators"] and "stopped" in shown["NativeMutators"]
        with mutators:
            assert "running" in repr(mutators)
        watch.close()
        assert "closed" in repr(watch) and "pagemap_scan" in repr(watch)


def test_constructors_have_signatures():
    import inspect
    expected = {
        gctrack.Arena: ["size", "huge_pages"],
        gctrack.CardTable: ["base", "size", "card_size"],
        gctrack.Tracker: ["arena", "backend", "vector_len"],
        gctrack.Heap: ["size", "object_size", "backend", "card_size", "max_roots",
                       "verify_barriers"],
        gctrack.BarrierVerifier: ["arena", "cards"],
        gctrack.Collector: ["heap", "pause_goal", "preclean_time_limit", "workers"],
        gctrack.NativeMutators: ["heap", "threads", "rate", "roots_per_thread", "seed", "workload", "params",
                                 "stored_cards"],
    }
    for cls, names in expected.items():
        assert list(inspect.signature(cls).parameters) == names, cls
        assert not cls.__doc__.startswith(cls.__name__ + "("), "the signature is not shown twice"
    for name, cls in gctrack.BACKENDS.items():
        assert list(inspect.signature(cls).parameters)[0] == "arena", name


def test_card_tables_copy_with_the_copy_module():
    import copy
    table = gctrack.CardTable(1 << 20, 64 * 4096, card_size=4096)
    table.mark_range((1 << 20) + 5000, 1)
    for twin in (copy.copy(table), copy.deepcopy(table)):
        assert twin == table and twin is not table
        twin.clear()
        assert table.count() == 1, "the copy does not share the bits"
