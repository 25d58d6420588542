"""CardTable against a plain numpy reference."""
import subprocess
import sys

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gctrack

BASE = 0x10000


def reference(size, card_size, ranges):
    """Dirty flags per card, computed the slow and obvious way."""
    flags = numpy.zeros(-(-size // card_size), dtype=bool)
    for start, length in ranges:
        if length:
            flags[(start - BASE) // card_size:(start + length - 1 - BASE) // card_size + 1] = True
    return flags


def ranges_of(flags, card_size, size):
    out, card = [], 0
    while card < len(flags):
        if flags[card]:
            first = card
            while card < len(flags) and flags[card]:
                card += 1
            out.append((BASE + first * card_size, min(BASE + card * card_size, BASE + size)))
        else:
            card += 1
    return out


@st.composite
def tables_and_ranges(draw):
    card_size = 1 << draw(st.integers(6, 14))
    size = draw(st.integers(1, 300 * card_size))
    spans = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 40 * card_size)),
                          max_size=12))
    ranges = [(BASE + offset, min(length, size - offset)) for offset, length in spans]
    return size, card_size, ranges


@settings(max_examples=300, deadline=None)
@given(tables_and_ranges())
def test_mark_range_matches_the_reference(case):
    size, card_size, ranges = case
    table = gctrack.CardTable(BASE, size, card_size)
    for start, length in ranges:
        table.mark_range(start, length)
    flags = reference(size, card_size, ranges)
    assert table.num_cards == len(flags)
    assert table.count() == flags.sum()
    numpy.testing.assert_array_equal(table.indices(), numpy.flatnonzero(flags))
    assert [tuple(r) for r in table.ranges().tolist()] == ranges_of(flags, card_size, size)
    for card in numpy.flatnonzero(flags)[:5]:
        assert table.is_dirty(BASE + int(card) * card_size)


@settings(max_examples=100, deadline=None)
@given(tables_and_ranges())
def test_add_regions_equals_mark_range(case):
    size, card_size, ranges = case
    by_range = gctrack.CardTable(BASE, size, card_size)
    for start, length in ranges:
        by_range.mark_range(start, length)
    regions = numpy.array([(s, s + n, 2) for s, n in ranges], dtype=gctrack.REGION_DTYPE)
    for layout in (regions, numpy.array([(s, s + n) for s, n in ranges], dtype=numpy.uint64).reshape(-1, 2),
                   regions.view(numpy.uint64).reshape(-1, 3)):
        table = gctrack.CardTable(BASE, size, card_size)
        table.add_regions(layout)
        assert table == by_range


def test_geometry():
    t = gctrack.CardTable(BASE, 10 * 512 + 1, 512)
    assert (t.base, t.size, t.card_size, t.num_cards) == (BASE, 10 * 512 + 1, 512, 11)
    assert t.words.dtype == numpy.uint64 and t.words.shape == (1,)
    t.mark_range(BASE + 10 * 512, 1)
    assert t.ranges().tolist() == [[BASE + 10 * 512, BASE + 10 * 512 + 1]]   # clipped to size


def test_words_is_a_live_view():
    t = gctrack.CardTable(BASE, 64 * 200, 64)
    t.words[2] = 0b101
    assert t.indices().tolist() == [128, 130]
    t.mark_range(BASE, 1)
    assert t.words[0] == 1


def test_whole_word_fills():
    t = gctrack.CardTable(BASE, 64 * 1000, 64)
    t.mark_range(BASE + 64 * 3, 64 * 500)
    assert t.count() == 500
    assert t.ranges().tolist() == [[BASE + 64 * 3, BASE + 64 * 503]]
    assert t.words[1:7].tolist() == [2**64 - 1] * 6


@pytest.mark.parametrize("card_size", [0, 32, 63, 100, 513, -512])
def test_card_size_must_be_a_power_of_two_of_at_least_64(card_size):
    with pytest.raises(ValueError, match="power of two"):
        gctrack.CardTable(BASE, 4096, card_size)


@pytest.mark.parametrize("args, error", [
    ((BASE, 0), ValueError), ((BASE, -5), ValueError), ((-1, 4096), ValueError),
    ((BASE, 4096.0), TypeError), (("0", 4096), TypeError), ((BASE, 4096, 512.0), TypeError),
])
def test_bad_geometry(args, error):
    with pytest.raises(error):
        gctrack.CardTable(*args)


