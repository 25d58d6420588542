from gctrack.heap import Heap
from gctrack.stats import CycleStats

class Collector:
    heap: Heap
    def __init__(self, heap: Heap) -> None: ...
    def collect(self, *, concurrent: bool = True, max_preclean: int = 3) -> CycleStats: ...
