/*
 * The SIGSEGV handler behind gctrack's "mprotect" backend.
 *
 * Arenas are registered with their dirty bitmap. A write fault inside one
 * sets the page's bit and then makes the page writable (in that order, so a
 * write completes only after its bit is set: see gctrack/dirtymap.pxd).
 * Faults anywhere else go to the handler that was installed before ours, so
 * a real crash still crashes loudly (and Python's faulthandler still reports
 * it, when it was enabled before the first arming).
 *
 * Lifetime: the handler is installed by the first registration and stays
 * installed for the life of the process; it is never replaced by the previous
 * handler (nor SIG_DFL), because a write fault raised just before an arena
 * was unregistered may still be on its way to it. Such a fault lands in a
 * retired range and is retried; a retired range is forgotten only after
 * GCT_MP_RETIRED later retirements. The same thread faulting again at the
 * same address with no retirement in between is a real fault and is passed
 * on, so nothing loops forever. In a forked child, the handler never waits on
 * a pass inherited from the parent.
 */
#ifndef GCTRACK_MPROTECT_HANDLER_H
#define GCTRACK_MPROTECT_HANDLER_H

#include <stddef.h>
#include <stdint.h>

#define GCT_MP_MAX_ARENAS 64
#define GCT_MP_RETIRED 256

/* Track [start, start + size): install the handler if needed. A slot, or
 * -ENOSPC (no free slot), -EBUSY (another SIGSEGV handler replaced ours:
 * gct_mp_describe_handler says which), or the -errno of a failed sigaction. */
int gct_mp_register(uintptr_t start, size_t size, uint64_t *words, unsigned page_shift);

/* Stop tracking a slot; the caller has already made its pages writable.
 * Returns 1 when the caller may free the slot's words, 0 when it must not
 * (a forked child: a thread of the parent may have been using them at fork). */
int gct_mp_unregister(int slot);

/* Bracket a pass's "take + re-protect": handlers of the slot wait meanwhile.
 * The thread running the pass must not write to the arena in between. */
void gct_mp_begin_pass(int slot);
void gct_mp_end_pass(int slot);

/* Whether the SIGSEGV handler installed now is gctrack's. */
int gct_mp_handler_is_current(void);

/* Describe the SIGSEGV handler that replaced gctrack's into buf (one line);
 * 0 when gctrack's is the one installed, -1 otherwise. */
int gct_mp_describe_handler(char *buf, size_t len);

/* Mark every page of the slot dirty and make the arena writable: what to do
 * when its writes can no longer be caught. 0 or -errno. */
int gct_mp_open_slot(int slot);

/* Faults the handler has resolved, over all arenas. */
uint64_t gct_mp_faults(void);

#endif
