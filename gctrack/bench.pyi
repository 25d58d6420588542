from dataclasses import dataclass
from pathlib import Path

MiB: int
BACKENDS: tuple[str, ...]
REFERENCE: str
SLOW_SETUP_PAGES: dict[str, int]

@dataclass(frozen=True)
class Sweep:
    sizes: tuple[int, ...]
    fractions: tuple[float, ...]
    first_write_pages: int
    rounds: int

FULL: Sweep
QUICK: Sweep

@dataclass(frozen=True)
class Result:
    kind: str
    backend: str
    size: int
    fraction: float
    seconds: float
    note: str = ...

def max_map_count() -> int: ...
def skip_reason(backend: str, written_pages: int, scattered: bool) -> str | None: ...
def run(sweep: Sweep) -> tuple[list[Result], dict[str, str]]: ...
def table(results: list[Result], missing: dict[str, str]) -> str: ...
def write_outputs(results: list[Result], missing: dict[str, str], out: Path) -> list[Path]: ...
