"""Benchmark fixtures: arenas armed by gctrack and by the raw C reference, and
the ratio summary printed at the end of a run."""
from __future__ import annotations

import ctypes
import os
import shutil
import statistics
import subprocess
from pathlib import Path

import numpy
import pytest

import gctrack

HERE = Path(__file__).parent
MiB = 1 << 20


@pytest.fixture(scope="session")
def raw_c(tmp_path_factory):
    """The raw C pass (raw_pass.c), compiled now and loaded with ctypes."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        pytest.skip("no C compiler for the raw C reference")
    library = tmp_path_factory.mktemp("raw") / "raw_pass.so"
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", f"-I{gctrack.get_include()}",
                    str(HERE / "raw_pass.c"), "-o", str(library)], check=True)
    lib = ctypes.CDLL(str(library))
    lib.raw_arm.argtypes = [ctypes.c_uint64, ctypes.c_uint64]
    lib.raw_pass.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p,
                             ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint]
    lib.raw_pass.restype = ctypes.c_long
    return lib


def require_pagemap_scan():
    support = gctrack.features().pagemap_scan
    if not support:
        pytest.skip(f"pagemap_scan unavailable: {support.reason}")


def written_offsets(arena, fraction: float) -> numpy.ndarray:
    """Byte offsets of one store into every k-th page, k = 1 / fraction."""
    step = max(1, round(1 / fraction))
    return numpy.arange(0, arena.num_pages, step, dtype=numpy.int64) * arena.page_size


def pytest_terminal_summary(terminalreporter, config):
    """Median ratio of gctrack to the raw C reference, per group, side by side."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return
    groups: dict[str, dict[str, float]] = {}
    for bench in session.benchmarks:
        if bench.stats is None or "[" not in bench.name:
            continue
        impl = bench.params.get("impl") if bench.params else None
        if impl:
            groups.setdefault(bench.group, {})[impl] = bench.stats.median
    rows = [(g, m["gctrack"], m["raw_c"]) for g, m in sorted(groups.items())
            if "gctrack" in m and "raw_c" in m]
    if not rows:
        return
    terminalreporter.write_sep("-", "gctrack / raw C, median pass time")
    for group, ours, raw in rows:
        terminalreporter.write_line(f"{group:<40} gctrack {ours * 1e6:9.1f} us   raw C "
                                    f"{raw * 1e6:9.1f} us   ratio {ours / raw:5.3f}")
    ratios = [ours / raw for _, ours, raw in rows]
    terminalreporter.write_line(f"geometric mean ratio {statistics.geometric_mean(ratios):.3f}, "
                                f"worst {max(ratios):.3f}")
