"""Writes that bypass the page-table fault path, inside Tracker.external_write.

The kernel resolves a pinned page's write fault when it pins the page, so a
pass that runs before the data lands re-arms the page and nothing reports
the data. Inside the bracket, every byte written is reported by a pass that
starts after the bracket exits: on every backend, with or without the loop.
"""
import mmap
import os
import threading
import time

import numpy
import pytest

import gctrack
from conftest import RACING_BACKENDS, require

BRACKET_BACKENDS = RACING_BACKENDS + ["software"]


@pytest.fixture(params=BRACKET_BACKENDS)
def bracket_backend(request):
    require(request.param)
    return request.param


@pytest.fixture(params=[False, True], ids=["passes", "loop"])
def with_loop(request):
    return request.param


@pytest.fixture
def direct_file(tmp_path):
    """A file of random pages, opened with O_DIRECT (skips where the file
    system refuses it, as tmpfs did before Linux 6.6)."""
    path = tmp_path / "data"
    path.write_bytes(numpy.random.default_rng(5).integers(0, 256, 256 * 4096, numpy.uint8).tobytes())
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        pytest.skip(f"O_DIRECT unavailable on {path.parent}: {exc.strerror}")
    yield fd
    os.close(fd)


class ShadowCollector:
    """Runs passes (or the loop and drain) and copies every reported page
    into a shadow of the arena, as a concurrent collector would read it."""

    def __init__(self, tracker, arena, loop):
        self.tracker, self.arena, self.loop = tracker, arena, loop
        self.memory = numpy.asarray(arena)
        self.shadow = self.memory.copy()
        self.cards = gctrack.CardTable.for_arena(arena, arena.page_size)
        if loop:
            tracker.start(interval=0.0002)

    def step(self):
        self.cards.clear()
        (self.tracker.drain if self.loop else self.tracker.collect)(self.cards)
        for start, end in self.cards.ranges().tolist():
            lo, hi = start - self.arena.address, end - self.arena.address
            self.shadow[lo:hi] = self.memory[lo:hi]

    def finish(self):
        if self.loop:
            self.tracker.stop()
        self.step()
        self.step()

    def lost_pages(self):
        differs = (self.shadow != self.memory).reshape(-1, self.arena.page_size).any(axis=1)
        return numpy.flatnonzero(differs)


def direct_reader(tracker, arena, fd, seed, stop, counts):
    """Read random file pages into random arena page runs with O_DIRECT,
    each read inside an external-write bracket."""
    rng = numpy.random.default_rng(seed)
    page = arena.page_size
    while not stop.is_set():
        pages = int(rng.integers(1, 5))
        first = int(rng.integers(0, arena.num_pages - pages))
        offset = int(rng.integers(0, 256 - pages)) * page
        target = memoryview(arena)[first * page:(first + pages) * page]
        with tracker.external_write(arena.address + first * page, pages * page):
            assert os.preadv(fd, [target], offset) == pages * page
        counts[0] += 1


def test_o_direct_reads_inside_the_bracket_lose_nothing(bracket_backend, with_loop, direct_file):
    with gctrack.Arena(2048 * 4096) as arena:
        arena.prefault()
        with gctrack.Tracker(arena, backend=bracket_backend) as tracker:
            collector = ShadowCollector(tracker, arena, with_loop)
            stop, counts = threading.Event(), [0]
            readers = [threading.Thread(target=direct_reader,
                                        args=(tracker, arena, direct_file, seed, stop, counts))
                       for seed in (1, 2)]
            for reader in readers:
                reader.start()
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                collector.step()
            stop.set()
            for reader in readers:
                reader.join()
            collector.finish()
            lost = collector.lost_pages()
            assert counts[0] > 50, "the readers made too few reads to race anything"
            assert lost.size == 0, f"{lost.size} pages written by O_DIRECT were never reported"


def proc_mem_write(address, data):
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(address)
        assert mem.write(data) == len(data)


def test_a_proc_self_mem_write_inside_the_bracket_is_reported(arena, bracket_backend, with_loop):
    with gctrack.Tracker(arena, backend=bracket_backend) as tracker:
        cards = gctrack.CardTable.for_arena(arena, arena.page_size)
        if with_loop:
            tracker.start(interval=0.0002)
        tracker.drain(cards) if with_loop else tracker.collect(cards)
        target = arena.address + 5 * arena.page_size + 100
        with tracker.external_write(target, 3 * arena.page_size):
            time.sleep(0.005)                     # passes run in between on the loop
            proc_mem_write(target, b"\x7f" * (3 * arena.page_size))
        cards.clear()
        tracker.drain(cards) if with_loop else tracker.collect(cards)
        assert numpy.asarray(arena)[target - arena.address] == 0x7f
        expected = {5, 6, 7, 8}
        assert expected <= set(cards.indices().tolist())
        if with_loop:
            tracker.stop()


