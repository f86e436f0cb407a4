"""Give freed message buffers back to the kernel (glibc malloc).

glibc serves a large allocation with mmap and returns it on free, but each
such free raises the mmap threshold to that size (up to 32 MiB on 64-bit):
after the first 20 MB message, every buffer below 20 MB comes from the heap,
whose free space is only returned from its top. Twenty concurrent 20 MiB
messages left triaged 200-860 MiB above idle for good, and peaked 40% higher
than with a fixed threshold (bench/results/big_messages.md). Fixing the
threshold at glibc's own default (128 KiB) turns the dynamic raise off:
message-sized buffers are mmapped and unmapped again, small objects are
unaffected. Other C libraries: nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_MMAP_THRESHOLD = -3  # <malloc.h>
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's default, fixed


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold for this process; False where that is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


__all__ = ["fix_mmap_threshold"]
