from gctrack.arena import Arena
from gctrack.backend import Backend

class SoftDirtyBackend(Backend):
    def __new__(cls, arena: Arena, vector_len: int | None = None) -> SoftDirtyBackend: ...
