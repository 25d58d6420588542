# cython: language_level=3
from libc.stdint cimport uint64_t, uintptr_t
from gctrack.linux cimport gct_page_region


cdef extern from "gctrack/gctrack.h" nogil:
    # One bit per card of [base, base + size): the C-level view of a
    # CardTable, and a stable layout of the C API (gct_cards).
    # A CardTable guarantees base + size < 2**64 and card_shift in 6..63, so
    # base + (card << card_shift) cannot overflow for card < num_cards;
    # num_cards is exactly ceil(size / card size). Bits at or past num_cards
    # in the last word are ignored.
    ctypedef struct CardBits "gct_cards":
        uint64_t *words
        uintptr_t base
        size_t size
        size_t num_cards
        size_t num_words
        unsigned card_shift


cdef inline void cards_set_bits(uint64_t *words, size_t first, size_t last) noexcept nogil:
    """Set card bits first..last (inclusive), a whole word at a time."""
    cdef size_t first_word = first >> 6
    cdef size_t last_word = last >> 6
    cdef uint64_t head = (~<uint64_t>0) << (first & 63)
    cdef uint64_t tail = (~<uint64_t>0) >> (63 - (last & 63))
    cdef size_t w
    if first_word == last_word:
        words[first_word] |= head & tail
        return
    words[first_word] |= head
    for w in range(first_word + 1, last_word):
        words[w] = ~<uint64_t>0
    words[last_word] |= tail


cdef inline void cards_mark_range(CardBits *t, uintptr_t start, uintptr_t end) noexcept nogil:
    """Mark every card that overlaps [start, end), clipped to the table."""
    cdef uintptr_t limit = t.base + t.size
    if start < t.base:
        start = t.base
    if end > limit:
        end = limit
    if start >= end:
        return
    cards_set_bits(t.words, (start - t.base) >> t.card_shift,
                   (end - 1 - t.base) >> t.card_shift)


cdef void cards_mark_regions(CardBits *t, const gct_page_region *regions,
                             size_t n) noexcept nogil
cdef void cards_or(CardBits *dst, const CardBits *src) noexcept nogil
cdef void cards_merge(CardBits *dst, const CardBits *src) noexcept nogil
cdef void cards_clear(CardBits *t) noexcept nogil
cdef void cards_clear_range(CardBits *t, uintptr_t start, uintptr_t end) noexcept nogil
cdef size_t cards_next_clean(const CardBits *t, size_t card) noexcept nogil
cdef size_t cards_count(const CardBits *t) noexcept nogil
cdef size_t cards_next_dirty(const CardBits *t, size_t card) noexcept nogil


cdef class CardTable:
    """One bit per card over [base, base + size)."""
    cdef CardBits bits
    cdef object words_array        # the numpy uint64 array that owns bits.words

    cdef int check_same_geometry(self, CardTable other) except -1
    cdef int check_covers(self, uintptr_t start, size_t length) except -1
    cdef int check_span(self, object addr, object length) except -1
    cdef object outside(self, object start, object length)
    cdef size_t card_of(self, object addr) except? 0
