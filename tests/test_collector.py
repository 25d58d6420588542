"""The mostly-concurrent collector: nothing reachable is ever freed.

Reachability is computed independently, by walking the raw heap memory with
numpy from the root slots, with every mutator parked.
"""
import threading
import time

import numpy
import pytest

import gctrack
from conftest import allocated_mask, check_nothing_reachable_was_freed, reachable, require, work_done
from gctrack.collector import Collector
from gctrack.heap import HEADER_LIVE, Heap
from gctrack.mutator import NativeMutators, populate

def random_graph(heap, objects, rng):
    """Objects linked at random through the Heap API; a few of them rooted."""
    made = [heap.alloc() for _ in range(objects)]
    for obj in made:
        for slot in rng.choice(heap.slots, 2, replace=False):
            heap.set_ref(obj, int(slot), int(made[rng.integers(len(made))]) if rng.random() < 0.5 else 0)
    for obj in rng.choice(made, 5, replace=False):
        heap.add_root(int(obj))
    return made


@pytest.mark.parametrize("concurrent", [True, False], ids=["concurrent", "stop-the-world"])
def test_a_cycle_without_mutation_frees_exactly_the_unreachable(heap_backend, concurrent):
    rng = numpy.random.default_rng(11)
    with Heap(1 << 20, backend=heap_backend) as heap:
        random_graph(heap, 3000, rng)
        expected = reachable(heap)
        allocated = allocated_mask(heap)
        stats = Collector(heap).collect(concurrent=concurrent)
        now_allocated = allocated_mask(heap)
        numpy.testing.assert_array_equal(now_allocated, expected)
        assert stats.freed == int((allocated & ~expected).sum()) > 0
        assert stats.live == int(expected.sum())
        assert stats.backend == heap_backend and stats.concurrent == concurrent
        again = Collector(heap).collect(concurrent=concurrent)
        assert again.freed == 0


def test_concurrent_native_mutators_never_lose_a_reachable_object(heap_backend):
    with Heap(32 << 20, backend=heap_backend) as heap:
        populate(heap, 300000, garbage=0.3, seed=5)
        collector = Collector(heap)
        with NativeMutators(heap, threads=2, rate=0, seed=7) as mutators:
            for cycle in range(30):
                time.sleep(0.005 * (cycle % 3))
                stats = collector.collect()
                mutators.pause()
                try:
                    check_nothing_reachable_was_freed(heap)
                finally:
                    mutators.resume()
            totals = mutators.stats()
        assert totals["violations"] == 0
        assert totals["stores"] > 1000 and totals["allocations"] > 100
        check_nothing_reachable_was_freed(heap)


def test_python_mutation_through_the_heap_api_during_concurrent_cycles(heap_backend):
    """A Python thread allocates, links and (un)roots objects while another
    Python thread runs cycles; every object it still roots must stay alive."""
    rng = numpy.random.default_rng(3)
    with Heap(2 << 20, backend=heap_backend) as heap:
        collector = Collector(heap)
        stop = threading.Event()
        cycles = []

        def collect_in_background():
            while not stop.is_set():
                cycles.append(collector.collect())

        held = [heap.alloc()]
        heap.add_root(held[0])
        background = threading.Thread(target=collect_in_background)
        background.start()
        deadline = time.monotonic() + 1.0
        try:
            while time.monotonic() < deadline or len(cycles) < 3:
                try:
                    fresh = heap.alloc(root=True)
                except gctrack.HeapFullError:
                    continue
                parent = held[rng.integers(len(held))]
                heap.set_ref(parent, int(rng.integers(heap.slots)), fresh)   # raises if freed
                held.append(fresh)
                if len(held) > 200:
                    heap.remove_root(held.pop(1))
                for obj in held[-5:]:
                    heap.get_ref(obj, 0)          # ValueError if a held object was freed
        finally:
            stop.set()
            background.join()
        check_nothing_reachable_was_freed(heap)
        assert len(cycles) >= 3 and sum(c.freed for c in cycles) > 0


