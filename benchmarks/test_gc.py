"""End to end: the remark pause of a concurrent cycle against a stop-the-world
full mark of the same heap, on a 1 GiB heap whose native mutators make about
10^5 reference stores per second, per backend.

Run: pytest benchmarks/test_gc.py --benchmark-columns=median,rounds
"""
import statistics
import time

import pytest

from conftest import MiB, require
from gctrack.collector import Collector
from gctrack.heap import Heap
from gctrack.mutator import NativeMutators, populate

BACKENDS = ["pagemap_scan", "mprotect", "uffd_sync", "software"]
HEAP = 1024 * MiB
THREADS = 2
RATE = 70000      # operations per second per thread; about 70 % of them are stores


@pytest.mark.parametrize("impl", BACKENDS)
def test_concurrent_cycle(benchmark, impl):
    require(impl)
    with Heap(HEAP, backend=impl) as heap:
        populate(heap, int(heap.num_objects * 0.75), garbage=0.2)
        collector = Collector(heap)
        collector.collect(concurrent=False)                       # warm-up, outside timing
        benchmark.group = "gc cycle, 1 GiB heap"
        cycles = []
        with NativeMutators(heap, threads=THREADS, rate=RATE) as mutators:
            started, before = time.monotonic(), mutators.stats()["stores"]

            def cycle():
                cycles.append(collector.collect())

            benchmark.pedantic(cycle, rounds=5, iterations=1, setup=lambda: time.sleep(0.1))
            stores_per_second = (mutators.stats()["stores"] - before) / (time.monotonic() - started)
            full_marks = [collector.collect(concurrent=False).full_mark_seconds for _ in range(3)]
            violations = mutators.stats()["violations"]
        remark = statistics.median(c.remark_pause for c in cycles)
        full = statistics.median(full_marks)
        benchmark.extra_info.update(
            remark_pause_ms=remark * 1e3, full_mark_ms=full * 1e3, remark_over_full_mark=remark / full,
            concurrent_mark_ms=statistics.median(c.concurrent_mark_seconds for c in cycles) * 1e3,
            initial_mark_pause_ms=statistics.median(c.initial_mark_pause for c in cycles) * 1e3,
            mutator_stores_per_second=stores_per_second)
        assert violations == 0
