"""Returning freed heap memory to the OS while serving.

Prefill activations come in every prompt length, and glibc's malloc keeps the pages of freed blocks in its
heaps (after a large block is freed it raises its mmap threshold, so later ones come from the heap too).
A long-running server's RSS then creeps up for minutes without any live object behind it
(`benchmarks/soak.py`). `malloc_trim(0)` hands every whole free page back; calling it every few seconds
costs milliseconds. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from typing import Optional

logger = logging.getLogger(__name__)


def _malloc_trim() -> Optional[ctypes._CFuncPtr]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def start_heap_trimmer(interval_s: float, stopped: threading.Event) -> Optional[threading.Thread]:
    """A daemon thread that calls malloc_trim(0) every `interval_s` until `stopped` is set."""
    trim = _malloc_trim()
    if trim is None or interval_s <= 0:
        return None

    def run() -> None:
        while not stopped.wait(interval_s):
            trim(0)

    thread = threading.Thread(target=run, name="swiftkv-heap-trim", daemon=True)
    thread.start()
    return thread
