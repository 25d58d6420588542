"""``python -m gctrack bench gc``: the research harness (issue 13).

Each run puts one workload's native mutator threads on a fresh Heap, lets
them run unthrottled for a fixed time while a driver starts collection
cycles, and measures what write-tracking mechanisms are judged by: pause
percentiles with time to safepoint, a minimum mutator utilisation curve
(Cheng & Blelloch), throughput against an untracked stop-the-world baseline
(the lower-bound-overhead idea of Cai et al.), the CPU split, minor page
faults, and the precision of the reported cards. Workload, heap size,
collector and trigger are the same in every run: only the tracking changes.

The README's "Research harness" section documents each metric and the JSON
schema. Results are rewritten after every run, so Ctrl-C keeps what is done.
"""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy

import gctrack
from gctrack import bench, mutator

MiB = 1 << 20
#: Backends that can drive a collector; soft_dirty's passes are not atomic.
GC_BACKENDS = ("pagemap_scan", "mprotect", "uffd_sync", "software")
REFUSED = {"soft_dirty": "its passes are not atomic: Heap refuses it, since precleaning beside "
                         "running mutators would lose stores"}
#: The backend label of the untracked stop-the-world baseline.
BASELINE = "untracked"
#: The baseline's heap still needs a tracker: the first of these that works,
#: armed once and never passed (see pretouch).
BASELINE_BACKENDS = ("pagemap_scan", "mprotect", "uffd_sync", "software")
WORKLOADS = mutator.WORKLOADS
#: The GCOld sweep varies this parameter.
SWEEP_PARAM = "old_store_ratio"
#: MMU windows: 1 ms to 1 s, six a decade.
MMU_WINDOWS = tuple(float(w) for w in numpy.geomspace(1e-3, 1.0, 19))
PERCENTILES = (50, 90, 99)
#: How long the driver sleeps between looks at the heap.
POLL_SECONDS = 0.001


@dataclass(frozen=True)
class Plan:
    """The set of runs, and what every run shares."""

    heap_mib: int
    seconds: float                   #: each run's measured window
    threads: int                     #: mutator threads
    repeat: int
    workloads: tuple[str, ...]
    backends: tuple[str, ...]
    sweep: tuple[float, ...]         #: gcold's old_store_ratio values
    occupancy: float = 0.8           #: a cycle starts once this share of the heap is allocated
    max_interval: float = 0.5        #: ... or once this long has passed since the last one
    warmup: float = 0.2              #: the mutators run this long (and set up) before the window

    def specs(self) -> list[RunSpec]:
        """Every run, repeat by repeat; in each workload setting the baseline comes first."""
        settings: list[tuple[str, tuple[tuple[str, float], ...]]] = []
        for workload in self.workloads:
            if workload == "gcold" and self.sweep:
                settings += [(workload, ((SWEEP_PARAM, ratio),)) for ratio in self.sweep]
            else:
                settings.append((workload, ()))
        return [RunSpec(workload, backend, params, r)
                for r in range(self.repeat) for workload, params in settings
                for backend in (BASELINE, *self.backends)]


QUICK = Plan(heap_mib=32, seconds=0.6, threads=2, repeat=1, workloads=WORKLOADS,
             backends=GC_BACKENDS, sweep=(0.03, 0.3, 3.0), max_interval=0.2, warmup=0.1)
FULL = Plan(heap_mib=256, seconds=4.0, threads=2, repeat=1, workloads=WORKLOADS,
            backends=GC_BACKENDS, sweep=(0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0))


@dataclass(frozen=True)
class RunSpec:
    """One run: a workload (with parameter overrides) on one backend."""

    workload: str
    backend: str                               #: a backend name, or BASELINE
    params: tuple[tuple[str, float], ...] = ()
    repeat: int = 0

    @property
    def tracked(self) -> bool:
        return self.backend != BASELINE

    @property
    def setting(self) -> tuple:
        """What a tracked run and its baseline share."""
        return (self.workload, self.params, self.repeat)

    def label(self) -> str:
        extra = "".join(f" {k}={v:g}" for k, v in self.params)
        return f"{self.workload}{extra} {self.backend} #{self.repeat + 1}"


# ---- statistics (pure) -------------------------------------------------------------

def percentile(values, q: float) -> float | None:
    """The nearest-rank ``q``-th percentile: the smallest value with at least
    q % of the values at or below it (so p99 of fewer than 100 values is the
    max); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def distribution(values) -> dict | None:
    """p50, p90, p99 and max (nearest rank), and the count."""
    values = list(values)
    if not values:
        return None
    return {"count": len(values), **{f"p{q}": percentile(values, q) for q in PERCENTILES},
            "max": max(values)}


def order_statistic_coverage(n: int, k: int) -> float:
    """The coverage of [x_(k), x_(n+1-k)] as an interval for the median of n samples."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n


