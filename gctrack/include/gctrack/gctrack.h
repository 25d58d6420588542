/*
 * gctrack's C API, for extensions written in C (Cython code can cimport the
 * .pxd files instead; both reach the same functions).
 *
 *     #include <Python.h>
 *     #include "gctrack/gctrack.h"          // include_dirs=[gctrack.get_include()]
 *
 *     static const gct_capi *gct;
 *     ... in the module's init:  gct = gct_import_capi(); if (!gct) return NULL;
 *
 * ABI rules
 * - The capsule "gctrack._C_API" holds one gct_capi table. `version` changes
 *   only when an existing entry changes meaning or signature; new entries
 *   are appended and grow `size`. gct_import_capi() refuses a different
 *   version, or a table smaller than the one this header describes.
 * - gct_cards and gct_pass_counts are stable layouts; gct_tracker is opaque.
 * - The *_handle and arena_memory entries need the GIL. They return borrowed
 *   pointers into the Python objects: keep a reference to those objects for
 *   as long as you use the pointers.
 * - Every other entry runs without the GIL, from any thread. Passes, drain
 *   and the background loop of one tracker are serialised by the tracker's
 *   own lock. record() and the external-write brackets take no tracker lock
 *   (on mprotect and uffd_sync they wait for a running pass); close() waits
 *   for those already inside the backend, and for a running pass. The card
 *   functions take no lock: two threads must not mark one card table at once.
 * - The verifier's check is also called without the GIL; see its entry.
 * - Tracker calls return 0 or a negative errno, with the Python API's
 *   guards: -EINVAL for a NULL tracker or cards, a card table that does not
 *   cover the tracker's whole arena (a pass re-arms every page it reports,
 *   so a page it could not mark would never be reported again) or a range
 *   outside the arena; -EBADF once the tracker is closed; -ECHILD in a
 *   forked child; -EBUSY for collect() while the background loop runs;
 *   -EPERM for collect() or drain() on a tracker that a gctrack.Heap owns
 *   (its Collector's dirty cards are not yours to take). A NULL `counts`
 *   is allowed.
 *
 * Which writes need what
 * - CPU stores into the arena: nothing on the kernel backends (pagemap_scan,
 *   mprotect, uffd_sync, soft_dirty) - the page tables catch them. On the
 *   software backend every store needs the barrier, AFTER the store: call
 *   gct_barrier_mark() (or record()) once the store is done, never before it,
 *   or a pass between the two misses the store.
 * - record(start, end) declares a write that has completed: always after.
 * - Writes that bypass the page-table fault path - DMA, O_DIRECT reads,
 *   io_uring registered buffers, RDMA, /proc/PID/mem, process_vm_writev -
 *   go inside begin_external_write() ... end_external_write() on the same
 *   range: begin before submitting the I/O, end once it has completed. Every
 *   byte written inside the bracket is reported by a pass that starts after
 *   end_external_write() returns, on every backend.
 */
#ifndef GCTRACK_H
#define GCTRACK_H

#include <stddef.h>
#include <stdint.h>

/* A card table: card i is bit i % 64 of words[i / 64]; it covers
 * [base, base + size) in cards of (1 << card_shift) bytes. */
typedef struct gct_cards {
    uint64_t *words;
    uintptr_t base;
    size_t size;
    size_t num_cards;
    size_t num_words;
    unsigned card_shift;
} gct_cards;

/* What one pass reported and cost. */
typedef struct gct_pass_counts {
    uint64_t regions;   /* regions reported */
    uint64_t pages;     /* pages reported */
    uint64_t calls;     /* kernel calls the pass made */
    double seconds;     /* wall time of the pass */
} gct_pass_counts;

typedef struct gct_tracker gct_tracker;     /* opaque */

/* The software backend's card-marking barrier: one bit per card of
 * [base, base + size). `size` reads 0 once the tracker is closed, and the
 * barrier then marks nothing; `words` stays allocated while the tracker
 * object lives, so a barrier racing close() stores into live memory. */
typedef struct gct_barrier {
    uint64_t *words;
    uintptr_t base;
    size_t size;
    unsigned card_shift;
} gct_barrier;

/* Mark the card holding addr, after the store to addr; returns 1, or 0 when
 * addr lies outside the tracked arena (or the tracker is closed). Lock-free,
 * any thread, no GIL. */
static inline int gct_barrier_mark(const gct_barrier *b, uintptr_t addr)
{
    uintptr_t offset = addr - b->base;
    if (offset >= __atomic_load_n(&b->size, __ATOMIC_RELAXED))
        return 0;
    size_t card = offset >> b->card_shift;
    __atomic_fetch_or(&b->words[card >> 6], (uint64_t)1 << (card & 63), __ATOMIC_RELEASE);
    return 1;
}

