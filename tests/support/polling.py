"""Waiting in tests for something another thread (an event loop, a data plane
thread) makes true."""

from __future__ import annotations

import time


def wait_for(cond, timeout: float = 5.0) -> bool:
    """Whether ``cond()`` became true within ``timeout`` seconds (polled every 2 ms)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True