def median_ci(values, level: float = 0.95) -> dict | None:
    """The median, with a distribution-free confidence interval from order
    statistics: the narrowest [x_(k), x_(n+1-k)] whose binomial coverage is
    at least ``level``; with too few values for that, [min, max] and its
    real coverage (75 % for 3 values, 94 % for 5). No interval for one value."""
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    n = len(ordered)
    result = {"median": statistics.median(ordered), "n": n, "ci": None, "level": None}
    if n < 2:
        return result
    k = 1
    while k + 1 <= n // 2 and order_statistic_coverage(n, k + 1) >= level:
        k += 1
    result.update(ci=[ordered[k - 1], ordered[n - k]], level=order_statistic_coverage(n, k))
    return result


def merged_spans(spans, start: float, end: float) -> numpy.ndarray:
    """The pauses clipped to [start, end], sorted, overlaps merged: (n, 2) floats."""
    clipped = sorted((max(a, start), min(b, end)) for a, b in spans if min(b, end) > max(a, start))
    merged: list[list[float]] = []
    for a, b in clipped:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return numpy.array(merged, dtype=float).reshape(-1, 2)


def paused_until(merged: numpy.ndarray, x: numpy.ndarray) -> numpy.ndarray:
    """For each x, the pause time from the start of the run until x."""
    starts, lengths = merged[:, 0], merged[:, 1] - merged[:, 0]
    before = numpy.concatenate(([0.0], numpy.cumsum(lengths)))
    k = numpy.searchsorted(starts, x, side="right")      # pauses begun by x
    last = numpy.maximum(k - 1, 0)
    inside = numpy.where(k > 0, numpy.clip(x - starts[last], 0.0, lengths[last]), 0.0)
    return before[last] + inside


def mmu(spans, start: float, end: float, windows=MMU_WINDOWS) -> list[list[float]]:
    """Minimum mutator utilisation over the run [start, end]: for each window
    length w no longer than the run, the smallest share of any w-long
    interval of the run in which no pause ran, as [w, utilisation].

    Exact: the pause time inside a sliding window is piecewise linear in
    where it starts, and is largest where the window starts at a pause's
    start or ends at a pause's end, or at the run's edges; those are the
    only places looked at."""
    merged = merged_spans(spans, start, end)
    curve = []
    for w in windows:
        if w > end - start:
            continue
        if not len(merged):
            curve.append([float(w), 1.0])
            continue
        at = numpy.clip(numpy.concatenate((merged[:, 0], merged[:, 1] - w, [start, end - w])),
                        start, end - w)
        paused = (paused_until(merged, at + w) - paused_until(merged, at)).max()
        curve.append([float(w), float(min(1.0, max(0.0, 1 - paused / w)))])
    return curve


def due(free: int, total: int, occupancy: float, idle: float, max_interval: float) -> bool:
    """Start a cycle? Once ``occupancy`` of the heap is allocated (CMS's
    initiating occupancy), or ``max_interval`` seconds after the last one."""
    return total - free >= occupancy * total or idle >= max_interval


# ---- one run ----------------------------------------------------------------------

def baseline_backend(support: dict) -> str:
    """The backend that arms the baseline's heap: the first that works here."""
    return next(b for b in BASELINE_BACKENDS if support[b])


