# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""mprotect + SIGSEGV: the classic mechanism (bdwgc's MPROTECT_VDB).

Armed pages are read-only. The first write to one raises SIGSEGV; the
handler (mprotect_handler.c, async-signal-safe) records the page and makes
it writable. A pass takes the recorded pages, makes them read-only again and
reports them; handlers of the arena wait while it does. The kernel cannot
write into a read-only page: read() into an armed page fails with EFAULT
unless it runs inside Tracker.external_write(), which keeps the range
writable until the write has completed.

The handler stays installed for the life of the process once an arena is
armed (see mprotect_handler.h). Every pass and re-arm first checks that it is
still the installed SIGSEGV handler; if something replaced it, the arena is
made writable and all dirty, and the pass fails naming the replacement. The
constructor proves the mechanism: it writes to one armed page and checks that
the handler recorded it, or raises UnsupportedError.
"""
from libc.errno cimport errno, EBUSY, ENOSPC
from libc.stdint cimport uint64_t, uintptr_t
from libc.string cimport strncat, strlen
from posix.mman cimport mprotect, PROT_READ, PROT_WRITE

from gctrack.arena cimport Arena
from gctrack.backend cimport Backend, BackendCore, PassCounts, RegionSink, gct_touch_byte
from gctrack.dirtymap cimport (DirtyMapCore, dirtymap_init, dirtymap_free, dirtymap_pass,
                               dirtymap_core_record, dirtymap_core_rearm,
                               dirtymap_core_begin_external, dirtymap_core_end_external,
                               gct_bits_load)

import os

from gctrack.errors import TrackerError, UnsupportedError


cdef extern from "gctrack/mprotect_handler.h" nogil:
    int gct_mp_register(uintptr_t start, size_t size, uint64_t *words, unsigned page_shift)
    int gct_mp_unregister(int slot)
    void gct_mp_begin_pass(int slot)
    void gct_mp_end_pass(int slot)
    int gct_mp_handler_is_current()
    int gct_mp_describe_handler(char *buf, size_t len)
    int gct_mp_open_slot(int slot)
    uint64_t gct_mp_faults()
    enum: GCT_MP_MAX_ARENAS


ctypedef struct MprotectCore:
    DirtyMapCore shared         # first, so a BackendCore* is a DirtyMapCore* and a MprotectCore*
    int slot
    char handler_problem[256]   # failed_operation when the handler was replaced


cdef int protect_range(void *ctx, uintptr_t start, uintptr_t end) noexcept nogil:
    return 0 if mprotect(<void *>start, end - start, PROT_READ) == 0 else -errno


cdef int check_handler(MprotectCore *core) noexcept nogil:
    """0 while gctrack's SIGSEGV handler is installed. If something replaced
    it, writes to the arena would crash or go unseen: mark the arena all dirty,
    make it writable, and fail with -EBUSY naming the replacement. Called
    between gct_mp_begin_pass and gct_mp_end_pass."""
    if gct_mp_handler_is_current():
        return 0
    cdef size_t size = sizeof(core.handler_problem)
    gct_mp_describe_handler(core.handler_problem, size)
    strncat(core.handler_problem, "; the arena is now writable and all dirty",
            size - 1 - strlen(core.handler_problem))
    core.shared.base.failed_operation = core.handler_problem
    gct_mp_open_slot(core.slot)
    return -EBUSY


cdef int mprotect_pass(BackendCore *base, uintptr_t start, uintptr_t end, bint reset,
                       uint64_t max_pages, RegionSink *sink, PassCounts *counts) noexcept nogil:
    cdef MprotectCore *core = <MprotectCore *>base
    gct_mp_begin_pass(core.slot)
    cdef int rc = check_handler(core)
    if rc == 0:
        rc = dirtymap_pass(&core.shared.dirty, start, end, reset, max_pages, sink, counts,
                           &base.failed_operation)
    gct_mp_end_pass(core.slot)
    return rc


cdef int unprotect_range(void *ctx, uintptr_t start, uintptr_t end) noexcept nogil:
    return 0 if mprotect(<void *>start, end - start, PROT_READ | PROT_WRITE) == 0 else -errno


cdef void exclude_handlers(void *ctx) noexcept nogil:
    gct_mp_begin_pass((<MprotectCore *>ctx).slot)


cdef void allow_handlers(void *ctx) noexcept nogil:
    gct_mp_end_pass((<MprotectCore *>ctx).slot)


cdef int rearm_range(BackendCore *base, uintptr_t start, uintptr_t end) noexcept nogil:
    cdef MprotectCore *core = <MprotectCore *>base
    gct_mp_begin_pass(core.slot)
    cdef int rc = check_handler(core)
    gct_mp_end_pass(core.slot)
    if rc == 0:                 # dirtymap_core_rearm takes the exclusion itself
        rc = dirtymap_core_rearm(base, start, end)
    return rc


def handler_faults():
    """Write faults the SIGSEGV handler has resolved in this process."""
    return gct_mp_faults()


cdef class MprotectBackend(Backend):
    """MprotectBackend(arena, vector_len=None)
