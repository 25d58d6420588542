# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Heap: fixed-size objects with reference slots, in a tracked arena (layout in heap.pxd)."""
import operator

import numpy

from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport uint64_t, uintptr_t
from libc.string cimport memset
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from posix.unistd cimport getpid

from gctrack.arena cimport Arena
from gctrack.cards cimport CardBits, CardTable, cards_or
from gctrack.dirtymap cimport gct_bits_load, gct_bits_set
from gctrack.software cimport software_core_of, software_write_barrier
from gctrack.tracker cimport Tracker
from gctrack.threads cimport (pthread_mutex_init, pthread_mutex_destroy, pthread_mutex_lock,
                              pthread_mutex_unlock, pthread_cond_init, pthread_cond_destroy,
                              pthread_cond_broadcast, pthread_cond_wait, pthread_cond_timedwait,
                              pthread_condattr_t, pthread_condattr_init,
                              pthread_condattr_setclock, pthread_condattr_destroy)

from gctrack.errors import HeapFullError, MissedBarrierError
from gctrack.verifier import BarrierVerifier

cdef enum:
    LIVE = 1

#: The header word heap_alloc writes (the sweep never clears it: whether an
#: object is allocated now is in the side bitmap, Heap.allocated()).
HEADER_LIVE = LIVE

#: A missed barrier in heap terms (Heap.missed_barriers, MissedBarrierError.missed).
MISSED_SLOT_DTYPE = numpy.dtype([("object", "<i8"), ("slot", "<i8"), ("address", "<u8"),
                                 ("old", "<u8"), ("new", "<u8")])

ALL_RECORDS = 2**62 - 1

# How long a stopper waits without the GIL before it checks for signals.
cdef long long STOP_WAIT_SLICE_NS = 50 * 1000 * 1000


cdef extern from *:
    """
    static inline int gct_load_int(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void gct_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void gct_increment_int(int *p) { __atomic_add_fetch(p, 1, __ATOMIC_RELEASE); }
    static inline size_t gct_load_size(const size_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void gct_store_size(size_t *p, size_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    """
    int gct_load_int(const int *p) nogil
    void gct_store_int(int *p, int v) nogil
    void gct_increment_int(int *p) nogil
    size_t gct_load_size(const size_t *p) nogil
    void gct_store_size(size_t *p, size_t v) nogil


cdef extern from *:
    """
    static inline uint64_t gct_fetch_and_clear(uint64_t *word, uint64_t mask) {
        return __atomic_fetch_and(word, ~mask, __ATOMIC_ACQ_REL);
    }
    """
    uint64_t fetch_and_clear "gct_fetch_and_clear"(uint64_t *word, uint64_t mask) nogil
    int popcount64 "__builtin_popcountll"(unsigned long long x) nogil


# ---- allocation and stores ----------------------------------------------------

cdef uintptr_t heap_alloc(HeapCore *h) noexcept nogil:
    """A zeroed, allocated object (born marked while a cycle is on), or 0 when full."""
    cdef uint64_t index
    cdef uint64_t *obj
    pthread_mutex_lock(&h.alloc_lock)
    if h.free_count == 0:
        pthread_mutex_unlock(&h.alloc_lock)
        return 0
    h.free_count -= 1
    index = h.free_list[h.free_count]
    if index >= h.high_water:
        gct_store_size(&h.high_water, index + 1)
    if h.allocate_marked:
        gct_bits_set(h.marks, index)
    obj = <uint64_t *>(h.base + (index << h.object_shift))
    memset(obj + 1, 0, h.slots * sizeof(uint64_t))
    heap_publish(obj, LIVE)
    gct_bits_set(h.allocated, index)      # RELEASE, after the zeroed slots (see heap.pxd)
    pthread_mutex_unlock(&h.alloc_lock)
    return <uintptr_t>obj


cdef void settle_stores(const CardBits *reported, CardBits *stored, uint64_t *counts) noexcept nogil:
    """One pass's accounting for card_counts: count the cards it reported
    (counts[1]) and, of them, those a store marked in ``stored`` since they
    were last reported (counts[2]), clearing those marks atomically (the
    mutators set marks meanwhile). Same geometry; a word at a time."""
    cdef size_t w
    cdef uint64_t bits
    for w in range(reported.num_words):
        bits = reported.words[w]
        if bits:
            counts[1] += popcount64(bits)
            counts[2] += popcount64(fetch_and_clear(&stored.words[w], bits) & bits)
    counts[0] += 1


