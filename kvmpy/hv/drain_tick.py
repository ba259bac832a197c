"""The periodic drain of a queue of guest port writes: the translator's port queue
(tcg/portqueue.py), and KVM's coalesced ring (kvm/coalesced.py) only where its
watcher thread, which wakes the loop only when writes wait, cannot be started.

Either queue is drained at every exit the vCPU loop handles; the tick covers a guest
that writes and then makes no exit for a while (a spin with interrupts off, a halt in
KVM's in-kernel irqchip), so its bytes still reach the console within an interval.
It runs on the machine's event loop, never a thread of its own, and only while the
queue has a zone registered: a machine without queued ports pays nothing for it.
Given a count of the writes ever queued (``activity``), it ticks every
``idle_interval`` instead once none has come for ``idle_after`` seconds, as KVM's
ring watcher does: an idle guest then costs the loop ten wake-ups a second, not a
hundred, and the first bytes after a quiet spell wait up to ``idle_interval`` if the
guest makes no exit meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from typing import Callable

from ..events import EventLoop, TimerHandle


class DrainTick:
    """Calls ``drain()`` on ``events`` every ``interval`` seconds while a zone is set;
    zones are set from vCPU threads, the tick runs on the loop's thread."""

    def __init__(self, events: EventLoop, interval: float, drain: Callable[[], None],
                 activity: Callable[[], int] | None = None, idle_interval: float | None = None,
                 idle_after: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._events = events
        self._interval = interval
        self._drain = drain
        self._activity = activity
        self._idle_interval = idle_interval if activity is not None else None
        self._idle_after = idle_after
        self._clock = clock
        self._seen = activity() if activity is not None else 0
        self._active_at = clock()
        self._lock = threading.Lock()       # set_zone (a vCPU) vs the tick (the loop) vs close
        self._zones: set[Hashable] = set()
        self._timer: TimerHandle | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def has_zone(self, zone: Hashable) -> bool:
        return zone in self._zones

    def set_zone(self, zone: Hashable, on: bool) -> None:
        """Register (True) or forget (False) ``zone``; the first one starts the tick,
        and the tick stops by itself once none is left."""
        with self._lock:
            if on:
                self._zones.add(zone)
            else:
                self._zones.discard(zone)
            if self._zones and self._timer is None and not self._closed:
                self._active_at = self._clock()
                self._timer = self._events.call_later(self._interval, self._tick)

    def next_interval(self) -> float:
        """After a tick: ``interval``, or ``idle_interval`` once no write has been
        queued for ``idle_after`` seconds (by the activity count this tick read)."""
        now = self._clock()
        if self._activity is not None:
            seen = self._activity()
            if seen != self._seen:
                self._seen, self._active_at = seen, now
        if self._idle_interval is not None and now - self._active_at >= self._idle_after:
            return self._idle_interval
        return self._interval

    def _tick(self) -> None:
        self._drain()
        interval = self.next_interval()
        with self._lock:
            if self._zones and not self._closed:
                self._timer = self._events.call_later(interval, self._tick)
            else:
                self._timer = None

    def close(self) -> bool:
        """Stop the tick for good; True on the first call only, so that the owner
        drains what is left once."""
        with self._lock:
            first = not self._closed
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        return first
