# cython: language_level=3
"""The C API capsule ("gctrack._C_API"); the table is described in gctrack/gctrack.h."""
from cpython.object cimport PyObject
from cpython.pycapsule cimport PyCapsule_New
from libc.errno cimport EINVAL
from libc.stdint cimport uintptr_t

from gctrack.arena cimport Arena
from gctrack.backend cimport PassCounts
from gctrack.cards cimport (CardBits, CardTable, cards_clear, cards_mark_range,
                            cards_next_clean, cards_next_dirty)
from gctrack.software cimport Barrier, SoftwareCore, software_core_of
from gctrack.tracker cimport (Tracker, TrackerCore, tracker_begin_external, tracker_drain,
                              tracker_end_external, tracker_pass_into, tracker_record)
from gctrack.verifier cimport (BarrierVerifier, MissedBuffer, MissedStore, VerifierCore,
                               VerifyCounts, verifier_check)


cdef extern from "gctrack/gctrack.h":
    ctypedef struct gct_tracker:
        pass
    ctypedef struct gct_verifier:
        pass
    ctypedef struct gct_capi:
        unsigned version
        size_t size
        gct_tracker *(*tracker_handle)(PyObject *) except NULL
        CardBits *(*cards_handle)(PyObject *) except NULL
        void *(*arena_memory)(PyObject *, size_t *) except NULL
        int (*collect)(gct_tracker *, CardBits *, int, PassCounts *) noexcept nogil
        int (*drain)(gct_tracker *, CardBits *, PassCounts *) noexcept nogil
        int (*record)(gct_tracker *, uintptr_t, uintptr_t) noexcept nogil
        size_t (*next_dirty_card)(const CardBits *, size_t) noexcept nogil
        size_t (*next_clean_card)(const CardBits *, size_t) noexcept nogil
        void (*mark_range)(CardBits *, uintptr_t, uintptr_t) noexcept nogil
        void (*clear_cards)(CardBits *) noexcept nogil
        int (*begin_external_write)(gct_tracker *, uintptr_t, uintptr_t) noexcept nogil
        int (*end_external_write)(gct_tracker *, uintptr_t, uintptr_t) noexcept nogil
        const Barrier *(*barrier_handle)(PyObject *) except NULL
        object (*verifier_new)(PyObject *, PyObject *)
        gct_verifier *(*verifier_handle)(PyObject *) except NULL
        long (*verifier_check)(gct_verifier *, int, MissedStore *, size_t, VerifyCounts *) noexcept nogil
        int (*verifier_close)(PyObject *) except -1
    unsigned GCTRACK_CAPI_VERSION
    const char *GCTRACK_CAPI_NAME


cdef gct_tracker *tracker_handle(PyObject *obj) except NULL:
    cdef Tracker tracker = <Tracker?><object>obj
    if tracker.closed:
        raise ValueError("tracker is closed")
    return <gct_tracker *>&tracker.core


cdef const Barrier *barrier_handle(PyObject *obj) except NULL:
    cdef Tracker tracker = <Tracker?><object>obj
    if tracker.closed:
        raise ValueError("tracker is closed")
    cdef SoftwareCore *core = software_core_of(tracker.core.backend)
    if core == NULL:
        raise TypeError(f"only a software-backend tracker has a barrier, not {tracker.backend}")
    return &core.barrier


cdef CardBits *cards_handle(PyObject *obj) except NULL:
    return &(<CardTable?><object>obj).bits


cdef void *arena_memory(PyObject *obj, size_t *size) except NULL:
    cdef Arena arena = <Arena?><object>obj
    arena.check_open()
    if size != NULL:
        size[0] = arena.size
    return arena.base


cdef int collect(gct_tracker *t, CardBits *cards, int reset, PassCounts *counts) noexcept nogil:
    return tracker_pass_into(<TrackerCore *>t, cards, reset != 0, 0, counts)


cdef int drain(gct_tracker *t, CardBits *cards, PassCounts *counts) noexcept nogil:
    return tracker_drain(<TrackerCore *>t, cards, counts)


cdef int record(gct_tracker *t, uintptr_t start, uintptr_t end) noexcept nogil:
    return tracker_record(<TrackerCore *>t, start, end)


cdef int begin_external_write(gct_tracker *t, uintptr_t start, uintptr_t end) noexcept nogil:
    return tracker_begin_external(<TrackerCore *>t, start, end)


cdef int end_external_write(gct_tracker *t, uintptr_t start, uintptr_t end) noexcept nogil:
    return tracker_end_external(<TrackerCore *>t, start, end)


cdef void mark_range(CardBits *cards, uintptr_t start, uintptr_t end) noexcept nogil:
    cards_mark_range(cards, start, end)


cdef object verifier_new(PyObject *arena, PyObject *cards):
    return BarrierVerifier(<object>arena, <object>cards)


cdef gct_verifier *verifier_handle(PyObject *obj) except NULL:
    cdef BarrierVerifier verifier = <BarrierVerifier?><object>obj
    if verifier.closed:
        raise ValueError("verifier is closed")
    return <gct_verifier *>&verifier.core


cdef long check_into(gct_verifier *v, int clear, MissedStore *missed, size_t capacity,
                     VerifyCounts *counts) noexcept nogil:
    """The C entry: the caller's array holds the first ``capacity`` records."""
    cdef VerifyCounts ignored
    cdef MissedBuffer out
    if v == NULL or (missed == NULL and capacity):
        return -EINVAL
    if counts == NULL:
        counts = &ignored
    out.records = missed
    out.length = 0
    out.capacity = capacity
    out.limit = capacity
    out.growable = False
    cdef int rc = verifier_check(<VerifierCore *>v, clear != 0, &out, counts)
    return rc if rc else <long>counts.missed


cdef int verifier_close(PyObject *obj) except -1:
    (<BarrierVerifier?><object>obj).close()
    return 0


cdef gct_capi table
table.version = GCTRACK_CAPI_VERSION
table.size = sizeof(gct_capi)
table.tracker_handle = tracker_handle
table.cards_handle = cards_handle
table.arena_memory = arena_memory
table.collect = collect
table.drain = drain
table.record = record
table.next_dirty_card = cards_next_dirty
table.next_clean_card = cards_next_clean
table.mark_range = mark_range
table.clear_cards = cards_clear
table.begin_external_write = begin_external_write
table.end_external_write = end_external_write
table.barrier_handle = barrier_handle
table.verifier_new = verifier_new
table.verifier_handle = verifier_handle
table.verifier_check = check_into
table.verifier_close = verifier_close

_C_API = PyCapsule_New(&table, GCTRACK_CAPI_NAME, NULL)
