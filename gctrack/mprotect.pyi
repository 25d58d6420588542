from gctrack.arena import Arena
from gctrack.backend import Backend

def handler_faults() -> int: ...

class MprotectBackend(Backend):
    def __init__(self, arena: Arena, vector_len: int | None = None) -> None: ...
