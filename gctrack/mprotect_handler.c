/* The SIGSEGV handler of the mprotect backend; see gctrack/mprotect_handler.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "gctrack/mprotect_handler.h"

struct arena_slot {
    uintptr_t start;            /* 0 when the slot is free */
    uintptr_t end;
    uint64_t *words;
    unsigned page_shift;
    /* "set bit + unprotect" (handlers) against "take + re-protect" (a pass,
     * a record, a re-arm): handlers spin on these, which is signal-safe;
     * pass_lock serialises the non-handler side, so one flag is enough. */
    pthread_mutex_t pass_lock;
    int pass_active;
    int handlers_active;
    /* After unregistering, a fault raised just before the pages were made
     * writable may still be on its way to the handler: for a short grace
     * period such a fault is retried instead of being passed on as a crash. */
    uintptr_t retired_start, retired_end;
    struct timespec retired_at;
};

static struct arena_slot slots[GCT_MP_MAX_ARENAS];
static int in_handler;          /* handlers running now (atomic) */
static uint64_t faults;         /* atomic */
static int installed_slots;     /* under registry_lock */
static int in_chain;            /* our handler is installed somewhere in the chain */
static struct sigaction previous;
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;

static const long grace_ns = 1000000000L;   /* one second */

static void enter_handler(struct arena_slot *s)
{
    for (;;) {
        /* Yield, not spin: a pass can take a while, and there may be more
         * writers than cores (sched_yield is a plain system call). */
        while (__atomic_load_n(&s->pass_active, __ATOMIC_SEQ_CST))
            sched_yield();
        __atomic_add_fetch(&s->handlers_active, 1, __ATOMIC_SEQ_CST);
        if (!__atomic_load_n(&s->pass_active, __ATOMIC_SEQ_CST))
            return;
        __atomic_sub_fetch(&s->handlers_active, 1, __ATOMIC_SEQ_CST);
    }
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

/* The handler could not make the page writable (ENOMEM: the process ran out
 * of mappings, which per-page protection splits). Make the whole arena
 * writable, which merges its mappings, and mark all of it dirty: the next pass
 * reports and re-arms it. If even that fails, crash loudly rather than spin. */
static int open_whole_arena(struct arena_slot *s)
{
    size_t units = (s->end - s->start) >> s->page_shift;
    for (size_t w = 0; w < (units + 63) / 64; w++)
        __atomic_fetch_or(&s->words[w], ~(uint64_t)0, __ATOMIC_RELEASE);
    return mprotect((void *)s->start, s->end - s->start, PROT_READ | PROT_WRITE);
}

static void pass_on(int sig, siginfo_t *info, void *context)
{
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, info, context);
    } else if (previous.sa_handler == SIG_DFL || previous.sa_handler == SIG_IGN) {
        /* Die of the signal: restore the default and let the access fault again. */
        signal(sig, SIG_DFL);
    } else {
        previous.sa_handler(sig);
    }
}

static int recently_retired(uintptr_t addr)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    for (int i = 0; i < GCT_MP_MAX_ARENAS; i++) {
        struct arena_slot *s = &slots[i];
        uintptr_t lo = __atomic_load_n(&s->retired_start, __ATOMIC_ACQUIRE);
        if (lo && lo <= addr && addr < s->retired_end) {
            long age = (now.tv_sec - s->retired_at.tv_sec) * 1000000000L +
                       (now.tv_nsec - s->retired_at.tv_nsec);
            return age < grace_ns;
        }
    }
    return 0;
}

static void on_segv(int sig, siginfo_t *info, void *context)
{
    uintptr_t addr = (uintptr_t)info->si_addr;
    int saved_errno = errno;
    int opened = 0;
    __atomic_add_fetch(&in_handler, 1, __ATOMIC_SEQ_CST);
    for (int i = 0; i < GCT_MP_MAX_ARENAS; i++) {
        struct arena_slot *s = &slots[i];
        uintptr_t lo = __atomic_load_n(&s->start, __ATOMIC_SEQ_CST);
        if (lo && lo <= addr && addr < s->end && info->si_code == SEGV_ACCERR) {
            uintptr_t page = addr & ~(((uintptr_t)1 << s->page_shift) - 1);
            size_t bit = (page - lo) >> s->page_shift;
            enter_handler(s);
            __atomic_fetch_or(&s->words[bit >> 6], (uint64_t)1 << (bit & 63), __ATOMIC_RELEASE);
            opened = mprotect((void *)page, (size_t)1 << s->page_shift, PROT_READ | PROT_WRITE) == 0
                     || open_whole_arena(s) == 0;
            __atomic_sub_fetch(&s->handlers_active, 1, __ATOMIC_SEQ_CST);
            __atomic_add_fetch(&faults, 1, __ATOMIC_RELAXED);
            __atomic_sub_fetch(&in_handler, 1, __ATOMIC_SEQ_CST);
            errno = saved_errno;
            if (!opened)
                pass_on(sig, info, context);
            return;
        }
    }
    __atomic_sub_fetch(&in_handler, 1, __ATOMIC_SEQ_CST);
    errno = saved_errno;
    if (info->si_code == SEGV_ACCERR && recently_retired(addr))
        return;
    pass_on(sig, info, context);
}

