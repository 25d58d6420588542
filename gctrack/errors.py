"""gctrack's exceptions: one small hierarchy under OSError."""
from __future__ import annotations

import errno as _errno
import os


class TrackerError(OSError):
    """A kernel call made by gctrack failed.

    ``errno`` and ``strerror`` are the kernel's; ``operation`` names what
    gctrack was doing (for example ``"UFFDIO_REGISTER"``).
    """

    def __init__(self, err: int, operation: str, detail: str = "") -> None:
        message = f"{operation}: {os.strerror(err)}"
        if detail:
            message += f" ({detail})"
        super().__init__(err, message)
        self.operation = operation


class UnsupportedError(TrackerError):
    """A tracking mechanism is not available on this kernel or process.

    ``mechanism`` names it and ``reason`` is the probe's one-line reason.
    ``errno`` is the error that proved it missing, or ENOTSUP when the probe
    found it missing without a failing call (for example, bit 55 never set).
    """

    def __init__(self, mechanism: str, reason: str, err: int | None = None) -> None:
        super().__init__(err or _errno.ENOTSUP, f"{mechanism} unavailable", reason)
        self.mechanism = mechanism
        self.reason = reason


#: What a failing userfaultfd(2) or userfaultfd ioctl means, by errno.
USERFAULTFD_DENIALS = {
    _errno.EPERM: "denied: vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE, or a seccomp filter",
    _errno.ENOSYS: "the kernel is built without CONFIG_USERFAULTFD",
    _errno.EINVAL: "rejected: kernel older than 5.11 (no UFFD_USER_MODE_ONLY)",
    _errno.ENOTTY: "unknown ioctl: kernel older than 6.7",
}


def userfaultfd_unsupported(mechanism: str, call: str, err: int) -> TrackerError:
    """The error for a failed userfaultfd call: UnsupportedError when the
    errno means the mechanism is missing here, else a plain TrackerError."""
    if err in USERFAULTFD_DENIALS:
        return UnsupportedError(mechanism, f"{call}: {USERFAULTFD_DENIALS[err]}", err)
    return TrackerError(err, call)


class HeapFullError(MemoryError):
    """Heap.alloc() found no free object: collect, or make the heap larger."""


class MissedBarrierError(RuntimeError):
    """A Heap built with ``verify_barriers=True`` found stores that skipped
    the write barrier, at a remark. The cycle is abandoned before its sweep,
    since the marker may have missed what those stores linked.

    ``missed`` is a structured array with the fields ``object`` (index),
    ``slot`` (reference slot), ``address``, ``old`` and ``new``.
    """

    def __init__(self, missed) -> None:
        shown = "; ".join(f"object {int(r['object'])} slot {int(r['slot'])}: "
                          f"{int(r['old']):#x} -> {int(r['new']):#x}" for r in missed[:3])
        more = f"; and {len(missed) - 3} more" if len(missed) > 3 else ""
        super().__init__(f"{len(missed)} stores skipped the write barrier: {shown}{more}")
        self.missed = missed
