"""What the background pass loop costs a mutator: the same stores with no
tracking, and under each backend with start(interval=1 ms) running."""
import time

import numpy
import pytest

import gctrack
from conftest import MiB, require
from gctrack.testing import store_bytes

STORES = 20000


@pytest.mark.parametrize("impl", ["untracked", "pagemap_scan", "mprotect", "uffd_sync", "software"])
def test_mutator_under_the_background_loop(benchmark, impl):
    with gctrack.Arena(64 * MiB) as arena:
        arena.prefault()
        rng = numpy.random.default_rng(1)
        offsets = (rng.integers(0, arena.num_pages, STORES) * arena.page_size).astype(numpy.uint64)
        tracker = None
        if impl != "untracked":
            require(impl)
            tracker = gctrack.Tracker(arena, backend=impl)
            tracker.start(interval=0.001)
            deadline = time.monotonic() + 5
            while tracker.loop_stats.passes == 0 and time.monotonic() < deadline:
                time.sleep(0.001)                  # time the mutator beside a running loop
        benchmark.group = f"mutator under the background loop, {STORES} stores"
        benchmark.extra_info["stores"] = STORES
        try:
            benchmark.pedantic(store_bytes, args=(arena, offsets, tracker), rounds=15,
                               iterations=1, warmup_rounds=1)
        finally:
            if tracker is not None:
                tracker.stop()
                assert tracker.loop_stats.passes > 0
                tracker.close()
