"""Benchmark fixtures (the raw C reference) and the ratio summary printed at
the end of a run: each group's medians against its reference, side by side."""
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

#: Card size and PAGEMAP_SCAN vector length of every pass benchmark.
CARD_SIZE = 512
VECTOR_LEN = 4096

#: Per group, the implementation the others are divided by, first one present.
REFERENCES = ("pagemap_scan", "raw_c", "untracked")


def compile_library(tmp_path_factory, source: str, *include_dirs: str) -> Path:
    """benchmarks/<source> compiled now into a shared library (with gctrack's
    headers on the include path); skips the benchmark without a C compiler."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        pytest.skip(f"no C compiler for {source}")
    library = tmp_path_factory.mktemp(Path(source).stem) / f"{Path(source).stem}.so"
    includes = [f"-I{folder}" for folder in (gctrack.get_include(), *include_dirs)]
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", *includes, str(HERE / source),
                    "-o", str(library)], check=True)
    return library


@pytest.fixture(scope="session")
def raw_c(tmp_path_factory):
    """The raw C pass (raw_pass.c), compiled now and loaded with ctypes."""
    lib = ctypes.CDLL(str(compile_library(tmp_path_factory, "raw_pass.c")))
    lib.raw_arm.argtypes = [ctypes.c_uint64, ctypes.c_uint64]
    lib.raw_pass.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p,
                             ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint]
    lib.raw_pass.restype = ctypes.c_long
    lib.raw_walk.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p,
                             ctypes.c_uint64]
    lib.raw_walk.restype = ctypes.c_long
    return lib


def require(backend: str) -> None:
    support = gctrack.features().backends[backend]
    if not support:
        pytest.skip(f"{backend} unavailable: {support.reason}")


def written_offsets(arena, fraction: float) -> numpy.ndarray:
    """Byte offsets of one store into every k-th page, k = 1 / fraction (none for 0)."""
    if fraction == 0:
        return numpy.zeros(0, dtype=numpy.int64)
    step = max(1, round(1 / fraction))
    return numpy.arange(0, arena.num_pages, step, dtype=numpy.int64) * arena.page_size


def smoke_run(config) -> bool:
    """pytest benchmarks --benchmark-disable: each benchmark once, as a test."""
    return bool(config.getoption("benchmark_disable", False))


class RawArena:
    """An arena armed and scanned by raw_pass.c alone."""

    def __init__(self, lib, size):
        self.lib = lib
        self.arena = gctrack.Arena(size)
        self.arena.prefault()
        self.uffd = lib.raw_arm(self.arena.address, self.arena.size)
        assert self.uffd >= 0, f"raw_arm failed: errno {-self.uffd}"
        self.pagemap = open("/proc/self/pagemap", "rb", buffering=0)
        self.vec = numpy.zeros(VECTOR_LEN * 3, dtype=numpy.uint64)
        self.cards = numpy.zeros(-(-size // CARD_SIZE // 64), dtype=numpy.uint64)

    def run_pass(self):
        pages = self.lib.raw_pass(self.pagemap.fileno(), self.arena.address,
                                  self.arena.address + self.arena.size,
                                  self.vec.ctypes.data, VECTOR_LEN, self.cards.ctypes.data,
                                  self.arena.address, CARD_SIZE.bit_length() - 1)
        assert pages >= 0
        return pages

    def close(self):
        os.close(self.uffd)
        self.pagemap.close()
        self.arena.close()



def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return
    groups: dict[str, dict[str, float]] = {}
    for bench in session.benchmarks:
        impl = (bench.params or {}).get("impl")
        if bench.stats is not None and impl:
            per = bench.extra_info.get("pages", 1)      # first-write groups: per page
            groups.setdefault(bench.group, {})[impl] = bench.stats.median / per
    pauses = [(b.params.get("impl"), b.extra_info) for b in session.benchmarks
              if b.params and "remark_pause_ms" in b.extra_info]
    if pauses:
        terminalreporter.write_sep("-", "remark pause against a stop-the-world full mark (medians)")
        for impl, info in pauses:
            terminalreporter.write_line(
                f"{impl:<14} remark {info['remark_pause_ms']:8.3f} ms   full mark "
                f"{info['full_mark_ms']:8.1f} ms   ratio {info['remark_over_full_mark']:7.2%}   "
                f"initial mark {info['initial_mark_pause_ms']:.3f} ms   concurrent mark "
                f"{info['concurrent_mark_ms']:.1f} ms   stores/s {info['mutator_stores_per_second']:,.0f}")
    lines = []
    for group, medians in sorted(groups.items()):
        reference = next((r for r in REFERENCES if r in medians), None)
        if reference is None or len(medians) < 2:
            continue
        cells = "  ".join(f"{impl} {t * 1e6:.3g} us ({t / medians[reference]:.2f}x)"
                          for impl, t in medians.items())
        lines.append(f"{group}: {cells}")
    if lines:
        terminalreporter.write_sep("-", "median times (per page for first writes), and ratios "
                                        f"to the group's reference (first of {', '.join(REFERENCES)})")
        for line in lines:
            terminalreporter.write_line(line)
        pairs = [g for g in groups.values() if "raw_c" in g and "gctrack" in g]
        if pairs:
            ratios = [g["gctrack"] / g["raw_c"] for g in pairs]
            terminalreporter.write_line(f"gctrack / raw C: geometric mean "
                                        f"{statistics.geometric_mean(ratios):.3f}, worst {max(ratios):.3f}")
