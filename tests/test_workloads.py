"""The native workloads of NativeMutators: rewire, gcbench, gcold, binary_trees.

Real threads on small heaps beside a real collector: nothing reachable is
freed (the mutators' violation count, and reachability read from raw
memory), the work goes on, the parameters are checked, the stored cards are
the truth a tracker is measured against, a full heap stalls the allocating
workloads until a collection frees memory, and CPU time is counted.
"""
import contextlib
import math
import signal
import time

import numpy
import pytest

import gctrack
from conftest import HEAP_BACKENDS, check_nothing_reachable_was_freed, reachable, require
from gctrack.collector import Collector
from gctrack.heap import Heap
from gctrack.mutator import PARAMETERS, WORK_UNITS, WORKLOADS, NativeMutators, populate

ALLOCATING = ["gcbench", "gcold", "binary_trees"]


def wait_until(condition, timeout=5.0):
    """Poll ``condition`` until it holds; whether it did within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


@contextlib.contextmanager
def time_limit(seconds):
    """TimeoutError if the block outlasts ``seconds``: a stop of the world
    checks for signals while it waits, so a thread that never reaches the
    safepoint fails the test instead of hanging it."""
    def expire(signum, frame):
        raise TimeoutError(f"still waiting after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def tree_size(depth):
    return 2 ** (depth + 1) - 1


def peak_live(workload, params, threads):
    """What the threads of ``workload`` keep reachable at most, in objects."""
    if workload == "gcbench":
        per_thread = (tree_size(params["long_lived_depth"]) + params["array_objects"]
                      + tree_size(params["max_depth"]))
    elif workload == "binary_trees":
        per_thread = tree_size(params["long_lived_depth"]) + tree_size(params["max_depth"])
    else:
        per_thread = tree_size(params["old_depth"]) + params["alloc_per_step"]
    return threads * per_thread


@pytest.mark.parametrize("backend", ["auto"] + HEAP_BACKENDS)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_every_workload_runs_beside_concurrent_cycles_and_loses_nothing(workload, backend):
    if backend != "auto":
        require(backend)
    with Heap(1 << 20, backend=backend) as heap:
        if workload == "rewire":
            populate(heap, heap.num_objects // 2, garbage=0.2)
        collector = Collector(heap)
        with NativeMutators(heap, threads=2, workload=workload, seed=3) as mutators:
            assert wait_until(lambda: mutators.stats()["work_units"] > 0)
            before = mutators.stats()
            for _ in range(4):
                collector.collect()
            assert wait_until(lambda: mutators.stats()["work_units"] > before["work_units"])
            mutators.pause()
            check_nothing_reachable_was_freed(heap)
            live = int(reachable(heap).sum())
            mutators.resume()
            totals = mutators.stats()
    assert totals["violations"] == 0, "a mutator found an object it holds freed"
    assert totals["stores"] > before["stores"]
    if workload != "rewire":       # rewire's live data is what populate() made
        assert live <= heap.num_objects // 2, f"{live} of {heap.num_objects} objects reachable"
        assert totals["allocations"] > before["allocations"]
    assert (totals["old_stores"] > 0) == (workload == "gcold")


@pytest.mark.parametrize("workload", WORKLOADS)
def test_the_violation_count_sees_a_structure_freed_under_a_mutator(workload):
    """The check behind the test above can fail: free what the threads hold
    (as a broken collector would: roots emptied for one stop-the-world cycle,
    then put back) and they find freed objects."""
    with Heap(1 << 20, backend="software") as heap:
        collector = Collector(heap)
        with NativeMutators(heap, threads=1, workload=workload, seed=5) as mutators:
            assert wait_until(lambda: mutators.stats()["work_units"] > 20)
            mutators.pause()
            own = numpy.flatnonzero(heap.reserved_roots)
            saved = heap.root_slots[own].copy()
            heap.root_slots[own] = 0
            assert collector.collect(concurrent=False).freed > 0
            heap.root_slots[own] = saved
            mutators.resume()
            assert wait_until(lambda: mutators.stats()["violations"] > 0), mutators.stats()


def test_workloads_and_parameters_are_checked():
    with Heap(1 << 20, backend="software") as heap:
        with pytest.raises(ValueError, match="rewire, gcbench, gcold, binary_trees"):
            NativeMutators(heap, workload="lisp2")
        with pytest.raises(TypeError, match="workload"):
            NativeMutators(heap, workload=1)
        with pytest.raises(ValueError, match="'depth'.*min_depth, max_depth, long_lived_depth"):
            NativeMutators(heap, workload="binary_trees", params={"depth": 6})
        with pytest.raises(ValueError, match="'max_depth'.*locality, hot_fraction"):
            NativeMutators(heap, params={"max_depth": 6})          # another workload's key
        with pytest.raises(TypeError, match="mapping"):
            NativeMutators(heap, workload="gcold", params=[("old_depth", 4)])
        wrong_types = [("gcbench", "max_depth", 6.0), ("gcbench", "array_objects", True),
                       ("gcold", "old_store_ratio", "0.5"), ("rewire", "locality", None)]
        for workload, key, value in wrong_types:
            with pytest.raises(TypeError, match=key):
                NativeMutators(heap, workload=workload, params={key: value})
        out_of_range = [("rewire", {"locality": 1.5}), ("rewire", {"hot_fraction": 0.0}),
                        ("gcbench", {"min_depth": 4, "max_depth": 3}), ("gcbench", {"max_depth": -1}),
                        ("gcbench", {"max_depth": 15}),             # 65535 nodes > the heap's 16384
                        ("gcbench", {"array_objects": heap.num_objects + 1}),
                        ("gcold", {"old_depth": 0}), ("gcold", {"alloc_per_step": 0}),
                        ("gcold", {"promotion": -0.1}), ("gcold", {"old_store_ratio": math.nan}),
                        ("binary_trees", {"long_lived_depth": 41})]
        for workload, params in out_of_range:
            with pytest.raises(ValueError, match=next(iter(params))):
                NativeMutators(heap, workload=workload, params=params)
        with pytest.raises(TypeError, match="CardTable"):
            NativeMutators(heap, stored_cards=heap.arena)
        with gctrack.Arena(1 << 16) as other:
            with pytest.raises(ValueError, match="outside the card table"):
                NativeMutators(heap, stored_cards=gctrack.CardTable.for_arena(other))
        assert heap.reserved_roots.sum() == 0 and heap.mutator_threads == 0


def test_default_parameters_scale_with_the_heap_and_follow_those_given():
    with Heap(1 << 20, backend="software") as small, Heap(8 << 20, backend="software") as large:
        for workload in WORKLOADS:
            mutators = NativeMutators(small, workload=workload)
            assert list(mutators.params) == list(PARAMETERS[workload])
            assert mutators.workload == workload and mutators.work_unit == WORK_UNITS[workload]
            assert workload in repr(mutators)
        assert NativeMutators(small).params == {"locality": 0.0, "hot_fraction": 0.01}
        for workload in ALLOCATING:
            for threads in (1, 2, 4):
                params = {heap: NativeMutators(heap, threads=threads, workload=workload).params
                          for heap in (small, large)}
                for heap, chosen in params.items():
                    assert peak_live(workload, chosen, threads) <= heap.num_objects // 2, chosen
                depth = "old_depth" if workload == "gcold" else "max_depth"
                assert params[large][depth] >= params[small][depth] + 2, params    # 8x the objects
        given = NativeMutators(large, workload="gcbench", params={"max_depth": 6})
        assert given.params == {"min_depth": 4, "max_depth": 6, "long_lived_depth": 6, "array_objects": 127}
        copy = given.params
        copy["max_depth"] = 2
        assert given.params["max_depth"] == 6, "params is a copy"
        shallow = NativeMutators(large, workload="binary_trees", params={"max_depth": 2})
        assert shallow.params["min_depth"] == 2


def kernel_tracker_beside(heap):
    """A pagemap_scan Tracker of a software heap's arena, independent of the heap."""
    from gctrack.pagemap_scan import PagemapScanBackend
    return gctrack.Tracker(heap.arena, backend=PagemapScanBackend(heap.arena, beside_software=True))


