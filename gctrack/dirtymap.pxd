# cython: language_level=3
"""DirtyMap: an atomic bitmap that writers set and passes drain.

The backends whose writes are caught one at a time (a fault handler, a signal
handler, a software barrier) record them here; ``dirtymap_pass`` is their
shared pass. What keeps writes from being lost, or reported late:

- a fault handler sets the unit's bit *before* it makes the unit writable,
  so a write completes only after its bit is set, and the first pass to start
  after it sees it;
- a pass takes (clears) the bits of a run and re-protects it, then reports
  it; on any error whatever it took and did not report is marked dirty again;
- the backend makes "set bit + unprotect" and "take + re-protect" mutually
  exclusive. Otherwise a slow handler could unprotect a unit that a pass had
  just taken and re-protected, leaving it writable with its bit clear, and
  every later write to it would go unseen.

A write that lands between a pass's take and its re-protect falls on a unit
that this pass reports.
"""
from libc.stdint cimport uint32_t, uint64_t, uintptr_t
from gctrack.backend cimport BackendCore, PassCounts, RegionSink
from gctrack.linux cimport gct_page_region, GCT_PAGE_IS_WRITTEN


cdef extern from *:
    """
    static inline void gct_bits_set(uint64_t *words, size_t bit) {
        __atomic_fetch_or(&words[bit >> 6], (uint64_t)1 << (bit & 63), __ATOMIC_RELEASE);
    }
    static inline uint64_t gct_bits_load(const uint64_t *word) {
        return __atomic_load_n(word, __ATOMIC_ACQUIRE);
    }
    static inline void gct_bits_clear(uint64_t *word, uint64_t mask) {
        __atomic_fetch_and(word, ~mask, __ATOMIC_ACQ_REL);
    }
    static inline void gct_bits_fill(uint64_t *word, uint64_t mask) {
        __atomic_fetch_or(word, mask, __ATOMIC_RELEASE);
    }
    static inline int gct_ctz64(uint64_t x) { return __builtin_ctzll(x); }
    static inline int gct_popcount64(uint64_t x) { return __builtin_popcountll(x); }
    """
    void gct_bits_set(uint64_t *words, size_t bit) nogil
    uint64_t gct_bits_load(const uint64_t *word) nogil
    void gct_bits_clear(uint64_t *word, uint64_t mask) nogil
    void gct_bits_fill(uint64_t *word, uint64_t mask) nogil
    int gct_ctz64(uint64_t x) nogil
    int gct_popcount64(uint64_t x) nogil


# Makes [start, end) trap writes again (or, as unprotect, stop trapping
# them); 0 or -errno.
ctypedef int (*ProtectFn)(void *ctx, uintptr_t start, uintptr_t end) noexcept nogil
# Takes or gives back the backend's pass exclusion (see above).
ctypedef void (*ExclusionFn)(void *ctx) noexcept nogil

ctypedef struct DirtyMap:
    uint64_t *words          # one bit per unit of [base, base + size)
    uintptr_t base
    size_t size
    size_t num_units
    size_t num_words
    unsigned unit_shift      # log2 of the unit (page or card) size
    unsigned page_shift      # log2 of the page size, for PassCounts.pages
    ProtectFn protect        # NULL when nothing needs re-protecting (software)
    ProtectFn unprotect
    ExclusionFn exclude      # the backend's "take + re-protect" side of the
    ExclusionFn allow        # exclusion; NULL when there is none (software)
    void *protect_ctx        # passed to all four
    # External-write brackets open on each unit (NULL until the first one):
    # a unit with a count stays writable and dirty through passes and
    # re-arms. Guarded by the backend's own pass exclusion, like protect.
    uint32_t *holds


cdef inline void dirtymap_record(DirtyMap *m, uintptr_t addr) noexcept nogil:
    """Mark the unit holding addr (which must lie inside the map)."""
    gct_bits_set(m.words, (addr - m.base) >> m.unit_shift)


cdef inline void dirtymap_record_range(DirtyMap *m, uintptr_t start, uintptr_t end) noexcept nogil:
    """Mark every unit overlapping [start, end), a whole word at a time."""
    cdef size_t first = (start - m.base) >> m.unit_shift
    cdef size_t last = (end - 1 - m.base) >> m.unit_shift
    cdef size_t w
    cdef uint64_t head = (~<uint64_t>0) << (first & 63)
    cdef uint64_t tail = (~<uint64_t>0) >> (63 - (last & 63))
    if first >> 6 == last >> 6:
        gct_bits_fill(&m.words[first >> 6], head & tail)
        return
    gct_bits_fill(&m.words[first >> 6], head)
    for w in range((first >> 6) + 1, last >> 6):
        gct_bits_fill(&m.words[w], ~<uint64_t>0)
    gct_bits_fill(&m.words[last >> 6], tail)


cdef int dirtymap_init(DirtyMap *m, uintptr_t base, size_t size, unsigned unit_shift,
                       unsigned page_shift) noexcept nogil
cdef void dirtymap_free(DirtyMap *m) noexcept nogil
cdef void dirtymap_clear(DirtyMap *m, uintptr_t start, uintptr_t end) noexcept nogil
ctypedef struct DirtyMapCore:
    # The first member of every backend whose writes are caught one at a
    # time by a handler (mprotect, uffd_sync): a BackendCore* of theirs is a
    # DirtyMapCore*, and the dirtymap_core_* functions are their BackendCore
    # record, re-arm and bracket entries.
    BackendCore base
    DirtyMap dirty


cdef int dirtymap_core_record(BackendCore *core, uintptr_t start, uintptr_t end) noexcept nogil
cdef int dirtymap_core_rearm(BackendCore *core, uintptr_t start, uintptr_t end) noexcept nogil
cdef int dirtymap_core_begin_external(BackendCore *core, uintptr_t start, uintptr_t end) noexcept nogil
cdef int dirtymap_core_end_external(BackendCore *core, uintptr_t start, uintptr_t end) noexcept nogil
cdef int dirtymap_protect_unheld(DirtyMap *m, uintptr_t start, uintptr_t end) noexcept nogil
cdef int dirtymap_record_writable(DirtyMap *m, uintptr_t start, uintptr_t end,
                                  const char **failed_operation) noexcept nogil
cdef int dirtymap_rearm(DirtyMap *m, uintptr_t start, uintptr_t end,
                        const char **failed_operation) noexcept nogil
cdef int dirtymap_begin_external(DirtyMap *m, uintptr_t start, uintptr_t end,
                                 const char **failed_operation) noexcept nogil
cdef int dirtymap_end_external(DirtyMap *m, uintptr_t start, uintptr_t end,
                               const char **failed_operation) noexcept nogil
cdef int dirtymap_pass(DirtyMap *m, uintptr_t start, uintptr_t end, bint reset,
                       uint64_t max_units, RegionSink *sink, PassCounts *counts,
                       const char **failed_operation) noexcept nogil
