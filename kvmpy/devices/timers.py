"""Host timers for device models: every timer of a machine on its one event loop.

The RTC under KVM, and under the translator the LAPIC timers and the PIT, arm
``WheelTimer``s here; a timerfd on the machine's EventLoop fires them (kvmpy.events),
so no device needs a thread of its own. A manual mode (``threaded=False`` with a
fake clock) lets tests step time deterministically.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable

from ..events import EVENT_READ, EventLoop, TimerFd

log = logging.getLogger(__name__)


class WheelTimer:
    """One timer of a TimerWheel: ``arm(deadline_ns, token)``, ``cancel()``.

    The callback runs on the wheel's loop thread as ``callback(deadline_ns, token)``,
    without any wheel lock held; a re-arm or cancel racing with the callback may
    still let one stale call through, so callbacks check ``token`` under their own
    lock.
    """

    __slots__ = ("_wheel", "callback", "deadline", "token", "_gen")

    def __init__(self, wheel: "TimerWheel", callback: Callable[[int, object], None]) -> None:
        self._wheel = wheel
        self.callback = callback
        self.deadline: int | None = None
        self.token: object = None
        self._gen = 0

    def arm(self, deadline_ns: int, token: object = None) -> None:
        self._wheel._arm(self, int(deadline_ns), token)

    def cancel(self) -> None:
        self._wheel._cancel(self)

    @property
    def armed(self) -> bool:
        return self.deadline is not None


# Timers fired per wake-up of the loop at most: a guest whose timers are all overdue
# (a host that stalled) must not keep the console and the monitors waiting.
MAX_FIRED_PER_WAKE = 64


class TimerWheel:
    """All the timers of one machine in one heap, fired on an event loop.

    The wheel subscribes a timerfd (kvmpy.events.TimerFd) set to its earliest
    deadline to ``events`` (the machine's loop), or, without one, to a loop of its
    own started at the first arm. Arming a timer earlier than that deadline, from
    any thread, resets the timerfd; nothing else wakes the loop. ``clock`` is in
    nanoseconds: on a loop it must be time.monotonic_ns (the timerfd's clock). With
    ``threaded=False`` nothing runs by itself: ``run_due()`` fires what is due at
    ``clock()`` (deterministic tests drive a fake clock this way).
    """

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns, threaded: bool = True,
                 name: str = "timer-wheel", events: EventLoop | None = None) -> None:
        if threaded and clock is not time.monotonic_ns:
            raise ValueError("a TimerWheel on an event loop keeps time.monotonic_ns (its timerfd's clock); "
                             "other clocks need threaded=False")
        if events is not None and not threaded:
            raise ValueError("a TimerWheel with threaded=False fires only in run_due(): give it no loop")
        self.clock = clock
        self._threaded = threaded
        self._name = name
        self._lock = threading.Lock()
        self._heap: list[tuple[int, int, WheelTimer, int]] = []
        self._seq = itertools.count()
        self._live = 0
        self._events = events
        self._own_events = False
        self._timerfd: TimerFd | None = None
        self._programmed: int | None = None     # the deadline the timerfd is set to
        self._firing = False                    # the loop is firing: it sets the timerfd after
        self._closed = False
        self.fired = 0

    def timer(self, callback: Callable[[int, object], None]) -> WheelTimer:
        return WheelTimer(self, callback)

    def _arm(self, t: WheelTimer, deadline: int, token: object) -> None:
        with self._lock:
            if self._closed:
                return
            if t.deadline is None:
                self._live += 1
            t._gen += 1
            t.deadline = deadline
            t.token = token
            heapq.heappush(self._heap, (deadline, next(self._seq), t, t._gen))
            if len(self._heap) > 4 * self._live + 64:
                # re-armed timers leave stale entries behind: drop them
                self._heap = [e for e in self._heap if e[2]._gen == e[3] and e[2].deadline is not None]
                heapq.heapify(self._heap)
            if not self._threaded:
                return
            if self._timerfd is None:
                self._subscribe_locked()
            if not self._firing and (self._programmed is None or deadline < self._programmed):
                self._program_locked(deadline)

    def _subscribe_locked(self) -> None:
        if self._events is None:
            self._events = EventLoop(name=self._name)
            self._own_events = True
            self._events.start()
        self._timerfd = TimerFd()
        self._events.subscribe(self._timerfd.fd, EVENT_READ, self._on_timerfd)

    def _program_locked(self, deadline: int) -> None:
        self._timerfd.set(deadline)
        self._programmed = deadline

    def _cancel(self, t: WheelTimer) -> None:
        with self._lock:
            if t.deadline is not None:
                self._live -= 1
            t._gen += 1
            t.deadline = None

    def _pop_due(self, now: int):
        """(timer, deadline, token) of the next due live entry, or None. Under _lock."""
        while self._heap:
            deadline, _, t, gen = self._heap[0]
            if t._gen != gen or t.deadline is None:
                heapq.heappop(self._heap)
                continue
            if deadline > now:
                return None
            heapq.heappop(self._heap)
            t.deadline = None
            self._live -= 1
            return t, deadline, t.token
        return None

    def _fire(self, t: WheelTimer, deadline: int, token: object) -> None:
        self.fired += 1
        try:
            t.callback(deadline, token)
        except Exception:  # noqa: BLE001 - a device bug must not stop every timer
            log.exception("timer callback %r failed", t.callback)

    def run_due(self) -> int:
        """Fire every timer due now (manual mode); returns how many fired."""
        n = 0
        while True:
            with self._lock:
                hit = self._pop_due(self.clock())
            if hit is None:
                return n
            self._fire(*hit)
            n += 1

    def _earliest_locked(self) -> int | None:
        """The heap's first live deadline (stale entries on top are dropped)."""
        while self._heap:
            deadline, _, t, gen = self._heap[0]
            if t._gen == gen and t.deadline is not None:
                return deadline
            heapq.heappop(self._heap)
        return None

    def next_deadline(self) -> int | None:
        with self._lock:
            live = [e[0] for e in self._heap if e[2]._gen == e[3] and e[2].deadline is not None]
            return min(live) if live else None

    def _on_timerfd(self, ready: int) -> None:
        with self._lock:
            if self._closed:
                return
            self._timerfd.clear()
            self._firing = True
        try:
            for _ in range(MAX_FIRED_PER_WAKE):
                with self._lock:
                    hit = None if self._closed else self._pop_due(self.clock())
                if hit is None:
                    break
                self._fire(*hit)
        finally:
            with self._lock:
                self._firing = False
                self._programmed = None
                if not self._closed:
                    head = self._earliest_locked()
                    if head is not None:
                        self._program_locked(head)

    def close(self) -> None:
        """Stop every timer; once this returns no callback runs (one that was
        running has finished), unless the loop is stuck for more than 2 s."""
        with self._lock:
            self._closed = True
            self._heap.clear()
            timerfd, self._timerfd = self._timerfd, None
        events = self._events
        if events is None:
            return
        if timerfd is not None:
            def release() -> None:
                events.unsubscribe(timerfd.fd)
                timerfd.close()
            events.call_and_wait(release, timeout=2)
        if self._own_events:
            events.close()
