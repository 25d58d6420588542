# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""userfaultfd synchronous write-protect, with a native fault-handler thread.

Every first write to an armed page blocks its writer and sends a message
to the handler thread, which records the page in a DirtyMap and then
un-protects it (waking the writer). A pass takes the recorded pages,
re-protects them and reports them. The handler and the pass exclude each
other with one mutex (dirtymap.pxd explains why both are needed).
"""
import errno as errno_codes

from libc.errno cimport errno, EAGAIN, EINTR, EINVAL, EPERM, EBUSY
from libc.stdint cimport uint64_t, uintptr_t
from posix.fcntl cimport O_CLOEXEC, O_NONBLOCK
from posix.unistd cimport close, read, write

from gctrack.arena cimport Arena
from gctrack.backend cimport Backend, BackendCore, PassCounts, RegionSink, gct_touch_byte
from gctrack.dirtymap cimport (DirtyMapCore, dirtymap_init, dirtymap_free, dirtymap_pass,
                               dirtymap_record, dirtymap_core_record, dirtymap_core_rearm,
                               dirtymap_core_begin_external, dirtymap_core_end_external)
from gctrack.linux cimport (gct_uffd_msg, GCT_UFFD_USER_MODE_ONLY, GCT_UFFD_EVENT_PAGEFAULT,
                            GCT_UFFD_FEATURE_WP_UNPOPULATED, uffd_open, uffd_api,
                            uffd_register_wp, uffd_unregister, uffd_wake, uffd_writeprotect)
from gctrack.threads cimport (pthread_t, pthread_mutex_t, pthread_create, pthread_join,
                              pthread_mutex_init, pthread_mutex_destroy, pthread_mutex_lock,
                              pthread_mutex_unlock)

from gctrack.errors import TrackerError, UnsupportedError, userfaultfd_unsupported


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLIN

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum: EFD_CLOEXEC
    enum: EFD_NONBLOCK


ctypedef struct UffdSyncCore:
    DirtyMapCore shared         # first, so a BackendCore* is a DirtyMapCore* and a UffdSyncCore*
    int uffd
    int stop_fd                 # eventfd that tells the handler to exit
    pthread_t handler
    pthread_mutex_t exclusion     # "record + un-protect" against "take + re-protect"
    bint handler_alive
    int handler_error           # -errno of the last failed un-protect
    uint64_t faults


cdef int protect_range(void *ctx, uintptr_t start, uintptr_t end) noexcept nogil:
    return uffd_writeprotect((<UffdSyncCore *>ctx).uffd, start, end - start, True)


cdef void resolve_fault(UffdSyncCore *core, uint64_t address) noexcept nogil:
    """Record the page, then un-protect it (which wakes its writer)."""
    cdef uintptr_t page = address & ~(<uintptr_t>core.shared.base.granularity - 1)
    cdef int rc = -EAGAIN
    pthread_mutex_lock(&core.exclusion)
    dirtymap_record(&core.shared.dirty, page)
    while rc == -EAGAIN:       # the mm is changing under us: try again
        rc = uffd_writeprotect(core.uffd, page, core.shared.base.granularity, False)
    pthread_mutex_unlock(&core.exclusion)
    if rc:
        core.handler_error = rc                   # sticky: every later pass reports it
        uffd_wake(core.uffd, page, core.shared.base.granularity)   # never leave the writer blocked
    core.faults += 1


cdef void *give_up(UffdSyncCore *core, int err) noexcept nogil:
    """The handler cannot go on: record the error (every later pass reports
    it) and un-protect everything, so that no writer ever blocks again."""
    core.handler_error = err
    uffd_writeprotect(core.uffd, core.shared.base.start, core.shared.base.end - core.shared.base.start, False)
    return NULL


cdef void *handle_faults(void *arg) noexcept nogil:
    cdef UffdSyncCore *core = <UffdSyncCore *>arg
    cdef pollfd fds[2]
    cdef gct_uffd_msg msgs[64]
    cdef long got
    cdef size_t i
    fds[0].fd = core.uffd
    fds[0].events = POLLIN
    fds[1].fd = core.stop_fd
    fds[1].events = POLLIN
    while True:
        if poll(fds, 2, -1) < 0:
            if errno == EINTR:
                continue
            return give_up(core, -errno)
        if fds[1].revents:
            return NULL
        got = read(core.uffd, msgs, sizeof(msgs))
        if got < 0:
            if errno == EAGAIN or errno == EINTR:
                continue
            return give_up(core, -errno)
        for i in range(<size_t>got // sizeof(gct_uffd_msg)):
            if msgs[i].event == GCT_UFFD_EVENT_PAGEFAULT:
                resolve_fault(core, msgs[i].pagefault_address)


cdef int sync_pass(BackendCore *base, uintptr_t start, uintptr_t end, bint reset,
                   uint64_t max_pages, RegionSink *sink, PassCounts *counts) noexcept nogil:
    cdef UffdSyncCore *core = <UffdSyncCore *>base
    cdef int rc = core.handler_error
    if rc:
        base.failed_operation = "fault handler thread"
        return rc
    pthread_mutex_lock(&core.exclusion)
    rc = dirtymap_pass(&core.shared.dirty, start, end, reset, max_pages, sink, counts,
                       &base.failed_operation)
    pthread_mutex_unlock(&core.exclusion)
    return rc


cdef int unprotect_range(void *ctx, uintptr_t start, uintptr_t end) noexcept nogil:
    """Un-protect (and wake the writers blocked on) [start, end)."""
    return uffd_writeprotect((<UffdSyncCore *>ctx).uffd, start, end - start, False)


cdef void exclude_handler(void *ctx) noexcept nogil:
    pthread_mutex_lock(&(<UffdSyncCore *>ctx).exclusion)


cdef void allow_handler(void *ctx) noexcept nogil:
    pthread_mutex_unlock(&(<UffdSyncCore *>ctx).exclusion)


cdef class UffdSyncBackend(Backend):
    """UffdSyncBackend(arena, vector_len=None)
