# cython: language_level=3
"""Kernel ABI (gctrack/linux_abi.h) and thin nogil system-call wrappers.

Every wrapper returns 0 (or a non-negative result) on success and -errno on
failure, so that nogil callers can carry the error out to where the GIL is
held and raise a TrackerError there.
"""
from libc.stdint cimport uint64_t
from libc.errno cimport errno


cdef extern from "gctrack/linux_abi.h" nogil:
    enum: SYS_userfaultfd
    enum: GCT_UFFD_USER_MODE_ONLY
    enum: GCT_UFFD_API
    const uint64_t GCT_UFFD_FEATURE_WP_UNPOPULATED
    const uint64_t GCT_UFFD_FEATURE_WP_ASYNC
    const uint64_t GCT_UFFDIO_REGISTER_MODE_WP
    const uint64_t GCT_UFFDIO_WRITEPROTECT_MODE_WP
    const unsigned long GCT_UFFDIO_API
    const unsigned long GCT_UFFDIO_REGISTER
    const unsigned long GCT_UFFDIO_UNREGISTER
    const unsigned long GCT_UFFDIO_WRITEPROTECT
    const unsigned long GCT_UFFDIO_WAKE

    const uint64_t GCT_PAGE_IS_WRITTEN
    const uint64_t GCT_PAGE_IS_SOFT_DIRTY
    const uint64_t GCT_PM_SCAN_WP_MATCHING
    const uint64_t GCT_PM_SCAN_CHECK_WPASYNC
    const unsigned long GCT_PAGEMAP_SCAN
    const uint64_t GCT_PM_ENTRY_SOFT_DIRTY
    const uint64_t GCT_PM_ENTRY_PRESENT

    struct gct_uffdio_api:
        uint64_t api
        uint64_t features
        uint64_t ioctls

    const int GCT_UFFD_EVENT_PAGEFAULT
    const uint64_t GCT_UFFD_PAGEFAULT_FLAG_WP

    struct gct_uffd_msg:
        unsigned char event
        uint64_t pagefault_flags
        uint64_t pagefault_address

    struct gct_uffdio_range:
        uint64_t start
        uint64_t len

    struct gct_uffdio_register:
        gct_uffdio_range range
        uint64_t mode
        uint64_t ioctls

    struct gct_uffdio_writeprotect:
        gct_uffdio_range range
        uint64_t mode

    struct gct_page_region:
        uint64_t start
        uint64_t end
        uint64_t categories

    struct gct_pm_scan_arg:
        uint64_t size
        uint64_t flags
        uint64_t start
        uint64_t end
        uint64_t walk_end
        uint64_t vec
        uint64_t vec_len
        uint64_t max_pages
        uint64_t category_inverted
        uint64_t category_mask
        uint64_t category_anyof_mask
        uint64_t return_mask


cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)


cdef inline int uffd_open(int flags) noexcept nogil:
    """userfaultfd(2): a new descriptor, or -errno."""
    cdef long fd = syscall(SYS_userfaultfd, flags)
    return <int>fd if fd >= 0 else -errno


cdef inline int uffd_api(int fd, uint64_t features, uint64_t *supported) noexcept nogil:
    """UFFDIO_API handshake asking for `features`; stores what the kernel offers."""
    cdef gct_uffdio_api api
    api.api = GCT_UFFD_API
    api.features = features
    api.ioctls = 0
    if ioctl(fd, GCT_UFFDIO_API, &api) != 0:
        return -errno
    if supported != NULL:
        supported[0] = api.features
    return 0


cdef inline int uffd_register_wp(int fd, uint64_t start, uint64_t length) noexcept nogil:
    """UFFDIO_REGISTER [start, start+length) in write-protect mode."""
    cdef gct_uffdio_register reg
    reg.range.start = start
    reg.range.len = length
    reg.mode = GCT_UFFDIO_REGISTER_MODE_WP
    reg.ioctls = 0
    return 0 if ioctl(fd, GCT_UFFDIO_REGISTER, &reg) == 0 else -errno


cdef inline int uffd_unregister(int fd, uint64_t start, uint64_t length) noexcept nogil:
    """UFFDIO_UNREGISTER [start, start+length). It acts on the mm that created
    the descriptor, so a forked child must never call it on an inherited one."""
    cdef gct_uffdio_range range_
    range_.start = start
    range_.len = length
    return 0 if ioctl(fd, GCT_UFFDIO_UNREGISTER, &range_) == 0 else -errno


cdef inline int uffd_writeprotect(int fd, uint64_t start, uint64_t length,
                                  bint protect) noexcept nogil:
    """UFFDIO_WRITEPROTECT: protect (or unprotect and wake) a range."""
    cdef gct_uffdio_writeprotect wp
    wp.range.start = start
    wp.range.len = length
    wp.mode = GCT_UFFDIO_WRITEPROTECT_MODE_WP if protect else 0
    return 0 if ioctl(fd, GCT_UFFDIO_WRITEPROTECT, &wp) == 0 else -errno


cdef inline int uffd_wake(int fd, uint64_t start, uint64_t length) noexcept nogil:
    """UFFDIO_WAKE: let the threads blocked on faults in a range retry."""
    cdef gct_uffdio_range range_
    range_.start = start
    range_.len = length
    return 0 if ioctl(fd, GCT_UFFDIO_WAKE, &range_) == 0 else -errno


cdef inline long pagemap_scan(int pagemap_fd, gct_pm_scan_arg *arg) noexcept nogil:
    """PAGEMAP_SCAN: the number of regions written to arg.vec, or -errno."""
    cdef int n = ioctl(pagemap_fd, GCT_PAGEMAP_SCAN, arg)
    return n if n >= 0 else -errno
