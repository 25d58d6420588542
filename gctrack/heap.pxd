# cython: language_level=3
"""The object heap a collector manages: fixed-size objects in a tracked arena.

Layout (documented for tools that read the heap with numpy): object i lives
at base + i * object_size; word 0 is its header, which heap_alloc sets to
HEADER_LIVE and nothing clears: it says the object was allocated once, not
that it is allocated now; words 1 .. object_size / 8 - 1 are reference
slots holding the address of an object, or 0. Whether an object is
allocated lives in a side bitmap (HeapCore.allocated, Heap.allocated()), as
do the mark bits, the free list and the roots: the collector never writes
into the tracked arena, so neither marking nor sweeping faults or dirties
a card.

Memory ordering: the marker reads objects while mutators allocate and store.
heap_alloc zeroes an object's slots and header, then sets its allocated bit
with RELEASE;
every reference a mutator stores (slot or root) is a RELEASE store
(heap_publish); the marker and the mutators load headers, slots and roots
with ACQUIRE (heap_load, heap_is_object). So whoever sees an object's address or
allocated bit also sees its zeroed slots, even on weakly ordered CPUs (aarch64). On x86 these
are plain moves.
"""
from libc.stdint cimport uint64_t, uintptr_t
from gctrack.arena cimport Arena
from gctrack.cards cimport CardTable
from gctrack.software cimport SoftwareCore
from gctrack.tracker cimport Tracker
from gctrack.threads cimport pthread_mutex_t, pthread_cond_t


cdef extern from *:
    """
    static inline uint64_t gct_heap_load(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void gct_heap_publish(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    """
    # A header, slot or root word, as the marker or a mutator reads it.
    uint64_t heap_load "gct_heap_load" (const uint64_t *p) nogil
    # A header, slot or root word, as a mutator (or heap_alloc) writes it.
    void heap_publish "gct_heap_publish" (uint64_t *p, uint64_t v) nogil


ctypedef struct Safepoint:
    # The stop-the-world handshake between stoppers (a collector, a user's
    # NativeMutators.pause()) and native mutator threads. Stops nest: the
    # world runs again when the last stop is withdrawn.
    pthread_mutex_t lock
    pthread_cond_t parked_changed   # a mutator parked or left: stoppers re-check (CLOCK_MONOTONIC)
    pthread_cond_t resumed          # the last stop was withdrawn, or mutators were told to quit
    int stop_requests               # stops in force; mutators' polls read it without the lock (atomic)
    int mutators                    # registered mutator threads
    int parked                      # of those, how many wait at a safepoint


ctypedef struct HeapCore:
    uintptr_t base
    size_t object_size
    unsigned object_shift
    size_t num_objects
    size_t slots                    # reference slots per object
    uint64_t *marks                 # one mark bit per object (atomic)
    uint64_t *allocated             # one bit per allocated object (atomic; changed under alloc_lock)
    uint64_t *free_list             # indices of free objects (a stack)
    size_t free_count
    size_t high_water               # objects ever allocated lie below it (atomic; never shrinks)
    pthread_mutex_t alloc_lock      # guards free_list and allocate_marked
    bint allocate_marked            # a cycle is on: new objects are born marked
    uint64_t *roots                 # root slots: an object address, or 0
    size_t max_roots
    SoftwareCore *barrier           # the inline card-marking barrier, or NULL
    Safepoint safepoint


cdef uintptr_t heap_alloc(HeapCore *h) noexcept nogil
# The end of the allocated extent, page-aligned: no object was ever allocated
# past it, so the collector's passes need not walk further (see heap_extent_end).
cdef uintptr_t heap_extent_end(const HeapCore *h, size_t align) noexcept nogil
cdef bint heap_is_object(const HeapCore *h, uintptr_t addr) noexcept nogil
cdef bint heap_is_allocated(const HeapCore *h, size_t index) noexcept nogil
cdef void heap_store(HeapCore *h, uintptr_t obj, size_t slot, uintptr_t target) noexcept nogil

# Mutator threads: enter once, poll between operations, leave at the end.
# A mutator parks while a stop is in force and *running is non-zero.
cdef void safepoint_enter(Safepoint *sp, int *joined, const int *running) noexcept nogil
cdef void safepoint_poll(Safepoint *sp, const int *running) noexcept nogil
cdef void safepoint_leave(Safepoint *sp) noexcept nogil
# Stoppers (Heap.stop_world() is the interruptible way to stop from Python).
cdef void safepoint_request_stop(Safepoint *sp) noexcept nogil
cdef bint safepoint_wait_parked(Safepoint *sp, long long timeout_ns) noexcept nogil
cdef void safepoint_resume_world(Safepoint *sp) noexcept nogil
cdef void safepoint_wake_parked(Safepoint *sp) noexcept nogil


cdef class Heap:
    cdef HeapCore core
    cdef readonly Arena arena
    cdef readonly Tracker tracker
    cdef readonly size_t card_size
    cdef object marks_array, free_array, roots_array, allocated_array    # own the side memory
    cdef readonly object reserved_roots                  # bool per root slot: add_root skips it
    cdef bint ready
    cdef bint closed_by_user                             # close() was called
    cdef long owner_pid                                  # the process whose threads use the safepoint
    cdef public bint collecting                          # a Collector cycle is running
    # verify_barriers: a BarrierVerifier judged against every card the
    # collector's passes reported since its last check (at each remark)
    cdef readonly object verifier                        # or None
    cdef CardTable barrier_cards
    cdef str verify_mode                                 # "raise" or "record"
    cdef list missed_batches
    cdef CardTable reported              # reported_cards: every pass's cards ORed in, or None
    cdef CardTable stored                # stored_cards: the mutators' marks, settled at each pass
    cdef uint64_t settled[3]             # card_counts: passes, reported, stored

    cdef int check_open(self) except -1
    cdef uintptr_t checked_object(self, object obj, str what) except 0
    cdef size_t checked_slot(self, object slot) except? 0
    cdef Py_ssize_t reserve_root_run(self, size_t count) except -1
    cdef void release_root_run(self, size_t first, size_t count) noexcept
    cdef int stop_world(self) except -1
    cdef void resume_world(self) noexcept
    cdef int arm_verifier(self) except -1
    cdef int note_dirty_cards(self, CardTable cards) except -1
    cdef int check_covers_arena(self, CardTable cards, str name) except -1
    cdef int verify_barriers_at_remark(self) except -1
