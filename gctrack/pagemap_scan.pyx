# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""The primary backend: userfaultfd WP_ASYNC + PAGEMAP_SCAN (Linux 6.7+).

Writes to the armed range are resolved by the kernel itself (no fault
handler); one PAGEMAP_SCAN call with PM_SCAN_WP_MATCHING reports the pages
written since the last pass and re-protects them atomically.
"""
import errno as errno_codes
import operator

from libc.errno cimport errno, EBUSY, EINVAL, ENOMEM, ENOTTY
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from posix.fcntl cimport open as c_open, O_RDONLY, O_CLOEXEC, O_NONBLOCK
from posix.unistd cimport close

from gctrack.arena cimport Arena
from gctrack.backend cimport (Backend, BackendCore, PassCounts, RegionSink, gct_touch_byte,
                              no_preparation, touch_pages)
from gctrack.linux cimport (
    gct_page_region, gct_pm_scan_arg, GCT_UFFD_USER_MODE_ONLY,
    GCT_UFFD_FEATURE_WP_ASYNC, GCT_UFFD_FEATURE_WP_UNPOPULATED, GCT_PAGE_IS_WRITTEN,
    GCT_PM_SCAN_WP_MATCHING, GCT_PM_SCAN_CHECK_WPASYNC,
    uffd_open, uffd_api, uffd_register_wp, uffd_unregister, uffd_writeprotect, pagemap_scan)

from gctrack.errors import TrackerError, UnsupportedError, userfaultfd_unsupported

# Features this backend asks UFFDIO_API for.
REQUIRED_FEATURES = GCT_UFFD_FEATURE_WP_ASYNC | GCT_UFFD_FEATURE_WP_UNPOPULATED
cdef enum:
    DEFAULT_REGIONS = 4096      # the default output vector: 96 KiB, under malloc's mmap threshold
DEFAULT_VECTOR_LEN = DEFAULT_REGIONS
#: The largest output vector (regions per PAGEMAP_SCAN call): 384 MiB of regions.
MAX_VECTOR_LEN = 1 << 24


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


cdef void mark_written_again(PagemapScanCore *core, uintptr_t start, uintptr_t end) noexcept nogil:
    """After a failed pass: un-write-protect [start, end), so that every page
    the kernel re-armed there without our seeing it reads as written to the
    next pass. Never-populated pages stay unreported (nobody wrote them).
    The kernel stops at the first range it cannot change (ENOENT at a hole
    in the registration), past the pages this pass could have re-armed.
    Its result is not checked: the pass is failing already, and this call
    fails only if the registration itself is gone."""
    uffd_writeprotect(core.uffd, start, end - start, False)


cdef void mark_regions_written_again(PagemapScanCore *core, const gct_page_region *regions,
                                     long n) noexcept nogil:
    cdef long i
    for i in range(n):
        mark_written_again(core, regions[i].start, regions[i].end)


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


cdef int scan_with(PagemapScanCore *core, gct_page_region *vec, uint64_t vec_len,
                   uintptr_t start, uintptr_t end, bint reset, uint64_t max_pages,
                   RegionSink *sink, PassCounts *counts) noexcept nogil:
    """The walk behind every pass: PAGEMAP_SCAN calls over [start, end)
    through ``vec`` (vec_len regions), each batch into ``sink``."""
    cdef BackendCore *base = &core.base
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
    arg.vec = <uintptr_t>vec
    arg.category_mask = GCT_PAGE_IS_WRITTEN
    arg.return_mask = GCT_PAGE_IS_WRITTEN
    while True:
        arg.vec_len = vec_len
        arg.max_pages = max_pages
        n = pagemap_scan(core.pagemap_fd, &arg)
        if n < 0:
            # The kernel may have re-armed pages before failing, and their
            # regions never reached us: make everything it walked read as written.
            base.failed_operation = "PAGEMAP_SCAN"
            if reset:
                mark_written_again(core, arg.start, arg.end)
            return <int>n
        pages = pages_in(vec, n, base.granularity)
        counts.calls += 1
        counts.regions += n
        counts.pages += pages
        if n:
            rc = sink.emit(sink.ctx, vec, n)
            if rc:
                base.failed_operation = "collecting regions"
                if reset:
                    mark_regions_written_again(core, vec, n)   # re-armed, unreported
                return rc
        # A short vector means the walk reached `end` (walk_end may then lag
        # behind it). A full one means unreported pages may remain,
        # still dirty and still armed: resume where the kernel stopped.
        if <uint64_t>n < vec_len:
            return 0
        if max_pages:
            max_pages -= pages
            if max_pages == 0:
                return 0
        arg.start = resume_point(&arg, vec, n)
        if arg.start >= arg.end:
            return 0


cdef int scan_pass(BackendCore *base, uintptr_t start, uintptr_t end, bint reset,
                   uint64_t max_pages, RegionSink *sink, PassCounts *counts) noexcept nogil:
    cdef PagemapScanCore *core = <PagemapScanCore *>base
    return scan_with(core, core.vec, core.vec_len, start, end, reset, max_pages, sink, counts)


cdef int report_range(BackendCore *base, uintptr_t start, uintptr_t end, RegionSink *sink,
                      PassCounts *counts) noexcept nogil:
    """A report-only walk with a vector of its own (one per calling thread),
    no longer than the range's pages need, nor than the default: a longer
    one would come from mmap, whose lock the other threads' walks take."""
    cdef PagemapScanCore *core = <PagemapScanCore *>base
    cdef uint64_t vec_len = min(core.vec_len, <uint64_t>DEFAULT_REGIONS,
                                (end - start) // base.granularity + 1)
    cdef gct_page_region *vec = <gct_page_region *>malloc(vec_len * sizeof(gct_page_region))
    if vec == NULL:
        base.failed_operation = "allocating a region vector"
        return -ENOMEM
    cdef int rc = scan_with(core, vec, vec_len, start, end, False, 0, sink, counts)
    free(vec)
    return rc


cdef int rearm_range(BackendCore *base, uintptr_t start, uintptr_t end) noexcept nogil:
    cdef PagemapScanCore *core = <PagemapScanCore *>base
    cdef int rc = uffd_writeprotect(core.uffd, start, end - start, True)
    if rc:
        base.failed_operation = "UFFDIO_WRITEPROTECT"
    return rc


cdef long prove_one_page(PagemapScanCore *core) noexcept nogil:
    """Write the arena's first page (an atomic add of 0 keeps its contents),
    ask PAGEMAP_SCAN whether it reads as written, and re-arm it. Returns the
    regions reported (1 when the mechanism works), or -errno."""
    cdef gct_pm_scan_arg arg
    cdef uintptr_t page = core.base.start
    gct_touch_byte(<char *>page)
    memset(&arg, 0, sizeof(arg))
    arg.size = sizeof(arg)
    arg.flags = GCT_PM_SCAN_CHECK_WPASYNC
    arg.start = page
    arg.end = page + core.base.granularity
    arg.vec = <uintptr_t>core.vec
    arg.vec_len = 1
    arg.category_mask = GCT_PAGE_IS_WRITTEN
    arg.return_mask = GCT_PAGE_IS_WRITTEN
    cdef long n = pagemap_scan(core.pagemap_fd, &arg)
    cdef int rc = rearm_range(&core.base, page, page + core.base.granularity)
    return n if n < 0 or rc == 0 else rc


def checked_vector_len(vector_len):
    """``vector_len`` as an int in 1..MAX_VECTOR_LEN, or ValueError/TypeError."""
    vector_len = operator.index(vector_len)
    if not 1 <= vector_len <= MAX_VECTOR_LEN:
        raise ValueError(f"vector_len must be in 1..{MAX_VECTOR_LEN}, got {vector_len}")
    return vector_len


cdef class PagemapScanBackend(Backend):
    """PagemapScanBackend(arena, vector_len=4096, *, beside_software=False)
--

userfaultfd(WP_ASYNC) registration of an arena, scanned with PAGEMAP_SCAN.

    Arming proves the mechanism: UnsupportedError, with the reason, where
    userfaultfd, WP_ASYNC or PAGEMAP_SCAN is missing or denied. Process-wide
    side effects: none (two descriptors, both close-on-exec).
    ``beside_software`` arms it for a BarrierVerifier: beside a software
    tracker of the same arena (see Backend.attach).
    """
    cdef PagemapScanCore c
    cdef bint registered

    def __cinit__(self, Arena arena not None, vector_len=DEFAULT_VECTOR_LEN, *,
                  beside_software=False):
        vector_len = checked_vector_len(vector_len)
        self.c.uffd = -1
        self.c.pagemap_fd = -1
        self.attach(arena, &self.c.base, b"pagemap_scan", arena.page_size, bool(beside_software))
        self.c.base.run_pass = scan_pass
        self.c.base.report_range = report_range
        self.c.base.rearm = rearm_range
        self.c.base.record = touch_pages
        self.c.base.begin_external = no_preparation   # the kernel resolves its own writes
        self.c.base.end_external = touch_pages
        self.c.vec_len = vector_len
        try:
            self.c.vec = <gct_page_region *>malloc(self.c.vec_len * sizeof(gct_page_region))
            if self.c.vec == NULL:
                raise MemoryError()
            self.arm()
            self.prove()
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
            raise userfaultfd_unsupported("pagemap_scan", "userfaultfd", -self.c.uffd)
        rc = uffd_api(self.c.uffd, REQUIRED_FEATURES, NULL)
        if rc == -EINVAL:
            raise UnsupportedError("pagemap_scan", "UFFDIO_API lacks WP_ASYNC/WP_UNPOPULATED: "
                                   "kernel older than 6.7", EINVAL)
        if rc:
            raise userfaultfd_unsupported("pagemap_scan", "UFFDIO_API", -rc)
        self.c.pagemap_fd = c_open(b"/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        if self.c.pagemap_fd < 0:
            raise UnsupportedError("pagemap_scan", "cannot open /proc/self/pagemap: "
                                   "no procfs, or CONFIG_PROC_PAGE_MONITOR is off", errno)
        rc = uffd_register_wp(self.c.uffd, self.c.base.start, length)
        if rc:
            raise TrackerError(-rc, "UFFDIO_REGISTER",
                               "is the arena already tracked?" if rc == -EBUSY else "")
        self.registered = True
        with nogil:
            rc = rearm_range(&self.c.base, self.c.base.start, self.c.base.end)
        if rc:
            raise TrackerError(-rc, "UFFDIO_WRITEPROTECT")

    cdef prove(self):
        """UnsupportedError unless a write to an armed page reads as written."""
        cdef long n
        with nogil:
            n = prove_one_page(&self.c)
        if n == -ENOTTY or n == -EINVAL:
            raise UnsupportedError("pagemap_scan", "PAGEMAP_SCAN: unknown ioctl: "
                                   "kernel older than 6.7", -n)
        if n < 0:
            raise TrackerError(-n, "PAGEMAP_SCAN", "proving the mechanism")
        if n != 1:
            raise UnsupportedError("pagemap_scan", "a write to an armed page was not reported "
                                   "by PAGEMAP_SCAN", errno_codes.ENOTSUP)

    cdef void release(self) noexcept:
        if self.registered and not self.forked():
            # Unregister explicitly: a forked child's copy of the descriptor
            # would otherwise keep the range registered after close.
            uffd_unregister(self.c.uffd, self.c.base.start, self.c.base.end - self.c.base.start)
        self.registered = False
        if self.c.uffd >= 0:
            close(self.c.uffd)
            self.c.uffd = -1
        if self.c.pagemap_fd >= 0:
            close(self.c.pagemap_fd)
            self.c.pagemap_fd = -1
        free(self.c.vec)
        self.c.vec = NULL
        self.detach()

    def __dealloc__(self):
        self.release()