def pretouch(heap) -> None:
    """Write every page of an empty heap once (zeroes over zeroes), so that
    the baseline's armed-once tracking never faults inside the window:
    nothing re-protects a page after its first write, since a stop-the-world
    cycle makes no pass."""
    words = numpy.asarray(heap.arena).view(numpy.uint64)
    words[::heap.arena.page_size // 8] = 0


def prepare(heap, workload: str) -> None:
    """The object graph a workload starts from, when it does not build its own:
    rewire's is half the heap, a fifth of it garbage (40 % live)."""
    if workload == "rewire":
        mutator.populate(heap, int(heap.num_objects * 0.5), garbage=0.2)


def make_mutators(heap, spec: RunSpec, threads: int, stored):
    """The run's NativeMutators, unthrottled; ``stored`` receives the card of
    every reference store."""
    return gctrack.NativeMutators(heap, threads=threads, rate=0.0, seed=1 + spec.repeat,
                                  workload=spec.workload, params=dict(spec.params) or None,
                                  stored_cards=stored)


def usage() -> dict:
    """The process's CPU time and page faults so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user": r.ru_utime, "system": r.ru_stime, "minor_faults": r.ru_minflt,
            "major_faults": r.ru_majflt}


#: How long the mutators may take to set up before a run is given up.
SETUP_LIMIT = 60.0


@dataclass
class Window:
    """What happened between the window's opening and the mutators' stop."""

    start: float
    end: float = 0.0
    cycles: list = field(default_factory=list)
    usage: dict = field(default_factory=dict)      #: deltas of usage() over the window
    stats: dict = field(default_factory=dict)      #: deltas of the mutators' totals
    params: dict = field(default_factory=dict)       #: the workload's, defaults filled in
    work_unit: str = ""
    violations: int = 0             #: freed objects the mutators met in their whole life


def open_window(mutators) -> tuple[Window, dict, dict]:
    """A window opening now, with the usage and mutator totals it starts from."""
    return Window(start=time.monotonic()), usage(), mutators.stats()


def set_up(mutators, started: float, warmup: float) -> bool:
    """The warm-up is over: ``warmup`` seconds since the start, and the
    workload's set-up done (its first work unit counted)."""
    if time.monotonic() - started > SETUP_LIMIT:
        raise RuntimeError(f"the workload did no work in {SETUP_LIMIT:g} s: its set-up never ended")
    return time.monotonic() - started >= warmup and mutators.stats()["work_units"] > 0


def drive(collector, heap, mutators, plan: Plan, concurrent: bool) -> Window:
    """Start the mutators; the driver starts a cycle whenever due(). The
    window opens after the warm-up (cycles before it are not counted) and
    closes plan.seconds later, once the mutators have stopped: a cycle
    running at the deadline finishes first."""
    window = None
    with mutators:
        started = last = time.monotonic()
        while window is None or time.monotonic() < window.start + plan.seconds:
            if window is None and set_up(mutators, started, plan.warmup):
                window, before, totals = open_window(mutators)
            if due(heap.free_count, heap.num_objects, plan.occupancy, time.monotonic() - last,
                   plan.max_interval):
                cycle = collector.collect(concurrent=concurrent)
                last = time.monotonic()
                if window is not None:
                    window.cycles.append(cycle)
            else:
                time.sleep(POLL_SECONDS)
    window.end = time.monotonic()
    after, stats = usage(), mutators.stats()
    window.usage = {k: after[k] - before[k] for k in after}
    window.stats = {k: stats[k] - totals[k] for k in stats}
    window.violations = stats["violations"]
    window.params = mutators.params
    window.work_unit = mutators.work_unit
    return window


def precision(stored, reported, counts: dict) -> dict | None:
    """How exactly the tracking reported the cards that received reference
    stores, at the collector's own intervals: ``counts`` (Heap.card_counts)
    sums, over the passes, the cards each reported and, of them, those a
    store marked since they were last reported. ``stored`` holds the marks
    no pass settled; one on a card that no pass ever reported (``reported``,
    the union) is a lost write."""
    if stored is None or reported is None:
        return None
    union = stored.copy()
    union |= reported
    return {"passes": counts["passes"], "reported_cards": counts["reported"],
            "stored_cards": counts["stored"],
            "precision": counts["stored"] / counts["reported"] if counts["reported"] else None,
            "unsettled_cards": stored.count(), "lost_cards": union.count() - reported.count()}


def phase_spans(cycles) -> dict[str, list[tuple[float, float]]]:
    """Every pause by phase: the initial mark's and the remark's of the
    concurrent cycles, the single pause of the stop-the-world ones."""
    phases: dict[str, list[tuple[float, float]]] = {}
    for c in cycles:
        names = ("initial_mark", "remark") if c.concurrent else ("stop_the_world",)
        for name, span in zip(names, c.pause_spans):
            phases.setdefault(name, []).append(span)
    return phases


def pause_metrics(cycles, start: float) -> dict:
    """Every pause (stop request to resume), and each phase's with its time to safepoint."""
    by_phase = phase_spans(cycles)
    ttsp = {"initial_mark": [c.initial_mark_time_to_safepoint for c in cycles if c.concurrent],
            "remark": [c.remark_time_to_safepoint for c in cycles if c.concurrent],
            "stop_the_world": [c.remark_time_to_safepoint for c in cycles if not c.concurrent]}
    lengths = [b - a for spans in by_phase.values() for a, b in spans]
    return {"pauses": distribution(lengths) or {"count": 0},
            "phases": {name: {"pause": distribution(b - a for a, b in spans),
                              "ttsp": distribution(ttsp[name])}
                       for name, spans in by_phase.items()},
            "pause_spans": {name: [[a - start, b - start] for a, b in spans]
                            for name, spans in by_phase.items()}}


def cycle_metrics(cycles) -> dict:
    concurrent = [c for c in cycles if c.concurrent]
    return {
        "cycles": len(cycles),
        "concurrent_mark_seconds": statistics.median(c.concurrent_mark_seconds for c in concurrent)
        if concurrent else None,
        "preclean_rounds": statistics.median(len(c.preclean) for c in concurrent)
        if concurrent else None,
        "outran_precleaning": sum(c.outran_precleaning for c in concurrent),
        "remark_dirty_cards": statistics.median(c.remark_dirty_cards for c in concurrent)
        if concurrent else None,
        "freed": sum(c.freed for c in cycles),
    }


def cpu_metrics(window: Window) -> dict:
    """Process user and system time; the mutator threads' own CPU; the rest."""
    total = window.usage["user"] + window.usage["system"]
    mutators_cpu = window.stats.get("cpu_seconds")
    return {"user": window.usage["user"], "system": window.usage["system"],
            "mutator": mutators_cpu,
            "collector": None if mutators_cpu is None else max(0.0, total - mutators_cpu)}


def watch_cards(heap, tracked: bool) -> tuple:
    """(stored, reported): the card tables a tracked run's precision is
    measured with, set on the heap; (None, None) for the baseline."""
    if not tracked:
        return None, None
    stored, reported = (gctrack.CardTable.for_arena(heap.arena, heap.card_size) for _ in range(2))
    heap.stored_cards, heap.reported_cards = stored, reported
    return stored, reported


def run_one(spec: RunSpec, plan: Plan, support: dict) -> dict:
    """One run, measured; the record that results.json keeps (throughput_ratio
    is filled in by the caller, which knows the baseline)."""
    backend = spec.backend if spec.tracked else baseline_backend(support)
    with gctrack.Heap(plan.heap_mib * MiB, backend=backend) as heap:
        if not spec.tracked:
            pretouch(heap)
        prepare(heap, spec.workload)
        collector = gctrack.Collector(heap)
        collector.collect(concurrent=spec.tracked)        # warm-up, and a re-arm when tracked
        stored, reported = watch_cards(heap, spec.tracked)
        mutators = make_mutators(heap, spec, plan.threads, stored)
        window = drive(collector, heap, mutators, plan, spec.tracked)
        if spec.tracked:
            collector.collect()                 # its first pass reports every write left
        found = precision(stored, reported, heap.card_counts)
        heap.reported_cards = heap.stored_cards = None
    seconds = window.end - window.start
    work = window.stats["work_units"]      # in the workload's own unit
    spans = [s for c in window.cycles for s in c.pause_spans]
    paused = float(numpy.diff(merged_spans(spans, window.start, window.end)).sum())
    return {
        "workload": spec.workload, "backend": spec.backend, "repeat": spec.repeat,
        "heap_backend": backend, "params": window.params or dict(spec.params),
        "work_unit": window.work_unit, "seconds": seconds, "work_units": work,
        "throughput": work / seconds, "throughput_ratio": None,
        "paused_seconds": paused, "running_throughput": work / (seconds - paused),
        "running_throughput_ratio": None,
        **pause_metrics(window.cycles, window.start),
        "mmu": mmu(spans, window.start, window.end),
        "cpu": cpu_metrics(window),
        "minor_faults": window.usage["minor_faults"],
        "major_faults": window.usage["major_faults"],
        "precision": found, "violations": window.violations,
        **cycle_metrics(window.cycles),
        "mutator_stats": window.stats,
    }


def problems(run: dict) -> list[str]:
    """What makes a finished run a failure: a lost write or a freed object."""
    found = []
    if run["precision"] and run["precision"]["lost_cards"]:
        found.append(f"LOST WRITES: {run['precision']['lost_cards']} cards received a reference "
                     "store that no pass reported")
    if run["violations"]:
        found.append(f"VIOLATIONS: the mutators walked into {run['violations']} freed objects")
    return found


# ---- the environment --------------------------------------------------------------

def thp_mode() -> str:
    """The selected transparent huge page mode (always, madvise or never)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unknown"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def environment(support: dict) -> dict:
    uname = os.uname()
    return {
        "kernel": uname.release, "kernel_version": uname.version, "machine": uname.machine,
        "cpu": bench.cpu_model(), "cores": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(), "thp": thp_mode(), "page_size": os.sysconf("SC_PAGE_SIZE"),
        "python": platform.python_version(), "numpy": numpy.__version__,
        "gctrack": gctrack.__version__,
        "backends": {name: {"available": bool(s), "reason": s.reason,
                            "collector": name not in REFUSED}
                     for name, s in support.items()},
        "baseline_backend": baseline_backend(support),
    }


# ---- results ------------------------------------------------------------------------

def summary(runs: list[dict]) -> list[dict]:
    """Per workload setting and backend, over the repeats: medians with
    confidence intervals (see median_ci)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        key = (run["workload"], json.dumps(run["params"], sort_keys=True), run["backend"])
        groups.setdefault(key, []).append(run)
    rows = []
    for (workload, _, backend), members in groups.items():
        remark = [phase_value(r, "remark", "pause", "p50") for r in members]
        rows.append({
            "workload": workload, "backend": backend, "params": members[0]["params"],
            "work_unit": members[0]["work_unit"], "repeats": len(members),
            "throughput": median_ci(r["throughput"] for r in members),
            "throughput_ratio": median_ci(r["throughput_ratio"] for r in members),
            "running_throughput_ratio": median_ci(r["running_throughput_ratio"] for r in members),
            **{f"pause_{q}": median_ci(r["pauses"].get(q) for r in members)
               for q in ("p50", "p90", "p99", "max")},
            "remark_p50": median_ci(remark),
            "remark_ttsp_p50": median_ci(phase_value(r, "remark", "ttsp", "p50") for r in members),
            "mmu": mmu_median(members),
            "precision": median_ci(r["precision"]["precision"] for r in members
                                   if r["precision"]),
            "cpu": {key: median_ci(r["cpu"][key] for r in members)
                    for key in ("user", "system", "mutator", "collector")},
            "minor_faults": median_ci(r["minor_faults"] for r in members),
            "stall_seconds": median_ci(r["mutator_stats"]["stall_seconds"] for r in members),
        })
    return rows


def phase_value(run: dict, phase: str, what: str, key: str):
    """run["phases"][phase][what][key], or None where the run has no such phase."""
    part = run["phases"].get(phase) or run["phases"].get("stop_the_world")
    return part[what][key] if part and part[what] else None


def mmu_median(runs: list[dict]) -> list[list[float]]:
    """The median over runs of the utilisation at each window all of them measured."""
    curves = [dict((w, u) for w, u in r["mmu"]) for r in runs]
    common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return [[w, statistics.median(c[w] for c in curves)] for w in common]


CSV_FIELDS = ("workload", "backend", "params", "repeat", "heap_backend", "work_unit", "seconds",
              "work_units", "throughput", "throughput_ratio", "paused_seconds",
              "running_throughput", "running_throughput_ratio", "pause_count", "pause_p50",
              "pause_p90", "pause_p99", "pause_max", "initial_mark_p50", "initial_mark_ttsp_p50",
              "remark_p50", "remark_p99", "remark_max", "remark_ttsp_p50", "mmu_1ms", "mmu_10ms",
              "mmu_100ms", "cpu_user", "cpu_system", "cpu_mutator", "cpu_collector",
              "minor_faults", "precision", "lost_cards", "unsettled_cards", "cycles", "alloc_stalls", "stall_seconds",
              "violations")


def csv_row(run: dict) -> dict:
    """One run, flat."""
    curve = dict((round(w, 6), u) for w, u in run["mmu"])
    initial = run["phases"].get("initial_mark")
    stats = run["mutator_stats"]
    row = {
        "params": json.dumps(run["params"], sort_keys=True),
        **{f"pause_{k}": run["pauses"].get(k) for k in ("count", "p50", "p90", "p99", "max")},
        "initial_mark_p50": initial["pause"]["p50"] if initial else None,
        "initial_mark_ttsp_p50": initial["ttsp"]["p50"] if initial else None,
        **{f"remark_{k}": phase_value(run, "remark", "pause", k) for k in ("p50", "p99", "max")},
        "remark_ttsp_p50": phase_value(run, "remark", "ttsp", "p50"),
        **{f"mmu_{ms}ms": curve.get(round(ms / 1e3, 6)) for ms in (1, 10, 100)},
        **{f"cpu_{k}": v for k, v in run["cpu"].items()},
        "precision": run["precision"]["precision"] if run["precision"] else None,
        **{key: run["precision"][key] if run["precision"] else None
           for key in ("lost_cards", "unsettled_cards")},
        **{k: stats.get(k) for k in ("alloc_stalls", "stall_seconds")},
    }
    return {name: row[name] if name in row else run.get(name) for name in CSV_FIELDS}


class Results:
    """The output folder: results.json and results.csv, rewritten after
    every run by a rename, so that they are whole at every moment."""

    def __init__(self, out: Path, header: dict) -> None:
        self.out = out
        self.header = header
        self.runs: list[dict] = []
        self.failures: list[dict] = []
        out.mkdir(parents=True, exist_ok=True)
        self.json_path, self.csv_path = out / "results.json", out / "results.csv"

    def add(self, run: dict) -> None:
        self.runs.append(run)
        self.write(complete=False)

    def fail(self, spec: RunSpec, reason: str) -> None:
        self.failures.append({**asdict(spec), "params": dict(spec.params), "reason": reason})
        self.write(complete=False)

    def document(self, complete: bool) -> dict:
        return {**self.header, "complete": complete, "runs": self.runs,
                "summary": summary(self.runs), "failures": self.failures}

    def write(self, complete: bool) -> list[Path]:
        bench.write_atomically(self.json_path, json.dumps(self.document(complete), indent=1,
                                                          allow_nan=False))
        bench.write_atomically(self.csv_path,
                               bench.csv_text([csv_row(r) for r in self.runs], CSV_FIELDS))
        return [self.json_path, self.csv_path]


def compare_with(run: dict, baseline: dict | None) -> None:
    """Fill in the run's throughput ratios to its baseline's (None without one)."""
    for key in ("throughput", "running_throughput"):
        run[f"{key}_ratio"] = run[key] / baseline[key] if baseline else None


def shout(progress: bench.Progress, text: str) -> None:
    """A failure on stderr, on a line of its own beside the progress bar."""
    print(("\n" if progress.terminal else "") + text, file=sys.stderr, flush=True)


def run_plan(plan: Plan, results: Results, support: dict) -> bool:
    """Every run of the plan, each written as it finishes; a failed run is
    recorded and the set goes on. Returns whether Ctrl-C cut it short."""
    specs = plan.specs()
    progress = bench.Progress(len(specs))
    baselines: dict[tuple, dict] = {}
    try:
        for spec in specs:
            try:
                run = run_one(spec, plan, support)
            except Exception as exc:              # noqa: BLE001 - recorded, reported, and the set goes on
                reason = f"{type(exc).__name__}: {exc}"
                shout(progress, f"FAILED {spec.label()}: {reason}")
                results.fail(spec, reason)
                progress.step(f"{spec.label()} FAILED")
                continue
            if not spec.tracked:
                baselines[spec.setting] = run
            compare_with(run, baselines.get(spec.setting))
            for problem in problems(run):
                shout(progress, f"{problem} ({spec.label()})")
                results.failures.append({**asdict(spec), "params": dict(spec.params),
                                         "reason": problem})
            results.add(run)
            progress.step(spec.label())
    except KeyboardInterrupt:
        return True
    return False


# ---- the terminal table ---------------------------------------------------------------

def number(value, scale: float = 1.0, digits: int = 3) -> str:
    """A short figure: 0.0936, 46.3, 123, 5.65M."""
    if value is None:
        return "-"
    value *= scale
    if abs(value) >= 1e6:
        return f"{value / 1e6:.3g}M"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.{digits}g}"


