# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""BarrierVerifier: the kernel's record of what was written, as ground truth
for a runtime's software write barrier.

The verifier arms pagemap_scan on the arena (beside the runtime's software
tracker, if any) and keeps a snapshot of it. A check takes the pages the
kernel reports written, compares their 8-byte words with the snapshot, and
reports every changed word whose card the runtime's barrier did not mark.
Only reported pages are compared and re-copied: a check costs in proportion
to the pages written, not to the arena.
"""
import operator

import numpy

from libc.errno cimport errno, EBADF, ECHILD, EINVAL
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport realloc, free
from libc.string cimport memcpy, memset
from posix.mman cimport mmap, munmap, MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_READ, PROT_WRITE
from posix.unistd cimport getpid

from gctrack.clock cimport monotonic_seconds
from gctrack.arena cimport Arena
from gctrack.backend cimport PassCounts, RegionSink
from gctrack.cards cimport CardBits, CardTable, cards_clear_range
from gctrack.linux cimport gct_page_region
from gctrack.threads cimport (pthread_mutex_init, pthread_mutex_destroy, pthread_mutex_lock,
                              pthread_mutex_unlock)

from gctrack.errors import TrackerError
from gctrack.pagemap_scan import PagemapScanBackend

#: The layout of a missed store (struct gct_missed_store in gctrack.h).
MISSED_DTYPE = numpy.dtype([("address", "<u8"), ("old", "<u8"), ("new", "<u8")])
#: Missed stores a check returns by default; more are counted, not kept.
DEFAULT_MAX_MISSED = 1 << 20

cdef extern from *:
    """
    static inline uint64_t gct_load_word(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    """
    uint64_t load_word "gct_load_word"(const uint64_t *p) nogil


# ---- the comparison: a sink for the kernel's pass -------------------------------

ctypedef struct Comparison:
    VerifierCore *v
    MissedBuffer *out
    VerifyCounts *counts


cdef inline bint card_marked(const CardBits *cards, uintptr_t addr) noexcept nogil:
    cdef size_t card = (addr - cards.base) >> cards.card_shift
    return (cards.words[card >> 6] >> (card & 63)) & 1


cdef void keep_missed(MissedBuffer *out, uintptr_t addr, uint64_t old,
                      uint64_t new_value) noexcept nogil:
    """Append one record while there is room; past ``limit`` it is only counted.
    A failed realloc stops the growth (the caller sees length < missed)."""
    cdef size_t capacity
    cdef MissedStore *grown
    if out.length == out.capacity:
        if not out.growable or out.capacity >= out.limit:
            return
        capacity = out.capacity * 2 if out.capacity else 256
        capacity = capacity if capacity < out.limit else out.limit
        grown = <MissedStore *>realloc(out.records, capacity * sizeof(MissedStore))
        if grown == NULL:
            out.limit = out.capacity
            return
        out.records = grown
        out.capacity = capacity
    out.records[out.length].address = addr
    out.records[out.length].old = old
    out.records[out.length].new_value = new_value
    out.length += 1


cdef inline bint block_changed(const uint64_t *now, const uint64_t *was) noexcept nogil:
    """Whether any of 8 words (a 64-byte block) differs: a branch-free OR of
    XORs, which the compiler vectorises."""
    cdef uint64_t diff = 0
    cdef size_t j
    for j in range(8):
        diff |= now[j] ^ was[j]
    return diff != 0


cdef void compare_page(Comparison *c, uintptr_t page) noexcept nogil:
    """Judge every word of one written page, and bring its snapshot up to date."""
    cdef VerifierCore *v = c.v
    cdef const uint64_t *now = <const uint64_t *>page
    cdef uint64_t *was = <uint64_t *>(v.snapshot + (page - v.start))
    cdef size_t block, i
    cdef uint64_t value
    for block in range(0, v.page_size >> 3, 8):
        if not block_changed(now + block, was + block):
            continue                  # the common case: written elsewhere in the page
        for i in range(block, block + 8):
            value = load_word(&now[i])
            if value == was[i]:
                continue              # a store of the value it held is no change
            c.counts.words_changed += 1
            if not card_marked(v.cards, page + (i << 3)):
                c.counts.missed += 1
                keep_missed(c.out, page + (i << 3), was[i], value)
            was[i] = value


cdef int compare_regions(void *ctx, const gct_page_region *regions, size_t n) noexcept nogil:
    """The pass's sink: never fails, so the pass never re-reports a compared page."""
    cdef Comparison *c = <Comparison *>ctx
    cdef size_t i
    cdef uintptr_t page
    for i in range(n):
        page = regions[i].start
        while page < regions[i].end:
            compare_page(c, page)
            page += c.v.page_size
    return 0


cdef int verifier_check(VerifierCore *v, bint clear, MissedBuffer *out,
                        VerifyCounts *counts) noexcept nogil:
    """One reset pass of the kernel registration into the comparison. The
    cards are cleared only after a pass that succeeded: a failed pass leaves
    its unreported pages written, and they must be judged against the marks
    made for them."""
    cdef Comparison comparison
    cdef RegionSink sink
    cdef PassCounts pass_counts
    cdef double started = monotonic_seconds()
    cdef int rc
    memset(counts, 0, sizeof(VerifyCounts))
    memset(&pass_counts, 0, sizeof(PassCounts))
    if v == NULL:
        return -EINVAL
    if getpid() != v.owner_pid:
        return -ECHILD                # the registration is the parent's; never take its lock
    comparison.v = v
    comparison.out = out
    comparison.counts = counts
    sink.emit = compare_regions
    sink.ctx = &comparison
    pthread_mutex_lock(&v.lock)
    rc = -EBADF
    if v.kernel != NULL:
        rc = v.kernel.run_pass(v.kernel, v.start, v.end, True, 0, &sink, &pass_counts)
    if rc == 0 and clear:
        cards_clear_range(v.cards, v.start, v.end)
    pthread_mutex_unlock(&v.lock)
    counts.pages_written = pass_counts.pages
    counts.seconds = monotonic_seconds() - started
    return rc


# ---- the Python face -------------------------------------------------------------

class BarrierReport:
    """What one BarrierVerifier.check() found; true when nothing was missed.

    ``missed`` holds the missed stores as a MISSED_DTYPE array sorted by
    address (at most ``max_missed`` of them); ``missed_count`` counts them
    all. ``pages_written`` pages were compared, and ``words_changed`` words
    of them changed, on marked cards or not. ``seconds`` is the check's time.
    """

    __slots__ = ("missed", "missed_count", "pages_written", "words_changed", "seconds")

    def __init__(self, missed, missed_count, pages_written, words_changed, seconds):
        self.missed = missed
        self.missed_count = missed_count
        self.pages_written = pages_written
        self.words_changed = words_changed
        self.seconds = seconds

    def __bool__(self):
        return self.missed_count == 0

    def __repr__(self):
        shown = ", ".join(f"{int(r['address']):#x}: {int(r['old']):#x} -> {int(r['new']):#x}"
                          for r in self.missed[:3])
        more = ", ..." if self.missed_count > 3 else ""
        return (f"<gctrack.BarrierReport {self.missed_count} missed [{shown}{more}], "
                f"{self.words_changed} words changed on {self.pages_written} pages>")


cdef class BarrierVerifier:
    """BarrierVerifier(arena, cards)
--

Finds every store into ``arena`` whose card the runtime's barrier did not
    mark in ``cards`` (a CardTable covering the arena), using the kernel's
    record of the pages written (pagemap_scan) and a snapshot of the arena.

    Arming may share the arena with a ``software`` Tracker (whose barrier it
    checks), and with no other tracker: TrackerError (EBUSY). Where
    pagemap_scan is missing it raises UnsupportedError with the reason.
    Writes made while the constructor runs may or may not be judged. Call
    ``check()`` at a safepoint, with no mutator storing.
    """

    def __cinit__(self, Arena arena not None, CardTable cards not None):
        arena.check_open()
        cards.check_covers(<uintptr_t>arena.base, arena.size)
        self.arena = arena
        self.cards = cards
        self.core.owner_pid = getpid()
        self.core.page_size = arena.page_size
        self.core.start = <uintptr_t>arena.base
        self.core.end = <uintptr_t>arena.base + arena.size
        self.core.cards = &cards.bits
        if pthread_mutex_init(&self.core.lock, NULL) != 0:
            raise MemoryError()
        self.lock_ready = True
        cdef void *snapshot = mmap(NULL, arena.size, PROT_READ | PROT_WRITE,
                                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if snapshot == MAP_FAILED:
            raise TrackerError(errno, "mmap", f"the verifier's {arena.size}-byte snapshot")
        self.core.snapshot = <unsigned char *>snapshot
        self.snapshot_size = arena.size
        # Arm first, then copy: a store after arming is reported, and judged
        # against a copy that is at least as old as the store.
        self.kernel = PagemapScanBackend(arena, beside_software=True)
        self.core.kernel = self.kernel.core
        with nogil:
            memcpy(snapshot, <void *>self.core.start, self.snapshot_size)

    def __dealloc__(self):
        self.release()
        if self.lock_ready:
            pthread_mutex_destroy(&self.core.lock)

    cdef void release(self) noexcept:
        """Disarm (after any running check) and free the snapshot; idempotent."""
        if self.lock_ready and getpid() == self.core.owner_pid:
            with nogil:
                pthread_mutex_lock(&self.core.lock)
                self.core.kernel = NULL
                pthread_mutex_unlock(&self.core.lock)
        else:                         # a forked child: the lock may have been held at fork()
            self.core.kernel = NULL
        if self.kernel is not None:
            self.kernel.close()
            self.kernel = None
        if self.core.snapshot != NULL:
            munmap(self.core.snapshot, self.snapshot_size)
            self.core.snapshot = NULL

    cdef int check_usable(self) except -1:
        if self.closed:
            raise ValueError("verifier is closed")
        if getpid() != self.core.owner_pid:
            raise RuntimeError(f"this verifier belongs to process {self.core.owner_pid}; "
                               "after fork() the child must arm its own")
        return 0

    cdef int raise_for(self, int rc) except -1:
        if rc == -EBADF:
            raise ValueError("verifier is closed")
        if rc:
            raise TrackerError(-rc, self.core.kernel.failed_operation.decode()
                               if self.core.kernel != NULL else "verifier check")
        return 0

    def check(self, clear=True, *, max_missed=DEFAULT_MAX_MISSED):
        """Judge every word changed since the last check (or construction).

        A changed word on a card not marked in ``cards`` is a missed barrier;
        a store of the value the word already held is no change. With
        ``clear`` the arena's cards are cleared afterwards. Either way the
        pages compared are re-armed and re-copied, so that each interval is
        judged on its own. Returns a BarrierReport keeping at most
        ``max_missed`` records. Call it at a safepoint.
        """
        self.check_usable()
        max_missed = operator.index(max_missed)
        if not 0 <= max_missed < 2**62:
            raise ValueError(f"max_missed must be in 0..2**62 - 1, got {max_missed}")
        cdef MissedBuffer out
        cdef VerifyCounts counts
        cdef bint clear_cards = clear
        cdef int rc
        memset(&out, 0, sizeof(out))
        out.growable = True
        out.limit = max_missed
        try:
            with nogil:
                rc = verifier_check(&self.core, clear_cards, &out, &counts)
            self.raise_for(rc)
            missed = numpy.empty(out.length, dtype=MISSED_DTYPE)
            if out.length:
                memcpy(<void *><uintptr_t>missed.ctypes.data, out.records,
                       out.length * sizeof(MissedStore))
            return BarrierReport(missed, counts.missed, counts.pages_written,
                                 counts.words_changed, counts.seconds)
        finally:
            free(out.records)

    def close(self):
        """Disarm the kernel tracking and free the snapshot. Idempotent; the
        arena and the card table stay usable."""
        if self.closed:
            return
        self.closed = True
        self.release()

    def __enter__(self):
        self.check_usable()
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else "armed"
        return f"<gctrack.BarrierVerifier of {self.arena!r} against {self.cards!r}, {state}>"
