"""The remark against the kernel's limit, and the pause goal under load.

1 GiB heaps, 75 % populated, two native mutators. Per backend, the median
remark of concurrent cycles at 7*10^4 operations/s per thread, split across
the default number of GC workers (and, for pagemap_scan, on one thread too);
for pagemap_scan, beside it, a single-thread report-only PAGEMAP_SCAN walk of
the same arena in raw C, timed in the same run with the mutators parked (the
floor a one-thread final pass stands on). Then pagemap_scan with unthrottled
mutators and the default pause goal, cycle after cycle.

Run: pytest benchmarks/test_remark.py --benchmark-columns=median,rounds -s
Each test prints its figures; extra_info holds them in --benchmark-json.
"""
import statistics
import time

import numpy
import pytest

from conftest import MiB, VECTOR_LEN, require
from gctrack.collector import Collector
from gctrack.heap import Heap
from gctrack.mutator import NativeMutators, populate

HEAP = 1024 * MiB
CYCLES = 9


def percentile(values, q):
    return float(numpy.percentile(numpy.asarray(values), q))


class RawWalk:
    """raw_walk() of raw_pass.c over a heap's arena: report-only, one thread."""

    def __init__(self, raw_c, heap):
        self.raw_c, self.heap = raw_c, heap
        self.pagemap = open("/proc/self/pagemap", "rb", buffering=0)
        self.vec = numpy.zeros(VECTOR_LEN * 3, dtype=numpy.uint64)

    def seconds(self):
        started = time.perf_counter()
        pages = self.raw_c.raw_walk(self.pagemap.fileno(), self.heap.base,
                                    self.heap.base + self.heap.arena.size,
                                    self.vec.ctypes.data, VECTOR_LEN)
        elapsed = time.perf_counter() - started
        assert pages >= 0
        return elapsed

    def close(self):
        self.pagemap.close()


def cycle_figures(cycles):
    remarks = [c.remark_pause for c in cycles]
    return dict(
        remark_median_us=statistics.median(remarks) * 1e6,
        remark_p90_us=percentile(remarks, 90) * 1e6, remark_max_us=max(remarks) * 1e6,
        remark_pass_median_us=statistics.median(c.remark_pass_seconds for c in cycles) * 1e6,
        remark_threads=[c.remark_threads for c in cycles],
        remark_ttsp_median_us=statistics.median(c.remark_time_to_safepoint for c in cycles) * 1e6,
        remark_ttsp_p90_us=percentile([c.remark_time_to_safepoint for c in cycles], 90) * 1e6,
        initial_ttsp_median_us=statistics.median(
            c.initial_mark_time_to_safepoint for c in cycles) * 1e6,
        predicted_median_us=statistics.median(c.predicted_remark for c in cycles) * 1e6,
        outran=sum(c.outran_precleaning for c in cycles),
        preclean_rounds=[len(c.preclean) for c in cycles],
        remark_dirty_cards_median=statistics.median(c.remark_dirty_cards for c in cycles),
        sweep_median_ms=statistics.median(c.sweep_seconds for c in cycles) * 1e3,
        freed_min=min(c.freed for c in cycles))


@pytest.mark.parametrize("impl, workers", [("pagemap_scan", 1), ("pagemap_scan", None),
                                           ("mprotect", None), ("uffd_sync", None),
                                           ("software", None)],
                         ids=["pagemap_scan-1thread", "pagemap_scan", "mprotect", "uffd_sync",
                              "software"])
def test_remark_at_7e4_ops(benchmark, raw_c, impl, workers):
    """workers=None: the default, a remark split across the CPUs."""
    require(impl)
    with Heap(HEAP, backend=impl) as heap:
        populate(heap, int(heap.num_objects * 0.75), garbage=0.2)
        collector = Collector(heap, workers=workers)
        collector.collect(concurrent=False)
        walk = RawWalk(raw_c, heap) if impl == "pagemap_scan" else None
        cycles, walks = [], []
        benchmark.group = "remark, 1 GiB heap, 2 x 7e4 ops/s"
        with NativeMutators(heap, threads=2, rate=70000) as mutators:

            def cycle():
                cycles.append(collector.collect())
                if walk is not None:           # the floor, mutators parked as at remark
                    mutators.pause()
                    walks.append(min(walk.seconds() for _ in range(3)))
                    mutators.resume()

            benchmark.pedantic(cycle, rounds=CYCLES, iterations=1, setup=lambda: time.sleep(0.1))
            violations = mutators.stats()["violations"]
        if walk is not None:
            walk.close()
        figures = cycle_figures(cycles)
        if walks:
            figures["raw_walk_median_us"] = statistics.median(walks) * 1e6
            figures["remark_over_raw_walk"] = (figures["remark_median_us"]
                                               / figures["raw_walk_median_us"])
        figures["workers"] = collector.workers
        benchmark.extra_info.update(figures)
        print(f"\n{impl}, {collector.workers} workers: {figures}")
        assert violations == 0


def test_remark_with_unthrottled_mutators(benchmark):
    require("pagemap_scan")
    with Heap(HEAP, backend="pagemap_scan") as heap:
        populate(heap, int(heap.num_objects * 0.75), garbage=0.2)
        collector = Collector(heap)
        collector.collect(concurrent=False)
        cycles, free_before = [], []
        benchmark.group = "remark, 1 GiB heap, unthrottled mutators"
        with NativeMutators(heap, threads=2, rate=0) as mutators:

            def cycle():
                free_before.append(heap.free_count)
                cycles.append(collector.collect())

            benchmark.pedantic(cycle, rounds=CYCLES, iterations=1, setup=lambda: time.sleep(0.1))
            violations = mutators.stats()["violations"]
        figures = cycle_figures(cycles)
        figures["free_before_min"] = min(free_before)   # > 0: the heap never ran out
        figures["pause_goal_us"] = collector.pause_goal * 1e6
        benchmark.extra_info.update(figures)
        print(f"\nunthrottled: {figures}")
        assert violations == 0
