"""The ring fields a driver and the device both touch, raced by a native thread.

A driver polls the used idx and reads avail_event while the device writes them,
and stores the avail idx while the device reads it: every such access on the
device side must be one 16-bit load or store. SplitQueue used struct.pack_into,
which zeroes its target before it stores the value, so a driver polling the used
idx could see 0 for a moment: the translator's test guest then took the flush it
had just submitted for completed and read its status byte still at 255
(test_crash_consistency, about one run in twenty). A Linux driver misled the same
way returns buffers the device still holds and makes more available than it got
back, which is what the "avail idx jumped" NEEDS_RESET seen under nested KVM says.
The reads were single loads already (struct unpacks '<H' with a native load on
this host); the last test keeps them so.

Each test fails only if the racing thread catches a torn value; it cannot make
a correct queue fail. It needs the thread to run alongside Python, so it checks
that the thread saw the field change.
"""

from __future__ import annotations

import time

import pytest

from kvmpy.devices.virtio.queue import SplitQueue
from kvmpy.memory import GuestMemory
from support.ring_race import STORE_PAIR, WATCH_PAIR, Racer, build
from support.virtio_driver import DriverQueue

RAM = 0x10000
RING = 0x1000
SIZE = 256
ROUNDS = 200_000       # at least; on a loaded host, more until the thread has run alongside
SECONDS = 10           # at most, past ROUNDS
ENOUGH = 100           # changes the watching thread must have seen


@pytest.fixture(scope="module")
def helper(tmp_path_factory):
    return build(tmp_path_factory.mktemp("ring_race"))


@pytest.fixture
def rig():
    mem = GuestMemory.anonymous([(0, RAM)])
    q = SplitQueue(mem, max_size=SIZE)
    layout = DriverQueue(mem, RING, SIZE)
    q.desc_addr, q.avail_addr, q.used_addr = layout.desc_addr, layout.avail_addr, layout.used_addr
    q.activate(event_idx=True)
    yield mem, q


def host_address(helper, mem: GuestMemory, gpa: int) -> int:
    ffi, _ = helper
    region = mem.regions[0]
    buf = ffi.from_buffer("uint8_t[]", region.view, require_writable=True)
    try:
        return int(ffi.cast("uintptr_t", buf)) + gpa - region.gpa
    finally:
        ffi.release(buf)


def race(work, ran_alongside) -> None:
    """work(n) for n = 0, 1, ... ROUNDS, then on until ran_alongside() (the thread
    has been scheduled beside us often enough) or SECONDS more have passed."""
    n = 0
    deadline = None
    while n < ROUNDS or not ran_alongside():
        for _ in range(1000):
            work(n)
            n += 1
        if n >= ROUNDS:
            deadline = deadline or time.monotonic() + SECONDS
            if time.monotonic() > deadline:
                return


def assert_raced(racer: Racer, what: str) -> None:
    assert racer.bad == 0, (f"{what}: a driver saw {racer.bad} torn values, the first "
                            f"{racer.first_bad[1]:#06x} after {racer.first_bad[0]:#06x}")
    if racer.changes < ENOUGH:
        pytest.skip(f"{what}: the racing thread saw {racer.changes} changes (no second core free?)")


def test_a_polling_driver_never_sees_a_torn_used_idx(helper, rig):
    mem, q = rig
    # The used idx goes to 0x00ff or 0x0100 in turn, where every byte changes: a
    # store of one by halves (or zeroed first) passes through 0x0000 or 0x01ff.
    mem.write_u16(q.used_addr + 2, 0x00FF)
    def work(n):
        if n % 4 == 0:
            q.next_used = 0x00FD if n & 4 else 0x00FE
            q.add_used_many([(0, 1), (1, 1)])
        else:
            q.next_used = 0x00FE if n & 1 else 0x00FF
            q.add_used(0, 1)

    with Racer(helper, host_address(helper, mem, q.used_addr + 2), WATCH_PAIR, 0x00FF, 0x0100) as racer:
        race(work, lambda: racer.changes_so_far() >= ENOUGH)
    assert_raced(racer, "used idx")


def test_the_avail_event_a_driver_reads_is_never_torn(helper, rig):
    mem, q = rig
    mem.write_u16(q.avail_addr + 2, 0x0100)      # set_notification looks at what is pending
    mem.write_u16(q.used_addr + 4 + 8 * SIZE, 0x00FF)
    def work(n):
        q.next_avail = 0x00FF if n & 1 else 0x0100
        q.set_notification(True)

    with Racer(helper, host_address(helper, mem, q.used_addr + 4 + 8 * SIZE), WATCH_PAIR, 0x00FF, 0x0100) as racer:
        race(work, lambda: racer.changes_so_far() >= ENOUGH)
    assert_raced(racer, "avail_event")


def test_the_avail_idx_is_read_whole_while_the_driver_stores_it(helper, rig):
    mem, q = rig
    q.next_avail = 0x00F8
    seen = set()
    with Racer(helper, host_address(helper, mem, q.avail_addr + 2), STORE_PAIR, 0x00FF, 0x0100) as racer:
        # AvailJumpError on a torn read (0x01ff or 0x0000)
        race(lambda n: seen.add(q.pending()), lambda: seen == {7, 8})
    assert seen <= {7, 8}
    if seen != {7, 8}:
        pytest.skip(f"the storing thread did not run alongside (pending saw only {seen})")
    assert racer.bad == 0
