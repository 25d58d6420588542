from collections.abc import Mapping

from gctrack.cards import CardTable
from gctrack.heap import Heap

WORKLOADS: tuple[str, ...]
PARAMETERS: dict[str, tuple[str, ...]]
WORK_UNITS: dict[str, str]
LIVE_SHARE: float
MAX_DEPTH: int

class NativeMutators:
    """Native threads running a workload on a Heap; they hold their root slots from start() to stop()."""

    def __new__(cls, heap: Heap, *, threads: int = 2, rate: float = 0.0,
                roots_per_thread: int = 16, seed: int = 1, workload: str = "rewire",
                params: Mapping[str, int | float] | None = None,
                stored_cards: CardTable | None = None) -> NativeMutators: ...
    @property
    def workload(self) -> str: ...
    @property
    def params(self) -> dict[str, int | float]:
        """The workload's parameters, defaults filled in (a new dict)."""
        ...
    @property
    def work_unit(self) -> str:
        """"operations", "trees" or "steps": what work_units counts and rate paces."""
        ...
    def start(self) -> NativeMutators:
        """Returns once every thread is registered (parked, if the world is stopped)."""
        ...
    def stop(self) -> None:
        """Idempotent; releases the root slots. In a forked child: forgets the threads."""
        ...
    def pause(self) -> None:
        """Stop the heap's world (idempotent); it stays stopped through a collect()."""
        ...
    def resume(self) -> None:
        """Withdraw this object's pause(); does nothing without one."""
        ...
    def stats(self) -> dict[str, int | float]:
        """stores, allocations, root_changes, violations, work_units, old_stores,
        alloc_stalls (ints); stall_seconds, cpu_seconds (floats)."""
        ...
    def __enter__(self) -> NativeMutators: ...
    def __exit__(self, *exc_info: object) -> None: ...

def populate(heap: Heap, objects: int, *, garbage: float = 0.2, seed: int = 1) -> int: ...
