# cython: language_level=3
from libc.stdint cimport uintptr_t


cdef class Arena:
    """A page-aligned anonymous mapping that trackers watch."""
    cdef char *base
    cdef readonly size_t size        # bytes: the requested size rounded up to whole pages
    cdef readonly size_t page_size
    cdef void *map_base      # what munmap gets; differs from base when aligned for THP
    cdef size_t map_size
    cdef Py_ssize_t pins     # exported buffers + live trackers; unmapping waits for 0
    cdef readonly bint closed
    cdef readonly bint huge_pages
    cdef public object armed_by      # name of the backend tracking it, or None
    cdef public object verified_by   # a BarrierVerifier's pagemap_scan registration, or None

    cdef int map_aligned(self, size_t align) except -1
    cdef int advise(self) except -1
    cdef void unmap(self) noexcept
    cdef void touch_every_page(self) noexcept nogil
    cdef int check_open(self) except -1
    cdef int pin(self) except -1
    cdef void unpin(self) noexcept
