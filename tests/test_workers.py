"""GC worker threads: the remark's final pass and rescan, split across
pinned threads that sleep until the world is stopped.

A split report-only pass must mark exactly the cards one pass marks; a split
rescan must keep everything a serial one keeps; the threads must be pinned,
asleep while the mutators run, deaf to the host's signals, joined when the
Collector goes, and harmless in a forked child.
"""
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy
import pytest

import gctrack
from conftest import require
from gctrack.collector import Collector
from gctrack.heap import Heap
from gctrack.mutator import NativeMutators, populate
from gctrack.testing import SplitReporter
from gctrack.workers import DEFAULT_WORKERS_CAP, default_workers

MiB = 1 << 20
CPUS = len(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(CPUS < 2, reason="a split needs two CPUs to run on")


def boundary_offsets(arena, every: int) -> numpy.ndarray:
    """Pages on both sides of every ``every``-byte boundary, the first and
    last page, and a scatter in between."""
    page = arena.page_size
    edges = numpy.arange(0, arena.size + 1, every, dtype=numpy.int64)
    near = numpy.concatenate([edges - page, edges, edges + page, [0, arena.size - page]])
    scatter = numpy.arange(3 * page, arena.size, 37 * page + every // 7 // page * page)
    offsets = numpy.concatenate([near, scatter])
    return numpy.unique(offsets[(offsets >= 0) & (offsets < arena.size)])


@pytest.mark.parametrize("workers", [1, 2, 3, 5, 64])
@pytest.mark.parametrize("card_size", [64, 512, 1 << 16])
def test_a_split_report_marks_exactly_the_cards_of_one_pass(workers, card_size):
    """Pages on both sides of chunk boundaries, and the arena's first and
    last page, land in the right cards whichever thread walks them."""
    require("pagemap_scan")
    with gctrack.Arena(160 * MiB + 4096) as arena, gctrack.Tracker(arena, backend="pagemap_scan") as tracker:
        offsets = boundary_offsets(arena, 8 * MiB)
        view = numpy.asarray(arena)
        view[offsets] = 1
        split = gctrack.CardTable.for_arena(arena, card_size)
        with SplitReporter(tracker, workers=workers) as reporter:
            seconds, calls, pages = reporter.report(split)
        serial = gctrack.CardTable.for_arena(arena, card_size)
        tracker.collect(serial, reset=False)
        numpy.testing.assert_array_equal(split.indices(), serial.indices())
        assert pages == len(numpy.unique(offsets // arena.page_size))
        assert seconds > 0
        if workers > 1:
            assert calls >= 4, "the pass was not split into chunks"
        # Report-only: every page stays dirty for the next re-arming pass.
        again = gctrack.CardTable.for_arena(arena, card_size)
        tracker.collect(again)
        numpy.testing.assert_array_equal(again.indices(), serial.indices())


def test_a_split_report_does_not_split_where_threads_would_share_a_word_of_card_bits():
    """64 cards of 4 MiB span 256 MiB: a 160 MiB arena cannot be cut on a word."""
    require("pagemap_scan")
    with gctrack.Arena(160 * MiB) as arena, gctrack.Tracker(arena, backend="pagemap_scan") as tracker:
        numpy.asarray(arena)[boundary_offsets(arena, MiB)] = 1
        split = gctrack.CardTable.for_arena(arena, 4 * MiB)
        with SplitReporter(tracker, workers=4) as reporter:
            _, calls, _ = reporter.report(split)
        serial = gctrack.CardTable.for_arena(arena, 4 * MiB)
        tracker.collect(serial, reset=False)
        numpy.testing.assert_array_equal(split.indices(), serial.indices())
        assert calls == 1


@pytest.mark.parametrize("backend", ["mprotect", "uffd_sync", "software"])
def test_backends_without_a_split_walk_report_in_one_pass(backend):
    require(backend)
    with gctrack.Arena(64 * MiB) as arena, gctrack.Tracker(arena, backend=backend) as tracker:
        offsets = boundary_offsets(arena, 16 * MiB)[::5]
        gctrack.testing.store_bytes(arena, offsets.astype(numpy.uint64), tracker)
        cards = gctrack.CardTable.for_arena(arena, 512)
        with SplitReporter(tracker, workers=2) as reporter:
            _, _, units = reporter.report(cards)
        unit = tracker.granularity                       # a page, or a card for software
        written = numpy.unique(offsets // unit)
        assert units == len(written)
        per_unit = max(unit // 512, 1)
        expected = numpy.unique((written[:, None] * unit // 512 + numpy.arange(per_unit)).ravel())
        numpy.testing.assert_array_equal(cards.indices(), expected)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (65, ValueError), (-1, ValueError),
                                        (2.0, TypeError), (True, TypeError), ("2", TypeError)])
def test_the_worker_count_is_checked(bad, error):
    with Heap(1 * MiB, backend="software") as heap:
        with pytest.raises(error, match="workers"):
            Collector(heap, workers=bad)
        assert Collector(heap).workers == default_workers() == min(CPUS, DEFAULT_WORKERS_CAP)
        assert Collector(heap, workers=3).workers == 3


def thread_status(tid: int) -> dict[str, str]:
    with open(f"/proc/self/task/{tid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def cpu_nanoseconds(tid: int) -> int:
    """Time the thread has spent on a CPU (schedstat)."""
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def live_tids() -> set[int]:
    return {int(tid) for tid in os.listdir("/proc/self/task")}


@needs_two_cpus
def test_workers_start_with_the_first_concurrent_cycle_pinned_and_deaf_to_signals():
    with Heap(4 * MiB, backend="software") as heap:
        collector = Collector(heap, workers=2)
        collector.collect(concurrent=False)
        assert collector.worker_threads == ()               # a stop-the-world cycle needs none
        collector.collect()
        threads = collector.worker_threads
        assert len(threads) == 2
        assert sorted(cpu for _, cpu in threads) == sorted(os.sched_getaffinity(0))[:2]
        for tid, cpu in threads:
            status = thread_status(tid)
            assert status["Cpus_allowed_list"] == str(cpu)
            blocked = int(status["SigBlk"], 16)
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD):
                assert blocked >> (signum - 1) & 1, f"signal {signum} reaches a GC worker"
        assert Collector(heap, workers=1).collect().remark_threads == 1


@needs_two_cpus
def test_workers_sleep_while_the_mutators_run_and_share_a_large_remark():
    """Between the initial mark and the remark the workers never run; at a
    remark with thousands of dirty cards, the world stopped, one takes part."""
    with Heap(64 * MiB, backend="software") as heap:
        populate(heap, heap.num_objects // 2, garbage=0.0)
        collector = Collector(heap, workers=2)
        collector.collect()                                  # starts the workers
        tids = [tid for tid, _ in collector.worker_threads]
        on_cpu = {}

        def after_phase(phase):
            if phase in ("initial_mark", "before_remark"):
                on_cpu[phase] = [cpu_nanoseconds(tid) for tid in tids]
            if phase == "before_remark":                     # dirty thousands of cards
                allocated = heap.allocated()[::7][:4000].astype(numpy.int64)
                for obj in heap.base + allocated * heap.object_size:
                    heap.set_ref(int(obj), 4, int(obj))

        threads = []
        with NativeMutators(heap, threads=2, rate=20000):
            for _ in range(3):
                stats = collector.collect(after_phase=after_phase, max_preclean=2)
                assert on_cpu["initial_mark"] == on_cpu["before_remark"], \
                    "a worker ran while the world was running"
                threads.append(stats.remark_threads)
                assert stats.remark_dirty_cards >= 3000          # 512 B cards of 64 B objects
        assert max(threads) == 2, "no worker took part in a remark of 4000 dirty cards"


def test_dropping_the_collector_joins_its_workers():
    with Heap(4 * MiB, backend="software") as heap:
        collector = Collector(heap, workers=3)
        collector.collect()
        tids = {tid for tid, _ in collector.worker_threads}
        assert len(tids) == 3 and tids <= live_tids()
        del collector
        gc.collect()
        # pthread_join returns when the kernel clears the thread id, a moment
        # before the task leaves /proc
        deadline = time.monotonic() + 2
        while tids & live_tids() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not tids & live_tids()


def remark_after_late_stores(backend: str, workers: int, extent: int = 16 * MiB, step: int = 331):
    """One cycle on a fresh heap in which holders spread over an extent
    each receive, after the last precleaning round, the only reference to
    an unmarked object. Returns (cycle stats, targets freed)."""
    with Heap(2 * extent, backend=backend) as heap:
        anchor = heap.alloc(root=True)
        populate(heap, extent // heap.object_size, garbage=1.0)        # unreachable filler
        # by default more holders than MIN_SPLIT_DIRTY_CARDS, so that the rescan is split
        spread = heap.base + heap.allocated()[1::step].astype(numpy.int64) * heap.object_size
        holders, targets = [int(a) for a in spread[0::2]], [int(a) for a in spread[1::2]]
        holders = holders[:len(targets)]
        chain = anchor
        for holder in holders:                       # anchor -> h0 -> h1 -> ...: marked concurrently
            heap.set_ref(chain, 6, holder)
            chain = holder

        def after_phase(phase):
            if phase == "initial_mark":
                for target in targets:               # roots are read again only at remark
                    heap.add_root(target)
            elif phase == "preclean":                # the only round: the holders are scanned
                for holder, target in zip(holders, targets):
                    heap.set_ref(holder, 2, target)
                    heap.remove_root(target)

        stats = Collector(heap, workers=workers).collect(max_preclean=1, after_phase=after_phase)
        assert len(targets) >= 10 and stats.remark_dirty_cards >= len(holders)
        live = set(heap.allocated().tolist())
        return stats, [t for t in targets if (t - heap.base) // heap.object_size not in live]


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_a_split_remark_rescans_every_dirty_card_in_every_chunk(heap_backend_any, workers):
    """Each target survives only if the remark's rescan reached its holder's
    card, in whichever thread's chunk it lay. A worker joins a remark only if
    it wakes before the collector's own share ends: up to three cycles, until
    one was shared."""
    for _ in range(3):
        stats, lost = remark_after_late_stores(heap_backend_any, workers)
        assert not lost, f"{len(lost)} targets on dirty cards were freed"
        if stats.remark_threads == min(workers, CPUS):
            break
    assert stats.remark_threads == min(workers, CPUS), "one thread per CPU at most"


def test_a_split_pass_then_a_rescan_of_its_cards_keeps_every_target():
    """A 160 MiB extent: the final pass is split (so its regions are not
    kept), and under 256 dirty cards the rescan reads the card table."""
    require("pagemap_scan")
    stats, lost = remark_after_late_stores("pagemap_scan", 2, extent=160 * MiB, step=80011)
    assert not lost, f"{len(lost)} targets on dirty cards were freed"
    assert stats.remark_threads == 1 and stats.remark_dirty_cards < 256


@pytest.fixture(params=["pagemap_scan", "mprotect", "uffd_sync", "software"])
def heap_backend_any(request):
    require(request.param)
    return request.param


def test_a_forked_child_forgets_the_workers_without_hanging():
    script = textwrap.dedent("""
        import os, sys
        from gctrack.collector import Collector
        from gctrack.heap import Heap
        heap = Heap(4 << 20, backend="software")
        collector = Collector(heap, workers=2)
        collector.collect()
        pid = os.fork()
        if pid == 0:
            del collector            # the child has none of the parent's threads to join
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        collector.collect()          # the parent's workers still serve it
        del collector
        heap.close()
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    try:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("dropping a collector in a forked child hung")
    assert result.returncode == 0, result.stderr[-3000:]
