# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The shared pass of the backends that record writes one at a time (see dirtymap.pxd)."""
from libc.errno cimport EINVAL, ENOMEM, EOVERFLOW
from libc.stdint cimport uint32_t, uint64_t, uintptr_t, UINT32_MAX
from libc.stdlib cimport calloc, free

from gctrack.backend cimport BackendCore, PassCounts, RegionSink
from gctrack.linux cimport gct_page_region, GCT_PAGE_IS_WRITTEN


cdef int dirtymap_init(DirtyMap *m, uintptr_t base, size_t size, unsigned unit_shift,
                       unsigned page_shift) noexcept nogil:
    m.base = base
    m.size = size
    m.unit_shift = unit_shift
    m.page_shift = page_shift
    m.num_units = (size + (<size_t>1 << unit_shift) - 1) >> unit_shift
    m.num_words = (m.num_units + 63) >> 6
    m.holds = NULL
    m.words = <uint64_t *>calloc(m.num_words if m.num_words else 1, sizeof(uint64_t))
    return 0 if m.words != NULL else -ENOMEM


cdef void dirtymap_free(DirtyMap *m) noexcept nogil:
    free(m.words)
    m.words = NULL
    free(m.holds)
    m.holds = NULL


ctypedef struct UnitRange:
    size_t first            # first unit
    size_t after            # one past the last unit


cdef inline UnitRange units_of(DirtyMap *m, uintptr_t start, uintptr_t end) noexcept nogil:
    """The units that overlap [start, end) (which lies inside the map)."""
    cdef UnitRange r
    cdef uintptr_t unit_mask = (<uintptr_t>1 << m.unit_shift) - 1
    r.first = (start - m.base) >> m.unit_shift
    r.after = (end - m.base + unit_mask) >> m.unit_shift
    return r


cdef inline uint64_t word_mask(size_t w, UnitRange r) noexcept nogil:
    """The bits of word w that fall inside r."""
    cdef uint64_t mask = ~<uint64_t>0
    if w == r.first >> 6:
        mask &= (~<uint64_t>0) << (r.first & 63)
    if w == (r.after - 1) >> 6 and r.after & 63:
        mask &= (~<uint64_t>0) >> (64 - (r.after & 63))
    return mask


cdef void dirtymap_clear(DirtyMap *m, uintptr_t start, uintptr_t end) noexcept nogil:
    """Clear the bits of every unit overlapping [start, end)."""
    cdef UnitRange r = units_of(m, start, end)
    cdef size_t w
    if r.first >= r.after:
        return
    for w in range(r.first >> 6, ((r.after - 1) >> 6) + 1):
        gct_bits_clear(&m.words[w], word_mask(w, r))


cdef int hold_units(DirtyMap *m, UnitRange r) noexcept nogil:
    """Open a bracket on units r; -ENOMEM or -EOVERFLOW (2^32 - 1 brackets
    on one unit) leave nothing changed."""
    cdef size_t u
    if m.holds == NULL:
        m.holds = <uint32_t *>calloc(m.num_units if m.num_units else 1, sizeof(uint32_t))
        if m.holds == NULL:
            return -ENOMEM
    for u in range(r.first, r.after):
        if m.holds[u] == UINT32_MAX:
            return -EOVERFLOW
    for u in range(r.first, r.after):
        m.holds[u] += 1
    return 0


cdef int unhold_units(DirtyMap *m, UnitRange r) noexcept nogil:
    """Close a bracket on units r; -EINVAL, changing nothing, when some unit
    of r has no bracket open (an end without its begin)."""
    cdef size_t u
    if m.holds == NULL:
        return -EINVAL
    for u in range(r.first, r.after):
        if m.holds[u] == 0:
            return -EINVAL
    for u in range(r.first, r.after):
        m.holds[u] -= 1
    return 0


cdef int dirtymap_protect_unheld(DirtyMap *m, uintptr_t start, uintptr_t end) noexcept nogil:
    """Re-protect [start, end) (unit-aligned) except the units that an open
    bracket keeps writable. Those are marked dirty again: a CPU store to them
    does not fault, so every pass reports them until their bracket ends.
    0 or the first -errno."""
    cdef UnitRange r
    cdef size_t u, run_first
    cdef int rc
    if m.holds == NULL:
        return m.protect(m.protect_ctx, start, end)
    r = units_of(m, start, end)
    u = r.first
    while u < r.after:
        while u < r.after and m.holds[u]:
            gct_bits_set(m.words, u)
            u += 1
        run_first = u
        while u < r.after and not m.holds[u]:
            u += 1
        if u > run_first:
            rc = m.protect(m.protect_ctx, m.base + (<uintptr_t>run_first << m.unit_shift),
                           m.base + (<uintptr_t>u << m.unit_shift))
            if rc:
                return rc
    return 0


