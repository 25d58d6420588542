/* The SIGSEGV handler of the mprotect backend; see gctrack/mprotect_handler.h. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "gctrack/mprotect_handler.h"

struct arena_slot {
    uintptr_t start;            /* 0 when the slot is free; published last (atomic) */
    uintptr_t end;
    uint64_t *words;
    unsigned page_shift;
    pid_t pid;                  /* the process that registered it */
    int users;                  /* handlers reading this slot now (atomic) */
    /* "set bit + unprotect" (handlers) against "take + re-protect" (a pass,
     * a record, a re-arm): handlers spin on these, which is signal-safe;
     * pass_lock serialises the non-handler side, so one flag is enough. */
    pthread_mutex_t pass_lock;
    int pass_active;
    int handlers_active;
};

/* Ranges that were unregistered, kept apart from the slots so that reusing a
 * slot cannot wipe them. A range retired again is refreshed in place; the
 * least recently retired is overwritten first. */
struct retired_range {
    uintptr_t start;            /* written last (atomic) */
    uintptr_t end;
    uint64_t retired_at;        /* the retirement count when it was last retired */
};

static struct arena_slot slots[GCT_MP_MAX_ARENAS];
static struct retired_range retired[GCT_MP_RETIRED];    /* written under the registry lock */
static uint64_t retirements;                            /* atomic: one per unregistration */
static uint64_t faults;                                 /* atomic */

/* Per thread (initial-exec TLS: no allocation in the handler): the last
 * retired-range fault this thread retried, and the retirement count then. */
static __thread uintptr_t retried_addr __attribute__((tls_model("initial-exec")));
static __thread uint64_t retried_at __attribute__((tls_model("initial-exec")));

/* The registry lock holds the pid of its holder. A holder from another pid
 * was a thread of the parent at fork(): nobody in this process will release
 * it, so it is taken over (unlike a pthread mutex, which would deadlock). */
static pid_t registry_holder;
static int installed;                   /* ours was installed once (under the lock) */
static struct sigaction previous;       /* where foreign faults go (under the lock) */