cdef uintptr_t heap_extent_end(const HeapCore *h, size_t align) noexcept nogil:
    """base + the bytes of every object ever allocated, rounded up to
    ``align`` (a power of two: the page or card size) and clipped to the
    arena. Pages past it were armed when the heap was made and never written
    by an allocation since, so a pass that skips them loses nothing: once the
    extent grows over a written page, the next pass reports it."""
    cdef uintptr_t bytes = gct_load_size(&h.high_water) << h.object_shift
    cdef uintptr_t arena = h.num_objects << h.object_shift
    bytes = (bytes + align - 1) & ~(<uintptr_t>align - 1) if bytes else align   # a pass walks >= 1 page
    return h.base + (bytes if bytes < arena else arena)


cdef bint heap_is_object(const HeapCore *h, uintptr_t addr) noexcept nogil:
    """addr is the start of an allocated object."""
    if addr < h.base or addr >= h.base + (h.num_objects << h.object_shift):
        return False
    if (addr - h.base) & (h.object_size - 1):
        return False
    return heap_is_allocated(h, (addr - h.base) >> h.object_shift)


cdef bint heap_is_allocated(const HeapCore *h, size_t index) noexcept nogil:
    """Object ``index`` is allocated (an ACQUIRE load of its bit)."""
    return (gct_bits_load(&h.allocated[index >> 6]) >> (index & 63)) & 1


cdef void heap_store(HeapCore *h, uintptr_t obj, size_t slot, uintptr_t target) noexcept nogil:
    """The mutator's reference store, with the card-marking barrier when software."""
    cdef uint64_t *field = <uint64_t *>obj + 1 + slot
    heap_publish(field, target)
    if h.barrier != NULL:
        software_write_barrier(h.barrier, <uintptr_t>field)


# ---- the safepoint handshake -----------------------------------------------------

cdef void park_while_stopped(Safepoint *sp, const int *running) noexcept nogil:
    """With sp.lock held: count as parked and wait while a stop is in force
    (and the caller still runs). Returns with sp.lock held."""
    if not sp.stop_requests or not gct_load_int(running):
        return
    sp.parked += 1
    pthread_cond_broadcast(&sp.parked_changed)
    while sp.stop_requests and gct_load_int(running):
        pthread_cond_wait(&sp.resumed, &sp.lock)
    sp.parked -= 1


cdef void safepoint_enter(Safepoint *sp, int *joined, const int *running) noexcept nogil:
    """A mutator thread joins, then adds 1 to *joined. In a stopped world it
    joins parked (a stopper never waits for it) and returns once the world
    resumes or *running drops to 0."""
    pthread_mutex_lock(&sp.lock)
    sp.mutators += 1
    gct_increment_int(joined)
    park_while_stopped(sp, running)
    pthread_mutex_unlock(&sp.lock)


cdef void safepoint_leave(Safepoint *sp) noexcept nogil:
    pthread_mutex_lock(&sp.lock)
    sp.mutators -= 1
    pthread_cond_broadcast(&sp.parked_changed)
    pthread_mutex_unlock(&sp.lock)


cdef void safepoint_poll(Safepoint *sp, const int *running) noexcept nogil:
    """Called by mutators between operations: park while the world is stopped
    (unless told to quit: check *running after it returns)."""
    if not gct_load_int(&sp.stop_requests):
        return
    pthread_mutex_lock(&sp.lock)
    park_while_stopped(sp, running)
    pthread_mutex_unlock(&sp.lock)


cdef void safepoint_request_stop(Safepoint *sp) noexcept nogil:
    """Add a stop: mutators park at their next poll (see safepoint_wait_parked)."""
    pthread_mutex_lock(&sp.lock)
    gct_store_int(&sp.stop_requests, sp.stop_requests + 1)
    pthread_mutex_unlock(&sp.lock)


cdef void deadline_in(timespec *deadline, long long ns) noexcept nogil:
    clock_gettime(CLOCK_MONOTONIC, deadline)
    ns += deadline.tv_nsec
    deadline.tv_sec += ns // 1000000000
    deadline.tv_nsec = ns % 1000000000


