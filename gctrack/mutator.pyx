# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Native mutators: threads without the GIL that change a Heap's object graph.

They behave like a program, not like noise: every reference they store or
root they set comes from an object they reached from a root, or from a new
allocation. So if the collector ever frees a reachable object, a mutator
eventually walks into a freed object, and counts a violation.
"""
import operator

import numpy

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from posix.time cimport clock_gettime, nanosleep, timespec, CLOCK_MONOTONIC
from posix.unistd cimport getpid

from gctrack.heap cimport (Heap, HeapCore, Safepoint, heap_alloc, heap_is_object, heap_load,
                           heap_publish, heap_store, safepoint_enter, safepoint_leave, safepoint_poll,
                           safepoint_wake_parked)
from gctrack.threads cimport pthread_t, pthread_create, pthread_join

from gctrack.errors import TrackerError


cdef extern from *:
    """
    static inline int gct_mut_load(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void gct_mut_store(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    """
    int gct_mut_load(const int *p) nogil
    void gct_mut_store(int *p, int v) nogil


ctypedef struct MutatorState:
    HeapCore *heap
    uint64_t rng
    size_t first_root              # this thread's own root slots
    size_t num_roots
    double interval                # seconds between operations; 0: as fast as possible
    int *running                   # cleared by stop(): the thread leaves
    int *registered                # counts threads that joined the safepoint
    uint64_t stores, allocations, root_changes, violations


cdef uint64_t XORSHIFT_MULTIPLIER = 0x2545F4914F6CDD1D
cdef uint64_t SEED_MIX = 0x9E3779B97F4A7C15


cdef inline uint64_t next_random(uint64_t *state) noexcept nogil:
    cdef uint64_t x = state[0]          # xorshift64*
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    state[0] = x
    return x * XORSHIFT_MULTIPLIER


cdef inline double seconds_now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef uintptr_t walk(MutatorState *m) noexcept nogil:
    """A reachable object: from a root (one time in four any root of the
    heap, so that mutators rewire the whole graph), a few random steps down."""
    cdef HeapCore *h = m.heap
    cdef uintptr_t obj = 0
    if next_random(&m.rng) % 4 == 0:
        obj = heap_load(&h.roots[next_random(&m.rng) % h.max_roots])
    if obj == 0:
        obj = heap_load(&h.roots[m.first_root + next_random(&m.rng) % m.num_roots])
    cdef uintptr_t next_obj
    cdef int steps = next_random(&m.rng) % 12
    if obj == 0:
        return 0
    while True:
        if not heap_is_object(h, obj):
            m.violations += 1         # a reachable object was freed
            return 0
        if steps == 0:
            return obj
        steps -= 1
        next_obj = heap_load(<uint64_t *>obj + 1 + next_random(&m.rng) % h.slots)
        if next_obj == 0:
            return obj
        obj = next_obj


cdef void mutate_once(MutatorState *m) noexcept nogil:
    cdef HeapCore *h = m.heap
    cdef uint64_t choice = next_random(&m.rng) % 100
    cdef uintptr_t obj, target
    cdef size_t root
    if choice < 70:                                   # a reference store
        obj = walk(m)
        if obj == 0:
            choice = 90                                # nothing rooted yet: allocate
        else:
            choice = next_random(&m.rng) % 10
            if choice < 1:
                target = 0
            elif choice < 7:
                target = walk(m)
            else:
                target = heap_alloc(h)
                m.allocations += target != 0
            heap_store(h, obj, next_random(&m.rng) % h.slots, target)
            m.stores += 1
            return
    root = m.first_root + next_random(&m.rng) % m.num_roots
    if choice < 85:                                   # re-point a root at something reachable
        target = walk(m)
        if target == 0:
            return
    else:                                             # or at a new object
        target = heap_alloc(h)
        m.allocations += target != 0
        if target == 0:
            return
    heap_publish(&h.roots[root], target)
    m.root_changes += 1


cdef void *mutator_main(void *arg) noexcept nogil:
    cdef MutatorState *m = <MutatorState *>arg
    cdef Safepoint *sp = &m.heap.safepoint
    cdef timespec pause
    safepoint_enter(sp, m.registered, m.running)
    cdef double next_at = seconds_now()
    while True:
        safepoint_poll(sp, m.running)
        if not gct_mut_load(m.running):
            break
        mutate_once(m)
        if m.interval > 0:
            next_at += m.interval
            while seconds_now() < next_at and gct_mut_load(m.running):
                pause.tv_sec = 0
                pause.tv_nsec = 50000
                safepoint_poll(sp, m.running)
                nanosleep(&pause, NULL)
    safepoint_leave(sp)
    return NULL


# How long start() waits without the GIL before it checks for signals.
cdef double REGISTER_WAIT_SLICE = 0.05


@cython.no_gc_clear       # the threads use self.heap until __dealloc__ has joined them
cdef class NativeMutators:
    """NativeMutators(heap, *, threads=2, rate=0.0, roots_per_thread=16, seed=1)
--

``threads`` native threads mutating ``heap`` at ``rate`` operations per
    second each (0: unthrottled). From start() to stop() each owns
    ``roots_per_thread`` root slots, taken from the heap's free root slots
    and emptied again by stop(). ``pause()``/``resume()`` stop and release
    the heap's native mutators at a safepoint, as a collector does; a paused
    world stays paused through a collect().

    In a forked child the threads are the parent's: stop() and dropping the
    object forget them without joining, and start()/pause() are refused.
    """
    cdef Heap heap
    cdef MutatorState *states
    cdef pthread_t *threads
    cdef size_t count              # threads that start() creates
    cdef size_t live_threads       # created and not yet joined
    cdef size_t roots_per_thread
    cdef Py_ssize_t first_root     # the reserved root run, or -1
    cdef int running
    cdef int registered
    cdef bint paused               # this object's stop of the world is in force
    cdef long owner_pid

    def __cinit__(self, Heap heap not None, *, threads=2, rate=0.0, roots_per_thread=16, seed=1):
        self.first_root = -1
        self.owner_pid = getpid()
        threads = operator.index(threads)
        roots_per_thread = operator.index(roots_per_thread)
        rate = float(rate)
        if threads < 1 or roots_per_thread < 1 or rate < 0:
            raise ValueError("threads and roots_per_thread must be positive, rate >= 0")
        heap.check_open()
        if threads * roots_per_thread > heap.core.max_roots:
            raise ValueError(f"{threads} threads of {roots_per_thread} roots need more than the "
                             f"heap's {heap.core.max_roots} root slots")
        self.heap = heap
        self.count = threads
        self.roots_per_thread = roots_per_thread
        self.states = <MutatorState *>calloc(threads, sizeof(MutatorState))
        self.threads = <pthread_t *>calloc(threads, sizeof(pthread_t))
        if self.states == NULL or self.threads == NULL:
            raise MemoryError()
        cdef size_t k
        for k in range(self.count):
            self.states[k].heap = &heap.core
            self.states[k].rng = (seed * SEED_MIX + k + 1) & 0xFFFFFFFFFFFFFFFF or 1
            self.states[k].num_roots = roots_per_thread
            self.states[k].interval = 1.0 / rate if rate else 0.0
            self.states[k].running = &self.running
            self.states[k].registered = &self.registered

    cdef bint forked(self) noexcept:
        return getpid() != self.owner_pid

    cdef int check_owner(self) except -1:
        if self.forked():
            raise RuntimeError(f"these mutators belong to process {self.owner_pid}; "
                               "after fork() the child must make its own")
        return 0

    def start(self):
        """Reserve the root slots, start the threads and return once every
        one of them has joined the heap's safepoint (parked, if the world is
        stopped). Ctrl-C while waiting stops them again."""
        self.check_owner()
        self.heap.check_open()
        if self.live_threads:
            raise RuntimeError("mutators already started")
        self.reserve_roots()
        gct_mut_store(&self.registered, 0)
        gct_mut_store(&self.running, 1)
        cdef size_t k
        cdef int rc
        for k in range(self.count):
            rc = pthread_create(&self.threads[k], NULL, mutator_main, &self.states[k])
            if rc:
                self.stop()
                raise TrackerError(rc, "pthread_create", "mutator thread")
            self.live_threads += 1
        try:
            self.wait_until_registered()
        except BaseException:
            self.stop()
            raise
        return self

    cdef int reserve_roots(self) except -1:
        cdef size_t k
        self.first_root = self.heap.reserve_root_run(self.count * self.roots_per_thread)
        for k in range(self.count):
            self.states[k].first_root = self.first_root + k * self.roots_per_thread
        return 0

    cdef void release_roots(self) noexcept:
        """Give the root slots back, emptied; the threads must be gone."""
        if self.first_root >= 0:
            self.heap.release_root_run(self.first_root, self.count * self.roots_per_thread)
            self.first_root = -1

    cdef int wait_until_registered(self) except -1:
        """Wait, checking for signals between slices, until every live thread joined."""
        cdef int expected = self.live_threads
        cdef double slice_end
        cdef timespec tick
        tick.tv_sec = 0
        tick.tv_nsec = 100000
        while gct_mut_load(&self.registered) < expected:
            with nogil:
                slice_end = seconds_now() + REGISTER_WAIT_SLICE
                while gct_mut_load(&self.registered) < expected and seconds_now() < slice_end:
                    nanosleep(&tick, NULL)
            PyErr_CheckSignals()
        return 0

    cdef void join_threads(self) noexcept:
        """Tell the threads to leave (parked ones too) and join them."""
        cdef size_t k, n = self.live_threads
        gct_mut_store(&self.running, 0)
        if n == 0:
            return
        safepoint_wake_parked(&self.heap.core.safepoint)
        with nogil:
            for k in range(n):
                pthread_join(self.threads[k], NULL)
        self.live_threads = 0

    def stop(self):
        """Withdraw this object's pause, stop and join every mutator thread
        (even if another pause keeps the world stopped), and empty and release
        their root slots. Idempotent."""
        if self.forked():
            self.live_threads = 0          # the parent's threads: nothing to join here
            self.paused = False
        else:
            self.resume()
            self.join_threads()
        self.release_roots()

    def pause(self):
        """Stop the heap's world: return once every native mutator of the heap
        is parked at a safepoint; they stay parked until resume(). Idempotent.
        Nests with other stops: a collect() leaves a paused world paused."""
        if self.paused:
            return
        self.check_owner()
        self.heap.check_open()
        self.heap.stop_world()
        self.paused = True

    def resume(self):
        """Withdraw this object's pause(); does nothing without one."""
        if not self.paused:
            return
        self.paused = False
        if not self.forked():
            self.heap.resume_world()

    def __repr__(self):
        state = ("paused" if self.paused else "running") if self.live_threads else "stopped"
        interval = self.states[0].interval if self.count else 0.0
        rate = f"{1 / interval:,.0f} operations/s each" if interval else "unthrottled"
        return f"<gctrack.NativeMutators {self.count} threads, {rate}, {state}>"

    def stats(self):
        """Totals: stores, allocations, root_changes, violations."""
        cdef size_t k
        totals = {"stores": 0, "allocations": 0, "root_changes": 0, "violations": 0}
        for k in range(self.count):
            totals["stores"] += self.states[k].stores
            totals["allocations"] += self.states[k].allocations
            totals["root_changes"] += self.states[k].root_changes
            totals["violations"] += self.states[k].violations
        return totals

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def __dealloc__(self):
        if self.heap is not None:
            if not self.forked():
                if self.paused:
                    self.heap.resume_world()
                self.join_threads()
            self.release_roots()
        free(self.states)
        free(self.threads)


def populate(Heap heap not None, objects, *, garbage=0.2, seed=1):
    """Allocate ``objects`` objects at C speed. A ``garbage`` fraction is left
    unreferenced; the rest form trees under up to 64 new roots (taken from
    the free root slots), each object in an empty slot of an earlier one.
    Returns how many objects were allocated."""
    objects = operator.index(objects)
    garbage = float(garbage)
    if objects < 0 or not 0.0 <= garbage <= 1.0:
        raise ValueError("objects must be >= 0 and garbage in [0, 1]")
    heap.check_open()
    free_roots = numpy.flatnonzero((heap.root_slots == 0) & ~heap.reserved_roots)[:64]
    if objects and free_roots.size == 0:
        raise ValueError("the heap has no free root slot")
    cdef uint64_t[::1] root_slots = (numpy.ascontiguousarray(free_roots, dtype=numpy.uint64)
                                     if free_roots.size else numpy.zeros(1, numpy.uint64))
    cdef HeapCore *h = &heap.core
    cdef uint64_t rng = (seed * SEED_MIX + 7) & 0xFFFFFFFFFFFFFFFF or 1
    cdef uint64_t garbage_threshold = <uint64_t>(garbage * 1000000)
    cdef size_t n = objects, made = 0, linked = 0, roots = free_roots.size
    cdef uintptr_t obj
    cdef uintptr_t *tree = <uintptr_t *>calloc(max(n, 1), sizeof(uintptr_t))
    if tree == NULL:
        raise MemoryError()
    with nogil:
        while made < n:
            obj = heap_alloc(h)
            if obj == 0:
                break
            made += 1
            if next_random(&rng) % 1000000 < garbage_threshold:
                continue                                  # born unreachable
            if linked < roots:
                heap_publish(&h.roots[root_slots[linked]], obj)
            else:                                         # child of an earlier object
                heap_store(h, tree[(linked - roots) // h.slots], (linked - roots) % h.slots, obj)
            tree[linked] = obj
            linked += 1
    free(tree)
    return made
