"""Plain records that gctrack's loop and collector return.

PassStats, which every pass returns, is a C-level record in gctrack.tracker:
it is built on the hot path.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoopStats:
    """Totals over the background pass loop's passes."""

    passes: int
    regions: int
    pages: int
    calls: int
    seconds: float


@dataclass(frozen=True)
class PrecleanPass:
    """One precleaning pass of a concurrent cycle."""

    dirty_cards: int   #: cards the pass found dirty
    rescanned: int     #: marked objects on them that were scanned again
    seconds: float


@dataclass(frozen=True)
class CycleStats:
    """One collection cycle (Collector.collect)."""

    backend: str
    concurrent: bool
    live: int                        #: allocated objects after the sweep
    freed: int
    initial_mark_pause: float        #: mutators stopped: mark the roots (re-arming runs before, concurrently)
    concurrent_mark_seconds: float
    preclean: tuple[PrecleanPass, ...]
    remark_pause: float              #: mutators stopped (the whole mark, stop-the-world)
    remark_dirty_cards: int
    full_mark_seconds: float         #: stop-the-world cycles only
    sweep_seconds: float
