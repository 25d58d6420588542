"""gctrack: which cards of a heap did the program write while the collector marked?

Page-level write tracking for concurrent garbage collectors, built on Linux's
PAGEMAP_SCAN ioctl with userfaultfd asynchronous write-protect (Linux 6.7+).
"""
from gctrack.arena import Arena
from gctrack.capi import _C_API
from gctrack.backends import AUTO_ORDER, BACKENDS
from gctrack.cards import REGION_DTYPE, CardTable
from gctrack.collector import Collector
from gctrack.errors import HeapFullError, MissedBarrierError, TrackerError, UnsupportedError
from gctrack.heap import Heap
from gctrack.mutator import NativeMutators
from gctrack.probe import Features, Support, features
from gctrack.stats import CycleStats, LoopStats, PrecleanPass
from gctrack.tracker import PassStats, Tracker
from gctrack.verifier import MISSED_DTYPE, BarrierReport, BarrierVerifier
from gctrack.writewatch import WriteWatch

__version__ = "0.1.0"

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "MISSED_DTYPE",
    "REGION_DTYPE",
    "Arena",
    "BarrierReport",
    "BarrierVerifier",
    "CardTable",
    "Collector",
    "CycleStats",
    "Features",
    "Heap",
    "HeapFullError",
    "LoopStats",
    "MissedBarrierError",
    "NativeMutators",
    "PassStats",
    "PrecleanPass",
    "Support",
    "Tracker",
    "TrackerError",
    "UnsupportedError",
    "WriteWatch",
    "features",
    "get_cython_include",
    "get_include",
]


def get_include() -> str:
    """The folder that holds gctrack's C headers (``#include "gctrack/..."``)."""
    import os

    return os.path.join(os.path.dirname(__file__), "include")


def get_cython_include() -> str:
    """The folder to put on Cython's include_path so that ``cimport gctrack.x``
    finds the .pxd files, wherever and however gctrack is installed."""
    import os

    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
