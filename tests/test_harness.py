"""The research harness (``python -m gctrack bench gc``): its statistics on
hand-made inputs, and its outputs from tiny real runs."""
import csv
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy
import pytest

import gctrack
from conftest import require
from gctrack import harness
from gctrack.harness import RunSpec, due, median_ci, mmu, percentile

WINDOWS = (0.001, 0.01, 0.02, 0.1, 1.0)


def test_mmu_without_pauses_is_one_and_stops_at_the_run_length():
    assert mmu([], 0.0, 0.5, WINDOWS) == [[0.001, 1.0], [0.01, 1.0], [0.02, 1.0], [0.1, 1.0]]


def test_mmu_of_a_single_pause():
    curve = dict(map(tuple, mmu([(0.4, 0.41)], 0.0, 1.0, WINDOWS)))
    assert curve[0.001] == 0 and curve[0.01] == pytest.approx(0)
    assert curve[0.02] == pytest.approx(0.5)
    assert curve[0.1] == pytest.approx(0.9) and curve[1.0] == pytest.approx(0.99)


def test_mmu_clips_pauses_to_the_run_and_merges_overlaps():
    # Half of a pause lies before the run; one lies wholly after it.
    edge = dict(map(tuple, mmu([(-0.005, 0.005), (2.0, 3.0)], 0.0, 1.0, WINDOWS)))
    assert edge[0.01] == pytest.approx(0.5) and edge[1.0] == pytest.approx(0.995)
    # Overlapping spans count once: 0.1-0.25 is paused, 0.15 s in all.
    both = dict(map(tuple, mmu([(0.1, 0.2), (0.15, 0.25)], 0.0, 1.0, (0.1, 0.3, 1.0))))
    assert both[0.1] == 0 and both[0.3] == pytest.approx(0.5) and both[1.0] == pytest.approx(0.85)


def test_mmu_windows_that_reach_two_pauses():
    spans = [(0.100, 0.102), (0.107, 0.109)]           # 2 ms, 5 ms apart, 2 ms
    curve = dict(map(tuple, mmu(spans, 0.0, 1.0, (0.002, 0.009, 0.02))))
    assert curve[0.002] == 0
    assert curve[0.009] == pytest.approx(5 / 9)        # holds both pauses whole
    assert curve[0.02] == pytest.approx(16 / 20)


def test_mmu_agrees_with_a_brute_force_scan():
    rng = numpy.random.default_rng(13)
    starts = numpy.sort(rng.uniform(0, 1, 12))
    spans = [(a, a + d) for a, d in zip(starts, rng.uniform(0.0005, 0.03, 12))]
    step = 1e-5
    for w, utilisation in mmu(spans, 0.0, 1.0, (0.002, 0.01, 0.05, 0.3)):
        ts = numpy.arange(0.0, 1.0 - w + step / 2, step)
        paused = sum(numpy.clip(numpy.minimum(b, ts + w) - numpy.maximum(a, ts), 0, None)
                     for a, b in harness.merged_spans(spans, 0.0, 1.0))
        scanned = 1 - paused.max() / w
        # The scan can only miss the worst window; it is off by at most one step.
        assert scanned - step / w - 1e-9 <= utilisation <= scanned + 1e-9, w


def test_nearest_rank_percentiles():
    values = list(range(10, 0, -1))
    assert [percentile(values, q) for q in (50, 90, 99, 100)] == [5, 9, 10, 10]
    assert percentile([], 50) is None and percentile([7.5], 99) == 7.5
    shape = harness.distribution([0.002, 0.001, 0.003])
    assert shape == {"count": 3, "p50": 0.002, "p90": 0.003, "p99": 0.003, "max": 0.003}
    assert harness.distribution([]) is None


def test_median_confidence_intervals_from_order_statistics():
    assert median_ci([]) is None
    assert median_ci([2.0]) == {"median": 2.0, "n": 1, "ci": None, "level": None}
    three = median_ci([3.0, 1.0, 2.0, None])
    assert three["median"] == 2.0 and three["ci"] == [1.0, 3.0] and three["level"] == 0.75
    ten = median_ci(range(10))
    assert ten["ci"] == [1, 8] and ten["level"] == pytest.approx(1 - 22 / 1024)
    many = median_ci(range(100))
    assert many["level"] >= 0.95 and many["ci"][0] < 49.5 < many["ci"][1]
    assert harness.order_statistic_coverage(100, many["ci"][0] + 2) < 0.95, "not the narrowest"


