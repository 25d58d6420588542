"""The command line, as a user runs it."""
import json
import signal
import subprocess
import sys
import time

import pytest

import gctrack
from conftest import require


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "gctrack", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_demo_runs_gc_cycles_with_no_violation():
    done = run("demo", "--heap-mib", "32", "--cycles", "2", "--pause", "0.05")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line[:5].strip().isdigit()]
    assert [row[0] for row in rows] == ["1", "2"], done.stdout
    assert all(len(row) == 12 and row[-1].endswith("%") for row in rows)
    assert max(len(line) for line in done.stdout.splitlines()[2:]) <= 120
    assert "0 violations" in done.stdout


def test_passes_are_exact():
    done = run("passes", "--size-mib", "16")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("gctrack passes:")
    assert " NO" not in done.stdout and "0 missing" in done.stdout


def test_verify_demo_finds_exactly_the_planted_miss():
    require("pagemap_scan")
    done = run("verify-demo", "--size-mib", "8", "--rounds", "2")
    assert done.returncode == 0, done.stderr
    rounds = [line for line in done.stdout.splitlines() if line.startswith("round ")]
    assert [r.split(", ")[2] for r in rounds] == ["0 missed", "1 missed"], done.stdout
    assert done.stdout.count("missed barrier: store to 0x") == 1
    assert "-> 0xbad" in done.stdout and "found exactly the planted miss" in done.stdout


@pytest.mark.parametrize("size_mib", ["1", "4", "7"])
def test_passes_work_on_small_arenas(size_mib):
    done = run("passes", "--size-mib", size_mib)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(" yes") == 6


def test_passes_store_through_the_software_barrier():
    done = run("passes", "--size-mib", "8", "--backend", "software")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" yes") == 6 and " NO" not in done.stdout
    assert "no barrier" in done.stdout


def test_the_installed_script_names_itself():
    import shutil
    script = shutil.which("gctrack")
    if script is None:
        pytest.skip("the gctrack script is not on PATH")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: gctrack ")


def test_help_names_the_program_lists_backends_and_describes_commands():
    done = run("--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m gctrack")
    assert run("--version").stdout.strip() == f"gctrack {gctrack.__version__}"
    for command in ("probe", "demo", "passes", "bench"):
        text = run(command, "--help").stdout
        assert text.count("\n\n") >= 2, f"{command} has no description"
    demo = run("demo", "--help").stdout
    assert all(name in demo for name in gctrack.BACKENDS)
    assert "4.2 GB" in run("bench", "--help").stdout


@pytest.mark.parametrize("option, value", [("--threads", "0"), ("--rate", "-5"), ("--pause", "-1"),
                                           ("--heap-mib", "0"), ("--card-size", "100"),
                                           ("--cycles", "x")])
def test_bad_demo_arguments_fail_at_once_naming_the_option(option, value):
    started = time.monotonic()
    done = run("demo", option, value)
    assert done.returncode == 2 and f"argument {option}:" in done.stderr
    assert "roots_per_thread" not in done.stderr
    assert time.monotonic() - started < 5


def test_ctrl_c_in_the_demo_exits_cleanly_after_finished_cycles():
    child = subprocess.Popen([sys.executable, "-m", "gctrack", "demo", "--heap-mib", "16",
                              "--cycles", "1000", "--pause", "0.02"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in child.stdout:
        if line.split()[:1] == ["1"]:              # the first cycle's row
            break
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert "violations" in out


def interrupt_after_two_steps(*args):
    """Run a bench command, press Ctrl-C once it reports its second step;
    returns the finished process's (returncode, stdout, stderr)."""
    child = subprocess.Popen([sys.executable, "-m", "gctrack", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    for line in child.stderr:
        if line.startswith("[2/"):                  # plain progress lines: stderr is a pipe
            break
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    return child.returncode, out, err


def test_ctrl_c_in_the_bench_keeps_the_finished_results(tmp_path):
    returncode, out, err = interrupt_after_two_steps("bench", "--quick", "--out", str(tmp_path))
    assert returncode == 130, err
    assert "Traceback" not in err and "\r" not in err
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert len(results) >= 2


def test_bench_is_bench_passes_and_bench_gc_lists_its_choices():
    from gctrack import harness
    assert "{passes,gc}" in run("bench", "--help").stdout
    assert "4.2 GB" in run("bench", "passes", "--help").stdout
    gc = run("bench", "gc", "--help").stdout
    assert all(name in gc for name in (*harness.GC_BACKENDS, *harness.WORKLOADS))
    assert "--repeat" in gc and "pip install 'gctrack[plots]'" in gc


def test_ctrl_c_in_bench_gc_keeps_the_finished_runs(tmp_path):
    require("pagemap_scan")
    returncode, out, err = interrupt_after_two_steps(
        "bench", "gc", "--workload", "rewire", "--heap-mib", "8", "--seconds", "0.3",
        "--out", str(tmp_path))
    assert returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    document = json.loads((tmp_path / "results.json").read_text())
    assert len(document["runs"]) >= 2 and document["complete"] is False
    assert document["runs"][0]["backend"] == "untracked" and "untracked" in out


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
    assert results["cores"] == __import__("os").cpu_count() and results["rounds"] == 3
    assert " us" in done.stdout or " ms" in done.stdout
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "cost_vs_size.png").stat().st_size > 0
    except ImportError:
        assert "pip install 'gctrack[plots]'" in done.stderr
    for note in {r["note"] for r in results["results"] if r["note"]}:
        assert note in done.stdout, "a skipped cell names its reason"


def test_bad_options_fail_cleanly():
    done = run("demo", "--backend", "nonsense", "--heap-mib", "4")
    assert done.returncode == 2 and "invalid choice: 'nonsense'" in done.stderr
    assert "pagemap_scan" in done.stderr
