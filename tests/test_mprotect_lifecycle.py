"""The mprotect backend's SIGSEGV handler over the life of a process: closing
under native writers, fork, other handlers installed over it, the mapping it
splits, and the constructor's proof that it works.

Everything that could crash or hang runs in a subprocess with a timeout.
"""
import platform
import subprocess
import sys
import textwrap

import numpy
import pytest

import gctrack
from conftest import require
from gctrack.testing import store_bytes


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (without faulthandler unless it enables it)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def mprotect_works():
    require("mprotect")


# ---- closing while native threads write ---------------------------------------------------

CLOSE_UNDER_WRITERS = """
    import sys, time
    import numpy, gctrack
    from gctrack.testing import NativeWriters

    cycles, how = int(sys.argv[1]), sys.argv[2]
    rng = numpy.random.default_rng(1)
    pages = 512
    overlapped = 0
    for cycle in range(cycles):
        arena = gctrack.Arena(pages * 4096)
        arena.prefault()
        tracker = gctrack.Tracker(arena, backend="mprotect")
        offsets = [rng.permutation(pages).astype(numpy.uint64) * 4096 + k for k in range(4)]
        writers = NativeWriters(arena, offsets, spin=20).start()
        time.sleep(0.0002)
        if how == "close":
            tracker.close()
        else:
            del tracker
        overlapped += not writers.finished()
        writers.join()
        arena.close()
    print(f"{overlapped} of {cycles} closes overlapped the writers")
"""


