"""What this kernel and process support, proven by trying it, with reasons."""
from __future__ import annotations

import errno as errno_codes
import functools
import os
from dataclasses import dataclass, fields

import numpy

from gctrack import _kernel
from gctrack.errors import TrackerError


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


def _denied(call: str, err: int) -> str:
    explanations = {
        errno_codes.EPERM: "denied: vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE, or a seccomp filter",
        errno_codes.ENOSYS: "the kernel is built without CONFIG_USERFAULTFD",
        errno_codes.EINVAL: "rejected: kernel older than 5.11 (no UFFD_USER_MODE_ONLY)",
        errno_codes.ENOTTY: "unknown ioctl: kernel older than 6.7",
    }
    return f"{call}: {explanations.get(err, os.strerror(err))}"


def probe_userfaultfd() -> tuple[Support, Support]:
    """(userfaultfd, WP_ASYNC) support, from a real UFFDIO_API handshake."""
    try:
        offered = _kernel.uffd_features()
    except TrackerError as exc:
        missing = Support(False, _denied(exc.operation, exc.errno), exc.errno)
        return missing, Support(False, "needs userfaultfd", exc.errno)
    uffd = Support(True, f"UFFDIO_API offers features {offered:#x}")
    wanted = _kernel.FEATURE_WP_ASYNC | _kernel.FEATURE_WP_UNPOPULATED
    if offered & wanted != wanted:
        return uffd, Support(False, "UFFDIO_API lacks WP_ASYNC/WP_UNPOPULATED: kernel older than 6.7")
    return uffd, Support(True, "UFFD_FEATURE_WP_ASYNC and WP_UNPOPULATED offered")


def prove_backend(name: str) -> Support:
    """Arm a scratch arena with the backend, write one page, and check that
    exactly it is reported, once."""
    from gctrack.arena import Arena
    from gctrack.backends import BACKENDS
    from gctrack.tracker import Tracker

    try:
        with Arena(4 * os.sysconf("SC_PAGESIZE")) as arena:
            with Tracker(arena, backend=BACKENDS[name](arena)) as tracker:
                written = arena.address + arena.page_size
                numpy.asarray(arena)[arena.page_size] = 1
                first, second = tracker.scan(), tracker.scan()
    except TrackerError as exc:
        return Support(False, _denied(exc.operation, exc.errno), exc.errno)
    expected = [(written, written + arena.page_size)]
    if [(int(r["start"]), int(r["end"])) for r in first] != expected or len(second):
        return Support(False, f"one written page came back as {first.tolist()} then {second.tolist()}")
    return Support(True, "one written page reported once, then re-armed")


def probe_pagemap_scan(wp_async: Support) -> Support:
    if not wp_async:
        return Support(False, "needs userfaultfd WP_ASYNC", wp_async.errno)
    return prove_backend("pagemap_scan")


def probe_uffd_sync(uffd: Support) -> Support:
    if not uffd:
        return Support(False, "needs userfaultfd", uffd.errno)
    return prove_backend("uffd_sync")


def _pagemap_entry(address: int, page_size: int) -> int:
    """The 64-bit /proc/self/pagemap entry of the page holding ``address``."""
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return int.from_bytes(os.pread(fd, 8, address // page_size * 8), "little")
    finally:
        os.close(fd)


def probe_soft_dirty(page_size: int) -> Support:
    """Write a fresh page and look for soft-dirty bit 55 in /proc/self/pagemap.

    Freshly written pages are soft-dirty wherever the kernel tracks it, so this
    needs no clear_refs (which would reset the whole process).
    """
    from gctrack.arena import Arena

    with Arena(page_size) as arena:
        numpy.asarray(arena)[0] = 1
        try:
            entry = _pagemap_entry(arena.address, page_size)
        except OSError as exc:
            return Support(False, f"reading /proc/self/pagemap: {exc.strerror}", exc.errno)
    if not entry >> 55 & 1:
        return Support(False, "a written page never shows bit 55: kernel built without CONFIG_MEM_SOFT_DIRTY")
    if not os.access("/proc/self/clear_refs", os.W_OK):
        return Support(False, "/proc/self/clear_refs is not writable")
    return prove_backend("soft_dirty")


def probe_transparent_hugepages() -> Support:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().strip()
    except OSError:
        return Support(False, "no /sys/kernel/mm/transparent_hugepage: kernel without THP")
    active = mode[mode.index("[") + 1:mode.index("]")] if "[" in mode else mode
    return Support(active != "never", f"mode {active} (arenas use MADV_NOHUGEPAGE unless asked)")


@functools.cache
def features() -> Features:
    """Probe this kernel once per process; every missing mechanism says why."""
    page_size = os.sysconf("SC_PAGESIZE")
    uffd, wp_async = probe_userfaultfd()
    return Features(
        kernel_release=os.uname().release,
        page_size=page_size,
        userfaultfd=uffd,
        wp_async=wp_async,
        pagemap_scan=probe_pagemap_scan(wp_async),
        uffd_sync=probe_uffd_sync(uffd),
        mprotect=prove_backend("mprotect"),
        soft_dirty=probe_soft_dirty(page_size),
        transparent_hugepages=probe_transparent_hugepages(),
    )
