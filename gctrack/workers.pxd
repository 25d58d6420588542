# cython: language_level=3
"""GC worker threads: a pool of pinned native threads that share the work of
a stopped-world phase (the remark) with the thread that runs it.

The threads sleep on a futex until pool_run() hands them a job, and again as
soon as it is done, so they cost nothing while the mutators run; they are
woken only by the collector, once the world is stopped. Each is pinned to one CPU of the creating
thread's affinity set: an unpinned helper on a busy 2-CPU machine can wait a
whole scheduler tick (4 ms) for a CPU. pool_run() never wakes the worker
pinned to the caller's own CPU (the caller takes that share itself).
"""
from libc.stdint cimport uintptr_t
from gctrack.threads cimport pthread_t

# The most threads a pool runs (and the most participants in one job).
cdef enum:
    MAX_WORKERS = 64

# The job: called once by each participant, 0 (the caller) .. n - 1.
ctypedef void (*WorkFn)(void *ctx, size_t participant) noexcept nogil


ctypedef struct Worker:
    void *pool                      # the WorkerPool it serves
    pthread_t thread
    int cpu                         # the CPU it is pinned to, or -1
    int tid                         # kernel thread id, for diagnostics (atomic; 0 until it runs)
    unsigned job                    # futex word: the generation of the job it was handed last
    size_t participant              # its index in the current job


ctypedef struct WorkerPool:
    Worker *workers
    size_t count                    # threads running
    WorkFn fn                       # the current job
    void *ctx
    unsigned generation             # numbers the jobs (atomic)
    unsigned state                  # futex word: the job is open (high bit), workers inside it
    unsigned joined                 # workers that took part in the current job (atomic)
    int stopping
    long owner_pid                  # the process whose threads these are


# Start `count` (1..MAX_WORKERS) threads, pinned round-robin to the CPUs the
# caller may run on, with every signal blocked; returns once each has run.
# 0, with pool.count the threads started (fewer than asked if the system
# refused more), or -errno when none could start (the pool is then empty).
cdef int pool_start(WorkerPool *pool, size_t count) noexcept nogil
# Run fn(ctx, i) on the caller (i = 0) and on up to max_participants - 1
# workers, at most one per CPU and none on the caller's, each with its own i. A worker that
# wakes only after the caller's fn returned stays out, so a job must be
# complete once the caller's share is (fn takes work from a shared pool,
# e.g. Chunks). Returns, with every fn returned, the number of participants.
# Call it from one thread at a time. In a forked child, or with an empty
# pool, the caller does the job alone.
cdef size_t pool_run(WorkerPool *pool, WorkFn fn, void *ctx, size_t max_participants) noexcept nogil
# Stop and join the threads (in a forked child: forget them). Idempotent.
cdef void pool_stop(WorkerPool *pool) noexcept nogil


# Fixed-size chunks of [start, end), taken by participants in turn.
ctypedef struct Chunks:
    uintptr_t start
    uintptr_t end
    uintptr_t size
    size_t next                     # atomic: the next chunk to hand out


cdef void chunks_init(Chunks *c, uintptr_t start, uintptr_t end, uintptr_t size) noexcept nogil
# The next chunk [*lo, *hi), or False when none is left.
cdef bint chunks_take(Chunks *c, uintptr_t *lo, uintptr_t *hi) noexcept nogil
# A chunk size for splitting `length` bytes into about `per_participant`
# chunks for each of `participants` (more chunks even out uneven work): a
# multiple of `align` (a power of two), and at least `minimum`.
cdef uintptr_t chunk_size_for(uintptr_t length, size_t participants, size_t per_participant,
                              uintptr_t align, uintptr_t minimum) noexcept nogil
