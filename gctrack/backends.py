"""The registry of tracking backends, and how "auto" chooses among them."""
from __future__ import annotations

from gctrack import probe
from gctrack.backend import Backend
from gctrack.errors import UnsupportedError
from gctrack.pagemap_scan import DEFAULT_VECTOR_LEN, PagemapScanBackend

#: Every backend by name.
BACKENDS = {
    "pagemap_scan": PagemapScanBackend,
}

#: What "auto" tries, best first: the cheapest pass and first write measured here.
AUTO_ORDER = ("pagemap_scan",)


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
        return backend
    cls = BACKENDS[resolve(backend)]
    return cls(arena, DEFAULT_VECTOR_LEN if vector_len is None else vector_len)
