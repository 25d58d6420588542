# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Software card marking: no help from the OS.

Writers report their stores themselves, after each store: through
Tracker.record(addr, length), from Cython the inline software_write_barrier()
in software.pxd, or from C gct_barrier_mark() in gctrack.h. Exact
at 64-byte card granularity; a store that skips the barrier is not seen.
"""
from libc.stdint cimport uint64_t, uintptr_t

from gctrack.arena cimport Arena
from gctrack.backend cimport Backend, BackendCore, PassCounts, RegionSink, no_preparation
from gctrack.dirtymap cimport (dirtymap_init, dirtymap_free, dirtymap_clear, dirtymap_pass,
                               dirtymap_record_range)

#: Bytes per software card: the finest CardTable a pass can feed exactly.
CARD_SIZE = 64


cdef int software_pass(BackendCore *base, uintptr_t start, uintptr_t end, bint reset,
                       uint64_t max_cards, RegionSink *sink, PassCounts *counts) noexcept nogil:
    return dirtymap_pass(&(<SoftwareCore *>base).dirty, start, end, reset, max_cards, sink,
                         counts, &base.failed_operation)


cdef int clear_range(BackendCore *base, uintptr_t start, uintptr_t end) noexcept nogil:
    dirtymap_clear(&(<SoftwareCore *>base).dirty, start, end)
    return 0


cdef int record_range(BackendCore *base, uintptr_t start, uintptr_t end) noexcept nogil:
    if start < end:
        dirtymap_record_range(&(<SoftwareCore *>base).dirty, start, end)
    return 0


cdef class SoftwareBackend(Backend):
    """SoftwareBackend(arena, vector_len=None)
--

A 64-byte-card dirty map that only the writers' barrier fills in."""

    def __cinit__(self, Arena arena not None, vector_len=None):
        self.attach(arena, &self.c.base, b"software", CARD_SIZE)
        self.c.base.run_pass = software_pass
        self.c.base.rearm = clear_range
        self.c.base.record = record_range
        self.c.base.begin_external = no_preparation
        self.c.base.end_external = record_range
        self.c.dirty.protect = NULL
        if dirtymap_init(&self.c.dirty, self.c.base.start, arena.size,
                         CARD_SIZE.bit_length() - 1, arena.page_size.bit_length() - 1):
            self.release()
            raise MemoryError()
        self.c.barrier.words = self.c.dirty.words
        self.c.barrier.base = self.c.dirty.base
        self.c.barrier.card_shift = self.c.dirty.unit_shift
        self.c.barrier.size = self.c.dirty.size
        self.core = &self.c.base

    cdef void release(self) noexcept:
        # Inline barriers mark nothing from now on. The bits stay allocated
        # until the object goes: a barrier that read the old size may still
        # be storing into them.
        self.c.barrier.size = 0
        self.detach()

    def __dealloc__(self):
        self.release()
        dirtymap_free(&self.c.dirty)
