import sys

from conftest import run_command

# Run in a fresh process: whether freed blocks sit in the main heap (trimmable) depends on what the
# process allocated before, which in pytest's process is every earlier test.
FRAGMENT_AND_TRIM = """
import os, sys
from plot_ds.training.host_memory import trim_host_heap

def resident() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

freed, pinned = [], []
for _ in range(2000):  # 100 kB: below glibc's mmap threshold, so from the heap
    freed.append(bytearray(100_000))
    pinned.append(bytearray(2_000))
del freed
held = resident()
trim_host_heap()
print("RETURNED", held - resident())
"""


def test_trim_host_heap_returns_freed_fragmented_blocks_to_the_os():
    """Freed blocks pinned between live ones stay resident until trimmed (glibc), as ZeRO-3's
    freed gathers and gradients do between a step's activations."""
    assert sys.platform.startswith("linux")
    proc = run_command([sys.executable, "-c", FRAGMENT_AND_TRIM], timeout=120)
    returned = int(proc.stdout.split("RETURNED")[-1])
    assert returned > 100 * 2**20, f"only {returned} bytes of the 200 MB freed went back"  # most of them
