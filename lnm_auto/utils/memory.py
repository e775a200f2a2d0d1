"""Large buffers reused instead of mapped afresh (glibc's allocator).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and hands it back
to the kernel on ``free``, so each clinical-size image a data command reads (a 512 x 512 x 80 CT is 40 MiB, its
decompressed bytes another 40) is page-faulted and zeroed anew. On a 2-core VM that cost as much as decompressing
the file: SimpleITK's own read of 10 such cases took 2.4 s with the default allocator and 1.5 s without the
fresh mappings. The data commands (preprocessing, prediction) therefore take big blocks from the heap and keep
freed memory for the next case. The resident size stays at its high-water mark instead of shrinking between
cases (and cases of very different sizes can fragment the heap); measured: flat from 10 to 100 predicted cases.
Commands run inside another Python process (tests, notebooks) change that process's allocator too.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1   # <malloc.h>: free memory at the heap's top kept up to this many bytes
M_MMAP_MAX = -4         # <malloc.h>: how many allocations may be served by mmap (0: none)
KEEP_FREED_BYTES = 2**31 - 1   # the most mallopt takes (an int)
USER_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def reuse_freed_memory() -> bool:
    """Make this process (and the workers it forks later) reuse freed large buffers instead of mapping new ones;
    returns whether the allocator took the settings (False off glibc, or where the user tuned glibc's
    allocator in the environment: their settings win)."""
    if not sys.platform.startswith("linux") or any(v in os.environ for v in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt   # the C library already loaded; glibc only (musl has none)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
