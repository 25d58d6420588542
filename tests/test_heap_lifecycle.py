"""Heap, NativeMutators and NativeWriters through their whole life: nested
stops of the world, restarts, root slots given back, use after close, fork.

Anything that used to segfault or hang runs in a fresh interpreter with a
timeout, so that a crash fails the test instead of killing pytest.
"""
import subprocess
import sys
import textwrap
import time

import numpy
import pytest

from conftest import work_done
from gctrack.arena import Arena
from gctrack.collector import Collector
from gctrack.heap import Heap
from gctrack.mutator import NativeMutators
from gctrack.testing import NativeWriters, store_bytes
from gctrack.tracker import Tracker

PREAMBLE = """\
import os, sys, time
import gctrack
from gctrack.arena import Arena
from gctrack.collector import Collector
from gctrack.heap import Heap
from gctrack.mutator import NativeMutators, populate
from gctrack.testing import NativeWriters, store_bytes
from gctrack.tracker import Tracker
"""


def run_script(body: str, timeout: float = 60) -> str:
    """Run ``body`` in a fresh interpreter; a crash, hang or non-zero exit fails."""
    try:
        result = subprocess.run([sys.executable, "-c", PREAMBLE + textwrap.dedent(body)],
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the script hung for {timeout} s")
    assert result.returncode == 0, f"exit status {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout


def stores_made_during(mutators, seconds: float) -> int:
    before = mutators.stats()["stores"]
    time.sleep(seconds)
    return mutators.stats()["stores"] - before


@pytest.fixture
def heap():
    with Heap(4 << 20, backend="software") as h:
        yield h


# ---- stopping the world nests -------------------------------------------------------

def test_a_paused_world_stays_paused_through_a_collect(heap):
    with NativeMutators(heap, threads=2, rate=0) as mutators:
        time.sleep(0.02)
        mutators.pause()
        before = work_done(mutators)
        Collector(heap).collect()
        Collector(heap).collect(concurrent=False)
        time.sleep(0.05)
        assert work_done(mutators) == before
        mutators.resume()
        assert stores_made_during(mutators, 0.05) > 0


def test_pause_is_idempotent_and_resume_withdraws_only_its_own_pause(heap):
    with NativeMutators(heap, threads=1, rate=0) as mutators, \
            NativeMutators(heap, threads=1, rate=0) as other:
        mutators.pause()
        mutators.pause()
        other.resume()                       # other never paused: nothing to withdraw
        assert stores_made_during(mutators, 0.05) == 0
        mutators.resume()                    # one resume undoes both pause() calls
        assert stores_made_during(mutators, 0.05) > 0
        mutators.resume()                    # no pause left: nothing happens
        other.pause()
        other.pause()
        assert stores_made_during(mutators, 0.05) == 0
        other.resume()
        assert stores_made_during(mutators, 0.05) > 0


# ---- NativeMutators: start, stop, root slots ------------------------------------------

def test_mutators_start_into_a_paused_world_and_stop_while_it_is_paused():
    """start() used to wait forever (without the GIL, deaf to Ctrl-C) for
    threads that could not join a stopped world."""
    out = run_script("""
        heap = Heap(4 << 20, backend="software")
        first = NativeMutators(heap, threads=1, rate=0).start()
        first.pause()
        second = NativeMutators(heap, threads=2, rate=0, seed=3).start()
        assert heap.mutator_threads == 3, heap.mutator_threads
        time.sleep(0.05)
        assert second.stats()["stores"] == 0, second.stats()
        first.resume()
        time.sleep(0.05)
        assert second.stats()["stores"] > 0
        second.pause()
        first.stop()                 # its threads leave although second keeps the world stopped
        assert heap.mutator_threads == 2, heap.mutator_threads
        second.stop()
        heap.close()
        print("ok")
    """, timeout=30)
    assert out.strip() == "ok"


def test_start_after_stop_returns_once_the_new_threads_are_registered(heap):
    mutators = NativeMutators(heap, threads=16, rate=1000)
    for _ in range(3):
        mutators.start()
        assert heap.mutator_threads == 16
        mutators.stop()
        assert heap.mutator_threads == 0


def test_stopped_mutators_give_their_root_slots_back():
    with Heap(1 << 20, backend="software", max_roots=1024) as heap:
        collector = Collector(heap)
        for seed in range(300):                    # 300 * 8 slots > 1024
            with NativeMutators(heap, threads=1, rate=0, roots_per_thread=8, seed=seed) as m:
                deadline = time.monotonic() + 5
                while m.stats()["root_changes"] == 0 and time.monotonic() < deadline:
                    time.sleep(0.001)
                assert heap.reserved_roots.sum() == 8 and heap.roots()
            assert heap.roots() == [] and not heap.reserved_roots.any()
            collector.collect()                    # frees what they allocated
        NativeMutators(heap, threads=2, roots_per_thread=512).start().stop()
        with pytest.raises(ValueError, match="root slots"):
            NativeMutators(heap, threads=1, roots_per_thread=1025)
        assert Collector(heap).collect().live == 0      # the mutators' objects are garbage now


def test_a_dropped_never_stopped_mutators_object_releases_its_threads_and_roots(heap):
    NativeMutators(heap, threads=2, rate=0).start()       # dropped at once: __dealloc__ joins
    assert heap.mutator_threads == 0 and not heap.reserved_roots.any()
    heap.close()


# ---- use after close ------------------------------------------------------------------

CLOSERS = {
    "heap.close": "heap.close()",
    "arena.close": "heap.arena.close()",
}

USES_OF_A_CLOSED_HEAP = {
    "alloc": "heap.alloc()",
    "alloc_root": "heap.alloc(root=True)",
    "free_root_slot": "heap.free_root_slot()",
    "set_ref": "heap.set_ref(obj, 0, 0)",
    "get_ref": "heap.get_ref(obj, 0)",
    "add_root": "heap.add_root(obj)",
    "remove_root": "heap.remove_root(obj)",
    "roots": "heap.roots()",
    "root_slots": "heap.root_slots",
    "view": "heap.view()",
    "allocated": "heap.allocated()",
    "enter": "heap.__enter__()",
    "populate": "populate(heap, 10)",
    "Collector": "Collector(heap)",
    "Collector.collect": "collector.collect()",
    "Collector.collect_stop_the_world": "collector.collect(concurrent=False)",
    "NativeMutators": "NativeMutators(heap)",
    "NativeMutators.start": "mutators.start()",
    "NativeMutators.enter": "mutators.__enter__()",
    "NativeMutators.pause": "mutators.pause()",
}


@pytest.mark.parametrize("use", USES_OF_A_CLOSED_HEAP.values(), ids=USES_OF_A_CLOSED_HEAP.keys())
def test_using_a_closed_heap_raises_value_error(use):
    run_script(f"""
        for closer in {list(CLOSERS.values())!r}:
            heap = Heap(1 << 20, backend="software")
            obj = heap.alloc(root=True)
            collector = Collector(heap)
            mutators = NativeMutators(heap, threads=1)
            exec(closer)
            try:
                {use}
            except ValueError as e:
                assert "heap is closed" in str(e), (closer, e)
            else:
                sys.exit(f"no ValueError after {{closer}}")
    """)


def test_a_closed_heap_keeps_its_harmless_parts(heap):
    mutators = NativeMutators(heap, threads=1)
    heap.close()
    heap.close()                                  # idempotent, like a file
    mutators.stop()
    mutators.resume()
    assert mutators.stats()["stores"] == 0
    assert heap.closed and heap.tracker.closed and "closed" in repr(heap)
    assert heap.num_objects == (4 << 20) // 64 and heap.backend == "software"


def test_native_writers_refuse_to_start_on_a_closed_arena(page_size):
    arena = Arena(16 * page_size)
    writers = NativeWriters(arena, [numpy.arange(0, 4096, 64)])
    arena.close()
    with pytest.raises(ValueError, match="arena is closed"):
        writers.start()
    with pytest.raises(ValueError, match="arena is closed"):
        writers.__enter__()
    writers.join()
    assert not writers.finished()
    del writers


def test_store_bytes_refuses_a_closed_software_tracker():
    """The barrier's dirty map is freed by close(): storing through it crashed."""
    run_script("""
        arena = Arena(256 << 20)
        tracker = Tracker(arena, backend="software")
        tracker.close()
        try:
            store_bytes(arena, [0, 4096, (256 << 20) - 1], tracker)
        except ValueError as e:
            assert "tracker is closed" in str(e), e
        else:
            sys.exit("no ValueError")
        arena.close()
        try:
            store_bytes(arena, [0])
        except ValueError as e:
            assert "arena is closed" in str(e), e
        else:
            sys.exit("no ValueError")
    """)


def test_store_bytes_still_stores_and_marks(page_size):
    with Arena(16 * page_size) as arena, Tracker(arena, backend="software") as t:
        store_bytes(arena, [0, 5 * page_size + 1], t)
        assert numpy.asarray(arena)[[0, 5 * page_size + 1]].all()
        assert t.scan()["start"].tolist() == [arena.address, arena.address + 5 * page_size]


# ---- fork -----------------------------------------------------------------------------

FORK_AND_WAIT = """
    pid = os.fork()
    if pid == 0:
        try:
            {in_child}
        except BaseException as e:
            print("child:", repr(e), file=sys.stderr, flush=True)
            os._exit(1)
        os._exit(0)
    deadline = time.monotonic() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            sys.exit("the child hung")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0, status
"""


def fork_script(setup: str, in_child: str, in_parent: str) -> str:
    """setup; fork; the child runs in_child and must exit 0 within 10 s; in_parent."""
    child = textwrap.indent(textwrap.dedent(in_child).strip(), " " * 12).lstrip()
    return (textwrap.dedent(setup) + textwrap.dedent(FORK_AND_WAIT.format(in_child=child))
            + textwrap.dedent(in_parent))


@pytest.mark.parametrize("in_child", ["mutators.stop(); heap.close()", "del mutators"],
                         ids=["stop", "drop"])
def test_a_forked_child_does_not_join_the_parents_mutators(in_child):
    run_script(fork_script("""
        heap = Heap(4 << 20, backend="software")
        mutators = NativeMutators(heap, threads=2, rate=0).start()
        time.sleep(0.01)
    """, in_child, """
        time.sleep(0.02)
        assert mutators.stats()["stores"] > 0
        mutators.stop()
        heap.close()
    """), timeout=30)


def test_a_forked_child_refuses_to_start_or_pause_the_parents_mutators():
    run_script(fork_script("""
        heap = Heap(4 << 20, backend="software")
        mutators = NativeMutators(heap, threads=1, rate=0)
    """, """
        for use in (mutators.start, mutators.pause):
            try:
                use()
            except RuntimeError as e:
                assert "after fork" in str(e), e
            else:
                os._exit(2)
    """, """
        mutators.start().stop()
    """), timeout=30)


@pytest.mark.parametrize("in_child", ["writers.join()", "del writers"], ids=["join", "drop"])
def test_a_forked_child_does_not_join_the_parents_writers(in_child):
    run_script(fork_script("""
        arena = Arena(1 << 20)
        writers = NativeWriters(arena, [[8 * i for i in range(20000)]], spin=2000).start()
        assert not writers.finished(), "the writer must still run at fork()"
    """, in_child, """
        writers.join()
        assert writers.finished()
    """), timeout=60)
