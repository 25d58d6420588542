"""WriteWatch: Windows' GetWriteWatch / ResetWriteWatch semantics over an arena.

PAGEMAP_SCAN was merged so that Wine could implement exactly these calls; this
is the same contract for code that wants page-level dirty tracking without a
card table.
"""
from __future__ import annotations

import operator

import numpy

from gctrack.arena import Arena
from gctrack.tracker import Tracker


def page_addresses(regions: numpy.ndarray, page_size: int) -> numpy.ndarray:
    """Every page address covered by REGION_DTYPE regions, ascending, as uint64."""
    starts = regions["start"]
    counts = ((regions["end"] - starts) // page_size).astype(numpy.int64)
    first_of_region = numpy.repeat(numpy.cumsum(counts) - counts, counts)
    index = numpy.arange(int(counts.sum()), dtype=numpy.uint64) - first_of_region.astype(numpy.uint64)
    return numpy.repeat(starts, counts) + index * numpy.uint64(page_size)


class WriteWatch:
    """Page-granular write watching over ``arena``.

    ``get()`` returns the addresses of the pages written since they were last
    reset; ``reset()`` re-arms pages without reading them. Any page-granular
    backend works (not ``software``, whose cards are finer than a page).

    Discarding memory (MADV_DONTNEED) drops the pages and, with them, the
    kernel's write-protect state: the pagemap_scan backend then reports them
    as written, mprotect keeps them armed, and uffd_sync stops seeing writes to
    them until they are reset (see README, Backends). Tracker.discard() does
    the right thing on every backend.
    """

    def __init__(self, arena: Arena, *, backend="auto") -> None:
        self._tracker = Tracker(arena, backend=backend)
        if self._tracker.granularity != arena.page_size:
            self._tracker.close()
            raise ValueError(f"write-watch needs a page-granular backend, not {backend!r}")

    @property
    def granularity(self) -> int:
        """The page size: the unit of every address get() returns."""
        return self._tracker.arena.page_size

    @property
    def tracker(self) -> Tracker:
        """The Tracker underneath (its backend, statistics and record())."""
        return self._tracker

    def get(self, addr: int | None = None, size: int | None = None, *,
            max_count: int | None = None, reset: bool = False) -> numpy.ndarray:
        """Addresses of the pages written in [addr, addr + size), ascending.

        The default range is the whole arena; an unaligned ``addr`` is rounded
        down to its page and the end rounded up. With ``reset=True`` exactly
        the pages returned are re-armed, atomically with reading them. When
        more than ``max_count`` pages are dirty, the first ``max_count`` are
        returned and the others stay dirty for the next call.
        """
        if max_count is not None:
            max_count = operator.index(max_count)
            if max_count <= 0:
                raise ValueError(f"max_count must be positive, got {max_count}")
        regions = self._tracker.scan(reset=bool(reset), max_pages=max_count or 0,
                                     addr=addr, size=size)
        return page_addresses(regions, self.granularity)

    def reset(self, addr: int | None = None, size: int | None = None) -> None:
        """Re-arm [addr, addr + size) (default: the whole arena) without reading it."""
        self._tracker.reset(addr, size)

    def close(self) -> None:
        self._tracker.close()

    def __repr__(self) -> str:
        state = "closed" if self._tracker.closed else "watching"
        return f"<gctrack.WriteWatch {self._tracker.backend} over {self._tracker.arena!r}, {state}>"

    def __enter__(self) -> WriteWatch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