@pytest.mark.parametrize("workload", WORKLOADS)
def test_stored_cards_lie_within_what_a_tracker_reports(workload):
    """The truth is never more than the tracker saw: every card of a
    reference store lies on a page that the kernel reported written."""
    require("pagemap_scan")
    with Heap(1 << 20, backend="software") as heap:
        truth = gctrack.CardTable.for_arena(heap.arena, 64)
        reported = gctrack.CardTable.for_arena(heap.arena, 64)
        tracker = kernel_tracker_beside(heap)
        try:
            tracker.collect(reported)                  # armed: from here every write is seen
            reported.clear()
            with NativeMutators(heap, threads=1, workload=workload, stored_cards=truth) as mutators:
                assert wait_until(lambda: mutators.stats()["stores"] > 1000)
                mutators.pause()
                tracker.collect(reported)
                stores = mutators.stats()["stores"]
                # stop() resumes the world before the threads see that they
                # must leave: read the truth while it is still paused
                truth = truth.copy()
        finally:
            tracker.close()
    assert truth.count() > 0 and stores > 1000
    outside = numpy.flatnonzero(truth.words & ~reported.words)
    assert outside.size == 0, f"{outside.size} words of stored cards the tracker never reported"


@pytest.mark.parametrize("workload", WORKLOADS)
def test_stored_cards_hold_every_reference_store(workload):
    """The truth misses nothing: every word of the arena that changed is a
    header or an allocation's zeroing, or it lies on a stored card. Judged
    on a window after the set-up, with the cards cleared at its start, so
    that the long-lived structures' cards do not cover the stores into them."""
    require("pagemap_scan")
    with Heap(1 << 20, backend="software") as heap:
        truth = gctrack.CardTable.for_arena(heap.arena, 64)
        with gctrack.BarrierVerifier(heap.arena, truth) as verifier:
            with NativeMutators(heap, threads=1, workload=workload, stored_cards=truth) as mutators:
                assert wait_until(lambda: mutators.stats()["work_units"] > 10)
                mutators.pause()
                Collector(heap).collect()                  # room to allocate (no arena writes)
                verifier.check(clear=True)                 # the window starts: truth cleared
                stores = mutators.stats()["stores"]
                mutators.resume()
                assert wait_until(lambda: mutators.stats()["stores"] > stores + 1000)
                mutators.pause()
                report = verifier.check(clear=False, max_missed=1 << 20)
    assert report.words_changed > 1000
    missed = report.missed
    slot_word = (missed["address"] - numpy.uint64(heap.base)) % numpy.uint64(heap.object_size) != 0
    unrecorded = missed[slot_word & (missed["new"] != 0)]
    assert unrecorded.size == 0, f"{unrecorded.size} reference stores without a stored card"


