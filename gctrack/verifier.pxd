# cython: language_level=3
from libc.stdint cimport uint64_t, uintptr_t
from gctrack.arena cimport Arena
from gctrack.backend cimport Backend, BackendCore
from gctrack.cards cimport CardBits, CardTable
from gctrack.threads cimport pthread_mutex_t


cdef extern from "gctrack/gctrack.h" nogil:
    # Stable layouts of the C API (gct_missed_store, gct_verify_counts).
    ctypedef struct MissedStore "gct_missed_store":
        uint64_t address
        uint64_t old
        uint64_t new_value
    ctypedef struct VerifyCounts "gct_verify_counts":
        uint64_t pages_written
        uint64_t words_changed
        uint64_t missed
        double seconds


ctypedef struct MissedBuffer:
    # Where a check writes its missed stores: the first `limit` of them.
    # `growable` buffers are realloc'ed up to `limit` (the Python API);
    # fixed ones hold `capacity` records (the C API's caller's array).
    MissedStore *records
    size_t length
    size_t capacity
    size_t limit
    bint growable


ctypedef struct VerifierCore:
    # The C-level verifier: what a check touches, without the GIL.
    BackendCore *kernel             # the pagemap_scan registration; NULL once closed
    CardBits *cards                 # the runtime's card table (its CardTable keeps it alive)
    unsigned char *snapshot         # the arena's words at the last check, same offsets
    uintptr_t start                 # the arena
    uintptr_t end
    size_t page_size
    long owner_pid                  # checks run only in the process that armed it
    pthread_mutex_t lock            # serialises checks and close


# One check (see BarrierVerifier.check): 0 or -errno. Takes the lock.
cdef int verifier_check(VerifierCore *v, bint clear, MissedBuffer *out,
                        VerifyCounts *counts) noexcept nogil


cdef class BarrierVerifier:
    cdef VerifierCore core
    cdef readonly Arena arena
    cdef readonly CardTable cards
    cdef Backend kernel             # PagemapScanBackend(beside_software=True)
    cdef size_t snapshot_size
    cdef bint lock_ready
    cdef readonly bint closed

    cdef int check_usable(self) except -1
    cdef int raise_for(self, int rc) except -1
    cdef void release(self) noexcept
