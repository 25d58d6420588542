from gctrack.arena import Arena

class Backend:
    """An armed tracking mechanism over one arena (C interface in backend.pxd)."""

    name: str
    arena: Arena | None
    claimed: bool
    @property
    def atomic_passes(self) -> bool: ...
    def close(self) -> None: ...
