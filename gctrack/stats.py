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
    predicted_remark: float = 0.0   #: the remark, had it started after this round


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
    sweep_seconds: float             #: concurrent cycles sweep with the mutators running
    #: from the stop request until the last mutator parked: the mutators wait
    #: this long on top of initial_mark_pause and remark_pause
    initial_mark_time_to_safepoint: float = 0.0
    remark_time_to_safepoint: float = 0.0   #: the only stop of a stop-the-world cycle
    #: pages the cycle's first pass re-armed: written since the previous
    #: cycle's re-arm, the pages its report-only remark left dirty included
    rearm_pages: int = 0
    pause_goal: float = 0.0          #: the Collector's goal for the remark
    #: the remark that precleaning predicted when it stopped (concurrent cycles)
    predicted_remark: float = 0.0
    #: precleaning stopped at its bound on rounds or time with the prediction
    #: still above the goal: the mutators dirty cards faster than it cleans them
    outran_precleaning: bool = False
    #: threads that shared the remark's rescan: the collector's own and the
    #: GC workers that joined (the final pass splits on its own terms:
    #: pagemap_scan, over an extent of 128 MiB or more)
    remark_threads: int = 1
    #: of remark_pause, the final tracking pass (report-only)
    remark_pass_seconds: float = 0.0
    #: each pause as (stopped, resumed) in CLOCK_MONOTONIC seconds, the clock
    #: of time.monotonic(): from the stop request (time to safepoint included)
    #: until the mutators were released. A concurrent cycle has two, the
    #: initial mark's and the remark's; a stop-the-world cycle has one. What a
    #: minimum-mutator-utilisation curve is computed from
    pause_spans: tuple[tuple[float, float], ...] = ()