def with_ci(cell: dict | None, scale: float = 1.0, digits: int = 3) -> str:
    """median, or median [low, high] when there is an interval."""
    if not cell:
        return "-"
    text = number(cell["median"], scale, digits)
    if cell["ci"]:
        text += f" [{number(cell['ci'][0], scale, digits)},{number(cell['ci'][1], scale, digits)}]"
    return text


TABLE_HEADER = ("workload", "backend", "throughput ratio", "running", "work/s",
                "pause p50/p99/max ms", "remark p50 ms", "TTSP µs", "MMU 1/10/100 ms", "precision")


def table_row(row: dict) -> tuple[str, ...]:
    """One summary row as table cells (medians; [low, high] with --repeat)."""
    extra = "".join(f" {v:g}" for k, v in row["params"].items() if k == SWEEP_PARAM)
    curve = dict((round(w, 6), u) for w, u in row["mmu"])
    return (
        f"{row['workload']}{extra}", row["backend"], with_ci(row["throughput_ratio"]),
        number(row["running_throughput_ratio"]["median"] if row["running_throughput_ratio"]
               else None),
        number(row["throughput"]["median"] if row["throughput"] else None),
        "/".join(number(row[f"pause_{q}"]["median"] if row[f"pause_{q}"] else None, 1e3)
                 for q in ("p50", "p99", "max")),
        with_ci(row["remark_p50"], 1e3), with_ci(row["remark_ttsp_p50"], 1e6, 2),
        "/".join(number(curve.get(round(w, 6)), 1, 2) for w in (1e-3, 1e-2, 1e-1)),
        with_ci(row["precision"], 1, 2))