static void lock_registry(void)
{
    pid_t me = getpid();
    for (;;) {
        pid_t holder = 0;
        if (__atomic_compare_exchange_n(&registry_holder, &holder, me, 0,
                                        __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            return;
        if (holder != me && __atomic_compare_exchange_n(&registry_holder, &holder, me, 0,
                                                        __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            return;
        sched_yield();
    }
}

static void unlock_registry(void)
{
    __atomic_store_n(&registry_holder, 0, __ATOMIC_RELEASE);
}

/* ---- the handler ---------------------------------------------------------- */

/* Wait until no pass is taking this slot's bits, then count this handler in.
 * Returns 0 without counting in a forked child whose parent was in a pass at
 * fork(): that pass never ends here. */
static int enter_handler(struct arena_slot *s)
{
    for (;;) {
        if (__atomic_load_n(&s->pass_active, __ATOMIC_SEQ_CST)) {
            if (getpid() != s->pid)
                return 0;
            /* Yield, not spin: a pass can take a while, and there may be
             * more writers than cores (sched_yield is a plain system call). */
            sched_yield();
            continue;
        }
        __atomic_add_fetch(&s->handlers_active, 1, __ATOMIC_SEQ_CST);
        if (!__atomic_load_n(&s->pass_active, __ATOMIC_SEQ_CST))
            return 1;
        __atomic_sub_fetch(&s->handlers_active, 1, __ATOMIC_SEQ_CST);
    }
}

static void leave_handler(struct arena_slot *s)
{
    __atomic_sub_fetch(&s->handlers_active, 1, __ATOMIC_SEQ_CST);
}

static void mark_all_dirty(struct arena_slot *s)
{
    size_t units = (s->end - s->start) >> s->page_shift;
    for (size_t w = 0; w < (units + 63) / 64; w++)
        __atomic_fetch_or(&s->words[w], ~(uint64_t)0, __ATOMIC_RELEASE);
}

/* Mark the whole arena dirty and make it writable, which also merges its
 * mappings: the next pass reports and re-arms all of it. */
static int open_whole_arena(struct arena_slot *s)
{
    mark_all_dirty(s);
    return mprotect((void *)s->start, s->end - s->start, PROT_READ | PROT_WRITE) == 0 ? 0 : -errno;
}

/* Record the write fault at addr in slot s: set its bit, then make the page
 * writable (the whole arena when that fails with ENOMEM, because the process
 * ran out of mappings, which per-page protection splits). 0 when it could
 * not be opened at all: crash loudly rather than spin. */
static int record_write(struct arena_slot *s, uintptr_t start, uintptr_t addr)
{
    uintptr_t page_size = (uintptr_t)1 << s->page_shift;
    uintptr_t page = addr & ~(page_size - 1);
    size_t bit = (page - start) >> s->page_shift;
    int counted = enter_handler(s);
    __atomic_fetch_or(&s->words[bit >> 6], (uint64_t)1 << (bit & 63), __ATOMIC_RELEASE);
    int opened = mprotect((void *)page, page_size, PROT_READ | PROT_WRITE) == 0
                 || open_whole_arena(s) == 0;
    if (counted)
        leave_handler(s);
    return opened;
}

/* 1 if addr lies in a registered arena and the write was let through, 0 if
 * it lies in none, -1 if it could not be let through. */
static int resolve_tracked_fault(uintptr_t addr)
{
    for (int i = 0; i < GCT_MP_MAX_ARENAS; i++) {
        struct arena_slot *s = &slots[i];
        uintptr_t lo = __atomic_load_n(&s->start, __ATOMIC_ACQUIRE);
        if (!lo || addr < lo || addr >= __atomic_load_n(&s->end, __ATOMIC_RELAXED))
            continue;
        /* Count in, then check the slot is still that arena: unregistering
         * clears start and then waits for users to drop to 0 (both sides
         * sequentially consistent, so they cannot both miss each other). */
        __atomic_add_fetch(&s->users, 1, __ATOMIC_SEQ_CST);
        int ours = __atomic_load_n(&s->start, __ATOMIC_SEQ_CST) == lo && addr < s->end;
        int opened = ours && record_write(s, lo, addr);
        __atomic_sub_fetch(&s->users, 1, __ATOMIC_SEQ_CST);
        if (ours) {
            __atomic_add_fetch(&faults, 1, __ATOMIC_RELAXED);
            return opened ? 1 : -1;
        }
    }
    return 0;
}

static int in_retired_range(uintptr_t addr)
{
    for (int i = 0; i < GCT_MP_RETIRED; i++) {
        uintptr_t lo = __atomic_load_n(&retired[i].start, __ATOMIC_ACQUIRE);
        if (lo && lo <= addr && addr < __atomic_load_n(&retired[i].end, __ATOMIC_RELAXED))
            return 1;
    }
    return 0;
}

/* A write fault raised before its arena was unregistered (and made writable)
 * can arrive after: retry it. But if this thread already retried this address
 * and nothing was retired since, the page really is read-only: pass it on. */
static int retry_retired_fault(uintptr_t addr)
{
    uint64_t now = __atomic_load_n(&retirements, __ATOMIC_SEQ_CST);
    if (!in_retired_range(addr))
        return 0;
    if (retried_addr == addr && retried_at == now)
        return 0;
    retried_addr = addr;
    retried_at = now;
    return 1;
}

static void pass_on(int sig, siginfo_t *info, void *context)
{
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, info, context);
    } else if (previous.sa_handler == SIG_DFL || previous.sa_handler == SIG_IGN) {
        /* Die of the signal: restore the default and let the access fault
         * again. Only for a real fault, which is about to end the process. */
        signal(sig, SIG_DFL);
    } else {
        previous.sa_handler(sig);
    }
}

static void on_segv(int sig, siginfo_t *info, void *context)
{
    int saved_errno = errno;
    uintptr_t addr = (uintptr_t)info->si_addr;
    int handled = 0;
    if (info->si_code == SEGV_ACCERR) {
        int tracked = resolve_tracked_fault(addr);
        handled = tracked > 0 || (tracked == 0 && retry_retired_fault(addr));
    }
    errno = saved_errno;
    if (!handled)
        pass_on(sig, info, context);
}

/* ---- installing it ------------------------------------------------------- */

static int is_ours(const struct sigaction *action)
{
    return (action->sa_flags & SA_SIGINFO) && action->sa_sigaction == on_segv;
}

static int is_default(const struct sigaction *action)
{
    return !(action->sa_flags & SA_SIGINFO) &&
           (action->sa_handler == SIG_DFL || action->sa_handler == SIG_IGN);
}

static int install_locked(const struct sigaction *current)
{
    struct sigaction ours, replaced;
    memset(&ours, 0, sizeof(ours));
    ours.sa_sigaction = on_segv;
    ours.sa_flags = SA_SIGINFO | SA_NODEFER | SA_RESTART | SA_ONSTACK;
    sigemptyset(&ours.sa_mask);
    previous = *current;            /* before ours can run */
    if (sigaction(SIGSEGV, &ours, &replaced) != 0)
        return -errno;
    previous = replaced;            /* in case it changed in between */
    installed = 1;
    return 0;
}

/* Make sure ours is the handler in place. The first time, ours goes over
 * whatever is there and chains to it. Later, if ours was removed and SIGSEGV
 * is back to its default, ours goes back; but a handler that someone put over
 * ours may chain to ours, and going over it would make a loop: -EBUSY. */
static int ensure_installed_locked(void)
{
    struct sigaction current;
    if (sigaction(SIGSEGV, NULL, &current) != 0)
        return -errno;
    if (is_ours(&current))
        return 0;
    if (installed && !is_default(&current))
        return -EBUSY;
    return install_locked(&current);
}

int gct_mp_handler_is_current(void)
{
    struct sigaction current;
    return sigaction(SIGSEGV, NULL, &current) == 0 && is_ours(&current);
}

static void *handler_address(const struct sigaction *action)
{
    return (action->sa_flags & SA_SIGINFO) ? (void *)action->sa_sigaction
                                           : (void *)action->sa_handler;
}

static int same_handler(int sig, const struct sigaction *action)
{
    struct sigaction other;
    return sigaction(sig, NULL, &other) == 0 && handler_address(&other) == handler_address(action);
}

/* Who installed it, guessed from the other signals it handles: Python's
 * signal.signal() uses one C trampoline for every signal, SIGINT included;
 * faulthandler handles SIGBUS and SIGFPE with the same function too. */
static const char *guess_owner(const struct sigaction *action)
{
    if (same_handler(SIGINT, action))
        return "a Python-level handler (signal.signal(SIGSEGV, ...))";
    if (same_handler(SIGBUS, action) && same_handler(SIGFPE, action))
        return "a crash reporter that also handles SIGBUS and SIGFPE "
               "(faulthandler.enable() after arming?)";
    return "another handler";
}

int gct_mp_describe_handler(char *buf, size_t len)
{
    struct sigaction current;
    Dl_info where;
    if (sigaction(SIGSEGV, NULL, &current) != 0) {
        snprintf(buf, len, "SIGSEGV handler unknown: sigaction failed (%s)", strerror(errno));
        return -1;
    }
    if (is_ours(&current)) {
        snprintf(buf, len, "SIGSEGV handler is gctrack's");
        return 0;
    }
    if (is_default(&current)) {
        snprintf(buf, len, "SIGSEGV handler replaced by %s (faulthandler.disable() or "
                 "signal.signal(SIGSEGV, ...) after arming?)",
                 current.sa_handler == SIG_IGN ? "SIG_IGN" : "SIG_DFL");
        return -1;
    }
    void *address = handler_address(&current);
    const char *library = "?", *symbol = NULL;
    if (dladdr(address, &where) && where.dli_fname) {
        library = strrchr(where.dli_fname, '/') ? strrchr(where.dli_fname, '/') + 1 : where.dli_fname;
        symbol = where.dli_saddr == address ? where.dli_sname : NULL;
    }
    if (symbol)
        snprintf(buf, len, "SIGSEGV handler replaced by %s: %s in %s",
                 guess_owner(&current), symbol, library);
    else
        snprintf(buf, len, "SIGSEGV handler replaced by %s: %p in %s",
                 guess_owner(&current), address, library);
    return -1;
}

/* ---- arenas -------------------------------------------------------------- */

static int claim_slot_locked(uintptr_t start, size_t size, uint64_t *words, unsigned page_shift)
{
    for (int i = 0; i < GCT_MP_MAX_ARENAS; i++) {
        struct arena_slot *s = &slots[i];
        /* users > 0 on a free slot: a handler is leaving it, or (in a forked
         * child) a thread of the parent was in it at fork() and never will. */
        if (s->start != 0 || __atomic_load_n(&s->users, __ATOMIC_SEQ_CST) != 0)
            continue;
        __atomic_store_n(&s->end, start + size, __ATOMIC_RELAXED);
        s->words = words;
        s->page_shift = page_shift;
        s->pid = getpid();
        s->pass_active = 0;
        s->handlers_active = 0;
        pthread_mutex_init(&s->pass_lock, NULL);
        __atomic_store_n(&s->start, start, __ATOMIC_SEQ_CST);     /* publish last */
        return i;
    }
    return -ENOSPC;
}

int gct_mp_register(uintptr_t start, size_t size, uint64_t *words, unsigned page_shift)
{
    lock_registry();
    int rc = ensure_installed_locked();
    if (rc == 0)
        rc = claim_slot_locked(start, size, words, page_shift);
    unlock_registry();
    return rc;
}

/* The entry to reuse for a newly retired range: the same range if it is
 * there, else a free entry, else the least recently retired one. */
static struct retired_range *retired_entry_for(uintptr_t start, uintptr_t end)
{
    struct retired_range *oldest = &retired[0];
    for (int i = 0; i < GCT_MP_RETIRED; i++) {
        struct retired_range *r = &retired[i];
        if ((r->start == start && r->end == end) || r->start == 0)
            return r;
        if (r->retired_at < oldest->retired_at)
            oldest = r;
    }
    return oldest;
}

static void remember_retired_locked(uintptr_t start, uintptr_t end)
{
    struct retired_range *r = retired_entry_for(start, end);
    uint64_t now = __atomic_add_fetch(&retirements, 1, __ATOMIC_SEQ_CST);
    if (r->start != start || r->end != end) {
        __atomic_store_n(&r->start, 0, __ATOMIC_SEQ_CST);
        __atomic_store_n(&r->end, end, __ATOMIC_RELAXED);
        __atomic_store_n(&r->start, start, __ATOMIC_SEQ_CST);
    }
    r->retired_at = now;
}

int gct_mp_unregister(int slot)
{
    struct arena_slot *s = &slots[slot];
    int may_free = 1;
    lock_registry();
    /* Retired before the slot is cleared: a fault on its way is always
     * recognised, as one or the other. */
    remember_retired_locked(s->start, s->end);
    __atomic_store_n(&s->start, 0, __ATOMIC_SEQ_CST);
    if (s->pid == getpid()) {
        /* A handler that matched the slot may still be setting a bit in words. */
        while (__atomic_load_n(&s->users, __ATOMIC_SEQ_CST))
            sched_yield();
        s->words = NULL;
    } else {
        may_free = 0;       /* the count may belong to a parent's thread: never wait on it */
    }
    unlock_registry();
    return may_free;
}

void gct_mp_begin_pass(int slot)
{
    struct arena_slot *s = &slots[slot];
    pthread_mutex_lock(&s->pass_lock);
    __atomic_store_n(&s->pass_active, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&s->handlers_active, __ATOMIC_SEQ_CST))
        sched_yield();
}

void gct_mp_end_pass(int slot)
{
    __atomic_store_n(&slots[slot].pass_active, 0, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&slots[slot].pass_lock);
}

int gct_mp_open_slot(int slot)
{
    return open_whole_arena(&slots[slot]);
}

uint64_t gct_mp_faults(void)
{
    return __atomic_load_n(&faults, __ATOMIC_RELAXED);
}
