"""What this kernel and process support, and why not: a report above the backends.

Nothing here decides anything for a Tracker: each backend's constructor proves
its own mechanism and raises UnsupportedError with the reason. This module
gathers those verdicts for the CLI, the tests and users who ask. Proving
mprotect installs a SIGSEGV handler and takes a fault, proving uffd_sync starts
a thread, and proving soft_dirty clears the soft-dirty bits of the whole
process, so by default the proofs run in a child process and the caller's
process is left as it was.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, fields

from gctrack import _kernel
from gctrack.errors import USERFAULTFD_DENIALS, TrackerError, UnsupportedError


@dataclass(frozen=True)
class Support:
    """Whether one mechanism works here; ``reason`` says why not, or what proved it."""

    available: bool
    reason: str
    errno: int | None = None

    def __bool__(self) -> bool:
        return self.available


@dataclass(frozen=True)
class Features:
    """The probe's findings; see ``features()``."""

    kernel_release: str
    page_size: int
    userfaultfd: Support
    wp_async: Support
    pagemap_scan: Support
    uffd_sync: Support
    mprotect: Support
    soft_dirty: Support
    transparent_hugepages: Support

    @property
    def backends(self) -> dict[str, Support]:
        """Availability of each backend, by backend name."""
        return {
            "pagemap_scan": self.pagemap_scan,
            "mprotect": self.mprotect,
            "uffd_sync": self.uffd_sync,
            "soft_dirty": self.soft_dirty,
            "software": SOFTWARE,
        }

    def table(self) -> str:
        """A human-readable table, one mechanism a line."""
        rows = [("kernel", self.kernel_release), ("page size", f"{self.page_size} B")]
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Support):
                mark = "yes" if value else "no"
                rows.append((field.name, f"{mark:4}{value.reason}"))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {text}" for name, text in rows)


SOFTWARE = Support(True, "always: the writers call the barrier themselves")
#: The backends whose proof this module runs, in the order it runs them.
PROVEN_BACKENDS = ("pagemap_scan", "uffd_sync", "mprotect", "soft_dirty")


def probe_userfaultfd() -> tuple[Support, Support]:
    """(userfaultfd, WP_ASYNC) support, from a real UFFDIO_API handshake."""
    try:
        offered = _kernel.uffd_features()
    except TrackerError as exc:
        err = exc.errno or 0
        reason = f"{exc.operation}: {USERFAULTFD_DENIALS.get(err, os.strerror(err))}"
        return Support(False, reason, err), Support(False, "needs userfaultfd", err)
    uffd = Support(True, f"UFFDIO_API offers features {offered:#x}")
    wanted = _kernel.FEATURE_WP_ASYNC | _kernel.FEATURE_WP_UNPOPULATED
    if offered & wanted != wanted:
        return uffd, Support(False, "UFFDIO_API lacks WP_ASYNC/WP_UNPOPULATED: kernel older than 6.7")
    return uffd, Support(True, "UFFD_FEATURE_WP_ASYNC and WP_UNPOPULATED offered")


def prove_backend(name: str) -> Support:
    """Arm a scratch arena with the backend (whose constructor proves its
    mechanism), write one page, and check that exactly it is reported, once."""
    import numpy

    from gctrack.arena import Arena
    from gctrack.tracker import Tracker

    try:
        with Arena(4 * os.sysconf("SC_PAGESIZE")) as arena:
            with Tracker(arena, backend=name) as tracker:
                written = arena.address + arena.page_size
                numpy.asarray(arena)[arena.page_size] = 1
                first, second = tracker.scan(), tracker.scan()
    except UnsupportedError as exc:
        return Support(False, exc.reason, exc.errno)
    except TrackerError as exc:
        return Support(False, str(exc), exc.errno)
    expected = [(written, written + arena.page_size)]
    if [(int(r["start"]), int(r["end"])) for r in first] != expected or len(second):
        return Support(False, f"one written page came back as {first.tolist()} then {second.tolist()}")
    return Support(True, "armed, proved, and one written page reported once")


def probe_transparent_hugepages() -> Support:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().strip()
    except OSError:
        return Support(False, "no /sys/kernel/mm/transparent_hugepage: kernel without THP")
    active = mode[mode.index("[") + 1:mode.index("]")] if "[" in mode else mode
    return Support(active != "never", f"mode {active} (arenas use MADV_NOHUGEPAGE unless asked)")


def prove_backends_here() -> dict[str, Support]:
    """Every backend's verdict, proven in this process."""
    return {name: prove_backend(name) for name in PROVEN_BACKENDS}


def prove_backends_in_child() -> dict[str, Support]:
    """Every backend's verdict, proven in a fresh interpreter; a child that
    fails leaves each backend unavailable with what went wrong."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
    try:
        child = subprocess.run([sys.executable, "-m", "gctrack.probe", "--backends-json"],
                               capture_output=True, text=True, timeout=120, env=env)
        verdicts = json.loads(child.stdout) if child.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        child, verdicts = None, None
        failure = f"the probe's child process failed: {exc}"
    if verdicts is None:
        if child is not None:
            last = (child.stderr.strip().splitlines() or ["no output"])[-1]
            failure = f"the probe's child process exited with {child.returncode}: {last}"
        return {name: Support(False, failure) for name in PROVEN_BACKENDS}
    return {name: Support(**verdicts[name]) for name in PROVEN_BACKENDS}


_FOUND: dict[bool, Features] = {}


def features(*, in_process: bool = False) -> Features:
    """Probe this kernel once per process; every missing mechanism says why.

    The backends are proven in a child process unless ``in_process`` is
    true (see the module docstring for what proving them does to a process).
    """
    if in_process not in _FOUND:
        _FOUND[in_process] = probe_features(in_process)
    return _FOUND[in_process]


def probe_features(in_process: bool) -> Features:
    uffd, wp_async = probe_userfaultfd()
    verdicts = prove_backends_here() if in_process else prove_backends_in_child()
    return Features(
        kernel_release=os.uname().release,
        page_size=os.sysconf("SC_PAGESIZE"),
        userfaultfd=uffd,
        wp_async=wp_async,
        transparent_hugepages=probe_transparent_hugepages(),
        **verdicts,
    )


def main() -> int:
    """``python -m gctrack.probe --backends-json``: the child side of features()."""
    if sys.argv[1:] != ["--backends-json"]:
        print("usage: python -m gctrack.probe --backends-json", file=sys.stderr)
        return 2
    print(json.dumps({name: asdict(support) for name, support in prove_backends_here().items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