cdef bint safepoint_wait_parked(Safepoint *sp, long long timeout_ns) noexcept nogil:
    """Wait up to timeout_ns for every registered mutator to park; whether they did."""
    cdef timespec deadline
    cdef bint all_parked
    deadline_in(&deadline, timeout_ns)
    pthread_mutex_lock(&sp.lock)
    while sp.parked < sp.mutators:
        if pthread_cond_timedwait(&sp.parked_changed, &sp.lock, &deadline) != 0:
            break                     # ETIMEDOUT
    all_parked = sp.parked >= sp.mutators
    pthread_mutex_unlock(&sp.lock)
    return all_parked


cdef void safepoint_resume_world(Safepoint *sp) noexcept nogil:
    """Withdraw one stop; the mutators run again when none is left."""
    pthread_mutex_lock(&sp.lock)
    gct_store_int(&sp.stop_requests, sp.stop_requests - 1)
    if sp.stop_requests == 0:
        pthread_cond_broadcast(&sp.resumed)
    pthread_mutex_unlock(&sp.lock)


cdef void safepoint_wake_parked(Safepoint *sp) noexcept nogil:
    """Let parked mutators re-check their *running flag (after it was cleared)."""
    pthread_mutex_lock(&sp.lock)
    pthread_cond_broadcast(&sp.resumed)
    pthread_mutex_unlock(&sp.lock)


def checked_verify_mode(verify_barriers, backend):
    """None (off), "raise" or "record", from Heap's verify_barriers."""
    if verify_barriers is False or verify_barriers is None:
        return None
    mode = "raise" if verify_barriers is True else verify_barriers
    if mode not in ("raise", "record"):
        raise ValueError(f'verify_barriers must be False, True, "raise" or "record", '
                         f"got {verify_barriers!r}")
    if getattr(backend, "name", backend) != "software":
        raise ValueError(f"verify_barriers needs backend='software', not {backend!r}: "
                         "the kernel backends see every store without a barrier")
    return mode


# ---- the Python face ------------------------------------------------------------------