--

userfaultfd write-protect in synchronous mode, with a handler thread.

    ``kernel_writes`` says what a write by the kernel (read() into the arena)
    does: with the privilege to open a full userfaultfd the handler resolves
    it; with a user-mode-only one it fails with EFAULT outside
    Tracker.external_write(). Discarding pages (MADV_DONTNEED) silently
    un-arms them: use Tracker.discard(), or record() the range after
    discarding. Arming proves the mechanism (UnsupportedError where
    userfaultfd is missing or denied); it starts one handler thread.
    """
    cdef UffdSyncCore c
    cdef readonly str kernel_writes
    cdef bint registered

    def __cinit__(self, Arena arena not None, vector_len=None):
        self.c.uffd = -1
        self.c.stop_fd = -1
        self.attach(arena, &self.c.shared.base, b"uffd_sync", arena.page_size)
        self.c.shared.base.run_pass = sync_pass
        self.c.shared.base.rearm = dirtymap_core_rearm
        self.c.shared.base.record = dirtymap_core_record
        self.c.shared.base.begin_external = dirtymap_core_begin_external
        self.c.shared.base.end_external = dirtymap_core_end_external
        self.c.shared.dirty.protect = protect_range
        self.c.shared.dirty.unprotect = unprotect_range
        self.c.shared.dirty.exclude = exclude_handler
        self.c.shared.dirty.allow = allow_handler
        self.c.shared.dirty.protect_ctx = &self.c
        pthread_mutex_init(&self.c.exclusion, NULL)
        try:
            if dirtymap_init(&self.c.shared.dirty, self.c.shared.base.start, arena.size,
                             arena.page_size.bit_length() - 1, arena.page_size.bit_length() - 1):
                raise MemoryError()
            self.open_uffd(arena)
            self.arm(arena)
            self.prove()
        except BaseException:
            self.release()
            raise
        self.core = &self.c.shared.base

    cdef open_uffd(self, Arena arena):
        """A full userfaultfd where permitted (kernel writes fault too), else user-mode only."""
        cdef int flags = O_CLOEXEC | O_NONBLOCK
        self.c.uffd = uffd_open(flags)
        if self.c.uffd == -EPERM:
            flags |= GCT_UFFD_USER_MODE_ONLY
            self.c.uffd = uffd_open(flags)
        if self.c.uffd < 0:
            raise userfaultfd_unsupported("uffd_sync", "userfaultfd", -self.c.uffd)
        self.kernel_writes = ("EFAULT outside Tracker.external_write()"
                              if flags & GCT_UFFD_USER_MODE_ONLY else "resolved by the handler thread")
        cdef int rc = uffd_api(self.c.uffd, GCT_UFFD_FEATURE_WP_UNPOPULATED, NULL)
        if rc == -EINVAL:
            # Before Linux 6.4 unpopulated pages cannot be armed: populate them.
            # A failed UFFDIO_API spends the descriptor: open another the same way.
            close(self.c.uffd)
            self.c.uffd = uffd_open(flags)
            rc = uffd_api(self.c.uffd, 0, NULL) if self.c.uffd >= 0 else self.c.uffd
            arena.prefault()
        if rc:
            raise userfaultfd_unsupported("uffd_sync", "UFFDIO_API", -rc)

    cdef arm(self, Arena arena):
        cdef int rc = uffd_register_wp(self.c.uffd, self.c.shared.base.start, arena.size)
        if rc == -EINVAL:
            raise UnsupportedError("uffd_sync", "UFFDIO_REGISTER: write-protect mode rejected: "
                                   "kernel older than 5.7", EINVAL)
        if rc:
            raise TrackerError(-rc, "UFFDIO_REGISTER",
                               "is the arena already tracked?" if rc == -EBUSY else "")
        self.registered = True
        self.c.stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.c.stop_fd < 0:
            raise TrackerError(errno, "eventfd")
        rc = pthread_create(&self.c.handler, NULL, handle_faults, &self.c)
        if rc:
            raise TrackerError(rc, "pthread_create", "fault handler thread")
        self.c.handler_alive = True
        with nogil:
            rc = dirtymap_core_rearm(&self.c.shared.base, self.c.shared.base.start, self.c.shared.base.end)
        if rc:
            raise TrackerError(-rc, "UFFDIO_WRITEPROTECT")

    cdef prove(self):
        """UnsupportedError unless the handler thread catches a write: write
        the first page (an atomic add of 0 keeps its contents), check that
        the handler recorded it, and re-arm it."""
        cdef uintptr_t page = self.c.shared.base.start
        cdef bint caught
        cdef int rc
        with nogil:
            gct_touch_byte(<char *>page)
            caught = (self.c.shared.dirty.words[0] & 1) != 0
            rc = dirtymap_core_rearm(&self.c.shared.base, page, page + self.c.shared.base.granularity)
        if not caught:
            raise UnsupportedError("uffd_sync", "a write to an armed page never reached the "
                                   "fault handler thread", errno_codes.ENOTSUP)
        if rc:
            raise TrackerError(-rc, "UFFDIO_WRITEPROTECT", "proving the mechanism")

    @property
    def faults(self):
        """Write faults the handler thread has resolved."""
        return self.c.faults

    cdef void release(self) noexcept:
        cdef uint64_t one = 1
        cdef bint here = not self.forked()
        if self.registered and here:
            # Wake every blocked writer, then unregister explicitly: a forked
            # child's copy of the descriptor would otherwise keep the range
            # registered, and the next write here would block until it exits.
            uffd_writeprotect(self.c.uffd, self.c.shared.base.start,
                              self.c.shared.base.end - self.c.shared.base.start, False)
        if self.c.handler_alive and here:
            write(self.c.stop_fd, &one, sizeof(one))
            with nogil:
                pthread_join(self.c.handler, NULL)
        self.c.handler_alive = False
        if self.registered and here:
            uffd_unregister(self.c.uffd, self.c.shared.base.start, self.c.shared.base.end - self.c.shared.base.start)
        self.registered = False
        if self.c.uffd >= 0:
            close(self.c.uffd)
            self.c.uffd = -1
        if self.c.stop_fd >= 0:
            close(self.c.stop_fd)
            self.c.stop_fd = -1
        dirtymap_free(&self.c.shared.dirty)
        self.detach()

    def __dealloc__(self):
        self.release()
        pthread_mutex_destroy(&self.c.exclusion)
