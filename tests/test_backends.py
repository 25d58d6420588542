"""Backend-level behaviour: the differential check, resource hygiene, fork,
the mprotect signal handler, the software barrier."""
import gc
import os
import subprocess
import sys
import threading

import numpy
import pytest

import gctrack
from conftest import PAGE_BACKENDS, reported_pages, require, write_pages
from gctrack.testing import NativeWriters

ALL_BACKENDS = PAGE_BACKENDS + ["software"]


def pages_from_regions(regions, arena) -> set[int]:
    """Pages touched by regions of any granularity (software reports 64 B cards)."""
    pages: set[int] = set()
    for start, end in zip(regions["start"].tolist(), regions["end"].tolist()):
        pages.update(range((start - arena.address) // arena.page_size,
                           (end - 1 - arena.address) // arena.page_size + 1))
    return pages


# ---- differential: every backend sees the same writes -----------------------------

def test_every_backend_reports_what_the_software_reference_reports(page_size):
    rng = numpy.random.default_rng(7)
    rounds = []
    for _ in range(6):
        starts = rng.integers(0, 256 * page_size - 3 * page_size, rng.integers(0, 60))
        lengths = rng.integers(1, 3 * page_size, len(starts))
        rounds.append(list(zip(starts.tolist(), lengths.tolist())))
    seen = {}
    for name in ALL_BACKENDS:
        if not gctrack.features().backends[name]:
            continue
        with gctrack.Arena(256 * page_size) as arena, gctrack.Tracker(arena, backend=name) as t:
            view = numpy.asarray(arena)
            seen[name] = []
            for writes in rounds:
                for start, length in writes:
                    view[start:start + length] += 1
                    if name == "software":
                        t.record(arena.address + start, length)
                seen[name].append(pages_from_regions(t.scan(), arena))
    reference = seen["software"]
    for writes, pages in zip(rounds, reference):
        expected = {p for s, n in writes for p in range(s // page_size, (s + n - 1) // page_size + 1)}
        assert pages == expected
    for name, got in seen.items():
        assert got == reference, f"{name} differs from the software reference"
    assert len(seen) >= 2


# ---- resource hygiene ------------------------------------------------------------------

def resources():
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    with open("/proc/self/maps") as maps:
        mappings = sum(1 for _ in maps)
    return {"fds": len(os.listdir("/proc/self/fd")), "maps": mappings,
            "threads": int(fields["Threads"]), "rss_kib": int(fields["VmRSS"].split()[0])}


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_create_collect_close_cycles_leak_nothing(name, page_size):
    require(name)

    def cycle():
        with gctrack.Arena(16 * page_size) as arena, gctrack.Tracker(arena, backend=name) as t:
            cards = gctrack.CardTable.for_arena(arena)
            write_pages(arena, {1, 5})
            t.record(arena.address, 1)
            t.collect(cards)
            assert cards.count() > 0

    for _ in range(200):          # warm up allocators and caches
        cycle()
    gc.collect()
    before = resources()
    for _ in range(2000):
        cycle()
    gc.collect()
    after = resources()
    assert after["fds"] == before["fds"]
    assert after["maps"] == before["maps"]
    assert after["threads"] == before["threads"]
    assert after["rss_kib"] - before["rss_kib"] < 4096, (before, after)


# ---- fork ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PAGE_BACKENDS)
def test_fork_child_writes_freely_and_parent_tracking_is_undisturbed(arena, name):
    require(name)
    with gctrack.Tracker(arena, backend=name) as t:
        write_pages(arena, {3})
        pid = os.fork()
        if pid == 0:                                      # the child
            code = 0
            try:
                write_pages(arena, {3, 100, 101, 200})    # must not crash or hang
                try:
                    t.scan()
                    code = 3                              # must refuse: not its tracker
                except RuntimeError:
                    pass
                t.close()
            except BaseException:
                code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        write_pages(arena, {7})
        assert reported_pages(t.scan(), arena) == {3, 7}
        assert numpy.asarray(arena)[100 * arena.page_size] == 0     # the child's copy was its own


# ---- the mprotect handler -------------------------------------------------------------------

CRASH = """
import ctypes, faulthandler, sys
import numpy, gctrack
if sys.argv[1] == "faulthandler":
    faulthandler.enable()
arena = gctrack.Arena(4096)
tracker = gctrack.Tracker(arena, backend="mprotect")
numpy.asarray(arena)[0] = 1
assert len(tracker.scan()) == 1
print("tracked write ok", flush=True)
ctypes.string_at(8)          # a real crash, outside any arena
"""


@pytest.mark.parametrize("mode", ["faulthandler", "default"])
def test_a_real_crash_still_crashes_loudly(mode):
    require("mprotect")
    run = subprocess.run([sys.executable, "-c", CRASH, mode], capture_output=True, text=True,
                         timeout=60)
    assert "tracked write ok" in run.stdout
    assert run.returncode == -11, run.stderr
    if mode == "faulthandler":
        assert "Segmentation fault" in run.stderr


def test_many_mprotect_arenas_come_and_go_while_one_is_written(page_size):
    """Installing and removing arenas (and the handler) races native writers' faults."""
    require("mprotect")
    with gctrack.Arena(2048 * page_size) as hot, gctrack.Tracker(hot, backend="mprotect") as t:
        rng = numpy.random.default_rng(3)
        pages = rng.choice(hot.num_pages, 1500, replace=False)
        writers = NativeWriters(hot, [pages[k::2] * page_size for k in range(2)], spin=3000).start()
        others = []
        churn = 0
        while not writers.finished() or churn < 50:
            arena = gctrack.Arena(8 * page_size)
            tracker = gctrack.Tracker(arena, backend="mprotect")
            write_pages(arena, {churn % 8})
            assert reported_pages(tracker.scan(), arena) == {churn % 8}
            others.append((arena, tracker))
            if len(others) > 5:
                old_arena, old_tracker = others.pop(0)
                old_tracker.close()
                old_arena.close()
            churn += 1
        writers.join()
        for arena, tracker in others:
            tracker.close()
            arena.close()
        assert reported_pages(t.scan(), hot) == set(pages.tolist())


def test_at_most_64_mprotect_arenas(page_size):
    require("mprotect")
    arenas, trackers = [], []
    try:
        with pytest.raises(gctrack.TrackerError, match="64"):
            for _ in range(65):
                arenas.append(gctrack.Arena(page_size))
                trackers.append(gctrack.Tracker(arenas[-1], backend="mprotect"))
    finally:
        for t in trackers:
            t.close()
    assert len(trackers) == 64


# ---- software card marking ---------------------------------------------------------------

def test_software_backend_is_exact_at_64_byte_cards(arena):
    with gctrack.Tracker(arena, backend="software") as t:
        assert t.granularity == 64
        numpy.asarray(arena)[:] = 1                # unseen: no barrier was called
        assert len(t.scan()) == 0
        t.record(arena.address + 100, 1)           # card 1
        t.record(arena.address + 190, 20)          # cards 2 and 3
        t.record(arena.address + 4096, 64)         # card 64
        regions = t.scan()
        assert [(int(s) - arena.address, int(e) - arena.address)
                for s, e in zip(regions["start"], regions["end"])] == [(64, 256), (4096, 4160)]
        cards = gctrack.CardTable.for_arena(arena, card_size=64)
        t.record(arena.address + 65, 1)
        t.collect(cards)
        assert cards.indices().tolist() == [1]
        assert len(t.scan()) == 0


def test_software_barrier_from_many_native_threads_with_the_loop(arena):
    """record() from Python threads (GIL released inside) racing the background loop."""
    with gctrack.Tracker(arena, backend="software") as t:
        t.start(interval=0.0002)
        offsets = numpy.arange(0, arena.size, 64)
        chunks = numpy.array_split(offsets, 4)

        def mark(chunk):
            for off in chunk.tolist():
                t.record(arena.address + off, 1)

        threads = [threading.Thread(target=mark, args=(c,)) for c in chunks]
        for th in threads:
            th.start()
        cards = gctrack.CardTable.for_arena(arena, card_size=64)
        for th in threads:
            th.join()
            t.drain(cards)
        t.stop()
        t.drain(cards)
        assert cards.count() == cards.num_cards


def test_soft_dirty_passes_are_refused_by_the_background_loop(arena):
    require("soft_dirty")
    with gctrack.Tracker(arena, backend="soft_dirty") as t:
        assert not t.backend_object.atomic_passes
        with pytest.raises(ValueError, match="not atomic"):
            t.start()


def test_two_soft_dirty_trackers_do_not_clear_each_other(page_size):
    require("soft_dirty")
    with gctrack.Arena(16 * page_size) as a, gctrack.Arena(16 * page_size) as b, \
            gctrack.Tracker(a, backend="soft_dirty") as ta, gctrack.Tracker(b, backend="soft_dirty") as tb:
        write_pages(a, {1})
        write_pages(b, {2})
        assert reported_pages(ta.scan(), a) == {1}       # clears the process's bits...
        assert reported_pages(tb.scan(), b) == {2}       # ...but b's were saved first
        assert reported_pages(ta.scan(), a) == set()
