# cython: language_level=3
from libc.stdint cimport uint64_t, uintptr_t
from gctrack.arena cimport Arena
from gctrack.backend cimport Backend, BackendCore, PassCounts
from gctrack.cards cimport CardBits, CardTable
from gctrack.threads cimport pthread_t, pthread_mutex_t, pthread_cond_t


ctypedef struct TrackerCore:
    # The C-level tracker: everything a pass, the background loop and drain
    # touch, so that none of them needs the GIL or a Python object.
    BackendCore *backend
    pthread_mutex_t lock            # serialises passes, the loop and drain
    pthread_cond_t wake             # wakes the loop early when it must stop
    CardBits accumulated            # what the loop collected since the last drain
    bint running                    # the loop keeps going while set (under lock)
    long long interval_ns
    int loop_error                  # -errno of the pass that stopped the loop
    const char *loop_error_operation
    PassCounts loop_totals          # summed over the loop's passes
    uint64_t loop_passes
    long owner_pid                  # the C-level calls refuse other processes


cdef int tracker_pass_into(TrackerCore *t, CardBits *cards, bint reset,
                           uint64_t max_pages, PassCounts *counts) noexcept nogil
cdef int tracker_drain(TrackerCore *t, CardBits *cards, PassCounts *counts) noexcept nogil
cdef int tracker_record(TrackerCore *t, uintptr_t start, uintptr_t end) noexcept nogil


cdef class Tracker:
    cdef TrackerCore core
    cdef readonly Arena arena
    cdef readonly Backend backend_object   # the armed mechanism (name: .backend)
    cdef CardTable accumulated_table  # owns core.accumulated.words
    cdef pthread_t thread
    cdef bint thread_alive
    cdef bint sync_ready              # lock and cond initialised
    cdef readonly bint closed
    cdef public bint reserved         # set by a Heap: passes belong to its Collector
    cdef long owner_pid               # passes run only in the process that armed it

    cdef int check_usable(self) except -1
    cdef int check_not_running(self) except -1
    cdef int check_not_reserved(self) except -1
    cdef int check_in_arena(self, object addr, object length) except -1
    cdef tuple span_of(self, object addr, object size)
    cdef CardBits *cards_for_arena(self, object cards) except NULL
    cdef int join_loop(self) except -1
    cdef int raise_loop_error(self) except -1
