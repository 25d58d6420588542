# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""CardTable: one bit per card, and the hot loop that turns page regions into bits."""
import operator

import numpy

from libc.stdint cimport uint64_t, int64_t, uintptr_t
from libc.string cimport memset
from gctrack.arena cimport Arena
from gctrack.linux cimport gct_page_region

# The layout of struct gct_page_region, and of the arrays Tracker.scan() returns.
REGION_DTYPE = numpy.dtype([("start", "<u8"), ("end", "<u8"), ("categories", "<u8")])

cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>

    /* The first word at or after `from` that is not zero, or n. Four words
       at a time: dirty cards are sparse, and most words are zero. */
    static inline size_t gct_next_nonzero_word(const uint64_t *w, size_t from, size_t n) {
        while (from + 4 <= n && !(w[from] | w[from + 1] | w[from + 2] | w[from + 3]))
            from += 4;
        while (from < n && !w[from])
            from++;
        return from;
    }

    /* Population count of words[0..n), skipping runs of zero words. Built
       twice: with the POPCNT instruction, chosen at run time where the CPU
       has it, and portably (without -mpopcnt GCC calls libgcc's
       __popcountdi2 for every word, which made counting a remark's cards
       cost more than rescanning them). */
    #define GCT_COUNT_BODY                                             \
        size_t total = 0, i = gct_next_nonzero_word(w, 0, n);          \
        while (i < n) {                                                \
            total += (size_t)__builtin_popcountll(w[i]);               \
            i = gct_next_nonzero_word(w, i + 1, n);                    \
        }                                                              \
        return total;

    static size_t gct_count_portable(const uint64_t *w, size_t n) { GCT_COUNT_BODY }
    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __attribute__((target("popcnt")))
    static size_t gct_count_popcnt(const uint64_t *w, size_t n) { GCT_COUNT_BODY }
    #endif

    static size_t (*gct_count_impl)(const uint64_t *, size_t) = 0;

    /* Which variant this CPU runs; racing first callers pick the same one. */
    static size_t (*gct_count_variant(void))(const uint64_t *, size_t) {
    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
        __builtin_cpu_init();
        if (__builtin_cpu_supports("popcnt"))
            return gct_count_popcnt;
    #endif
        return gct_count_portable;
    }

    static inline size_t gct_count_words(const uint64_t *w, size_t n) {
        size_t (*impl)(const uint64_t *, size_t) = __atomic_load_n(&gct_count_impl, __ATOMIC_RELAXED);
        if (!impl) {
            impl = gct_count_variant();
            __atomic_store_n(&gct_count_impl, impl, __ATOMIC_RELAXED);
        }
        return impl(w, n);
    }

    static inline int gct_count_uses_popcnt(void) { return gct_count_variant() != gct_count_portable; }
    """
    int popcount64 "__builtin_popcountll"(unsigned long long x) nogil
    int ctz64 "__builtin_ctzll"(unsigned long long x) nogil
    size_t next_nonzero_word "gct_next_nonzero_word"(
        const uint64_t *w, size_t start, size_t n) nogil
    size_t count_words "gct_count_words"(const uint64_t *w, size_t n) nogil
    bint count_uses_popcnt "gct_count_uses_popcnt"() nogil


cdef void cards_mark_regions(CardBits *t, const gct_page_region *regions,
                             size_t n) noexcept nogil:
    cdef size_t i
    for i in range(n):
        cards_mark_range(t, regions[i].start, regions[i].end)


cdef void cards_or(CardBits *dst, const CardBits *src) noexcept nogil:
    cdef size_t w
    for w in range(dst.num_words):
        dst.words[w] |= src.words[w]


cdef void cards_clear(CardBits *t) noexcept nogil:
    memset(t.words, 0, t.num_words * sizeof(uint64_t))


cdef void cards_clear_range(CardBits *t, uintptr_t start, uintptr_t end) noexcept nogil:
    """Clear every card that lies wholly or partly in [start, end)."""
    cdef uintptr_t limit = t.base + t.size
    start = start if start > t.base else t.base
    end = end if end < limit else limit
    if start >= end:
        return
    cdef size_t first = (start - t.base) >> t.card_shift
    cdef size_t last = (end - 1 - t.base) >> t.card_shift
    cdef size_t w
    cdef uint64_t head = (~<uint64_t>0) << (first & 63)
    cdef uint64_t tail = (~<uint64_t>0) >> (63 - (last & 63))
    if first >> 6 == last >> 6:
        t.words[first >> 6] &= ~(head & tail)
        return
    t.words[first >> 6] &= ~head
    for w in range((first >> 6) + 1, last >> 6):
        t.words[w] = 0
    t.words[last >> 6] &= ~tail


cdef uint64_t cards_last_word_mask(const CardBits *t) noexcept nogil:
    """The bits of the last word that stand for cards: ``words`` is a live,
    writable array, and bits past num_cards must never count as cards."""
    cdef unsigned used = t.num_cards & 63
    return (~<uint64_t>0) >> (64 - used) if used else ~<uint64_t>0


cdef size_t cards_count(const CardBits *t) noexcept nogil:
    """Dirty cards: zero words skipped, POPCNT where the CPU has it."""
    cdef size_t total
    if t.num_words == 0:
        return 0
    total = count_words(t.words, t.num_words - 1)
    return total + popcount64(t.words[t.num_words - 1] & cards_last_word_mask(t))


cdef size_t cards_next_dirty(const CardBits *t, size_t card) noexcept nogil:
    """The first dirty card >= card, or t.num_cards when there is none."""
    if card >= t.num_cards:
        return t.num_cards
    cdef size_t w = card >> 6
    cdef uint64_t word = t.words[w] & ((~<uint64_t>0) << (card & 63))
    if word == 0:
        w = next_nonzero_word(t.words, w + 1, t.num_words)
        if w >= t.num_words:
            return t.num_cards
        word = t.words[w]
    cdef size_t found = (w << 6) + ctz64(word)
    return found if found < t.num_cards else t.num_cards


cdef size_t cards_next_clean(const CardBits *t, size_t card) noexcept nogil:
    """The first clean card >= card, or t.num_cards when there is none."""
    if card >= t.num_cards:
        return t.num_cards
    cdef size_t w = card >> 6
    cdef uint64_t word = ~t.words[w] & ((~<uint64_t>0) << (card & 63))
    while word == 0:
        w += 1
        if w >= t.num_words:
            return t.num_cards
        word = ~t.words[w]
    cdef size_t found = (w << 6) + ctz64(word)
    return found if found < t.num_cards else t.num_cards


cdef inline uintptr_t card_start(const CardBits *t, size_t card) noexcept nogil:
    """The address where ``card`` starts; the table's end for card >= num_cards
    (a card's offset is below size, so this never overflows)."""
    if card >= t.num_cards:
        return t.base + t.size
    return t.base + (<uintptr_t>card << t.card_shift)


cdef void cards_merge(CardBits *dst, const CardBits *src) noexcept nogil:
    """Mark in dst every card that overlaps a dirty card of src (any geometry)."""
    if (dst.base == src.base and dst.size == src.size
            and dst.card_shift == src.card_shift):
        cards_or(dst, src)
        return
    cdef size_t first = cards_next_dirty(src, 0), after
    while first < src.num_cards:
        after = cards_next_clean(src, first)
        cards_mark_range(dst, card_start(src, first), card_start(src, after))
        first = cards_next_dirty(src, after)


cdef size_t fill_indices(const CardBits *t, int64_t[::1] out) noexcept nogil:
    cdef size_t n = 0
    cdef size_t card = cards_next_dirty(t, 0)
    while card < t.num_cards:
        out[n] = card
        n += 1
        card = cards_next_dirty(t, card + 1)
    return n


cdef size_t fill_ranges(const CardBits *t, uint64_t *out) noexcept nogil:
    """Coalesce runs of dirty cards into [start, end) address pairs at ``out``
    (skipped when NULL); returns the number of runs."""
    cdef size_t n = 0, first, after
    first = cards_next_dirty(t, 0)
    while first < t.num_cards:
        after = cards_next_clean(t, first)
        if out != NULL:
            out[2 * n] = card_start(t, first)
            out[2 * n + 1] = card_start(t, after)
        n += 1
        first = cards_next_dirty(t, after)
    return n


# Every size and address is a uint64: the largest card and the last address.
MAX_CARD_SIZE = 1 << 63
cdef object ADDRESS_LIMIT = 1 << 64


cdef unsigned checked_card_shift(object card_size) except? 0:
    card_size = operator.index(card_size)
    if card_size < 64 or card_size > MAX_CARD_SIZE or card_size & (card_size - 1):
        raise ValueError(f"card_size must be a power of two from 64 to 2**63, got {card_size}")
    return card_size.bit_length() - 1


cdef size_t cards_needed(size_t size, unsigned card_shift) noexcept nogil:
    """ceil(size / card size), exact for every size and shift."""
    cdef size_t partial = (size & ((<size_t>1 << card_shift) - 1)) != 0
    return (size >> card_shift) + partial


cdef class CardTable:
    """CardTable(base, size, card_size=512)
--

A card table: one bit per ``card_size`` bytes of [base, base + size).

    ``words`` is a live numpy uint64 view of the bits (card i is bit i % 64
    of word i // 64). Addresses outside the table raise ValueError.
    ``card_size`` is a power of two from 64 to MAX_CARD_SIZE (2**63), and the
    table must end below 2**64.
    """

    def __cinit__(self, base, size, card_size=512):
        base = operator.index(base)
        size = operator.index(size)
        if base < 0:
            raise ValueError(f"base must be a non-negative address, got {base}")
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if base + size >= ADDRESS_LIMIT:
            raise ValueError(f"the table [{base:#x}, {base + size:#x}) does not fit in the "
                             "64-bit address space")
        self.bits.card_shift = checked_card_shift(card_size)
        self.bits.base = base
        self.bits.size = size
        self.bits.num_cards = cards_needed(size, self.bits.card_shift)
        self.bits.num_words = (self.bits.num_cards + 63) >> 6
        self.words_array = numpy.zeros(self.bits.num_words, dtype=numpy.uint64)
        cdef uint64_t[::1] words = self.words_array
        self.bits.words = &words[0]

    @classmethod
    def for_arena(cls, arena, card_size=512):
        """A table covering exactly ``arena``."""
        if not isinstance(arena, Arena):
            raise TypeError(f"arena must be a gctrack.Arena, got {type(arena).__name__}")
        return cls(arena.address, arena.size, card_size)

    @property
    def words(self):
        return self.words_array

    @property
    def base(self):
        return self.bits.base

    @property
    def size(self):
        return self.bits.size

    @property
    def card_size(self):
        return (<uint64_t>1) << self.bits.card_shift

    @property
    def num_cards(self):
        return self.bits.num_cards

    cdef int check_covers(self, uintptr_t start, size_t length) except -1:
        # Written so that nothing wraps: start + length may not fit in 64 bits.
        if (start < self.bits.base or length > self.bits.size
                or start - self.bits.base > self.bits.size - length):
            raise self.outside(start, length)
        return 0

    cdef object outside(self, object start, object length):
        """The ValueError for [start, start + length) (Python ints: no wrapping)."""
        return ValueError(
            f"[{start:#x}, {start + length:#x}) is outside the card table "
            f"[{self.bits.base:#x}, {self.bits.base + self.bits.size:#x})")

    cdef int check_span(self, object addr, object length) except -1:
        """check_covers for Python values: integers, non-negative, any magnitude."""
        addr = operator.index(addr)
        length = operator.index(length)
        if addr < 0 or length < 0:
            raise ValueError(f"address and length must be non-negative, got {addr}, {length}")
        if addr + length > ADDRESS_LIMIT:
            raise self.outside(addr, length)
        return self.check_covers(addr, length)

    cdef size_t card_of(self, object addr) except? 0:
        self.check_span(addr, 1)
        return (<uintptr_t>addr - self.bits.base) >> self.bits.card_shift

    cdef int check_same_geometry(self, CardTable other) except -1:
        if (other.bits.base != self.bits.base or other.bits.size != self.bits.size
                or other.bits.card_shift != self.bits.card_shift):
            raise ValueError(f"card tables differ in geometry: {self!r} and {other!r}")
        return 0

    def mark_range(self, addr, length):
        """Mark every card overlapping [addr, addr + length)."""
        addr = operator.index(addr)
        length = operator.index(length)
        if length == 0 and addr >= 0:
            return
        self.check_span(addr, length)
        cards_mark_range(&self.bits, addr, addr + length)

    def add_regions(self, regions):
        """Mark the cards of every [start, end) region.

        ``regions`` is an array of REGION_DTYPE (as Tracker.scan() returns) or
        a (k, 2) / (k, 3) integer array whose first two columns are start, end.
        """
        starts, ends = _region_columns(regions)
        if starts.size == 0:
            return
        if (ends < starts).any():
            raise ValueError("a region ends before it starts")
        self.check_covers(int(starts.min()), int(ends.max() - starts.min()))
        cdef const uint64_t[::1] s = starts
        cdef const uint64_t[::1] e = ends
        cdef size_t i
        with nogil:
            for i in range(<size_t>s.shape[0]):
                cards_mark_range(&self.bits, s[i], e[i])

    def count(self):
        """The number of dirty cards."""
        return cards_count(&self.bits)

    def indices(self):
        """The dirty card numbers, ascending, as int64."""
        out = numpy.empty(cards_count(&self.bits), dtype=numpy.int64)
        cdef int64_t[::1] view = out
        if out.size:
            with nogil:
                fill_indices(&self.bits, view)
        return out

    def ranges(self):
        """Runs of dirty cards as a (k, 2) uint64 array of [start, end) addresses."""
        cdef uint64_t[:, ::1] view
        cdef size_t k
        with nogil:
            k = fill_ranges(&self.bits, NULL)
        out = numpy.empty((k, 2), dtype=numpy.uint64)
        if k:
            view = out
            with nogil:
                fill_ranges(&self.bits, &view[0, 0])
        return out

    def is_dirty(self, addr):
        cdef size_t card = self.card_of(addr)
        return bool((self.bits.words[card >> 6] >> (card & 63)) & 1)

    def clear(self):
        cards_clear(&self.bits)

    def copy(self):
        cdef CardTable twin = CardTable(self.bits.base, self.bits.size, self.card_size)
        twin.words_array[:] = self.words_array
        return twin

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def __or__(self, other):
        if not isinstance(self, CardTable) or not isinstance(other, CardTable):
            return NotImplemented
        result = self.copy()
        result |= other
        return result

    def __ior__(self, other):
        if not isinstance(other, CardTable):
            return NotImplemented
        self.check_same_geometry(other)
        cards_or(&self.bits, &(<CardTable>other).bits)
        return self

    def __eq__(self, other):
        if not isinstance(other, CardTable):
            return NotImplemented
        cdef CardTable that = other
        return (that.bits.base == self.bits.base and that.bits.size == self.bits.size
                and that.bits.card_shift == self.bits.card_shift
                and numpy.array_equal(that.words_array, self.words_array))

    __hash__ = None

    def __repr__(self):
        return (f"<gctrack.CardTable {self.bits.num_cards} cards of {self.card_size} B "
                f"at {self.bits.base:#x}, {cards_count(&self.bits)} dirty>")


def _region_columns(regions):
    """(starts, ends) as contiguous uint64 arrays, from any accepted region layout."""
    array = numpy.asarray(regions)
    if array.dtype.names is not None:
        if "start" not in array.dtype.names or "end" not in array.dtype.names:
            raise ValueError("structured regions need 'start' and 'end' fields")
        columns = array["start"], array["end"]
    else:
        if array.ndim != 2 or array.shape[1] not in (2, 3):
            raise ValueError(f"regions must be a (k, 2) or (k, 3) array, got shape {array.shape}")
        columns = array[:, 0], array[:, 1]
    for column in columns:
        if column.dtype.kind not in "iu":
            raise TypeError(f"region addresses must be integers, got {column.dtype}")
        if column.dtype.kind == "i" and (column < 0).any():
            raise ValueError("region addresses must be non-negative")
    return tuple(numpy.ascontiguousarray(c, dtype=numpy.uint64) for c in columns)
