from gctrack.arena import Arena
from gctrack.backend import Backend

class UffdSyncBackend(Backend):
    kernel_writes: str
    def __new__(cls, arena: Arena, vector_len: int | None = None) -> UffdSyncBackend: ...
    @property
    def faults(self) -> int: ...