def test_brackets_nest_and_overlap_and_keep_the_range_writable(arena, bracket_backend):
    """A write by the kernel into an mprotect arena fails with EFAULT unless a
    bracket keeps it writable, across passes, until its own end."""
    with gctrack.Tracker(arena, backend=bracket_backend) as tracker:
        page = arena.page_size
        cards = gctrack.CardTable.for_arena(arena, page)
        outer = tracker.external_write(arena.address, 4 * page)
        inner = tracker.external_write(arena.address + 2 * page, 4 * page)
        with outer:
            with inner:
                tracker.collect(cards)
            tracker.collect(cards)                 # inner's end re-armed nothing outer holds
            read_fd, write_fd = os.pipe()
            os.write(write_fd, b"k" * page)
            os.readv(read_fd, [memoryview(arena)[page:2 * page]])   # a kernel write
            os.close(read_fd)
            os.close(write_fd)
        cards.clear()
        tracker.collect(cards)
        assert 1 in set(cards.indices().tolist())
        assert bytes(memoryview(arena)[page:page + 4]) == b"kkkk"


def test_the_bracket_refuses_ranges_outside_the_arena(arena):
    with gctrack.Tracker(arena, backend="software") as tracker:
        with pytest.raises(ValueError, match="outside the arena"):
            tracker.external_write(arena.address + arena.size - 8, 16)
        with pytest.raises(ValueError, match="non-negative"):
            tracker.external_write(arena.address, -1)
        with pytest.raises(TypeError):
            tracker.external_write(arena.address, 1.5)


def test_a_failed_pass_leaves_what_it_re_armed_reported_by_the_next(arena):
    """PAGEMAP_SCAN fails at a page it cannot check (EPERM) after re-arming
    the pages before it; the next pass must still report those."""
    require("pagemap_scan")
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    with gctrack.Tracker(arena, backend="pagemap_scan") as tracker:
        page = arena.page_size
        numpy.asarray(arena)[:10 * page:page] = 1             # pages 0-9 written
        foreign = arena.address + 40 * page
        got = libc.mmap(foreign, page, mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x10, -1, 0)   # MAP_FIXED
        assert got == foreign
        cards = gctrack.CardTable.for_arena(arena, page)
        with pytest.raises(gctrack.TrackerError) as info:
            tracker.collect(cards)
        assert info.value.errno == 1 and info.value.operation == "PAGEMAP_SCAN"   # EPERM
        assert libc.munmap(ctypes.c_void_p(foreign), ctypes.c_size_t(page)) == 0
        cards.clear()
        tracker.collect(cards)
        assert set(range(10)) <= set(cards.indices().tolist())


@pytest.mark.parametrize("backend", RACING_BACKENDS)
def test_a_cpu_store_to_a_bracketed_page_is_reported_while_the_bracket_is_open(arena, backend):
    """A held page stays writable, so stores to it do not fault: every pass
    must report it until the bracket ends, or a remark would miss a store
    made beside an in-flight read. (software sees only barrier stores.)"""
    require(backend)
    with gctrack.Tracker(arena, backend=backend) as tracker:
        page = arena.page_size
        cards = gctrack.CardTable.for_arena(arena, page)
        with tracker.external_write(arena.address + 3 * page, page):
            tracker.collect(cards)
            cards.clear()
            tracker.collect(cards)                       # a pass after the bracket opened...
            numpy.asarray(arena)[3 * page + 8] = 5       # ...then a mutator's store
            cards.clear()
            tracker.collect(cards)
            assert 3 in set(cards.indices().tolist())


def test_an_unmatched_end_is_an_error_that_loses_nothing(arena, bracket_backend):
    with gctrack.Tracker(arena, backend=bracket_backend) as tracker:
        page = arena.page_size
        cards = gctrack.CardTable.for_arena(arena, page)
        outer = tracker.external_write(arena.address, 4 * page)
        outer.__enter__()
        inner = (arena.address + 6 * page, page)
        tracker.begin_external_write(*inner)
        tracker.end_external_write(*inner)
        if bracket_backend in ("mprotect", "uffd_sync"):
            with pytest.raises(gctrack.TrackerError) as info:
                tracker.end_external_write(*inner)           # a second end for one begin
            assert info.value.errno == 22                    # EINVAL
        else:
            tracker.end_external_write(*inner)               # nothing is held: nothing to check
        tracker.collect(cards)
        assert 6 in set(cards.indices().tolist()), "recorded all the same"
        read_fd, write_fd = os.pipe()                        # outer still holds its pages
        os.write(write_fd, b"z" * page)
        os.readv(read_fd, [memoryview(arena)[page:2 * page]])
        os.close(read_fd)
        os.close(write_fd)
        outer.__exit__(None, None, None)
        cards.clear()
        tracker.collect(cards)
        assert 1 in set(cards.indices().tolist())


def test_closing_beside_threads_inside_record_and_brackets_does_not_crash():
    """close() waits for the calls already inside the backend."""
    require("mprotect")
    script = """
        import threading, gctrack
        def hammer(tracker, address, page, stop):
            while not stop.is_set():
                try:
                    with tracker.external_write(address, page):
                        tracker.record(address, 8)
                except ValueError:
                    return                       # closed: every call says so from now on
        for backend in ("mprotect", "uffd_sync", "software", "pagemap_scan"):
            for _ in range(30):
                arena = gctrack.Arena(64 * 4096)
                tracker = gctrack.Tracker(arena, backend=backend)
                stop = threading.Event()
                threads = [threading.Thread(target=hammer, args=(tracker, arena.address + k * 4096, 4096, stop))
                           for k in range(3)]
                for t in threads: t.start()
                tracker.close()
                stop.set()
                for t in threads: t.join()
                arena.close()
        print("ok")
    """
    import subprocess, sys, textwrap
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
