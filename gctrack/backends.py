"""The registry of tracking backends, and how "auto" chooses among them."""
from __future__ import annotations

from gctrack import probe
from gctrack.backend import Backend
from gctrack.errors import UnsupportedError
from gctrack.mprotect import MprotectBackend
from gctrack.pagemap_scan import DEFAULT_VECTOR_LEN, PagemapScanBackend
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


def resolve(name: str) -> str:
    """The backend a name stands for; UnsupportedError if it is missing here."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name or a Backend, got {type(name).__name__}")
    support = probe.features().backends
    if name == "auto":
        for candidate in AUTO_ORDER:
            if support[candidate]:
                return candidate
        reasons = "; ".join(f"{n}: {support[n].reason}" for n in AUTO_ORDER)
        raise UnsupportedError("every backend", reasons)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(BACKENDS)} or 'auto'")
    if not support[name]:
        raise UnsupportedError(name, support[name].reason, support[name].errno)
    return name


def create(backend, arena, vector_len=None) -> Backend:
    """An armed backend over ``arena``: from a name, or a Backend made for it."""
    if isinstance(backend, Backend):
        if backend.arena is not arena:
            raise ValueError("the backend is closed or armed for a different arena")
        if backend.claimed:
            raise ValueError("the backend already belongs to a Tracker")
        backend.claimed = True
        return backend
    cls = BACKENDS[resolve(backend)]
    return cls(arena, DEFAULT_VECTOR_LEN if vector_len is None else vector_len)
