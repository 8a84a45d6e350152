"""Keep freed heap memory in the process instead of handing it back to the kernel.

Per-image loops that allocate and free a few MB per image (``np.load`` of a CAM dictionary, a decoded
PNG, numpy temporaries) otherwise pay for fresh pages on every image: glibc serves large blocks with
``mmap`` and returns them with ``munmap``, and each first touch of a new 4 KB page is a page fault
(about 2 µs in a VM, ~850 per VOC-size dictionary: more time than the arithmetic). With a high mmap
threshold and no trimming, the same pages are reused from image to image.

Only for worker processes and single-purpose CLIs: the process keeps its peak heap until it exits.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.lru_cache(maxsize=1)
def retain_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (idempotent).

    Blocks below ``mmap_threshold`` bytes come from the heap, and up to ``trim_threshold`` bytes of
    free heap are kept. Returns True when applied, False where there is no glibc ``mallopt``
    (macOS, Windows, musl): behaviour is then unchanged, only slower.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
