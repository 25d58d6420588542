"""``python -m gctrack bench``: a curated comparison of every backend.

It measures the first-write fault a mutator pays and the cost of one collect
+ re-arm pass, against arena size and dirty fraction. It prints a table with
ratios to pagemap_scan, and writes the raw results as JSON and CSV, plus PNG
plots when matplotlib is installed (``pip install 'gctrack[plots]'``). The
pytest-benchmark suite in benchmarks/ is the rigorous version, and the one
with the raw C reference beside.
"""
from __future__ import annotations

import csv
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy

import gctrack
from gctrack.testing import store_bytes

MiB = 1 << 20
BACKENDS = ("pagemap_scan", "mprotect", "uffd_sync", "soft_dirty", "software")
REFERENCE = "pagemap_scan"
#: Cells whose set-up would store into more pages than this are skipped for
#: the backends whose first write costs tens of microseconds.
SLOW_SETUP_PAGES = {"uffd_sync": 100_000, "mprotect": 300_000}


def max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


def skip_reason(backend: str, written_pages: int, scattered: bool) -> str | None:
    """Why a cell that writes this many pages (isolated ones when
    ``scattered``) before each pass is not measured, or None."""
    if written_pages > SLOW_SETUP_PAGES.get(backend, written_pages):
        return f"{backend}: setting up {written_pages} first writes per round takes too long"
    if backend == "mprotect" and scattered and 2 * written_pages > max_map_count():
        # Each isolated writable page splits the mapping in two; past the limit
        # the handler opens the whole arena (correct, but not the cost measured).
        return (f"mprotect: {written_pages} isolated writable pages exceed "
                f"vm.max_map_count={max_map_count()} mappings")
    return None


@dataclass(frozen=True)
class Sweep:
    sizes: tuple[int, ...]
    fractions: tuple[float, ...]
    first_write_pages: int
    rounds: int


FULL = Sweep((64 * MiB, 256 * MiB, 1024 * MiB, 4096 * MiB), (0.0, 0.001, 0.01, 0.1, 1.0), 2048, 7)
QUICK = Sweep((64 * MiB, 256 * MiB), (0.0, 0.01, 0.1), 1024, 3)


@dataclass(frozen=True)
class Result:
    kind: str            # "first_write" (seconds per page) or "collect" (seconds per pass)
    backend: str
    size: int            # arena bytes
    fraction: float      # share of pages written before the pass
    seconds: float       # median; nan when not measured
    note: str = ""       # why not measured


def median_of(rounds: int, setup, timed) -> float:
    """The median over ``rounds`` of timed(), each after an untimed setup()."""
    times = []
    for _ in range(rounds + 1):                      # the first round warms up
        setup()
        started = time.perf_counter()
        timed()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def first_write(backend: str, sweep: Sweep) -> Result:
    size = sweep.first_write_pages * gctrack.features().page_size
    with gctrack.Arena(size) as arena:
        arena.prefault()
        with gctrack.Tracker(arena, backend=backend) as tracker:
            offsets = numpy.arange(arena.num_pages, dtype=numpy.uint64) * arena.page_size
            seconds = median_of(sweep.rounds, tracker.reset,
                                lambda: store_bytes(arena, offsets, tracker))
    return Result("first_write", backend, size, 1.0, seconds / sweep.first_write_pages)


def collect(backend: str, arena, fraction: float, sweep: Sweep) -> Result:
    step = round(1 / fraction) if fraction else 0
    pages = -(-arena.num_pages // step) if step else 0
    reason = skip_reason(backend, pages, step > 1)
    if reason:
        return Result("collect", backend, arena.size, fraction, float("nan"), reason)
    offsets = (numpy.arange(0, arena.num_pages, step, dtype=numpy.uint64) * arena.page_size
               if step else numpy.zeros(0, dtype=numpy.uint64))
    with gctrack.Tracker(arena, backend=backend) as tracker:
        cards = gctrack.CardTable.for_arena(arena, 512)

        def dirty():
            store_bytes(arena, offsets, tracker)
            cards.clear()

        seconds = median_of(sweep.rounds, dirty, lambda: tracker.collect(cards))
    return Result("collect", backend, arena.size, fraction, seconds)


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def step(self, label: str) -> None:
        self.done += 1
        filled = 30 * self.done // self.total
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label:<40}")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


