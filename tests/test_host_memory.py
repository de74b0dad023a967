def test_trim_host_heap_returns_freed_fragmented_blocks_to_the_os():
    """Freed blocks pinned between live ones stay resident until trimmed (glibc), as ZeRO-3's
    freed gathers and gradients do between a step's activations."""
    import os
    import sys

    from plot_ds.host_memory import trim_host_heap

    def resident() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    assert sys.platform.startswith("linux")
    freed, pinned = [], []
    for _ in range(2000):  # 100 kB: below glibc's mmap threshold, so from the heap
        freed.append(bytearray(100_000))
        pinned.append(bytearray(2_000))
    del freed
    held = resident()
    trim_host_heap()
    assert held - resident() > 100 * 2**20  # most of the 200 MB freed
