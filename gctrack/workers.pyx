# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""GC worker threads (see workers.pxd): pinned, futex-parked, woken per job."""
import os

from libc.errno cimport EINVAL, ENOMEM
from libc.stdlib cimport calloc, free
from posix.unistd cimport getpid

from gctrack.clock cimport monotonic_seconds
from gctrack.threads cimport gct_cpu_relax, pthread_create, pthread_join

#: Collector(workers=None) uses this many threads at most: past a few
#: threads a remark's walk is bound by the page-table lock and memory, not CPUs.
DEFAULT_WORKERS_CAP = 8


def default_workers():
    """The default worker count: the CPUs this process may run on, capped."""
    return max(1, min(len(os.sched_getaffinity(0)), DEFAULT_WORKERS_CAP))


cdef extern from *:
    """
    #include <sched.h>
    #include <signal.h>
    #include <unistd.h>
    #include <sys/syscall.h>
    #include <linux/futex.h>

    static inline unsigned gct_w_load(const unsigned *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void gct_w_store(unsigned *p, unsigned v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline unsigned gct_w_decrement(unsigned *p) { return __atomic_sub_fetch(p, 1, __ATOMIC_ACQ_REL); }
    static inline unsigned gct_w_close(unsigned *p, unsigned bit) {
        return __atomic_and_fetch(p, ~bit, __ATOMIC_ACQ_REL);
    }
    static inline void gct_w_increment(unsigned *p) { __atomic_add_fetch(p, 1, __ATOMIC_RELAXED); }
    /* Add one to *state's count while `open` is set in it; false once it is not. */
    static inline int gct_w_join(unsigned *state, unsigned open) {
        unsigned seen = __atomic_load_n(state, __ATOMIC_ACQUIRE);
        while (seen & open)
            if (__atomic_compare_exchange_n(state, &seen, seen + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                return 1;
        return 0;
    }
    static inline int gct_w_load_int(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void gct_w_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline size_t gct_w_fetch_add(size_t *p) { return __atomic_fetch_add(p, 1, __ATOMIC_RELAXED); }

    /* Sleep while *word == expected (private futex: this process only). */
    static inline void gct_futex_wait(unsigned *word, unsigned expected) {
        syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
    }
    static inline void gct_futex_wake(unsigned *word) {
        syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    }
    static inline int gct_gettid(void) { return (int)syscall(SYS_gettid); }

    /* The CPUs the calling thread may run on, in order, into cpus[0..max);
       returns how many (0 when unknown). */
    static int gct_allowed_cpus(int *cpus, int max) {
        cpu_set_t set;
        int n = 0, cpu;
        if (sched_getaffinity(0, sizeof(set), &set) != 0)
            return 0;
        for (cpu = 0; cpu < CPU_SETSIZE && n < max; cpu++)
            if (CPU_ISSET(cpu, &set))
                cpus[n++] = cpu;
        return n;
    }
    static int gct_pin_thread(pthread_t thread, int cpu) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        return pthread_setaffinity_np(thread, sizeof(set), &set);
    }
    /* Block every signal in the calling thread; the old mask goes to *old. */
    static inline void gct_block_signals(sigset_t *old) {
        sigset_t all;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, old);
    }
    static inline void gct_restore_signals(const sigset_t *old) {
        pthread_sigmask(SIG_SETMASK, old, NULL);
    }
    """
    ctypedef struct sigset_t:
        pass
    unsigned atomic_load "gct_w_load"(const unsigned *p) nogil
    void atomic_store "gct_w_store"(unsigned *p, unsigned v) nogil
    unsigned atomic_decrement "gct_w_decrement"(unsigned *p) nogil
    unsigned atomic_clear_bits "gct_w_close"(unsigned *p, unsigned bits) nogil
    void atomic_increment "gct_w_increment"(unsigned *p) nogil
    bint join_while_open "gct_w_join"(unsigned *state, unsigned open) nogil
    int atomic_load_int "gct_w_load_int"(const int *p) nogil
    void atomic_store_int "gct_w_store_int"(int *p, int v) nogil
    size_t atomic_fetch_add "gct_w_fetch_add"(size_t *p) nogil
    void futex_wait "gct_futex_wait"(unsigned *word, unsigned expected) nogil
    void futex_wake "gct_futex_wake"(unsigned *word) nogil
    int gettid "gct_gettid"() nogil
    int allowed_cpus "gct_allowed_cpus"(int *cpus, int max) nogil
    int pin_thread "gct_pin_thread"(pthread_t thread, int cpu) nogil
    int sched_getcpu() nogil
    int sched_yield() nogil
    void block_signals "gct_block_signals"(sigset_t *old) nogil
    void restore_signals "gct_restore_signals"(const sigset_t *old) nogil


