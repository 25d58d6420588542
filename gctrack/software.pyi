from gctrack.arena import Arena
from gctrack.backend import Backend

CARD_SIZE: int

class SoftwareBackend(Backend):
    def __new__(cls, arena: Arena, vector_len: int | None = None) -> SoftwareBackend: ...