@pytest.mark.parametrize("how", ["close", "del"])
def test_closing_while_native_threads_write_never_crashes(how):
    """A fault raised before close() and delivered after it is retried, and
    the handler is never removed (the old code restored SIG_DFL with the last
    arena and crashed within 20 cycles)."""
    run = run_python(CLOSE_UNDER_WRITERS, "300", how, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    overlapped = int(run.stdout.split()[0])
    assert overlapped > 100, f"the race was not exercised: {run.stdout}"


EXIT_UNDER_WRITERS = """
    import time
    import numpy, gctrack
    from gctrack.testing import NativeWriters

    rng = numpy.random.default_rng()
    arena = gctrack.Arena(2048 * 4096)
    arena.prefault()
    tracker = gctrack.Tracker(arena, backend="mprotect")
    offsets = [rng.permutation(2048).astype(numpy.uint64) * 4096 for _ in range(4)]
    writers = NativeWriters(arena, offsets, spin=200).start()
    time.sleep(0.0005)
    # The interpreter exits and tears the tracker down while the writers fault.
"""


def test_exiting_while_native_threads_write_never_crashes():
    """The old code crashed in about 5 % of such exits."""
    for attempt in range(30):
        run = run_python(EXIT_UNDER_WRITERS, timeout=60)
        assert run.returncode == 0, f"exit {attempt}: {run.returncode} {run.stderr[-2000:]}"


REAL_FAULT_IN_RETIRED_RANGE = """
    import ctypes, faulthandler, sys, time
    import numpy, gctrack
    if sys.argv[1] == "faulthandler":
        faulthandler.enable()
    arena = gctrack.Arena(4 * 4096)
    tracker = gctrack.Tracker(arena, backend="mprotect")
    tracker.close()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(arena.address, arena.size, 1) == 0      # PROT_READ, by someone else
    print("writing", flush=True)
    ctypes.memset(arena.address + 4096, 1, 1)                       # a real fault
    print("survived", flush=True)
"""


@pytest.mark.parametrize("mode", ["default", "faulthandler"])
def test_a_real_fault_in_a_retired_range_is_passed_on_not_retried_forever(mode):
    run = run_python(REAL_FAULT_IN_RETIRED_RANGE, mode, timeout=60)
    assert "writing" in run.stdout and "survived" not in run.stdout
    assert run.returncode == -11, run.stderr[-2000:]
    if mode == "faulthandler":
        assert "Fatal Python error: Segmentation fault" in run.stderr


# ---- fork ---------------------------------------------------------------------------------

FORK_DURING_PASSES = """
    import os, time
    import numpy, gctrack

    arena = gctrack.Arena(256 * 4096)
    tracker = gctrack.Tracker(arena, backend="mprotect")
    tracker.start(interval=1e-6)                 # passes back to back
    view = numpy.asarray(arena)
    for attempt in range(30):
        view[::4096] += 1                        # keep the passes busy
        pid = os.fork()
        if pid == 0:
            # The child: a pass may have been running at fork(); its writes
            # must not wait for it, and it can close and arm trackers itself.
            view[::4096] += 1
            tracker.close()
            with gctrack.Arena(8 * 4096) as mine, \\
                    gctrack.Tracker(mine, backend="mprotect") as own:
                numpy.asarray(mine)[3 * 4096] = 1
                assert [int(r["start"]) - mine.address for r in own.scan()] == [3 * 4096]
            os._exit(0)
        for _ in range(3000):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        else:
            os.kill(pid, 9)
            raise SystemExit(f"child {attempt} hung")
        assert status == 0, f"child {attempt} exited with {status}"
    cards = gctrack.CardTable.for_arena(arena, 4096)
    tracker.drain(cards)
    view[5 * 4096] += 1
    cards.clear()
    tracker.drain(cards)
    assert cards.indices().tolist() == [5], cards.indices()
    tracker.close()
    print("ok")
"""


def test_forked_children_never_wait_on_the_parents_passes():
    run = run_python(FORK_DURING_PASSES, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


# ---- another SIGSEGV handler installed after arming ----------------------------------------

REPLACED_HANDLER = """
    import errno, faulthandler, signal, sys
    import numpy, gctrack

    how = sys.argv[1]
    if how == "faulthandler.disable":
        faulthandler.enable()                    # the documented order: first
    arena = gctrack.Arena(16 * 4096)
    tracker = gctrack.Tracker(arena, backend="mprotect")
    cards = gctrack.CardTable.for_arena(arena, 4096)
    view = numpy.asarray(arena)
    view[1 * 4096] = 1
    tracker.collect(cards)
    assert cards.indices().tolist() == [1]

    if how == "faulthandler.enable":
        faulthandler.enable()
    elif how == "faulthandler.disable":
        faulthandler.disable()
    else:
        signal.signal(signal.SIGSEGV, lambda *args: None)

    # A write now would crash or loop for ever; the next pass notices first.
    cards.clear()
    try:
        tracker.collect(cards)
    except gctrack.TrackerError as exc:
        assert exc.errno == errno.EBUSY, exc
        print(exc)
    else:
        raise SystemExit("the pass did not notice the replaced handler")
    view[:] = 7                                  # every page is writable: no crash, no loop
    print("wrote every page", flush=True)

    # Once gctrack's handler is back, nothing was lost: every page is reported.
    if how == "faulthandler.enable":
        faulthandler.disable()                   # gives back gctrack's handler
    else:
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        with gctrack.Arena(4096) as other, gctrack.Tracker(other, backend="mprotect"):
            pass                                 # arming puts it back over SIG_DFL
    tracker.collect(cards)
    assert cards.count() == 16, cards.indices()
    cards.clear()
    view[9 * 4096] = 1
    tracker.collect(cards)
    assert cards.indices().tolist() == [9], cards.indices()
    print("recovered")
"""


@pytest.mark.parametrize("how, named", [
    ("faulthandler.enable", "also handles SIGBUS and SIGFPE"),
    ("faulthandler.disable", "SIG_DFL"),
    ("signal.signal", "signal.signal(SIGSEGV"),
])
def test_a_handler_installed_after_arming_fails_the_pass_and_loses_nothing(how, named):
    run = run_python(REPLACED_HANDLER, how, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    first = run.stdout.splitlines()[0]
    assert "SIGSEGV handler replaced by" in first and named in first, first
    assert "writable and all dirty" in first
    assert run.stdout.splitlines()[1:] == ["wrote every page", "recovered"]


ARMING_UNDER_A_FOREIGN_HANDLER = """
    import faulthandler
    import gctrack
    from gctrack.mprotect import MprotectBackend

    with gctrack.Arena(4096) as a, gctrack.Tracker(a, backend="mprotect"):
        pass
    faulthandler.enable()                        # over gctrack's handler, chaining to it
    with gctrack.Arena(4096) as b:
        try:
            MprotectBackend(b)
        except gctrack.UnsupportedError as exc:
            print(exc.mechanism, "|", exc.reason)
        else:
            raise SystemExit("armed under a handler that chains to gctrack's")
        assert b.armed_by is None
"""


def test_arming_under_a_handler_that_may_chain_to_ours_is_unsupported():
    run = run_python(ARMING_UNDER_A_FOREIGN_HANDLER, timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("mprotect | SIGSEGV handler replaced by"), run.stdout


FAULTHANDLER_FIRST = """
    import ctypes, faulthandler
    import numpy, gctrack
    from gctrack.testing import NativeWriters

    faulthandler.enable()
    arena = gctrack.Arena(64 * 4096)
    tracker = gctrack.Tracker(arena, backend="mprotect")
    offsets = numpy.arange(64, dtype=numpy.uint64) * 4096
    with NativeWriters(arena, [offsets[::2], offsets[1::2]]):
        pass
    assert len(tracker.scan()) == 1 and tracker.scan().size == 0
    print("tracked writes ok", flush=True)
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    page = libc.mmap(None, 4096, 1, 0x22, -1, 0)            # PROT_READ, private anonymous
    ctypes.memset(page, 1, 1)                                # a real crash, outside any arena
"""


def test_faulthandler_enabled_first_still_reports_real_crashes():
    run = run_python(FAULTHANDLER_FIRST, timeout=60)
    assert "tracked writes ok" in run.stdout, run.stderr[-3000:]
    assert run.returncode == -11
    assert "Fatal Python error: Segmentation fault" in run.stderr


# ---- the mapping per-page protection splits ----------------------------------------------

def lines_in_maps(lo: int, hi: int) -> int:
    """Lines of /proc/self/maps that overlap [lo, hi)."""
    count = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            count += start < hi and end > lo
    return count


def test_passes_and_close_merge_the_mapping_of_a_never_touched_arena(page_size):
    """Each page written in a never-touched arena used to keep a mapping of its
    own: thousands of /proc/self/maps lines a round, never merged back."""
    arena = gctrack.Arena(4096 * page_size)              # not prefaulted
    lo, hi = arena.address, arena.address + arena.size
    tracker = gctrack.Tracker(arena, backend="mprotect")
    cards = gctrack.CardTable.for_arena(arena, page_size)
    rng = numpy.random.default_rng(5)
    after_writes = []
    for _ in range(4):
        pages = rng.choice(arena.num_pages, 1000, replace=False)
        store_bytes(arena, (pages * page_size).astype(numpy.uint64))
        after_writes.append(lines_in_maps(lo, hi))
        cards.clear()
        tracker.collect(cards)
        assert cards.count() == 1000
        assert lines_in_maps(lo, hi) == 1, "a pass left the arena's mapping in pieces"
    assert max(after_writes) <= 2 * 1000 + 1                  # writable pages, between passes
    tracker.close()
    assert lines_in_maps(lo, hi) == 1
    arena.close()


# ---- the constructor proves the mechanism ------------------------------------------------

SECCOMP = """
    import ctypes, errno, struct

    def seccomp_errno(syscall_nr, arg_index, arg_value, err):
        # Make syscall_nr(..., args[arg_index] == arg_value, ...) return -err
        # (0: pretend to succeed) without running it; allow everything else.
        AUDIT_ARCH_X86_64 = 0xC000003E
        LD, JEQ, RET = 0x20, 0x15, 0x06
        args = 16 + 8 * arg_index
        program = [
            (LD, 0, 0, 4), (JEQ, 0, 5, AUDIT_ARCH_X86_64),
            (LD, 0, 0, 0), (JEQ, 0, 3, syscall_nr),
            (LD, 0, 0, args), (JEQ, 0, 1, arg_value),
            (RET, 0, 0, 0x00050000 | err),
            (RET, 0, 0, 0x7FFF0000),
        ]
        code = b"".join(struct.pack("HBBI", *insn) for insn in program)
        buf = ctypes.create_string_buffer(code)
        prog = struct.pack("HxxxxxxQ", len(program), ctypes.addressof(buf))
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(38, 1, 0, 0, 0) == 0                      # PR_SET_NO_NEW_PRIVS
        assert libc.prctl(22, 2, ctypes.c_char_p(prog), 0, 0) == 0, ctypes.get_errno()
"""

PROOF_FAILS = SECCOMP + """
    import sys
    import numpy, gctrack
    from gctrack.mprotect import MprotectBackend

    arena = gctrack.Arena(8 * 4096)
    if sys.argv[1] == "mprotect":
        seccomp_errno(10, 2, 1, 0)               # mprotect(..., PROT_READ) "succeeds", does nothing
    else:
        seccomp_errno(13, 0, 11, errno.EPERM)    # rt_sigaction(SIGSEGV, ...) fails
    try:
        MprotectBackend(arena)                   # built directly: no probe in front of it
    except gctrack.UnsupportedError as exc:
        print(exc.mechanism, exc.errno, "|", exc.reason)
    else:
        raise SystemExit("armed a mechanism that does not work")
    assert arena.armed_by is None
    numpy.asarray(arena)[:] = 1                  # the arena is left writable
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the seccomp filter is x86-64's")
@pytest.mark.parametrize("broken, expected", [
    ("mprotect", "mprotect 95 | a write to an armed page did not reach"),
    ("sigaction", "mprotect 1 | sigaction(SIGSEGV): Operation not permitted"),
])
def test_the_constructor_proves_the_mechanism_works(broken, expected):
    run = run_python(PROOF_FAILS, broken, timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith(expected), run.stdout
