# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Soft-dirty bits: /proc/self/clear_refs "4" and bit 55 of /proc/self/pagemap.

Needs CONFIG_MEM_SOFT_DIRTY (the constructor checks, on a scratch page, and
raises UnsupportedError without it). Two limits of the mechanism,
not of this code:

- clear_refs resets the soft-dirty bits of the whole process. So that two
  soft-dirty trackers stay correct, a tracker about to clear first folds the
  bits of every other soft-dirty arena into that arena's own stash.
- Reading the bits and clearing them are two steps, not one: a write that
  lands between them is lost. Run passes with the writers stopped (a
  stop-the-world remark, as bdwgc's SOFT_VDB does). Tracker.start() refuses
  this backend for that reason.
"""
from libc.errno cimport errno, EIO, ENOSPC
from libc.stdint cimport uint64_t, uintptr_t
from posix.fcntl cimport open as c_open, O_RDONLY, O_WRONLY, O_CLOEXEC
from posix.mman cimport mmap, munmap, MAP_FAILED, PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS
from posix.unistd cimport access, close, pread, write, W_OK

from gctrack.arena cimport Arena
from gctrack.backend cimport Backend, BackendCore, PassCounts, RegionSink, no_preparation
from gctrack.dirtymap cimport (DirtyMap, dirtymap_init, dirtymap_free, dirtymap_clear,
                               dirtymap_pass, dirtymap_record, dirtymap_record_range)
from gctrack.linux cimport GCT_PM_ENTRY_SOFT_DIRTY
from gctrack.threads cimport pthread_mutex_t, pthread_mutex_lock, pthread_mutex_unlock

from gctrack.errors import TrackerError, UnsupportedError


cdef extern from *:
    """
    #include <pthread.h>
    static pthread_mutex_t gct_soft_dirty_lock = PTHREAD_MUTEX_INITIALIZER;
    """
    pthread_mutex_t registry_lock "gct_soft_dirty_lock"

cdef enum:
    MAX_TRACKERS = 64
    ENTRY_CHUNK = 4096          # pagemap entries read per pread


ctypedef struct SoftDirtyCore:
    BackendCore base            # first, so a BackendCore* is a SoftDirtyCore*
    DirtyMap stash              # pages seen soft-dirty and not yet reported
    int pagemap_fd


# Every live soft-dirty tracker in the process, so that a clear can save the
# others' bits first; guarded by registry_lock.
cdef SoftDirtyCore *registry[MAX_TRACKERS]


cdef int fold_soft_dirty(SoftDirtyCore *core) noexcept nogil:
    """Record every page whose soft-dirty bit is set into core's stash."""
    cdef uint64_t entries[ENTRY_CHUNK]
    cdef uint64_t page_shift = core.stash.unit_shift
    cdef uint64_t first = core.base.start >> page_shift
    cdef uint64_t count = (core.base.end - core.base.start) >> page_shift
    cdef uint64_t done = 0, n, i
    cdef long got
    while done < count:
        n = min(count - done, <uint64_t>ENTRY_CHUNK)
        got = pread(core.pagemap_fd, entries, n * 8, (first + done) * 8)
        if got != <long>(n * 8):
            core.base.failed_operation = "reading /proc/self/pagemap"
            return -errno if got < 0 else -EIO
        for i in range(n):
            if entries[i] & GCT_PM_ENTRY_SOFT_DIRTY:
                dirtymap_record(&core.stash, core.base.start + ((done + i) << page_shift))
        done += n
    return 0


cdef int clear_process_soft_dirty(SoftDirtyCore *core) noexcept nogil:
    """Save every other tracker's bits, then clear_refs "4" (registry_lock held)."""
    cdef int i, rc, fd
    for i in range(MAX_TRACKERS):
        if registry[i] != NULL and registry[i] != core:
            rc = fold_soft_dirty(registry[i])
            if rc:
                core.base.failed_operation = registry[i].base.failed_operation
                return rc
    fd = c_open(b"/proc/self/clear_refs", O_WRONLY | O_CLOEXEC)
    if fd < 0 or write(fd, b"4", 1) != 1:
        rc = -errno
        if fd >= 0:
            close(fd)
        core.base.failed_operation = "writing /proc/self/clear_refs"
        return rc
    close(fd)
    return 0


cdef int soft_dirty_pass(BackendCore *base, uintptr_t start, uintptr_t end, bint reset,
                         uint64_t max_pages, RegionSink *sink, PassCounts *counts) noexcept nogil:
    cdef SoftDirtyCore *core = <SoftDirtyCore *>base
    pthread_mutex_lock(&registry_lock)
    cdef int rc = fold_soft_dirty(core)
    counts.calls += 1
    if rc == 0 and reset:
        rc = clear_process_soft_dirty(core)
        counts.calls += 1
    if rc == 0:
        rc = dirtymap_pass(&core.stash, start, end, reset, max_pages, sink, counts,
                           &base.failed_operation)
    pthread_mutex_unlock(&registry_lock)
    return rc


cdef int rearm_range(BackendCore *base, uintptr_t start, uintptr_t end) noexcept nogil:
    """Clearing is process-wide, so first save this tracker's bits too: the
    pages outside [start, end) stay dirty in the stash."""
    cdef SoftDirtyCore *core = <SoftDirtyCore *>base
    pthread_mutex_lock(&registry_lock)
    cdef int rc = fold_soft_dirty(core)
    if rc == 0:
        rc = clear_process_soft_dirty(core)
    dirtymap_clear(&core.stash, start, end)
    pthread_mutex_unlock(&registry_lock)
    return rc


cdef int record_range(BackendCore *base, uintptr_t start, uintptr_t end) noexcept nogil:
    """Put [start, end) in the stash: the next pass reports it whatever the
    page-table bits say (a write through a pinned page sets none)."""
    if start < end:
        dirtymap_record_range(&(<SoftDirtyCore *>base).stash, start, end)
    return 0


cdef bint soft_dirty_tracked(int pagemap_fd, size_t page_size) noexcept nogil:
    """Whether this kernel tracks soft-dirty bits: a freshly written private
    page shows bit 55 wherever it does. Uses a scratch page, so that nothing
    of the process is cleared to find out."""
    cdef char *page = <char *>mmap(NULL, page_size, PROT_READ | PROT_WRITE,
                                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    cdef uint64_t entry = 0
    if page == <char *>MAP_FAILED:
        return False
    page[0] = 1
    if pread(pagemap_fd, &entry, 8, (<uintptr_t>page // page_size) * 8) != 8:
        entry = 0
    munmap(page, page_size)
    return (entry & GCT_PM_ENTRY_SOFT_DIRTY) != 0


cdef int register_core(SoftDirtyCore *core) noexcept nogil:
    cdef int i, slot = -1
    pthread_mutex_lock(&registry_lock)
    for i in range(MAX_TRACKERS):
        if registry[i] == NULL:
            registry[i] = core
            slot = i
            break
    pthread_mutex_unlock(&registry_lock)
    return slot


cdef void unregister_core(SoftDirtyCore *core) noexcept nogil:
    cdef int i
    pthread_mutex_lock(&registry_lock)
    for i in range(MAX_TRACKERS):
        if registry[i] == core:
            registry[i] = NULL
    pthread_mutex_unlock(&registry_lock)


cdef class SoftDirtyBackend(Backend):
    """SoftDirtyBackend(arena, vector_len=None)
--

Soft-dirty page bits; passes are not atomic (see the module docstring)."""
    cdef SoftDirtyCore c
    cdef bint registered

    def __cinit__(self, Arena arena not None, vector_len=None):
        self.c.pagemap_fd = -1
        self.attach(arena, &self.c.base, b"soft_dirty", arena.page_size)
        self.c.base.run_pass = soft_dirty_pass
        self.c.base.rearm = rearm_range
        self.c.base.record = record_range
        self.c.base.begin_external = no_preparation
        self.c.base.end_external = record_range
        cdef unsigned shift = arena.page_size.bit_length() - 1
        cdef int rc
        try:
            if dirtymap_init(&self.c.stash, self.c.base.start, arena.size, shift, shift):
                raise MemoryError()
            self.c.pagemap_fd = c_open(b"/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
            if self.c.pagemap_fd < 0:
                raise UnsupportedError("soft_dirty", "cannot open /proc/self/pagemap: "
                                       "no procfs, or CONFIG_PROC_PAGE_MONITOR is off", errno)
            if not soft_dirty_tracked(self.c.pagemap_fd, arena.page_size):
                raise UnsupportedError("soft_dirty", "a written page never shows bit 55: "
                                       "kernel built without CONFIG_MEM_SOFT_DIRTY")
            if access(b"/proc/self/clear_refs", W_OK) != 0:
                raise UnsupportedError("soft_dirty", "/proc/self/clear_refs is not writable",
                                       errno)
            if register_core(&self.c) < 0:
                raise TrackerError(ENOSPC, "registering a soft-dirty tracker", "at most 64")
            self.registered = True
            with nogil:
                rc = rearm_range(&self.c.base, self.c.base.start, self.c.base.end)
            if rc:
                raise TrackerError(-rc, self.c.base.failed_operation.decode())
        except BaseException:
            self.release()
            raise
        self.core = &self.c.base

    @property
    def atomic_passes(self):
        return False

    cdef void release(self) noexcept:
        if self.registered:
            unregister_core(&self.c)
            self.registered = False
        if self.c.pagemap_fd >= 0:
            close(self.c.pagemap_fd)
            self.c.pagemap_fd = -1
        dirtymap_free(&self.c.stash)
        self.detach()

    def __dealloc__(self):
        self.release()
