# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Arena: the page-aligned anonymous mapping whose writes gctrack tracks."""
import operator

import numpy

from cpython.buffer cimport PyBuffer_FillInfo
from libc.errno cimport errno, EINVAL
from libc.stdint cimport uintptr_t
from posix.mman cimport (mmap, munmap, madvise, MAP_FAILED, PROT_READ, PROT_WRITE,
                         MAP_PRIVATE, MAP_ANONYMOUS)
from posix.unistd cimport sysconf, _SC_PAGESIZE

from gctrack.errors import TrackerError

cdef extern from "<sys/mman.h>" nogil:
    enum: MADV_HUGEPAGE
    enum: MADV_NOHUGEPAGE
    enum: MADV_POPULATE_WRITE

cdef size_t HUGE_PAGE_SIZE = 2 * 1024 * 1024

# Larger than any address space, and small enough that rounding up, the
# alignment slack and the buffer length (a Py_ssize_t) can never overflow.
MAX_ARENA_SIZE = 1 << 62


cdef size_t round_up(size_t value, size_t multiple) noexcept nogil:
    return (value + multiple - 1) // multiple * multiple


cdef class Arena:
    """Arena(size, *, huge_pages=False)
--

Page-aligned anonymous memory, writable through a zero-copy buffer.

    ``numpy.asarray(arena)`` is a uint8 view of the whole arena; ``view()``
    gives typed views. ``close()`` makes the arena unusable at once, but the
    memory is unmapped only when the last exported view and the last tracker
    are gone, so no view can ever point at unmapped memory.
    """

    def __cinit__(self, size, *, huge_pages=False):
        requested = operator.index(size)
        if requested <= 0:
            raise ValueError(f"arena size must be positive, got {requested}")
        if requested > MAX_ARENA_SIZE:
            raise ValueError(f"arena size must be at most {MAX_ARENA_SIZE} bytes, got {requested}")
        self.page_size = <size_t>sysconf(_SC_PAGESIZE)
        self.huge_pages = bool(huge_pages)
        align = HUGE_PAGE_SIZE if self.huge_pages else self.page_size
        self.size = round_up(requested, align)
        self.map_aligned(align)
        self.advise()

    cdef int map_aligned(self, size_t align) except -1:
        # Over-map by one alignment unit so a huge-page arena can start on a
        # 2 MiB boundary, then give back the slack on both sides.
        self.map_size = self.size + (align if align > self.page_size else 0)
        cdef void *p = mmap(NULL, self.map_size, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if p == MAP_FAILED:
            raise TrackerError(errno, "mmap", f"{self.map_size} bytes")
        cdef uintptr_t start = round_up(<uintptr_t>p, align)
        cdef size_t head = start - <uintptr_t>p
        cdef size_t tail = self.map_size - head - self.size
        if head:
            munmap(p, head)
        if tail:
            munmap(<void *>(start + self.size), tail)
        self.map_base = <void *>start
        self.map_size = self.size
        self.base = <char *>start
        return 0

    cdef int advise(self) except -1:
        advice = MADV_HUGEPAGE if self.huge_pages else MADV_NOHUGEPAGE
        if madvise(self.base, self.size, advice) != 0 and errno != EINVAL:
            # EINVAL: a kernel without THP; there is nothing to advise.
            raise TrackerError(errno, "madvise", "huge-page advice")
        return 0

    def __dealloc__(self):
        self.unmap()

    cdef int check_open(self) except -1:
        if self.closed:
            raise ValueError("arena is closed")
        return 0

    cdef int pin(self) except -1:
        self.check_open()
        self.pins += 1
        return 0

    cdef void unpin(self) noexcept:
        self.pins -= 1
        if self.closed and self.pins == 0:
            self.unmap()

    cdef void unmap(self) noexcept:
        if self.map_base != NULL:
            munmap(self.map_base, self.map_size)
            self.map_base = NULL
            self.base = NULL

    def close(self):
        """Close the arena. Idempotent; unmapping waits for views and trackers."""
        self.closed = True
        if self.pins == 0:
            self.unmap()

    def __enter__(self):
        self.check_open()
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        self.check_open()
        PyBuffer_FillInfo(buffer, self, self.base, self.size, 0, flags)
        self.pins += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self.unpin()

    def __array__(self, dtype=None, copy=None):
        # numpy turns an object whose buffer export fails into a 0-d object
        # array; this makes numpy.asarray(closed_arena) raise instead.
        view = self.view(numpy.uint8)
        if dtype is not None:
            return view.astype(dtype, copy=bool(copy))
        return view.copy() if copy else view

    @property
    def address(self):
        """Start address of the arena (page-aligned)."""
        self.check_open()
        return <uintptr_t>self.base

    @property
    def num_pages(self):
        return self.size // self.page_size

    def view(self, dtype, offset=0, count=-1):
        """A writable, zero-copy numpy view of ``count`` items from ``offset``."""
        dtype = numpy.dtype(dtype)
        if dtype.itemsize == 0:
            raise ValueError(f"cannot view the arena as {dtype}: its items have no size")
        offset = operator.index(offset)
        count = operator.index(count)
        if offset < 0 or offset > self.size:
            raise ValueError(f"offset {offset} is outside the arena of {self.size} bytes")
        if offset % dtype.itemsize:
            raise ValueError(f"offset {offset} is not aligned to {dtype} ({dtype.itemsize} bytes)")
        if count < -1:
            raise ValueError(f"count must be -1 (all) or >= 0, got {count}")
        available = (self.size - offset) // dtype.itemsize
        if count > available:
            raise ValueError(f"{count} items of {dtype} do not fit after offset {offset}")
        return numpy.frombuffer(self, dtype=dtype, count=count, offset=offset)

    def prefault(self):
        """Populate every page writable now (MADV_POPULATE_WRITE).

        First touch costs microseconds per page; do it before timing anything.
        Under an armed tracker this marks every page written.
        """
        self.check_open()
        cdef int rc
        with nogil:
            rc = madvise(self.base, self.size, MADV_POPULATE_WRITE)
        if rc != 0:
            if errno != EINVAL:
                raise TrackerError(errno, "madvise", "MADV_POPULATE_WRITE")
            self.touch_every_page()   # kernels before 5.14

    cdef void touch_every_page(self) noexcept nogil:
        cdef size_t offset = 0
        cdef volatile char *p = self.base
        while offset < self.size:
            p[offset] = p[offset]
            offset += self.page_size

    def __repr__(self):
        state = "closed" if self.closed else f"at {<uintptr_t>self.base:#x}"
        return f"<gctrack.Arena {self.size} bytes {state}>"