def table(rows: list[dict], missing: dict[str, str]) -> str:
    """One row per workload setting and backend, columns as wide as their cells."""
    cells = [TABLE_HEADER, *(table_row(row) for row in rows)]
    widths = [max(len(line[k]) for line in cells) for k in range(len(TABLE_HEADER))]
    lines = ["  ".join(cell.ljust(width) if k < 2 else cell.rjust(width)
                       for k, (cell, width) in enumerate(zip(line, widths))).rstrip()
             for line in cells]
    lines += [f"{backend}: not run ({reason})" for backend, reason in missing.items()]
    lines.append("running: throughput outside pauses, to the baseline's; the baseline's remark "
                 "is its whole stop-the-world pause")
    return "\n".join(lines)


# ---- plots -------------------------------------------------------------------------------

def plot(document: dict, out: Path) -> list[Path]:
    """MMU curves and pause CDFs per workload, and the GCOld sweep."""
    plt = bench.load_pyplot()
    if plt is None or not document["runs"]:
        return []
    env = document["environment"]
    caption = (f"{env['cpu']}, {env['cores']} cores, Linux {env['kernel']}; "
               f"{document['plan']['heap_mib']} MiB heap, {document['plan']['threads']} mutators, "
               f"{document['plan']['seconds']:g} s runs")
    paths = []
    for workload in dict.fromkeys(r["workload"] for r in document["summary"]):
        rows = representative(document["summary"], workload)
        paths.append(plot_mmu(plt, rows, workload, caption, out / f"mmu-{workload}.png"))
        runs = [r for r in document["runs"] if r["workload"] == workload
                and r["params"].get(SWEEP_PARAM) == rows[0]["params"].get(SWEEP_PARAM)]
        paths.append(plot_pauses(plt, runs, setting_title(rows, workload), caption,
                                 out / f"pauses-{workload}.png"))
    sweep = [r for r in document["summary"] if r["workload"] == "gcold" and SWEEP_PARAM in r["params"]]
    if len({r["params"][SWEEP_PARAM] for r in sweep}) > 1:
        paths.append(plot_sweep(plt, sweep, caption, out / "gcold-sweep.png"))
    return paths


