"""The server's heap trimmer: a daemon thread that ends when told (its effect on RSS is measured by
`benchmarks/soak.py`, with and without it)."""

from __future__ import annotations

import threading

import pytest

from swiftkv.serve.memory import _malloc_trim, start_heap_trimmer


@pytest.mark.skipif(_malloc_trim() is None, reason="needs glibc's malloc_trim")
def test_the_trimmer_stops_when_told():
    stopped = threading.Event()
    thread = start_heap_trimmer(0.01, stopped)
    assert thread.is_alive()
    stopped.set()
    thread.join(timeout=2)
    assert not thread.is_alive()


def test_an_interval_of_zero_starts_no_trimmer():
    assert start_heap_trimmer(0, threading.Event()) is None
