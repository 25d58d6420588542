"""Every backend on the same work: the first-write fault a mutator pays, and
what one collect + re-arm pass costs.

Run: pytest benchmarks/test_backends.py --benchmark-columns=median,iqr,rounds
"""
import numpy
import pytest

import gctrack
from conftest import CARD_SIZE, MiB, RawArena, require, smoke_run, written_offsets
from gctrack.bench import SLOW_SETUP_PAGES, skip_reason
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


SIZES = {"64MiB": 64 * MiB, "256MiB": 256 * MiB, "1GiB": 1024 * MiB, "4GiB": 4096 * MiB}
FRACTIONS = [0.0, 0.001, 0.01, 0.1, 1.0]


@pytest.fixture(scope="module", params=list(SIZES))
def arenas(request, raw_c):
    """A pre-faulted arena for the backends, and one armed by the raw C reference."""
    if smoke_run(request.config) and SIZES[request.param] > 256 * MiB:
        pytest.skip("smoke run: arenas over 256 MiB only when timing")
    require("pagemap_scan")          # the raw C reference uses the same kernel mechanism
    arena = gctrack.Arena(SIZES[request.param])
    arena.prefault()
    raw = RawArena(raw_c, SIZES[request.param])
    yield request.param, arena, raw
    raw.close()
    arena.close()


@pytest.mark.parametrize("impl", ["raw_c"] + BACKENDS)
@pytest.mark.parametrize("fraction", FRACTIONS, ids=lambda f: f"{f:.1%}")
def test_collect_and_rearm(benchmark, arenas, fraction, impl):
    """Write every k-th page (outside the timing), then time one collect()."""
    size_name, arena, raw = arenas
    benchmark.group = f"collect {size_name} {fraction:.1%} written"
    if impl == "raw_c":
        offsets = written_offsets(raw.arena, fraction)
        view = numpy.asarray(raw.arena)

        def dirty_raw():
            view[offsets] += 1
            raw.cards[:] = 0

        pages = benchmark.pedantic(raw.run_pass, setup=dirty_raw, rounds=15, iterations=1,
                                   warmup_rounds=1)
        assert pages == len(offsets)
        return
    require(impl)
    offsets = written_offsets(arena, fraction).astype(numpy.uint64)
    reason = skip_reason(impl, len(offsets), scattered=fraction < 1)
    if reason:
        pytest.skip(reason)
    with gctrack.Tracker(arena, backend=impl) as tracker:
        cards = gctrack.CardTable.for_arena(arena, CARD_SIZE)

        def dirty_the_pages():
            store_bytes(arena, offsets, tracker)
            cards.clear()

        slow = impl in SLOW_SETUP_PAGES and len(offsets) > 10000   # fewer rounds
        stats = benchmark.pedantic(tracker.collect, args=(cards,), setup=dirty_the_pages,
                                   rounds=5 if slow else 15, iterations=1, warmup_rounds=1)
        assert stats.pages == len(offsets)
