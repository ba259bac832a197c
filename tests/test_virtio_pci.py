"""The virtio-pci transport's status/feature/queue state machine under arbitrary driver behaviour."""

from __future__ import annotations

import os

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvmpy.block.driver import BlockDriver
from kvmpy.devices.virtio.blk import VirtioBlk
from kvmpy.devices.virtio.device import VirtioDevice
from kvmpy.devices.virtio.pci import (DEVICE_NEEDS_RESET, DRIVER_OK, FEATURES_OK, VIRTIO_F_VERSION_1)
from support.virtio_driver import SoftMachine, VirtioPciDriver


class Disk(BlockDriver):
    size = 1 << 20
    read_only = False
    fd = -1         # no file a native data plane could serve: every request comes to the model

    def __init__(self):
        self.buf = bytearray(self.size)

    def preadv(self, bufs, off):
        n = 0
        for b in bufs:
            b[:] = self.buf[off + n:off + n + len(b)]
            n += len(b)
        return n

    def pwritev(self, bufs, off):
        n = 0
        for b in bufs:
            self.buf[off + n:off + n + len(b)] = b
            n += len(b)
        return n

    def flush(self):
        pass

    def discard(self, off, length):
        self.buf[off:off + length] = bytes(length)

    write_zeroes = lambda self, off, length, may_unmap=False: self.discard(off, length)  # noqa: E731


COMMON_FIELDS = [(0x00, 4), (0x04, 4), (0x08, 4), (0x0C, 4), (0x10, 2), (0x12, 2), (0x14, 1), (0x15, 1),
                 (0x16, 2), (0x18, 2), (0x1A, 2), (0x1C, 2), (0x1E, 2), (0x20, 4), (0x24, 4), (0x28, 4),
                 (0x2C, 4), (0x30, 4), (0x34, 4), (0x20, 8)]


class TransportMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.m = SoftMachine(ram_size=4 << 20)
        self.dev = self.m.virtio_pci(VirtioBlk(Disk(), num_queues=2))
        self.slot = self.m.pci.add(self.dev)
        self.d = VirtioPciDriver(self.m, self.slot)
        self.d.enable()

    def teardown(self):
        if hasattr(self, "dev"):
            self.dev.close()
            self.m.close()

    @rule(value=st.integers(0, 255) | st.sampled_from([1, 3, 0xB, 0xF, 0x80, 0]))
    def write_status(self, value):
        self.d.set_status(value)

    @rule(field=st.sampled_from(COMMON_FIELDS), value=st.integers(0, 2**64 - 1),
          small=st.sampled_from([0, 1, 2, 8, 64, 256, 0x200000, 0x210000]))
    def write_common(self, field, value, small):
        off, size = field
        v = small if value % 2 else value & ((1 << (8 * size)) - 1)
        self.d.common_write(off, size, v)

    @rule(off=st.integers(0, 0x3FFF), size=st.sampled_from([1, 2, 4, 8, 3]), value=st.integers(0, 2**32 - 1))
    def poke_bar(self, off, size, value):
        base = self.d.bar_addr(0)
        self.m.mmio_write(base + off, size, value)
        self.m.mmio_read(base + off, size)

    @rule(sel=st.integers(0, 1))
    def negotiate_properly(self, sel):
        self.d.negotiate(1 << VIRTIO_F_VERSION_1 | (sel << 29))
        for q in range(2):
            self.d.setup_queue(q, 16, vector=q + 1)
        self.d.driver_ok()

    @rule(q=st.integers(0, 2))
    def kick(self, q):
        self.d.kick(q)

    @rule()
    def garbage_in_ring(self):
        self.m.memory.write(0x100000, os.urandom(0x3000))

    @invariant()
    def consistent(self):
        if not hasattr(self, "dev"):
            return
        dev = self.dev
        broken = dev.broken  # read first: the event loop may break the device any time
        status = self.d.status
        assert status & ~DEVICE_NEEDS_RESET == dev.status & ~DEVICE_NEEDS_RESET
        if status & FEATURES_OK:
            assert dev.driver_features >> VIRTIO_F_VERSION_1 & 1
            assert dev.driver_features & ~dev.all_features() == 0
        # the event loop serves the device only between DRIVER_OK and a reset
        if dev.serving:
            assert status & DRIVER_OK and self.m.events._thread.is_alive()
        if status == 0:
            assert not dev.serving and not any(dev.queue_enable)
            assert not dev.broken
        for q in range(2):
            if dev.queue_enable[q]:
                assert dev.queues[q].active
        if broken:
            assert status & DEVICE_NEEDS_RESET
        for off, size in COMMON_FIELDS:
            self.d.common_read(off, size)


TransportMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)
TestTransport = TransportMachine.TestCase


def test_features_ok_refused_without_version_1():
    m = SoftMachine(ram_size=1 << 20)
    dev = m.virtio_pci(VirtioBlk(Disk()))
    d = VirtioPciDriver(m, m.pci.add(dev))
    try:
        d.enable()
        d.set_status(3)
        d.common_write(0x08, 4, 0)
        d.common_write(0x0C, 4, 1 << 9)
        d.set_status(0xB)
        assert d.status == 3
        # unknown feature bits are refused too
        d.common_write(0x08, 4, 1)
        d.common_write(0x0C, 4, 1 | 1 << 20)
        d.set_status(0xB)
        assert d.status == 3
        d.set_status(0)
        assert d.negotiate(1 << VIRTIO_F_VERSION_1) == 1 << VIRTIO_F_VERSION_1
        # DRIVER_OK before FEATURES_OK is a protocol error
        d.set_status(0)
        d.set_status(3)
        d.set_status(7)
        assert d.status & DEVICE_NEEDS_RESET
        d.set_status(0)
        assert d.status == 0
    finally:
        dev.close()
        m.close()