def test_addresses_outside_the_table_are_value_errors():
    t = gctrack.CardTable(BASE, 4096)
    for bad in (lambda: t.mark_range(BASE - 1, 2), lambda: t.mark_range(BASE + 4095, 2),
                lambda: t.mark_range(BASE + 4096, 1), lambda: t.is_dirty(BASE + 4096),
                lambda: t.is_dirty(BASE - 1), lambda: t.mark_range(-5, 1),
                lambda: t.mark_range(BASE, -1),
                lambda: t.add_regions(numpy.array([[BASE, BASE + 4097]], numpy.uint64)),
                lambda: t.add_regions(numpy.array([[BASE + 8, BASE + 4]], numpy.uint64)),
                lambda: t.add_regions(numpy.array([[-1, 4]], numpy.int64)),
                lambda: t.add_regions(numpy.zeros((2, 4), numpy.uint64))):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(TypeError):
        t.add_regions(numpy.zeros((2, 2), numpy.float64))
    assert t.count() == 0, "a rejected call marks nothing"
    t.mark_range(BASE + 100, 0)
    assert t.count() == 0


def test_set_operations_and_copy():
    a = gctrack.CardTable(BASE, 64 * 128, 64)
    b = gctrack.CardTable(BASE, 64 * 128, 64)
    a.mark_range(BASE, 64)
    b.mark_range(BASE + 64 * 100, 64)
    c = a | b
    assert c.indices().tolist() == [0, 100] and a.indices().tolist() == [0]
    d = a.copy()
    d.mark_range(BASE + 64 * 5, 1)
    assert a.indices().tolist() == [0] and d.indices().tolist() == [0, 5]
    a |= b
    assert a == c and a != d
    a.clear()
    assert a.count() == 0 and c.count() == 2
    with pytest.raises(ValueError, match="geometry"):
        a |= gctrack.CardTable(BASE, 64 * 128, 128)
    with pytest.raises(TypeError):
        a | 3


def test_for_arena(arena):
    t = gctrack.CardTable.for_arena(arena, card_size=1024)
    assert (t.base, t.size, t.card_size) == (arena.address, arena.size, 1024)
    assert "CardTable" in repr(t)
    with pytest.raises(TypeError, match="gctrack.Arena"):
        gctrack.CardTable.for_arena(numpy.zeros(4096, numpy.uint8))


# ---- sizes and addresses at the edges of 64 bits ------------------------------

@pytest.mark.parametrize("card_size", [1 << 31, 1 << 32, 1 << 40, 1 << 63])
def test_huge_cards_make_a_working_table(card_size):
    """Shifts are 64-bit: a card of 2**31 or more still covers the table
    (it was an OverflowError at 2**31, and a table of 0 cards from 2**32 on)."""
    t = gctrack.CardTable(BASE, 16 << 20, card_size)
    assert (t.card_size, t.num_cards, t.words.shape) == (card_size, 1, (1,))
    t.mark_range(BASE + (16 << 20) - 1, 1)
    assert t.is_dirty(BASE) and t.count() == 1
    assert t.ranges().tolist() == [[BASE, BASE + (16 << 20)]]
    assert t.copy() == t and str(card_size) in repr(t)


@pytest.mark.parametrize("card_size", [1 << 64, 1 << 65, (1 << 63) + 64])
def test_cards_beyond_64_bits_are_value_errors(card_size):
    with pytest.raises(ValueError, match="power of two"):
        gctrack.CardTable(BASE, 4096, card_size)


def test_num_cards_is_exact_at_the_top_of_the_address_space():
    t = gctrack.CardTable(0, 2**63 + 1, card_size=2**63)
    assert t.num_cards == 2
    t.mark_range(2**63, 1)
    assert t.indices().tolist() == [1]
    assert t.ranges().tolist() == [[2**63, 2**63 + 1]]
    u = gctrack.CardTable(2**64 - 2 * 4096, 4096 + 1, card_size=4096)
    assert u.num_cards == 2
    u.mark_range(2**64 - 4096, 1)
    assert u.ranges().tolist() == [[2**64 - 4096, 2**64 - 4096 + 1]]