def test_a_cycle_is_due_at_the_initiating_occupancy_or_after_the_interval():
    assert not due(free=300, total=1000, occupancy=0.8, idle=0.1, max_interval=0.5)
    assert due(free=200, total=1000, occupancy=0.8, idle=0.1, max_interval=0.5)
    assert due(free=900, total=1000, occupancy=0.8, idle=0.5, max_interval=0.5)


def test_the_plan_runs_each_baseline_before_its_tracked_runs_repeat_by_repeat():
    plan = harness.Plan(heap_mib=8, seconds=0.1, threads=1, repeat=2,
                        workloads=("rewire", "gcold"), backends=("pagemap_scan", "software"),
                        sweep=(0.1, 0.5))
    specs = plan.specs()
    assert len(specs) == 2 * 3 * 3
    assert [s.backend for s in specs[:3]] == ["untracked", "pagemap_scan", "software"]
    assert [s.params for s in specs[3:9:3]] == [(("old_store_ratio", 0.1),),
                                               (("old_store_ratio", 0.5),)]
    assert [s.repeat for s in specs] == [0] * 9 + [1] * 9


def test_precision_is_per_pass_and_a_mark_no_pass_reported_is_a_lost_write():
    stored = gctrack.CardTable(1 << 20, 1 << 16, card_size=512)
    reported = stored.copy()
    reported.mark_range(1 << 20, 4096)                  # a page: 8 cards, reported
    stored.mark_range((1 << 20) + 1000, 1)              # left marked, on a reported card
    counts = {"passes": 3, "reported": 40, "stored": 10}
    assert harness.precision(stored, reported, counts) == {
        "passes": 3, "reported_cards": 40, "stored_cards": 10, "precision": 0.25,
        "unsettled_cards": 1, "lost_cards": 0}
    stored.mark_range((1 << 20) + 8192, 1)              # marked, and never reported
    found = harness.precision(stored, reported, counts)
    assert found["lost_cards"] == 1 and found["unsettled_cards"] == 2
    run = {"precision": found, "violations": 0}
    assert [p[:19] for p in harness.problems(run)] == ["LOST WRITES: 1 card"]
    run["violations"] = 2
    assert harness.problems(run)[1].startswith("VIOLATIONS: the mutators walked into 2 freed")
    assert harness.precision(None, None, counts) is None


def tiny_plan(**changes):
    require("pagemap_scan")
    plan = harness.Plan(heap_mib=8, seconds=0.3, threads=2, repeat=1, workloads=("rewire",),
                        backends=("pagemap_scan",), sweep=(), max_interval=0.05)
    return harness.replace(plan, **changes)


def test_results_survive_a_failed_run_and_ctrl_c_mid_set(tmp_path, monkeypatch):
    plan = tiny_plan(backends=("pagemap_scan", "software", "mprotect"))
    real = harness.run_one
    calls = []

    def flaky(spec, plan, support):
        calls.append(spec.backend)
        if spec.backend == "software":
            raise RuntimeError("boom")
        if spec.backend == "mprotect":
            raise KeyboardInterrupt
        return real(spec, plan, support)

    monkeypatch.setattr(harness, "run_one", flaky)
    results = harness.Results(tmp_path, {"environment": {}, "plan": {}})
    interrupted = harness.run_plan(plan, results, gctrack.features().backends)
    assert interrupted and calls == ["untracked", "pagemap_scan", "software", "mprotect"]
    document = json.loads((tmp_path / "results.json").read_text())
    assert [r["backend"] for r in document["runs"]] == ["untracked", "pagemap_scan"]
    assert document["complete"] is False
    assert document["failures"][0]["backend"] == "software"
    assert document["failures"][0]["reason"] == "RuntimeError: boom"
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["backend"] for r in rows] == ["untracked", "pagemap_scan"]
    assert not list(tmp_path.glob("*.partial"))


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "gctrack", "bench", "gc", *args],
                          capture_output=True, text=True, timeout=timeout)