--

Read-only pages and a SIGSEGV handler that records the first write to each."""
    cdef MprotectCore c

    def __cinit__(self, Arena arena not None, vector_len=None):
        self.c.slot = -1
        self.attach(arena, &self.c.shared.base, b"mprotect", arena.page_size)
        self.c.shared.base.run_pass = mprotect_pass
        self.c.shared.base.rearm = rearm_range
        self.c.shared.base.record = dirtymap_core_record
        self.c.shared.base.begin_external = dirtymap_core_begin_external
        self.c.shared.base.end_external = dirtymap_core_end_external
        self.c.shared.dirty.protect = protect_range
        self.c.shared.dirty.unprotect = unprotect_range
        self.c.shared.dirty.exclude = exclude_handlers
        self.c.shared.dirty.allow = allow_handlers
        self.c.shared.dirty.protect_ctx = &self.c
        cdef unsigned shift = arena.page_size.bit_length() - 1
        cdef int rc
        try:
            if dirtymap_init(&self.c.shared.dirty, self.c.shared.base.start, arena.size, shift, shift):
                raise MemoryError()
            # One write before the first mprotect gives the arena's mapping its
            # anon_vma, which every piece that per-page protection splits off
            # then shares, so passes and close() merge the pieces back. Without
            # it each written page of a never-touched arena keeps a mapping of
            # its own, thousands a pass, up to vm.max_map_count.
            gct_touch_byte(<char *>self.c.shared.base.start)
            self.register_arena(shift)
            with nogil:
                rc = rearm_range(&self.c.shared.base, self.c.shared.base.start, self.c.shared.base.end)
            if rc:
                raise TrackerError(-rc, self.c.shared.base.failed_operation.decode())
            self.prove_handler_works()
        except BaseException:
            self.release()
            raise
        self.core = &self.c.shared.base

    cdef int register_arena(self, unsigned shift) except -1:
        cdef char problem[256]
        cdef int slot = gct_mp_register(self.c.shared.base.start, self.c.shared.base.end - self.c.shared.base.start,
                                        self.c.shared.dirty.words, shift)
        if slot == -ENOSPC:
            raise TrackerError(ENOSPC, "registering the arena with the SIGSEGV handler",
                               f"at most {GCT_MP_MAX_ARENAS} arenas")
        if slot == -EBUSY:
            gct_mp_describe_handler(problem, sizeof(problem))
            raise UnsupportedError("mprotect", problem.decode(), EBUSY)
        if slot < 0:
            raise UnsupportedError("mprotect", f"sigaction(SIGSEGV): {os.strerror(-slot)}", -slot)
        self.c.slot = slot
        return 0

    cdef int prove_handler_works(self) except -1:
        """Write to one armed page (an atomic add of 0 keeps its contents),
        check that the handler recorded it, and re-arm the page."""
        cdef uintptr_t page = self.c.shared.base.start
        cdef int rc
        with nogil:
            gct_touch_byte(<char *>page)
        if not gct_bits_load(&self.c.shared.dirty.words[0]) & 1:
            raise UnsupportedError("mprotect", "a write to an armed page did not reach "
                                   "gctrack's SIGSEGV handler")
        with nogil:
            rc = rearm_range(&self.c.shared.base, page, page + self.c.shared.base.granularity)
        if rc:
            raise TrackerError(-rc, self.c.shared.base.failed_operation.decode())
        return 0

    cdef void release(self) noexcept:
        if self.c.slot >= 0:
            mprotect(<void *>self.c.shared.base.start, self.c.shared.base.end - self.c.shared.base.start,
                     PROT_READ | PROT_WRITE)
            if not gct_mp_unregister(self.c.slot):
                self.c.shared.dirty.words = NULL   # a forked child: a parent's thread may have been using it
            self.c.slot = -1
        dirtymap_free(&self.c.shared.dirty)
        self.detach()

    def __dealloc__(self):
        self.release()
