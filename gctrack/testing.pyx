# cython: language_level=3, boundscheck=False, wraparound=False, embedsignature=True
"""Native writer threads for tests and benchmarks.

Real pthreads that store into an arena without the GIL, so that tests can
race genuine concurrent writes against tracking passes.
"""
import numpy

cimport cython
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from posix.unistd cimport getpid

from gctrack.arena cimport Arena
from gctrack.cards cimport CardTable
from gctrack.software cimport SoftwareBackend, SoftwareCore, software_write_barrier
from gctrack.backend cimport PassCounts
from gctrack.tracker cimport Tracker, tracker_owner_report
from gctrack.workers cimport WorkerPool, pool_start, pool_stop
from gctrack.threads cimport gct_cpu_relax, pthread_t, pthread_create, pthread_join

from gctrack.errors import TrackerError
from gctrack.collector import checked_workers


cdef extern from *:
    """
    static inline int gct_load_acquire(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void gct_store_release(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void gct_increment(int *p) { __atomic_add_fetch(p, 1, __ATOMIC_RELEASE); }
    static inline void gct_store_word(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
    """
    int gct_load_acquire(const int *p) nogil
    void gct_store_release(int *p, int v) nogil
    void gct_increment(int *p) nogil
    void gct_store_word(uint64_t *p, uint64_t v) nogil


ctypedef struct WriterJob:
    volatile char *base
    const uint64_t *offsets
    size_t count
    unsigned spin          # pause instructions between two stores
    int *go                # all writers start together when it turns 1
    int *finished          # counts writers that stored everything


cdef void *writer_main(void *arg) noexcept nogil:
    cdef WriterJob *job = <WriterJob *>arg
    cdef size_t i
    cdef unsigned _pause
    while not gct_load_acquire(job.go):
        gct_cpu_relax()
    for i in range(job.count):
        job.base[job.offsets[i]] = <char>(i | 1)
        for _pause in range(job.spin):
            gct_cpu_relax()
    gct_increment(job.finished)
    return NULL


def store_bytes(Arena arena not None, offsets, Tracker tracker=None):
    """Store one byte at each offset, in this thread, without the GIL.

    With a software-backend ``tracker`` each store is followed by the inline
    card-marking barrier, as compiled code would do it. For timing first
    writes: no Python runs between two stores. A closed arena or tracker
    raises ValueError.
    """
    cdef const uint64_t[::1] offs = numpy.ascontiguousarray(offsets, dtype=numpy.uint64)
    if offs.shape[0] and int(numpy.asarray(offs).max()) >= arena.size:
        raise ValueError(f"an offset is outside the arena of {arena.size} bytes")
    arena.check_open()
    cdef SoftwareCore *barrier = NULL
    if tracker is not None:
        tracker.check_usable()           # a closed tracker's barrier state is freed
        if tracker.arena is not arena:
            raise ValueError("the tracker watches a different arena")
        if isinstance(tracker.backend_object, SoftwareBackend):
            barrier = &(<SoftwareBackend>tracker.backend_object).c
    cdef volatile char *base = arena.base
    cdef size_t i
    arena.pin()                          # stays mapped even if closed meanwhile
    try:
        with nogil:
            for i in range(<size_t>offs.shape[0]):
                base[offs[i]] = <char>(i | 1)
                if barrier != NULL:
                    software_write_barrier(barrier, <uintptr_t>base + offs[i])
    finally:
        arena.unpin()


cdef extern from "gctrack/gctrack.h" nogil:
    ctypedef struct CardBarrier "gct_barrier":
        uint64_t *words
        uintptr_t base
        size_t size
        unsigned card_shift
    int card_barrier_mark "gct_barrier_mark"(const CardBarrier *b, uintptr_t addr)


ctypedef struct WordJob:
    uintptr_t base
    const uint64_t *offsets
    const uint64_t *values
    size_t first             # this thread stores items first, first + step, ...
    size_t step
    size_t count
    const CardBarrier *barrier   # NULL: no barrier


