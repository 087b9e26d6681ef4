"""Process-level settings that make CPU training and evaluation faster: the C allocator.

PyTorch on CPU allocates every tensor from the C library's malloc. glibc hands memory back to the kernel when a
large block is freed (blocks above a threshold are mmap'd and unmapped; a free top of the heap is trimmed), so
each training step faults its activations back in page by page, and the kernel zeroes every page. On this 2-core
machine that cost a quarter of DPO training time on multi-turn pairs (`dpolab bench train`, README "Speed").
`tune_allocator` keeps freed memory in the process instead: peak memory is unchanged, it is just not given back
between steps.
"""
from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_done: bool | None = None


def tune_allocator() -> bool:
    """Tell glibc's malloc to keep freed memory (mmap threshold at its 32 MB maximum, no trimming, 1 GB top pad).

    Once per process; a no-op returning False off Linux/glibc or with DPOLAB_TUNE_MALLOC=0.
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    if sys.platform != "linux" or os.environ.get("DPOLAB_TUNE_MALLOC", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: leave it alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 1 << 30)))
    return _done
