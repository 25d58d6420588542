"""What BarrierVerifier.check() costs beside a plain Tracker.collect(), on
the same pre-faulted 256 MiB arena with the same pages written.

Run: pytest benchmarks/test_verifier.py --benchmark-columns=median,iqr,rounds
"""
import itertools

import numpy
import pytest

import gctrack
from conftest import CARD_SIZE, MiB, require, written_offsets
from gctrack.testing import store_words

SIZE = 256 * MiB
FRACTIONS = [0.0, 0.01, 0.1]
#: Every store writes a value the arena has never held, across tests.
VALUES = itertools.count(1)


@pytest.fixture(scope="module")
def arena():
    require("pagemap_scan")
    arena = gctrack.Arena(SIZE)
    arena.prefault()
    yield arena
    arena.close()


@pytest.mark.parametrize("impl", ["pagemap_scan", "verifier"])
@pytest.mark.parametrize("fraction", FRACTIONS, ids=lambda f: f"{f:.1%}")
def test_check_against_collect(benchmark, arena, fraction, impl):
    """One new word value in every k-th page, stored with the barrier outside
    the timing; then time one collect() or one check() (which also compares
    each reported page with the snapshot and copies it)."""
    benchmark.group = f"verify 256MiB {fraction:.1%} written"
    offsets = written_offsets(arena, fraction).astype(numpy.uint64) + 8
    cards = gctrack.CardTable.for_arena(arena, CARD_SIZE)
    if impl == "pagemap_scan":
        tool = gctrack.Tracker(arena, backend="pagemap_scan")
        run = lambda: tool.collect(cards)              # noqa: E731
    else:
        tool = gctrack.BarrierVerifier(arena, cards)
        run = tool.check
    with tool:
        def store():
            store_words(arena, offsets, numpy.full(len(offsets), next(VALUES), numpy.uint64),
                        cards)

        result = benchmark.pedantic(run, setup=store, rounds=15, iterations=1, warmup_rounds=1)
    if impl == "verifier":
        assert result and result.pages_written == result.words_changed == len(offsets)
    else:
        assert result.pages == len(offsets)
