from typing import Any

import numpy
import numpy.typing as npt

from gctrack.arena import Arena
from gctrack.cards import CardTable

MISSED_DTYPE: numpy.dtype
DEFAULT_MAX_MISSED: int

class BarrierReport:
    """What one BarrierVerifier.check() found; true when nothing was missed."""

    missed: npt.NDArray[numpy.void]
    missed_count: int
    pages_written: int
    words_changed: int
    seconds: float
    def __init__(self, missed: npt.NDArray[numpy.void], missed_count: int, pages_written: int,
                 words_changed: int, seconds: float) -> None: ...
    def __bool__(self) -> bool: ...

class BarrierVerifier:
    """Finds every store into an arena whose card the runtime's barrier did not mark."""

    arena: Arena
    cards: CardTable
    closed: bool
    def __new__(cls, arena: Arena, cards: CardTable) -> BarrierVerifier: ...
    def check(self, clear: bool = True, *, max_missed: int = ...) -> BarrierReport: ...
    def close(self) -> None: ...
    def __enter__(self) -> BarrierVerifier: ...
    def __exit__(self, *exc_info: Any) -> None: ...
