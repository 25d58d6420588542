"""The command line, as a user runs it."""
import json
import subprocess
import sys

import gctrack


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "gctrack", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_demo_runs_gc_cycles_with_no_violation():
    done = run("demo", "--heap-mib", "32", "--cycles", "2", "--pause", "0.05")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("remark pause") == 2
    assert "0 violations" in done.stdout


def test_passes_are_exact():
    done = run("passes", "--size-mib", "16")
    assert done.returncode == 0, done.stderr
    assert " NO" not in done.stdout and "0 missing" in done.stdout


def test_bench_quick_writes_results_and_names_missing_backends(tmp_path):
    done = run("bench", "--quick", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    measured = {r["backend"] for r in results["results"]}
    for name, support in gctrack.features().backends.items():
        if support:
            assert name in measured and name in done.stdout
        else:
            assert results["unavailable"][name] == support.reason
            assert f"{name}: unavailable ({support.reason})" in done.stdout
    assert (tmp_path / "results.csv").read_text().startswith("kind,backend,size,fraction,seconds")
    assert all(r["seconds"] > 0 for r in results["results"] if not r["note"])


def test_bad_options_fail_cleanly():
    done = run("demo", "--backend", "nonsense", "--heap-mib", "4")
    assert done.returncode == 2 and "unknown backend" in done.stderr