def run(sweep: Sweep) -> tuple[list[Result], dict[str, str]]:
    """Measure every available backend; return the results and, by name, why
    the others are unavailable."""
    support = gctrack.features().backends
    available = [b for b in BACKENDS if support[b]]
    missing = {b: support[b].reason for b in BACKENDS if not support[b]}
    progress = Progress(len(available) * (1 + len(sweep.sizes) * len(sweep.fractions)))
    results = []
    for backend in available:
        results.append(first_write(backend, sweep))
        progress.step(f"first write, {backend}")
    for size in sweep.sizes:
        with gctrack.Arena(size) as arena:
            arena.prefault()
            for backend in available:
                for fraction in sweep.fractions:
                    results.append(collect(backend, arena, fraction, sweep))
                    progress.step(f"collect {backend} {size // MiB} MiB {fraction:.1%}")
    return results, missing


def table(results: list[Result], missing: dict[str, str]) -> str:
    """One row per measurement, one column per backend, ratios to pagemap_scan."""
    backends = [b for b in BACKENDS if b not in missing]
    rows: dict[tuple, dict[str, float]] = {}
    for r in results:
        rows.setdefault((r.kind, r.size, r.fraction), {})[r.backend] = r.seconds
    lines = [f"{'measure':<34}" + "".join(f"{b:>22}" for b in backends)]
    for (kind, size, fraction), cells in rows.items():
        label = ("first write, per page" if kind == "first_write"
                 else f"collect {size // MiB} MiB, {fraction:.1%} dirty")
        reference = cells.get(REFERENCE)
        line = f"{label:<34}"
        for b in backends:
            value = cells.get(b, float("nan"))
            if value != value:
                line += f"{'-':>22}"
            elif reference:
                line += f"{value * 1e6:>12.3f} us {value / reference:>5.2f}x"
            else:
                line += f"{value * 1e6:>19.3f} us"
        lines.append(line)
    for backend, reason in missing.items():
        lines.append(f"{backend}: unavailable ({reason})")
    return "\n".join(lines)


def write_outputs(results: list[Result], missing: dict[str, str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in results]
    written = [out / "results.json", out / "results.csv"]
    written[0].write_text(json.dumps({"kernel": gctrack.features().kernel_release,
                                      "results": rows, "unavailable": missing}, indent=1))
    with written[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return written + plot(results, out)


def plot(results: list[Result], out: Path) -> list[Path]:
    """Pass cost against arena size and against dirty fraction, if matplotlib is there."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    collects = [r for r in results if r.kind == "collect" and r.seconds == r.seconds]
    paths = []
    for axis, fixed, name in (("size", "fraction", "cost_vs_size.png"),
                              ("fraction", "size", "cost_vs_fraction.png")):
        chosen = sorted({getattr(r, fixed) for r in collects})
        pick = chosen[len(chosen) // 2] if chosen else None
        figure, ax = plt.subplots(figsize=(7, 4.5))
        for backend in BACKENDS:
            points = sorted((getattr(r, axis), r.seconds) for r in collects
                            if r.backend == backend and getattr(r, fixed) == pick)
            if points:
                xs = [x / MiB if axis == "size" else x * 100 for x, _ in points]
                ax.plot(xs, [y * 1e3 for _, y in points], marker="o", label=backend)
        ax.set_xlabel("arena size (MiB)" if axis == "size" else "pages written (%)")
        ax.set_ylabel("one collect + re-arm (ms)")
        ax.set_xscale("log" if axis == "size" else "symlog")
        ax.set_yscale("log")
        ax.set_title(f"collect cost, {fixed} fixed at "
                     f"{pick / MiB:.0f} MiB" if fixed == "size" else f"collect cost, {pick:.1%} written")
        ax.legend()
        figure.tight_layout()
        figure.savefig(out / name, dpi=110)
        plt.close(figure)
        paths.append(out / name)
    return paths
