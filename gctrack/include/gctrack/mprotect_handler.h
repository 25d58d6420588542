/*
 * The SIGSEGV handler behind gctrack's "mprotect" backend.
 *
 * Arenas are registered with their dirty bitmap; a write fault inside one
 * makes the page writable again and then sets its bit (that order is what
 * keeps writes from being lost: see gctrack/dirtymap.pxd). Faults anywhere
 * else go to the handler that was installed before ours, so a real crash
 * still crashes loudly (and Python's faulthandler still reports it).
 */
#ifndef GCTRACK_MPROTECT_HANDLER_H
#define GCTRACK_MPROTECT_HANDLER_H

#include <stddef.h>
#include <stdint.h>

#define GCT_MP_MAX_ARENAS 64

/* Track [start, start + size): install the handler if needed. A slot, or -errno. */
int gct_mp_register(uintptr_t start, size_t size, uint64_t *words, unsigned page_shift);

/* Stop tracking a slot; the caller has already made its pages writable. */
void gct_mp_unregister(int slot);

/* Bracket a pass's "take + re-protect": handlers of the slot wait meanwhile.
 * The thread running the pass must not write to the arena in between. */
void gct_mp_begin_pass(int slot);
void gct_mp_end_pass(int slot);

/* Faults the handler has resolved, over all arenas. */
uint64_t gct_mp_faults(void);

#endif
