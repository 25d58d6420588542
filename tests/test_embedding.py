"""The two embedding examples, built against the installed package and run."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gctrack

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
AVAILABLE = [name for name, support in gctrack.features().backends.items() if support]


@pytest.fixture(scope="module", params=["cython_embedder", "c_embedder"])
def built_example(request, tmp_path_factory):
    """A copy of the example, built in place outside the source tree."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    folder = tmp_path_factory.mktemp(request.param)
    shutil.copytree(EXAMPLES / request.param, folder, dirs_exist_ok=True)
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                           cwd=folder, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    return folder


@pytest.mark.parametrize("backend", AVAILABLE)
def test_example_sees_every_store(built_example, backend):
    run = subprocess.run([sys.executable, "run.py", backend], cwd=built_example,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    counts = re.search(r"(\d+) objects written, (\d+) cards dirty, (\d+) missing", run.stdout)
    written, dirty, missing = (int(n) for n in counts.groups())
    assert missing == 0 and dirty >= written > 0
    if backend == "software":
        assert dirty == written          # exact at card granularity


def test_capsule_names_the_c_api():
    assert "gctrack._C_API" in repr(gctrack._C_API)
    header = Path(gctrack.get_include()) / "gctrack" / "gctrack.h"
    assert header.is_file() and "GCTRACK_CAPI_VERSION" in header.read_text()
    assert (Path(gctrack.get_cython_include()) / "gctrack" / "tracker.pxd").is_file()