def is_live(heap, obj) -> bool:
    return bool(allocated_mask(heap)[(obj - heap.base) // heap.object_size])


def test_after_phase_names_each_phase_of_a_concurrent_cycle_in_order():
    require("pagemap_scan")
    with Heap(1 << 16, backend="pagemap_scan") as heap:
        heap.alloc(root=True)
        phases = []
        Collector(heap, pause_goal=1e-12).collect(max_preclean=2, after_phase=phases.append)
        assert phases == ["initial_mark", "concurrent_mark", "preclean", "preclean", "before_remark"]
        phases.clear()
        Collector(heap).collect(max_preclean=0, after_phase=phases.append)
        assert phases == ["initial_mark", "concurrent_mark", "before_remark"]


def test_after_phase_is_checked_and_its_exception_abandons_the_cycle():
    require("pagemap_scan")
    with Heap(1 << 16, backend="pagemap_scan") as heap:
        kept, garbage = heap.alloc(root=True), heap.alloc()
        collector = Collector(heap)
        with pytest.raises(TypeError):
            collector.collect(after_phase="initial_mark")
        with pytest.raises(ValueError, match="concurrent"):
            collector.collect(concurrent=False, after_phase=print)

        def fail(phase):
            if phase == "concurrent_mark":
                raise KeyError(phase)

        with pytest.raises(KeyError):
            collector.collect(after_phase=fail)
        assert is_live(heap, garbage) and not heap.collecting
        assert collector.collect().freed == 1 and is_live(heap, kept)


def test_a_root_set_during_concurrent_mark_keeps_its_object(heap_backend):
    """The remark rescans the roots: Y, whose only path from the roots was
    cut after the initial mark, is held by a root set meanwhile."""
    with Heap(1 << 16, backend=heap_backend) as heap:
        r1, x, y, garbage = heap.alloc(root=True), heap.alloc(), heap.alloc(), heap.alloc()
        heap.set_ref(r1, 0, x)
        heap.set_ref(x, 3, y)

        def after_phase(phase):
            if phase == "initial_mark":           # r1 is shaded; x and y are not yet
                heap.add_root(y)
                heap.set_ref(x, 3, 0)

        stats = Collector(heap).collect(after_phase=after_phase)
        assert is_live(heap, y) and is_live(heap, x)
        assert stats.freed == 1 and not is_live(heap, garbage)


def test_a_reference_stored_into_a_marked_object_after_precleaning_keeps_its_target(heap_backend):
    """The remark rescans the marked objects on dirty cards: Z, stored into
    the already scanned X after the last precleaning round and unrooted,
    is reachable only through X's dirty card."""
    with Heap(1 << 16, backend=heap_backend) as heap:
        r1, x, z = heap.alloc(root=True), heap.alloc(), heap.alloc()
        heap.set_ref(r1, 0, x)

        def after_phase(phase):
            if phase == "initial_mark":
                heap.add_root(z)          # roots are read again only at remark
            elif phase == "preclean":     # the only round: x is marked and scanned
                heap.set_ref(x, 5, z)
                heap.remove_root(z)

        stats = Collector(heap).collect(max_preclean=1, after_phase=after_phase)
        assert is_live(heap, z) and heap.get_ref(x, 5) == z
        assert stats.freed == 0 and stats.remark_dirty_cards >= 1


def test_safepoint_pause_really_stops_the_mutators():
    require("pagemap_scan")
    with Heap(4 << 20, backend="pagemap_scan") as heap, \
            NativeMutators(heap, threads=2, rate=0) as mutators:
        time.sleep(0.02)
        mutators.pause()
        before = work_done(mutators)
        time.sleep(0.05)
        assert work_done(mutators) == before
        mutators.resume()
        time.sleep(0.02)
        assert mutators.stats()["stores"] > before["stores"]


def test_heap_layout_and_api(page_size):
    require("pagemap_scan")
    with Heap(64 * 64, object_size=64, backend="pagemap_scan") as heap:
        assert (heap.num_objects, heap.slots, heap.object_size) == (64, 7, 64)
        a, b = heap.alloc(), heap.alloc()
        assert (a - heap.base) % 64 == 0 and b == a + 64
        heap.set_ref(a, 6, b)
        assert heap.get_ref(a, 6) == b and heap.get_ref(a, 0) == 0
        row = heap.view()[(a - heap.base) // 64]
        assert row[0] == HEADER_LIVE and row[7] == b            # header, then slots
        slot = heap.add_root(a)
        assert heap.roots() == [a] and heap.root_slots[slot] == a
        heap.remove_root(a)
        assert heap.roots() == []


def test_bad_heap_input(page_size):
    require("pagemap_scan")
    with pytest.raises(ValueError):
        Heap(1 << 16, object_size=48)
    with pytest.raises(ValueError):
        Heap(1 << 16, card_size=100)
    with Heap(64 * 64, backend="pagemap_scan", max_roots=2) as heap:
        a = heap.alloc()
        for bad_call in (lambda: heap.set_ref(a + 8, 0, 0), lambda: heap.set_ref(a, 7, 0),
                         lambda: heap.set_ref(a, -1, 0), lambda: heap.set_ref(a, 0, a + 64),
                         lambda: heap.get_ref(heap.base - 64, 0), lambda: heap.remove_root(a),
                         lambda: heap.add_root(0)):
            with pytest.raises(ValueError):
                bad_call()
        with pytest.raises(TypeError):
            heap.set_ref(a, 0, "b")
        heap.add_root(a)
        heap.add_root(a)
        with pytest.raises(ValueError, match="root slots"):
            heap.add_root(a)
        for _ in range(63):
            heap.alloc()
        with pytest.raises(gctrack.HeapFullError):
            heap.alloc()


def test_the_heaps_tracker_runs_only_the_collectors_passes():
    """Another pass would take dirty cards that the collector needs."""
    require("pagemap_scan")
    with Heap(1 << 20, backend="pagemap_scan") as heap:
        cards = gctrack.CardTable.for_arena(heap.arena)
        for use in (lambda: heap.tracker.collect(cards), heap.tracker.scan, heap.tracker.reset,
                    heap.tracker.start, lambda: heap.tracker.drain(cards)):
            with pytest.raises(RuntimeError, match="belongs to a Heap"):
                use()
        heap.tracker.record(heap.base, 8)          # declaring a write is still fine


def test_swept_objects_are_reused(page_size):
    require("pagemap_scan")
    with Heap(64 * 64, backend="pagemap_scan") as heap:
        objects = [heap.alloc() for _ in range(64)]
        heap.add_root(objects[0])
        stats = Collector(heap).collect()
        assert stats.freed == 63 and heap.free_count == 63
        again = [heap.alloc() for _ in range(63)]
        assert set(again) == set(objects[1:])


@pytest.mark.soak
def test_soak_many_cycles(heap_backend):
    with Heap(32 << 20, backend=heap_backend) as heap:
        populate(heap, 300000, garbage=0.3)
        collector = Collector(heap)
        with NativeMutators(heap, threads=3, rate=0) as mutators:
            for _ in range(300):
                collector.collect()
                mutators.pause()
                try:
                    check_nothing_reachable_was_freed(heap)
                finally:
                    mutators.resume()
            assert mutators.stats()["violations"] == 0


def test_a_heap_in_use_is_not_closed_and_cycles_do_not_overlap():
    require("pagemap_scan")
    heap = Heap(1 << 20, backend="pagemap_scan")
    mutators = NativeMutators(heap, threads=1, rate=1000).start()
    with pytest.raises(RuntimeError, match="stop them first"):
        heap.close()
    mutators.stop()
    collector = Collector(heap)
    heap.collecting = True                 # as if another thread were mid-cycle
    with pytest.raises(RuntimeError, match="already running"):
        collector.collect()
    heap.collecting = False
    with pytest.raises(ValueError):
        collector.collect(max_preclean=-1)
    heap.close()
    with pytest.raises(ValueError, match="closed"):
        collector.collect()


def test_the_remark_pass_only_reports_and_the_next_cycle_rearms(heap_backend):
    """A page written just before the remark is reported by the remark's
    final pass but left dirty (report-only): the next cycle's first pass
    re-arms it, and the cycle after that finds nothing to re-arm. A first
    pass that forgot to re-arm would leave it dirty for the third cycle."""
    with Heap(1 << 16, backend=heap_backend) as heap:
        r, x = heap.alloc(root=True), heap.alloc()
        heap.set_ref(r, 0, x)
        collector = Collector(heap)
        collector.collect()
        collector.collect()                      # nothing written since the last re-arm

        def after_phase(phase):
            if phase == "before_remark":
                heap.set_ref(r, 1, x)

        first = collector.collect(after_phase=after_phase)
        assert first.remark_dirty_cards >= 1 and first.freed == 0
        second = collector.collect(max_preclean=0)       # its first pass is its only reset
        assert second.rearm_pages >= 1, "the remark re-armed the page: not report-only"
        third = collector.collect(max_preclean=0)
        assert third.rearm_pages == 0, "the second cycle's first pass did not re-arm"
        assert third.remark_dirty_cards == 0 and is_live(heap, x)


@pytest.mark.parametrize("concurrent", [True, False], ids=["concurrent", "stop-the-world"])
def test_cycle_stats_count_the_time_to_safepoint(concurrent):
    """With mutators running, stopping them takes time that the pause
    figures leave out; the stats report it beside them."""
    require("pagemap_scan")
    with Heap(4 << 20, backend="pagemap_scan") as heap:
        populate(heap, heap.num_objects // 2, garbage=0.2)
        with NativeMutators(heap, threads=2, rate=0):
            stats = Collector(heap).collect(concurrent=concurrent)
    assert stats.remark_time_to_safepoint > 0 and stats.sweep_seconds > 0
    assert (stats.initial_mark_time_to_safepoint > 0) == concurrent


@pytest.mark.parametrize("concurrent", [True, False], ids=["concurrent", "stop-the-world"])
def test_pause_spans_bracket_each_pause_on_the_monotonic_clock(concurrent):
    """Each span runs from the stop request to the resume: it holds the time
    to safepoint and the pause, and lies inside the collect() call."""
    require("pagemap_scan")
    with Heap(4 << 20, backend="pagemap_scan") as heap:
        populate(heap, heap.num_objects // 2, garbage=0.2)
        with NativeMutators(heap, threads=2, rate=0):
            before = time.monotonic()
            stats = Collector(heap).collect(concurrent=concurrent)
            after = time.monotonic()
    spans = stats.pause_spans
    assert len(spans) == (2 if concurrent else 1)
    ends = [before] + [t for span in spans for t in span] + [after]
    assert ends == sorted(ends) and all(end > start for start, end in spans)
    stops = ([(stats.initial_mark_time_to_safepoint, stats.initial_mark_pause)] if concurrent
             else []) + [(stats.remark_time_to_safepoint, stats.remark_pause)]
    for (start, end), (to_safepoint, pause) in zip(spans, stops):
        assert end - start >= to_safepoint + pause


def test_reported_cards_accumulate_every_pass_of_every_cycle(heap_backend):
    with Heap(2 << 20, backend=heap_backend) as heap:
        a, b = heap.alloc(root=True), heap.alloc(root=True)
        collector = Collector(heap)
        collector.collect()
        with pytest.raises(ValueError, match="512 B cards"):
            heap.reported_cards = gctrack.CardTable.for_arena(heap.arena, 1024)
        heap.reported_cards = union = gctrack.CardTable.for_arena(heap.arena, heap.card_size)
        heap.set_ref(a, 0, b)
        collector.collect()
        heap.set_ref(b, 0, a)
        collector.collect()
        assert heap.reported_cards is union
        assert union.is_dirty(a + 8) and union.is_dirty(b + 8)
        heap.reported_cards = None
        heap.set_ref(a, 1, b)
        union.clear()
        collector.collect()
        assert union.count() == 0, "a detached table still received cards"


def test_card_counts_settle_the_stored_marks_at_each_pass(heap_backend):
    with Heap(2 << 20, backend=heap_backend) as heap:
        a, b = heap.alloc(root=True), heap.alloc(root=True)
        collector = Collector(heap)
        collector.collect()
        stored = gctrack.CardTable.for_arena(heap.arena, heap.card_size)
        heap.stored_cards = stored
        assert heap.stored_cards is stored
        assert heap.card_counts == {"passes": 0, "reported": 0, "stored": 0}
        heap.set_ref(a, 0, b)
        stored.mark_range(a + 8, 8)                 # the store's mark, as a mutator makes it
        never_written = heap.base + heap.arena.size - 64
        stored.mark_range(never_written, 8)         # a mark with no store behind it
        stats = collector.collect()
        counts = heap.card_counts
        assert counts["passes"] == 2 + len(stats.preclean)
        assert counts["stored"] == 1
        assert counts["reported"] == max(1, heap.tracker.granularity // heap.card_size)
        assert not stored.is_dirty(a + 8), "a reported mark is settled"
        assert stored.is_dirty(never_written), "what no pass reported stays marked"
        heap.stored_cards = None
        assert heap.card_counts["passes"] == 0


def test_passes_walk_only_the_allocated_extent(heap_backend, page_size):
    """A page past every object ever allocated is not walked: a write there
    is not reported, until allocation grows the extent over it."""
    with Heap(1 << 20, backend=heap_backend) as heap:
        heap.alloc(root=True)
        collector = Collector(heap)
        collector.collect()
        heap.view()[-1, 1] = 1                  # the last page, past the extent
        if heap_backend == "software":          # its barrier marks what the heap API stores
            heap.tracker.record(heap.base + heap.arena.size - page_size, 8)
        assert collector.collect().rearm_pages == 0
        heap.view()[-1, 1] = 0
        for _ in range(heap.free_count):       # the extent grows over the written page
            heap.alloc()
        assert collector.collect().rearm_pages >= 1


def test_an_object_allocated_past_the_extent_during_the_cycle_keeps_its_target(heap_backend):
    """X, allocated during the concurrent mark far past the extent the
    cycle's first pass walked, is born marked and never traced: the target
    stored into it survives only if the remark's pass walks the grown extent."""
    with Heap(1 << 20, backend=heap_backend) as heap:
        heap.alloc(root=True)
        collector = Collector(heap)
        collector.collect()
        z = heap.alloc()                        # unreachable when the cycle starts
        made = []

        def after_phase(phase):
            if phase == "concurrent_mark":
                made.extend(heap.alloc() for _ in range(4000))
                x = made[-1]
                heap.add_root(x)
                heap.set_ref(x, 2, z)

        stats = collector.collect(max_preclean=0, after_phase=after_phase)
        assert is_live(heap, z) and stats.remark_dirty_cards >= 1
        check_nothing_reachable_was_freed(heap)


@pytest.mark.parametrize("name", ["pause_goal", "preclean_time_limit"])
def test_pause_goal_and_preclean_time_limit_are_positive_finite_seconds(name):
    require("pagemap_scan")
    with Heap(1 << 16, backend="pagemap_scan") as heap:
        for bad in (0, -1e-3, float("inf"), float("nan")):
            with pytest.raises(ValueError, match=name):
                Collector(heap, **{name: bad})
        for bad in ("1ms", None, True):
            with pytest.raises(TypeError, match=name):
                Collector(heap, **{name: bad})
        assert getattr(Collector(heap, **{name: 0.25}), name) == 0.25
        assert Collector(heap).pause_goal == 0.001


def test_precleaning_stops_once_the_predicted_remark_meets_the_goal():
    require("pagemap_scan")
    with Heap(1 << 20, backend="pagemap_scan") as heap:
        heap.alloc(root=True)
        stats = Collector(heap, pause_goal=10.0).collect(max_preclean=5)
        assert len(stats.preclean) == 1 and not stats.outran_precleaning
        assert 0 < stats.predicted_remark == stats.preclean[-1].predicted_remark <= 10.0
        assert stats.pause_goal == 10.0


def test_precleaning_goes_on_while_the_prediction_exceeds_the_goal_up_to_its_bounds():
    """An unreachable goal: precleaning runs to its bound on rounds, or to
    its bound on time, and says that the mutators outran it."""
    require("pagemap_scan")
    with Heap(1 << 20, backend="pagemap_scan") as heap:
        heap.alloc(root=True)
        rounds = Collector(heap, pause_goal=1e-12).collect(max_preclean=5)
        assert len(rounds.preclean) == 5 and rounds.outran_precleaning
        timed = Collector(heap, pause_goal=1e-12, preclean_time_limit=1e-9).collect(max_preclean=5)
        assert len(timed.preclean) == 1 and timed.outran_precleaning


def test_the_sweep_never_writes_into_the_tracked_arena(heap_backend):
    """Allocation state lives in a side bitmap: freeing 5000 objects dirties
    no page (the next cycle's first pass re-arms nothing), the freed objects
    keep their headers, and allocated() no longer lists them."""
    with Heap(1 << 20, backend=heap_backend) as heap:
        kept = heap.alloc(root=True)
        garbage = [heap.alloc() for _ in range(5000)]
        collector = Collector(heap)
        assert collector.collect().freed == 5000
        assert collector.collect(max_preclean=0).rearm_pages == 0
        index = (numpy.array(garbage) - heap.base) // heap.object_size
        assert (heap.view()[index, 0] == HEADER_LIVE).all()
        assert heap.allocated().tolist() == [(kept - heap.base) // heap.object_size]
        again = heap.alloc()                    # reuses a freed object, zeroed
        assert again in garbage and heap.get_ref(again, 0) == 0 and heap.live_count == 2
