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
        for name, text in shown.items():
            assert text.startswith(f"<gctrack.{name} ") and " object at 0x" not in text, text
        assert "2 threads" in shown["NativeMutators"] and "stopped" in shown["NativeMutators"]
        with mutators:
            assert "running" in repr(mutators)
        watch.close()
        assert "closed" in repr(watch) and "pagemap_scan" in repr(watch)
