"""Doorbell suppression without VIRTIO_F_EVENT_IDX: while a Python model works through
a batch it sets the used ring's NO_NOTIFY flag, so a driver adding requests then (as
Linux's does, and tests/guests' virtio drivers) skips the doorbell and its exit, and
it clears the flag (and looks at the ring once more) before it goes to sleep."""

from __future__ import annotations

import struct
import time

from kvmpy.block.raw import RawDriver
from kvmpy.devices.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VirtioBlk
from kvmpy.devices.virtio.net import VIRTIO_NET_F_MAC, VirtioNet
from kvmpy.devices.virtio.pci import VIRTIO_F_VERSION_1
from support.net_ports import SocketPort
from support.virtio_driver import SoftMachine, VirtioPciDriver

HDR, DATA, STATUS = 0x200000, 0x300000, 0x2F0000
REQUESTS = 6


class ReadsAndLooks(RawDriver):
    """A raw image that notes, at each read, whether the driver would ring now."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.queue = None
        self.wants_doorbell: list[bool] = []
        self.more_during_batch = None

    def preadv(self, buffers, offset):
        self.wants_doorbell.append(self.queue.device_wants_notify())
        if self.more_during_batch is not None:
            more, self.more_during_batch = self.more_during_batch, None
            more()                  # the driver adds a request mid-batch, and rings only if asked to
        return super().preadv(buffers, offset)


def test_the_python_model_asks_for_no_doorbells_while_a_batch_runs(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * 4096)
    disk = ReadsAndLooks(str(image))
    m = SoftMachine()
    try:
        dev = m.virtio_pci(VirtioBlk(disk, dataplane="python"))
        d = VirtioPciDriver(m, m.pci.add(dev))
        d.negotiate(1 << VIRTIO_F_VERSION_1)
        q = d.setup_queue(0, 32)
        d.driver_ok()
        disk.queue = q
        notify = d._region(2) + d.common_read(0x1E, 2) * d.notify_mult
        rung = []

        def add(i: int) -> None:
            m.memory.write(HDR + 16 * i, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, i))
            m.memory.write(STATUS + i, b"\xff")
            q.add([(HDR + 16 * i, 16)], [(DATA + 512 * i, 512), (STATUS + i, 1)])
            if q.device_wants_notify():
                rung.append(i)
                m.mmio_write(notify, 2, 0)

        # Requests 1..5 arrive while request 0 is being read: none of them rings,
        # and the model still answers them all in the same turn of its loop.
        disk.more_during_batch = lambda: [add(i) for i in range(1, REQUESTS)]
        add(0)
        deadline = time.monotonic() + 10
        done: list[tuple[int, int]] = []
        while len(done) < REQUESTS:
            assert time.monotonic() < deadline, f"{len(done)} of {REQUESTS} requests completed"
            done += q.collect()
            time.sleep(0.001)
        assert rung == [0], "only the first request rang: the rest came while the flag was set"
        assert disk.wants_doorbell == [False] * REQUESTS
        assert q.device_wants_notify(), "asleep again: the next request must ring"
        for i in range(REQUESTS):
            assert m.memory.read(STATUS + i, 1)[0] == VIRTIO_BLK_S_OK
            assert m.memory.read(DATA + 512 * i, 512) == (bytes(range(256)) * 2)
    finally:
        m.close()
        disk.close()


NET_HDR = 12
FRAMES = 0x400000


def test_the_python_net_model_asks_for_no_doorbells_while_it_transmits():
    """The same for the tx queue of the Python net model (dataplane="python"): frames the
    driver adds while a batch is on the wire ring no doorbell and go out in that turn.
    The model writes to its tap fd directly, so the test looks from the point where
    it returns each frame's chain (the transport's queue, ``add_used``)."""
    port = SocketPort.pair("txnotify0")
    m = SoftMachine(ram_size=8 << 20)
    dev = m.virtio_pci(VirtioNet(port, mac=b"\x52\x54\x00\x12\x34\x56", dataplane="python"))
    try:
        d = VirtioPciDriver(m, m.pci.add(dev))
        d.negotiate(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC)
        d.setup_queue(0, 16)
        tx = d.setup_queue(1, 16)
        d.driver_ok()
        notify = d._region(2) + d.common_read(0x1E, 2) * d.notify_mult
        rung: list[int] = []
        wants_doorbell: list[bool] = []

        def add(i: int) -> None:
            frame = b"\xff" * 6 + b"\x02" + bytes(5) + struct.pack("!H", 0x88B5) + b"frame-%02d" % i
            m.memory.write(FRAMES + 0x100 * i, bytes(NET_HDR) + frame)
            tx.add([(FRAMES + 0x100 * i, NET_HDR + len(frame))], [])
            if tx.device_wants_notify():
                rung.append(i)
                m.mmio_write(notify, 2, 1)

        device_queue = dev.queues[1]
        returned = device_queue.add_used
        more = [lambda: [add(i) for i in range(1, REQUESTS)]]

        def add_used_and_look(head: int, length: int) -> None:
            wants_doorbell.append(tx.device_wants_notify())
            if more:
                more.pop()()        # the driver adds frames mid-batch, ringing only if asked to
            returned(head, length)
        device_queue.add_used = add_used_and_look

        add(0)
        deadline = time.monotonic() + 10
        done: list[tuple[int, int]] = []
        while len(done) < REQUESTS:
            assert time.monotonic() < deadline, f"{len(done)} of {REQUESTS} frames returned"
            done += tx.collect()
            time.sleep(0.001)
        assert rung == [0], "only the first frame rang: the rest came while the flag was set"
        assert wants_doorbell == [False] * REQUESTS
        assert tx.device_wants_notify(), "asleep again: the next frame must ring"
        port.host.settimeout(5)
        assert [port.host.recv(2048)[NET_HDR:][-8:] for _ in range(REQUESTS)] == \
            [b"frame-%02d" % i for i in range(REQUESTS)]
    finally:
        dev.close()
        m.close()
        port.close()
