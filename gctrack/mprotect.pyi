from gctrack.arena import Arena
from gctrack.backend import Backend

def handler_faults() -> int: ...

class MprotectBackend(Backend):
    def __new__(cls, arena: Arena, vector_len: int | None = None) -> MprotectBackend: ...
