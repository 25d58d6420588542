# cython: language_level=3
"""Backend: the base of every tracking mechanism (see backend.pxd)."""
from gctrack.arena cimport Arena


cdef class Backend:
    """Base class; a subclass arms its mechanism in __cinit__ and sets ``core``.

    A backend pins its arena, so the memory stays mapped while it is armed.
    """

    cdef int attach(self, object arena) except -1:
        (<Arena?>arena).pin()
        self.arena = arena
        return 0

    cdef void detach(self) noexcept:
        cdef Arena arena = <Arena?>self.arena if self.arena is not None else None
        self.arena = None
        if arena is not None:
            arena.unpin()

    cdef void release(self) noexcept:
        self.detach()

    def close(self):
        """Disarm and free the mechanism. Idempotent."""
        self.core = NULL
        self.release()
