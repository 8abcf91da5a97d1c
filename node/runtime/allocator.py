"""Let the C heap keep freed memory for reuse instead of handing it back to the kernel.

Why: glibc serves every allocation over 128 KiB with its own ``mmap`` and unmaps it on free, so
each one is zero-filled page by page on first touch. The per-token work allocates several such
arrays a token (a logits row of a 49k vocabulary is 192 KiB in float32, the sampler's float64
rows 384 KiB), and on these VMs a page fault is dear: turning 49k noise words into uniforms took
0.34 ms a token with fresh pages and 0.06 ms with reused ones, a T = 0.8 top-p draw 1.4 ms
against 0.6 ms (znver4). Raising the thresholds keeps up to ``KEPT_BYTES`` of freed memory in
the heap, a small price next to the model's weights and KV cache.
"""

from __future__ import annotations

import ctypes
import platform

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEPT_BYTES = 64 * 1024 * 1024  # allocations up to this come from the heap; this much free heap is kept


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where the C library is not
    glibc (nothing to do: other allocators keep their own caches)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEPT_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * KEPT_BYTES))


def return_freed_memory() -> bool:
    """Hand the heap's free pages back to the kernel (glibc's ``malloc_trim``): after a model
    loads, its parse and split buffers (~470 MB for an F16 file of the default model) are free
    but, under the thresholds above, kept by the heap. False where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    malloc_trim = ctypes.CDLL(None).malloc_trim
    malloc_trim.argtypes, malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return bool(malloc_trim(0))
