"""Keep freed memory in the process (glibc), so that each image reuses the last one's pages.

One image allocates and frees large arrays (8-16 MiB maps in the refiner step, 2 MiB sampler
arrays). glibc's malloc returns freed memory to the kernel when the top of its heap holds more
than a threshold, and serves large requests with fresh ``mmap`` pages; its thresholds adapt to
the sizes seen, so where a process settles depends on the order of its first allocations.
Measured on the ``cpu-base`` export (256 x 256, 1 step x 4 chains, one thread, six fresh
processes): four settled at 7130 minor page faults per image after warm-up (about 28 MiB of
fresh zeroed pages, 170-176 ms per image), two at none (157 ms). With the thresholds raised
(:func:`keep_freed_memory`) every process settled at none.

``hidiff-edge`` calls :func:`keep_freed_memory` before it loads a model. A program that embeds
:class:`~edge_runtime.HiDiffSession` may call it too; it changes the allocator of the whole
process (freed memory stays mapped: the resident size stays at its peak instead of shrinking
between images), which is why the session does not do it by itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_TRIM = 1 << 30  # bytes of free heap top kept before any is returned
_MMAP = (256 << 20, 32 << 20)  # the request size from which mmap serves (older glibc: <= 32 MiB)


def keep_freed_memory() -> bool:
    """Raise glibc's mmap threshold (to 256 MiB, or 32 MiB where that is its limit) and its
    trim threshold (to 1 GiB) with ``mallopt``: freed memory stays in the process for the next
    allocation. True where applied; False, with nothing changed, on other C libraries and
    systems (setting either threshold turns glibc's adaptive ones off, so the trim threshold is
    set only once the mmap threshold is)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    mallopt = ctypes.CDLL(path).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if not any(mallopt(_M_MMAP_THRESHOLD, size) == 1 for size in _MMAP):
        return False
    return mallopt(_M_TRIM_THRESHOLD, _TRIM) == 1
