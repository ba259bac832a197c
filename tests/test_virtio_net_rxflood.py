"""virtio-net's rx ring under the bench's rx flood, and what an avail idx jump reports.

The nested L1 twice ended the bench's "virtio-net rx from bridge" row with
dataplane=python in ``avail idx jumped by 540 (316) entries in a queue of 16``. The
flood here is the bench guest's loop (tests/guests/virtio_net.c rxflood=) run by a
driver thread truly concurrent with the event loop while a third thread streams
frames into the port: the Python model must return only outstanding heads, in
order, and never see the driver more than a ring ahead. The error's line must say
whose cursor is wrong: the queue's cursors, the used idx in RAM, the thread, and
whether the queue object is still the transport's and who serves it.
"""

from __future__ import annotations

import logging
import struct
import threading
import time

import pytest

from kvmpy.devices.virtio import netplane
from kvmpy.devices.virtio.net import VIRTIO_NET_F_MAC, VirtioNet
from kvmpy.devices.virtio.pci import DEVICE_NEEDS_RESET, VIRTIO_F_VERSION_1
from kvmpy.devices.virtio.queue import AvailJumpError, SplitQueue
from support.net_ports import SocketPort
from support.virtio_driver import SoftMachine, VirtioPciDriver

MAC = b"\x52\x54\x00\x12\x34\x56"
PEER = b"\x02\x00\x00\x00\x00\x01"
ETH_TYPE = 0x88B5
HDR = 12
RX, TX = 0, 1
QSZ = 16                # the bench guest's ring
BUF = 2048
RXBUF = 0x400000
FLOOD_FRAMES = 20000         # the bench row's count
FLOOD_TIMEOUT = 60.0


class FloodRig:
    """A VirtioNet on a SocketPort, its rx ring set up as the bench guest does: 16
    buffers of 2 KiB, MSI-X off and no interrupt wanted (the driver polls)."""

    def __init__(self, dataplane: str) -> None:
        self.port = SocketPort.pair("flood0")
        self.m = SoftMachine(ram_size=8 << 20)
        self.model = VirtioNet(self.port, mac=MAC, dataplane=dataplane, queue_size=256)
        self.dev = self.m.virtio_pci(self.model)
        self.d = VirtioPciDriver(self.m, self.m.pci.add(self.dev))
        wanted = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC
        assert self.d.negotiate(wanted) == wanted
        self.rxq = self.d.setup_queue(RX, QSZ)
        self.txq = self.d.setup_queue(TX, QSZ)
        self.bufs: dict[int, int] = {}
        for i in range(QSZ):
            self.bufs[self.rxq.add([], [(RXBUF + BUF * i, BUF)])] = RXBUF + BUF * i
        self.d.driver_ok()
        self.d.common_write(0x16, 2, RX)
        # The doorbell's address, so a kick is one write, as the guest's ioeventfd is.
        self.rx_notify = self.d._region(2) + self.d.common_read(0x1E, 2) * self.d.notify_mult
        self.kick()

    def kick(self) -> None:
        self.m.mmio_write(self.rx_notify, 2, RX)

    def broken(self) -> bool:
        return bool(self.d.status & DEVICE_NEEDS_RESET)

    def close(self) -> None:
        self.dev.close()
        self.m.close()
        self.port.close()


@pytest.fixture
def python_rig():
    rig = FloodRig("python")
    yield rig
    rig.close()


def _frame(seq: int) -> bytes:
    return bytes(HDR) + MAC + PEER + struct.pack("!H", ETH_TYPE) + b"fill" + struct.pack("<I", seq) + bytes(38)


