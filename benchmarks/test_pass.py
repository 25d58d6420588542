"""collect() against the raw C pass: PAGEMAP_SCAN with WP, regions to card bits.

Both arm their own pre-faulted arena of the same size; each round writes one
byte into every k-th page (outside the timing), then times one pass.
Run: pytest benchmarks/test_pass.py --benchmark-columns=median,iqr,rounds
"""
import ctypes

import numpy
import pytest

import gctrack
from conftest import CARD_SIZE, VECTOR_LEN, MiB, RawArena, require, written_offsets
from gctrack.testing import SplitReporter

SIZES = {"256MiB": 256 * MiB, "1GiB": 1024 * MiB}
FRACTIONS = [0.001, 0.01, 0.1, 1.0]


class LibraryArena:
    """The same, through gctrack.Tracker.collect()."""

    def __init__(self, size):
        self.arena = gctrack.Arena(size)
        self.arena.prefault()
        self.tracker = gctrack.Tracker(self.arena, backend="pagemap_scan", vector_len=VECTOR_LEN)
        self.card_table = gctrack.CardTable.for_arena(self.arena, CARD_SIZE)
        self.cards = self.card_table.words

    def run_pass(self):
        return self.tracker.collect(self.card_table).pages

    def close(self):
        self.tracker.close()
        self.arena.close()


@pytest.fixture(scope="module", params=list(SIZES))
def arenas(request, raw_c):
    require("pagemap_scan")
    size = SIZES[request.param]
    pair = {"gctrack": LibraryArena(size), "raw_c": RawArena(raw_c, size)}
    for side in pair.values():
        side.run_pass()                        # start clean
    yield request.param, pair
    for side in pair.values():
        side.close()


@pytest.mark.parametrize("impl", ["gctrack", "raw_c"])
@pytest.mark.parametrize("fraction", FRACTIONS, ids=lambda f: f"{f:.1%}")
def test_collect_pass(benchmark, arenas, fraction, impl):
    size_name, pair = arenas
    side = pair[impl]
    offsets = written_offsets(side.arena, fraction)
    view = numpy.asarray(side.arena)
    benchmark.group = f"pass {size_name} {fraction:.1%} written"

    def dirty_the_pages():
        view[offsets] += 1
        side.cards[:] = 0

    pages = benchmark.pedantic(side.run_pass, setup=dirty_the_pages, rounds=15, iterations=1,
                               warmup_rounds=1)
    assert pages == len(offsets)


@pytest.fixture(scope="module")
def populated_gib(raw_c):
    """A pre-faulted 1 GiB arena, armed, one page in 97 written: a remark's
    report-only walk over it, split or not, against raw_walk() of raw_pass.c."""
    require("pagemap_scan")
    arena = gctrack.Arena(1024 * MiB)
    arena.prefault()
    tracker = gctrack.Tracker(arena, backend="pagemap_scan", vector_len=VECTOR_LEN)
    cards = gctrack.CardTable.for_arena(arena, CARD_SIZE)
    tracker.collect(cards)
    numpy.asarray(arena)[::97 * arena.page_size] = 1
    yield arena, tracker, cards
    tracker.close()
    arena.close()


@pytest.mark.parametrize("impl", ["split_1", "split_2", "split_default", "raw_c"])
def test_report_only_walk(benchmark, populated_gib, raw_c, impl):
    """Report-only passes leave the pages dirty, so every round walks the same."""
    arena, tracker, cards = populated_gib
    benchmark.group = "report-only walk, 1 GiB, 1 page in 97 written"
    expected = -(-arena.num_pages // 97)
    if impl == "raw_c":
        pagemap = open("/proc/self/pagemap", "rb", buffering=0)
        vec = numpy.zeros(VECTOR_LEN * 3, dtype=numpy.uint64)
        pages = benchmark.pedantic(
            raw_c.raw_walk, args=(pagemap.fileno(), arena.address, arena.address + arena.size,
                                  vec.ctypes.data, VECTOR_LEN), rounds=25, iterations=1, warmup_rounds=2)
        pagemap.close()
    else:
        workers = None if impl == "split_default" else int(impl.rsplit("_", 1)[1])
        with SplitReporter(tracker, workers=workers) as reporter:
            pages = benchmark.pedantic(lambda: reporter.report(cards)[2], rounds=25, iterations=1,
                                       warmup_rounds=2)
    assert pages == expected
