# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""mprotect + SIGSEGV: the classic mechanism (bdwgc's MPROTECT_VDB).

Armed pages are read-only. The first write to one raises SIGSEGV; the
handler (mprotect_handler.c, async-signal-safe) records the page and makes
it writable. A pass takes the recorded pages, makes them read-only again and
reports them; handlers of the arena wait while it does. The kernel cannot write into a read-only page: read() into an
armed page fails with EFAULT unless Tracker.record() dirtied it first.
"""
from libc.errno cimport errno, ENOSPC
from libc.stdint cimport uint64_t, uintptr_t
from posix.mman cimport mprotect, PROT_READ, PROT_WRITE

from gctrack.arena cimport Arena
from gctrack.backend cimport Backend, BackendCore, PassCounts, RegionSink
from gctrack.dirtymap cimport (DirtyMap, dirtymap_init, dirtymap_free, dirtymap_clear,
                               dirtymap_pass, dirtymap_record_range)

from gctrack.errors import TrackerError


cdef extern from "gctrack/mprotect_handler.h" nogil:
    int gct_mp_register(uintptr_t start, size_t size, uint64_t *words, unsigned page_shift)
    int gct_mp_unregister(int slot)
    void gct_mp_begin_pass(int slot)
    void gct_mp_end_pass(int slot)
    uint64_t gct_mp_faults()


ctypedef struct MprotectCore:
    BackendCore base            # first, so a BackendCore* is an MprotectCore*
    DirtyMap dirty
    int slot


cdef int protect_range(void *ctx, uintptr_t start, uintptr_t end) noexcept nogil:
    return 0 if mprotect(<void *>start, end - start, PROT_READ) == 0 else -errno


cdef int mprotect_pass(BackendCore *base, uintptr_t start, uintptr_t end, bint reset,
                       uint64_t max_pages, RegionSink *sink, PassCounts *counts) noexcept nogil:
    cdef MprotectCore *core = <MprotectCore *>base
    gct_mp_begin_pass(core.slot)
    cdef int rc = dirtymap_pass(&core.dirty, start, end, reset, max_pages, sink, counts,
                                &base.failed_operation)
    gct_mp_end_pass(core.slot)
    return rc


cdef int record_range(BackendCore *base, uintptr_t start, uintptr_t end) noexcept nogil:
    """Mark [start, end) dirty and writable, as the handler would."""
    cdef MprotectCore *core = <MprotectCore *>base
    cdef uintptr_t page_mask = base.granularity - 1
    cdef int rc = 0
    if start >= end:
        return 0
    start &= ~page_mask
    end = (end + page_mask) & ~page_mask
    gct_mp_begin_pass(core.slot)
    dirtymap_record_range(&core.dirty, start, end)
    if mprotect(<void *>start, end - start, PROT_READ | PROT_WRITE) != 0:
        rc = -errno
        base.failed_operation = "mprotect"
    gct_mp_end_pass(core.slot)
    return rc


cdef int rearm_range(BackendCore *base, uintptr_t start, uintptr_t end) noexcept nogil:
    cdef MprotectCore *core = <MprotectCore *>base
    gct_mp_begin_pass(core.slot)
    dirtymap_clear(&core.dirty, start, end)
    cdef int rc = protect_range(NULL, start, end)
    gct_mp_end_pass(core.slot)
    if rc:
        base.failed_operation = "mprotect"
    return rc


def handler_faults():
    """Write faults the SIGSEGV handler has resolved in this process."""
    return gct_mp_faults()


cdef class MprotectBackend(Backend):
    """Read-only pages and a SIGSEGV handler that records the first write to each."""
    cdef MprotectCore c

    def __cinit__(self, Arena arena not None, vector_len=None):
        self.c.slot = -1
        self.attach(arena, &self.c.base, b"mprotect", arena.page_size)
        self.c.base.run_pass = mprotect_pass
        self.c.base.rearm = rearm_range
        self.c.base.record = record_range
        self.c.dirty.protect = protect_range
        self.c.dirty.protect_ctx = NULL
        cdef unsigned shift = arena.page_size.bit_length() - 1
        cdef int rc
        try:
            if dirtymap_init(&self.c.dirty, self.c.base.start, arena.size, shift, shift):
                raise MemoryError()
            self.c.slot = gct_mp_register(self.c.base.start, arena.size, self.c.dirty.words, shift)
            if self.c.slot < 0:
                raise TrackerError(-self.c.slot, "installing the SIGSEGV handler",
                                   "at most 64 arenas" if self.c.slot == -ENOSPC else "")
            with nogil:
                rc = rearm_range(&self.c.base, self.c.base.start, self.c.base.end)
            if rc:
                raise TrackerError(-rc, "mprotect")
        except BaseException:
            self.release()
            raise
        self.core = &self.c.base

    cdef void release(self) noexcept:
        if self.c.slot >= 0:
            mprotect(<void *>self.c.base.start, self.c.base.end - self.c.base.start,
                     PROT_READ | PROT_WRITE)
            if not gct_mp_unregister(self.c.slot):
                self.c.dirty.words = NULL   # a forked child: a parent's thread may have been using it
            self.c.slot = -1
        dirtymap_free(&self.c.dirty)
        self.detach()

    def __dealloc__(self):
        self.release()
