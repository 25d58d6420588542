import gc
import os

import numpy
import pytest

import gctrack
from conftest import require


def mapped(address: int) -> bool:
    """Whether /proc/self/maps has a mapping that contains ``address``."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return True
    return False


def present(address: int, page_size: int) -> bool:
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        entry = int.from_bytes(os.pread(fd, 8, address // page_size * 8), "little")
    finally:
        os.close(fd)
    return bool(entry >> 63)


def test_size_is_rounded_up_to_whole_pages(page_size):
    with gctrack.Arena(page_size + 1) as a:
        assert a.size == 2 * page_size
        assert a.page_size == page_size
        assert a.num_pages == 2
        assert a.address % page_size == 0


@pytest.mark.parametrize("size", [0, -1, -4096])
def test_non_positive_size_is_a_value_error(size):
    with pytest.raises(ValueError, match="positive"):
        gctrack.Arena(size)


@pytest.mark.parametrize("size", [4096.0, "4096", None])
def test_non_integer_size_is_a_type_error(size):
    with pytest.raises(TypeError):
        gctrack.Arena(size)


def test_asarray_is_a_writable_zero_copy_view(arena):
    view = numpy.asarray(arena)
    assert view.dtype == numpy.uint8 and view.shape == (arena.size,)
    assert view.flags.writeable
    assert view.ctypes.data == arena.address
    view[123] = 7
    assert numpy.asarray(arena)[123] == 7


def test_typed_views(arena):
    words = arena.view(numpy.uint64)
    assert words.shape == (arena.size // 8,)
    words[1] = 0x0102030405060708
    assert numpy.asarray(arena)[8] == 0x08
    tail = arena.view("u4", offset=16, count=2)
    assert tail.ctypes.data == arena.address + 16 and tail.shape == (2,)
    tail[0] = 5
    assert words[2] == 5


@pytest.mark.parametrize("kwargs, error", [
    ({"offset": -8}, ValueError),
    ({"offset": 3}, ValueError),          # misaligned for uint64
    ({"offset": 1 << 40}, ValueError),
    ({"count": -2}, ValueError),
    ({"count": 1 << 40}, ValueError),
    ({"offset": 1.5}, TypeError),
])
def test_bad_views_are_rejected(arena, kwargs, error):
    with pytest.raises(error):
        arena.view(numpy.uint64, **kwargs)


def test_closed_arena_refuses_use_and_closing_twice_is_fine(page_size):
    a = gctrack.Arena(page_size)
    address = a.address
    a.close()
    a.close()
    assert a.closed
    assert not mapped(address)
    for use in (lambda: a.address, lambda: numpy.asarray(a), lambda: a.view("u1"),
                a.prefault, lambda: gctrack.Tracker(a)):
        with pytest.raises(ValueError, match="closed"):
            use()


def test_views_keep_the_memory_mapped_after_close(page_size):
    a = gctrack.Arena(4 * page_size)
    view = a.view(numpy.uint8)
    address = a.address
    a.close()
    assert a.closed and mapped(address)
    view[-1] = 9                      # still valid memory
    assert view[-1] == 9
    del view
    gc.collect()
    assert not mapped(address)


def test_closing_the_arena_under_a_live_tracker_defers_the_unmap(page_size):
    require("pagemap_scan")
    a = gctrack.Arena(8 * page_size)
    address = a.address
    t = gctrack.Tracker(a, backend="pagemap_scan")
    a.close()
    assert mapped(address)
    cards = gctrack.CardTable(address, 8 * page_size)
    assert t.collect(cards).pages == 0       # the tracker still works on live memory
    t.close()
    assert not mapped(address)


def test_prefault_populates_every_page(page_size):
    with gctrack.Arena(16 * page_size) as a:
        assert not present(a.address + 5 * page_size, page_size)
        a.prefault()
        assert all(present(a.address + i * page_size, page_size) for i in range(16))


def test_huge_page_arena_is_aligned_to_2mib():
    with gctrack.Arena(1, huge_pages=True) as a:
        assert a.huge_pages
        assert a.size == 2 << 20
        assert a.address % (2 << 20) == 0
        numpy.asarray(a)[:] = 1
        assert numpy.asarray(a).sum() == a.size


def test_repr_says_state(page_size):
    a = gctrack.Arena(page_size)
    assert "bytes at" in repr(a)
    a.close()
    assert "closed" in repr(a)


@pytest.mark.parametrize("size", [2**64 - 1, 2**64, 2**70, 2**62 + 1])
def test_sizes_beyond_the_limit_are_value_errors(size):
    """Rounding 2**64 - 1 up to whole pages wrapped to 0 (an mmap EINVAL about
    "0 bytes"); 2**64 and more were OverflowErrors."""
    with pytest.raises(ValueError, match="at most"):
        gctrack.Arena(size)


@pytest.mark.parametrize("dtype", ["V0", "S0", [("empty", "u1", (0,))]])
def test_views_of_zero_size_items_are_value_errors(arena, dtype):
    with pytest.raises(ValueError, match="no size"):
        arena.view(dtype)