# ---- record, re-arm and external-write brackets, under the exclusion ----------

cdef inline void exclude(DirtyMap *m) noexcept nogil:
    if m.exclude != NULL:
        m.exclude(m.protect_ctx)


cdef inline void allow(DirtyMap *m) noexcept nogil:
    if m.allow != NULL:
        m.allow(m.protect_ctx)


cdef inline uintptr_t unit_start(DirtyMap *m, size_t unit) noexcept nogil:
    """The address where ``unit`` starts (clipped to the end of the map)."""
    cdef uintptr_t address = m.base + (<uintptr_t>unit << m.unit_shift)
    return address if address < m.base + m.size else m.base + m.size


cdef int unprotect_units(DirtyMap *m, UnitRange r, const char **failed_operation) noexcept nogil:
    cdef int rc = 0
    if m.unprotect != NULL and r.first < r.after:
        rc = m.unprotect(m.protect_ctx, unit_start(m, r.first), unit_start(m, r.after))
        if rc:
            failed_operation[0] = "making pages writable"
    return rc


cdef int mark_then_open(DirtyMap *m, uintptr_t start, uintptr_t end, UnitRange r,
                        const char **failed_operation) noexcept nogil:
    """Mark units r of [start, end) dirty, then make them writable: the
    fault handler's order (the caller holds the exclusion)."""
    dirtymap_record_range(m, start, end)
    return unprotect_units(m, r, failed_operation)


cdef int dirtymap_record_writable(DirtyMap *m, uintptr_t start, uintptr_t end,
                                  const char **failed_operation) noexcept nogil:
    """record(): the next pass reports [start, end) and re-arms it."""
    cdef UnitRange r = units_of(m, start, end)
    cdef int rc
    if r.first >= r.after:
        return 0
    exclude(m)
    rc = mark_then_open(m, start, end, r, failed_operation)
    allow(m)
    return rc


cdef int dirtymap_rearm(DirtyMap *m, uintptr_t start, uintptr_t end,
                        const char **failed_operation) noexcept nogil:
    """Forget the writes to [start, end) and trap new ones (held units stay writable)."""
    cdef UnitRange r = units_of(m, start, end)
    cdef int rc = 0
    if r.first >= r.after:
        return 0
    exclude(m)
    dirtymap_clear(m, start, end)
    if m.protect != NULL:
        rc = dirtymap_protect_unheld(m, unit_start(m, r.first), unit_start(m, r.after))
        if rc:
            dirtymap_record_range(m, start, end)     # maybe still writable: keep it dirty
            failed_operation[0] = "re-protecting pages"
    allow(m)
    return rc


cdef int dirtymap_begin_external(DirtyMap *m, uintptr_t start, uintptr_t end,
                                 const char **failed_operation) noexcept nogil:
    """Open a bracket: [start, end) becomes writable and stays so until the
    matching end, whatever passes run meanwhile; being writable, it is also
    reported by every pass until then."""
    cdef UnitRange r = units_of(m, start, end)
    cdef int rc
    if r.first >= r.after or m.protect == NULL:
        return 0                    # nothing is ever protected: nothing to hold
    exclude(m)
    rc = hold_units(m, r)
    if rc:
        failed_operation[0] = "opening an external-write bracket"
    else:
        rc = mark_then_open(m, start, end, r, failed_operation)
        if rc:
            unhold_units(m, r)      # what it did open is dirty: the next pass re-arms it
    allow(m)
    return rc


cdef int dirtymap_end_external(DirtyMap *m, uintptr_t start, uintptr_t end,
                               const char **failed_operation) noexcept nogil:
    """Close a bracket: mark [start, end) dirty (the write has completed), so
    the next pass reports it and, once no bracket holds it, re-arms it."""
    cdef UnitRange r = units_of(m, start, end)
    cdef int rc
    if r.first >= r.after:
        return 0
    exclude(m)                      # marked and released as one step: no pass between
    rc = mark_then_open(m, start, end, r, failed_operation)
    if m.protect != NULL and unhold_units(m, r) and rc == 0:
        rc = -EINVAL                # recorded all the same: an unmatched end loses nothing
        failed_operation[0] = "closing an external-write bracket that is not open"
    allow(m)
    return rc


cdef int dirtymap_core_record(BackendCore *core, uintptr_t start, uintptr_t end) noexcept nogil:
    """record(): [start, end) dirty and writable, as the handler would make it."""
    return dirtymap_record_writable(&(<DirtyMapCore *>core).dirty, start, end,
                                    &core.failed_operation)


cdef int dirtymap_core_rearm(BackendCore *core, uintptr_t start, uintptr_t end) noexcept nogil:
    return dirtymap_rearm(&(<DirtyMapCore *>core).dirty, start, end, &core.failed_operation)


