from gctrack.arena import Arena

class Backend:
    """An armed tracking mechanism over one arena (C interface in backend.pxd)."""

    name: str
    arena: Arena | None
    def close(self) -> None: ...