@pytest.mark.parametrize("dataplane", ["python", "native"])
def test_rx_flood_with_a_concurrent_polling_driver(dataplane):
    """The bench guest's rx flood loop: every used id an outstanding head, once;
    frames in order and intact; no device error, however the driver's reposts and
    kicks interleave with the device's batches."""
    if dataplane == "native" and not netplane.available():
        pytest.skip(f"the native net plane is not built: {netplane.unavailable_reason()}")
    rig = FloodRig(dataplane)
    stop = threading.Event()
    sent = [0]

    def stream() -> None:
        host = rig.port.host
        host.setblocking(False)
        seq = 0
        while not stop.is_set():
            try:
                host.send(_frame(seq))
                seq += 1
            except BlockingIOError:       # the port is full: a tap drops the frame too
                time.sleep(0)
        sent[0] = seq

    streamer = threading.Thread(target=stream, name="flood-streamer", daemon=True)
    streamer.start()
    mem = rig.m.memory
    q = rig.rxq
    outstanding = set(rig.bufs)
    got, last_seq, kicks = 0, -1, 0
    deadline = time.monotonic() + FLOOD_TIMEOUT
    try:
        while got < FLOOD_FRAMES:
            used = q.collect()
            if not used:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{got} of {FLOOD_FRAMES} frames in {FLOOD_TIMEOUT} s")
                assert not rig.broken(), "device needs reset"
                time.sleep(0)
                continue
            for head, length in used:
                assert head in outstanding, f"used id {head} is not an outstanding head"
                outstanding.discard(head)
                addr = rig.bufs.pop(head)
                assert length == HDR + 60, f"frame of {length} bytes"
                data = mem.read(addr, length)
                seq = struct.unpack_from("<I", data, HDR + 18)[0]
                assert data[HDR:HDR + 6] == MAC and seq > last_seq, f"frame {seq} after {last_seq}"
                last_seq = seq
                got += 1
                new = q.add([], [(addr, BUF)])
                rig.bufs[new] = addr
                outstanding.add(new)
                # The guest kicks every 4 buffers and when it caught up, unless the
                # device asked for no kicks.
                if (not q.avail_idx % 4 or q.used_idx() == q.last_used) and q.device_wants_notify():
                    rig.kick()
                    kicks += 1
            assert (q.avail_idx - q.used_idx()) & 0xFFFF <= QSZ
        assert not rig.broken()
        # dataplane=python keeps the ring in the model: no C thread ever took it.
        assert rig.dev.native_queues[RX] == (dataplane == "native")
    finally:
        stop.set()
        streamer.join()
        rig.close()
    assert sent[0] >= got and kicks


def _error_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _wait_broken(rig: FloodRig) -> None:
    deadline = time.monotonic() + 5
    while not rig.broken():
        assert time.monotonic() < deadline, "no device error"
        time.sleep(0.001)


def test_avail_jump_by_the_driver_is_named(python_rig, caplog):
    """A driver that runs ahead of what it got back: the queue's cursors agree with
    the used idx in RAM, so the line blames the driver (or RAM seen otherwise)."""
    rig = python_rig
    rig.port.host.send(_frame(0))
    (head, length), = rig.d.wait_used(RX)
    assert length == HDR + 60
    caplog.set_level(logging.ERROR)
    mem = rig.m.memory
    mem.write_u16(rig.rxq.avail_addr + 2, QSZ + 40)
    rig.kick()
    _wait_broken(rig)
    line, = _error_lines(caplog)
    assert "avail idx jumped by 55 entries in a queue of 16" in line
    assert "avail idx 56, next_avail 1, next_used 1, used idx in RAM 1;" in line
    assert "on thread soft-machine-events" in line
    assert "the driver made more available than it got back" in line
    assert "queue 0, served by the model" in line


def test_the_benchs_ring_check_counts_the_avail_jump_line(python_rig, caplog):
    """bench/virtio.py counts the lines that say a ring broke in the L1's runs: the
    model's own line must be one of them, once."""
    from bench.virtio import ring_error_lines
    rig = python_rig
    rig.port.host.send(_frame(0))
    rig.d.wait_used(RX)
    caplog.set_level(logging.ERROR)
    rig.m.memory.write_u16(rig.rxq.avail_addr + 2, QSZ + 40)
    rig.kick()
    _wait_broken(rig)
    line, = _error_lines(caplog)
    found = ring_error_lines(f"virtio-net: found at 00:03.0\nERROR kvmpy: {line}\nguest: done\n")
    assert len(found) == 1
    assert "needs reset" in found[0] and "avail idx jumped by 55 entries" in found[0]


def test_avail_jump_with_a_foreign_used_idx_is_named(python_rig, caplog):
    """Something else wrote the used idx (as a second queue object or plane on the
    same ring would): the line says the used idx is not this queue's."""
    rig = python_rig
    for seq in range(3):
        rig.port.host.send(_frame(seq))
    rig.d.wait_used(RX, 3)
    caplog.set_level(logging.ERROR)
    mem = rig.m.memory
    mem.write_u16(rig.rxq.used_addr + 2, 540)
    mem.write_u16(rig.rxq.avail_addr + 2, 540 + QSZ)
    rig.kick()
    _wait_broken(rig)
    line, = _error_lines(caplog)
    assert "avail idx jumped by 553 entries" in line
    assert "next_avail 3, next_used 3, used idx in RAM 540" in line
    assert "something else wrote it" in line


def test_avail_jump_of_a_stale_queue_object_is_named(python_rig):
    """A copy of a queue (a state() restored beside the live one) that serves the ring
    after the live one moved on: the transport says it is not its own."""
    rig = python_rig
    rig.port.host.send(_frame(0))
    rig.d.wait_used(RX)
    stale = SplitQueue.from_state(rig.m.memory, rig.dev.queues[RX].state())
    stale.next_avail = stale.next_used = (stale.next_avail - 20) & 0xFFFF
    with pytest.raises(AvailJumpError) as err:
        stale.pending()
    assert err.value.queue is stale
    assert "not one this transport holds" in rig.dev._queue_owner(stale)
    assert rig.dev._queue_owner(rig.dev.queues[RX]) == "queue 0, served by the model"
