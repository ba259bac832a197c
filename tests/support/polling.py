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


def settle(events) -> bool:
    """Let the event loop ``events`` finish what is already on its way to it, ready
    fds included (a doorbell's eventfd written just before). A call queued with
    call_and_wait runs at the start of the loop's next round, before that round's
    ready fds, so one such call proves nothing about them; a second one runs only
    after that whole round. False if either did not run within its timeout."""
    return all(events.call_and_wait(lambda: None) for _ in range(2))
