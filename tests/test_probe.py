import ctypes
import mmap
import os
import subprocess
import sys

import pytest

import gctrack
from gctrack import backends
from gctrack.probe import Features, Support


def test_features_is_cached_and_complete():
    f = gctrack.features()
    assert f is gctrack.features()
    assert f.page_size > 0 and f.page_size & (f.page_size - 1) == 0
    assert f.kernel_release
    for support in (f.userfaultfd, f.wp_async, f.pagemap_scan, f.uffd_sync, f.mprotect,
                    f.soft_dirty, f.transparent_hugepages, *f.backends.values()):
        assert isinstance(support, Support)
        assert support.reason, "every finding carries a one-line reason"
        assert "\n" not in support.reason


def test_dependent_mechanisms_are_consistent():
    f = gctrack.features()
    if f.pagemap_scan:
        assert f.wp_async and f.userfaultfd
    if not f.userfaultfd:
        assert not f.wp_async and not f.pagemap_scan


def test_soft_dirty_finding_matches_the_pagemap_bit(page_size):
    """The probe's verdict agrees with a second, independent look at bit 55."""
    m = mmap.mmap(-1, page_size)
    m[0] = 1
    address = ctypes.addressof(ctypes.c_char.from_buffer(m))
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        entry = int.from_bytes(os.pread(fd, 8, address // page_size * 8), "little")
    finally:
        os.close(fd)
    soft_dirty = gctrack.features().soft_dirty
    if entry >> 55 & 1:
        assert soft_dirty or "clear_refs" in soft_dirty.reason
    else:
        assert not soft_dirty and "bit 55" in soft_dirty.reason


def test_table_lists_every_mechanism():
    table = gctrack.features().table()
    for name in ("userfaultfd", "wp_async", "pagemap_scan", "uffd_sync", "mprotect",
                 "soft_dirty", "page size"):
        assert name in table


def test_cli_probe_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "gctrack", "probe"], check=True,
                         capture_output=True, text=True).stdout
    assert "pagemap_scan" in out and gctrack.features().pagemap_scan.reason in out


def test_unavailable_backend_raises_unsupported_with_the_probe_reason(monkeypatch, arena):
    """The error plumbing from a negative probe finding to the constructor."""
    real = gctrack.features()
    missing = Support(False, "PAGEMAP_SCAN: unknown ioctl: kernel older than 6.7", 25)
    fake = Features(**{**real.__dict__, "pagemap_scan": missing})
    monkeypatch.setattr(backends.probe, "features", lambda: fake)
    with pytest.raises(gctrack.UnsupportedError) as info:
        gctrack.Tracker(arena, backend="pagemap_scan")
    assert info.value.reason == missing.reason
    assert info.value.errno == 25
    assert info.value.mechanism == "pagemap_scan"
    assert isinstance(info.value, OSError)
    with gctrack.Tracker(arena, backend="auto") as fallback:
        assert fallback.backend == next(n for n in backends.AUTO_ORDER if fake.backends[n])
    nothing = Features(**{**real.__dict__, **{n: missing for n in backends.AUTO_ORDER}})
    monkeypatch.setattr(backends.probe, "features", lambda: nothing)
    with pytest.raises(gctrack.UnsupportedError, match="kernel older than 6.7") as info:
        gctrack.Tracker(arena, backend="auto")
    assert all(name in info.value.reason for name in backends.AUTO_ORDER)


def test_every_registered_backend_has_a_finding():
    assert set(gctrack.features().backends) == set(gctrack.BACKENDS)
    assert set(gctrack.AUTO_ORDER) <= set(gctrack.BACKENDS)


def test_a_missing_backend_raises_unsupported_with_its_reason(arena):
    for name, support in gctrack.features().backends.items():
        if not support:
            with pytest.raises(gctrack.UnsupportedError) as info:
                gctrack.Tracker(arena, backend=name)
            assert info.value.reason == support.reason and info.value.mechanism == name


def test_unknown_backend_names_are_rejected(arena):
    with pytest.raises(ValueError, match="unknown backend"):
        gctrack.Tracker(arena, backend="nonsense")
    with pytest.raises(TypeError):
        gctrack.Tracker(arena, backend=3)
