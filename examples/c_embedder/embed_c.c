/*
 * A minimal plain-C embedder: it reaches gctrack through the "gctrack._C_API"
 * capsule. mutate_and_collect(arena, tracker, cards, stride) stores into every
 * stride-th 64-byte object, runs a pass, all without the GIL, and returns the
 * dirty card numbers. A software-backend tracker needs the barrier after
 * each store (gct_barrier_mark, inline); the kernel backends need nothing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "gctrack/gctrack.h"

static const gct_capi *gct;

static PyObject *mutate_and_collect(PyObject *self, PyObject *args)
{
    PyObject *arena, *tracker, *card_table;
    Py_ssize_t stride;
    size_t size;
    if (!PyArg_ParseTuple(args, "OOOn", &arena, &tracker, &card_table, &stride))
        return NULL;
    if (stride <= 0)
        return PyErr_Format(PyExc_ValueError, "stride must be positive");
    uint64_t *heap = gct->arena_memory(arena, &size);
    gct_tracker *t = heap ? gct->tracker_handle(tracker) : NULL;
    gct_cards *cards = t ? gct->cards_handle(card_table) : NULL;
    if (cards == NULL)
        return NULL;
    const gct_barrier *barrier = gct->barrier_handle(tracker);    /* software only */
    if (barrier == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError))
            return NULL;
        PyErr_Clear();
    }

    int rc;
    gct_pass_counts counts;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < size / 64; i += (size_t)stride) {
        uint64_t *object = heap + i * 8;
        *object = i + 1;
        if (barrier != NULL)
            gct_barrier_mark(barrier, (uintptr_t)object);   /* after the store, never before */
    }
    rc = gct->collect(t, cards, 1, &counts);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        errno = -rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }

    PyObject *dirty = PyList_New(0);
    for (size_t card = gct->next_dirty_card(cards, 0); dirty && card < cards->num_cards;
         card = gct->next_dirty_card(cards, card + 1)) {
        PyObject *number = PyLong_FromSize_t(card);
        if (number == NULL || PyList_Append(dirty, number) < 0)
            Py_CLEAR(dirty);
        Py_XDECREF(number);
    }
    return dirty;
}

static PyMethodDef methods[] = {
    {"mutate_and_collect", mutate_and_collect, METH_VARARGS,
     "Store into every stride-th object, run a pass; return the dirty cards."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "embed_c", NULL, -1, methods};

PyMODINIT_FUNC PyInit_embed_c(void)
{
    gct = gct_import_capi();
    if (gct == NULL)
        return NULL;
    return PyModule_Create(&module);
}