cdef void store_word_share(WordJob *job) noexcept nogil:
    cdef size_t i = job.first
    cdef uintptr_t addr
    while i < job.count:
        addr = job.base + job.offsets[i]
        gct_store_word(<uint64_t *>addr, job.values[i])
        if job.barrier != NULL:
            card_barrier_mark(job.barrier, addr)      # after the store, atomically
        i += job.step


cdef void *word_writer_main(void *arg) noexcept nogil:
    store_word_share(<WordJob *>arg)
    return NULL


def store_words(Arena arena not None, offsets, values, CardTable cards=None, *, threads=1):
    """Store ``values[i]`` (uint64) at byte offset ``offsets[i]`` (8-aligned)
    of the arena, without the GIL, from ``threads`` pthreads (item i goes to
    thread i % threads, which stores its items in order).

    With ``cards``, each store is followed by a runtime's card-marking
    barrier into that table: an atomic OR of the card's bit, as compiled
    code would do it (gct_barrier_mark). Without, the stores skip it. Returns
    once every thread has finished.
    """
    cdef const uint64_t[::1] offs = numpy.ascontiguousarray(offsets, dtype=numpy.uint64)
    cdef const uint64_t[::1] vals = numpy.ascontiguousarray(values, dtype=numpy.uint64)
    threads = int(threads)
    if not 1 <= threads <= 64:
        raise ValueError(f"threads must be in 1..64, got {threads}")
    if offs.shape[0] != vals.shape[0]:
        raise ValueError(f"{offs.shape[0]} offsets but {vals.shape[0]} values")
    arena.check_open()
    if offs.shape[0] and (int(numpy.asarray(offs).max()) > arena.size - 8
                          or (numpy.asarray(offs) % 8).any()):
        raise ValueError(f"offsets must be 8-aligned and inside the arena of {arena.size} bytes")
    cdef CardBarrier barrier
    if cards is not None:
        cards.check_covers(<uintptr_t>arena.base, arena.size)
        barrier.words = cards.bits.words
        barrier.base = cards.bits.base
        barrier.size = cards.bits.size
        barrier.card_shift = cards.bits.card_shift
    cdef WordJob jobs[64]
    cdef pthread_t ids[64]
    cdef size_t k, n = threads, started = 0
    for k in range(n):
        jobs[k].base = <uintptr_t>arena.base
        jobs[k].offsets = &offs[0] if offs.shape[0] else NULL
        jobs[k].values = &vals[0] if vals.shape[0] else NULL
        jobs[k].first = k
        jobs[k].step = n
        jobs[k].count = offs.shape[0]
        jobs[k].barrier = &barrier if cards is not None else NULL
    cdef int rc = 0
    arena.pin()                          # stays mapped even if closed meanwhile
    try:
        with nogil:
            if n == 1:
                store_word_share(&jobs[0])
            else:
                for k in range(n):
                    rc = pthread_create(&ids[k], NULL, word_writer_main, &jobs[k])
                    if rc:
                        break
                    started += 1
                for k in range(started):
                    pthread_join(ids[k], NULL)
    finally:
        arena.unpin()
    if rc:
        raise TrackerError(rc, "pthread_create")