def representative(rows: list[dict], workload: str) -> list[dict]:
    """A workload's summary rows at one setting: the middle of a sweep."""
    rows = [r for r in rows if r["workload"] == workload]
    values = sorted({r["params"].get(SWEEP_PARAM, 0) for r in rows})
    pick = values[len(values) // 2]
    return [r for r in rows if r["params"].get(SWEEP_PARAM, 0) == pick]


def color(backend: str) -> str:
    """The same colour for a backend in every plot."""
    return f"C{(BASELINE, *GC_BACKENDS).index(backend)}"


def finish(plt, figure, ax, caption: str, path: Path) -> Path:
    figure.text(0.01, 0.01, caption, fontsize=7, color="0.35")
    ax.legend(fontsize=8)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def setting_title(rows: list[dict], workload: str) -> str:
    value = rows[0]["params"].get(SWEEP_PARAM)
    return workload if value is None else f"{workload}, {SWEEP_PARAM} {value:g}"


def plot_mmu(plt, rows: list[dict], workload: str, caption: str, path: Path) -> Path:
    figure, ax = plt.subplots(figsize=(7.5, 4.8))
    for row in rows:
        if row["mmu"]:
            ax.plot(*zip(*row["mmu"]), marker=".", color=color(row["backend"]),
                    label=row["backend"])
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("window (s)")
    ax.set_ylabel("minimum mutator utilisation")
    ax.set_title(f"MMU, {setting_title(rows, workload)}")
    return finish(plt, figure, ax, caption, path)


def plot_pauses(plt, runs: list[dict], title: str, caption: str, path: Path) -> Path:
    """The CDF of each phase's pauses, pooled over the repeats: the remark
    (or the baseline's whole pause) solid, the initial mark dotted."""
    figure, ax = plt.subplots(figsize=(7.5, 4.8))
    for backend in dict.fromkeys(r["backend"] for r in runs):
        for phase, style in (("remark", "-"), ("stop_the_world", "-"), ("initial_mark", ":")):
            lengths = sorted((b - a) * 1e3 for r in runs if r["backend"] == backend
                             for a, b in r["pause_spans"].get(phase, ()))
            if lengths:
                ax.step(lengths, numpy.arange(1, len(lengths) + 1) / len(lengths), where="post",
                        linestyle=style, color=color(backend),
                        label=f"{backend} {phase.replace('_', ' ')} ({len(lengths)})")
    ax.set_xscale("log")
    ax.set_xlabel("pause, stop request to resume (ms)")
    ax.set_ylabel("fraction of pauses at most this long")
    ax.set_title(f"pauses, {title}")
    return finish(plt, figure, ax, caption, path)


def median_and_errors(cells: list, scale: float = 1.0) -> tuple[list, list | None]:
    """Medians, and matplotlib's yerr from their intervals (None without any)."""
    medians = [c["median"] * scale if c else numpy.nan for c in cells]
    if not any(c and c["ci"] for c in cells):
        return medians, None
    low = [m - c["ci"][0] * scale if c and c["ci"] else 0 for m, c in zip(medians, cells)]
    high = [c["ci"][1] * scale - m if c and c["ci"] else 0 for m, c in zip(medians, cells)]
    return medians, [low, high]


def plot_sweep(plt, rows: list[dict], caption: str, path: Path) -> Path:
    """Throughput ratio and remark against gcold's old-store ratio, per
    backend, with the confidence intervals of --repeat as error bars."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4.6))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = sorted((r["params"][SWEEP_PARAM], r) for r in rows if r["backend"] == backend)
        xs = [x for x, _ in mine]
        style = {"marker": "o", "capsize": 3, "color": color(backend), "label": backend}
        if backend != BASELINE:
            ratio, errors = median_and_errors([r["throughput_ratio"] for _, r in mine])
            left.errorbar(xs, ratio, yerr=errors, **style)
        remark, errors = median_and_errors([r["remark_p50"] for _, r in mine], 1e3)
        right.errorbar(xs, remark, yerr=errors, **style)
    for ax in (left, right):
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlabel(f"{SWEEP_PARAM}: stores into the old tree per short-lived object")
    left.axhline(1.0, color="0.6", linewidth=0.8)
    left.set_ylabel("throughput / untracked baseline")
    left.set_title("mutator throughput")
    right.set_ylabel("remark pause p50 (ms; baseline: its whole pause)")
    right.set_yscale("log")
    right.set_title("remark")
    left.legend(fontsize=8)
    return finish(plt, figure, right, caption, path)


# ---- the command ----------------------------------------------------------------------------

def plan_for(args) -> Plan:
    """The plan the command line asks for."""
    plan = QUICK if args.quick else FULL
    changes = {"repeat": args.repeat}
    if args.workload:
        changes["workloads"] = tuple(dict.fromkeys(args.workload))
    if args.backend:
        changes["backends"] = tuple(dict.fromkeys(args.backend))
    for name in ("heap_mib", "seconds", "threads"):
        if getattr(args, name, None) is not None:
            changes[name] = getattr(args, name)
    if getattr(args, "sweep", None):
        changes["sweep"] = tuple(sorted(set(args.sweep)))
    return replace(plan, **changes)


def main(args, argv: list[str]) -> tuple[bool, bool]:
    """``bench gc``: run the plan, print the table, write the outputs.
    Returns whether Ctrl-C cut the set short, and whether anything failed."""
    support = gctrack.features(in_process=False).backends
    plan = plan_for(args)
    missing = {b: support[b].reason for b in plan.backends if not support[b]}
    plan = replace(plan, backends=tuple(b for b in plan.backends if support[b]))
    header = {"schema": 1, "command": " ".join(argv),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "environment": environment(support), "plan": asdict(plan),
              "unavailable": {**missing, **REFUSED}}
    results = Results(Path(args.out), header)
    results.write(complete=False)
    print(f"gctrack bench gc: {len(plan.specs())} runs of {plan.seconds:g} s, "
          f"{plan.heap_mib} MiB heap, {plan.threads} mutator threads; writing {results.out}/",
          file=sys.stderr, flush=True)
    interrupted = run_plan(plan, results, support)
    written = results.write(complete=not interrupted)
    print(table(summary(results.runs), {**missing, **REFUSED}))
    written += plot(results.document(not interrupted), results.out)
    for path in written:
        print(f"wrote {path}")
    for failure in results.failures:
        print(f"FAILED {failure['workload']} {failure['backend']}: {failure['reason']}",
              file=sys.stderr)
    return interrupted, bool(results.failures)
