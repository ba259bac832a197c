"""A control command's receive filter is in force before the driver can see its ack
(VirtioNet._control_batch -> VirtioTransport.native_offer_changed), on the native
net plane and in the model, deterministically.

The driver double runs without MSI-X: the control queue's interrupt is then INTx,
driven on the event loop thread right after the ack and the used entry are
written and before that thread goes on (SoftMachine.irq_hook). At that moment the
hook sends a frame from the host side. On the native plane it also holds the event
loop until the C thread has judged the frame, so nothing the loop would do after
the control queue (where the filter reached the thread before native_offer_changed)
can come first: a thread still on the old filter lets the frame through, or drops
it, and the test sees it. The model reads its filter on the loop itself, so there
the frame is judged after the command in any case; the test holds it to the same
rules.
"""

from __future__ import annotations

import struct
import threading
import time

import pytest

from kvmpy.devices.virtio import netplane
from kvmpy.devices.virtio.net import (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_RX,
                                      VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VQ,
                                      VIRTIO_NET_F_MAC, VIRTIO_NET_OK, VirtioNet)
from kvmpy.devices.virtio.pci import VIRTIO_F_VERSION_1
from support.net_ports import SocketPort
from support.virtio_driver import SoftMachine, VirtioPciDriver

MAC = b"\x52\x54\x00\x12\x34\x56"
PEER = b"\x02\x00\x00\x00\x00\x02"
OTHER = b"\x02\x00\x00\x00\x00\x09"
ETH_TYPE = 0x88B5
HDR = 12
RX, TX, CTRL = 0, 1, 2
RXBUF, CTRLBUF = 0x400000, 0x600000
SLOT = 0x800
# The C thread reads a frame within microseconds of its arrival; this only bounds a broken run.
JUDGED_WITHIN = 5.0


def _frame(dst: bytes, seq: int) -> bytes:
    return dst + OTHER + struct.pack("!H", ETH_TYPE) + b"ack-order-%04d" % seq + bytes(40)


class AckRig:
    """A VirtioNet on a SocketPort, driven over INTx (no MSI-X), rx buffers posted."""

    def __init__(self, dataplane: str) -> None:
        self.port = SocketPort.pair("ackord0")
        self.m = SoftMachine(ram_size=8 << 20)
        self.model = VirtioNet(self.port, mac=MAC, dataplane=dataplane)
        self.dev = self.m.virtio_pci(self.model)
        self.d = VirtioPciDriver(self.m, self.m.pci.add(self.dev))
        wanted = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_CTRL_VQ | 1 << VIRTIO_NET_F_CTRL_RX
        assert self.d.negotiate(wanted) == wanted
        self.queues = {q: self.d.setup_queue(q, 16) for q in (RX, TX, CTRL)}
        self.d.driver_ok()
        self.bufs = {self.queues[RX].add([], [(RXBUF + SLOT * i, SLOT)]): RXBUF + SLOT * i for i in range(8)}
        self.d.kick(RX)
        self.delivered: list[bytes] = []

    def native(self) -> bool:
        return bool(self.dev.native_queues[RX])

    def collect(self) -> list[bytes]:
        for head, n in self.queues[RX].collect():
            self.delivered.append(self.m.memory.read(self.bufs[head], n)[HDR:])
        return self.delivered

    def judged(self, before_filtered: int, before_delivered: int) -> bool:
        return (self.model.counts()["rx_filtered"] > before_filtered
                or len(self.collect()) > before_delivered)

    def command_with_frame_at_ack(self, cls: int, cmd: int, data: bytes, frame: bytes) -> dict:
        """Send one control command; when its interrupt is raised, the ack written,
        send ``frame`` from the host side (on the native plane: and wait there until
        the thread judged it). Returns what the hook saw."""
        mem = self.m.memory
        mem.write(CTRLBUF, bytes([cls, cmd]))
        mem.write(CTRLBUF + 0x100, data)
        mem.write(CTRLBUF + 0x1000, b"\x77")
        self.d.isr()                      # the INTx line low: the next raise is this command's
        seen: dict = {}
        hook_done = threading.Event()
        wait_in_hook = self.native()
        before = (self.model.counts()["rx_filtered"], len(self.collect()))

        def at_interrupt(gsi: int, level: bool) -> None:
            if not level or seen:
                return
            seen["ack"] = mem.read(CTRLBUF + 0x1000, 1)[0]
            seen["on_loop"] = self.m.events.on_loop_thread()
            self.port.host.send(bytes(HDR) + frame)
            if wait_in_hook:
                deadline = time.monotonic() + JUDGED_WITHIN
                while not self.judged(*before) and time.monotonic() < deadline:
                    time.sleep(0.0002)
                seen["judged_in_hook"] = self.judged(*before)
            hook_done.set()
        self.m.irq_hook = at_interrupt
        try:
            head = self.queues[CTRL].add([(CTRLBUF, 2), (CTRLBUF + 0x100, len(data))], [(CTRLBUF + 0x1000, 1)])
            self.d.kick(CTRL)
            # (The driver polls the used ring: it may see the entry while the hook still runs.)
            assert self.d.wait_used(CTRL) == [(head, 1)]
            assert hook_done.wait(JUDGED_WITHIN + 1), "no interrupt for the control queue"
        finally:
            self.m.irq_hook = None
        deadline = time.monotonic() + JUDGED_WITHIN
        while not self.judged(*before) and time.monotonic() < deadline:
            time.sleep(0.001)
        return seen

    def close(self) -> None:
        self.dev.close()
        self.port.close()
        self.m.close()


@pytest.mark.parametrize("dataplane", [
    pytest.param("native", marks=pytest.mark.skipif(
        not netplane.available(), reason=f"net data plane not built: {netplane.unavailable_reason()}")),
    "python"])
def test_a_frame_sent_at_the_ack_meets_the_new_filter(dataplane):
    rig = AckRig(dataplane)
    try:
        if dataplane == "native":
            deadline = time.monotonic() + JUDGED_WITHIN
            while not rig.native() and time.monotonic() < deadline:
                time.sleep(0.001)
            assert rig.native(), "the rx queue never went to a native thread"
        # Promiscuous off: a frame for another MAC, sent at the ack, is dropped.
        seen = rig.command_with_frame_at_ack(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x00",
                                             _frame(PEER, 1))
        assert seen["ack"] == VIRTIO_NET_OK, "the hook ran once the ack was written"
        assert seen["on_loop"], "on the event loop, before it went on"
        if dataplane == "native":
            assert seen["judged_in_hook"], "the thread judged the frame while the loop waited"
        assert rig.collect() == [], "the frame passed the old (promiscuous) filter"
        assert rig.model.counts()["rx_filtered"] == 1
        # PEER into the MAC table: a frame for it, sent at that ack, is let in.
        table = struct.pack("<I", 1) + PEER + struct.pack("<I", 0)
        seen = rig.command_with_frame_at_ack(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, table,
                                             _frame(PEER, 2))
        assert seen["ack"] == VIRTIO_NET_OK
        if dataplane == "native":
            assert seen["judged_in_hook"]
        assert rig.collect() == [_frame(PEER, 2)], "the frame met the old table"
        assert rig.model.counts()["rx_filtered"] == 1
        if dataplane == "native":
            assert rig.native(), "the filter went to the running thread: no hand-over"
    finally:
        rig.close()
