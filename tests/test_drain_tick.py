"""The periodic drain both queues of guest port writes share (kvmpy.hv.drain_tick): it
ticks on the event loop while a zone is registered, and only then."""

from __future__ import annotations

import threading
import time

import pytest
from support.polling import wait_for

from kvmpy.events import EventLoop
from kvmpy.hv.drain_tick import DrainTick

INTERVAL = 0.005
# Long enough for a dozen ticks even on a loaded host: a tick that should not come
# would have come by then.
QUIET = 40 * INTERVAL


class Counter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0

    def __call__(self) -> None:
        with self._lock:
            self.calls += 1


@pytest.fixture
def loop():
    events = EventLoop(name="test-drain-tick")
    events.start()
    yield events
    events.close()


def _settle(loop: EventLoop) -> None:
    """Until a tick already due has run (call_later's timers fire in deadline order)."""
    done = threading.Event()
    loop.call_later(2 * INTERVAL, done.set)
    assert done.wait(5)


def test_no_zone_no_tick(loop):
    drains = Counter()
    tick = DrainTick(loop, INTERVAL, drains)
    time.sleep(QUIET)
    assert drains.calls == 0
    tick.set_zone("thr", False)          # forgetting an unknown zone starts nothing
    time.sleep(QUIET)
    assert drains.calls == 0


def test_ticks_while_a_zone_is_set_and_stops_after_the_last_goes(loop):
    drains = Counter()
    tick = DrainTick(loop, INTERVAL, drains)
    tick.set_zone(0x3F8, True)
    tick.set_zone(0x70, True)
    assert tick.has_zone(0x3F8) and tick.has_zone(0x70) and not tick.has_zone(0x71)
    assert wait_for(lambda: drains.calls >= 3), "the tick drains again and again"
    tick.set_zone(0x3F8, False)
    seen = drains.calls
    assert wait_for(lambda: drains.calls >= seen + 3), "one zone left: still ticking"
    tick.set_zone(0x70, False)
    _settle(loop)
    stopped_at = drains.calls
    time.sleep(QUIET)
    assert drains.calls == stopped_at, "no zone left: the tick stopped"
    tick.set_zone(0x70, True)
    assert wait_for(lambda: drains.calls >= stopped_at + 2), "a zone again: ticking again"
    tick.close()


def test_close_stops_the_tick_for_good_and_says_so_once(loop):
    drains = Counter()
    tick = DrainTick(loop, INTERVAL, drains)
    tick.set_zone((0x3F8, 1), True)
    assert wait_for(lambda: drains.calls >= 1)
    assert not tick.closed
    assert tick.close() is True
    assert tick.closed and tick.close() is False
    _settle(loop)
    stopped_at = drains.calls
    tick.set_zone((0x70, 1), True)       # a zone after close starts no tick
    time.sleep(QUIET)
    assert drains.calls == stopped_at


def test_zones_set_from_many_threads_leave_one_tick(loop):
    """vCPU threads set zones at once: one tick runs, not one per zone or per thread
    that found none armed."""
    drains = Counter()
    tick = DrainTick(loop, INTERVAL, drains)
    start = threading.Barrier(8)

    def register(port: int) -> None:
        start.wait()
        tick.set_zone(port, True)
    threads = [threading.Thread(target=register, args=(p,)) for p in range(8)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(QUIET)
    calls = drains.calls
    elapsed = time.monotonic() - began
    tick.close()
    # One tick re-arms INTERVAL after each drain: at most elapsed / INTERVAL calls, where
    # eight would make about eight times as many.
    assert 1 <= calls <= elapsed / INTERVAL + 1, (calls, elapsed)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_tick_slows_down_while_nothing_is_queued_and_speeds_up_at_the_next_write():
    """With an activity count (the translator's writes ever queued) the tick comes every
    idle_interval once no write has come for idle_after, and every interval again
    from the tick that sees a new one; writes another thread drained count too."""
    clock, pushed = FakeClock(), [0]
    tick = DrainTick(None, 0.01, lambda: None, activity=lambda: pushed[0], idle_interval=0.1,
                     idle_after=1.0, clock=clock)
    assert tick.next_interval() == 0.01
    clock.now += 0.99
    assert tick.next_interval() == 0.01
    clock.now += 0.01
    assert tick.next_interval() == 0.1           # a second with nothing queued
    pushed[0] += 3                               # queued (and maybe drained by a vCPU's exit)
    clock.now += 0.1
    assert tick.next_interval() == 0.01
    clock.now += 0.5
    assert tick.next_interval() == 0.01
    clock.now += 0.5
    assert tick.next_interval() == 0.1


def test_without_an_activity_count_the_interval_never_changes():
    clock = FakeClock()
    tick = DrainTick(None, 0.01, lambda: None, idle_interval=0.1, clock=clock)
    clock.now += 60
    assert tick.next_interval() == 0.01

