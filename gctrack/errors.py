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


def raise_for(err: int, operation: str, detail: str = "") -> None:
    """Raise TrackerError for a negative-errno result from a nogil wrapper."""
    if err < 0:
        raise TrackerError(-err, operation, detail)


class HeapFullError(MemoryError):
    """Heap.alloc() found no free object: collect, or make the heap larger."""