@pytest.mark.parametrize("base, size", [
    (2**64 - 4096, 8192), (0, 2**64), (BASE, 2**64), (2**64, 4096), (2**63, 2**63),
])
def test_tables_beyond_the_address_space_are_value_errors(base, size):
    with pytest.raises(ValueError, match="64-bit address space"):
        gctrack.CardTable(base, size)


WRAPPING_SPANS = [(2**64 - 1, 1), (2**64, 1), (2**70, 1), (BASE, 2**64 - 1),
                  (BASE, 2**64), (BASE + 1, 2**64 - 1), (BASE, 2**70), (BASE + 4096, 2**64 - 4096)]


def test_addresses_that_wrap_are_outside_the_table():
    """The bounds check cannot wrap: is_dirty(2**64 - 1) and mark_range(base, 2**64 - 1)
    wrote or read far outside the table (a segfault), so this runs in a subprocess."""
    code = f"""
import gctrack
t = gctrack.CardTable({BASE}, 4096)
for addr, length in {WRAPPING_SPANS!r}:
    for call in (lambda: t.is_dirty(addr + length - 1), lambda: t.mark_range(addr, length)):
        try:
            call()
        except ValueError as e:
            assert "outside" in str(e), e
        else:
            raise AssertionError(f"{{addr:#x}}+{{length:#x}} was accepted")
assert t.count() == 0
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr[-2000:]


def test_add_regions_that_wrap_are_outside_the_table():
    t = gctrack.CardTable(BASE, 4096)
    with pytest.raises(ValueError, match="outside"):
        t.add_regions(numpy.array([[BASE, 2**64 - 1]], numpy.uint64))
    with pytest.raises(ValueError):
        t.add_regions(numpy.array([(2**64 - 1, 2**64 - 1, 0)], dtype=gctrack.REGION_DTYPE))
    assert t.count() == 0


def test_regions_must_hold_integers_in_every_layout():
    t = gctrack.CardTable(BASE, 4096)
    floats = numpy.array([(BASE + 0.5, BASE + 100.5)], dtype=[("start", "f8"), ("end", "f8")])
    with pytest.raises(TypeError, match="integers"):
        t.add_regions(floats)
    negative = numpy.array([(-1, 4)], dtype=[("start", "i8"), ("end", "i8")])
    with pytest.raises(ValueError, match="non-negative"):
        t.add_regions(negative)


def test_bits_past_the_last_card_never_count():
    """``words`` is writable: stray bits in the last word are not cards, so
    count(), indices() and ranges() agree (indices() returned garbage)."""
    t = gctrack.CardTable(BASE, 64 * 10, 64)
    t.words[0] = 2**64 - 1
    assert t.count() == 10
    assert t.indices().tolist() == list(range(10))
    assert t.ranges().tolist() == [[BASE, BASE + 640]]
    t.words[0] = 1 << 40
    assert t.count() == 0 and t.indices().tolist() == [] and t.ranges().tolist() == []


def test_a_heap_with_huge_cards_frees_nothing_reachable():
    """With 2**32-byte cards the collector's table had 0 cards, so precleaning
    and remark saw no dirty card and reachable objects were freed."""
    from gctrack.collector import Collector
    from gctrack.heap import Heap
    from gctrack.mutator import NativeMutators, populate

    with Heap(16 << 20, backend="software", card_size=1 << 32) as heap:
        populate(heap, 150000, garbage=0.3, seed=5)
        collector = Collector(heap)
        with NativeMutators(heap, threads=2, rate=0, seed=7) as mutators:
            for _ in range(20):
                collector.collect()
            totals = mutators.stats()
    assert totals["stores"] > 1000
    assert totals["violations"] == 0, "a mutator found an object it holds freed"


def test_count_skips_zero_words_at_every_alignment():
    """count() skips zero words four at a time: every run length and offset
    of zero words around a dirty bit must still count exactly."""
    arena = gctrack.Arena(1 << 20)
    try:
        table = gctrack.CardTable.for_arena(arena, 64)          # 16384 cards, 256 words
        words = table.words
        rng = numpy.random.default_rng(11)
        for _ in range(200):
            words[:] = 0
            picks = rng.choice(words.size, size=int(rng.integers(0, 9)), replace=False)
            words[picks] = rng.integers(1, 2**63, size=picks.size, dtype=numpy.uint64)
            expected = int(numpy.unpackbits(words.view(numpy.uint8)).sum())
            assert table.count() == expected
    finally:
        arena.close()