# The caller spins this long waiting for the workers inside its job, then
# sleeps: it is not pinned, and may have moved onto one of their CPUs.
cdef double CALLER_SPIN_SECONDS = 50e-6


cdef void wait_while_equal(unsigned *word, unsigned value, double spin_seconds) noexcept nogil:
    """Return once *word != value: spin for spin_seconds, then sleep on it."""
    cdef double until = monotonic_seconds() + spin_seconds
    while atomic_load(word) == value and monotonic_seconds() < until:
        gct_cpu_relax()
    while atomic_load(word) == value:
        futex_wait(word, value)


# pool.state: JOB_OPEN while the caller of pool_run() may still be working,
# plus how many workers are inside the job.
cdef unsigned JOB_OPEN = 1u << 31


cdef void *worker_main(void *arg) noexcept nogil:
    cdef Worker *w = <Worker *>arg
    cdef WorkerPool *pool = <WorkerPool *>w.pool
    cdef unsigned seen = 0
    atomic_store_int(&w.tid, gettid())
    while True:
        wait_while_equal(&w.job, seen, 0.0)          # asleep between jobs: no CPU taken
        seen = atomic_load(&w.job)
        if atomic_load_int(&pool.stopping):
            return NULL
        take_part(pool, w, seen)


cdef void take_part(WorkerPool *pool, Worker *w, unsigned handed) noexcept nogil:
    """Do the job this worker was handed, unless it woke too late: once the
    caller has finished and closed the job, its context may be gone, and
    the worker must not touch it. While the worker is inside, the caller
    waits, so the job (and pool.generation) cannot change under it."""
    if not join_while_open(&pool.state, JOB_OPEN):
        return
    if handed == atomic_load(&pool.generation):        # not a late riser into a later job
        atomic_increment(&pool.joined)
        pool.fn(pool.ctx, w.participant)
    if atomic_decrement(&pool.state) == 0:              # closed, and the last one out
        futex_wake(&pool.state)


cdef void hand_job(Worker *w, unsigned generation) noexcept nogil:
    atomic_store(&w.job, generation)
    futex_wake(&w.job)


cdef int pool_start(WorkerPool *pool, size_t count) noexcept nogil:
    cdef int cpus[MAX_WORKERS]
    cdef int num_cpus, rc = 0
    cdef size_t k
    cdef sigset_t old_mask
    if pool.workers != NULL or count < 1 or count > MAX_WORKERS:
        return -EINVAL
    pool.workers = <Worker *>calloc(count, sizeof(Worker))
    if pool.workers == NULL:
        return -ENOMEM
    pool.owner_pid = getpid()
    pool.stopping = 0
    num_cpus = allowed_cpus(cpus, MAX_WORKERS)
    block_signals(&old_mask)                         # the threads inherit the mask
    for k in range(count):
        pool.workers[k].pool = pool
        pool.workers[k].cpu = -1
        rc = pthread_create(&pool.workers[k].thread, NULL, worker_main, &pool.workers[k])
        if rc:
            break
        pool.count += 1
        if num_cpus and pin_thread(pool.workers[k].thread, cpus[k % num_cpus]) == 0:
            pool.workers[k].cpu = cpus[k % num_cpus]
    restore_signals(&old_mask)
    if pool.count == 0:
        pool_stop(pool)
        return -rc
    for k in range(pool.count):                     # each has run: its tid is known
        while atomic_load_int(&pool.workers[k].tid) == 0:
            sched_yield()
    return 0


