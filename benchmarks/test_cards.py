"""Regions to card bits: CardTable.add_regions throughput, for dense runs and
scattered pages, across card sizes (the hot loop every pass ends in)."""
import numpy
import pytest

import gctrack
from conftest import MiB

BASE = 1 << 40
SIZE = 256 * MiB
PAGE = 4096


def regions(pattern: str) -> numpy.ndarray:
    if pattern == "dense":          # 1,024 runs of 32 pages
        starts = BASE + numpy.arange(1024, dtype=numpy.uint64) * (64 * PAGE)
        lengths = numpy.full(1024, 32 * PAGE, dtype=numpy.uint64)
    else:                           # 32,768 single pages, every other page
        starts = BASE + numpy.arange(0, SIZE // PAGE, 2, dtype=numpy.uint64) * PAGE
        lengths = numpy.full(len(starts), PAGE, dtype=numpy.uint64)
    return numpy.stack([starts, starts + lengths], axis=1)


@pytest.mark.parametrize("card_size", [64, 512, 4096])
@pytest.mark.parametrize("pattern", ["dense", "scattered"])
def test_regions_to_cards(benchmark, pattern, card_size):
    table = gctrack.CardTable(BASE, SIZE, card_size)
    batch = regions(pattern)
    benchmark.group = f"regions to cards, {pattern}"
    benchmark.extra_info.update(regions=len(batch), bytes=int((batch[:, 1] - batch[:, 0]).sum()))
    benchmark(table.add_regions, batch)
    assert table.count() == int((batch[:, 1] - batch[:, 0]).sum()) // card_size
