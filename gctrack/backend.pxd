# cython: language_level=3
"""The C-level interface every tracking backend implements.

A backend is a C struct that starts with BackendCore, so that the pass loop,
the background thread and embedders can drive any backend without the GIL and
without touching a Python object.
"""
from libc.stdint cimport uint64_t, uintptr_t
from gctrack.linux cimport gct_page_region


cdef extern from "gctrack/gctrack.h" nogil:
    # A stable layout of the C API (gct_pass_counts).
    ctypedef struct PassCounts "gct_pass_counts":
        uint64_t regions     # regions reported
        uint64_t pages       # pages reported
        uint64_t calls       # kernel calls the pass made
        double seconds       # wall time of the pass


# Receives the regions a pass reports, one batch at a time; returns 0 or -errno.
ctypedef int (*RegionSinkFn)(void *ctx, const gct_page_region *regions,
                             size_t n) noexcept nogil

ctypedef struct RegionSink:
    RegionSinkFn emit
    void *ctx


ctypedef struct BackendCore:
    # Report what was written in [start, end) (granularity-aligned, inside the
    # tracked range) since it was last reset, batch by batch into `sink`, in
    # ascending order; with `reset`, re-arm exactly what was reported.
    # max_pages > 0 stops after that many units, leaving the rest dirty for
    # the next pass. Returns 0 or -errno.
    int (*run_pass)(BackendCore *core, uintptr_t start, uintptr_t end, bint reset,
                    uint64_t max_pages, RegionSink *sink, PassCounts *counts) noexcept nogil
    # Report without re-arming what was written in [start, end), like
    # run_pass(reset=False), into a region vector of its own: safe on several
    # threads at once over disjoint ranges (a split final pass). NULL where
    # the backend has no such pass. 0 or -errno.
    int (*report_range)(BackendCore *core, uintptr_t start, uintptr_t end, RegionSink *sink,
                        PassCounts *counts) noexcept nogil
    # Re-arm [start, end) without reporting anything; 0 or -errno.
    int (*rearm)(BackendCore *core, uintptr_t start, uintptr_t end) noexcept nogil
    # Declare a write to [start, end) (inside the range) that has completed,
    # so the next pass reports it; for the software backend this is the
    # write barrier. 0 or -errno.
    int (*record)(BackendCore *core, uintptr_t start, uintptr_t end) noexcept nogil
    # Bracket a write that bypasses the page-table fault path (DMA, O_DIRECT,
    # /proc/PID/mem): begin makes [start, end) writable and keeps it so until
    # the matching end, passes included; end records the range as written.
    # Brackets nest and overlap. 0 or -errno.
    int (*begin_external)(BackendCore *core, uintptr_t start, uintptr_t end) noexcept nogil
    int (*end_external)(BackendCore *core, uintptr_t start, uintptr_t end) noexcept nogil
    const char *name                # the backend's name, as in gctrack.BACKENDS
    const char *failed_operation    # set with every error return
    uintptr_t start
    uintptr_t end
    size_t granularity              # bytes one report stands for (page size)


cdef extern from *:
    """
    static inline void gct_touch_byte(volatile char *p) {
        __atomic_fetch_add((char *)p, 0, __ATOMIC_RELAXED);
    }
    """
    void gct_touch_byte(char *p) nogil


cdef inline int no_preparation(BackendCore *core, uintptr_t start, uintptr_t end) noexcept nogil:
    """begin_external for the backends whose pages the kernel can always
    write: nothing to prepare, end_external (= record) does the work."""
    return 0


cdef inline int touch_pages(BackendCore *core, uintptr_t start, uintptr_t end) noexcept nogil:
    """pagemap_scan's record(): a harmless atomic write to each page (an add
    of 0 keeps its contents), which the kernel marks written."""
    cdef uintptr_t addr = start & ~(<uintptr_t>core.granularity - 1)
    while addr < end:
        gct_touch_byte(<char *>addr)
        addr += core.granularity
    return 0


cdef class Backend:
    """Owns one backend's C state; subclasses fill in ``core``."""
    cdef BackendCore *core
    cdef readonly str name
    cdef readonly object arena       # None once closed
    cdef long owner_pid              # the process that armed it (threads live there)
    cdef public bint claimed         # a Tracker drives it (one at most)
    cdef bint beside_software        # armed for a BarrierVerifier: arena.verified_by, not armed_by
    cdef int attach(self, object arena, BackendCore *core, const char *name,
                    size_t granularity, bint beside_software=*) except -1
    cdef void detach(self) noexcept
    cdef void release(self) noexcept
    cdef bint forked(self) noexcept
