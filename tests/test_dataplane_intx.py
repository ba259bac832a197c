"""virtio-blk's native data plane under INTx: a burst of completions costs one raise.

Without MSI-X the thread asks the transport for an interrupt through an eventfd the
event loop reads, and the transport raises the level (and sets the ISR bit). While
the level is up and the driver has not read the ISR, another raise changes nothing
(QEMU's pci_set_irq skips an unchanged level), so the thread must not wake the
event loop for it: at queue depth 32 those wakes were a thread switch into Python
per batch, a cost QEMU does not pay (issue 17's QD32 rows in the nested L1).
The ISR read lowers the line, and the next completion must raise it again: no
completion may go without an interrupt the driver can see.
"""

from __future__ import annotations

import pytest

from kvmpy.devices.virtio import dataplane
from kvmpy.devices.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN
from support.polling import wait_for
from test_dataplane import DATA, DISK, STATUS, Rig

needs_native = pytest.mark.skipif(not dataplane.available(),
                                  reason=f"native data plane not built: {dataplane.unavailable_reason()}")

BURST = 32
ISR_QUEUE = 1
PCI_STATUS = 0x06
PCI_STATUS_INTERRUPT = 0x08
IMAGE = bytes(range(256)) * (DISK // 256)


class IntxRig(Rig):
    """The test rig with MSI-X left off: the queue's interrupt is INTx."""

    def start(self, ring_base=None):
        if ring_base is not None:
            self.d.ring_base = ring_base
        self.d.negotiate(self.features)
        self.q = self.d.setup_queue(0, self.queue_size, event_idx=self.event_idx)
        self.d.driver_ok()
        self.n = 0
        self.settle()

    def line_up(self) -> bool:
        return bool(self.dev.get16(PCI_STATUS) & PCI_STATUS_INTERRUPT)


def burst(rig: Rig, count: int) -> None:
    """``count`` 4 KiB reads of sector 0 made available at once, one kick, all answered."""
    assert rig.dev.native_queues == (True,), "the thread serves the queue"
    for _ in range(count):
        rig.put(VIRTIO_BLK_T_IN, 0, in_len=4096)
    rig.d.kick(0)
    assert len(rig.d.wait_used(0, count=count)) == count
    rig.settle()
    for n in range(min(count, 16)):
        assert rig.m.memory.read(STATUS + n, 1)[0] == VIRTIO_BLK_S_OK
        assert rig.m.memory.read(DATA + 0x10000 * n, 4096) == IMAGE[:4096]


@needs_native
@pytest.mark.parametrize("event_idx", [False, True])
def test_a_burst_under_a_raised_line_wakes_nobody(tmp_path, event_idx):
    path = tmp_path / "d.raw"
    path.write_bytes(IMAGE)
    rig = IntxRig(path, event_idx=event_idx, queue_size=128)
    try:
        burst(rig, 1)
        assert wait_for(rig.line_up), "INTx raised for the first request"
        assert rig.dev.native_interrupt_wakes == 1

        # the line stays up: 32 completions, none of them a wake of the event loop
        burst(rig, BURST)
        assert rig.dev.native_interrupt_wakes == 1
        assert rig.line_up()

        # the driver reads the ISR (lowering the line): the next completion raises it anew
        assert rig.d.isr() & ISR_QUEUE
        assert not rig.line_up()
        burst(rig, 4)
        assert wait_for(rig.line_up), "INTx raised again after the ISR read"
        assert rig.dev.native_interrupt_wakes == 2
        assert rig.d.isr() & ISR_QUEUE

        rig.dev.state()          # stops the thread: its counts go to the transport
        writes, coalesced = rig.dev.native_interrupts
        assert writes == 2
        assert coalesced >= 1
    finally:
        rig.close()


@needs_native
def test_under_msix_every_wanted_interrupt_is_sent(tmp_path):
    """The flag is INTx's alone: a thread raising a vector never skips for it."""
    path = tmp_path / "d.raw"
    path.write_bytes(IMAGE)
    rig = Rig(path, queue_size=128)
    try:
        burst(rig, 1)
        burst(rig, BURST)
        rig.dev.state()
        writes, coalesced = rig.dev.native_interrupts
        assert coalesced == 0
        assert writes >= 2
    finally:
        rig.close()


@needs_native
def test_intx_then_msix_then_intx_again(tmp_path):
    """The driver switches MSI-X on and off around bursts, the INTx line up from the
    first: under MSI-X the vector is raised, and back on INTx (ISR read or not) the
    next completion still reaches the driver."""
    path = tmp_path / "d.raw"
    path.write_bytes(IMAGE)
    rig = IntxRig(path, queue_size=128)
    try:
        burst(rig, 1)
        assert wait_for(rig.line_up), "INTx raised for the first request"
        burst(rig, BURST)

        rig.d.enable_msix()
        rig.d.common_write(0x16, 2, 0)
        rig.d.common_write(0x1A, 2, 1)           # queue 0 -> vector 1
        rig.settle()                              # the thread restarts with the new route
        msis = len(rig.m.msis)
        burst(rig, 4)
        assert rig.m.wait_msi(msis + 1), "no MSI for a burst under MSI-X"

        ctrl = rig.m.cfg_read(rig.d.slot, rig.d.msix_cap + 2, 2)
        rig.m.cfg_write(rig.d.slot, rig.d.msix_cap + 2, 2, ctrl & ~0x8000)
        rig.settle()
        rig.d.isr()                               # whatever was pending: the line goes down
        assert not rig.line_up()
        burst(rig, 4)
        assert wait_for(rig.line_up), "INTx not raised after MSI-X went off"
        assert rig.d.isr() & ISR_QUEUE
    finally:
        rig.close()
