"""BarrierVerifier: the kernel's record of written pages judges a software
write barrier. Real stores from native threads, real PAGEMAP_SCAN; the
expected misses are computed independently from the card geometry."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import numpy
import pytest

import gctrack
from conftest import PAGE_BACKENDS, require
from gctrack.testing import store_words


@pytest.fixture(autouse=True)
def needs_pagemap_scan():
    require("pagemap_scan")


def card_of(cards, address: int) -> int:
    return (address - cards.base) // cards.card_size


def random_stores(rng, words, count):
    """Distinct word indices and new values; about 1 in 10 stores its word's value."""
    index = rng.choice(words.size, count, replace=False)
    old = words[index].copy()
    new = rng.integers(1, 2**64 - 1, count, dtype=numpy.uint64)
    same = rng.random(count) < 0.1
    new[same] = old[same]
    return index, old, new


@pytest.mark.parametrize("card_size", [64, 512, 4096])
def test_missed_is_exactly_the_skipped_barriers_on_unmarked_cards(card_size, page_size):
    """Random rounds: stores with the barrier, a random subset without. A skip
    is a miss unless its word kept its value or another store (this round,
    or an earlier one under clear=False) marked its card."""
    rng = numpy.random.default_rng(card_size)
    with gctrack.Arena(64 * page_size) as arena:
        words = arena.view(numpy.uint64)
        words[:] = rng.integers(0, 2**64 - 1, words.size, dtype=numpy.uint64)
        cards = gctrack.CardTable.for_arena(arena, card_size)
        marked: set[int] = set()
        with gctrack.BarrierVerifier(arena, cards) as verifier:
            for _ in range(40):
                index, old, new = random_stores(rng, words, int(rng.integers(1, 400)))
                skip = rng.random(index.size) < rng.choice([0.02, 0.3, 0.9])
                offsets = index.astype(numpy.uint64) * 8
                store_words(arena, offsets[~skip], new[~skip], cards,
                            threads=int(rng.integers(1, 4)))
                store_words(arena, offsets[skip], new[skip])
                addresses = arena.address + offsets
                marked |= {card_of(cards, int(a)) for a in addresses[~skip]}
                changed = new != old
                expected = sorted((int(a), int(o), int(n))
                                  for a, o, n in zip(addresses[skip & changed], old[skip & changed],
                                                     new[skip & changed])
                                  if card_of(cards, int(a)) not in marked)
                clear = bool(rng.random() < 0.7)
                report = verifier.check(clear=clear)
                assert report.missed.tolist() == expected
                assert report.missed_count == len(expected)
                assert bool(report) is (not expected)
                assert report.words_changed == int(changed.sum())
                assert report.pages_written == len({int(o) // page_size for o in offsets})
                if clear:
                    marked.clear()
                assert set(cards.indices().tolist()) == marked


def test_same_value_stores_are_not_changes(arena):
    words = arena.view(numpy.uint64)
    words[::7] = numpy.arange(words[::7].size, dtype=numpy.uint64) * 3 + 1
    cards = gctrack.CardTable.for_arena(arena, 64)
    with gctrack.BarrierVerifier(arena, cards) as verifier:
        offsets = numpy.arange(0, arena.size, 7 * 8 * 13, dtype=numpy.uint64)
        store_words(arena, offsets, words[offsets // 8].copy())         # no barrier, same value
        report = verifier.check()
        assert report and report.words_changed == 0 and report.missed.size == 0
        assert report.pages_written == len(set((offsets // arena.page_size).tolist())) > 1
        # changed and changed back within one interval: no change either
        original = words[offsets // 8].copy()
        store_words(arena, offsets, original + 5)
        store_words(arena, offsets, original)
        assert verifier.check().words_changed == 0


@pytest.mark.parametrize("card_size", [64, 4096])
def test_no_false_alarms_while_threads_store_with_barriers(card_size, page_size):
    """Four native threads share cards (and card words) and mark them
    atomically; one store per round skips the barrier on a page of its own,
    so a check that found nothing at all could not pass."""
    rng = numpy.random.default_rng(7)
    with gctrack.Arena(256 * page_size) as arena:
        cards = gctrack.CardTable.for_arena(arena, card_size)
        words = arena.view(numpy.uint64)
        shared = words[: words.size - page_size // 8]             # the last page is the plant's
        with gctrack.BarrierVerifier(arena, cards) as verifier:
            for round_number in range(15):
                index, old, new = random_stores(rng, shared, 20000)
                store_words(arena, index.astype(numpy.uint64) * 8, new, cards, threads=4)
                plant = arena.size - page_size + 8 * int(rng.integers(0, page_size // 8))
                before = int(words[plant // 8])
                store_words(arena, [plant], [before + 1 + round_number])
                report = verifier.check()
                assert report.missed.tolist() == [(arena.address + plant, before,
                                                   before + 1 + round_number)]
                assert report.words_changed == int((new != old).sum()) + 1


def test_each_interval_is_judged_on_its_own(arena):
    cards = gctrack.CardTable.for_arena(arena, 512)
    word = arena.address + 3 * arena.page_size + 40
    with gctrack.BarrierVerifier(arena, cards) as verifier:
        store_words(arena, [word - arena.address], [11])
        assert verifier.check().missed.tolist() == [(word, 0, 11)]
        assert verifier.check().missed.size == 0, "a miss is reported once"
        store_words(arena, [word - arena.address], [12])
        assert verifier.check().missed.tolist() == [(word, 11, 12)], "old is the last check's"
        store_words(arena, [word - arena.address], [13], cards)
        assert verifier.check(clear=False)
        assert cards.is_dirty(word), "clear=False keeps the cards"
        store_words(arena, [word - arena.address], [14])
        assert verifier.check(), "a card still marked covers the next interval"
        assert cards.count() == 0


def test_clear_clears_only_the_arenas_cards(arena):
    """A card table larger than the arena: cards past it are not the verifier's."""
    cards = gctrack.CardTable(arena.address, 2 * arena.size, 512)
    with gctrack.BarrierVerifier(arena, cards) as verifier:
        cards.mark_range(arena.address, 8)
        cards.mark_range(arena.address + arena.size + 512, 8)
        verifier.check()
        assert cards.indices().tolist() == [(arena.size + 512) // 512]


def test_max_missed_keeps_the_first_records_and_counts_them_all(arena):
    cards = gctrack.CardTable.for_arena(arena, 64)
    offsets = numpy.arange(100, dtype=numpy.uint64) * 128
    with gctrack.BarrierVerifier(arena, cards) as verifier:
        store_words(arena, offsets, offsets + 1)
        report = verifier.check(max_missed=10)
        assert report.missed["address"].tolist() == (arena.address + offsets[:10]).tolist()
        assert (report.missed_count, report.words_changed, bool(report)) == (100, 100, False)
        store_words(arena, offsets, offsets + 2)
        none_kept = verifier.check(max_missed=0)
        assert none_kept.missed.size == 0 and none_kept.missed_count == 100
        assert none_kept.missed.dtype == gctrack.MISSED_DTYPE


def test_a_table_that_does_not_cover_the_arena_is_a_value_error(arena):
    for table in (gctrack.CardTable(arena.address, arena.size // 2, 512),
                  gctrack.CardTable(arena.address + 4096, arena.size, 512),
                  gctrack.CardTable(arena.address - 4096, arena.size, 512)):
        with pytest.raises(ValueError, match="outside the card table"):
            gctrack.BarrierVerifier(arena, table)
    assert arena.verified_by is None, "a refused verifier arms nothing"


def test_wrong_types_and_bad_arguments_are_typed_errors(arena):
    cards = gctrack.CardTable.for_arena(arena)
    for args in (("arena", cards), (arena, "cards"), (arena, None), (None, cards),
                 (arena, numpy.zeros(8, numpy.uint64))):
        with pytest.raises(TypeError):
            gctrack.BarrierVerifier(*args)
    with gctrack.BarrierVerifier(arena, cards) as verifier:
        with pytest.raises(ValueError, match="max_missed"):
            verifier.check(max_missed=-1)
        with pytest.raises(TypeError):
            verifier.check(max_missed=1.5)
        with pytest.raises(TypeError):
            verifier.check(True, 5)
    closed = gctrack.Arena(arena.page_size)
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        gctrack.BarrierVerifier(closed, cards)


def test_close_and_use_after_close_behave_as_for_tracker(arena):
    cards = gctrack.CardTable.for_arena(arena)
    verifier = gctrack.BarrierVerifier(arena, cards)
    assert arena.verified_by == "pagemap_scan"
    verifier.close()
    verifier.close()                                       # idempotent
    assert verifier.closed and arena.verified_by is None
    with pytest.raises(ValueError, match="verifier is closed"):
        verifier.check()
    with pytest.raises(ValueError, match="verifier is closed"):
        with verifier:
            pass
    with gctrack.Tracker(arena, backend="pagemap_scan"):   # the arena is free again
        pass
    assert "closed" in repr(verifier)


def test_the_verifier_shares_an_arena_with_a_software_tracker_only(arena):
    cards = gctrack.CardTable.for_arena(arena)
    with gctrack.Tracker(arena, backend="software"):
        with gctrack.BarrierVerifier(arena, cards):
            with pytest.raises(gctrack.TrackerError) as second:
                gctrack.BarrierVerifier(arena, cards)
            assert second.value.errno == errno.EBUSY
    with gctrack.BarrierVerifier(arena, cards):
        with gctrack.Tracker(arena, backend="software"):
            pass
        for backend in PAGE_BACKENDS:
            if gctrack.features().backends[backend]:
                with pytest.raises(gctrack.TrackerError, match="BarrierVerifier") as refused:
                    gctrack.Tracker(arena, backend=backend)
                assert refused.value.errno == errno.EBUSY


@pytest.mark.parametrize("backend", PAGE_BACKENDS)
def test_no_verifier_beside_a_kernel_backend(arena, backend):
    require(backend)
    with gctrack.Tracker(arena, backend=backend):
        with pytest.raises(gctrack.TrackerError) as refused:
            gctrack.BarrierVerifier(arena, gctrack.CardTable.for_arena(arena))
        assert refused.value.errno == errno.EBUSY
        assert arena.verified_by is None


def run_script(source: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(source)], capture_output=True,
                          text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_forked_child_and_closed_arena_crash_nothing():
    """In a subprocess: a check in a forked child is refused; a verifier whose
    arena was closed still checks (the memory stays mapped until it closes)."""
    done = run_script("""
        import os, numpy, gctrack
        from gctrack.testing import store_words
        arena = gctrack.Arena(1 << 20)
        cards = gctrack.CardTable.for_arena(arena)
        v = gctrack.BarrierVerifier(arena, cards)
        pid = os.fork()
        if pid == 0:
            try:
                v.check()
                os._exit(3)
            except RuntimeError:
                v.close()
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        store_words(arena, [64], [9])
        arena.close()
        r = v.check()
        assert r.missed_count == 1 and r.missed["new"].tolist() == [9], r
        v.close()
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


# ---- the collector's verify_barriers ------------------------------------------------

def test_a_heap_under_native_mutators_has_no_false_alarms():
    with gctrack.Heap(8 << 20, backend="software", verify_barriers=True) as heap:
        collector = gctrack.Collector(heap)
        with gctrack.NativeMutators(heap, threads=2, rate=20000) as mutators:
            cycles = 0
            while cycles < 6 or (mutators.stats()["stores"] <= 100 and cycles < 2000):
                collector.collect()                 # raises MissedBarrierError on a false alarm
                cycles += 1
            stats = mutators.stats()
        assert stats["stores"] > 100 and stats["violations"] == 0
        assert heap.missed_barriers.size == 0


def allocated(heap, obj) -> bool:
    """Whether obj is allocated (the sweep frees in a side bitmap, not in the header)."""
    return (obj - heap.base) // heap.object_size in set(heap.allocated().tolist())


def lost_object_scenario(verify_barriers):
    """x is rooted and y is garbage to the collector, but the program still
    holds y's address (in a register, say). Once marking has finished, it
    stores y into x's slot 1 without the barrier: nothing makes the
    collector rescan x, and the sweep frees y, now reachable from x."""
    heap = gctrack.Heap(1 << 20, backend="software", verify_barriers=verify_barriers)
    x = heap.alloc(root=True)
    y = heap.alloc()

    def mutate(phase):
        if phase == "concurrent_mark":
            heap.view()[(x - heap.base) // heap.object_size, 2] = y      # slot 1, no barrier

    return heap, x, y, mutate


def test_a_missed_barrier_that_would_free_a_live_object_is_caught_before_the_sweep():
    heap, x, y, mutate = lost_object_scenario(False)
    with heap:
        gctrack.Collector(heap).collect(after_phase=mutate)
        assert not allocated(heap, y), "the scenario frees a live object"
    heap, x, y, mutate = lost_object_scenario(True)
    with heap:
        collector = gctrack.Collector(heap)
        with pytest.raises(gctrack.MissedBarrierError) as found:
            collector.collect(after_phase=mutate)
        missed = found.value.missed
        assert missed[["object", "slot", "old", "new"]].tolist() == [
            ((x - heap.base) // 64, 1, 0, y)]
        assert missed["address"].tolist() == [x + 16]
        assert allocated(heap, y), "the cycle stopped before the sweep"
        collector.collect()                         # the next cycle sees y through x
        assert allocated(heap, y)


def test_record_mode_accumulates_misses_across_cycles():
    with gctrack.Heap(1 << 20, backend="software", verify_barriers="record") as heap:
        collector = gctrack.Collector(heap)
        a = heap.alloc(root=True)
        for _ in range(16):
            heap.alloc(root=True)                   # b lands two 512-byte cards further
        b = heap.alloc(root=True)
        ia, ib = (a - heap.base) // 64, (b - heap.base) // 64
        assert heap.verify_barriers == "record"
        heap.view()[ia, 1] = b                      # slot 0 of a, no barrier: missed
        heap.set_ref(b, 2, a)                       # with the barrier: not a miss
        collector.collect()
        heap.view()[ib, 7] = a                      # slot 6 of b: missed
        heap.view()[ib, 3] = 0                      # slot 2 of b cleared: 0 hides nothing
        collector.collect()
        assert heap.missed_barriers[["object", "slot", "old", "new"]].tolist() == [
            (ia, 0, 0, b), (ib, 6, 0, a)]
    assert heap.verifier.closed, "closing the heap closes its verifier"


def test_verify_barriers_needs_the_software_backend_and_a_known_mode():
    with pytest.raises(ValueError, match="software"):
        gctrack.Heap(1 << 20, backend="pagemap_scan", verify_barriers=True)
    with pytest.raises(ValueError, match="verify_barriers"):
        gctrack.Heap(1 << 20, backend="software", verify_barriers="yes")
    with gctrack.Heap(1 << 20, backend="software") as heap:
        assert heap.verifier is None and heap.verify_barriers is False
