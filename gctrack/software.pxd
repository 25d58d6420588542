# cython: language_level=3
"""Software card marking: the writer itself records every store (a write barrier)."""
from libc.stdint cimport uint64_t, uintptr_t
from libc.string cimport strcmp
from gctrack.backend cimport Backend, BackendCore
from gctrack.dirtymap cimport DirtyMap


cdef extern from "gctrack/gctrack.h" nogil:
    # The barrier's view of the dirty map; the C API's gct_barrier (gctrack.h).
    ctypedef struct Barrier "gct_barrier":
        uint64_t *words
        uintptr_t base
        size_t size                 # 0 once closed: the barrier then marks nothing
        unsigned card_shift
    int barrier_mark "gct_barrier_mark"(const Barrier *b, uintptr_t addr)


ctypedef struct SoftwareCore:
    BackendCore base            # first, so a BackendCore* is a SoftwareCore*
    DirtyMap dirty              # one bit per 64-byte card
    Barrier barrier             # dirty's words and geometry, for the inline barrier


cdef inline SoftwareCore *software_core_of(BackendCore *core) noexcept nogil:
    """The software backend's state behind a tracker (``tracker.core.backend``),
    or NULL when the tracker uses another backend."""
    if core != NULL and strcmp(core.name, b"software") == 0:
        return <SoftwareCore *>core
    return NULL


cdef inline bint software_write_barrier(SoftwareCore *core, uintptr_t addr) noexcept nogil:
    """The card-marking barrier: call it after every store to addr, never
    before (a pass between the barrier and the store would miss the store).

    Returns False, marking nothing, when addr is outside the tracked arena or
    the tracker is closed. Safe from any thread, no GIL.
    """
    return barrier_mark(&core.barrier, addr)


cdef class SoftwareBackend(Backend):
    cdef SoftwareCore c
