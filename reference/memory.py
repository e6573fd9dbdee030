"""Keep freed memory in the process (glibc), so that each image or iteration reuses the pages
of the one before.

Inference and training allocate and free large arrays over and over (8-16 MiB maps in the edge
runtime's refiner step, torch's activations and gradients). glibc's malloc returns freed memory
to the kernel when the top of its heap holds more than a threshold, and serves large requests
with fresh ``mmap`` pages; its thresholds adapt to the sizes seen, so where a process settles
depends on the order of its first allocations. Measured on this project's 2-core test machine
(``cpu-base`` model, 256 x 256, 1 step x 4 chains, one thread):

- the edge runtime's packed backend: of six fresh processes, four settled at 7130 minor page
  faults per image after warm-up (about 28 MiB of fresh zeroed pages, 170-176 ms per image) and
  two at none (157 ms); with :func:`keep_freed_memory`, six of six at none;
- the torch pipeline (``HiDiffPipeline.predict``): 580-660 thousand page faults per image, 2.0-2.2
  s, against none and 0.99 s;
- a training iteration (``benchmarks/train_speed.py``, ``cpu-small``, batch 8): 1.26 s against
  1.14 s.

The command lines (``hidiff``, ``python -m hidiff.training``, ``hidiff-edge predict``) call
:func:`keep_freed_memory` first. A program that embeds the pipeline or
:class:`edge_runtime.HiDiffSession` may call it too; it changes the allocator of the whole
process (freed memory stays mapped: the resident size stays at its peak instead of shrinking),
which is why the libraries do not do it by themselves. Nothing here imports numpy or torch.
"""

from __future__ import annotations

import ctypes
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
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the process's own C library
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if not any(mallopt(_M_MMAP_THRESHOLD, size) == 1 for size in _MMAP):
        return False
    return mallopt(_M_TRIM_THRESHOLD, _TRIM) == 1