cdef bint cpu_is_free(const Worker *w, int here, Worker **handed, size_t chosen) noexcept nogil:
    """Whether w's CPU runs nobody in the job yet: neither the caller (on
    CPU ``here``) nor a worker already handed it (two on one CPU would
    only take turns)."""
    cdef size_t k
    if w.cpu < 0:
        return True                                  # not pinned: the scheduler places it
    if w.cpu == here:
        return False
    for k in range(chosen):
        if handed[k].cpu == w.cpu:
            return False
    return True


cdef size_t pool_run(WorkerPool *pool, WorkFn fn, void *ctx, size_t max_participants) noexcept nogil:
    cdef size_t k, chosen = 0
    cdef Worker *handed[MAX_WORKERS]
    cdef int here
    cdef unsigned generation, inside
    if pool.count == 0 or getpid() != pool.owner_pid or max_participants <= 1:
        fn(ctx, 0)
        return 1
    if max_participants > MAX_WORKERS:                # participant indices stay below it
        max_participants = MAX_WORKERS
    here = sched_getcpu()
    for k in range(pool.count):
        if chosen + 1 < max_participants and cpu_is_free(&pool.workers[k], here, handed, chosen):
            pool.workers[k].participant = chosen + 1
            handed[chosen] = &pool.workers[k]
            chosen += 1
    generation = pool.generation + 1
    pool.fn = fn
    pool.ctx = ctx
    pool.joined = 0
    atomic_store(&pool.generation, generation)
    atomic_store(&pool.state, JOB_OPEN)              # releases fn, ctx and the indices
    for k in range(chosen):
        hand_job(handed[k], generation)
    fn(ctx, 0)
    # Close the job: a worker that has not joined yet stays out, so waiting
    # costs only the work of those inside, never a sleeping thread's wake-up.
    inside = atomic_clear_bits(&pool.state, JOB_OPEN)
    cdef double until = monotonic_seconds() + CALLER_SPIN_SECONDS
    while inside and monotonic_seconds() < until:
        gct_cpu_relax()
        inside = atomic_load(&pool.state)
    while inside:
        futex_wait(&pool.state, inside)
        inside = atomic_load(&pool.state)
    return 1 + atomic_load(&pool.joined)


cdef void pool_stop(WorkerPool *pool) noexcept nogil:
    cdef size_t k
    if pool.workers == NULL:
        return
    if getpid() == pool.owner_pid:                  # a forked child has none of these threads
        atomic_store_int(&pool.stopping, 1)
        for k in range(pool.count):
            hand_job(&pool.workers[k], pool.generation + 1)
        for k in range(pool.count):
            pthread_join(pool.workers[k].thread, NULL)
    free(pool.workers)
    pool.workers = NULL
    pool.count = 0


# ---- chunks ---------------------------------------------------------------------

cdef void chunks_init(Chunks *c, uintptr_t start, uintptr_t end, uintptr_t size) noexcept nogil:
    c.start = start
    c.end = end
    c.size = size
    c.next = 0


cdef bint chunks_take(Chunks *c, uintptr_t *lo, uintptr_t *hi) noexcept nogil:
    cdef size_t index = atomic_fetch_add(&c.next)
    if index >= (c.end - c.start + c.size - 1) // c.size:
        return False
    lo[0] = c.start + index * c.size
    hi[0] = lo[0] + c.size if c.end - lo[0] > c.size else c.end
    return True


cdef uintptr_t chunk_size_for(uintptr_t length, size_t participants, size_t per_participant,
                              uintptr_t align, uintptr_t minimum) noexcept nogil:
    cdef size_t chunks = participants * per_participant
    cdef uintptr_t size = length // chunks if chunks else length
    if size < minimum:
        size = minimum
    size = (size + align - 1) & ~(align - 1)
    return size if size else align
