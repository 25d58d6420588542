"""The C API capsule applies every guard the Python API has.

The table is read with ctypes exactly as gctrack.h lays it out, and its
entries are called the way a C embedder calls them: no mock, the real
functions on real trackers.
"""
import ctypes
import errno

import numpy
import pytest

import gctrack
from conftest import require

c_ptr = ctypes.c_void_p
NOGIL = ctypes.CFUNCTYPE                 # the GIL is released around the call
WITH_GIL = ctypes.PYFUNCTYPE             # keeps the GIL and checks for an exception


class PassCounts(ctypes.Structure):
    _fields_ = [("regions", ctypes.c_uint64), ("pages", ctypes.c_uint64),
                ("calls", ctypes.c_uint64), ("seconds", ctypes.c_double)]


class Cards(ctypes.Structure):
    _fields_ = [("words", ctypes.POINTER(ctypes.c_uint64)), ("base", ctypes.c_size_t),
                ("size", ctypes.c_size_t), ("num_cards", ctypes.c_size_t),
                ("num_words", ctypes.c_size_t), ("card_shift", ctypes.c_uint)]


class Barrier(ctypes.Structure):
    _fields_ = [("words", ctypes.POINTER(ctypes.c_uint64)), ("base", ctypes.c_size_t),
                ("size", ctypes.c_size_t), ("card_shift", ctypes.c_uint)]


class MissedStore(ctypes.Structure):
    _fields_ = [("address", ctypes.c_uint64), ("old", ctypes.c_uint64),
                ("new_value", ctypes.c_uint64)]


class VerifyCounts(ctypes.Structure):
    _fields_ = [("pages_written", ctypes.c_uint64), ("words_changed", ctypes.c_uint64),
                ("missed", ctypes.c_uint64), ("seconds", ctypes.c_double)]


RANGE_CALL = NOGIL(ctypes.c_int, c_ptr, ctypes.c_size_t, ctypes.c_size_t)


class CApi(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint),
        ("size", ctypes.c_size_t),
        ("tracker_handle", WITH_GIL(c_ptr, ctypes.py_object)),
        ("cards_handle", WITH_GIL(ctypes.POINTER(Cards), ctypes.py_object)),
        ("arena_memory", WITH_GIL(c_ptr, ctypes.py_object, ctypes.POINTER(ctypes.c_size_t))),
        ("collect", NOGIL(ctypes.c_int, c_ptr, c_ptr, ctypes.c_int, c_ptr)),
        ("drain", NOGIL(ctypes.c_int, c_ptr, c_ptr, c_ptr)),
        ("record", RANGE_CALL),
        ("next_dirty_card", NOGIL(ctypes.c_size_t, c_ptr, ctypes.c_size_t)),
        ("next_clean_card", NOGIL(ctypes.c_size_t, c_ptr, ctypes.c_size_t)),
        ("mark_range", NOGIL(None, c_ptr, ctypes.c_size_t, ctypes.c_size_t)),
        ("clear_cards", NOGIL(None, c_ptr)),
        ("begin_external_write", RANGE_CALL),
        ("end_external_write", RANGE_CALL),
        ("barrier_handle", WITH_GIL(ctypes.POINTER(Barrier), ctypes.py_object)),
        ("verifier_new", WITH_GIL(ctypes.py_object, ctypes.py_object, ctypes.py_object)),
        ("verifier_handle", WITH_GIL(c_ptr, ctypes.py_object)),
        ("verifier_check", NOGIL(ctypes.c_long, c_ptr, ctypes.c_int, ctypes.POINTER(MissedStore),
                                 ctypes.c_size_t, ctypes.POINTER(VerifyCounts))),
        ("verifier_close", WITH_GIL(ctypes.c_int, ctypes.py_object)),
    ]


@pytest.fixture(scope="module")
def api() -> CApi:
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = c_ptr, [ctypes.py_object, ctypes.c_char_p]
    table = CApi.from_address(get(gctrack._C_API, b"gctrack._C_API"))
    assert table.version == 1 and table.size == ctypes.sizeof(CApi)
    return table


def handles(api, tracker, cards):
    return api.tracker_handle(tracker), ctypes.cast(api.cards_handle(cards), c_ptr)


