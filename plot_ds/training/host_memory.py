"""Host memory: freed pages handed back to the OS (and device blocks from the caching allocator), and\nthe peak a process reached."""

from __future__ import annotations

import functools


def trim_host_heap() -> None:
    """Give the pages of freed host memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps freed blocks resident, and the blocks freed between ZeRO-3's gathers and gradient
    hand-offs are fragmented so that later, larger requests grow the heap instead of reusing them;
    the peak RSS of a CPU step then sits well above its live tensors (docs/benchmarks.md).
    """
    _malloc_trim()(0)


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    libc = ctypes.util.find_library("c")
    return (getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None) or (lambda _pad: 0)


def peak_resident_gb() -> float:
    """This process's largest resident set so far (getrusage; Linux reports it in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def release_freed_memory() -> None:
    """After an engine is done and dropped (the reference model after the cache pass): its device
    memory back from the caching allocator and its host memory back to the OS, before training
    allocates around it."""
    import gc

    from deepspeed.accelerator import get_accelerator

    gc.collect()
    get_accelerator().empty_cache()
    trim_host_heap()
