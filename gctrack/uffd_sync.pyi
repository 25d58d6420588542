from gctrack.arena import Arena
from gctrack.backend import Backend

class UffdSyncBackend(Backend):
    kernel_writes: str
    def __init__(self, arena: Arena, vector_len: int | None = None) -> None: ...
    @property
    def faults(self) -> int: ...
