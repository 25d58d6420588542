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


def test_auto_tries_the_constructors_in_order_and_gathers_their_reasons(monkeypatch, arena):
    """"auto" asks each constructor in turn; an UnsupportedError moves on."""
    unsupported = [n for n, s in gctrack.features().backends.items() if not s]
    supported = [n for n in backends.AUTO_ORDER if gctrack.features().backends[n]]
    if not unsupported or not supported:
        pytest.skip("needs one backend that works here and one that does not")
    monkeypatch.setattr(backends, "AUTO_ORDER", (unsupported[0], supported[0]))
    with gctrack.Tracker(arena, backend="auto") as tracker:
        assert tracker.backend == supported[0]
    monkeypatch.setattr(backends, "AUTO_ORDER", (unsupported[0],))
    with pytest.raises(gctrack.UnsupportedError) as info:
        gctrack.Tracker(arena, backend="auto")
    assert info.value.mechanism == "every backend"
    assert f"{unsupported[0]}: {gctrack.features().backends[unsupported[0]].reason}" in info.value.reason
    assert arena.address      # the arena is still usable after every refusal


def test_a_backend_built_directly_proves_its_mechanism(arena):
    """A Backend instance skips no check: one whose mechanism is missing raises."""
    for name, support in gctrack.features().backends.items():
        if not support:
            with pytest.raises(gctrack.UnsupportedError) as info:
                gctrack.BACKENDS[name](arena)
            assert info.value.reason == support.reason and info.value.mechanism == name


def test_features_proves_the_intrusive_backends_in_a_child_process():
    """Asking what is supported installs no SIGSEGV handler and starts no thread here."""
    script = (
        "import threading, gctrack, gctrack.mprotect as m\n"
        "def segv_caught():\n"
        "    status = open('/proc/self/status').read()\n"
        "    line = next(l for l in status.splitlines() if l.startswith('SigCgt'))\n"
        "    return int(line.split()[1], 16) >> 10 & 1\n"
        "before = segv_caught()\n"
        "f = gctrack.features()\n"
        "assert f.pagemap_scan.reason and f.mprotect.reason\n"
        "print(before, segv_caught(), m.handler_faults(), threading.active_count())\n")
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                         text=True, timeout=120).stdout.split()
    assert out == ["0", "0", "0", "1"]


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