def check_run_schema(run: dict) -> None:
    assert set(run) >= {"workload", "backend", "pauses", "mmu", "throughput_ratio", "cpu",
                        "minor_faults", "precision", "phases", "params", "work_unit"}
    assert run["pauses"]["count"] > 0
    assert 0 < run["pauses"]["p50"] <= run["pauses"]["p99"] <= run["pauses"]["max"] < 5
    windows = [w for w, _ in run["mmu"]]
    assert windows[0] == pytest.approx(1e-3) and windows == sorted(windows)
    assert windows[-1] <= run["seconds"] and len(windows) >= 10
    assert all(0 <= u <= 1 for _, u in run["mmu"])
    assert run["mmu"][-1][1] >= run["mmu"][0][1], "longer windows cannot see less"
    assert run["throughput_ratio"] > 0 and run["throughput"] > 0 and run["violations"] == 0
    assert run["cpu"]["user"] > 0 and run["cpu"]["system"] >= 0
    assert math.isclose(run["throughput"] * run["seconds"], run["work_units"])
    spans = [span for phase in run["pause_spans"].values() for span in phase]
    assert len(spans) == run["pauses"]["count"] and set(run["pause_spans"]) == set(run["phases"])
    assert all(0 <= a < b <= run["seconds"] for a, b in spans)
    assert run["paused_seconds"] == pytest.approx(sum(b - a for a, b in spans))


def check_precision(run: dict) -> None:
    found = run["precision"]
    assert found["lost_cards"] == 0 and found["passes"] > 2 * run["cycles"]
    assert 0 < found["stored_cards"] <= found["reported_cards"]
    assert found["precision"] == found["stored_cards"] / found["reported_cards"]
    assert found["precision"] < 0.9, "a page reports 8 cards of 512 B: not all get a store"


def test_a_tiny_real_run_writes_the_documented_outputs(tmp_path):
    require("pagemap_scan")
    done = run_cli("--workload", "rewire", "--backend", "pagemap_scan", "--repeat", "2",
                   "--heap-mib", "8", "--seconds", "0.3", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    document = json.loads((tmp_path / "results.json").read_text())
    env = document["environment"]
    assert env["cores"] >= 1 and env["page_size"] == gctrack.features().page_size
    assert env["thp"] in ("always", "madvise", "never") and env["kernel"]
    for name, support in gctrack.features().backends.items():
        assert env["backends"][name] == {"available": bool(support), "reason": support.reason,
                                         "collector": name != "soft_dirty"}
    runs = document["runs"]
    assert [(r["backend"], r["repeat"]) for r in runs] == [
        ("untracked", 0), ("pagemap_scan", 0), ("untracked", 1), ("pagemap_scan", 1)]
    for run in runs:
        check_run_schema(run)
    baseline, tracked = runs[0], runs[1]
    assert baseline["throughput_ratio"] == 1.0 and baseline["precision"] is None
    assert set(baseline["phases"]) == {"stop_the_world"}
    assert set(tracked["phases"]) == {"initial_mark", "remark"}
    assert tracked["phases"]["remark"]["ttsp"]["p50"] > 0
    check_precision(tracked)
    assert document["complete"] is True and document["failures"] == []
    row = next(r for r in document["summary"] if r["backend"] == "pagemap_scan")
    assert row["repeats"] == 2 and row["throughput_ratio"]["level"] == 0.5
    assert row["throughput_ratio"]["ci"] == sorted(r["throughput_ratio"] for r in runs[1::2])
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 4 and float(rows[1]["pause_max"]) == tracked["pauses"]["max"]
    assert "pagemap_scan" in done.stdout and "untracked" in done.stdout
    assert "[4/4]" in done.stderr
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "mmu-rewire.png").stat().st_size > 0
        assert (tmp_path / "pauses-rewire.png").stat().st_size > 0
    except ImportError:
        assert "pip install 'gctrack[plots]'" in done.stderr


@pytest.mark.parametrize("option, value, named", [
    ("--workload", "nonsense", "choose from"), ("--backend", "soft_dirty", "pagemap_scan"),
    ("--repeat", "0", "positive"), ("--seconds", "-1", "seconds")])
def test_bad_arguments_fail_at_parse_time(option, value, named, tmp_path):
    done = run_cli(option, value, "--out", str(tmp_path / "never"), timeout=30)
    assert done.returncode == 2 and f"argument {option}:" in done.stderr
    assert named in done.stderr
    assert not (tmp_path / "never").exists()


def test_plan_for_the_command_line():
    args = SimpleNamespace(quick=True, repeat=3, workload=["rewire", "rewire"],
                           backend=["software"], heap_mib=None, seconds=0.25, threads=None,
                           sweep=[0.3, 0.1, 0.3])
    plan = harness.plan_for(args)
    assert plan.workloads == ("rewire",) and plan.backends == ("software",)
    assert plan.sweep == (0.1, 0.3)
    assert plan.repeat == 3 and plan.seconds == 0.25 and plan.heap_mib == harness.QUICK.heap_mib
    assert len(plan.specs()) == 6 and plan.specs()[0] == RunSpec("rewire", "untracked", (), 0)
