"""A library inside someone else's process: creating, closing and forking
trackers touches only their own mechanism, and no use after close crashes.

Whatever could crash or hang runs in a subprocess with a timeout, so that a
segfault fails the test instead of killing the run.
"""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy
import pytest

import gctrack
from conftest import require


def run_script(script: str, timeout: float = 60, prefix: tuple[str, ...] = ()) -> str:
    """Run ``script`` in a fresh interpreter; return its stdout, or fail with its stderr."""
    child = subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(script)],
                           capture_output=True, text=True, timeout=timeout)
    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr[-2000:]}"
    return child.stdout


# ---- creating one backend touches only that mechanism -------------------------

ONE_PAGEMAP_SCAN_TRACKER = """
    import os, threading
    import numpy, gctrack
    import gctrack.mprotect

    def segv_caught():
        status = open("/proc/self/status").read()
        line = next(l for l in status.splitlines() if l.startswith("SigCgt"))
        return int(line.split()[1], 16) >> 10 & 1       # bit 10: SIGSEGV (11)

    def threads():
        return len(os.listdir("/proc/self/task"))

    def fds():
        return set(os.listdir("/proc/self/fd"))

    arena = gctrack.Arena(64 * 4096)
    before = (segv_caught(), threads(), fds())
    os.getppid()                                         # marker for strace
    tracker = gctrack.Tracker(arena, backend="pagemap_scan")
    numpy.asarray(arena)[::4096] = 1
    cards = gctrack.CardTable.for_arena(arena, 4096)
    tracker.collect(cards)
    assert cards.count() == 64
    during = (segv_caught(), threads(), fds())
    tracker.close()
    os.getppid()                                         # marker for strace
    after = (segv_caught(), threads(), fds())
    print(before[0], during[0], after[0], gctrack.mprotect.handler_faults())
    print(before[1], during[1], after[1])
    print(len(during[2] - before[2]), len(after[2] ^ before[2]))
"""


def test_a_pagemap_scan_tracker_installs_no_handler_starts_no_thread_and_keeps_no_fd():
    require("pagemap_scan")
    lines = run_script(ONE_PAGEMAP_SCAN_TRACKER).splitlines()
    assert lines[0].split() == ["0", "0", "0", "0"], "no SIGSEGV handler, no fault taken"
    before, during, after = lines[1].split()
    assert before == during == after, "no thread started"
    new_during, changed_after = map(int, lines[2].split())
    assert new_during <= 2, "at most the tracker's own descriptors (userfaultfd, pagemap)"
    assert changed_after == 0, "close() gives back every descriptor"


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_a_pagemap_scan_tracker_never_touches_sigsegv_even_for_a_moment(tmp_path):
    """strace sees every rt_sigaction and clone between the two markers."""
    require("pagemap_scan")
    log = tmp_path / "trace"
    run_script(ONE_PAGEMAP_SCAN_TRACKER,
               prefix=("strace", "-f", "-o", str(log), "-e", "trace=rt_sigaction,clone,clone3,getppid"))
    calls = log.read_text().splitlines()
    marks = [i for i, line in enumerate(calls) if "getppid()" in line]
    assert len(marks) >= 2, calls[-20:]
    between = calls[marks[-2]:marks[-1]]
    assert not [c for c in between if "rt_sigaction(SIGSEGV" in c and "rt_sigaction(SIGSEGV, NULL" not in c]
    assert not [c for c in between if "clone" in c], "no thread or process started"


# ---- fork ------------------------------------------------------------------------

def test_a_forked_child_cannot_keep_uffd_sync_writes_blocked_after_close():
    """The child's copy of the descriptor must not hold the registration: after
    the parent closes, its writes go through at once, whatever the child does."""
    require("uffd_sync")
    out = run_script("""
        import os, time, numpy, gctrack
        arena = gctrack.Arena(16 * 4096)
        tracker = gctrack.Tracker(arena, backend="uffd_sync")
        pid = os.fork()
        if pid == 0:
            time.sleep(20)
            os._exit(0)
        tracker.close()
        started = time.monotonic()
        numpy.asarray(arena)[::4096] = 7            # every page, once write-protected
        print(round(time.monotonic() - started, 1))
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    """, timeout=15)
    assert float(out) < 5


def test_a_forked_child_does_not_keep_the_arena_registered():
    require("pagemap_scan")
    out = run_script("""
        import os, time, numpy, gctrack
        arena = gctrack.Arena(16 * 4096)
        tracker = gctrack.Tracker(arena, backend="pagemap_scan")
        pid = os.fork()
        if pid == 0:
            time.sleep(20)
            os._exit(0)
        tracker.close()
        with gctrack.Tracker(arena, backend="pagemap_scan") as again:   # EBUSY before
            numpy.asarray(arena)[4096] = 1
            print(len(again.scan()))
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    """, timeout=15)
    assert out.split() == ["1"]


