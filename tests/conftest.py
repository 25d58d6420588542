"""Shared fixtures. Tests that need a kernel mechanism skip with the probe's reason."""
from __future__ import annotations

import numpy
import pytest

import gctrack


#: (backend, writes, passes, false positives) from the race tests, summarised at the end.
RACE_RESULTS: list[tuple[str, int, int, int]] = []


def skip_reason(report) -> str:
    """The reason a skipped test gave (pytest stores (path, line, reason))."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def summarise_skips(terminalreporter) -> None:
    """One line per distinct skip reason, with its count, instead of one per test."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = skip_reason(report)
        reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        terminalreporter.write_sep("-", f"{sum(reasons.values())} skipped, by reason")
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
            terminalreporter.write_line(f"{count:>5}  {reason}")


def pytest_terminal_summary(terminalreporter):
    summarise_skips(terminalreporter)
    if not RACE_RESULTS:
        return
    terminalreporter.write_sep("-", "no-lost-writes races: false positives")
    totals: dict[str, list[int]] = {}
    for backend, writes, passes, false_positives in RACE_RESULTS:
        row = totals.setdefault(backend, [0, 0, 0])
        row[0] += writes
        row[1] += passes
        row[2] += false_positives
    for backend, (writes, passes, false_positives) in totals.items():
        terminalreporter.write_line(f"{backend:<14} {writes:>8} writes {passes:>7} passes, "
                                    f"false positives {false_positives / writes:.4%}")


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true", help="run the long stress soaks too")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="long soak: run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


#: The backends that track at page granularity through the kernel.
PAGE_BACKENDS = ["pagemap_scan", "uffd_sync", "mprotect", "soft_dirty"]
#: Those whose passes are atomic, so that they may race native writers.
RACING_BACKENDS = ["pagemap_scan", "uffd_sync", "mprotect"]
#: The backends a Heap (and so a Collector) can use.
HEAP_BACKENDS = RACING_BACKENDS + ["software"]


def require(mechanism: str) -> None:
    """Skip the calling test, with the probe's reason, unless ``mechanism`` works here."""
    support = gctrack.features().backends.get(mechanism) or getattr(gctrack.features(), mechanism)
    if not support:
        pytest.skip(f"{mechanism} unavailable: {support.reason}")


@pytest.fixture
def page_size() -> int:
    return gctrack.features().page_size


@pytest.fixture
def arena():
    with gctrack.Arena(256 * gctrack.features().page_size) as a:
        yield a


@pytest.fixture(params=PAGE_BACKENDS)
def backend(request) -> str:
    """Each page-granular backend in turn, skipped with the probe's reason where missing."""
    require(request.param)
    return request.param


@pytest.fixture(params=HEAP_BACKENDS)
def heap_backend(request) -> str:
    """Each backend a Heap can use in turn, skipped with the probe's reason where missing."""
    require(request.param)
    return request.param


@pytest.fixture
def tracker(arena, backend):
    with gctrack.Tracker(arena, backend=backend) as t:
        yield t


def reported_pages(regions, arena) -> set[int]:
    """Page numbers (within the arena) covered by REGION_DTYPE regions."""
    pages: set[int] = set()
    for start, end in zip(regions["start"].tolist(), regions["end"].tolist()):
        pages.update(range((start - arena.address) // arena.page_size,
                           (end - arena.address) // arena.page_size))
    return pages


def write_pages(arena, pages, offset_in_page: int = 0) -> None:
    """Store one byte into each of ``pages`` (page numbers within the arena)."""
    view = numpy.asarray(arena)
    index = numpy.asarray(sorted(pages), dtype=numpy.int64) * arena.page_size + offset_in_page
    view[index] += 1


# ---- reachability, computed independently from the raw heap memory ------------------

def reachable(heap) -> numpy.ndarray:
    """A bool per object: reachable from the roots, read from raw memory."""
    view = heap.view()
    shift = heap.object_size.bit_length() - 1
    limit = heap.base + heap.num_objects * heap.object_size

    def indices(addresses):
        addresses = addresses[addresses != 0]
        assert ((addresses >= heap.base) & (addresses < limit)).all(), "a reference leaves the heap"
        assert ((addresses - heap.base) % heap.object_size == 0).all(), "a misaligned reference"
        return ((addresses - heap.base) >> shift).astype(numpy.int64)

    seen = numpy.zeros(heap.num_objects, dtype=bool)
    frontier = numpy.unique(indices(heap.root_slots.copy()))
    seen[frontier] = True
    while frontier.size:
        targets = indices(view[frontier, 1:].ravel())
        frontier = numpy.unique(targets[~seen[targets]])
        seen[frontier] = True
    return seen


def allocated_mask(heap) -> numpy.ndarray:
    """A bool per object: allocated now (the side bitmap, through the API)."""
    mask = numpy.zeros(heap.num_objects, dtype=bool)
    mask[heap.allocated()] = True
    return mask


def check_nothing_reachable_was_freed(heap) -> None:
    live = allocated_mask(heap)
    lost = numpy.flatnonzero(reachable(heap) & ~live)
    assert lost.size == 0, f"{lost.size} reachable objects were freed, e.g. {lost[:5]}"


def work_done(mutators) -> dict:
    """stats() without cpu_seconds: a thread's clock still ticks for the
    microseconds between counting itself parked and sleeping."""
    return {key: value for key, value in mutators.stats().items() if key != "cpu_seconds"}
