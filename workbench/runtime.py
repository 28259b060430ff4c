"""Process-level settings that make CPU training and benchmarks faster, applied explicitly."""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_cpu_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Keep freed tensor memory in the process instead of handing it back to the OS (glibc only).

    glibc serves allocations above 128 KiB with fresh ``mmap`` pages and unmaps them on free,
    so every step of a training loop page-faults (and the kernel zeroes) each activation
    again; on 2 CPU cores that costs 10-15% of a MoE layer's forward + backward. Raising the
    mmap and trim thresholds makes glibc reuse that memory, as jemalloc or tcmalloc would.
    Returns whether the setting took effect (False on other C libraries).
    """
    global _tuned
    if _tuned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, threshold_bytes) == 1 and ok
    except (OSError, AttributeError):
        return False
    _tuned = ok
    return ok
