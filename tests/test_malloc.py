"""proxy/malloc.py: the mmap threshold is fixed where the C library is glibc."""

from __future__ import annotations

import platform

from proxy.malloc import fix_mmap_threshold


def test_the_mmap_threshold_is_fixed_on_glibc() -> None:
    assert fix_mmap_threshold() is (platform.libc_ver()[0] == "glibc")
