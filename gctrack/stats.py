"""Plain records that gctrack's passes return."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PassStats:
    """One pass: what it reported and what it cost."""

    regions: int   #: runs of consecutive written pages reported
    pages: int     #: pages reported
    calls: int     #: kernel calls the pass made (more than 1 when the vector filled)
    seconds: float  #: wall time of the pass, lock held


@dataclass(frozen=True)
class LoopStats:
    """Totals over the background pass loop's passes."""

    passes: int
    regions: int
    pages: int
    calls: int
    seconds: float
