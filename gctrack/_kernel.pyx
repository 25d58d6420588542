# cython: language_level=3
"""Python-callable kernel queries that the probe needs (see probe.py)."""
from libc.stdint cimport uint64_t
from posix.fcntl cimport O_CLOEXEC, O_NONBLOCK
from posix.unistd cimport close

from gctrack.linux cimport (GCT_UFFD_USER_MODE_ONLY, GCT_UFFD_FEATURE_WP_ASYNC,
                            GCT_UFFD_FEATURE_WP_UNPOPULATED, uffd_open, uffd_api)

from gctrack.errors import TrackerError


def uffd_features():
    """The userfaultfd features this kernel offers (UFFDIO_API asked for none).

    Raises TrackerError with the failing call's errno.
    """
    cdef int fd = uffd_open(O_CLOEXEC | O_NONBLOCK | GCT_UFFD_USER_MODE_ONLY)
    if fd < 0:
        raise TrackerError(-fd, "userfaultfd", "UFFD_USER_MODE_ONLY")
    cdef uint64_t features = 0
    cdef int rc = uffd_api(fd, 0, &features)
    close(fd)
    if rc:
        raise TrackerError(-rc, "UFFDIO_API")
    return features


FEATURE_WP_ASYNC = GCT_UFFD_FEATURE_WP_ASYNC
FEATURE_WP_UNPOPULATED = GCT_UFFD_FEATURE_WP_UNPOPULATED