@pytest.mark.parametrize("workload", ALLOCATING)
def test_a_full_heap_stalls_the_thread_until_a_collection_frees_memory(workload):
    with Heap(1 << 20, backend="software") as heap:
        mutators = NativeMutators(heap, threads=2, workload=workload).start()
        try:
            # Nothing frees memory here: a thread that stalled stays stalled.
            assert wait_until(lambda: mutators.stats()["alloc_stalls"] == 2 and heap.free_count == 0)
            stalled = mutators.stats()
            time.sleep(0.05)
            later = mutators.stats()
            assert later["work_units"] == stalled["work_units"], "work went on in a full heap"
            assert later["stall_seconds"] > stalled["stall_seconds"], "a stall is counted as it lasts"
            with time_limit(2.0):
                mutators.pause()                              # stalled threads reach the safepoint
                mutators.resume()
                assert Collector(heap).collect().freed > 0
            assert wait_until(lambda: mutators.stats()["work_units"] > later["work_units"])
            assert wait_until(lambda: heap.free_count == 0)   # full again, no collector
            started = time.monotonic()
        finally:
            mutators.stop()
        assert time.monotonic() - started < 1.0, "stop() waited for a stalled thread"
        totals = mutators.stats()
    assert totals["violations"] == 0 and totals["alloc_stalls"] >= 2


def test_cpu_seconds_count_running_and_finished_threads():
    with Heap(1 << 20, backend="software") as heap:
        mutators = NativeMutators(heap, threads=2, workload="rewire")
        assert mutators.stats()["cpu_seconds"] == 0.0
        started = time.monotonic()
        with mutators:
            assert wait_until(lambda: mutators.stats()["cpu_seconds"] > 0.02)
            first = mutators.stats()["cpu_seconds"]
            assert wait_until(lambda: mutators.stats()["cpu_seconds"] > first + 0.02)
        wall = time.monotonic() - started
        finished = mutators.stats()["cpu_seconds"]
        assert 0.04 < finished <= 2 * wall + 0.01
        time.sleep(0.02)
        assert mutators.stats()["cpu_seconds"] == finished, "gone threads use no CPU"
        with mutators:                     # a second run adds to the first
            assert wait_until(lambda: mutators.stats()["cpu_seconds"] > finished + 0.02)
        assert mutators.stats()["cpu_seconds"] > finished + 0.02


@pytest.mark.parametrize("workload", ALLOCATING)
def test_rate_paces_the_work_units_of_every_workload(workload):
    with Heap(4 << 20, backend="software") as heap:
        started = time.monotonic()
        with NativeMutators(heap, threads=2, rate=100, workload=workload) as mutators:
            assert wait_until(lambda: mutators.stats()["work_units"] >= 4)
            time.sleep(0.1)
            units = mutators.stats()["work_units"]
        elapsed = time.monotonic() - started
    assert 4 <= units <= 2 * (100 * elapsed + 1)


def hot_share(truth, heap, hot_fraction, page_size):
    """The share of the stored cards (one object each) on rewire's hot
    pages, and where those end (the hot set as the extent left it)."""
    extent = -(-(int(heap.allocated().max()) + 1) * heap.object_size // page_size) * page_size
    hot_end = -(-int(hot_fraction * extent) // page_size) * page_size
    cards = truth.indices()
    return float((cards * truth.card_size < hot_end).mean()), cards


def test_rewire_locality_sends_that_share_of_stores_to_the_hot_pages(page_size):
    """The hot pages hold garbage that no walk from a root reaches: only the
    locality knob sends stores there."""
    shares = {}
    for locality in (0.0, 0.5, 1.0):
        with Heap(1 << 20, backend="software") as heap:
            for _ in range(heap.num_objects // 10):
                heap.alloc()
            populate(heap, heap.num_objects // 2, garbage=0.0)
            truth = gctrack.CardTable.for_arena(heap.arena, heap.object_size)
            with NativeMutators(heap, threads=1, rate=20000, workload="rewire", stored_cards=truth,
                                params={"locality": locality, "hot_fraction": 0.05}) as mutators:
                assert wait_until(lambda: mutators.stats()["stores"] >= 1000)
                mutators.pause()
                shares[locality], cards = hot_share(truth, heap, 0.05, page_size)
            assert cards.size > 50
    assert shares[1.0] == 1.0, "with locality 1 every store goes to the hot pages"
    assert shares[0.0] < 0.05 and shares[0.5] > 0.25, shares
