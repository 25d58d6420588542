# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The primary backend: userfaultfd WP_ASYNC + PAGEMAP_SCAN (Linux 6.7+).

Writes to the armed range are resolved by the kernel itself (no fault
handler); one PAGEMAP_SCAN call with PM_SCAN_WP_MATCHING reports the pages
written since the last pass and re-protects them atomically.
"""
import operator

from libc.errno cimport errno, EBUSY
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from posix.fcntl cimport open as c_open, O_RDONLY, O_CLOEXEC, O_NONBLOCK
from posix.unistd cimport close

from gctrack.arena cimport Arena
from gctrack.backend cimport Backend, BackendCore, PassCounts, RegionSink, touch_pages
from gctrack.linux cimport (
    gct_page_region, gct_pm_scan_arg, GCT_UFFD_USER_MODE_ONLY,
    GCT_UFFD_FEATURE_WP_ASYNC, GCT_UFFD_FEATURE_WP_UNPOPULATED, GCT_PAGE_IS_WRITTEN,
    GCT_PM_SCAN_WP_MATCHING, GCT_PM_SCAN_CHECK_WPASYNC,
    uffd_open, uffd_api, uffd_register_wp, uffd_writeprotect, pagemap_scan)

from gctrack.errors import TrackerError

# Features this backend asks UFFDIO_API for.
REQUIRED_FEATURES = GCT_UFFD_FEATURE_WP_ASYNC | GCT_UFFD_FEATURE_WP_UNPOPULATED
DEFAULT_VECTOR_LEN = 4096


ctypedef struct PagemapScanCore:
    BackendCore base            # first, so a BackendCore* is a PagemapScanCore*
    int uffd
    int pagemap_fd
    gct_page_region *vec
    uint64_t vec_len


cdef inline uint64_t pages_in(const gct_page_region *regions, long n,
                              size_t page_size) noexcept nogil:
    cdef uint64_t total = 0
    cdef long i
    for i in range(n):
        total += regions[i].end - regions[i].start
    return total // page_size


cdef void redirty(BackendCore *base, const gct_page_region *regions, long n) noexcept nogil:
    cdef long i
    for i in range(n):
        touch_pages(base, regions[i].start, regions[i].end)


cdef uint64_t resume_point(const gct_pm_scan_arg *arg, const gct_page_region *vec,
                           long n) noexcept nogil:
    """Where to continue after a call that filled the vector.

    walk_end is where the kernel stopped reporting. It never lies before the
    last reported region when the kernel stopped for a full vector; the
    fallback guards the loop against a kernel that reports otherwise.
    """
    if arg.walk_end > arg.start:
        return arg.walk_end
    return vec[n - 1].end


cdef int scan_pass(BackendCore *base, uintptr_t start, uintptr_t end, bint reset,
                   uint64_t max_pages, RegionSink *sink, PassCounts *counts) noexcept nogil:
    cdef PagemapScanCore *core = <PagemapScanCore *>base
    cdef gct_pm_scan_arg arg
    cdef long n
    cdef int rc
    cdef uint64_t pages
    memset(&arg, 0, sizeof(arg))
    arg.size = sizeof(arg)
    arg.flags = GCT_PM_SCAN_CHECK_WPASYNC
    if reset:
        arg.flags |= GCT_PM_SCAN_WP_MATCHING
    arg.start = start
    arg.end = end
    arg.vec = <uintptr_t>core.vec
    arg.category_mask = GCT_PAGE_IS_WRITTEN
    arg.return_mask = GCT_PAGE_IS_WRITTEN
    while True:
        arg.vec_len = core.vec_len
        arg.max_pages = max_pages
        n = pagemap_scan(core.pagemap_fd, &arg)
        if n < 0:
            base.failed_operation = "PAGEMAP_SCAN"
            return <int>n
        pages = pages_in(core.vec, n, base.granularity)
        counts.calls += 1
        counts.regions += n
        counts.pages += pages
        if n:
            rc = sink.emit(sink.ctx, core.vec, n)
            if rc:
                base.failed_operation = "collecting regions"
                if reset:
                    redirty(base, core.vec, n)     # re-armed but unreported: write them again
                return rc
        # A short vector means the walk reached `end` (walk_end may then lag
        # behind: see DESIGN.md). A full one means unreported pages may remain,
        # still dirty and still armed: resume where the kernel stopped.
        if <uint64_t>n < core.vec_len:
            return 0
        if max_pages:
            max_pages -= pages
            if max_pages == 0:
                return 0
        arg.start = resume_point(&arg, core.vec, n)
        if arg.start >= arg.end:
            return 0


cdef int rearm_range(BackendCore *base, uintptr_t start, uintptr_t end) noexcept nogil:
    cdef PagemapScanCore *core = <PagemapScanCore *>base
    cdef int rc = uffd_writeprotect(core.uffd, start, end - start, True)
    if rc:
        base.failed_operation = "UFFDIO_WRITEPROTECT"
    return rc


cdef class PagemapScanBackend(Backend):
    """userfaultfd(WP_ASYNC) registration of an arena, scanned with PAGEMAP_SCAN."""
    cdef PagemapScanCore c

    def __cinit__(self, Arena arena not None, vector_len=DEFAULT_VECTOR_LEN):
        vector_len = operator.index(vector_len)
        if vector_len < 1:
            raise ValueError(f"vector_len must be >= 1, got {vector_len}")
        self.c.uffd = -1
        self.c.pagemap_fd = -1
        self.attach(arena, &self.c.base, b"pagemap_scan", arena.page_size)
        self.c.base.run_pass = scan_pass
        self.c.base.rearm = rearm_range
        self.c.base.record = touch_pages
        self.c.vec_len = vector_len
        try:
            self.c.vec = <gct_page_region *>malloc(self.c.vec_len * sizeof(gct_page_region))
            if self.c.vec == NULL:
                raise MemoryError()
            self.arm()
        except BaseException:
            self.release()
            raise
        self.core = &self.c.base

    cdef arm(self):
        """The order that works: API, open pagemap, REGISTER, WRITEPROTECT all."""
        cdef int rc
        cdef uint64_t length = self.c.base.end - self.c.base.start
        self.c.uffd = uffd_open(O_CLOEXEC | O_NONBLOCK | GCT_UFFD_USER_MODE_ONLY)
        if self.c.uffd < 0:
            raise TrackerError(-self.c.uffd, "userfaultfd")
        rc = uffd_api(self.c.uffd, REQUIRED_FEATURES, NULL)
        if rc:
            raise TrackerError(-rc, "UFFDIO_API", "WP_ASYNC | WP_UNPOPULATED")
        self.c.pagemap_fd = c_open(b"/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        if self.c.pagemap_fd < 0:
            raise TrackerError(errno, "open /proc/self/pagemap")
        rc = uffd_register_wp(self.c.uffd, self.c.base.start, length)
        if rc:
            raise TrackerError(-rc, "UFFDIO_REGISTER",
                               "is the arena already tracked?" if rc == -EBUSY else "")
        with nogil:
            rc = rearm_range(&self.c.base, self.c.base.start, self.c.base.end)
        if rc:
            raise TrackerError(-rc, "UFFDIO_WRITEPROTECT")

    cdef void release(self) noexcept:
        if self.c.uffd >= 0:
            close(self.c.uffd)      # the kernel unregisters the range
            self.c.uffd = -1
        if self.c.pagemap_fd >= 0:
            close(self.c.pagemap_fd)
            self.c.pagemap_fd = -1
        free(self.c.vec)
        self.c.vec = NULL
        self.detach()

    def __dealloc__(self):
        self.release()
