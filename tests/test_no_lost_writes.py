"""No lost writes: native writer threads race tracking passes.

Modelled on the kernel selftest's transact_test. In every round each page
is written exactly once, by one of several native (no-GIL) writer threads,
while the main thread runs passes. After the writers finish, one last pass
runs. The union of what the round's passes reported must contain every page
written: a write that lands while a pass runs is either reported by that
pass or left dirty for a later one. The false-positive rate is printed.
"""
import time

import numpy
import pytest

import gctrack
from conftest import RACE_RESULTS, RACING_BACKENDS, require
from gctrack.testing import NativeWriters

THREADS = 3


def round_offsets(rng, arena, pages_per_round, dense):
    """Each page written once this round, split among THREADS writers."""
    if dense:   # each writer sweeps its own contiguous stretch
        start = int(rng.integers(0, arena.num_pages - pages_per_round + 1))
        pages = numpy.arange(start, start + pages_per_round)
        shares = numpy.array_split(pages, THREADS)
    else:       # random pages, interleaved between writers
        pages = rng.choice(arena.num_pages, pages_per_round, replace=False)
        shares = [pages[k::THREADS] for k in range(THREADS)]
    inside = [rng.integers(0, arena.page_size, len(s)) for s in shares]
    return pages, [s * arena.page_size + o for s, o in zip(shares, inside)]


def race_round(tracker, arena, offsets, pause, drain):
    """Run passes until the writers are done, then a last one; returns (cards, passes)."""
    cards = gctrack.CardTable.for_arena(arena, card_size=arena.page_size)
    passes = 0
    writers = NativeWriters(arena, offsets, spin=200).start()
    while not writers.finished():
        (tracker.drain if drain else tracker.collect)(cards)
        passes += 1
        if pause:
            time.sleep(pause)
    writers.join()
    (tracker.drain if drain else tracker.collect)(cards)
    return cards, passes + 1


def check_no_lost_writes(tracker, arena, rounds, pages_per_round, dense, pause, drain=False):
    rng = numpy.random.default_rng(abs(hash((rounds, pages_per_round, dense, pause, drain))) % 2**32)
    total_passes = total_writes = false_positives = 0
    for _ in range(rounds):
        written, offsets = round_offsets(rng, arena, pages_per_round, dense)
        cards, passes = race_round(tracker, arena, offsets, pause, drain)
        reported = set(cards.indices().tolist())
        lost = set(written.tolist()) - reported
        assert not lost, f"{len(lost)} written pages never reported, e.g. {sorted(lost)[:5]}"
        false_positives += len(reported) - len(written)
        total_passes += passes
        total_writes += len(written)
    RACE_RESULTS.append((tracker.backend, total_writes, total_passes, false_positives))
    return total_passes, total_writes


@pytest.fixture(params=RACING_BACKENDS)
def racing_backend(request):
    require(request.param)
    return request.param


@pytest.fixture
def race_arena():
    with gctrack.Arena(8192 * gctrack.features().page_size) as a:
        a.prefault()
        yield a


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_back_to_back_passes_lose_no_write(race_arena, racing_backend, dense):
    with gctrack.Tracker(race_arena, backend=racing_backend) as t:
        passes, writes = check_no_lost_writes(t, race_arena, rounds=10, pages_per_round=6000,
                                              dense=dense, pause=0)
    assert writes == 60000 and passes >= 500


def test_passes_with_pauses_and_a_small_vector_lose_no_write(race_arena, racing_backend):
    """Pauses let the dirty set outgrow a 64-region PAGEMAP_SCAN vector between passes."""
    with gctrack.Tracker(race_arena, backend=racing_backend, vector_len=64) as t:
        passes, writes = check_no_lost_writes(t, race_arena, rounds=4, pages_per_round=8000,
                                              dense=False, pause=0.002)
    assert writes == 32000


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_background_loop_and_drain_lose_no_write(race_arena, racing_backend, dense):
    with gctrack.Tracker(race_arena, backend=racing_backend, vector_len=256) as t:
        t.start(interval=0.0002)
        check_no_lost_writes(t, race_arena, rounds=6, pages_per_round=6000,
                             dense=dense, pause=0.001, drain=True)
        t.stop()
        assert t.loop_stats.passes > 0


@pytest.mark.soak
@pytest.mark.parametrize("vector_len", [1, 64, 4096])
def test_soak(race_arena, racing_backend, vector_len):
    with gctrack.Tracker(race_arena, backend=racing_backend, vector_len=vector_len) as t:
        for dense in (False, True):
            check_no_lost_writes(t, race_arena, rounds=100, pages_per_round=8000,
                                 dense=dense, pause=0)
        t.start(interval=0.0001)
        check_no_lost_writes(t, race_arena, rounds=100, pages_per_round=8000,
                             dense=False, pause=0.0005, drain=True)
        t.stop()
