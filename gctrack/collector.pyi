from typing import Callable

from gctrack.heap import Heap
from gctrack.stats import CycleStats

class Collector:
    heap: Heap
    pause_goal: float
    preclean_time_limit: float
    workers: int
    def __new__(cls, heap: Heap, *, pause_goal: float = 0.001,
                preclean_time_limit: float = 1.0, workers: int | None = None) -> Collector: ...
    @property
    def worker_threads(self) -> tuple[tuple[int, int], ...]: ...
    def collect(self, *, concurrent: bool = True, max_preclean: int = 10,
                after_phase: Callable[[str], object] | None = None) -> CycleStats:
        """One cycle. ``after_phase`` (a testing aid, concurrent cycles only) is
        called with "initial_mark", "concurrent_mark", "preclean" (each round)
        and "before_remark", with the GIL held and the mutators running."""
        ...

def checked_workers(workers: int | None) -> int: ...