cdef int dirtymap_core_begin_external(BackendCore *core, uintptr_t start, uintptr_t end) noexcept nogil:
    return dirtymap_begin_external(&(<DirtyMapCore *>core).dirty, start, end,
                                   &core.failed_operation)


cdef int dirtymap_core_end_external(BackendCore *core, uintptr_t start, uintptr_t end) noexcept nogil:
    return dirtymap_end_external(&(<DirtyMapCore *>core).dirty, start, end,
                                 &core.failed_operation)


cdef inline uint64_t lowest_bits(uint64_t x, uint64_t k) noexcept nogil:
    """The k lowest set bits of x."""
    cdef uint64_t kept = 0, bit
    while k and x:
        bit = x & (~x + 1)
        kept |= bit
        x ^= bit
        k -= 1
    return kept


ctypedef struct PassState:
    DirtyMap *map
    bint reset
    RegionSink *sink
    PassCounts *counts
    const char **failed_operation
    gct_page_region batch[256]
    size_t batched


cdef void rerecord_batch(PassState *p) noexcept nogil:
    """After an error: mark the batched (taken, not yet reported) regions
    dirty again, so the next pass reports them; nothing is lost."""
    cdef size_t i
    if p.reset:
        for i in range(p.batched):
            dirtymap_record_range(p.map, p.batch[i].start, p.batch[i].end)
    p.batched = 0


cdef int emit_batch(PassState *p) noexcept nogil:
    cdef int rc = 0
    if p.batched:
        rc = p.sink.emit(p.sink.ctx, p.batch, p.batched)
        if rc:
            p.failed_operation[0] = "collecting regions"
            rerecord_batch(p)
        p.batched = 0
    return rc


cdef int flush_run(PassState *p, size_t first, size_t after) noexcept nogil:
    """Re-protect (when resetting) and report units [first, after)."""
    cdef DirtyMap *m = p.map
    cdef uintptr_t start = m.base + (<uintptr_t>first << m.unit_shift)
    cdef uintptr_t end = m.base + (<uintptr_t>after << m.unit_shift)
    cdef uintptr_t page_mask = (<uintptr_t>1 << m.page_shift) - 1
    cdef int rc
    if end > m.base + m.size:
        end = m.base + m.size
    if p.reset:
        dirtymap_clear(m, start, end)                # take exactly this run's bits
        if m.protect != NULL:
            rc = dirtymap_protect_unheld(m, start, end)
            p.counts.calls += 1
            if rc:
                dirtymap_record_range(m, start, end)     # keep them dirty: nothing is lost
                rerecord_batch(p)
                p.failed_operation[0] = "re-protecting written pages"
                return rc
    p.batch[p.batched].start = start
    p.batch[p.batched].end = end
    p.batch[p.batched].categories = GCT_PAGE_IS_WRITTEN
    p.batched += 1
    p.counts.regions += 1
    p.counts.pages += (((end + page_mask) & ~page_mask) - (start & ~page_mask)) >> m.page_shift
    if p.batched == 256:
        return emit_batch(p)
    return 0


cdef int dirtymap_pass(DirtyMap *m, uintptr_t start, uintptr_t end, bint reset,
                       uint64_t max_units, RegionSink *sink, PassCounts *counts,
                       const char **failed_operation) noexcept nogil:
    """Take the set bits of the units overlapping [start, end) (clearing them
    when ``reset``), re-protect and report them as coalesced regions, in
    ascending order; at most ``max_units`` units when it is > 0."""
    cdef PassState p
    p.map = m
    p.reset = reset
    p.sink = sink
    p.counts = counts
    p.failed_operation = failed_operation
    p.batched = 0
    cdef size_t w, unit, length, run_first = 0, run_after = 0
    cdef uint64_t take, shifted, taken
    cdef int rc
    cdef UnitRange r = units_of(m, start, end)
    if r.first >= r.after:
        return 0
    for w in range(r.first >> 6, ((r.after - 1) >> 6) + 1):
        take = gct_bits_load(&m.words[w]) & word_mask(w, r)
        if take == 0:
            continue
        if max_units:
            take = lowest_bits(take, max_units)
        taken = gct_popcount64(take)        # cleared run by run, in flush_run
        while take:
            unit = (w << 6) + gct_ctz64(take)
            shifted = ~(take >> (unit & 63))
            length = 64 - (unit & 63) if shifted == 0 else <size_t>gct_ctz64(shifted)
            take &= ~(((~<uint64_t>0) >> (64 - length)) << (unit & 63))
            if run_after == unit and run_after != run_first:
                run_after += length
                continue
            if run_after != run_first:
                rc = flush_run(&p, run_first, run_after)
                if rc:
                    return rc
            run_first = unit
            run_after = unit + length
        if max_units:
            max_units -= taken
            if max_units == 0:
                break
    if run_after != run_first:
        rc = flush_run(&p, run_first, run_after)
        if rc:
            return rc
    return emit_batch(&p)
