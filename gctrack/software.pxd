# cython: language_level=3
"""Software card marking: the writer itself records every store (a write barrier)."""
from libc.stdint cimport uintptr_t
from libc.string cimport strcmp
from gctrack.backend cimport Backend, BackendCore
from gctrack.dirtymap cimport DirtyMap, dirtymap_record


ctypedef struct SoftwareCore:
    BackendCore base            # first, so a BackendCore* is a SoftwareCore*
    DirtyMap dirty              # one bit per 64-byte card


cdef inline SoftwareCore *software_core_of(BackendCore *core) noexcept nogil:
    """The software backend's state behind a tracker (``tracker.core.backend``),
    or NULL when the tracker uses another backend."""
    if core != NULL and strcmp(core.name, b"software") == 0:
        return <SoftwareCore *>core
    return NULL


cdef inline void software_write_barrier(SoftwareCore *core, uintptr_t addr) noexcept nogil:
    """The card-marking barrier: call it after every store to addr, never
    before (a pass between the barrier and the store would miss the store).

    addr must lie inside the tracked arena. Safe from any thread, no GIL.
    """
    dirtymap_record(&core.dirty, addr)


cdef class SoftwareBackend(Backend):
    cdef SoftwareCore c
