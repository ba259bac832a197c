"""The coalesced ring's watcher thread (kvmpy.hv.kvm.coalesced.RingWatch, its C side
kvmpy_ring_watch_*) on a ring of our own: a page laid out as KVM's, whose producer
index the test moves as KVM does when the guest writes to a queued port.

It wakes the event loop only when writes wait, looks less often once the guest has
written nothing for a while (its CPU went to the guest, in the nested L1), and is fast
again from the next write on."""

from __future__ import annotations

import mmap
import threading
import time

import pytest

from kvmpy.events import EventLoop

kvm_cffi = pytest.importorskip("kvmpy.hv.kvm._kvm_cffi", reason="the KVM bindings are not built (make build)")
from kvmpy.hv.kvm.coalesced import RingWatch  # noqa: E402 - after the skip above

ffi, lib = kvm_cffi.ffi, kvm_cffi.lib

FAST, IDLE, QUIET = 0.005, 0.2, 0.1


class FakeRing:
    """KVM's ring page; ``guest_writes`` moves ``last`` as KVM does, ``drain`` (the
    event loop's call) empties it as CoalescedPio does."""

    def __init__(self) -> None:
        self._page = ffi.new("char[]", mmap.PAGESIZE)
        self.ring = ffi.cast("struct kvm_coalesced_mmio_ring *", self._page)
        self.drained = threading.Event()
        self.drains = 0

    def guest_writes(self, n: int = 1) -> None:
        self.drained.clear()
        self.ring.last = (self.ring.last + n) % 64

    def drain(self) -> None:
        self.drains += 1
        self.ring.first = self.ring.last
        self.drained.set()


@pytest.fixture
def watched():
    events = EventLoop()
    events.start()
    ring = FakeRing()
    watch = RingWatch(events, ring.ring, FAST, ring.drain, idle_interval=IDLE, idle_after=QUIET)
    watch.start()
    try:
        yield ring, watch
    finally:
        watch.close()
        events.close()


def _settled_wakes(watch: RingWatch) -> int:
    """The wake count once it has stopped moving (for 4 fast looks)."""
    deadline = time.monotonic() + 5
    wakes = watch.counts()[1]
    while time.monotonic() < deadline:
        time.sleep(4 * FAST)
        now = watch.counts()[1]
        if now == wakes:
            return wakes
        wakes = now
    raise AssertionError("the watcher kept waking the loop")


def _looks_during(watch: RingWatch, seconds: float) -> int:
    before = watch.counts()[0]
    time.sleep(seconds)
    return watch.counts()[0] - before


def test_a_write_is_drained_and_an_empty_ring_wakes_no_one(watched):
    ring, watch = watched
    ring.guest_writes(3)
    assert ring.drained.wait(5), "the queued writes were never drained"
    # The thread counts a wake after its write, which the loop may answer first; a
    # slow loop may also be woken twice before it drains.
    wakes = _settled_wakes(watch)
    looks, drains = watch.counts()[0], ring.drains
    assert wakes >= 1 and drains >= 1
    time.sleep(10 * FAST)
    assert watch.counts()[1] == wakes and ring.drains == drains, "woken for an empty ring"
    assert watch.counts()[0] > looks


def test_a_quiet_guest_is_looked_at_less_often_until_it_writes_again(watched):
    ring, watch = watched
    time.sleep(QUIET + 2 * IDLE)                    # quiet from the start: idle by now
    idle_looks = _looks_during(watch, 5 * IDLE)
    assert 1 <= idle_looks <= 7, idle_looks         # about 5; not the fast 200
    # The first write after the quiet spell waits for the next idle look at most.
    t = time.monotonic()
    ring.guest_writes()
    assert ring.drained.wait(5), "the write after the quiet spell was never drained"
    assert time.monotonic() - t < IDLE + 1.0
    # Fast again from that write on: many looks in the next QUIET seconds.
    fast_looks = _looks_during(watch, QUIET * 0.8)
    assert fast_looks >= 4, fast_looks
    # A guest that keeps writing keeps it fast.
    for _ in range(3):
        ring.guest_writes()
        assert ring.drained.wait(5)
        time.sleep(QUIET * 0.5)
    assert _looks_during(watch, QUIET * 0.5) >= 3
