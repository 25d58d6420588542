from gctrack.arena import Arena
from gctrack.backend import Backend

class SoftDirtyBackend(Backend):
    def __init__(self, arena: Arena, vector_len: int | None = None) -> None: ...
