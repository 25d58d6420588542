# cython: language_level=3
from libc.stdint cimport uint64_t, uintptr_t
from gctrack.arena cimport Arena
from gctrack.backend cimport Backend, BackendCore, PassCounts
from gctrack.cards cimport CardBits, CardTable
from gctrack.linux cimport gct_page_region
from gctrack.threads cimport pthread_t, pthread_mutex_t, pthread_cond_t
from gctrack.workers cimport WorkerPool


ctypedef struct RegionBuffer:
    # Regions a pass reported, kept in a growing array.
    gct_page_region *data
    size_t length
    size_t capacity
    bint incomplete                 # some of the pass's regions are not here


ctypedef struct TrackerCore:
    # The C-level tracker: everything a pass, the background loop and drain
    # touch, so that none of them needs the GIL or a Python object.
    BackendCore *backend            # NULL once closed
    pthread_mutex_t lock            # serialises passes, the loop and drain
    pthread_cond_t wake             # wakes the loop early when it must stop
    CardBits accumulated            # what the loop collected since the last drain
    bint running                    # the loop keeps going while set (under lock)
    bint loop_active                # a loop thread exists (until joined)
    long long interval_ns
    int loop_error                  # -errno of the pass that stopped the loop
    const char *loop_error_operation
    PassCounts loop_totals          # summed over the loop's passes
    uint64_t loop_passes
    long owner_pid                  # the process that armed it
    const int *armed_here           # 1 in that process; a wipe-on-fork page reads 0 in a child
    const void *reserved_by         # the owner whose passes these are (a Heap), or NULL
    # record and bracket calls inside the backend now (atomic); close()
    # waits for them before it frees the backend
    int calls_in_flight


# The C-level entry points. Each returns 0 or -errno and applies the Python
# API's guards: -EINVAL for a NULL tracker or cards, or cards that do not
# cover the arena; -EBADF once closed; -ECHILD in a forked child; -EBUSY
# while the background loop runs (pass_into only); -EPERM on a tracker that
# a Heap reserved. ``counts`` may be NULL.
cdef int tracker_pass_into(TrackerCore *t, CardBits *cards, bint reset,
                           uint64_t max_pages, PassCounts *counts) noexcept nogil
cdef int tracker_drain(TrackerCore *t, CardBits *cards, PassCounts *counts) noexcept nogil
cdef int tracker_record(TrackerCore *t, uintptr_t start, uintptr_t end) noexcept nogil
cdef int tracker_begin_external(TrackerCore *t, uintptr_t start, uintptr_t end) noexcept nogil
cdef int tracker_end_external(TrackerCore *t, uintptr_t start, uintptr_t end) noexcept nogil
# A pass on a reserved tracker, by its owner (the Heap's Collector), over
# [arena start, end) (end page-aligned; 0 = the arena's end); with
# reset=False it reports without re-arming (the remark's final pass).
cdef int tracker_owner_pass(TrackerCore *t, const void *owner, CardBits *cards, bint reset,
                            uintptr_t end, PassCounts *counts) noexcept nogil
# The owner's report-only pass (reset=False above), split into chunks that
# `pool`'s threads and the caller walk at once, at most max_participants of
# them, where the backend can (BackendCore.report_range) and the range is
# long enough; otherwise one pass on the caller. The chunks begin on words of
# card bits, so the participants never write one word of ``cards`` together.
# ``keep`` (or NULL) receives the regions of a pass that was not split, in
# ascending order; it is flagged incomplete when the pass was split or its
# regions did not fit in memory (the cards are marked either way).
cdef int tracker_owner_report(TrackerCore *t, const void *owner, CardBits *cards, uintptr_t end,
                              WorkerPool *pool, size_t max_participants, RegionBuffer *keep,
                              PassCounts *counts) noexcept nogil


cdef class Tracker:
    cdef TrackerCore core
    cdef readonly Arena arena
    cdef readonly Backend backend_object   # the armed mechanism (name: .backend)
    cdef CardTable accumulated_table  # owns core.accumulated.words
    cdef pthread_t thread
    cdef bint thread_alive
    cdef bint sync_ready              # lock and cond initialised
    cdef readonly bint closed
    cdef long owner_pid               # passes run only in the process that armed it
    cdef void *fork_page              # the wipe-on-fork page behind core.armed_here

    cdef int reserve_for(self, const void *owner) except -1
    cdef void release_reservation(self) noexcept

    cdef int check_usable(self) except -1
    cdef int check_not_running(self) except -1
    cdef int check_not_reserved(self) except -1
    cdef int check_in_arena(self, object addr, object length) except -1
    cdef tuple checked_range(self, object addr, object length)
    cdef int raise_for(self, int rc) except -1
    cdef tuple span_of(self, object addr, object size)
    cdef CardBits *cards_for_arena(self, object cards) except NULL
    cdef int join_loop(self) except -1
    cdef int raise_loop_error(self) except -1
