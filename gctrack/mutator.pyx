# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Native mutators: threads without the GIL that change a Heap's object graph.

They behave like a program, not like noise: every reference they store or
root they set comes from an object they reached from a root, or from a new
allocation. So if the collector ever frees a reachable object, a mutator
eventually walks into a freed object, and counts a violation.

Each thread runs one workload (WORKLOADS) on its own root slots:

- ``rewire``: random rewiring of the whole graph, optionally with a hot set
  of pages that takes a share of the stores;
- ``gcbench``: Boehm, Ellis and Kovac's GCBench: a long-lived tree and array,
  then binary trees of growing depth built top-down (each child stored into
  its older parent) and bottom-up (children first), each dropped at once;
- ``gcold``: a large old tree, then steps of short-lived garbage with a
  tunable rate of stores into the old tree (new leaves, swapped subtrees);
- ``binary_trees``: the benchmarks game's binary-trees: a long-lived tree,
  then many bottom-up trees, each walked (its nodes counted) and dropped.

A thread polls the safepoint before every allocation and between work units,
and whatever it holds there is reachable from its own roots: a tree built
top-down hangs from a root slot, and the pending subtrees of a bottom-up
build sit in a shadow stack of root slots, as a runtime's stack would hold
them. While the heap is full an allocating thread stalls: it polls, sleeps
20 microseconds and retries, so a stalled thread never holds up a collector.
"""
import math
import numbers
import operator
from collections.abc import Mapping

import numpy

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from posix.time cimport (clock_gettime, nanosleep, timespec, CLOCK_MONOTONIC,
                         CLOCK_THREAD_CPUTIME_ID)
from posix.types cimport clockid_t
from posix.unistd cimport getpid

from gctrack.clock cimport monotonic_seconds
from gctrack.cards cimport CardBits, CardTable
from gctrack.dirtymap cimport gct_bits_set
from gctrack.heap cimport (Heap, HeapCore, Safepoint, heap_alloc, heap_extent_end, heap_is_allocated,
                           heap_is_object, heap_load, heap_publish, heap_store, safepoint_enter,
                           safepoint_leave, safepoint_poll, safepoint_wake_parked)
from gctrack.threads cimport (pthread_t, pthread_create, pthread_join, pthread_self, pthread_getcpuclockid,
                              pthread_mutex_t, pthread_mutex_init, pthread_mutex_destroy,
                              pthread_mutex_lock, pthread_mutex_unlock)

from gctrack.errors import TrackerError


cdef extern from *:
    """
    static inline int gct_mut_load(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void gct_mut_store(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    """
    int gct_mut_load(const int *p) nogil
    void gct_mut_store(int *p, int v) nogil


#: The workloads a NativeMutators thread can run.
WORKLOADS = ("rewire", "gcbench", "gcold", "binary_trees")
#: Each workload's parameters (the keys of ``params``).
PARAMETERS = {
    "rewire": ("locality", "hot_fraction"),
    "gcbench": ("min_depth", "max_depth", "long_lived_depth", "array_objects"),
    "gcold": ("old_depth", "alloc_per_step", "old_store_ratio", "promotion"),
    "binary_trees": ("min_depth", "max_depth", "long_lived_depth"),
}
#: What one work unit is: stats()["work_units"] counts them, ``rate`` paces them.
WORK_UNITS = {"rewire": "operations", "gcbench": "trees", "gcold": "steps", "binary_trees": "trees"}
#: The share of the heap that the default parameters keep reachable at peak,
#: summed over the threads: the collector has the rest to keep up with.
LIVE_SHARE = 0.4
#: The deepest tree a workload builds (2**41 objects: far past any heap).
MAX_DEPTH = 40

cdef enum:
    STALL_SLEEP_NS = 20000          # how long a thread that found the heap full sleeps, then retries

cdef enum Kind:
    REWIRE, GCBENCH, GCOLD, BINARY_TREES

# Root slots of each thread, from its first one. The shadow stack of a
# bottom-up build starts at the tree's slot: a tree of depth d uses d + 1.
cdef enum:
    LONG_LIVED = 0          # gcbench, binary_trees: the long-lived tree
    ARRAY = 1               # gcbench: the long-lived array
    GCBENCH_TREE = 2        # gcbench: the tree being built (top-down or bottom-up)
    BINARY_TREE = 1         # binary_trees: the tree being built and checked
    OLD = 0                 # gcold: the old tree
    YOUNG = 1               # gcold: this step's short-lived objects


ctypedef struct Workload:
    # A NativeMutators' resolved parameters, shared read-only by its threads.
    Kind kind
    uint64_t hot_threshold       # rewire: a store goes to the hot set when a 53-bit draw is below it
    double hot_fraction
    size_t page_size
    int min_depth, max_depth, long_lived_depth
    size_t array_objects
    int old_depth
    size_t alloc_per_step
    double old_store_ratio
    uint64_t promotion_threshold  # gcold: an old store is a new leaf when a 53-bit draw is below it


cdef struct MutatorState:
    HeapCore *heap
    const Workload *work
    bint (*set_up)(MutatorState *m) noexcept nogil   # builds the long-lived structures
    bint (*work_unit)(MutatorState *m) noexcept nogil
    CardBits *stored_cards         # or NULL: the card of every reference store is set here
    uint64_t rng
    size_t first_root              # this thread's own root slots
    size_t num_roots               # of them, the ones rewire walks from
    double interval                # seconds between work units; 0: as fast as possible
    int *running                   # cleared by stop(): the thread leaves
    int *registered                # counts threads that joined the safepoint
    # where the schedule of gcbench and binary_trees stands, and gcold's credit of old stores
    int depth, phase
    uint64_t iteration
    double old_store_credit
    uint64_t stores, allocations, root_changes, violations
    uint64_t work_units, old_stores, alloc_stalls, stall_ns
    # CPU time: under *cpu_lock, so that stats() never reads the clock of a thread that left
    pthread_mutex_t *cpu_lock
    clockid_t cpu_clock
    bint cpu_clock_live
    double cpu_seconds_done        # of the threads that already left


cdef uint64_t XORSHIFT_MULTIPLIER = 0x2545F4914F6CDD1D
cdef uint64_t SEED_MIX = 0x9E3779B97F4A7C15
cdef double ONE_IN_53_BITS = <double>(1ULL << 53)


cdef inline uint64_t next_random(uint64_t *state) noexcept nogil:
    cdef uint64_t x = state[0]          # xorshift64*
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    state[0] = x
    return x * XORSHIFT_MULTIPLIER


cdef inline bint chance(MutatorState *m, uint64_t threshold) noexcept nogil:
    """True with probability threshold / 2**53."""
    return (next_random(&m.rng) >> 11) < threshold


cdef inline uint64_t nanoseconds_now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


# ---- what every workload does: store, allocate, root, check ---------------------

cdef inline void store(MutatorState *m, uintptr_t obj, size_t slot, uintptr_t target) noexcept nogil:
    """A reference store into a heap object (through the heap's barrier),
    then the card of the slot set in stored_cards, if any."""
    heap_store(m.heap, obj, slot, target)
    m.stores += 1
    if m.stored_cards != NULL:
        gct_bits_set(m.stored_cards.words,
                     (obj + (slot + 1) * sizeof(uint64_t) - m.stored_cards.base) >> m.stored_cards.card_shift)


cdef inline uintptr_t own_root(MutatorState *m, size_t index) noexcept nogil:
    return heap_load(&m.heap.roots[m.first_root + index])


cdef inline void set_own_root(MutatorState *m, size_t index, uintptr_t obj) noexcept nogil:
    heap_publish(&m.heap.roots[m.first_root + index], obj)
    m.root_changes += 1


cdef inline bint still_object(MutatorState *m, uintptr_t obj) noexcept nogil:
    """An object this thread holds through its roots is still allocated;
    if not, the collector freed a reachable object: a violation."""
    if heap_is_object(m.heap, obj):
        return True
    m.violations += 1
    return False


cdef inline bint stopping(MutatorState *m) noexcept nogil:
    return not gct_mut_load(m.running)


cdef uintptr_t allocate(MutatorState *m) noexcept nogil:
    """A new object, or 0 once the thread is told to stop. Polls the
    safepoint first: everything the caller holds must be reachable from its
    roots. While the heap is full the thread stalls (stall_for_object)."""
    safepoint_poll(&m.heap.safepoint, m.running)
    if stopping(m):
        return 0
    cdef uintptr_t obj = heap_alloc(m.heap)
    if obj == 0:
        obj = stall_for_object(m)
    m.allocations += obj != 0
    return obj


cdef uintptr_t stall_for_object(MutatorState *m) noexcept nogil:
    """Sleep, poll the safepoint (a collector can always stop the world) and
    retry until an allocation succeeds (its object) or the thread is told to
    stop (0). The time counts in stall_ns as it passes."""
    cdef uintptr_t obj = 0
    cdef uint64_t last = nanoseconds_now(), now
    cdef timespec pause
    pause.tv_sec = 0
    pause.tv_nsec = STALL_SLEEP_NS
    m.alloc_stalls += 1
    while obj == 0:
        nanosleep(&pause, NULL)
        safepoint_poll(&m.heap.safepoint, m.running)
        now = nanoseconds_now()
        m.stall_ns += now - last
        last = now
        if stopping(m):
            return 0
        obj = heap_alloc(m.heap)
    return obj


cdef bint prepend(MutatorState *m, size_t root) noexcept nogil:
    """Allocate an object whose slot 0 holds the list in own root ``root``,
    and make it the list's head; False once stopped."""
    cdef uintptr_t node = allocate(m), head
    if node == 0:
        return False
    head = own_root(m, root)
    if head != 0:
        store(m, node, 0, head)
    set_own_root(m, root, node)
    return True


# ---- binary trees: two slots per node, left and right --------------------------------

cdef inline uint64_t tree_size(int depth) noexcept nogil:
    return (<uint64_t>2 << depth) - 1


cdef bint grow_top_down(MutatorState *m, uintptr_t node, int depth) noexcept nogil:
    """GCBench's Populate: below ``node`` (reachable from this thread's
    roots), allocate both children and store them into it, then recurse:
    every link is a store into an older object. False once stopped."""
    cdef uintptr_t left, right
    if depth <= 0:
        return True
    still_object(m, node)
    left = allocate(m)
    if left == 0:
        return False
    store(m, node, 0, left)
    right = allocate(m)
    if right == 0:
        return False
    store(m, node, 1, right)
    return grow_top_down(m, left, depth - 1) and grow_top_down(m, right, depth - 1)


cdef bint build_top_down(MutatorState *m, size_t root, int depth) noexcept nogil:
    """A perfect tree of ``depth`` built from the top into own root ``root``."""
    cdef uintptr_t top = allocate(m)
    if top == 0:
        return False
    set_own_root(m, root, top)
    return grow_top_down(m, top, depth)


cdef bint build_bottom_up(MutatorState *m, size_t root, int depth) noexcept nogil:
    """GCBench's MakeTree: a perfect tree of ``depth`` built from the leaves,
    each parent allocated after its children and given them (stores into
    the new object only). It ends in own root ``root``; the subtrees pending
    meanwhile sit in the roots after it (depth + 1 in all). False once stopped."""
    cdef uintptr_t node, left, right
    if depth > 0:
        if not build_bottom_up(m, root, depth - 1) or not build_bottom_up(m, root + 1, depth - 1):
            return False
    node = allocate(m)              # polls: both subtrees are rooted
    if node == 0:
        return False
    if depth > 0:
        left = own_root(m, root)
        right = own_root(m, root + 1)
        still_object(m, left)
        still_object(m, right)
        store(m, node, 0, left)
        store(m, node, 1, right)
        set_own_root(m, root + 1, 0)
    set_own_root(m, root, node)
    return True


cdef uint64_t count_nodes(MutatorState *m, uintptr_t node, int depth) noexcept nogil:
    """The nodes of a tree this thread holds through its roots, ``depth``
    levels down at most, polling the safepoint at each (0 once stopped)."""
    if node == 0:
        return 0
    safepoint_poll(&m.heap.safepoint, m.running)
    if stopping(m) or not still_object(m, node):
        return 0
    if depth == 0:
        return 1
    return (1 + count_nodes(m, heap_load(<uint64_t *>node + 1), depth - 1)
            + count_nodes(m, heap_load(<uint64_t *>node + 2), depth - 1))


cdef void check_long_lived(MutatorState *m, size_t roots) noexcept nogil:
    """Own roots 0 .. roots - 1 hold the long-lived structures: still there?"""
    cdef size_t i
    for i in range(roots):
        still_object(m, own_root(m, i))


cdef inline void next_depth(MutatorState *m) noexcept nogil:
    m.iteration = 0
    m.depth = m.depth + 2 if m.depth + 2 <= m.work.max_depth else m.work.min_depth


# ---- rewire ----------------------------------------------------------------------

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


cdef uintptr_t hot_object(MutatorState *m, uintptr_t otherwise) noexcept nogil:
    """An allocated object on the hot pages: the first hot_fraction of the
    allocated extent, rounded up to whole pages. Picked by address, as a
    program's hot data sits on a few pages (it may be garbage not yet swept:
    a store into it is harmless). ``otherwise`` when four picks miss."""
    cdef HeapCore *h = m.heap
    cdef size_t page = m.work.page_size, objects, index
    cdef uintptr_t extent = heap_extent_end(h, page) - h.base
    cdef uintptr_t hot = (<uintptr_t>(m.work.hot_fraction * extent) + page - 1) & ~(<uintptr_t>page - 1)
    cdef int _attempt
    if hot == 0:
        hot = page                  # one page at least
    objects = (hot if hot < extent else extent) >> h.object_shift
    if objects == 0:
        return otherwise
    for _attempt in range(4):
        index = next_random(&m.rng) % objects
        if heap_is_allocated(h, index):
            return h.base + (index << h.object_shift)
    return otherwise


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
            if m.work.hot_threshold and chance(m, m.work.hot_threshold):
                obj = hot_object(m, obj)
            choice = next_random(&m.rng) % 10
            if choice < 1:
                target = 0
            elif choice < 7:
                target = walk(m)
            else:
                target = heap_alloc(h)
                m.allocations += target != 0
            store(m, obj, next_random(&m.rng) % h.slots, target)
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


# ---- gcbench -----------------------------------------------------------------------

cdef bint gcbench_setup(MutatorState *m) noexcept nogil:
    """The long-lived tree (top-down) and array (a list of array_objects)."""
    cdef size_t _i
    if not build_top_down(m, LONG_LIVED, m.work.long_lived_depth):
        return False
    for _i in range(m.work.array_objects):
        if not prepend(m, ARRAY):
            return False
    m.depth = m.work.min_depth
    return True


cdef bint gcbench_step(MutatorState *m) noexcept nogil:
    """One tree of the schedule, built and dropped. For each depth from
    min_depth to max_depth, step 2 (then again from min_depth): as many
    trees top-down, then as many bottom-up, as make tree_size(max_depth)
    nodes."""
    check_long_lived(m, 2 if m.work.array_objects else 1)
    if m.phase == 0:
        if not build_top_down(m, GCBENCH_TREE, m.depth):
            return False
    elif not build_bottom_up(m, GCBENCH_TREE, m.depth):
        return False
    set_own_root(m, GCBENCH_TREE, 0)
    m.iteration += 1
    if m.iteration >= tree_size(m.work.max_depth) // tree_size(m.depth):
        m.phase ^= 1
        m.iteration = 0
        if m.phase == 0:
            next_depth(m)
    return True


# ---- binary_trees --------------------------------------------------------------------

cdef bint binary_trees_setup(MutatorState *m) noexcept nogil:
    """The long-lived tree, bottom-up."""
    if not build_bottom_up(m, BINARY_TREE, m.work.long_lived_depth):
        return False
    set_own_root(m, LONG_LIVED, own_root(m, BINARY_TREE))
    set_own_root(m, BINARY_TREE, 0)
    m.depth = m.work.min_depth
    return True


cdef bint binary_trees_step(MutatorState *m) noexcept nogil:
    """One tree built bottom-up, checked (its nodes counted) and dropped; for
    each depth from min_depth to max_depth, step 2 (then again from
    min_depth), 2**(max_depth - depth + min_depth) trees."""
    check_long_lived(m, 1)
    if not build_bottom_up(m, BINARY_TREE, m.depth):
        return False
    count_nodes(m, own_root(m, BINARY_TREE), m.depth)
    if stopping(m):
        return False
    set_own_root(m, BINARY_TREE, 0)
    m.iteration += 1
    if m.iteration >= <uint64_t>1 << (m.work.max_depth - m.depth + m.work.min_depth):
        next_depth(m)
    return True


# ---- gcold ------------------------------------------------------------------------------

cdef uintptr_t old_node(MutatorState *m, int depth) noexcept nogil:
    """The node ``depth`` levels down a random path of the old tree, or 0
    (a freed node on the way: a violation)."""
    cdef uintptr_t node = own_root(m, OLD)
    cdef uint64_t path = next_random(&m.rng)
    cdef int level
    for level in range(depth):
        if not still_object(m, node):
            return 0
        node = heap_load(<uint64_t *>node + 1 + ((path >> level) & 1))
    return node if still_object(m, node) else 0


cdef bint promote(MutatorState *m) noexcept nogil:
    """Store a new leaf into a bottom node of the old tree: the leaf it
    replaces becomes old garbage. False once stopped."""
    cdef uintptr_t parent = old_node(m, m.work.old_depth - 1), leaf
    if parent == 0:
        return True
    leaf = allocate(m)              # polls: parent hangs from the old tree
    if leaf == 0:
        return False
    store(m, parent, next_random(&m.rng) & 1, leaf)
    m.old_stores += 1
    return True


cdef void swap_subtrees(MutatorState *m) noexcept nogil:
    """Swap two subtrees of the old tree whose roots lie at the same random
    depth: two stores of existing objects into old ones, and the tree stays
    perfect (two distinct nodes of one depth are never each other's ancestors)."""
    cdef int depth = 1 + next_random(&m.rng) % m.work.old_depth
    cdef uintptr_t x = old_node(m, depth - 1), y = old_node(m, depth - 1), a, b
    cdef uint64_t bits = next_random(&m.rng)
    cdef size_t s = bits & 1, t = (bits >> 1) & 1
    if x == 0 or y == 0 or (x == y and s == t):
        return
    a = heap_load(<uint64_t *>x + 1 + s)
    b = heap_load(<uint64_t *>y + 1 + t)
    store(m, x, s, b)
    store(m, y, t, a)
    m.old_stores += 2


cdef bint gcold_setup(MutatorState *m) noexcept nogil:
    return build_top_down(m, OLD, m.work.old_depth)


cdef bint gcold_step(MutatorState *m) noexcept nogil:
    """alloc_per_step short-lived objects (a list, dropped at the end); after
    each, old_store_ratio stores into the old tree are due: a share
    ``promotion`` of them store a new leaf, the others swap subtrees."""
    cdef size_t _i
    for _i in range(m.work.alloc_per_step):
        if not prepend(m, YOUNG):
            return False
        m.old_store_credit += m.work.old_store_ratio
        while m.old_store_credit >= 1.0:
            if chance(m, m.work.promotion_threshold):
                if not promote(m):
                    return False
                m.old_store_credit -= 1.0
            else:
                swap_subtrees(m)
                m.old_store_credit -= 2.0
    set_own_root(m, YOUNG, 0)
    return True


# ---- the thread -------------------------------------------------------------------------

cdef bint rewire_set_up(MutatorState *m) noexcept nogil:
    return True


cdef bint rewire_work_unit(MutatorState *m) noexcept nogil:
    mutate_once(m)
    return True


cdef void choose_workload(MutatorState *m, Kind kind) noexcept:
    """Each workload: a set-up, then work units; both return False when the
    thread was told to stop in the middle."""
    if kind == GCBENCH:
        m.set_up, m.work_unit = gcbench_setup, gcbench_step
    elif kind == GCOLD:
        m.set_up, m.work_unit = gcold_setup, gcold_step
    elif kind == BINARY_TREES:
        m.set_up, m.work_unit = binary_trees_setup, binary_trees_step
    else:
        m.set_up, m.work_unit = rewire_set_up, rewire_work_unit


cdef void cpu_clock_begin(MutatorState *m) noexcept nogil:
    pthread_mutex_lock(m.cpu_lock)
    m.cpu_clock_live = pthread_getcpuclockid(pthread_self(), &m.cpu_clock) == 0
    pthread_mutex_unlock(m.cpu_lock)


cdef void cpu_clock_end(MutatorState *m) noexcept nogil:
    """Fold this thread's CPU time into cpu_seconds_done as it leaves."""
    cdef timespec ts
    pthread_mutex_lock(m.cpu_lock)
    if clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0:
        m.cpu_seconds_done += ts.tv_sec + ts.tv_nsec * 1e-9
    m.cpu_clock_live = False
    pthread_mutex_unlock(m.cpu_lock)


cdef void *mutator_main(void *arg) noexcept nogil:
    cdef MutatorState *m = <MutatorState *>arg
    cdef Safepoint *sp = &m.heap.safepoint
    cdef timespec pause
    cpu_clock_begin(m)
    safepoint_enter(sp, m.registered, m.running)
    m.depth = m.phase = 0                     # the schedules start again
    m.iteration = 0
    m.old_store_credit = 0.0
    cdef bint going = m.set_up(m)
    cdef double next_at = monotonic_seconds()
    while going:
        safepoint_poll(sp, m.running)
        if stopping(m) or not m.work_unit(m):
            break
        m.work_units += 1
        if m.interval > 0:
            next_at += m.interval
            while monotonic_seconds() < next_at and gct_mut_load(m.running):
                pause.tv_sec = 0
                pause.tv_nsec = 50000
                safepoint_poll(sp, m.running)
                nanosleep(&pause, NULL)
    safepoint_leave(sp)
    cpu_clock_end(m)
    return NULL


# ---- parameters ---------------------------------------------------------------------------

cdef int deepest_tree(object objects):
    """The deepest perfect binary tree of at most ``objects`` nodes (0 at least)."""
    return max(0, min(MAX_DEPTH, (max(objects, 1) + 1).bit_length() - 2))


cdef object take_integer(dict given, str key, object default, object low, object high):
    value = given.pop(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{key} must be an integer, got {type(value).__name__}")
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{key} must be in {low}..{high}, got {value}")
    return value


cdef double take_real(dict given, str key, object default, double low, double high,
                      bint low_open=False) except? -1.0:
    value = given.pop(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{key} must be a number, got {type(value).__name__}")
    cdef double number = float(value)
    if not (low < number <= high if low_open else low <= number <= high) or not math.isfinite(number):
        raise ValueError(f"{key} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")
    return number


cdef dict resolve_params(object workload, object params, size_t objects, size_t threads):
    """The workload's parameters, checked, with the defaults filled in.

    Defaults scale with the heap: the structures that a workload keeps
    reachable fit in LIVE_SHARE of the heap's objects, shared by the threads.
    A default that depends on another parameter follows the value given."""
    if not isinstance(workload, str):
        raise TypeError(f"workload must be a str, got {type(workload).__name__}")
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}: choose one of {', '.join(WORKLOADS)}")
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping, got {type(params).__name__}")
    allowed = PARAMETERS[workload]
    unknown = [key for key in params if key not in allowed]
    if unknown:
        raise ValueError(f"unknown {workload} parameter {unknown[0]!r}: allowed are {', '.join(allowed)}")
    cdef dict given = dict(params)
    budget = max(1, int(LIVE_SHARE * objects / threads))       # objects per thread
    fits = deepest_tree(objects)                               # a tree bigger cannot exist
    out = {}
    if workload == "rewire":
        out["locality"] = take_real(given, "locality", 0.0, 0.0, 1.0)
        out["hot_fraction"] = take_real(given, "hot_fraction", 0.01, 0.0, 1.0, True)
    elif workload == "gcold":
        out["alloc_per_step"] = take_integer(given, "alloc_per_step", max(1, min(64, budget // 16)),
                                             1, objects)
        out["old_depth"] = take_integer(given, "old_depth",
                                        max(1, deepest_tree(budget - out["alloc_per_step"])),
                                        1, max(1, fits))
        out["old_store_ratio"] = take_real(given, "old_store_ratio", 0.1, 0.0, 1e9)
        out["promotion"] = take_real(given, "promotion", 0.5, 0.0, 1.0)
    else:                                   # gcbench keeps 3 trees' worth, binary_trees 2
        depth = take_integer(given, "max_depth", deepest_tree(budget // (3 if workload == "gcbench" else 2)),
                             0, fits)
        out["min_depth"] = take_integer(given, "min_depth", min(4, depth), 0, depth)
        out["max_depth"] = depth
        out["long_lived_depth"] = take_integer(given, "long_lived_depth", depth, 0, fits)
        if workload == "gcbench":
            out["array_objects"] = take_integer(given, "array_objects", tree_size(depth), 0, objects)
    return {key: out[key] for key in allowed}


cdef size_t roots_needed(str workload, dict params):
    """The root slots a thread of the workload uses (its shadow stack included)."""
    if workload == "gcbench":
        return GCBENCH_TREE + params["max_depth"] + 1
    if workload == "binary_trees":
        return BINARY_TREE + max(params["max_depth"], params["long_lived_depth"]) + 1
    if workload == "gcold":
        return YOUNG + 1
    return 0


# How long start() waits without the GIL before it checks for signals.
cdef double REGISTER_WAIT_SLICE = 0.05


@cython.no_gc_clear       # the threads use self.heap until __dealloc__ has joined them
cdef class NativeMutators:
    """NativeMutators(heap, *, threads=2, rate=0.0, roots_per_thread=16, seed=1,
                   workload='rewire', params=None, stored_cards=None)
--

``threads`` native threads running ``workload`` (one of WORKLOADS) on
    ``heap``, each on its own, at ``rate`` work units per second each (0:
    unthrottled; ``work_unit`` names the unit). ``params`` sets the
    workload's parameters (PARAMETERS lists them; ``params`` shows them all,
    defaults filled in, scaled to the heap so that what the threads keep
    reachable fits in LIVE_SHARE of it):

    - rewire (operations): ``locality`` (0.0), the share of reference stores
      made into objects on a hot set of pages; ``hot_fraction`` (0.01), the
      share of the allocated extent (its first pages) that forms the hot set;
    - gcbench (trees): ``min_depth``, ``max_depth``, ``long_lived_depth`` and
      ``array_objects`` (the long-lived list's length);
    - gcold (steps): ``old_depth`` (the old tree's depth), ``alloc_per_step``
      (short-lived objects per step), ``old_store_ratio`` (0.1, stores into
      the old tree per short-lived object) and ``promotion`` (0.5, the share
      of those that store a new leaf; the others swap subtrees, two stores);
    - binary_trees (trees): ``min_depth``, ``max_depth``, ``long_lived_depth``.

    From start() to stop() each thread owns ``roots_per_thread`` root slots
    (more if its workload needs them: gcbench and binary_trees keep the
    shadow stack of a bottom-up build there), taken from the heap's free root
    slots and emptied again by stop(). ``pause()``/``resume()`` stop and
    release the heap's native mutators at a safepoint, as a collector does; a
    paused world stays paused through a collect().

    ``stored_cards``, a CardTable covering the heap's arena: every reference
    store into a heap object (not root stores) also sets the card of the slot
    written, atomically, right after the store: the truth to compare a
    tracker's reports with. Read it with the mutators parked.

    In a forked child the threads are the parent's: stop() and dropping the
    object forget them without joining, and start()/pause() are refused.
    """
    cdef Heap heap
    cdef MutatorState *states
    cdef pthread_t *threads
    cdef size_t count              # threads that start() creates
    cdef size_t live_threads       # created and not yet joined
    cdef size_t roots_per_thread   # root slots each thread owns
    cdef Py_ssize_t first_root     # the reserved root run, or -1
    cdef int running
    cdef int registered
    cdef bint paused               # this object's stop of the world is in force
    cdef long owner_pid
    cdef Workload work
    cdef str workload_name
    cdef dict resolved
    cdef CardTable stored          # or None
    cdef pthread_mutex_t cpu_lock
    cdef bint cpu_lock_ready

    def __cinit__(self, Heap heap not None, *, threads=2, rate=0.0, roots_per_thread=16, seed=1,
                  workload="rewire", params=None, stored_cards=None):
        self.first_root = -1
        self.owner_pid = getpid()
        threads = operator.index(threads)
        roots_per_thread = operator.index(roots_per_thread)
        rate = float(rate)
        if threads < 1 or roots_per_thread < 1 or rate < 0:
            raise ValueError("threads and roots_per_thread must be positive, rate >= 0")
        heap.check_open()
        self.resolved = resolve_params(workload, params, heap.core.num_objects, threads)
        self.workload_name = workload
        roots_per_thread = max(roots_per_thread, roots_needed(workload, self.resolved))
        if threads * roots_per_thread > heap.core.max_roots:
            raise ValueError(f"{threads} threads of {roots_per_thread} roots need more than the "
                             f"heap's {heap.core.max_roots} root slots")
        if stored_cards is not None:
            if not isinstance(stored_cards, CardTable):
                raise TypeError(f"stored_cards must be a gctrack.CardTable or None, "
                                f"got {type(stored_cards).__name__}")
            (<CardTable>stored_cards).check_covers(heap.core.base, heap.arena.size)
            self.stored = stored_cards
        self.set_workload(heap.arena.page_size)
        self.heap = heap
        self.count = threads
        self.roots_per_thread = roots_per_thread
        if pthread_mutex_init(&self.cpu_lock, NULL) != 0:
            raise MemoryError()
        self.cpu_lock_ready = True
        self.states = <MutatorState *>calloc(threads, sizeof(MutatorState))
        self.threads = <pthread_t *>calloc(threads, sizeof(pthread_t))
        if self.states == NULL or self.threads == NULL:
            raise MemoryError()
        cdef size_t k
        for k in range(self.count):
            self.states[k].heap = &heap.core
            self.states[k].work = &self.work
            self.states[k].stored_cards = &self.stored.bits if self.stored is not None else NULL
            self.states[k].rng = (seed * SEED_MIX + k + 1) & 0xFFFFFFFFFFFFFFFF or 1
            self.states[k].num_roots = self.roots_per_thread
            self.states[k].interval = 1.0 / rate if rate else 0.0
            self.states[k].running = &self.running
            self.states[k].registered = &self.registered
            self.states[k].cpu_lock = &self.cpu_lock
            choose_workload(&self.states[k], self.work.kind)

    cdef void set_workload(self, size_t page_size) noexcept:
        """The C view of the resolved parameters (absent ones stay 0)."""
        p = self.resolved
        self.work.kind = <Kind><int>WORKLOADS.index(self.workload_name)
        self.work.page_size = page_size
        self.work.hot_threshold = <uint64_t>(p.get("locality", 0.0) * ONE_IN_53_BITS)
        self.work.hot_fraction = p.get("hot_fraction", 0.0)
        self.work.min_depth = p.get("min_depth", 0)
        self.work.max_depth = p.get("max_depth", 0)
        self.work.long_lived_depth = p.get("long_lived_depth", 0)
        self.work.array_objects = p.get("array_objects", 0)
        self.work.old_depth = p.get("old_depth", 0)
        self.work.alloc_per_step = p.get("alloc_per_step", 0)
        self.work.old_store_ratio = p.get("old_store_ratio", 0.0)
        self.work.promotion_threshold = <uint64_t>(p.get("promotion", 0.0) * ONE_IN_53_BITS)

    @property
    def workload(self):
        """The workload's name (one of WORKLOADS)."""
        return self.workload_name

    @property
    def params(self):
        """The workload's parameters, defaults filled in (a new dict)."""
        return dict(self.resolved)

    @property
    def work_unit(self):
        """What stats()["work_units"] counts and ``rate`` paces: "operations"
        (rewire), "trees" (gcbench, binary_trees) or "steps" (gcold)."""
        return WORK_UNITS[self.workload_name]

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
                slice_end = monotonic_seconds() + REGISTER_WAIT_SLICE
                while gct_mut_load(&self.registered) < expected and monotonic_seconds() < slice_end:
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
        rate = f"{1 / interval:,.0f} {self.work_unit}/s each" if interval else "unthrottled"
        return f"<gctrack.NativeMutators {self.count} threads, {self.workload_name}, {rate}, {state}>"

    def stats(self):
        """Totals over the threads, safe to call while they run: ``stores``
        (reference stores into heap objects), ``allocations``, ``root_changes``,
        ``violations`` (reachable objects found freed: must stay 0),
        ``work_units``, ``old_stores`` (gcold: stores into the old tree; 0
        elsewhere), ``alloc_stalls`` (allocations that found the heap full),
        ``stall_seconds`` (spent waiting for them, parked time included) and
        ``cpu_seconds`` (CPU time of the threads, those that left included)."""
        cdef size_t k
        cdef MutatorState *m
        totals = dict.fromkeys(("stores", "allocations", "root_changes", "violations", "work_units",
                                "old_stores", "alloc_stalls"), 0)
        stall_ns = 0
        for k in range(self.count):
            m = &self.states[k]
            totals["stores"] += m.stores
            totals["allocations"] += m.allocations
            totals["root_changes"] += m.root_changes
            totals["violations"] += m.violations
            totals["work_units"] += m.work_units
            totals["old_stores"] += m.old_stores
            totals["alloc_stalls"] += m.alloc_stalls
            stall_ns += m.stall_ns
        totals["stall_seconds"] = stall_ns * 1e-9
        totals["cpu_seconds"] = self.cpu_seconds()
        return totals

    cdef double cpu_seconds(self) noexcept:
        """The threads' CPU time: those gone from their record, the live ones
        from their clocks (under cpu_lock: a thread cannot leave meanwhile)."""
        cdef double total = 0.0
        cdef timespec ts
        cdef size_t k
        cdef bint live = not self.forked()   # a child has no threads, and maybe a stale lock
        if live:
            pthread_mutex_lock(&self.cpu_lock)
        for k in range(self.count):
            total += self.states[k].cpu_seconds_done
            if live and self.states[k].cpu_clock_live and clock_gettime(self.states[k].cpu_clock, &ts) == 0:
                total += ts.tv_sec + ts.tv_nsec * 1e-9
        if live:
            pthread_mutex_unlock(&self.cpu_lock)
        return total

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
        if self.cpu_lock_ready:
            pthread_mutex_destroy(&self.cpu_lock)


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