/* In a forked child only the forking thread exists: whatever handler or pass
 * was in flight in the parent never finishes here. */
static void reset_in_child(void)
{
    in_handler = 0;
    for (int i = 0; i < GCT_MP_MAX_ARENAS; i++) {
        slots[i].pass_active = 0;
        slots[i].handlers_active = 0;
        pthread_mutex_init(&slots[i].pass_lock, NULL);
    }
    pthread_mutex_init(&registry_lock, NULL);
}

static int install_locked(void)
{
    static int atfork_done;
    if (!atfork_done && pthread_atfork(NULL, NULL, reset_in_child) == 0)
        atfork_done = 1;
    struct sigaction ours;
    if (in_chain)
        return 0;
    memset(&ours, 0, sizeof(ours));
    ours.sa_sigaction = on_segv;
    ours.sa_flags = SA_SIGINFO | SA_NODEFER | SA_RESTART | SA_ONSTACK;
    sigemptyset(&ours.sa_mask);
    if (sigaction(SIGSEGV, &ours, &previous) != 0)
        return -errno;
    in_chain = 1;
    return 0;
}

static void uninstall_locked(void)
{
    struct sigaction current;
    /* Give the old handler back only if nobody installed theirs over ours;
     * if somebody did, ours stays in their chain and stays installed. */
    if (sigaction(SIGSEGV, NULL, &current) == 0 && (current.sa_flags & SA_SIGINFO) &&
        current.sa_sigaction == on_segv && sigaction(SIGSEGV, &previous, NULL) == 0)
        in_chain = 0;
}

int gct_mp_register(uintptr_t start, size_t size, uint64_t *words, unsigned page_shift)
{
    int slot = -ENOSPC;
    pthread_mutex_lock(&registry_lock);
    for (int i = 0; i < GCT_MP_MAX_ARENAS; i++) {
        if (slots[i].start == 0) {
            slot = i;
            break;
        }
    }
    if (slot >= 0 && installed_slots == 0) {
        int rc = install_locked();
        if (rc)
            slot = rc;
    }
    if (slot >= 0) {
        struct arena_slot *s = &slots[slot];
        s->end = start + size;
        s->words = words;
        s->page_shift = page_shift;
        s->pass_active = 0;
        s->handlers_active = 0;
        pthread_mutex_init(&s->pass_lock, NULL);
        __atomic_store_n(&s->retired_start, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&s->start, start, __ATOMIC_RELEASE);   /* publish last */
        installed_slots++;
    }
    pthread_mutex_unlock(&registry_lock);
    return slot;
}

void gct_mp_unregister(int slot)
{
    struct arena_slot *s = &slots[slot];
    pthread_mutex_lock(&registry_lock);
    s->retired_end = s->end;
    clock_gettime(CLOCK_MONOTONIC, &s->retired_at);
    __atomic_store_n(&s->retired_start, s->start, __ATOMIC_RELEASE);
    __atomic_store_n(&s->start, 0, __ATOMIC_SEQ_CST);
    /* A handler that matched the slot may still be setting a bit in words.
     * (Sequentially consistent on both sides: the store above and the
     * handler's increment must not both be missed.) */
    while (__atomic_load_n(&in_handler, __ATOMIC_SEQ_CST))
        sched_yield();
    s->words = NULL;
    if (--installed_slots == 0)
        uninstall_locked();
    pthread_mutex_unlock(&registry_lock);
}

uint64_t gct_mp_faults(void)
{
    return __atomic_load_n(&faults, __ATOMIC_RELAXED);
}