def _read_request(m, d, q, n=0):
    """One virtio-blk read of sector 0; returns its status byte."""
    hdr, status = 0x300000 + 0x100 * n, 0x310000 + n
    m.memory.write(hdr, bytes(16))                 # VIRTIO_BLK_T_IN, sector 0
    m.memory.write(status, b"\xee")
    head = q.add([(hdr, 16)], [(0x320000 + 0x1000 * n, 512), (status, 1)])
    d.kick(0)
    assert d.wait_used(0) == [(head, 513)]
    return m.memory.read(status, 1)[0]


def test_devices_share_the_machine_event_loop():
    """No device starts a thread of its own: DRIVER_OK subscribes it to the loop."""
    import threading
    m = SoftMachine(ram_size=8 << 20)
    devs = [m.virtio_pci(VirtioBlk(Disk(), name=f"virtio-blk{i}")) for i in range(3)]
    try:
        drivers = []
        for i, dev in enumerate(devs):
            d = VirtioPciDriver(m, m.pci.add(dev), ring_base=0x100000 + 0x40000 * i)
            d.negotiate(1 << VIRTIO_F_VERSION_1)
            d.enable_msix()
            drivers.append((d, d.setup_queue(0, 16, vector=1)))
        before = set(threading.enumerate())
        for d, _ in drivers:
            d.driver_ok()
        for i, (d, q) in enumerate(drivers):
            assert _read_request(m, d, q, i) == 0
        assert set(threading.enumerate()) == before
        assert all(dev.serving for dev in devs)
    finally:
        for dev in devs:
            dev.close()
        m.close()


def test_bar_move_while_serving_keeps_the_doorbell():
    m = SoftMachine(ram_size=8 << 20)
    dev = m.virtio_pci(VirtioBlk(Disk()))
    try:
        slot = m.pci.add(dev)
        d = VirtioPciDriver(m, slot)
        d.negotiate(1 << VIRTIO_F_VERSION_1)
        q = d.setup_queue(0, 16)
        d.driver_ok()
        assert _read_request(m, d, q, 0) == 0
        old_notify = dev.notify_address(0)
        m.cfg_write(slot, 0x10, 4, 0xE0000000)
        assert dev.notify_address(0) == 0xE0000000 + 0x3000 != old_notify
        for n in range(1, 4):
            assert _read_request(m, d, q, n) == 0
        # unmapped: nothing decodes the BAR; mapped again: kicks work again
        m.cfg_write(slot, 0x04, 2, 0)
        assert dev.notify_address(0) is None
        d.enable()
        assert _read_request(m, d, q, 4) == 0
        assert dev.serving and not d.status & DEVICE_NEEDS_RESET
    finally:
        dev.close()
        m.close()


# -- the native data plane is part of VirtioDevice: asked of a device that derives from it ------

class _UsesEveryChain:
    """A device written to the structural protocol alone (as a plug-in may be): it
    uses every chain at once, empty."""

    name = "uses-every-chain"
    device_type = 0x3F
    queue_max_sizes = (16,)

    def __init__(self):
        self.queues = ()
        self.transport = None
        self.runs = 0

    def device_features(self):
        return 0

    def ack_features(self, features):
        pass

    def config_bytes(self):
        return b""

    def write_config(self, offset, size, value):
        pass

    def activate(self, queues, memory, transport):
        self.queues, self.transport = queues, transport

    def process_queue(self, index):
        self.runs += 1
        q = self.queues[index]
        for chain in q.iter_chains():
            q.add_used(chain.head, 0)
        self.transport.signal_used(index)

    def fd_watches(self):
        return ()

    def reset(self):
        self.queues = ()

    def state(self):
        return None


class _DerivedUsesEveryChain(_UsesEveryChain, VirtioDevice):
    """The same, deriving from VirtioDevice: the transport offers it its queues."""

    def __init__(self):
        super().__init__()
        self.offered: list[int] = []

    def native_queue(self, index, queue, kick_fd, irq_fd):
        self.offered.append(index)
        return None


def _serve_chains(device, count=3):
    """Kick ``count`` chains one by one through a transport carrying ``device``; returns
    whether a native plane served its queue at the end."""
    m = SoftMachine(ram_size=4 << 20)
    t = m.virtio_pci(device)
    try:
        d = VirtioPciDriver(m, m.pci.add(t))
        d.negotiate(1 << VIRTIO_F_VERSION_1)
        q = d.setup_queue(0, 16)
        d.driver_ok()
        for _ in range(count):
            q.add([(0x300000, 64)], [])
            d.kick(0)
            assert d.wait_used(0) != []
        return t.native_queues
    finally:
        t.close()
        m.close()


def test_a_structural_device_is_served_in_python(caplog):
    device = _UsesEveryChain()
    assert _serve_chains(device) == (False,)
    assert device.runs >= 3
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


def test_a_derived_device_is_offered_its_queues_and_may_keep_them():
    device = _DerivedUsesEveryChain()
    assert _serve_chains(device) == (False,)        # its native_queue kept each one here
    assert device.runs >= 3 and device.offered and set(device.offered) == {0}
