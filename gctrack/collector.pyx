# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Collector: a mostly-concurrent mark-sweep that remarks from the card table.

Boehm-Demers-Shenker's mostly-parallel collector with HotSpot CMS's
precleaning:

1. re-arm tracking (a pass, mutators running), then stop the mutators,
   mark the roots, resume;
2. mark concurrently, without the GIL;
3. preclean: collect the dirty cards, rescan the marked objects on them,
   and repeat while the predicted remark exceeds the pause goal, up to
   ``max_preclean`` rounds or ``preclean_time_limit`` seconds (CMS's
   abortable precleaning). The prediction is the cost of walking the
   allocated extent plus the cost of the cards the last round found dirty,
   each measured on this heap by earlier passes and remarks;
4. remark with the mutators stopped (and the GIL held): a final pass, then
   rescan the roots and the marked objects on dirty cards, finish marking;
5. sweep, with the mutators running again; objects allocated during the
   cycle are born marked.

Every store after step 1 lands on a dirty card, so a marked object that was
given a reference to an unmarked one is rescanned by step 3 or 4. Nothing
reachable at remark is freed; floating garbage waits for the next cycle.
"""
import math
import numbers
import operator
import os
import warnings

from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport realloc, free

from gctrack.clock cimport monotonic_seconds
from gctrack.backend cimport PassCounts
from gctrack.cards cimport CardBits, CardTable, cards_clear, cards_next_clean, cards_next_dirty
from gctrack.dirtymap cimport gct_bits_load
from gctrack.heap cimport (Heap, HeapCore, heap_extent_end, heap_is_allocated, heap_is_object,
                           heap_load)
from gctrack.tracker cimport RegionBuffer, tracker_owner_pass, tracker_owner_report
from gctrack.workers cimport (MAX_WORKERS, Chunks, WorkerPool, chunk_size_for, chunks_init,
                              chunks_take, pool_run, pool_start, pool_stop)
from gctrack.threads cimport pthread_mutex_lock, pthread_mutex_unlock

from gctrack.errors import TrackerError
from gctrack.stats import CycleStats, PrecleanPass
from gctrack.workers import default_workers

cdef extern from *:
    """
    static inline int gct_test_and_mark(uint64_t *marks, size_t bit) {
        uint64_t mask = (uint64_t)1 << (bit & 63);
        return !(__atomic_fetch_or(&marks[bit >> 6], mask, __ATOMIC_ACQ_REL) & mask);
    }
    static inline void gct_store_u64_release(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline size_t gct_sweep_load_size(const size_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    """
    bint gct_test_and_mark(uint64_t *marks, size_t bit) nogil
    void gct_store_u64_release(uint64_t *p, uint64_t v) nogil
    size_t gct_load_size "gct_sweep_load_size"(const size_t *p) nogil
    int ctz64 "__builtin_ctzll"(unsigned long long x) nogil


# ---- the gray stack ------------------------------------------------------------

ctypedef struct GrayStack:
    uintptr_t *items
    size_t length
    size_t capacity
    bint out_of_memory


cdef inline void push(GrayStack *s, uintptr_t obj) noexcept nogil:
    cdef uintptr_t *grown
    if s.length == s.capacity:
        grown = <uintptr_t *>realloc(s.items, (s.capacity * 2 + 1024) * sizeof(uintptr_t))
        if grown == NULL:
            s.out_of_memory = True
            return
        s.items = grown
        s.capacity = s.capacity * 2 + 1024
    s.items[s.length] = obj
    s.length += 1


# ---- marking ------------------------------------------------------------------------

cdef inline void shade(HeapCore *h, GrayStack *s, uintptr_t target) noexcept nogil:
    """Mark target and queue it for scanning, if it is an unmarked object."""
    if target != 0 and heap_is_object(h, target):
        if gct_test_and_mark(h.marks, (target - h.base) >> h.object_shift):
            push(s, target)


cdef inline void scan_object(HeapCore *h, GrayStack *s, uintptr_t obj) noexcept nogil:
    cdef const uint64_t *slots = <const uint64_t *>obj + 1
    cdef size_t i
    for i in range(h.slots):
        shade(h, s, heap_load(&slots[i]))


cdef void mark_roots(HeapCore *h, GrayStack *s) noexcept nogil:
    cdef size_t i
    for i in range(h.max_roots):
        shade(h, s, heap_load(&h.roots[i]))


cdef uint64_t drain(HeapCore *h, GrayStack *s) noexcept nogil:
    """Trace until the gray stack is empty; returns the objects scanned."""
    cdef uint64_t scanned = 0
    while s.length:
        s.length -= 1
        scan_object(h, s, s.items[s.length])
        scanned += 1
    return scanned


cdef inline bint is_marked(const HeapCore *h, size_t index) noexcept nogil:
    return (gct_bits_load(&h.marks[index >> 6]) >> (index & 63)) & 1


cdef uint64_t rescan_cards(HeapCore *h, const CardBits *cards, size_t first, size_t after,
                           GrayStack *s) noexcept nogil:
    """Rescan every marked object that overlaps cards [first, after) (all
    dirty); returns how many."""
    cdef uint64_t rescanned = 0
    cdef uintptr_t heap_end = h.base + (h.num_objects << h.object_shift)
    cdef uintptr_t start = cards.base + (<uintptr_t>first << cards.card_shift)
    cdef uintptr_t end = cards.base + (<uintptr_t>after << cards.card_shift)
    if end > heap_end:
        end = heap_end
    if start >= end:
        return 0
    cdef size_t index = (start - h.base) >> h.object_shift
    cdef size_t last = (end - 1 - h.base) >> h.object_shift
    while index <= last:
        if is_marked(h, index) and heap_is_allocated(h, index):
            scan_object(h, s, h.base + (index << h.object_shift))
            rescanned += 1
        index += 1
    return rescanned


cdef uint64_t rescan_dirty(HeapCore *h, const CardBits *cards, size_t first_card, GrayStack *s,
                           size_t *dirty_cards) noexcept nogil:
    """Rescan every marked object that overlaps a dirty card of ``cards``
    from first_card on; returns how many. Counts the dirty cards on the way
    (*dirty_cards): the walk visits every run of them anyway, so a separate
    count would read the table twice."""
    cdef uint64_t rescanned = 0
    cdef size_t first = cards_next_dirty(cards, first_card), after, dirty = 0
    while first < cards.num_cards:
        after = cards_next_clean(cards, first)
        dirty += after - first
        rescanned += rescan_cards(h, cards, first, after, s)
        first = cards_next_dirty(cards, after)
    dirty_cards[0] = dirty
    return rescanned


cdef uint64_t rescan_regions(HeapCore *h, const CardBits *cards, const RegionBuffer *regions,
                             GrayStack *s, size_t *dirty_cards) noexcept nogil:
    """rescan_dirty, led by the regions of the pass that marked ``cards``
    (all of them, ascending and disjoint) instead of a read of every card
    word: the dirty cards are exactly the cards those regions overlap."""
    cdef uint64_t rescanned = 0
    cdef size_t i, first, after, dirty = 0
    cdef uintptr_t start, end, limit = cards.base + cards.size
    for i in range(regions.length):
        start = max(<uintptr_t>regions.data[i].start, cards.base)
        end = min(<uintptr_t>regions.data[i].end, limit)
        if start >= end:
            continue
        first = (start - cards.base) >> cards.card_shift
        after = ((end - 1 - cards.base) >> cards.card_shift) + 1
        dirty += after - first
        rescanned += rescan_cards(h, cards, first, after, s)
    dirty_cards[0] = dirty
    return rescanned


# ---- the remark's rescan, split across GC worker threads ---------------------------------

# A final pass that reported fewer cards' worth of pages than this (at most
# that many dirty cards: tens of microseconds of rescan) gains less from a
# split rescan than waking a worker costs.
cdef size_t MIN_SPLIT_DIRTY_CARDS = 256
# Dirty cards cluster where the mutators allocate and store: many small
# chunks even the threads' shares out. Shorter chunks than the minimum cost
# more in hand-offs than they save.
cdef size_t RESCAN_CHUNKS_PER_THREAD = 64
cdef uintptr_t MIN_RESCAN_CHUNK = 1 << 20

ctypedef struct SplitRescan:
    HeapCore *heap
    const CardBits *cards
    Chunks chunks                       # byte ranges of the cards, on words of card bits
    GrayStack *stacks[MAX_WORKERS]      # one gray stack per participant
    size_t dirty[MAX_WORKERS]           # dirty cards each participant found


cdef void rescan_chunks(void *ctx, size_t participant) noexcept nogil:
    """One participant's share of the remark: rescan the marked objects on
    the dirty cards of chunks until none is left, tracing from them on its
    own gray stack. Marking is an atomic test-and-set, so an object newly
    marked is traced by one participant only (a marked object on a dirty
    card may be rescanned by two, which costs time, not correctness)."""
    cdef SplitRescan *split = <SplitRescan *>ctx
    cdef const CardBits *cards = split.cards
    cdef GrayStack *s = split.stacks[participant]
    cdef uintptr_t lo, hi
    cdef size_t dirty, total = 0
    cdef CardBits chunk
    while chunks_take(&split.chunks, &lo, &hi):
        chunk = cut_cards(cards, hi)       # searches for dirty cards stop at the chunk's end
        rescan_dirty(split.heap, &chunk, (lo - cards.base) >> cards.card_shift, s, &dirty)
        total += dirty
        drain(split.heap, s)
    drain(split.heap, s)                # participant 0's stack starts with the roots
    split.dirty[participant] = total


# ---- sweeping -------------------------------------------------------------------------

cdef uint64_t sweep(HeapCore *h) noexcept nogil:
    """Free every allocated, unmarked object; then end the cycle and clear the
    marks. Word by word over the side bitmaps: it never touches the arena."""
    cdef uint64_t freed = 0, dead
    cdef size_t word, chunk, words = (gct_load_size(&h.high_water) + 63) >> 6
    for chunk in range(0, words, 64):
        pthread_mutex_lock(&h.alloc_lock)      # allocation may run beside the sweep
        for word in range(chunk, min(chunk + 64, words)):
            dead = gct_bits_load(&h.allocated[word]) & ~gct_bits_load(&h.marks[word])
            if dead:
                gct_store_u64_release(&h.allocated[word], h.allocated[word] & ~dead)
                freed += free_dead(h, word, dead)
        pthread_mutex_unlock(&h.alloc_lock)
    pthread_mutex_lock(&h.alloc_lock)
    h.allocate_marked = False
    for word in range((gct_load_size(&h.high_water) + 63) >> 6):
        h.marks[word] = 0
    pthread_mutex_unlock(&h.alloc_lock)
    return freed


cdef inline uint64_t free_dead(HeapCore *h, size_t word, uint64_t dead) noexcept nogil:
    """Push the objects of ``dead`` (bits of allocation word ``word``) onto
    the free list, with alloc_lock held; returns how many."""
    cdef uint64_t count = 0
    while dead:
        h.free_list[h.free_count] = (word << 6) + ctz64(dead)
        h.free_count += 1
        count += 1
        dead &= dead - 1
    return count


cdef CardBits cut_cards(const CardBits *cards, uintptr_t end) noexcept nogil:
    """The cards of [cards.base, end): the words are
    shared, so what a pass marks through the cut is in the whole table."""
    cdef CardBits cut = cards[0]
    cut.size = end - cut.base
    cut.num_cards = (cut.size + (<uintptr_t>1 << cut.card_shift) - 1) >> cut.card_shift
    if cut.num_cards > cards.num_cards:
        cut.num_cards = cards.num_cards
    cut.num_words = (cut.num_cards + 63) >> 6
    return cut


cdef double checked_seconds(object value, str name) except -1.0:
    """A positive finite number of seconds, or a typed error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    cdef double seconds = float(value)
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{name} must be a positive finite number of seconds, got {value!r}")
    return seconds


def checked_workers(workers):
    """``workers`` as an int in 1..MAX_WORKERS (None: the default), or a typed error."""
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral):
        raise TypeError(f"workers must be an int or None, got {type(workers).__name__}")
    workers = operator.index(workers)
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be in 1..{MAX_WORKERS}, got {workers}")
    return workers


cdef inline double learned(double estimate, double sample) noexcept nogil:
    """An exponentially weighted mean that follows the machine's load."""
    return sample if estimate < 0 else 0.7 * estimate + 0.3 * sample


ctypedef struct Costs:
    double walk                     # seconds per byte a pass walks (< 0: not measured yet)
    double card                     # seconds per dirty card rescanned (< 0: not measured yet)


# Until a heap has measured its own: a 1 GiB walk in 0.3 ms, 0.1 us a card.
cdef double DEFAULT_WALK_COST = 0.3e-3 / (1 << 30)
cdef double DEFAULT_CARD_COST = 0.1e-6


cdef void learn(Costs *costs, double walk_per_byte, double rescan_seconds,
                size_t dirty) noexcept nogil:
    """Fold one pass and the rescan after it into ``costs``."""
    costs.walk = learned(costs.walk, walk_per_byte)
    if dirty >= 64:                 # fewer cards measure the fixed costs, not the cards
        costs.card = learned(costs.card, rescan_seconds / dirty)


cdef inline double cost_of(double preferred, double fallback, double default) noexcept nogil:
    """The first measured of two estimates, else the default."""
    return preferred if preferred >= 0 else (fallback if fallback >= 0 else default)


# ---- the Python face -------------------------------------------------------------------

cdef class Collector:
    """Collector(heap, *, pause_goal=0.001, preclean_time_limit=1.0, workers=None)
--

Collects a Heap; ``collect()`` runs one cycle and returns CycleStats.

    ``pause_goal`` (seconds): precleaning goes on while the predicted remark
    exceeds it, for at most ``max_preclean`` rounds (a ``collect()``
    argument) and ``preclean_time_limit`` seconds.

    ``workers``: how many threads, the collector's own included, share the
    remark's final pass and rescan (default: the CPUs this process may run
    on, at most 8; 1: the collector's thread alone). The first concurrent
    cycle starts ``workers`` native threads, each pinned to one CPU; they
    sleep until a remark has stopped the world, and are joined when the
    Collector is dropped. Only backends with a report-only walk that splits
    (pagemap_scan) split the final pass; every backend splits the rescan.
    """
    cdef readonly Heap heap
    cdef CardTable cards
    cdef CardBits extent            # cards cut down to the extent the last pass walked
    cdef size_t extent_align        # the extent ends on a page and a card boundary
    cdef size_t granularity         # bytes one unit a pass reports stands for
    cdef GrayStack stack
    cdef readonly double pause_goal
    cdef readonly double preclean_time_limit
    # What passes and rescans cost on this heap and machine: learned from
    # precleaning rounds (mutators running, re-arming passes, one thread) and
    # from remarks (world stopped, report-only, split across the workers).
    # The prediction prefers the remark's own figures.
    cdef Costs preclean_costs
    cdef Costs remark_costs
    cdef readonly size_t workers    # threads that share a remark, the collector's included
    cdef WorkerPool pool            # started by the first concurrent cycle when workers > 1
    cdef GrayStack helper_stacks[MAX_WORKERS]    # gray stacks of participants 1 .. workers - 1
    cdef RegionBuffer final_regions  # what the remark's pass reported, when it was not split
    cdef double stop_requested      # when the last stop_world_timed() asked the mutators to stop

    def __repr__(self):
        return f"<gctrack.Collector of {self.heap!r}, {self.cards.card_size} B cards>"

    def __cinit__(self, Heap heap not None, *, pause_goal=0.001, preclean_time_limit=1.0,
                  workers=None):
        self.pause_goal = checked_seconds(pause_goal, "pause_goal")
        self.preclean_time_limit = checked_seconds(preclean_time_limit, "preclean_time_limit")
        self.workers = checked_workers(workers)
        self.preclean_costs.walk = self.preclean_costs.card = -1.0
        self.remark_costs.walk = self.remark_costs.card = -1.0
        heap.check_open()
        self.heap = heap
        self.cards = CardTable.for_arena(heap.arena, heap.card_size)
        self.granularity = heap.tracker.granularity
        self.extent_align = max(self.granularity, heap.card_size)

    def __dealloc__(self):
        cdef size_t k
        with nogil:
            pool_stop(&self.pool)
        free(self.stack.items)
        for k in range(MAX_WORKERS):
            free(self.helper_stacks[k].items)
        free(self.final_regions.data)

    @property
    def worker_threads(self):
        """The started worker threads, as (kernel thread id, pinned CPU or -1)
        pairs; empty until the first concurrent cycle, or with workers=1."""
        cdef size_t k
        if os.getpid() != self.pool.owner_pid:             # a forked child has none
            return ()
        return tuple((self.pool.workers[k].tid, self.pool.workers[k].cpu)
                     for k in range(self.pool.count))

    cdef int start_workers(self) except -1:
        """Start the worker threads once, outside any pause. Where the system
        refuses threads the remark does with those that started, or with the
        collector's own thread alone (workers becomes 1), and says so once."""
        cdef int rc
        if self.workers < 2 or self.pool.workers != NULL:
            return 0
        with nogil:
            rc = pool_start(&self.pool, self.workers)
        if rc:
            warnings.warn(f"gctrack: no GC worker thread could start ({os.strerror(-rc)}); "
                          "the remark runs on the collector's thread alone", RuntimeWarning)
            self.workers = 1
        return 0

    cdef GrayStack *stack_of(self, size_t participant) noexcept:
        return &self.stack if participant == 0 else &self.helper_stacks[participant]

    cdef int check_stack(self) except -1:
        # A gray stack could not grow: some marked object was never scanned.
        cdef size_t k
        cdef bint failed = False
        for k in range(self.workers):
            failed |= self.stack_of(k).out_of_memory
            self.stack_of(k).out_of_memory = False
        if failed:
            raise MemoryError("the collector's mark stack could not grow")
        return 0

    cdef double stop_world_timed(self) except -1.0:
        """Stop the mutators; returns the time to safepoint, from the request
        until the last mutator parked (part of the pause the mutators see)."""
        cdef double requested = monotonic_seconds()
        self.heap.stop_world()
        self.stop_requested = requested
        return monotonic_seconds() - requested

    cdef tuple pause_span(self):
        """The pause that just ended, right after resume_world(): (stop
        requested, resumed) in CLOCK_MONOTONIC seconds (time.monotonic())."""
        return (self.stop_requested, monotonic_seconds())

    cdef double predict_remark(self, size_t dirty) noexcept:
        """The remark if it started now: walk the extent, rescan about as
        many cards as the last pass found dirty (they were dirtied in about
        the time the next pass takes to come round)."""
        cdef double walk = cost_of(self.remark_costs.walk, self.preclean_costs.walk,
                                   DEFAULT_WALK_COST)
        cdef double card = cost_of(self.remark_costs.card, self.preclean_costs.card,
                                   DEFAULT_CARD_COST)
        return walk * self.extent.size + card * dirty

    cdef uintptr_t cut_extent(self, bint clear=True) noexcept:
        """Cut the cards down to the heap's allocated extent, for the next
        pass; returns where that pass ends. ``clear=False`` when they are
        clear already (see clear_cards_before_remark)."""
        cdef uintptr_t end = heap_extent_end(&self.heap.core, self.extent_align)
        self.extent = cut_cards(&self.cards.bits, end)
        if clear:
            cards_clear(&self.extent)
        return end

    cdef void clear_cards_before_remark(self) noexcept:
        """Clear the cards of the last pass's extent with the mutators still
        running, so that the remark's pass need not (a 1 GiB heap's cards
        are 256 KiB). Cards past that extent were never marked: the extent
        never shrinks, and a pass marks only inside its own."""
        with nogil:
            cards_clear(&self.extent)

    cdef int passed(self, int rc, str where) except -1:
        """After a pass: raise for its error, else show its cards to the
        heap's barrier verifier."""
        if rc:
            raise TrackerError(-rc, "tracking pass", where)
        self.heap.note_dirty_cards(self.cards)
        return 0

    cdef PassCounts rearm_pass(self) except *:
        """Collect the cards dirtied since the previous pass into the
        extent's cards and re-arm them, with the mutators running."""
        cdef PassCounts counts
        cdef int rc
        cdef uintptr_t end = self.cut_extent()
        with nogil:
            rc = tracker_owner_pass(&self.heap.tracker.core, &self.heap.core, &self.extent,
                                    True, end, &counts)
        self.passed(rc, "in the collector")
        return counts

    cdef PassCounts final_pass(self) except *:
        """The remark's pass: report-only, split across the worker threads
        where the backend can, into cards cleared before the world stopped;
        the GIL stays held (Python mutators too must stay stopped)."""
        cdef PassCounts counts
        cdef uintptr_t end = self.cut_extent(clear=False)
        self.final_regions.length = 0
        self.final_regions.incomplete = False
        cdef int rc = tracker_owner_report(&self.heap.tracker.core, &self.heap.core, &self.extent,
                                           end, &self.pool, self.workers, &self.final_regions,
                                           &counts)
        self.passed(rc, "in the collector's remark")
        return counts

    cdef size_t remark_rescan(self, uint64_t dirty_pages, size_t *dirty) noexcept:
        """Rescan the marked objects on the dirty cards and finish marking
        (the roots are on the collector's gray stack already), split across
        the worker threads when there are any and the final pass reported
        enough (``dirty_pages``: units of the tracker's granularity).
        Returns how many threads took part."""
        cdef SplitRescan split
        cdef CardBits *cards = &self.extent
        cdef size_t k, participants
        cdef uint64_t cards_reported = dirty_pages * max(self.granularity >> cards.card_shift, 1)
        if (self.pool.count == 0 or cards.card_shift + 6 >= 64
                or cards.size < 2 * MIN_RESCAN_CHUNK or cards_reported < MIN_SPLIT_DIRTY_CARDS):
            if self.final_regions.incomplete:
                rescan_dirty(&self.heap.core, cards, 0, &self.stack, dirty)
            else:                       # a 1 GiB extent's card words are 256 KiB: skip them
                rescan_regions(&self.heap.core, cards, &self.final_regions, &self.stack, dirty)
            drain(&self.heap.core, &self.stack)
            return 1
        split.heap = &self.heap.core
        split.cards = cards
        chunks_init(&split.chunks, cards.base, cards.base + cards.size,
                    chunk_size_for(cards.size, self.workers, RESCAN_CHUNKS_PER_THREAD,
                                   <uintptr_t>64 << cards.card_shift, MIN_RESCAN_CHUNK))
        for k in range(self.workers):
            split.stacks[k] = self.stack_of(k)
            split.dirty[k] = 0
        participants = pool_run(&self.pool, rescan_chunks, &split, self.workers)
        dirty[0] = 0
        for k in range(self.workers):         # the workers that stayed out found none
            dirty[0] += split.dirty[k]
        return participants

    def collect(self, *, concurrent=True, max_preclean=10, after_phase=None):
        """One collection cycle. ``concurrent=False`` is the stop-the-world baseline.

        ``after_phase`` is a testing aid, for concurrent cycles: it is called
        with a phase's name when that phase ends, with the GIL held and the
        mutators running, so that a test can change the object graph at a
        chosen point of the cycle. The names, in order: ``"initial_mark"``
        (roots shaded, nothing traced yet), ``"concurrent_mark"``,
        ``"preclean"`` (once per precleaning round), ``"before_remark"``
        (the world stops next). An exception it raises abandons the cycle.
        """
        self.heap.check_open()
        if self.heap.collecting:
            raise RuntimeError("a collection of this heap is already running")
        max_preclean = operator.index(max_preclean)
        if max_preclean < 0:
            raise ValueError(f"max_preclean must be >= 0, got {max_preclean}")
        if after_phase is not None and not callable(after_phase):
            raise TypeError(f"after_phase must be callable, got {type(after_phase).__name__}")
        if after_phase is not None and not concurrent:
            raise ValueError("after_phase needs a concurrent cycle: a stop-the-world one has no phases")
        self.heap.collecting = True
        try:
            if concurrent:
                self.start_workers()
                return self.concurrent_cycle(max_preclean, after_phase)
            return self.stop_the_world_cycle()
        except BaseException:
            self.abandon_cycle()
            raise
        finally:
            self.heap.collecting = False

    cdef void abandon_cycle(self) noexcept:
        """A cycle failed before its sweep: forget its marks, so that the next
        cycle traces everything again (stale marks would hide objects)."""
        cdef HeapCore *h = &self.heap.core
        cdef size_t w
        for w in range(self.workers):
            self.stack_of(w).length = 0
            self.stack_of(w).out_of_memory = False
        with nogil:
            pthread_mutex_lock(&h.alloc_lock)
            h.allocate_marked = False
            for w in range((h.num_objects + 63) // 64):
                h.marks[w] = 0
            pthread_mutex_unlock(&h.alloc_lock)

    cdef object stop_the_world_cycle(self):
        """Everything with the mutators stopped and the GIL held."""
        cdef HeapCore *h = &self.heap.core
        cdef double started, marked, to_safepoint
        cdef uint64_t freed
        to_safepoint = self.stop_world_timed()
        try:
            started = monotonic_seconds()
            mark_roots(h, &self.stack)
            drain(h, &self.stack)
            marked = monotonic_seconds()
            self.check_stack()            # a mark dropped for want of memory: no sweep
            freed = sweep(h)
        finally:
            self.heap.resume_world()
        span = self.pause_span()
        return CycleStats(backend=self.heap.backend, concurrent=False, live=self.heap.live_count,
                          freed=freed, initial_mark_pause=0.0, concurrent_mark_seconds=0.0,
                          preclean=(), remark_pause=marked - started, remark_dirty_cards=0,
                          full_mark_seconds=marked - started, sweep_seconds=monotonic_seconds() - marked,
                          remark_time_to_safepoint=to_safepoint, pause_goal=self.pause_goal,
                          pause_spans=(span,))

    cdef object concurrent_cycle(self, int max_preclean, object after_phase):
        cdef HeapCore *h = &self.heap.core
        cdef double t0, t1, t2, initial_safepoint, remark_safepoint
        cdef uint64_t rescanned, freed
        cdef size_t dirty = 0, remark_threads = 1
        cdef PassCounts rearm, counts
        cdef double preclean_started, predicted
        # 1. re-arm tracking while the mutators run: a pass re-protects the
        # pages written since the last cycle, including those the previous
        # remark's report-only pass left armed-off. A store before it is
        # visible to the marker; a store after it lands on a dirty card.
        rearm = self.rearm_pass()
        # initial mark, native mutators parked and the GIL held
        initial_safepoint = self.stop_world_timed()
        t0 = monotonic_seconds()
        pthread_mutex_lock(&h.alloc_lock)
        h.allocate_marked = True
        pthread_mutex_unlock(&h.alloc_lock)
        mark_roots(h, &self.stack)
        t1 = monotonic_seconds()
        self.heap.resume_world()
        initial_span = self.pause_span()
        initial_pause = t1 - t0
        if after_phase is not None:
            after_phase("initial_mark")
        # 2. concurrent mark
        with nogil:
            t0 = monotonic_seconds()
            drain(h, &self.stack)
            t1 = monotonic_seconds()
        self.check_stack()
        concurrent_seconds = t1 - t0
        if after_phase is not None:
            after_phase("concurrent_mark")
        # 3. precleaning
        preclean = []
        predicted = self.predict_remark(0)
        preclean_started = monotonic_seconds()
        for _ in range(max_preclean):
            t0 = monotonic_seconds()
            counts = self.rearm_pass()
            with nogil:
                rescanned = rescan_dirty(h, &self.extent, 0, &self.stack, &dirty)
                drain(h, &self.stack)
                t1 = monotonic_seconds()
            self.check_stack()
            learn(&self.preclean_costs, counts.seconds / self.extent.size,
                  t1 - t0 - counts.seconds, dirty)
            predicted = self.predict_remark(dirty)
            preclean.append(PrecleanPass(dirty_cards=dirty, rescanned=rescanned, seconds=t1 - t0,
                                         predicted_remark=predicted))
            if after_phase is not None:
                after_phase("preclean")
            if predicted <= self.pause_goal or monotonic_seconds() - preclean_started >= self.preclean_time_limit:
                break
        if after_phase is not None:
            after_phase("before_remark")
        # 4. remark: native mutators parked, the GIL held throughout. The
        # final pass only reports: nothing runs between it and the rescan, so
        # re-arming would only add TLB flushes to the pause; step 1 of the
        # next cycle re-arms those pages.
        self.clear_cards_before_remark()
        remark_safepoint = self.stop_world_timed()
        t0 = monotonic_seconds()
        try:
            counts = self.final_pass()
            mark_roots(h, &self.stack)
            remark_threads = self.remark_rescan(counts.pages, &dirty)
            t1 = monotonic_seconds()
            self.heap.verify_barriers_at_remark()    # a debug aid, not counted in remark_pause
        finally:
            self.heap.resume_world()
        remark_span = self.pause_span()
        self.check_stack()
        remark_pause = t1 - t0
        learn(&self.remark_costs, counts.seconds / self.extent.size,
              remark_pause - counts.seconds, dirty)
        # 5. sweep, mutators running
        with nogil:
            freed = sweep(h)
            t2 = monotonic_seconds()
        return CycleStats(backend=self.heap.backend, concurrent=True, live=self.heap.live_count,
                          freed=freed, initial_mark_pause=initial_pause,
                          concurrent_mark_seconds=concurrent_seconds, preclean=tuple(preclean),
                          remark_pause=remark_pause, remark_dirty_cards=dirty,
                          full_mark_seconds=0.0, sweep_seconds=t2 - t1,
                          initial_mark_time_to_safepoint=initial_safepoint,
                          remark_time_to_safepoint=remark_safepoint, rearm_pages=rearm.pages,
                          pause_goal=self.pause_goal, predicted_remark=predicted,
                          outran_precleaning=predicted > self.pause_goal,
                          remark_threads=remark_threads, remark_pass_seconds=counts.seconds,
                          pause_spans=(initial_span, remark_span))
