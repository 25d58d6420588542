# cython: language_level=3
"""Backend: the base of every tracking mechanism (see backend.pxd)."""
import errno

from libc.stdint cimport uintptr_t
from posix.unistd cimport getpid

from gctrack.arena cimport Arena

from gctrack.errors import TrackerError


cdef class Backend:
    """Base class; a subclass arms its mechanism in __cinit__ and sets ``core``.

    A backend pins its arena, so the memory stays mapped while it is armed.
    """

    cdef int attach(self, object arena, BackendCore *core, const char *name,
                    size_t granularity) except -1:
        """Name the backend, claim and pin the arena (one armed backend per
        arena), and point ``core`` at it: the subclass fills in the rest."""
        cdef Arena claimed = <Arena?>arena
        core.name = name
        self.name = name.decode()
        claimed.check_open()
        if claimed.armed_by is not None:
            raise TrackerError(errno.EBUSY, f"arming {self.name}",
                               f"the arena is already tracked by {claimed.armed_by}")
        claimed.pin()
        claimed.armed_by = self.name
        self.arena = claimed
        self.owner_pid = getpid()
        core.start = <uintptr_t>claimed.base
        core.end = <uintptr_t>claimed.base + claimed.size
        core.granularity = granularity
        return 0

    cdef bint forked(self) noexcept:
        """True in a child of the process that armed this backend: its
        threads do not exist here, so there is nothing to join."""
        return self.owner_pid != 0 and getpid() != self.owner_pid

    cdef void detach(self) noexcept:
        cdef Arena arena = <Arena?>self.arena if self.arena is not None else None
        self.arena = None
        if arena is not None:
            arena.armed_by = None
            arena.unpin()

    @property
    def atomic_passes(self):
        """Whether a pass reports and re-arms atomically, so that it may race writers."""
        return True

    cdef void release(self) noexcept:
        self.detach()

    def close(self):
        """Disarm and free the mechanism. Idempotent. Refused (RuntimeError)
        while a Tracker drives it: close the Tracker, which closes this."""
        if self.claimed:
            raise RuntimeError(f"this {self.name} backend belongs to a Tracker: close the Tracker")
        self.core = NULL
        self.release()
