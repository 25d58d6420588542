"""The registry of tracking backends, and how "auto" chooses among them.

Choosing touches nothing but the chosen mechanism: "auto" tries the
constructors in order, and each one proves its own mechanism or raises
UnsupportedError with the reason (gctrack.probe only reports).
"""
from __future__ import annotations

from gctrack.backend import Backend
from gctrack.errors import UnsupportedError
from gctrack.mprotect import MprotectBackend
from gctrack.pagemap_scan import DEFAULT_VECTOR_LEN, PagemapScanBackend, checked_vector_len
from gctrack.soft_dirty import SoftDirtyBackend
from gctrack.software import SoftwareBackend
from gctrack.uffd_sync import UffdSyncBackend

#: Every backend by name.
BACKENDS = {
    "pagemap_scan": PagemapScanBackend,
    "mprotect": MprotectBackend,
    "uffd_sync": UffdSyncBackend,
    "soft_dirty": SoftDirtyBackend,
    "software": SoftwareBackend,
}

#: What "auto" tries, best first (benchmarks/test_backends.py measures it):
#: the cheapest first write and pass, then the cheaper first write.
#: "software" is never chosen for you: it sees only the stores that call
#: its barrier.
AUTO_ORDER = ("pagemap_scan", "mprotect", "uffd_sync", "soft_dirty")


def create(backend, arena, vector_len=None) -> Backend:
    """An armed backend over ``arena``: from a name, or a Backend made for it."""
    vector_len = DEFAULT_VECTOR_LEN if vector_len is None else checked_vector_len(vector_len)
    if isinstance(backend, Backend):
        return adopt(backend, arena)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a name or a Backend, got {type(backend).__name__}")
    if backend == "auto":
        return first_supported(arena, vector_len)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {sorted(BACKENDS)} or 'auto'")
    return BACKENDS[backend](arena, vector_len)


def adopt(backend: Backend, arena) -> Backend:
    """Claim an armed Backend for one Tracker."""
    if backend.arena is not arena:
        raise ValueError("the backend is closed or armed for a different arena")
    if backend.claimed:
        raise ValueError("the backend already belongs to a Tracker")
    backend.claimed = True
    return backend


def first_supported(arena, vector_len: int) -> Backend:
    """The first backend of AUTO_ORDER that arms here; UnsupportedError with
    every reason when none does."""
    reasons = []
    for name in AUTO_ORDER:
        try:
            return BACKENDS[name](arena, vector_len)
        except UnsupportedError as exc:
            reasons.append(f"{name}: {exc.reason}")
    raise UnsupportedError("every backend", "; ".join(reasons))
