"""Exact dirty sets from the pagemap_scan backend, and the Tracker's contract."""
import ctypes
import errno
import mmap
import os

import numpy
import pytest
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

import gctrack
from conftest import reported_pages, require, write_pages
from gctrack.testing import NativeWriters


def pages_of(cards, arena) -> set[int]:
    """Pages of ``arena`` whose cards are all dirty in a page-or-finer table."""
    per_page = arena.page_size // cards.card_size
    dirty = set((cards.indices() // per_page).tolist())
    return dirty


# ---- exact dirty sets ------------------------------------------------------

def test_one_byte_marks_exactly_its_page(tracker, arena):
    numpy.asarray(arena)[5 * arena.page_size + 17] = 1
    assert reported_pages(tracker.scan(), arena) == {5}


def test_write_across_a_page_boundary_marks_both_pages(tracker, arena):
    numpy.asarray(arena)[8 * arena.page_size - 2: 8 * arena.page_size + 2] = 1
    assert reported_pages(tracker.scan(), arena) == {7, 8}


@pytest.mark.parametrize("k", [2, 3, 7, 64])
def test_every_kth_page(tracker, arena, k):
    written = set(range(0, arena.num_pages, k))
    write_pages(arena, written)
    regions = tracker.scan()
    assert reported_pages(regions, arena) == written
    assert len(regions) == len(written)        # isolated pages: one region each


def test_all_pages_come_back_as_one_region(tracker, arena):
    numpy.asarray(arena)[:] = 1
    regions = tracker.scan()
    assert len(regions) == 1
    assert (int(regions[0]["start"]), int(regions[0]["end"])) == (arena.address, arena.address + arena.size)
    assert regions[0]["categories"] == 2     # PAGE_IS_WRITTEN


def test_nothing_written_reports_nothing(tracker, arena):
    assert len(tracker.scan()) == 0
    cards = gctrack.CardTable.for_arena(arena)
    stats = tracker.collect(cards)
    assert (stats.pages, stats.regions, cards.count()) == (0, 0, 0)


def test_reads_mark_nothing(tracker, arena):
    assert int(numpy.asarray(arena)[::arena.page_size].sum()) == 0
    assert len(tracker.scan()) == 0


def test_the_first_write_to_a_never_touched_page_is_reported(tracker, arena):
    """WP_UNPOPULATED: unpopulated pages are armed too."""
    numpy.asarray(arena)[200 * arena.page_size] = 1
    assert reported_pages(tracker.scan(), arena) == {200}


# ---- the re-arm rule ---------------------------------------------------------

def test_a_page_is_reported_once_per_write(tracker, arena):
    view = numpy.asarray(arena)
    view[3 * arena.page_size] = 1
    assert reported_pages(tracker.scan(), arena) == {3}
    assert reported_pages(tracker.scan(), arena) == set()
    view[3 * arena.page_size] = 2
    assert reported_pages(tracker.scan(), arena) == {3}
    assert reported_pages(tracker.scan(), arena) == set()


def test_reset_false_reports_without_rearming(tracker, arena):
    numpy.asarray(arena)[9 * arena.page_size] = 1
    assert reported_pages(tracker.scan(reset=False), arena) == {9}
    cards = gctrack.CardTable.for_arena(arena)
    assert tracker.collect(cards, reset=False).pages == 1
    assert reported_pages(tracker.scan(), arena) == {9}
    assert reported_pages(tracker.scan(), arena) == set()


def test_tracker_reset_forgets_every_write(tracker, arena):
    write_pages(arena, range(0, 100, 3))
    tracker.reset()
    assert len(tracker.scan()) == 0
    write_pages(arena, {50})
    assert reported_pages(tracker.scan(), arena) == {50}


# ---- writers other than the main thread ---------------------------------------

def test_writes_from_native_threads(tracker, arena):
    pages = [list(range(0, 128, 2)), list(range(129, 256, 4))]
    offsets = [numpy.array(p) * arena.page_size + 11 for p in pages]
    with NativeWriters(arena, offsets):
        pass
    assert reported_pages(tracker.scan(), arena) == set(pages[0]) | set(pages[1])


def read_from_pipe(arena, offset, data):
    """os.readv() ``data`` into the arena at ``offset``: a write made by the kernel."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, data)
    os.close(write_fd)
    buf = memoryview(arena)[offset: offset + len(data)]
    try:
        return os.readv(read_fd, [buf])
    finally:
        buf.release()
        os.close(read_fd)


def test_writes_by_the_kernel_are_reported(tracker, arena):
    """read() into the arena is a kernel write: its pages come back dirty.
    (mprotect, and uffd_sync without the privilege for a full userfaultfd,
    need record() first: the next test.)"""
    if tracker.backend == "mprotect" or "EFAULT" in getattr(tracker.backend_object, "kernel_writes", ""):
        pytest.skip(f"{tracker.backend} refuses kernel writes into armed pages")
    data = os.urandom(3 * arena.page_size)
    assert read_from_pipe(arena, 10 * arena.page_size + 100, data) == len(data)
    assert reported_pages(tracker.scan(), arena) == {10, 11, 12, 13}
    assert bytes(numpy.asarray(arena)[10 * arena.page_size + 100:][:len(data)]) == data


def test_kernel_writes_into_an_mprotect_arena_need_record_first(arena):
    require("mprotect")
    with gctrack.Tracker(arena, backend="mprotect") as t:
        data = os.urandom(2 * arena.page_size)
        with pytest.raises(OSError) as info:
            read_from_pipe(arena, 40 * arena.page_size, data)
        assert info.value.errno == errno.EFAULT
        assert reported_pages(t.scan(), arena) == set()
        t.record(arena.address + 40 * arena.page_size, len(data))    # the way around it
        assert read_from_pipe(arena, 40 * arena.page_size, data) == len(data)
        assert reported_pages(t.scan(), arena) == {40, 41}
        assert bytes(numpy.asarray(arena)[40 * arena.page_size:][:len(data)]) == data


def test_record_reports_the_range_on_every_backend(tracker, arena):
    tracker.record(arena.address + 3 * arena.page_size + 10, arena.page_size)
    tracker.record(arena.address + 60 * arena.page_size, 0)
    assert reported_pages(tracker.scan(), arena) == {3, 4}
    assert numpy.asarray(arena).sum() == 0, "record() changes no byte"


def test_a_failed_system_call_marks_nothing(tracker, arena):
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    buf = memoryview(arena)[20 * arena.page_size: 21 * arena.page_size]
    with pytest.raises(BlockingIOError):
        os.readv(read_fd, [buf])
    del buf
    os.close(read_fd)
    os.close(write_fd)
    assert len(tracker.scan()) == 0


def discard(arena, first_page, count):
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.madvise(ctypes.c_void_p(arena.address + first_page * arena.page_size),
                      ctypes.c_size_t(count * arena.page_size), mmap.MADV_DONTNEED)
    assert rc == 0, os.strerror(ctypes.get_errno())


def test_discarded_pages_are_reported_written_by_pagemap_scan(arena):
    """MADV_DONTNEED drops the pages and their write-protect markers: the
    kernel reports them as written, so a collector rescans them (documented)."""
    require("pagemap_scan")
    tracker = gctrack.Tracker(arena, backend="pagemap_scan")
    write_pages(arena, range(30, 33))
    tracker.scan()
    discard(arena, 30, 3)
    assert not numpy.asarray(arena)[30 * arena.page_size: 33 * arena.page_size].any()
    assert reported_pages(tracker.scan(), arena) == {30, 31, 32}
    tracker.close()


def test_tracker_discard_reports_and_rearms_on_every_backend(tracker, arena):
    write_pages(arena, range(30, 33))
    tracker.scan()
    tracker.discard(arena.address + 30 * arena.page_size, 3 * arena.page_size)
    assert not numpy.asarray(arena)[30 * arena.page_size: 33 * arena.page_size].any()
    assert reported_pages(tracker.scan(), arena) == {30, 31, 32}
    write_pages(arena, {31})
    assert reported_pages(tracker.scan(), arena) == {31}
    with pytest.raises(ValueError, match="page-aligned"):
        tracker.discard(arena.address + 1, arena.page_size)


def test_a_raw_discard_unarms_uffd_sync_pages_until_recorded(arena):
    """The documented uffd_sync caveat: the kernel drops the discarded pages'
    write-protect markers and says nothing, so record() (or discard()) them."""
    require("uffd_sync")
    with gctrack.Tracker(arena, backend="uffd_sync") as t:
        discard(arena, 30, 3)
        write_pages(arena, {31})
        assert reported_pages(t.scan(), arena) == set()
        t.record(arena.address + 30 * arena.page_size, 3 * arena.page_size)
        assert reported_pages(t.scan(), arena) == {30, 31, 32}
        write_pages(arena, {32})
        assert reported_pages(t.scan(), arena) == {32}


# ---- pagination: many regions, small vectors, max_pages -----------------------

def test_more_than_512_regions_in_one_pass(page_size, backend):
    with gctrack.Arena(4096 * page_size) as a, gctrack.Tracker(a, backend=backend) as t:
        written = set(range(0, a.num_pages, 2))            # 2048 separate regions
        write_pages(a, written)
        cards = gctrack.CardTable.for_arena(a, card_size=page_size)
        stats = t.collect(cards)
        assert (stats.regions, stats.pages) == (2048, 2048)
        assert pages_of(cards, a) == written
        assert len(t.scan()) == 0


@pytest.mark.parametrize("vector_len", [1, 2, 7, 100])
def test_a_small_output_vector_loses_nothing(arena, vector_len):
    """PAGEMAP_SCAN's output vector fills: the pass resumes at walk_end."""
    require("pagemap_scan")
    with gctrack.Tracker(arena, backend="pagemap_scan", vector_len=vector_len) as t:
        written = set(range(1, arena.num_pages, 3)) | set(range(100, 140))
        write_pages(arena, written)
        regions = t.scan()
        assert reported_pages(regions, arena) == written
        numpy.testing.assert_array_equal(numpy.sort(regions["start"]), regions["start"])
        write_pages(arena, written)
        cards = gctrack.CardTable.for_arena(arena, card_size=64)
        stats = t.collect(cards)
        assert stats.calls >= -(-stats.regions // vector_len)
        assert pages_of(cards, arena) == written
        assert len(t.scan()) == 0


@pytest.mark.parametrize("max_pages", [1, 5, 64])
def test_max_pages_reports_the_first_pages_and_keeps_the_rest(arena, backend, max_pages):
    with gctrack.Tracker(arena, backend=backend, vector_len=4) as t:
        written = sorted(set(range(0, 200, 3)) | set(range(40, 60)))
        write_pages(arena, written)
        seen = []
        while True:
            regions = t.scan(max_pages=max_pages)
            pages = sorted(reported_pages(regions, arena))
            assert len(pages) <= max_pages
            if not pages:
                break
            seen.extend(pages)
        assert seen == written            # in address order, each exactly once


def test_max_pages_without_reset_reports_but_keeps(tracker, arena):
    write_pages(arena, range(10))
    assert len(reported_pages(tracker.scan(reset=False, max_pages=4), arena)) == 4
    assert reported_pages(tracker.scan(), arena) == set(range(10))


# ---- card sizes ------------------------------------------------------------------

@pytest.mark.parametrize("card_size", [64, 128, 512, 4096, 8192, 65536])
def test_card_sizes_map_onto_pages(arena, tracker, card_size):
    pages = {0, 1, 17, 18, 19, 100, 255}
    write_pages(arena, pages, offset_in_page=arena.page_size - 1)
    cards = gctrack.CardTable.for_arena(arena, card_size)
    stats = tracker.collect(cards)
    assert stats.pages == len(pages)
    expected = set()
    for page in pages:
        first = page * arena.page_size // card_size
        last = ((page + 1) * arena.page_size - 1) // card_size
        expected.update(range(first, last + 1))
    assert set(cards.indices().tolist()) == expected


def test_collect_ors_into_existing_cards(tracker, arena):
    cards = gctrack.CardTable.for_arena(arena)
    cards.mark_range(arena.address, 1)
    write_pages(arena, {50})
    tracker.collect(cards)
    assert cards.is_dirty(arena.address) and cards.is_dirty(arena.address + 50 * arena.page_size)


def test_a_table_wider_than_the_arena_is_fine(tracker, arena):
    cards = gctrack.CardTable(arena.address - 4 * arena.page_size, arena.size + 8 * arena.page_size)
    write_pages(arena, {0})
    tracker.collect(cards)
    assert cards.indices().tolist()[0] == 4 * arena.page_size // cards.card_size


# ---- the property --------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sets(st.integers(0, 255), max_size=256), min_size=1, max_size=4),
       st.sampled_from([1, 3, 16, 4096]))
def test_reported_equals_written_at_page_granularity(arena, backend, rounds, vector_len):
    with gctrack.Tracker(arena, backend=backend, vector_len=vector_len) as t:
        for written in rounds:
            write_pages(arena, written, offset_in_page=len(written) % arena.page_size)
            assert reported_pages(t.scan(), arena) == written


# ---- misuse ---------------------------------------------------------------------

def test_bad_inputs(tracker, arena, page_size, backend):
    with pytest.raises(TypeError):
        tracker.collect(numpy.zeros(8, numpy.uint64))
    with gctrack.Arena(page_size) as other:
        with pytest.raises(ValueError, match="outside the card table"):
            tracker.collect(gctrack.CardTable.for_arena(other))
    with pytest.raises(ValueError):
        tracker.scan(max_pages=-1)
    with pytest.raises(TypeError):
        tracker.scan(max_pages="3")
    with pytest.raises(TypeError):
        gctrack.Tracker(None)
    for bad, error in ((arena.address - 1, ValueError), (arena.address + arena.size, ValueError),
                       (-1, ValueError), (1.5, TypeError)):
        with pytest.raises(error):
            tracker.record(bad, 1)
    with pytest.raises(ValueError):
        tracker.record(arena.address, -1)
    for interval in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            tracker.start(interval)
    assert not tracker.running


@pytest.mark.parametrize("second", ["pagemap_scan", "mprotect", "uffd_sync", "software"])
def test_a_second_tracker_on_the_same_arena_is_refused(tracker, arena, backend, second):
    require(second)
    with pytest.raises(gctrack.TrackerError) as info:
        gctrack.Tracker(arena, backend=second)
    assert info.value.errno == errno.EBUSY and backend in str(info.value)
    write_pages(arena, {1})                        # the first tracker is undisturbed
    assert reported_pages(tracker.scan(), arena) == {1}


def test_closed_tracker_refuses_use_and_close_is_idempotent(arena, backend):
    t = gctrack.Tracker(arena, backend=backend)
    t.close()
    t.close()
    assert t.closed and "closed" in repr(t)
    cards = gctrack.CardTable.for_arena(arena)
    for use in (lambda: t.collect(cards), t.scan, t.reset, t.start, t.stop,
                lambda: t.drain(cards), lambda: t.record(arena.address, 1)):
        with pytest.raises(ValueError, match="closed"):
            use()


def test_after_close_the_arena_is_writable_and_can_be_tracked_again(arena, backend):
    with gctrack.Tracker(arena, backend=backend):
        pass
    numpy.asarray(arena)[:] = 3                     # no fault, no hang
    with gctrack.Tracker(arena, backend=backend) as again:
        write_pages(arena, {4})
        assert reported_pages(again.scan(), arena) == {4}


def test_backend_instance_must_belong_to_the_arena(arena, page_size):
    require("pagemap_scan")
    from gctrack.pagemap_scan import PagemapScanBackend
    with gctrack.Arena(page_size) as other:
        backend = PagemapScanBackend(other)
        with pytest.raises(ValueError, match="different arena"):
            gctrack.Tracker(arena, backend=backend)
        with gctrack.Tracker(other, backend=backend) as t:
            assert t.backend == "pagemap_scan"
            with pytest.raises(ValueError, match="already belongs"):
                gctrack.Tracker(other, backend=backend)


def test_discard_refuses_a_range_that_is_not_whole_pages(tracker, arena):
    """MADV_DONTNEED frees whole pages: bytes outside [addr, addr + length)
    would be zeroed silently."""
    view = numpy.asarray(arena)
    view[10 * arena.page_size:11 * arena.page_size] = 9
    with pytest.raises(ValueError, match="page-aligned"):
        tracker.discard(arena.address + 10 * arena.page_size, 10)
    assert (view[10 * arena.page_size:11 * arena.page_size] == 9).all()


@pytest.mark.parametrize("vector_len", [0, -1, 2**61, 2**64, 2**24 + 1])
def test_vector_len_is_checked_for_overflow(arena, vector_len):
    require("pagemap_scan")
    with pytest.raises(ValueError, match="vector_len"):
        gctrack.Tracker(arena, backend="pagemap_scan", vector_len=vector_len)
    with pytest.raises(TypeError):
        gctrack.Tracker(arena, backend="pagemap_scan", vector_len=1.5)
    with gctrack.Tracker(arena, backend="pagemap_scan", vector_len=1) as tracker:
        numpy.asarray(arena)[::2 * arena.page_size] = 1       # 128 separate regions
        assert len(tracker.scan()) == arena.num_pages // 2
