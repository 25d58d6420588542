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
import io
import json
import os
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
    """Progress on stderr: a one-line bar on a terminal, plain lines elsewhere."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.terminal = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.terminal:
            print(f"[{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)
            return
        filled = 30 * self.done // self.total
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label:<40}")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


def run(sweep: Sweep) -> tuple[list[Result], dict[str, str], bool]:
    """Measure every available backend. Returns the results, by name why the
    others are unavailable, and whether Ctrl-C cut the sweep short (the
    results then hold the cells that finished)."""
    support = gctrack.features().backends
    available = [b for b in BACKENDS if support[b]]
    missing = {b: support[b].reason for b in BACKENDS if not support[b]}
    progress = Progress(len(available) * (1 + len(sweep.sizes) * len(sweep.fractions)))
    results: list[Result] = []
    try:
        for backend in available:
            results.append(first_write(backend, sweep))
            progress.step(f"first write, {backend}")
        for size in sweep.sizes:
            with gctrack.Arena(size) as arena:
                arena.prefault()
                for backend in available:
                    for fraction in sweep.fractions:
                        results.append(collect(backend, arena, fraction, sweep))
                        progress.step(f"collect {backend} {size_label(size)} {fraction:.1%}")
    except KeyboardInterrupt:
        return results, missing, True
    return results, missing, False


def human_seconds(seconds: float) -> str:
    """A duration in the unit that reads best: 690 ns, 12.3 us, 1.23 ms, 2.1 s."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            value = seconds / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def size_label(size: int) -> str:
    return f"{size // 1024 ** 3} GiB" if size >= 1024 ** 3 else f"{size // MiB} MiB"


def fraction_label(fraction: float) -> str:
    return f"{fraction * 100:g} %"


def table(results: list[Result], missing: dict[str, str]) -> str:
    """One row per measurement, one column per backend, ratios to pagemap_scan;
    a skipped cell shows a footnote number, and the footnotes its reason."""
    backends = [b for b in BACKENDS if b not in missing]
    rows: dict[tuple, dict[str, Result]] = {}
    for r in results:
        rows.setdefault((r.kind, r.size, r.fraction), {})[r.backend] = r
    notes: list[str] = []
    lines = [f"{'measure':<30}" + "".join(f"{b:>20}" for b in backends)]
    for (kind, size, fraction), cells in rows.items():
        label = ("first write, per page" if kind == "first_write"
                 else f"collect {size_label(size)}, {fraction:.1%} dirty")
        reference = cells.get(REFERENCE)
        line = f"{label:<30}"
        for b in backends:
            cell = cells.get(b)
            if cell is None:
                line += f"{'-':>20}"
            elif cell.note:
                if cell.note not in notes:
                    notes.append(cell.note)
                line += f"{f'skipped [{notes.index(cell.note) + 1}]':>20}"
            elif reference and reference.seconds == reference.seconds:
                line += f"{human_seconds(cell.seconds):>12} {cell.seconds / reference.seconds:>6.2f}x"
            else:
                line += f"{human_seconds(cell.seconds):>20}"
        lines.append(line)
    lines += [f"[{k}] {note}" for k, note in enumerate(notes, 1)]
    for backend, reason in missing.items():
        lines.append(f"{backend}: unavailable ({reason})")
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), "unknown CPU")
    except OSError:
        return "unknown CPU"


def environment(sweep: Sweep) -> dict:
    """What the figures were measured on."""
    return {"kernel": os.uname().release, "machine": os.uname().machine, "cpu": cpu_model(),
            "cores": os.cpu_count(), "rounds": sweep.rounds}


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: a reader (or a Ctrl-C)
    never sees a half-written file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def csv_text(rows: list[dict], fields=None) -> str:
    """Rows of one shape as CSV, a header line first (``fields``, or the
    first row's keys)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields or rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_outputs(results: list[Result], missing: dict[str, str], out: Path,
                  sweep: Sweep) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in results]
    written = [out / "results.json", out / "results.csv"]
    env = environment(sweep)
    write_atomically(written[0], json.dumps({**env, "results": rows, "unavailable": missing},
                                            indent=1))
    write_atomically(written[1], csv_text(rows))
    return written + plot(results, out, env)


def load_pyplot():
    """matplotlib.pyplot on a file-only backend, or None (with a hint on
    stderr) when matplotlib is not installed."""
    try:
        import matplotlib  # type: ignore[import-not-found]
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found]
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'gctrack[plots]')",
              file=sys.stderr)
        return None
    return plt


def plot(results: list[Result], out: Path, env: dict) -> list[Path]:
    """Pass cost against arena size and against dirty fraction, if matplotlib is there."""
    plt = load_pyplot()
    if plt is None:
        return []
    collects = [r for r in results if r.kind == "collect"]
    if not collects:
        return []
    caption = (f"{env['cpu']}, {env['cores']} cores, Linux {env['kernel']}; "
               f"median of {env['rounds']} rounds; x: skipped (see the table)")
    paths = []
    for axis, fixed, name in (("size", "fraction", "cost_vs_size.png"),
                              ("fraction", "size", "cost_vs_fraction.png")):
        paths.append(plot_one(plt, collects, axis, fixed, caption, out / name))
    return paths


def plot_one(plt, collects: list[Result], axis: str, fixed: str, caption: str, path: Path) -> Path:
    """One figure: every backend's collect cost along ``axis``, ``fixed`` at its middle value.
    Points sit at evenly spaced positions labelled with their real values, so
    that 0 % and 0.1 % do not overlap; skipped cells are drawn as an x on the floor."""
    chosen = sorted({getattr(r, fixed) for r in collects})
    pick = chosen[len(chosen) // 2]            # run() gives every plot at least one cell
    xs = sorted({getattr(r, axis) for r in collects})
    position = {x: k for k, x in enumerate(xs)}
    measured = [r.seconds for r in collects if r.seconds == r.seconds]
    floor = min(measured) * 1e3 / 2 if measured else 1e-3
    figure, ax = plt.subplots(figsize=(7.5, 4.8))
    for backend in BACKENDS:
        cells = sorted((getattr(r, axis), r) for r in collects
                       if r.backend == backend and getattr(r, fixed) == pick)
        done = [(position[x], r.seconds * 1e3) for x, r in cells if not r.note]
        skipped = [position[x] for x, r in cells if r.note]
        if done:
            line, = ax.plot(*zip(*done), marker="o", label=backend)
            if skipped:
                ax.plot(skipped, [floor] * len(skipped), linestyle="none", marker="x",
                        markersize=9, color=line.get_color())
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels([size_label(x) if axis == "size" else fraction_label(x) for x in xs])
    ax.set_xlabel("arena size" if axis == "size" else "pages written before the pass")
    ax.set_ylabel("one collect + re-arm (ms)")
    ax.set_yscale("log")
    ax.set_title(f"collect cost at {size_label(pick)}" if fixed == "size"
                 else f"collect cost with {pick:.1%} of pages written")
    figure.text(0.01, 0.01, caption, fontsize=7, color="0.35")
    ax.legend()
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
