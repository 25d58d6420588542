"""Every backend on the same work: the first-write fault a mutator pays, and
what one collect + re-arm pass costs.

Run: pytest benchmarks/test_backends.py --benchmark-columns=median,iqr,rounds
"""
import numpy
import pytest

import gctrack
from conftest import MiB, require, written_offsets
from gctrack.testing import store_bytes

BACKENDS = ["pagemap_scan", "mprotect", "uffd_sync", "soft_dirty", "software"]
FIRST_WRITE_PAGES = 2048


@pytest.mark.parametrize("impl", ["untracked"] + BACKENDS)
def test_first_write(benchmark, impl):
    """One byte into each of 2048 armed, pre-faulted pages; reported per page."""
    with gctrack.Arena(FIRST_WRITE_PAGES * gctrack.features().page_size) as arena:
        arena.prefault()
        tracker = None
        if impl != "untracked":
            require(impl)
            tracker = gctrack.Tracker(arena, backend=impl)
        offsets = numpy.arange(arena.num_pages, dtype=numpy.uint64) * arena.page_size
        benchmark.group = f"first write, {FIRST_WRITE_PAGES} pages"
        benchmark.extra_info["pages"] = FIRST_WRITE_PAGES
        benchmark.pedantic(store_bytes, args=(arena, offsets, tracker),
                           setup=tracker.reset if tracker else None, rounds=20, iterations=1,
                           warmup_rounds=1)
        if tracker is not None:
            assert len(tracker.scan()) == 1 if impl != "software" else True
            tracker.close()


SIZES = {"256MiB": 256 * MiB, "1GiB": 1024 * MiB}
FRACTIONS = [0.001, 0.01, 0.1, 1.0]


@pytest.fixture(scope="module", params=list(SIZES))
def arena(request):
    with gctrack.Arena(SIZES[request.param]) as a:
        a.prefault()
        yield request.param, a


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("fraction", FRACTIONS, ids=lambda f: f"{f:.1%}")
def test_collect_and_rearm(benchmark, arena, fraction, impl):
    """Write every k-th page (outside the timing), then time one collect()."""
    require(impl)
    size_name, arena = arena
    offsets = written_offsets(arena, fraction).astype(numpy.uint64)
    with gctrack.Tracker(arena, backend=impl) as tracker:
        cards = gctrack.CardTable.for_arena(arena, 512)
        benchmark.group = f"collect {size_name} {fraction:.1%} written"
        slow = impl in ("uffd_sync", "mprotect") and fraction == 1.0

        def dirty_the_pages():
            store_bytes(arena, offsets, tracker)
            cards.clear()

        stats = benchmark.pedantic(tracker.collect, args=(cards,), setup=dirty_the_pages,
                                   rounds=5 if slow else 15, iterations=1, warmup_rounds=1)
        assert stats.pages == len(offsets)
