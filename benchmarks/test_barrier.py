"""What the software barrier costs a C embedder per store: no barrier, the
inline gct_barrier_mark() of gctrack.h, and the capsule's record(), side by
side on one pre-faulted arena (benchmarks/barrier.c)."""
import ctypes
import sysconfig

import pytest

import gctrack
from conftest import MiB, compile_library

STORES = 1_000_000
#: Implementation (as the summary names it) -> store_loop's mode.
MODES = {"untracked": 0, "inline_barrier": 1, "capsule_record": 2}


@pytest.fixture(scope="module")
def barrier_lib(tmp_path_factory):
    library = compile_library(tmp_path_factory, "barrier.c", sysconfig.get_paths()["include"])
    with_gil = ctypes.PyDLL(str(library))        # bind() needs the GIL and may raise
    with_gil.bind.argtypes = [ctypes.py_object, ctypes.py_object]
    without_gil = ctypes.CDLL(str(library))
    without_gil.store_loop.argtypes = [ctypes.c_int, ctypes.c_size_t]
    return with_gil, without_gil


@pytest.mark.parametrize("impl", MODES)
def test_barrier_cost_per_store(benchmark, barrier_lib, impl):
    with_gil, without_gil = barrier_lib
    with gctrack.Arena(64 * MiB) as arena:
        arena.prefault()
        with gctrack.Tracker(arena, backend="software") as tracker:
            assert with_gil.bind(arena, tracker) == 0
            benchmark.group = f"software barrier from C, {STORES:,} page-strided stores"
            benchmark.extra_info["pages"] = STORES      # the summary divides by it: per store
            benchmark.pedantic(without_gil.store_loop, args=(MODES[impl], STORES), rounds=9,
                               iterations=1, warmup_rounds=1)
            cards = gctrack.CardTable.for_arena(arena, 64)
            tracker.collect(cards)
            assert (cards.count() > 0) == (MODES[impl] > 0)
