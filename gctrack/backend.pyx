# cython: language_level=3
"""Backend: the base of every tracking mechanism (see backend.pxd)."""
import errno

from libc.stdint cimport uintptr_t
from posix.unistd cimport getpid

from gctrack.arena cimport Arena

from gctrack.errors import TrackerError


cdef object arena_blocker(Arena arena, str name, bint beside_software):
    """Whoever tracks ``arena`` already and rules this backend out, or None."""
    verifier = None if arena.verified_by is None else f"a BarrierVerifier ({arena.verified_by})"
    if beside_software:          # a verifier: beside a software tracker only
        if verifier is not None or arena.armed_by in (None, "software"):
            return verifier
        return arena.armed_by
    if arena.armed_by is not None or name == "software":
        return arena.armed_by
    return verifier              # a kernel backend would arm the verifier's pages


cdef class Backend:
    """Base class; a subclass arms its mechanism in __cinit__ and sets ``core``.

    A backend pins its arena, so the memory stays mapped while it is armed.
    """

    cdef int attach(self, object arena, BackendCore *core, const char *name,
                    size_t granularity, bint beside_software=False) except -1:
        """Name the backend, claim and pin the arena (one armed backend per
        arena), and point ``core`` at it: the subclass fills in the rest.

        ``beside_software`` is a BarrierVerifier's registration: it may share
        the arena with a software tracker (the barrier it checks), and with
        nothing else, since the kernel backends would arm the same pages."""
        cdef Arena claimed = <Arena?>arena
        core.name = name
        self.name = name.decode()
        claimed.check_open()
        busy = arena_blocker(claimed, self.name, beside_software)
        if busy is not None:
            raise TrackerError(errno.EBUSY, f"arming {self.name}",
                               f"the arena is already tracked by {busy}")
        claimed.pin()
        if beside_software:
            claimed.verified_by = self.name
        else:
            claimed.armed_by = self.name
        self.beside_software = beside_software
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
            if self.beside_software:
                arena.verified_by = None
            else:
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
