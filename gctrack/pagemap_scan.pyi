from gctrack.arena import Arena
from gctrack.backend import Backend

REQUIRED_FEATURES: int
DEFAULT_VECTOR_LEN: int
MAX_VECTOR_LEN: int

def checked_vector_len(vector_len: int) -> int: ...

class PagemapScanBackend(Backend):
    def __new__(cls, arena: Arena, vector_len: int = ..., *,
                beside_software: bool = False) -> PagemapScanBackend: ...
