/*
 * The cost of the software barrier to a C embedder: one store per object,
 * with no barrier, with the inline gct_barrier_mark(), and with the capsule's
 * record(). Loaded with ctypes: bind() (with the GIL, through PyDLL) imports
 * the C API and takes the handles; store_loop() runs without the GIL.
 */
#include <Python.h>

#include "gctrack/gctrack.h"

static const gct_capi *gct;
static gct_tracker *tracker;
static const gct_barrier *barrier;
static volatile uint64_t *heap;
static size_t words;

/* 0, or -1 with a Python exception set. */
int bind(PyObject *arena, PyObject *software_tracker)
{
    size_t size;
    gct = gct_import_capi();
    if (gct == NULL)
        return -1;
    heap = gct->arena_memory(arena, &size);
    tracker = heap ? gct->tracker_handle(software_tracker) : NULL;
    barrier = tracker ? gct->barrier_handle(software_tracker) : NULL;
    words = size / sizeof(uint64_t);
    return barrier ? 0 : -1;
}

/* `count` stores, one page apart, each followed by the barrier `mode` names:
 * 0 none, 1 gct_barrier_mark (inline), 2 the capsule's record(). */
void store_loop(int mode, size_t count)
{
    size_t stride = 4096 / sizeof(uint64_t) + 1, k = 0;
    for (size_t i = 0; i < count; i++) {
        k += stride;
        if (k >= words)
            k -= words;
        heap[k] = i;
        if (mode == 1)
            gct_barrier_mark(barrier, (uintptr_t)&heap[k]);
        else if (mode == 2)
            gct->record(tracker, (uintptr_t)&heap[k], (uintptr_t)&heap[k] + 8);
    }
}
