"""A minimal Cython embedder: objects in a gctrack arena, stores and a
tracking pass without the GIL, then the dirty cards read at C level."""
from libc.stdint cimport uint64_t, uintptr_t

from gctrack.backend cimport PassCounts
from gctrack.cards cimport CardTable, cards_next_dirty
from gctrack.software cimport SoftwareCore, software_core_of, software_write_barrier
from gctrack.tracker cimport Tracker, tracker_pass_into

import gctrack

OBJECT_SIZE = 64          # one object per card


def run(backend="auto", size_t objects=20000, size_t stride=97):
    """Store into every stride-th object; return (written, dirty) object numbers."""
    arena = gctrack.Arena(objects * OBJECT_SIZE)
    cdef Tracker tracker = gctrack.Tracker(arena, backend=backend)
    cdef CardTable cards = gctrack.CardTable.for_arena(arena, card_size=OBJECT_SIZE)
    cdef uint64_t *heap = <uint64_t *><uintptr_t>arena.address
    cdef SoftwareCore *barrier = software_core_of(tracker.core.backend)
    cdef PassCounts counts
    cdef size_t i = 0, card
    cdef int rc
    with nogil:
        while i < objects:                              # the mutator
            heap[i * 8] = i + 1
            if barrier != NULL:                         # only software needs a barrier
                software_write_barrier(barrier, <uintptr_t>&heap[i * 8])
            i += stride
        rc = tracker_pass_into(&tracker.core, &cards.bits, True, 0, &counts)
    if rc:
        raise OSError(-rc, "tracking pass")
    dirty = []
    card = cards_next_dirty(&cards.bits, 0)
    while card < cards.bits.num_cards:
        dirty.append(card)
        card = cards_next_dirty(&cards.bits, card + 1)
    tracker.close()
    return list(range(0, objects, stride)), dirty


def main(backend="auto"):
    written, dirty = run(backend)
    missing = set(written) - set(dirty)
    print(f"cython embedder, {backend}: {len(written)} objects written, "
          f"{len(dirty)} cards dirty, {len(missing)} missing")
    return 1 if missing else 0