def test_null_tracker_cards_and_counts(api, arena, backend):
    with gctrack.Tracker(arena, backend=backend) as tracker:
        table = gctrack.CardTable.for_arena(arena)           # the handle borrows it
        t, cards = handles(api, tracker, table)
        counts = ctypes.byref(PassCounts())
        assert api.collect(None, cards, 1, counts) == -errno.EINVAL
        assert api.collect(t, None, 1, counts) == -errno.EINVAL
        assert api.drain(None, cards, counts) == -errno.EINVAL
        assert api.drain(t, None, counts) == -errno.EINVAL
        for call in (api.record, api.begin_external_write, api.end_external_write):
            assert call(None, arena.address, arena.address + 8) == -errno.EINVAL
        numpy.asarray(arena)[0] = 1
        assert api.collect(t, cards, 1, None) == 0          # NULL counts is allowed
        assert api.drain(t, cards, None) == 0


def test_a_card_table_that_does_not_cover_the_arena_is_refused_and_re_arms_nothing(api, arena, backend):
    with gctrack.Tracker(arena, backend=backend) as tracker:
        half = gctrack.CardTable(arena.address, arena.size // 2, arena.page_size)
        whole = gctrack.CardTable.for_arena(arena, arena.page_size)
        t, partial = handles(api, tracker, half)
        numpy.asarray(arena)[arena.size - 1] = 1             # a page outside `half`
        assert api.collect(t, partial, 1, None) == -errno.EINVAL
        assert api.drain(t, partial, None) == -errno.EINVAL
        tracker.collect(whole)
        assert whole.indices().tolist() == [arena.num_pages - 1], "the refused pass re-armed it"


def test_collect_while_the_loop_runs_is_refused(api, arena):
    require("pagemap_scan")
    with gctrack.Tracker(arena, backend="pagemap_scan") as tracker:
        cards = gctrack.CardTable.for_arena(arena)
        t, c = handles(api, tracker, cards)
        tracker.start(interval=0.001)
        assert api.collect(t, c, 1, None) == -errno.EBUSY
        assert api.drain(t, c, None) == 0                    # drain is the loop's way
        tracker.stop()
        assert api.collect(t, c, 1, None) == 0


def test_a_heaps_tracker_refuses_collect_and_drain(api):
    with gctrack.Heap(1 << 20, backend="software") as heap:
        cards = gctrack.CardTable.for_arena(heap.arena, heap.card_size)
        t, c = handles(api, heap.tracker, cards)
        obj = heap.alloc(root=True)
        heap.set_ref(obj, 0, obj)
        assert api.collect(t, c, 1, None) == -errno.EPERM
        assert api.drain(t, c, None) == -errno.EPERM
        assert cards.count() == 0
        stats = gctrack.Collector(heap).collect()
        assert stats.live >= 1


def test_calls_after_close_return_ebadf(api, arena, backend):
    tracker = gctrack.Tracker(arena, backend=backend)
    cards = gctrack.CardTable.for_arena(arena)
    t, c = handles(api, tracker, cards)
    tracker.close()
    assert api.collect(t, c, 1, None) == -errno.EBADF
    assert api.drain(t, c, None) == -errno.EBADF
    for call in (api.record, api.begin_external_write, api.end_external_write):
        assert call(t, arena.address, arena.address + 8) == -errno.EBADF
    with pytest.raises(ValueError, match="closed"):
        api.tracker_handle(tracker)


def test_ranges_outside_the_arena_are_refused(api, arena, backend):
    with gctrack.Tracker(arena, backend=backend) as tracker:
        t = api.tracker_handle(tracker)
        end = arena.address + arena.size
        for call in (api.record, api.begin_external_write, api.end_external_write):
            assert call(t, end - 8, end + 8) == -errno.EINVAL
            assert call(t, arena.address + 16, arena.address + 8) == -errno.EINVAL
            assert call(t, arena.address - 8, arena.address) == -errno.EINVAL


def test_the_inline_barrier_struct_is_the_software_dirty_map(api, arena):
    """gct_barrier_mark() sets bit (addr - base) >> card_shift of words; a
    bit set that way is what the next pass reports, and close() zeroes size."""
    tracker = gctrack.Tracker(arena, backend="software")
    barrier = api.barrier_handle(tracker).contents
    assert (barrier.base, barrier.size, 1 << barrier.card_shift) == (arena.address, arena.size, 64)
    address = arena.address + 1000
    card = (address - barrier.base) >> barrier.card_shift
    barrier.words[card >> 6] |= 1 << (card & 63)             # what the inline function does
    cards = gctrack.CardTable.for_arena(arena, 64)
    tracker.collect(cards)
    assert cards.indices().tolist() == [card]
    tracker.close()
    assert barrier.size == 0, "a closed tracker's barrier marks nothing"
    with pytest.raises(ValueError, match="closed"):
        api.barrier_handle(tracker)


def test_only_a_software_tracker_has_a_barrier(api, arena, backend):
    with gctrack.Tracker(arena, backend=backend) as tracker:
        with pytest.raises(TypeError, match="software"):
            api.barrier_handle(tracker)
    with pytest.raises(TypeError):
        api.barrier_handle(arena)


def test_the_missed_store_struct_is_missed_dtype():
    assert ctypes.sizeof(MissedStore) == gctrack.MISSED_DTYPE.itemsize == 24
    assert [gctrack.MISSED_DTYPE.fields[f][1] for f in ("address", "old", "new")] == [
        MissedStore.address.offset, MissedStore.old.offset, MissedStore.new_value.offset]


def test_a_verifier_from_c_create_check_close(api, arena):
    """Created, checked into a caller's fixed array, and closed through the
    table: the first `capacity` misses in address order, all of them counted."""
    require("pagemap_scan")
    from gctrack.testing import store_words
    cards = gctrack.CardTable.for_arena(arena, 64)
    verifier = api.verifier_new(arena, cards)
    assert isinstance(verifier, gctrack.BarrierVerifier)
    v = api.verifier_handle(verifier)
    offsets = numpy.arange(5, dtype=numpy.uint64) * 256
    store_words(arena, offsets, offsets + 7)
    store_words(arena, [8], [1], cards)                     # marks card 0: word 0 is no miss
    records = (MissedStore * 2)()
    counts = VerifyCounts()
    assert api.verifier_check(v, 1, records, 2, ctypes.byref(counts)) == 4
    assert [(r.address - arena.address, r.old, r.new_value) for r in records] == [
        (256, 0, 263), (512, 0, 519)]
    assert (counts.pages_written, counts.words_changed, counts.missed) == (1, 6, 4)
    assert cards.count() == 0, "clear != 0 clears the cards"
    assert api.verifier_check(v, 0, None, 0, None) == 0      # NULL records and counts
    assert api.verifier_check(None, 1, None, 0, None) == -errno.EINVAL
    assert api.verifier_check(v, 1, None, 1, None) == -errno.EINVAL
    assert api.verifier_close(verifier) == 0 and verifier.closed
    assert api.verifier_check(v, 1, None, 0, None) == -errno.EBADF
    with pytest.raises(ValueError, match="closed"):
        api.verifier_handle(verifier)
    with pytest.raises(ValueError, match="outside"):
        api.verifier_new(arena, gctrack.CardTable(arena.address, 64, 64))
    with pytest.raises(TypeError):
        api.verifier_handle(arena)
    with pytest.raises(TypeError):
        api.verifier_close(cards)


def test_closing_a_verifier_beside_a_c_check_loop_crashes_nothing():
    """In a subprocess: a thread checks through the C entry without the GIL,
    in a loop, while the main thread closes the verifier; every call returns
    a count or -EBADF."""
    require("pagemap_scan")
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent("""
        import ctypes, errno, threading, numpy, gctrack
        from test_c_contract import CApi, VerifyCounts
        get = ctypes.pythonapi.PyCapsule_GetPointer
        get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        api = CApi.from_address(get(gctrack._C_API, b"gctrack._C_API"))
        arena = gctrack.Arena(8 << 20)
        cards = gctrack.CardTable.for_arena(arena)
        verifier = gctrack.BarrierVerifier(arena, cards)
        v = api.verifier_handle(verifier)
        results = set()
        def loop():
            view = numpy.asarray(arena)
            for i in range(3000):
                view[(i * 4096) % arena.size] += 1
                rc = api.verifier_check(v, 1, None, 0, None)
                results.add(rc if rc < 0 else 0)
        t = threading.Thread(target=loop)
        t.start()
        while not results:
            pass
        verifier.close()
        t.join()
        assert results <= {0, -errno.EBADF}, results
        assert -errno.EBADF in results
        print("ok")
    """)
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=here, env=env)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
