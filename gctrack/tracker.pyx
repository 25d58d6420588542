# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Tracker: arms a backend over an arena and runs its passes.

The pass (timed, serialised by one lock), the background pass loop and drain
are written here once, against the C-level BackendCore interface, so every
backend gets the same loop and the same drain semantics.
"""
import math
import operator

import numpy

from libc.errno cimport errno, EBADF, EBUSY, ECHILD, EINVAL, ENOMEM, EPERM
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memset
from posix.mman cimport (madvise, mmap, munmap, MADV_DONTNEED, MAP_ANONYMOUS, MAP_FAILED,
                         MAP_PRIVATE, PROT_READ, PROT_WRITE)
from posix.unistd cimport getpid, sysconf, _SC_PAGESIZE
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from gctrack.clock cimport monotonic_seconds
from gctrack.arena cimport Arena
from gctrack.backend cimport BackendCore, PassCounts, RegionSink
from gctrack.cards cimport (CardBits, CardTable, cards_mark_regions, cards_merge,
                            cards_clear, cards_clear_range)
from gctrack.linux cimport gct_page_region
from gctrack.workers cimport (MAX_WORKERS, Chunks, WorkerPool, chunk_size_for, chunks_init,
                              chunks_take, pool_run)
from gctrack.threads cimport (pthread_condattr_t, pthread_create, pthread_join,
                              pthread_mutex_init, pthread_mutex_destroy, pthread_mutex_lock,
                              pthread_mutex_unlock, pthread_condattr_init,
                              pthread_condattr_setclock, pthread_condattr_destroy,
                              pthread_cond_init, pthread_cond_destroy, pthread_cond_signal,
                              pthread_cond_timedwait)

from gctrack import backends
from gctrack.cards import REGION_DTYPE
from gctrack.errors import TrackerError
from gctrack.stats import LoopStats


cdef extern from *:
    """
    static inline int gct_load_flag(const int *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void gct_enter_call(int *n) { __atomic_add_fetch(n, 1, __ATOMIC_SEQ_CST); }
    static inline void gct_leave_call(int *n) { __atomic_sub_fetch(n, 1, __ATOMIC_SEQ_CST); }
    static inline int gct_calls(int *n) { return __atomic_load_n(n, __ATOMIC_SEQ_CST); }
    static inline void *gct_load_backend(void **p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void gct_clear_backend(void **p) { __atomic_store_n(p, (void *)0, __ATOMIC_SEQ_CST); }
    static inline void gct_first_error(int *slot, int rc) {
        int none = 0;
        __atomic_compare_exchange_n(slot, &none, rc, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    """
    int gct_load_flag(const int *p) nogil
    void gct_enter_call(int *n) nogil
    void gct_leave_call(int *n) nogil
    int gct_calls(int *n) nogil
    void *gct_load_backend(void **p) nogil
    void gct_clear_backend(void **p) nogil
    void gct_first_error(int *slot, int rc) nogil

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from "<sys/mman.h>" nogil:
    enum: MADV_WIPEONFORK       # Linux 4.14


cdef void *wipe_on_fork_flag() noexcept nogil:
    """A page holding the int 1 that reads 0 in any forked child (so the
    C-level calls tell a child cheaply, without getpid()); NULL where the
    kernel lacks MADV_WIPEONFORK, and callers fall back to getpid()."""
    cdef void *page = mmap(NULL, <size_t>sysconf(_SC_PAGESIZE), PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if page == MAP_FAILED:
        return NULL
    if madvise(page, <size_t>sysconf(_SC_PAGESIZE), MADV_WIPEONFORK) != 0:
        munmap(page, <size_t>sysconf(_SC_PAGESIZE))
        return NULL
    (<int *>page)[0] = 1
    return page


# ---- region sinks: where a pass's regions go --------------------------------

cdef int mark_cards(void *ctx, const gct_page_region *regions, size_t n) noexcept nogil:
    cards_mark_regions(<CardBits *>ctx, regions, n)
    return 0


cdef int append_regions(void *ctx, const gct_page_region *regions, size_t n) noexcept nogil:
    cdef RegionBuffer *buf = <RegionBuffer *>ctx
    cdef size_t capacity = buf.capacity if buf.capacity else 1024
    cdef gct_page_region *grown
    while buf.length + n > capacity:
        capacity *= 2
    if capacity != buf.capacity:
        grown = <gct_page_region *>realloc(buf.data, capacity * sizeof(gct_page_region))
        if grown == NULL:
            return -ENOMEM
        buf.data = grown
        buf.capacity = capacity
    memcpy(buf.data + buf.length, regions, n * sizeof(gct_page_region))
    buf.length += n
    return 0


ctypedef struct CardsAndRegions:
    CardBits *cards
    RegionBuffer *regions


cdef int mark_and_keep(void *ctx, const gct_page_region *regions, size_t n) noexcept nogil:
    """Mark the cards, and keep the regions too while memory allows: if it
    does not, the regions kept are flagged incomplete and the pass goes on."""
    cdef CardsAndRegions *both = <CardsAndRegions *>ctx
    cards_mark_regions(both.cards, regions, n)
    if not both.regions.incomplete and append_regions(both.regions, regions, n) != 0:
        both.regions.incomplete = True
    return 0


cdef void rerecord(BackendCore *backend, const RegionBuffer *buf) noexcept nogil:
    """After a failed pass: the batches already taken were re-armed and will
    never be returned, so record them again for the next pass."""
    cdef size_t i
    for i in range(buf.length):
        backend.record(backend, buf.data[i].start, buf.data[i].end)


# ---- the pass, the loop and drain: written once for every backend ----------

cdef int timed_pass(BackendCore *backend, uintptr_t start, uintptr_t end, bint reset,
                    uint64_t max_pages, RegionSink *sink, PassCounts *counts) noexcept nogil:
    """One pass of `backend` over [start, end) into `sink`; the caller holds
    the tracker lock."""
    memset(counts, 0, sizeof(PassCounts))
    cdef double started = monotonic_seconds()
    cdef int rc = backend.run_pass(backend, start, end, reset, max_pages, sink, counts)
    counts.seconds = monotonic_seconds() - started
    return rc


cdef inline bint forked(const TrackerCore *t) noexcept nogil:
    """True in a forked child: the tracker's descriptors name the parent's
    memory there, so any call would re-arm or steal the parent's pages."""
    if t.armed_here != NULL:
        return gct_load_flag(t.armed_here) == 0
    return getpid() != t.owner_pid


cdef inline int usable(const TrackerCore *t) noexcept nogil:
    """0, or why no call may touch the tracker now."""
    if t == NULL:
        return -EINVAL
    if forked(t):
        return -ECHILD
    if t.backend == NULL:
        return -EBADF
    return 0


cdef inline int cards_cover(const CardBits *cards, uintptr_t start, uintptr_t end) noexcept nogil:
    """0 when ``cards`` covers [start, end), the range a pass walks: a pass
    re-arms every page it reports, so a page it could not mark would never
    be reported again."""
    if cards == NULL or cards.words == NULL:
        return -EINVAL
    if start < cards.base or end - cards.base > cards.size:
        return -EINVAL
    return 0


cdef inline int in_arena(const BackendCore *backend, uintptr_t start, uintptr_t end) noexcept nogil:
    if start < backend.start or end > backend.end or start > end:
        return -EINVAL
    return 0


cdef int pass_guards(TrackerCore *t, const void *owner, const CardBits *cards,
                     uintptr_t *end) noexcept nogil:
    """With the lock held: 0 when a pass over [arena start, *end) into
    ``cards`` may run now (*end 0 becomes the arena's end), else -errno."""
    cdef int rc = usable(t)
    if rc:
        return rc
    if end[0] == 0:
        end[0] = t.backend.end
    if end[0] <= t.backend.start or end[0] > t.backend.end or end[0] & (t.backend.granularity - 1):
        return -EINVAL
    rc = cards_cover(cards, t.backend.start, end[0])
    if rc:
        return rc
    if t.reserved_by != owner:
        return -EPERM
    if t.loop_active:
        return -EBUSY
    return 0


cdef int locked_pass(TrackerCore *t, const void *owner, CardBits *cards, bint reset,
                     uint64_t max_pages, uintptr_t end, PassCounts *counts,
                     WorkerPool *pool=NULL, size_t max_participants=1,
                     RegionBuffer *keep=NULL) noexcept nogil:
    """One pass over [arena start, end) into ``cards``, under the lock, once
    every guard has passed; end 0 is the arena's end. A report-only pass
    over the whole range is split across ``pool`` where it can be (see
    split_report for ``keep``)."""
    cdef RegionSink sink
    cdef PassCounts ignored
    cdef int rc
    if counts == NULL:
        counts = &ignored
    sink.emit = mark_cards
    sink.ctx = cards
    pthread_mutex_lock(&t.lock)
    rc = pass_guards(t, owner, cards, &end)
    if rc == 0 and (reset or max_pages):
        rc = timed_pass(t.backend, t.backend.start, end, reset, max_pages, &sink, counts)
    elif rc == 0:
        rc = split_report(t.backend, cards, end, pool, max_participants, keep, counts)
    pthread_mutex_unlock(&t.lock)
    return rc


# ---- a report-only pass split across GC worker threads ------------------------

# A walk shorter than MIN_SPLIT_LENGTH (0.1 ms or so) gains less from a
# split than waking a worker costs; chunks shorter than MIN_SPLIT_CHUNK cost
# more in calls than they save.
cdef uintptr_t MIN_SPLIT_LENGTH = 128 << 20
cdef uintptr_t MIN_SPLIT_CHUNK = 16 << 20

ctypedef struct SplitReport:
    BackendCore *backend
    CardBits *cards
    Chunks chunks
    int error                       # the first error a participant met (atomic)
    PassCounts counts[MAX_WORKERS]  # per participant


cdef void report_chunks(void *ctx, size_t participant) noexcept nogil:
    """One participant's share: report-only walks of chunks until none is
    left. Chunks start on a word of card bits, so no two participants
    write the same word of ``cards``."""
    cdef SplitReport *split = <SplitReport *>ctx
    cdef PassCounts *counts = &split.counts[participant]
    cdef RegionSink sink
    cdef uintptr_t lo, hi
    cdef int rc
    sink.emit = mark_cards
    sink.ctx = split.cards
    memset(counts, 0, sizeof(PassCounts))
    while chunks_take(&split.chunks, &lo, &hi):
        rc = split.backend.report_range(split.backend, lo, hi, &sink, counts)
        if rc:
            gct_first_error(&split.error, rc)
            return


cdef uintptr_t split_alignment(const BackendCore *backend, const CardBits *cards) noexcept nogil:
    """What the chunks of a split pass are multiples of, so that each begins
    on a page and on a word of card bits (64 cards from the table's base);
    0 when that would overflow."""
    if cards.card_shift + 6 >= 63:           # callers double it
        return 0
    cdef uintptr_t word = <uintptr_t>64 << cards.card_shift
    return word if word > backend.granularity else backend.granularity


cdef int split_report(BackendCore *backend, CardBits *cards, uintptr_t end, WorkerPool *pool,
                      size_t max_participants, RegionBuffer *keep, PassCounts *counts) noexcept nogil:
    """The report-only pass over [backend start, end) split into chunks, run
    by the pool; a single timed_pass where it cannot split, which also keeps
    its regions in ``keep`` (if not NULL; a split pass flags it incomplete)."""
    cdef RegionSink sink
    cdef CardsAndRegions both
    cdef SplitReport *split
    cdef size_t k
    cdef int rc
    cdef uintptr_t align = split_alignment(backend, cards)
    cdef uintptr_t start = backend.start
    if pool == NULL or max_participants > pool.count + 1:
        max_participants = 1 if pool == NULL else pool.count + 1
    if max_participants > MAX_WORKERS:          # the per-participant counts
        max_participants = MAX_WORKERS
    if (backend.report_range == NULL or max_participants < 2 or align == 0
            or ((start - cards.base) & (align - 1))
            or end - start < max(2 * align, MIN_SPLIT_LENGTH)):
        sink.emit = mark_cards
        sink.ctx = cards
        if keep != NULL:
            both.cards = cards
            both.regions = keep
            sink.emit = mark_and_keep
            sink.ctx = &both
        return timed_pass(backend, start, end, False, 0, &sink, counts)
    if keep != NULL:
        keep.incomplete = True
    split = <SplitReport *>malloc(sizeof(SplitReport))
    if split == NULL:
        return -ENOMEM
    memset(split, 0, sizeof(SplitReport))
    split.backend = backend
    split.cards = cards
    chunks_init(&split.chunks, start, end,
                chunk_size_for(end - start, max_participants, 4, align, MIN_SPLIT_CHUNK))
    cdef double started = monotonic_seconds()
    pool_run(pool, report_chunks, split, max_participants)
    memset(counts, 0, sizeof(PassCounts))
    for k in range(max_participants):        # the workers that stayed out counted nothing
        add_counts(counts, &split.counts[k])
    counts.seconds = monotonic_seconds() - started
    rc = split.error
    free(split)
    return rc


cdef int tracker_pass_into(TrackerCore *t, CardBits *cards, bint reset,
                           uint64_t max_pages, PassCounts *counts) noexcept nogil:
    """One locked pass whose regions are marked into ``cards``."""
    cdef int rc = usable(t)
    if rc:
        return rc
    return locked_pass(t, NULL, cards, reset, max_pages, 0, counts)


cdef int tracker_owner_pass(TrackerCore *t, const void *owner, CardBits *cards, bint reset,
                            uintptr_t end, PassCounts *counts) noexcept nogil:
    cdef int rc = usable(t)
    if rc:
        return rc
    return locked_pass(t, owner, cards, reset, 0, end, counts)


cdef int tracker_owner_report(TrackerCore *t, const void *owner, CardBits *cards, uintptr_t end,
                              WorkerPool *pool, size_t max_participants, RegionBuffer *keep,
                              PassCounts *counts) noexcept nogil:
    cdef int rc = usable(t)
    if rc:
        return rc
    return locked_pass(t, owner, cards, False, 0, end, counts, pool, max_participants, keep)


cdef int tracker_drain(TrackerCore *t, CardBits *cards, PassCounts *counts) noexcept nogil:
    """A last pass, then hand over everything accumulated since the last drain.

    Atomic with respect to the loop: both hold the lock, so each reported
    page lands in exactly one drain.
    """
    cdef RegionSink sink
    cdef PassCounts ignored
    cdef int rc = usable(t)
    if rc:
        return rc
    if counts == NULL:
        counts = &ignored
    sink.emit = mark_cards
    sink.ctx = &t.accumulated
    pthread_mutex_lock(&t.lock)
    rc = usable(t)
    if rc == 0:
        rc = cards_cover(cards, t.backend.start, t.backend.end)
    if rc == 0 and t.reserved_by != NULL:
        rc = -EPERM
    if rc == 0:
        rc = timed_pass(t.backend, t.backend.start, t.backend.end, True, 0, &sink, counts)
        cards_merge(cards, &t.accumulated)
        cards_clear(&t.accumulated)
    pthread_mutex_unlock(&t.lock)
    return rc


ctypedef int (*RangeFn)(BackendCore *core, uintptr_t start, uintptr_t end) noexcept nogil


cdef inline int range_call(TrackerCore *t, uintptr_t start, uintptr_t end, size_t which) noexcept nogil:
    """Hand [start, end) to the backend's record (0), begin_external (1) or
    end_external (2) once the guards pass. Counted in flight, so that
    close() never frees the backend under the call."""
    cdef BackendCore *backend
    cdef RangeFn call
    cdef int rc
    if t == NULL:
        return -EINVAL
    gct_enter_call(&t.calls_in_flight)
    backend = <BackendCore *>gct_load_backend(<void **>&t.backend)
    rc = -ECHILD if forked(t) else (-EBADF if backend == NULL else in_arena(backend, start, end))
    if rc == 0:
        call = backend.record if which == 0 else (
            backend.begin_external if which == 1 else backend.end_external)
        rc = call(backend, start, end)
    gct_leave_call(&t.calls_in_flight)
    return rc


cdef int tracker_record(TrackerCore *t, uintptr_t start, uintptr_t end) noexcept nogil:
    """Declare a completed write to [start, end) (see Tracker.record); takes
    no tracker lock (mprotect and uffd_sync wait for a running pass)."""
    return range_call(t, start, end, 0)


cdef int tracker_begin_external(TrackerCore *t, uintptr_t start, uintptr_t end) noexcept nogil:
    """Open an external-write bracket (see Tracker.external_write)."""
    return range_call(t, start, end, 1)


cdef int tracker_end_external(TrackerCore *t, uintptr_t start, uintptr_t end) noexcept nogil:
    """Close an external-write bracket: the range is reported by the next pass."""
    return range_call(t, start, end, 2)


cdef void wait_for_calls(TrackerCore *t) noexcept nogil:
    """Return once no record or bracket call is inside the backend."""
    while gct_calls(&t.calls_in_flight):
        sched_yield()


cdef void add_counts(PassCounts *total, const PassCounts *one) noexcept nogil:
    total.regions += one.regions
    total.pages += one.pages
    total.calls += one.calls
    total.seconds += one.seconds


cdef void deadline_after(timespec *deadline, long long interval_ns) noexcept nogil:
    clock_gettime(CLOCK_MONOTONIC, deadline)
    cdef long long nsec = deadline.tv_nsec + interval_ns
    deadline.tv_sec += nsec // 1000000000
    deadline.tv_nsec = nsec % 1000000000


cdef void *pass_loop(void *arg) noexcept nogil:
    """The background thread: a reset pass into `accumulated` every interval."""
    cdef TrackerCore *t = <TrackerCore *>arg
    cdef RegionSink sink
    cdef PassCounts counts
    cdef timespec deadline
    cdef int rc
    sink.emit = mark_cards
    sink.ctx = &t.accumulated
    pthread_mutex_lock(&t.lock)
    while t.running:
        rc = timed_pass(t.backend, t.backend.start, t.backend.end, True, 0, &sink, &counts)
        if rc:
            t.loop_error = rc
            t.loop_error_operation = t.backend.failed_operation
            t.running = False
            t.loop_active = False        # collect() may run again; stop() still joins
            break
        add_counts(&t.loop_totals, &counts)
        t.loop_passes += 1
        deadline_after(&deadline, t.interval_ns)
        # Waiting releases the lock, so drain and stop get their turn.
        pthread_cond_timedwait(&t.wake, &t.lock, &deadline)
    pthread_mutex_unlock(&t.lock)
    return NULL


# ---- the Python face --------------------------------------------------------

cdef class PassStats:
    """One pass: what it reported and what it cost. Immutable.

    A C-level record rather than a dataclass: collect() returns one per pass,
    and building a frozen dataclass cost more than a clean pass of a small
    arena.
    """
    cdef readonly uint64_t regions    # runs of consecutive written pages reported
    cdef readonly uint64_t pages      # pages reported
    cdef readonly uint64_t calls      # kernel calls the pass made (> 1 when the vector filled)
    cdef readonly double seconds      # wall time of the pass, lock held

    def __init__(self, regions, pages, calls, seconds):
        self.regions = regions
        self.pages = pages
        self.calls = calls
        self.seconds = seconds

    def astuple(self):
        return (self.regions, self.pages, self.calls, self.seconds)

    def __eq__(self, other):
        if not isinstance(other, PassStats):
            return NotImplemented
        return self.astuple() == (<PassStats>other).astuple()

    def __hash__(self):
        return hash(self.astuple())

    def __reduce__(self):
        return PassStats, self.astuple()

    def __repr__(self):
        return (f"PassStats(regions={self.regions}, pages={self.pages}, calls={self.calls}, "
                f"seconds={self.seconds!r})")


cdef PassStats _pass_stats(const PassCounts *counts):
    """Built without calling __init__: tp_new and four C stores."""
    cdef PassStats stats = PassStats.__new__(PassStats)
    stats.regions = counts.regions
    stats.pages = counts.pages
    stats.calls = counts.calls
    stats.seconds = counts.seconds
    return stats


cdef class Tracker:
    """Tracker(arena, *, backend='auto', vector_len=None)
--

Tracks which pages of an arena are written, through one backend.

    Tracking starts at construction (every page armed; writes made while the
    constructor runs may or may not be reported). ``collect`` runs one pass
    into a CardTable; ``start``/``drain``/``stop`` run passes in a native
    background thread instead. ``backend`` is a name from gctrack.BACKENDS
    (``"auto"`` tries them in AUTO_ORDER and raises UnsupportedError with
    every reason when none works) or an armed Backend instance, which the
    tracker then owns. ``vector_len`` sizes pagemap_scan's output vector.
    """

    def __cinit__(self, Arena arena not None, *, backend="auto", vector_len=None):
        arena.check_open()
        self.arena = arena
        self.owner_pid = getpid()
        self.core.owner_pid = self.owner_pid
        self.fork_page = wipe_on_fork_flag()
        self.core.armed_here = <const int *>self.fork_page
        if pthread_mutex_init(&self.core.lock, NULL) != 0:
            raise MemoryError()
        cdef pthread_condattr_t attr
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(&self.core.wake, &attr)
        pthread_condattr_destroy(&attr)
        self.sync_ready = True
        self.backend_object = backends.create(backend, arena, vector_len)
        try:
            self.accumulated_table = CardTable(arena.address, arena.size,
                                               self.backend_object.core.granularity)
        except BaseException:
            self.backend_object.claimed = False     # the caller's Backend is theirs again
            raise
        self.core.backend = self.backend_object.core
        self.core.accumulated = self.accumulated_table.bits

    def __dealloc__(self):
        if self.thread_alive and getpid() == self.owner_pid:
            pthread_mutex_lock(&self.core.lock)
            self.core.running = False
            pthread_cond_signal(&self.core.wake)
            pthread_mutex_unlock(&self.core.lock)
            with nogil:
                pthread_join(self.thread, NULL)
        if self.sync_ready:
            pthread_cond_destroy(&self.core.wake)
            pthread_mutex_destroy(&self.core.lock)
        if self.fork_page != NULL:
            munmap(self.fork_page, <size_t>sysconf(_SC_PAGESIZE))

    @property
    def backend(self):
        """The backend's name."""
        return self.backend_object.name

    @property
    def granularity(self):
        """Bytes that one report stands for (the page size for kernel backends)."""
        self.check_usable()
        return self.core.backend.granularity

    @property
    def running(self):
        """Whether the background pass loop runs."""
        return self.thread_alive

    @property
    def reserved(self):
        """Whether a Heap owns this tracker's passes (its Collector runs them)."""
        return self.core.reserved_by != NULL

    cdef int reserve_for(self, const void *owner) except -1:
        """Make the passes ``owner``'s alone (tracker_owner_pass); a Heap does."""
        self.check_usable()
        self.check_not_running()
        self.core.reserved_by = owner
        return 0

    cdef void release_reservation(self) noexcept:
        self.core.reserved_by = NULL

    cdef int check_usable(self) except -1:
        if self.closed:
            raise ValueError("tracker is closed")
        if getpid() != self.owner_pid:
            # Its descriptors still name the parent's memory: a pass here
            # would re-arm the parent's pages and steal its reports.
            raise RuntimeError(f"this tracker belongs to process {self.owner_pid}; "
                               "after fork() the child must arm its own")
        return 0

    cdef int check_not_running(self) except -1:
        if self.thread_alive:
            raise RuntimeError("the background pass loop is running: use drain(), or stop() first")
        return self.check_not_reserved()

    cdef int check_not_reserved(self) except -1:
        if self.core.reserved_by != NULL:
            raise RuntimeError("this tracker belongs to a Heap: only its Collector runs passes")
        return 0

    cdef CardBits *cards_for_arena(self, object cards) except NULL:
        if not isinstance(cards, CardTable):
            raise TypeError(f"cards must be a gctrack.CardTable, got {type(cards).__name__}")
        cdef CardTable table = cards
        table.check_covers(<uintptr_t>self.arena.base, self.arena.size)
        return &table.bits

    def collect(self, cards, *, reset=True):
        """One pass: mark in ``cards`` every page written since the last reset pass.

        With ``reset=False`` the pages are reported but stay dirty. Returns
        PassStats. ``cards`` must cover the arena.
        """
        self.check_usable()
        self.check_not_running()
        cdef CardBits *bits = self.cards_for_arena(cards)
        cdef bint rearm = reset
        cdef PassCounts counts
        cdef int rc
        with nogil:
            rc = tracker_pass_into(&self.core, bits, rearm, 0, &counts)
        self.raise_for(rc)
        return _pass_stats(&counts)

    def scan(self, *, reset=True, max_pages=0, addr=None, size=None):
        """One pass returning the raw regions as a REGION_DTYPE array, ascending.

        ``max_pages`` > 0 reports at most that many pages (units of
        ``granularity``); the rest stay dirty for the next pass. ``addr`` and
        ``size`` limit the pass to part of the arena (widened to whole units).
        """
        self.check_usable()
        self.check_not_running()
        max_pages = operator.index(max_pages)
        if not 0 <= max_pages < 2**64:
            raise ValueError(f"max_pages must be in 0..2**64 - 1, got {max_pages}")
        cdef uint64_t limit = max_pages
        cdef uintptr_t start, end
        start, end = self.span_of(addr, size)
        cdef bint rearm = reset
        cdef RegionBuffer buf
        cdef RegionSink sink
        cdef PassCounts counts
        cdef int rc
        memset(&buf, 0, sizeof(buf))
        sink.emit = append_regions
        sink.ctx = &buf
        try:
            with nogil:
                pthread_mutex_lock(&self.core.lock)
                rc = usable(&self.core)
                if rc == 0:
                    rc = timed_pass(self.core.backend, start, end, rearm, limit, &sink, &counts)
                    if rc and rearm:
                        rerecord(self.core.backend, &buf)
                pthread_mutex_unlock(&self.core.lock)
            self.raise_for(rc)
            out = numpy.empty(buf.length, dtype=REGION_DTYPE)
            if buf.length:
                memcpy(<void *><uintptr_t>out.ctypes.data, buf.data,
                       buf.length * sizeof(gct_page_region))
            return out
        finally:
            free(buf.data)

    def reset(self, addr=None, size=None):
        """Re-arm without reporting: forget the writes so far, in the whole
        arena or in [addr, addr + size) (widened to whole units)."""
        self.check_usable()
        self.check_not_running()
        cdef uintptr_t start, end
        start, end = self.span_of(addr, size)
        cdef int rc
        with nogil:
            pthread_mutex_lock(&self.core.lock)
            rc = usable(&self.core)
            if rc == 0:
                rc = self.core.backend.rearm(self.core.backend, start, end)
                cards_clear_range(&self.core.accumulated, start, end)
            pthread_mutex_unlock(&self.core.lock)
        self.raise_for(rc)

    cdef tuple span_of(self, object addr, object size):
        """[start, end) for a pass: the whole arena by default, else the
        units that [addr, addr + size) overlaps; ValueError outside the arena."""
        if addr is None and size is None:
            return self.core.backend.start, self.core.backend.end
        addr = self.core.backend.start if addr is None else operator.index(addr)
        size = self.core.backend.end - addr if size is None else operator.index(size)
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.check_in_arena(addr, size)
        cdef uintptr_t unit = self.core.backend.granularity
        return addr // unit * unit, (addr + size + unit - 1) // unit * unit

    def record(self, addr, length):
        """Declare a completed write to [addr, addr + length), so that the next
        pass reports it. Call it after the write, never before.

        For the software backend this is the write barrier. The kernel
        backends see CPU stores by themselves; for a write that bypasses the
        fault path (DMA, O_DIRECT, /proc/PID/mem) use ``external_write``.
        """
        self.check_usable()
        cdef uintptr_t first, end
        first, end = self.checked_range(addr, length)
        cdef int rc
        with nogil:
            rc = tracker_record(&self.core, first, end)
        self.raise_for(rc)

    def begin_external_write(self, addr, length):
        """Prepare [addr, addr + length) for a write that does not go through
        the page-table fault path. Pair it with ``end_external_write`` (see
        ``external_write``, which does both)."""
        self.check_usable()
        cdef uintptr_t first, end
        first, end = self.checked_range(addr, length)
        cdef int rc
        with nogil:
            rc = tracker_begin_external(&self.core, first, end)
        self.raise_for(rc)

    def end_external_write(self, addr, length):
        """Record [addr, addr + length) as written, once the external write
        that ``begin_external_write`` prepared has completed."""
        self.check_usable()
        cdef uintptr_t first, end
        first, end = self.checked_range(addr, length)
        cdef int rc
        with nogil:
            rc = tracker_end_external(&self.core, first, end)
        self.raise_for(rc)

    def external_write(self, addr, length):
        """A context manager around a write that bypasses the fault path:
        DMA, O_DIRECT reads, io_uring registered buffers, RDMA, writes through
        /proc/PID/mem or process_vm_writev.

        Entering makes the range writable, where a backend write-protects
        pages, and keeps it writable until exit, background loop included.
        Leaving records the range as written. Every byte written inside the
        bracket is reported by a pass that starts after it exits, on every
        backend. Brackets may nest and overlap.
        """
        self.check_usable()
        self.checked_range(addr, length)
        return ExternalWrite(self, addr, length)

    cdef tuple checked_range(self, object addr, object length):
        """(start, end) of [addr, addr + length), or ValueError outside the arena."""
        self.check_in_arena(addr, length)
        addr = operator.index(addr)
        return addr, addr + operator.index(length)

    cdef int check_in_arena(self, object addr, object length) except -1:
        addr = operator.index(addr)
        length = operator.index(length)
        if addr < 0 or length < 0:
            raise ValueError(f"address and length must be non-negative, got {addr}, {length}")
        cdef uintptr_t start = <uintptr_t>self.arena.base
        if addr < start or addr + length > start + self.arena.size:
            raise ValueError(f"[{addr:#x}, {addr + length:#x}) is outside the arena "
                             f"[{start:#x}, {start + self.arena.size:#x})")
        return 0

    def discard(self, addr, length):
        """Give the pages [addr, addr + length) back to the kernel
        (MADV_DONTNEED) and record them, so the next pass reports them and
        every backend re-arms them. They read as zero afterwards.

        ``addr`` and ``length`` must be multiples of the page size: the kernel
        frees whole pages, and bytes outside the range must not be lost.
        """
        self.check_usable()
        addr = operator.index(addr)
        length = operator.index(length)
        if addr % self.arena.page_size or length % self.arena.page_size:
            raise ValueError(f"discard needs a page-aligned address and length, got "
                             f"{addr:#x} and {length:#x} (page size {self.arena.page_size})")
        self.check_in_arena(addr, length)
        cdef uintptr_t start = addr
        cdef size_t size = length
        cdef int rc
        with nogil:
            rc = madvise(<void *>start, size, MADV_DONTNEED)
        if rc:
            raise TrackerError(errno, "madvise", "MADV_DONTNEED")
        self.record(addr, length)

    def start(self, interval=0.001):
        """Run reset passes every ``interval`` seconds in a native thread."""
        self.check_usable()
        self.check_not_reserved()
        if self.thread_alive:
            raise RuntimeError("the background pass loop is already running")
        if not self.backend_object.atomic_passes:
            raise ValueError(f"{self.backend} passes are not atomic: a background loop "
                             "racing the writers would lose writes")
        interval = float(interval)
        if not (interval > 0 and math.isfinite(interval) and interval < 1e9):
            raise ValueError(f"interval must be a positive number of seconds, got {interval}")
        self.core.interval_ns = <long long>(interval * 1e9) or 1
        self.core.running = True
        self.core.loop_active = True
        self.core.loop_error = 0
        cdef int rc = pthread_create(&self.thread, NULL, pass_loop, &self.core)
        if rc:
            self.core.running = False
            self.core.loop_active = False
            raise TrackerError(rc, "pthread_create")
        self.thread_alive = True

    cdef int join_loop(self) except -1:
        """Stop the loop thread and wait for it; no-op when it is not running."""
        if not self.thread_alive:
            return 0
        with nogil:
            pthread_mutex_lock(&self.core.lock)
            self.core.running = False
            pthread_cond_signal(&self.core.wake)
            pthread_mutex_unlock(&self.core.lock)
            pthread_join(self.thread, NULL)
        self.core.loop_active = False
        self.thread_alive = False
        return 0

    def stop(self):
        """Stop the background loop. What it collected stays for ``drain``."""
        self.check_usable()
        self.join_loop()
        self.raise_loop_error()

    def drain(self, cards):
        """Run a last pass, then move everything accumulated into ``cards``.

        Works whether or not the loop is running; atomic with respect to it.
        Returns the PassStats of the last pass.
        """
        self.check_usable()
        self.check_not_reserved()
        cdef CardBits *bits = self.cards_for_arena(cards)
        cdef PassCounts counts
        cdef int rc
        with nogil:
            rc = tracker_drain(&self.core, bits, &counts)
        self.raise_for(rc)
        self.raise_loop_error()
        return _pass_stats(&counts)

    cdef int raise_for(self, int rc) except -1:
        """Raise the error a C-level call returned, if any."""
        if rc == -EBADF and self.core.backend == NULL:
            raise ValueError("tracker is closed")
        if rc:
            raise TrackerError(-rc, self.core.backend.failed_operation.decode()
                               if self.core.backend != NULL else "tracker call")
        return 0

    cdef int raise_loop_error(self) except -1:
        """Raise (once) the error that stopped the background loop, if any."""
        cdef int rc = self.core.loop_error
        if rc:
            self.core.loop_error = 0
            raise TrackerError(-rc, self.core.loop_error_operation.decode(),
                               "in the background pass loop")
        return 0

    @property
    def loop_stats(self):
        """Totals over the background loop's passes since the tracker was made."""
        cdef PassCounts totals
        cdef uint64_t passes
        with nogil:
            pthread_mutex_lock(&self.core.lock)
            totals = self.core.loop_totals
            passes = self.core.loop_passes
            pthread_mutex_unlock(&self.core.lock)
        return LoopStats(passes=passes, regions=totals.regions, pages=totals.pages,
                         calls=totals.calls, seconds=totals.seconds)

    def close(self):
        """Stop the loop and disarm the backend. Idempotent; the arena stays
        usable. Refused (RuntimeError) on a Heap's tracker: close the Heap."""
        if self.closed:
            return
        if self.core.reserved_by != NULL:
            raise RuntimeError("this tracker belongs to a Heap: close the Heap instead")
        if getpid() == self.owner_pid:
            self.join_loop()
        self.thread_alive = False    # in a forked child the loop thread never existed
        self.closed = True
        if getpid() == self.owner_pid:
            with nogil:              # C API callers see -EBADF from now on
                pthread_mutex_lock(&self.core.lock)
                gct_clear_backend(<void **>&self.core.backend)
                pthread_mutex_unlock(&self.core.lock)
                wait_for_calls(&self.core)
        else:                        # the lock may have been held at fork(): never take it
            self.core.backend = NULL
        self.backend_object.claimed = False
        self.backend_object.close()

    def __enter__(self):
        self.check_usable()
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else ("running" if self.thread_alive else "armed")
        return f"<gctrack.Tracker {self.backend_object.name} over {self.arena!r}, {state}>"


class ExternalWrite:
    """The bracket that Tracker.external_write returns (a context manager)."""

    __slots__ = ("tracker", "addr", "length")

    def __init__(self, tracker, addr, length):
        self.tracker = tracker
        self.addr = addr
        self.length = length

    def __enter__(self):
        self.tracker.begin_external_write(self.addr, self.length)
        return self

    def __exit__(self, *exc_info):
        # Also on an exception: part of the write may have landed.
        self.tracker.end_external_write(self.addr, self.length)

    def __repr__(self):
        return f"<gctrack.ExternalWrite [{self.addr:#x}, +{self.length:#x}) of {self.tracker!r}>"
