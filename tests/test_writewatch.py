"""GetWriteWatch / ResetWriteWatch semantics, on every page-granular backend."""
import os

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gctrack
from conftest import write_pages


@pytest.fixture
def watch(arena, backend):
    with gctrack.WriteWatch(arena, backend=backend) as w:
        yield w


def pages(addresses, arena):
    return [(int(a) - arena.address) // arena.page_size for a in addresses]


def test_granularity_is_the_page_size(watch, arena):
    assert watch.granularity == arena.page_size


def test_get_returns_ascending_page_addresses(watch, arena):
    write_pages(arena, {9, 2, 200, 3})
    got = watch.get()
    assert got.dtype == numpy.uint64
    assert pages(got, arena) == [2, 3, 9, 200]
    assert all(int(a) % arena.page_size == 0 for a in got)
    assert pages(watch.get(), arena) == [2, 3, 9, 200], "without reset nothing is re-armed"


def test_reset_true_rearms_exactly_the_pages_returned(watch, arena):
    write_pages(arena, range(10, 20))
    assert pages(watch.get(max_count=4, reset=True), arena) == [10, 11, 12, 13]
    assert pages(watch.get(), arena) == list(range(14, 20))
    assert pages(watch.get(reset=True), arena) == list(range(14, 20))
    assert len(watch.get()) == 0


def test_reset_rearms_a_range_without_reading_it(watch, arena):
    write_pages(arena, {5, 6, 7, 50})
    watch.reset(arena.address + 6 * arena.page_size, 2 * arena.page_size)
    assert pages(watch.get(), arena) == [5, 50]
    watch.reset()
    assert len(watch.get()) == 0


def test_a_range_limits_what_is_returned_and_reset(watch, arena):
    write_pages(arena, {1, 30, 31, 32, 100})
    got = watch.get(arena.address + 30 * arena.page_size, 3 * arena.page_size, reset=True)
    assert pages(got, arena) == [30, 31, 32]
    assert pages(watch.get(), arena) == [1, 100]


def test_unaligned_ranges_round_outwards_to_pages(watch, arena):
    write_pages(arena, {5, 6, 7})
    assert pages(watch.get(arena.address + 5 * arena.page_size + 100, 10), arena) == [5]
    assert pages(watch.get(arena.address + 5 * arena.page_size + arena.page_size - 1, 2), arena) == [5, 6]


def test_a_write_across_a_page_boundary_marks_both(watch, arena):
    numpy.asarray(arena)[12 * arena.page_size - 1: 12 * arena.page_size + 1] = 1
    assert pages(watch.get(), arena) == [11, 12]


def test_reads_mark_nothing(watch, arena):
    assert numpy.asarray(arena)[::512].sum() == 0
    assert len(watch.get()) == 0


def test_kernel_writes_mark_and_failed_calls_do_not(watch, arena, backend):
    read_fd, write_fd = os.pipe()
    try:
        os.set_blocking(read_fd, False)
        buf = memoryview(arena)[40 * arena.page_size: 41 * arena.page_size]
        with pytest.raises(BlockingIOError):
            os.readv(read_fd, [buf])              # fails, writes nothing
        assert len(watch.get()) == 0
        os.write(write_fd, b"x" * 100)
        if backend == "mprotect" or "EFAULT" in getattr(watch.tracker.backend_object, "kernel_writes", ""):
            watch.tracker.record(arena.address + 40 * arena.page_size, 100)   # see README
        assert os.readv(read_fd, [buf]) == 100
        buf.release()
        assert pages(watch.get(), arena) == [40]
    finally:
        os.close(read_fd)
        os.close(write_fd)


@pytest.mark.parametrize("kwargs, error", [
    ({"size": 0}, ValueError),
    ({"size": -4096}, ValueError),
    ({"max_count": 0}, ValueError),
    ({"max_count": -1}, ValueError),
    ({"max_count": 1.5}, TypeError),
    ({"addr": 0}, ValueError),
    ({"unknown": 1}, TypeError),
])
def test_bad_arguments_raise_and_reset_nothing(watch, arena, kwargs, error):
    write_pages(arena, {3, 4})
    with pytest.raises(error):
        watch.get(reset=True, **kwargs)
    outside = {"addr": arena.address + arena.size - arena.page_size, "size": 2 * arena.page_size}
    with pytest.raises(ValueError):
        watch.get(reset=True, **outside)
    with pytest.raises(ValueError):
        watch.reset(**outside)
    assert pages(watch.get(), arena) == [3, 4]


def test_thousands_of_runs_across_many_output_vectors(page_size, backend):
    """10,000 separate dirty runs: more than two default PAGEMAP_SCAN vectors."""
    with gctrack.Arena(20000 * page_size) as arena, \
            gctrack.WriteWatch(arena, backend=backend) as watch:
        written = list(range(0, 20000, 2))
        write_pages(arena, written)
        first = watch.get(max_count=4500, reset=True)
        assert pages(first, arena) == written[:4500]
        assert pages(watch.get(), arena) == written[4500:]
        assert pages(watch.get(reset=True), arena) == written[4500:]
        assert len(watch.get()) == 0


def test_software_backend_is_refused(arena):
    with pytest.raises(ValueError, match="page-granular"):
        gctrack.WriteWatch(arena, backend="software")
    with gctrack.Tracker(arena, backend="software"):    # and the arena was released
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sets(st.integers(0, 255), max_size=120), st.integers(0, 255 * 4096),
       st.integers(1, 256 * 4096), st.one_of(st.none(), st.integers(1, 80)))
def test_ranges_take_exactly_their_pages(arena, backend, dirty, offset, size, max_count):
    size = min(size, arena.size - offset)
    with gctrack.WriteWatch(arena, backend=backend) as watch:
        write_pages(arena, dirty)
        first, after = offset // arena.page_size, -(-(offset + size) // arena.page_size)
        inside = sorted(p for p in dirty if first <= p < after)[:max_count]
        got = watch.get(arena.address + offset, size, max_count=max_count, reset=True)
        assert pages(got, arena) == inside
        assert pages(watch.get(), arena) == sorted(set(dirty) - set(inside))