cdef class Heap:
    """Heap(size, *, object_size=64, backend='auto', card_size=512, max_roots=1024, verify_barriers=False)
--

Fixed-size objects in a tracked Arena; see heap.pxd for the layout.

    Hold the objects you use through roots: like any collector, this one
    frees whatever the roots cannot reach. ``verify_barriers`` (True or
    "raise", or "record"; backend "software" only) checks the write barrier
    at every remark with a BarrierVerifier: "raise" raises
    MissedBarrierError and abandons the cycle before its sweep, "record"
    appends to ``missed_barriers``. After ``close()`` (or once its
    tracker or arena is closed) every method raises ValueError.
    """

    def __cinit__(self, size, *, object_size=64, backend="auto", card_size=512, max_roots=1024,
                  verify_barriers=False):
        self.verify_mode = checked_verify_mode(verify_barriers, backend)
        object_size = operator.index(object_size)
        if object_size < 16 or object_size & (object_size - 1):
            raise ValueError(f"object_size must be a power of two >= 16, got {object_size}")
        max_roots = operator.index(max_roots)
        if max_roots < 1:
            raise ValueError(f"max_roots must be positive, got {max_roots}")
        self.arena = Arena(size)
        self.arena.prefault()                 # first touch is slow; not the collector's cost
        CardTable.for_arena(self.arena, card_size)    # validates card_size
        self.card_size = card_size
        self.tracker = Tracker(self.arena, backend=backend)
        if not self.tracker.backend_object.atomic_passes:
            self.tracker.close()
            raise ValueError(f"{self.tracker.backend} passes are not atomic: precleaning beside "
                             "running mutators would lose stores")
        self.tracker.reserve_for(&self.core)   # its passes are the collector's alone
        self.owner_pid = getpid()
        cdef HeapCore *h = &self.core
        h.base = <uintptr_t>self.arena.base
        h.object_size = object_size
        h.object_shift = object_size.bit_length() - 1
        h.num_objects = self.arena.size >> h.object_shift
        h.slots = object_size // 8 - 1
        self.marks_array = numpy.zeros((h.num_objects + 63) // 64, dtype=numpy.uint64)
        self.allocated_array = numpy.zeros((h.num_objects + 63) // 64, dtype=numpy.uint64)
        self.free_array = numpy.arange(h.num_objects - 1, -1, -1, dtype=numpy.uint64)
        self.roots_array = numpy.zeros(max_roots, dtype=numpy.uint64)
        self.reserved_roots = numpy.zeros(max_roots, dtype=bool)
        cdef uint64_t[::1] marks = self.marks_array, free = self.free_array, roots = self.roots_array
        cdef uint64_t[::1] allocated = self.allocated_array
        h.marks = &marks[0]
        h.allocated = &allocated[0]
        h.free_list = &free[0]
        h.free_count = h.num_objects
        h.roots = &roots[0]
        h.max_roots = max_roots
        h.barrier = software_core_of(self.tracker.core.backend)
        cdef pthread_condattr_t monotonic
        pthread_mutex_init(&h.alloc_lock, NULL)
        pthread_mutex_init(&h.safepoint.lock, NULL)
        pthread_condattr_init(&monotonic)
        pthread_condattr_setclock(&monotonic, CLOCK_MONOTONIC)
        pthread_cond_init(&h.safepoint.parked_changed, &monotonic)     # timed waits
        pthread_condattr_destroy(&monotonic)
        pthread_cond_init(&h.safepoint.resumed, NULL)
        self.ready = True
        self.missed_batches = []
        if self.verify_mode is not None:
            self.arm_verifier()

    cdef int arm_verifier(self) except -1:
        """The verifier of verify_barriers; on failure the heap lets go of its tracker."""
        try:
            self.barrier_cards = CardTable.for_arena(self.arena, self.card_size)
            self.verifier = BarrierVerifier(self.arena, self.barrier_cards)
        except BaseException:
            self.tracker.release_reservation()
            self.tracker.close()
            raise
        return 0

    cdef int note_dirty_cards(self, CardTable cards) except -1:
        """The collector reports each pass's cards: what the barrier marked,
        and what reported_cards accumulates."""
        if self.verifier is not None:
            cards_or(&self.barrier_cards.bits, &cards.bits)
        if self.reported is not None:
            cards_or(&self.reported.bits, &cards.bits)
        if self.stored is not None:
            settle_stores(&cards.bits, &self.stored.bits, self.settled)
        return 0

    cdef int check_covers_arena(self, CardTable cards, str name) except -1:
        if cards is not None and (cards.bits.base != self.core.base
                                  or cards.bits.size != self.arena.size
                                  or cards.card_size != self.card_size):
            raise ValueError(f"{name} must cover the heap's arena with {self.card_size} B "
                             f"cards, got {cards!r}")
        return 0

    @property
    def reported_cards(self):
        """None, or a CardTable over the heap's arena with its card size, into
        which every tracking pass of a Collector ORs the cards it reported:
        their union since it was set (a measure of the tracking's precision).
        Set it to None to stop."""
        return self.reported

    @reported_cards.setter
    def reported_cards(self, CardTable cards):
        self.check_covers_arena(cards, "reported_cards")
        self.reported = cards

    @property
    def stored_cards(self):
        """None, or the CardTable over the heap's arena (with its card size) in
        which the mutators mark the card of every reference store
        (NativeMutators(stored_cards=...)). While it is set, every collector
        pass counts in card_counts the cards it reported and, of them, those
        marked here since they were last reported, and clears those marks: what
        is left marked was stored and not reported since. Setting it zeroes
        card_counts."""
        return self.stored

    @stored_cards.setter
    def stored_cards(self, CardTable cards):
        self.check_covers_arena(cards, "stored_cards")
        self.stored = cards
        self.settled[0] = self.settled[1] = self.settled[2] = 0

    @property
    def card_counts(self):
        """Totals since stored_cards was set: ``passes``, ``reported`` (cards,
        summed over the passes) and ``stored`` (of those, cards a reference
        store marked since they were last reported). stored / reported is the
        tracking's precision at the collector's own intervals."""
        return {"passes": self.settled[0], "reported": self.settled[1],
                "stored": self.settled[2]}

    cdef int verify_barriers_at_remark(self) except -1:
        """With the world stopped: judge the stores since the last remark.
        Headers (allocation writes them without a barrier) and stores of 0 (which
        cannot hide an object from the marker) need no barrier here."""
        if self.verifier is None:
            return 0
        # Every record is kept: allocation changes headers
        # without a barrier, and a capped report could crowd out real misses.
        report = self.verifier.check(clear=True, max_missed=ALL_RECORDS)
        if report:
            return 0
        missed = report.missed
        offset = missed["address"] - numpy.uint64(self.core.base)
        word = (offset & numpy.uint64(self.core.object_size - 1)) >> numpy.uint64(3)
        keep = (word != 0) & (missed["new"] != 0)
        slots = numpy.empty(int(keep.sum()), dtype=MISSED_SLOT_DTYPE)
        slots["object"] = offset[keep] >> numpy.uint64(self.core.object_shift)
        slots["slot"] = word[keep].astype(numpy.int64) - 1
        for field in ("address", "old", "new"):
            slots[field] = missed[field][keep]
        if slots.size == 0:
            return 0
        if self.verify_mode == "record":
            self.missed_batches.append(slots)
            return 0
        raise MissedBarrierError(slots)

    @property
    def verify_barriers(self):
        """"raise", "record", or False (see Heap)."""
        return self.verify_mode or False

    @property
    def missed_barriers(self):
        """Every missed barrier recorded (verify_barriers="record"), as a
        MISSED_SLOT_DTYPE array in the order found."""
        if not self.missed_batches:
            return numpy.empty(0, dtype=MISSED_SLOT_DTYPE)
        return numpy.concatenate(self.missed_batches)

    def __dealloc__(self):
        if self.ready:
            pthread_mutex_destroy(&self.core.alloc_lock)
            pthread_mutex_destroy(&self.core.safepoint.lock)
            pthread_cond_destroy(&self.core.safepoint.parked_changed)
            pthread_cond_destroy(&self.core.safepoint.resumed)

    @property
    def closed(self):
        """close() was called, or the heap's tracker or arena was closed."""
        return self.closed_by_user or self.tracker.closed or self.arena.closed

    cdef int check_open(self) except -1:
        if self.closed:
            raise ValueError("heap is closed")
        return 0

    cdef uintptr_t checked_object(self, object obj, str what) except 0:
        self.check_open()
        obj = operator.index(obj)
        if obj <= 0 or not heap_is_object(&self.core, obj):
            raise ValueError(f"{what} {obj:#x} is not an allocated object of this heap")
        return obj

    cdef size_t checked_slot(self, object slot) except? 0:
        slot = operator.index(slot)
        if not 0 <= slot < <long>self.core.slots:
            raise ValueError(f"slot {slot} is not in 0..{self.core.slots - 1}")
        return slot

    cdef Py_ssize_t reserve_root_run(self, size_t count) except -1:
        """Reserve ``count`` consecutive empty root slots for native mutators
        (add_root() skips them); returns the first."""
        self.check_open()
        unused = (self.roots_array == 0) & ~self.reserved_roots
        if count > <size_t>unused.size:
            raise ValueError(f"the heap has only {unused.size} root slots, {count} wanted")
        runs = numpy.flatnonzero(
            numpy.lib.stride_tricks.sliding_window_view(unused, count).all(axis=1))
        if runs.size == 0:
            raise ValueError(f"the heap has no {count} consecutive free root slots")
        first = int(runs[0])
        self.reserved_roots[first:first + count] = True
        return first

    cdef void release_root_run(self, size_t first, size_t count) noexcept:
        """Empty and unreserve root slots that reserve_root_run() gave out;
        their mutators must be gone."""
        self.roots_array[first:first + count] = 0
        self.reserved_roots[first:first + count] = False

    cdef int stop_world(self) except -1:
        """Return once every native mutator is parked. Stops nest: the world
        runs again after the last resume_world(). The wait drops the GIL in
        short slices and checks for signals between them; an exception
        (Ctrl-C) withdraws this stop and propagates."""
        cdef Safepoint *sp = &self.core.safepoint
        cdef bint stopped = False
        safepoint_request_stop(sp)
        try:
            while not stopped:
                with nogil:
                    stopped = safepoint_wait_parked(sp, STOP_WAIT_SLICE_NS)
                if not stopped:
                    PyErr_CheckSignals()
        except BaseException:
            safepoint_resume_world(sp)
            raise
        return 0

    cdef void resume_world(self) noexcept:
        """Withdraw one stop_world()."""
        safepoint_resume_world(&self.core.safepoint)

    @property
    def object_size(self):
        return self.core.object_size

    @property
    def slots(self):
        """Reference slots per object."""
        return self.core.slots

    @property
    def num_objects(self):
        return self.core.num_objects

    @property
    def base(self):
        return self.core.base

    @property
    def backend(self):
        return self.tracker.backend

    @property
    def free_count(self):
        return self.core.free_count

    @property
    def live_count(self):
        """Allocated objects (reachable or not yet swept)."""
        return self.core.num_objects - self.core.free_count

    @property
    def mutator_threads(self):
        """Native mutator threads registered at the heap's safepoint."""
        return gct_load_int(&self.core.safepoint.mutators)

    def alloc(self, *, root=False):
        """A new object's address; HeapFullError when no object is free.

        An address held only in a Python variable is not a root: a cycle
        that starts before you link the object into the graph frees it. With
        ``root=True`` the object is rooted before any cycle can see it (the
        GIL is held throughout, and the collector's remark needs it).
        """
        self.check_open()
        slot = self.free_root_slot() if root else -1
        cdef uintptr_t obj = heap_alloc(&self.core)     # quick: keeps the GIL on purpose
        if obj == 0:
            raise HeapFullError(f"all {self.core.num_objects} objects are allocated")
        if root:
            self.roots_array[slot] = obj
        return obj

    def free_root_slot(self):
        """The first root slot that is empty and not reserved by mutators."""
        self.check_open()
        free = numpy.flatnonzero((self.roots_array == 0) & ~self.reserved_roots)
        if free.size == 0:
            raise ValueError(f"all {self.core.max_roots} root slots are in use")
        return int(free[0])

    def set_ref(self, obj, slot, target):
        """Store ``target`` (an object, or 0) into reference slot ``slot`` of ``obj``."""
        cdef uintptr_t o = self.checked_object(obj, "obj")
        cdef size_t index = self.checked_slot(slot)
        target = operator.index(target)
        cdef uintptr_t t = 0 if target == 0 else self.checked_object(target, "target")
        heap_store(&self.core, o, index, t)

    def get_ref(self, obj, slot):
        cdef uintptr_t o = self.checked_object(obj, "obj")
        cdef size_t index = self.checked_slot(slot)
        return heap_load(<uint64_t *>o + 1 + index)

    def add_root(self, obj):
        """Make ``obj`` a root; returns its root slot."""
        cdef uintptr_t o = self.checked_object(obj, "root")
        slot = self.free_root_slot()
        self.roots_array[slot] = o
        return slot

    def remove_root(self, obj):
        """Stop rooting ``obj`` (one slot of it)."""
        self.check_open()
        obj = operator.index(obj)
        where = numpy.flatnonzero(self.roots_array == obj)
        if where.size == 0 or obj == 0:
            raise ValueError(f"{obj:#x} is not a root")
        self.roots_array[where[0]] = 0

    def roots(self):
        """The rooted object addresses."""
        self.check_open()
        return [int(r) for r in self.roots_array if r]

    @property
    def root_slots(self):
        """The live uint64 array of root slots (0 = empty)."""
        self.check_open()
        return self.roots_array

    def view(self):
        """The heap as a live (num_objects, object_size / 8) uint64 array:
        column 0 is the header (HEADER_LIVE once allocated, never cleared;
        allocated() says which objects are allocated now), the others are
        reference slots."""
        self.check_open()
        return self.arena.view(numpy.uint64).reshape(self.core.num_objects, self.core.object_size // 8)

    def allocated(self):
        """Indices of the allocated objects, ascending (read from the side
        bitmap: a freed object keeps its header)."""
        self.check_open()
        bits = numpy.unpackbits(self.allocated_array.view(numpy.uint8), bitorder="little")
        return numpy.flatnonzero(bits[:self.core.num_objects])

    def close(self):
        """Disarm and unmap; idempotent. Refused while native mutators or a
        cycle use the heap. (In a forked child the parent's mutator threads
        do not exist, and do not count.)"""
        if self.closed_by_user:
            return
        if self.collecting or self.reserved_roots.any() or (
                getpid() == self.owner_pid and gct_load_int(&self.core.safepoint.mutators)):
            raise RuntimeError("native mutators or a collection still use this heap: stop them first")
        self.closed_by_user = True
        if self.verifier is not None:
            self.verifier.close()
        self.tracker.release_reservation()     # the heap lets go of its tracker
        self.tracker.close()
        self.arena.close()

    def __enter__(self):
        self.check_open()
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else f"{self.live_count} live"
        return (f"<gctrack.Heap {self.core.num_objects} objects of {self.core.object_size} B, "
                f"{state}, backend {self.tracker.backend}>")
