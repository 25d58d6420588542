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
 *   own lock; record() and the card functions take no lock. Closing a
 *   tracker while another thread is inside one of its calls is undefined;
 *   after close() the calls return -EBADF.
 * - Calls return 0 or a negative errno.
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
