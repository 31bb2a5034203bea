"""The server's heap trimmer gives freed heap pages back to the OS (glibc only)."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from swiftkv.serve.memory import _malloc_trim, start_heap_trimmer

pytestmark = pytest.mark.skipif(_malloc_trim() is None, reason="needs glibc's malloc_trim")

FRAGMENTED_HEAP = """
import os, threading, time
from swiftkv.serve.memory import start_heap_trimmer
def rss_mb():
    for line in open(f"/proc/{os.getpid()}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
big = bytearray(32 * 2**20); del big    # freeing a mmapped block raises glibc's mmap threshold...
blocks = [bytearray(b"x" * 2**20) for _ in range(200)]   # ...so these 1 MB blocks come from the heap
pin = blocks[-1]; del blocks            # the last one pins the heap top: free() alone cannot shrink it
freed = rss_mb()
{trim}
print(freed, rss_mb())
"""


def run_fragmented_heap(trim: str) -> tuple[float, float]:
    output = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP.replace("{trim}", trim)], capture_output=True,
                            text=True, check=True).stdout
    freed, end = map(float, output.split())
    assert freed > 250, "the 200 MB of blocks were not resident"
    return freed, end


def test_freed_heap_pages_stay_resident_until_trimmed_and_the_trimmer_returns_them():
    freed, untrimmed = run_fragmented_heap("time.sleep(0.3)")
    assert untrimmed > freed - 20  # nothing given back on its own
    freed, trimmed = run_fragmented_heap("start_heap_trimmer(0.05, threading.Event()); time.sleep(0.3)")
    assert trimmed < freed - 150  # ~199 MB of freed 1 MB blocks returned


def test_the_trimmer_stops_when_told():
    stopped = threading.Event()
    thread = start_heap_trimmer(0.01, stopped)
    stopped.set()
    thread.join(timeout=2)
    assert not thread.is_alive()