/* BarrierVerifier: one store that changed a word of the arena on a card
 * the runtime's barrier did not mark (a missed barrier). 8-byte-aligned
 * `address`; `old` is the word at the previous check (or at construction),
 * `new_value` its value now. A stable layout: gctrack.MISSED_DTYPE, whose
 * fields are address, old and new. */
typedef struct gct_missed_store {
    uint64_t address;
    uint64_t old;
    uint64_t new_value;
} gct_missed_store;

/* What one verifier check compared and found. */
typedef struct gct_verify_counts {
    uint64_t pages_written;  /* pages the kernel reported written, compared */
    uint64_t words_changed;  /* 8-byte words whose value differs from the snapshot */
    uint64_t missed;         /* of those, on unmarked cards: all of them, even past capacity */
    double seconds;          /* wall time of the check */
} gct_verify_counts;

typedef struct gct_verifier gct_verifier;   /* opaque */

#define GCTRACK_CAPI_NAME "gctrack._C_API"
#define GCTRACK_CAPI_VERSION 1u

#ifdef Py_PYTHON_H

typedef struct gct_capi {
    unsigned version;                       /* GCTRACK_CAPI_VERSION */
    size_t size;                            /* sizeof(gct_capi) in the library */

    /* With the GIL. NULL with an exception set on a wrong type or a closed object. */
    gct_tracker *(*tracker_handle)(PyObject *tracker);
    gct_cards *(*cards_handle)(PyObject *card_table);
    void *(*arena_memory)(PyObject *arena, size_t *size);

    /* Without the GIL, from any thread. */
    int (*collect)(gct_tracker *tracker, gct_cards *cards, int reset, gct_pass_counts *counts);
    int (*drain)(gct_tracker *tracker, gct_cards *cards, gct_pass_counts *counts);
    int (*record)(gct_tracker *tracker, uintptr_t start, uintptr_t end);
    size_t (*next_dirty_card)(const gct_cards *cards, size_t from);   /* num_cards: none */
    size_t (*next_clean_card)(const gct_cards *cards, size_t from);   /* num_cards: none */
    void (*mark_range)(gct_cards *cards, uintptr_t start, uintptr_t end);
    void (*clear_cards)(gct_cards *cards);

    /* Appended in 0.2. */
    int (*begin_external_write)(gct_tracker *tracker, uintptr_t start, uintptr_t end);
    int (*end_external_write)(gct_tracker *tracker, uintptr_t start, uintptr_t end);
    /* With the GIL: the barrier of a software-backend tracker; NULL with
     * TypeError set for another backend, ValueError once closed. */
    const gct_barrier *(*barrier_handle)(PyObject *tracker);

    /* Appended in 0.3: gctrack.BarrierVerifier.
     * verifier_new (with the GIL): a new reference to BarrierVerifier(arena,
     * card_table); NULL with the exception set (UnsupportedError where
     * pagemap_scan is missing, ValueError for a table that does not cover
     * the arena). verifier_handle (with the GIL): its borrowed C handle;
     * NULL with ValueError once closed. verifier_close (with the GIL): 0, or
     * -1 with an exception set; idempotent. The object also closes when its
     * last reference goes.
     * verifier_check (without the GIL, at a safepoint: no mutator storing):
     * compare every word of the pages written since the last check, write
     * the first `capacity` missed stores, in address order, to `missed`
     * (NULL when capacity is 0), fill `counts` (may be NULL), clear the
     * arena's cards when `clear` is non-zero, re-arm. Returns the number of
     * missed stores (counts->missed, which may exceed capacity) or -errno:
     * -EINVAL (NULL verifier, or NULL missed with capacity > 0), -EBADF
     * (closed), -ECHILD (forked child), or the kernel's PAGEMAP_SCAN error.
     * Checks of one verifier are serialised; close() waits for a running one. */
    PyObject *(*verifier_new)(PyObject *arena, PyObject *card_table);
    gct_verifier *(*verifier_handle)(PyObject *verifier);
    long (*verifier_check)(gct_verifier *verifier, int clear, gct_missed_store *missed,
                           size_t capacity, gct_verify_counts *counts);
    int (*verifier_close)(PyObject *verifier);
} gct_capi;

/* Import the table (with the GIL); NULL with ImportError set on a mismatch. */
static inline const gct_capi *gct_import_capi(void)
{
    const gct_capi *api = (const gct_capi *)PyCapsule_Import(GCTRACK_CAPI_NAME, 0);
    if (api != NULL && (api->version != GCTRACK_CAPI_VERSION || api->size < sizeof(gct_capi))) {
        PyErr_Format(PyExc_ImportError,
                     "gctrack C API version %u with %zu-byte table; this extension needs "
                     "version %u with at least %zu bytes", api->version, api->size,
                     GCTRACK_CAPI_VERSION, sizeof(gct_capi));
        return NULL;
    }
    return api;
}

#endif /* Py_PYTHON_H */
#endif /* GCTRACK_H */