@cython.no_gc_clear       # the threads use the arena (pinned) until __dealloc__ has joined them
cdef class NativeWriters:
    """NativeWriters(arena, offsets, spin=0)
--

One pthread per offsets array; thread k stores one byte at each of
    ``offsets[k]`` (byte offsets into the arena), in order, without the GIL.

    ``spin`` pause instructions between stores slow a writer down so that
    its writes interleave with passes. Use as a context manager or call
    ``start()`` then ``join()``. In a forked child the writers are the
    parent's threads: join() and dropping the object forget them.
    """
    cdef Arena arena
    cdef list offsets
    cdef WriterJob *jobs
    cdef pthread_t *threads
    cdef size_t num_threads
    cdef size_t started
    cdef int go
    cdef int finished_count
    cdef long owner_pid

    def __cinit__(self, Arena arena not None, offsets, unsigned spin=0):
        self.owner_pid = getpid()
        self.offsets = [numpy.ascontiguousarray(o, dtype=numpy.uint64) for o in offsets]
        for o in self.offsets:
            if o.ndim != 1:
                raise ValueError("each writer's offsets must be one-dimensional")
            if o.size and int(o.max()) >= arena.size:
                raise ValueError(f"offset {int(o.max())} is outside the arena of {arena.size} bytes")
        arena.pin()
        self.arena = arena
        self.num_threads = len(self.offsets)
        self.jobs = <WriterJob *>calloc(max(self.num_threads, 1), sizeof(WriterJob))
        self.threads = <pthread_t *>calloc(max(self.num_threads, 1), sizeof(pthread_t))
        if self.jobs == NULL or self.threads == NULL:
            raise MemoryError()
        cdef const uint64_t[::1] view
        for k, o in enumerate(self.offsets):
            view = o
            self.jobs[k].base = arena.base
            self.jobs[k].offsets = &view[0] if o.size else NULL
            self.jobs[k].count = o.size
            self.jobs[k].spin = spin
            self.jobs[k].go = &self.go
            self.jobs[k].finished = &self.finished_count

    def start(self):
        """Start every writer; they begin storing together."""
        if self.started:
            raise RuntimeError("writers already started")
        self.arena.check_open()
        if getpid() != self.owner_pid:
            raise RuntimeError(f"these writers belong to process {self.owner_pid}")
        cdef size_t k
        cdef int rc
        for k in range(self.num_threads):
            rc = pthread_create(&self.threads[k], NULL, writer_main, &self.jobs[k])
            if rc:
                self.join()
                raise TrackerError(rc, "pthread_create")
            self.started += 1
        gct_store_release(&self.go, 1)
        return self

    def finished(self):
        """Whether every writer has done all its stores."""
        return gct_load_acquire(&self.finished_count) == <int>self.num_threads

    def join(self):
        """Wait for every started writer to finish (in a forked child: forget them)."""
        self.join_threads()

    cdef void join_threads(self) noexcept:
        cdef size_t k
        cdef size_t n = self.started
        self.started = 0
        if getpid() != self.owner_pid:
            return                    # the parent's threads do not exist here
        gct_store_release(&self.go, 1)
        with nogil:
            for k in range(n):
                pthread_join(self.threads[k], NULL)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.join()

    def __dealloc__(self):
        self.join_threads()
        free(self.jobs)
        free(self.threads)
        if self.arena is not None:
            self.arena.unpin()


@cython.no_gc_clear       # the threads are joined in __dealloc__, before the tracker goes
cdef class SplitReporter:
    """SplitReporter(tracker, *, workers=None)
--

Report-only passes of ``tracker``, split across ``workers`` threads (the
    caller's included; default: as many as a Collector's), as a Collector's
    remark runs them. Its own worker threads run from construction to close().
    """
    cdef Tracker tracker
    cdef WorkerPool pool
    cdef readonly size_t workers

    def __cinit__(self, Tracker tracker not None, *, workers=None):
        cdef int rc = 0
        self.workers = checked_workers(workers)
        tracker.check_usable()
        self.tracker = tracker
        if self.workers > 1:
            with nogil:
                rc = pool_start(&self.pool, self.workers)
        if rc:
            raise TrackerError(-rc, "pthread_create", "GC worker threads")

    def report(self, CardTable cards not None):
        """One split report-only pass into ``cards``; returns (seconds, kernel
        calls, pages reported), the seconds as the pass timed itself."""
        cdef PassCounts counts
        cdef int rc
        self.tracker.check_usable()
        self.tracker.cards_for_arena(cards)
        with nogil:
            rc = tracker_owner_report(&self.tracker.core, NULL, &cards.bits, 0, &self.pool,
                                      self.workers, NULL, &counts)
        if rc:
            raise TrackerError(-rc, "split report-only pass")
        return counts.seconds, counts.calls, counts.pages

    def close(self):
        """Join the worker threads. Idempotent."""
        with nogil:
            pool_stop(&self.pool)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __dealloc__(self):
        pool_stop(&self.pool)