@pytest.mark.parametrize("backend", ["pagemap_scan", "uffd_sync", "mprotect", "software"])
def test_a_forked_child_refuses_the_parents_tracker_and_closes_cleanly(backend):
    require(backend)
    out = run_script(f"""
        import os, numpy, gctrack
        arena = gctrack.Arena(16 * 4096)
        tracker = gctrack.Tracker(arena, backend="{backend}")
        cards = gctrack.CardTable.for_arena(arena, 4096)
        numpy.asarray(arena)[0] = 1
        pid = os.fork()
        if pid == 0:
            try:
                tracker.collect(cards)
                os._exit(3)
            except RuntimeError:
                pass
            tracker.close()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        tracker.record(arena.address, 1)
        tracker.collect(cards)
        print(os.waitstatus_to_exitcode(status), cards.is_dirty(arena.address))
    """, timeout=30)
    assert out.split() == ["0", "True"], "the child refused, and the parent still sees its write"


# ---- use after close: every public method of every closable class ----------------

def closed_tracker(backend):
    arena = gctrack.Arena(16 * gctrack.features().page_size)
    tracker = gctrack.Tracker(arena, backend=backend)
    tracker.close()
    return arena, tracker


TRACKER_CALLS = {
    "collect": lambda t, a: t.collect(gctrack.CardTable.for_arena(a)),
    "scan": lambda t, a: t.scan(),
    "reset": lambda t, a: t.reset(),
    "record": lambda t, a: t.record(a.address, 8),
    "discard": lambda t, a: t.discard(a.address, a.page_size),
    "external_write": lambda t, a: t.external_write(a.address, 8),
    "begin_external_write": lambda t, a: t.begin_external_write(a.address, 8),
    "end_external_write": lambda t, a: t.end_external_write(a.address, 8),
    "start": lambda t, a: t.start(),
    "stop": lambda t, a: t.stop(),
    "drain": lambda t, a: t.drain(gctrack.CardTable.for_arena(a)),
    "granularity": lambda t, a: t.granularity,
    "__enter__": lambda t, a: t.__enter__(),
}


@pytest.mark.parametrize("call", sorted(TRACKER_CALLS))
def test_every_tracker_method_after_close_raises_value_error(backend, call):
    arena, tracker = closed_tracker(backend)
    with pytest.raises(ValueError, match="tracker is closed"):
        TRACKER_CALLS[call](tracker, arena)
    tracker.close()                                   # still idempotent
    assert not tracker.running and tracker.loop_stats.passes == 0
    assert "closed" in repr(tracker)


def test_closing_a_backend_that_a_tracker_drives_is_refused(arena, backend):
    instance = gctrack.BACKENDS[backend](arena)
    with gctrack.Tracker(arena, backend=instance) as tracker:
        with pytest.raises(RuntimeError, match="close the Tracker"):
            instance.close()
        numpy.asarray(arena)[0] = 1
        assert len(tracker.scan()) == 1               # still armed and working
    assert instance.arena is None                     # the tracker closed it
    instance.close()                                  # idempotent once free


def test_a_closed_backend_cannot_be_adopted(arena, backend):
    instance = gctrack.BACKENDS[backend](arena)
    instance.close()
    with pytest.raises(ValueError, match="closed"):
        gctrack.Tracker(arena, backend=instance)


ARENA_CALLS = {
    "address": lambda a: a.address,
    "view": lambda a: a.view(numpy.uint8),
    "prefault": lambda a: a.prefault(),
    "__array__": lambda a: numpy.asarray(a),
    "buffer": lambda a: memoryview(a),
    "__enter__": lambda a: a.__enter__(),
}


@pytest.mark.parametrize("call", sorted(ARENA_CALLS))
def test_every_arena_method_after_close_raises_value_error(call):
    arena = gctrack.Arena(4096)
    arena.close()
    with pytest.raises(ValueError, match="arena is closed"):
        ARENA_CALLS[call](arena)
    arena.close()
    assert "closed" in repr(arena)


@pytest.mark.parametrize("call", ["get", "reset"])
def test_every_write_watch_method_after_close_raises_value_error(arena, call):
    require("pagemap_scan")
    watch = gctrack.WriteWatch(arena, backend="pagemap_scan")
    watch.close()
    with pytest.raises(ValueError, match="closed"):
        getattr(watch, call)()


def test_a_heaps_tracker_cannot_be_closed_behind_its_back():
    with gctrack.Heap(1 << 20, backend="software") as heap:
        with pytest.raises(RuntimeError, match="close the Heap"):
            heap.tracker.close()
        obj = heap.alloc(root=True)
        heap.set_ref(obj, 0, obj)
        assert gctrack.Collector(heap).collect().live >= 1
