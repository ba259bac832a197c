"""virtio state as values: every queue, the virtio-pci transport, virtio-blk and
virtio-net hand out a frozen dataclass, ``from_state`` builds an equal one, and a
restored device answers the driver's next operations exactly as the original does."""

from __future__ import annotations

import copy
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.block.driver import BlockDriver
from kvmpy.devices.virtio.blk import (VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD,
                                      VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
                                      VirtioBlk, VirtioBlkState)
from kvmpy.devices.virtio.net import VIRTIO_NET_F_MAC, VirtioNet, VirtioNetState
from kvmpy.devices.virtio.pci import (DRIVER_OK, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC,
                                      VIRTIO_F_VERSION_1, VirtioPciTransport)
from kvmpy.devices.virtio.queue import QueueState, SplitQueue
from kvmpy.memory import GuestMemory
from support.net_ports import SocketPort
from support.virtio_driver import SoftMachine, VirtioPciDriver

RAM = 4 << 20
DISK = 1 << 20
HDR, DATA, STATUS = 0x200000, 0x280000, 0x2F0000


class MemDisk(BlockDriver):
    """A BlockDriver in a bytearray, so a copy of the disk is one ``bytes()`` away."""

    read_only = False
    fd = -1         # no file a native data plane could serve: every request comes to the model

    def __init__(self, data: bytes | None = None, size: int = DISK):
        self.buf = bytearray(data if data is not None else size)
        self.size = len(self.buf)

    def preadv(self, bufs, off):
        for b in bufs:
            b[:] = self.buf[off:off + len(b)]
            off += len(b)

    def pwritev(self, bufs, off):
        for b in bufs:
            self.buf[off:off + len(b)] = b
            off += len(b)

    def flush(self):
        pass

    def discard(self, off, length):
        self.buf[off:off + length] = bytes(length)

    def write_zeroes(self, off, length, may_unmap=False):
        self.discard(off, length)

    def close(self):
        pass


# -- queues ---------------------------------------------------------------------------------

QUEUE_MEM = GuestMemory.anonymous([(0, 1 << 20)])


@st.composite
def queue_states(draw):
    max_size = 1 << draw(st.integers(0, 10))
    ready = draw(st.booleans())
    if ready:
        size = 1 << draw(st.integers(0, max_size.bit_length() - 1))
        room = (1 << 20) - 16 * size - (6 + 2 * size) - (6 + 8 * size)
        desc = draw(st.integers(0, room // 16)) * 16
        avail = draw(st.integers(0, ((1 << 20) - (6 + 2 * size)) // 2)) * 2
        used = draw(st.integers(0, ((1 << 20) - (6 + 8 * size)) // 4)) * 4
    else:
        size = draw(st.integers(0, 0xFFFF))
        desc, avail, used = (draw(st.integers(0, 2**64 - 1)) for _ in range(3))
    signalled = draw(st.none() | st.integers(0, 0xFFFF))
    return QueueState(max_size=max_size, size=size, ready=ready, desc_addr=desc, avail_addr=avail, used_addr=used,
                      event_idx=draw(st.booleans()), indirect=draw(st.booleans()),
                      next_avail=draw(st.integers(0, 0xFFFF)), next_used=draw(st.integers(0, 0xFFFF)),
                      signalled_used=signalled)


@given(state=queue_states())
def test_queue_state_round_trips(state):
    q = SplitQueue.from_state(QUEUE_MEM, state)
    assert q.state() == state
    assert q.active == state.ready


def test_queue_state_outside_memory_is_refused():
    state = QueueState(max_size=8, size=8, ready=True, desc_addr=2 << 20, avail_addr=0, used_addr=0x1000,
                       event_idx=False, indirect=False, next_avail=0, next_used=0, signalled_used=None)
    with pytest.raises(Exception, match="outside guest RAM"):
        SplitQueue.from_state(QUEUE_MEM, state)


# -- devices ----------------------------------------------------------------------------------

@given(serial=st.text(max_size=5), read_only=st.booleans(), num_queues=st.integers(1, 4),
       queue_log2=st.integers(0, 10), seg_max=st.integers(1, 1024), discard=st.booleans())
def test_blk_state_round_trips(serial, read_only, num_queues, queue_log2, seg_max, discard):
    dev = VirtioBlk(MemDisk(), serial=serial, read_only=read_only, num_queues=num_queues,
                    queue_size=1 << queue_log2, seg_max=seg_max, discard=discard)
    state = dev.state()
    assert isinstance(state, VirtioBlkState)
    again = VirtioBlk.from_state(state, MemDisk())
    assert again.state() == state
    assert again.config_bytes() == dev.config_bytes() and again.device_features() == dev.device_features()


def test_blk_state_needs_an_image_of_the_same_size():
    state = VirtioBlk(MemDisk()).state()
    with pytest.raises(ValueError, match="sectors"):
        VirtioBlk.from_state(state, MemDisk(size=DISK * 2))


@given(mac=st.binary(min_size=6, max_size=6).filter(any), queue_log2=st.integers(0, 10),
       counters=st.lists(st.integers(0, 2**40), min_size=4, max_size=4))
def test_net_state_round_trips(mac, queue_log2, counters):
    tap = SocketPort.pair()
    try:
        state = VirtioNetState(mac, 1 << queue_log2, *counters)
        dev = VirtioNet.from_state(state, tap)
        assert dev.state() == state
        assert dev.config_bytes()[:6] == mac
    finally:
        tap.close()


# -- the transport ----------------------------------------------------------------------------

COMMON_FIELDS = [(0x00, 4), (0x08, 4), (0x0C, 4), (0x10, 2), (0x14, 1), (0x16, 2), (0x18, 2), (0x1A, 2),
                 (0x1C, 2), (0x20, 4), (0x24, 4), (0x28, 4), (0x2C, 4), (0x30, 4), (0x34, 4), (0x20, 8)]

driver_writes = st.lists(st.tuples(st.sampled_from(COMMON_FIELDS), st.integers(0, 2**64 - 1),
                                   st.sampled_from([0, 1, 2, 3, 0xB, 0xF, 8, 64, 0x100000, 0x110000])),
                         max_size=40)


@settings(max_examples=60, deadline=None)
@given(writes=driver_writes, negotiate=st.booleans())
def test_transport_state_round_trips(writes, negotiate):
    """Whatever a driver wrote (no kick: nothing is in flight), ``from_state(state())``
    on a copy of guest RAM holds the same state and reads back the same common config."""
    a, b = SoftMachine(ram_size=RAM), SoftMachine(ram_size=RAM)
    ta = a.virtio_pci(VirtioBlk(MemDisk(), num_queues=2))
    tb = None
    try:
        da = VirtioPciDriver(a, a.pci.add(ta))
        da.enable()
        if negotiate:
            da.negotiate(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_RING_EVENT_IDX)
            da.setup_queue(0, 16, vector=1)
        for (off, size), value, small in writes:
            da.common_write(off, size, small if value % 2 else value & ((1 << (8 * size)) - 1))
        state = ta.state()
        b.memory.write(0, a.memory.read(0, RAM))
        tb = VirtioPciTransport.from_state(state, b.platform, b.events, VirtioBlk(MemDisk(), num_queues=2), b.pci)
        slot = tb.slot
        assert tb.state() == state
        assert tb.serving == (bool(state.status & DRIVER_OK) and not state.broken and not state.status & 0x80)
        db = VirtioPciDriver(b, slot)
        db.enable()
        for qs in range(3):
            da.common_write(0x16, 2, qs)
            db.common_write(0x16, 2, qs)
            for off, size in COMMON_FIELDS + [(0x04, 4), (0x12, 2), (0x15, 1), (0x1E, 2)]:
                assert da.common_read(off, size) == db.common_read(off, size), (qs, off)
    finally:
        ta.close()
        if tb is not None:
            tb.close()
        a.close()
        b.close()


def test_transport_state_must_match_the_device():
    m = SoftMachine(ram_size=RAM)
    t = m.virtio_pci(VirtioBlk(MemDisk(), num_queues=2))
    try:
        with pytest.raises(ValueError, match="queues"):
            VirtioPciTransport.from_state(t.state(), m.platform, m.events, VirtioBlk(MemDisk()), m.pci)
    finally:
        t.close()
        m.close()


# -- restored devices behave like the originals ------------------------------------------------

class BlkSide:
    """One machine with a virtio-blk function and a driver, original or restored."""

    FEATURES = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_RING_INDIRECT_DESC | 1 << VIRTIO_BLK_F_DISCARD
                | 1 << 14 | 1 << 9)

    def __init__(self, event_idx=False, restore_from=None):
        self.m = SoftMachine(ram_size=RAM)
        if restore_from is None:
            self.disk = MemDisk()
            self.blk = VirtioBlk(self.disk, serial="state-test")
            self.t = self.m.virtio_pci(self.blk)
            self.d = VirtioPciDriver(self.m, self.m.pci.add(self.t))
            features = self.FEATURES | (1 << VIRTIO_F_RING_EVENT_IDX if event_idx else 0)
            self.d.negotiate(features)
            self.d.enable_msix()
            self.d.common_write(0x10, 2, 0)
            self.q = self.d.setup_queue(0, 32, vector=1, event_idx=event_idx)
            self.d.driver_ok()
        else:
            # What a snapshot carries: guest RAM, the disk, the device values; the PCI
            # function's own state (BARs, MSI-X table) is redone by the driver here.
            other = restore_from
            # As a snapshot does, the device first: taking its state waits for the batch
            # in progress, whose last step (the NO_NOTIFY flag or avail_event written
            # back) may come after the driver saw its used entry.
            other.t.state()
            self.m.memory.write(0, other.m.memory.read(0, RAM))
            self.disk = MemDisk(bytes(other.disk.buf))
            self.blk = VirtioBlk.from_state(other.blk.state(), self.disk)
            self.t = VirtioPciTransport.from_state(other.t.state(), self.m.platform, self.m.events, self.blk,
                                                   self.m.pci)
            self.d = VirtioPciDriver(self.m, self.t.slot)
            self.d.enable()
            self.d.enable_msix()
            self.q = copy.copy(other.q)
            self.q.memory = self.m.memory
            self.q.free, self.q.chains = list(other.q.free), {k: list(v) for k, v in other.q.chains.items()}
            self.d.queues[0] = self.q
        # the driver's own bookkeeping (which request slot is next) carries over too
        self.n = restore_from.n if restore_from is not None else 0

    def request(self, rtype, sector, out=b"", in_len=0):
        slot = self.n % 8
        self.n += 1
        hdr, data, status = HDR + 0x100 * slot, DATA + 0x10000 * slot, STATUS + slot
        self.m.memory.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        readable = [(hdr, 16)]
        if out:
            self.m.memory.write(data, out)
            readable.append((data, len(out)))
        writable = ([(data, in_len)] if in_len else []) + [(status, 1)]
        head = self.q.add(readable, writable)
        self.d.kick(0)
        got = self.d.wait_used(0)
        return got, head, self.m.memory.read(status, 1), self.m.memory.read(data, in_len)

    def guest_view(self):
        # The driver saw the used idx; the device may still be writing avail_event
        # after it. Taking the state waits for the request in progress to finish.
        self.t.state()
        return (self.m.memory.read(0, RAM), bytes(self.disk.buf),
                [self.d.device_cfg(o, 4) for o in range(0, 0x3C, 4)], self.d.status)

    def close(self):
        self.t.close()
        self.m.close()


blk_ops = st.lists(st.tuples(st.sampled_from([VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH,
                                              VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD, 77]),
                             st.integers(0, DISK // 512 + 2), st.integers(0, 8), st.binary(min_size=1, max_size=1)),
                   max_size=8)


def _run(side, op):
    rtype, sector, nsect, fill = op
    if rtype == VIRTIO_BLK_T_OUT:
        return side.request(rtype, sector, out=fill * (512 * nsect))
    if rtype == VIRTIO_BLK_T_DISCARD:
        return side.request(rtype, 0, out=struct.pack("<QII", sector, nsect, 0))
    if rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID):
        return side.request(rtype, sector, in_len=512 * nsect if rtype == VIRTIO_BLK_T_IN else 20)
    return side.request(rtype, sector)


@settings(max_examples=25, deadline=None)
@given(before=blk_ops, after=blk_ops, event_idx=st.booleans())
def test_restored_blk_answers_like_the_original(before, after, event_idx):
    original = BlkSide(event_idx=event_idx)
    restored = None
    try:
        for op in before:
            _run(original, op)
        restored = BlkSide(restore_from=original)
        assert restored.t.state() == original.t.state()
        assert restored.guest_view() == original.guest_view()
        for op in after:
            assert _run(restored, op) == _run(original, op)
        assert restored.guest_view() == original.guest_view()
        assert restored.t.state() == original.t.state()
    finally:
        original.close()
        if restored is not None:
            restored.close()


def test_restored_blk_reads_what_was_written():
    original = BlkSide()
    try:
        pattern = os.urandom(4096)
        assert original.request(VIRTIO_BLK_T_OUT, 16, out=pattern)[2] == bytes([VIRTIO_BLK_S_OK])
        restored = BlkSide(restore_from=original)
        try:
            [(_, used)], _, status, data = restored.request(VIRTIO_BLK_T_IN, 16, in_len=4096)
            assert (used, status, data) == (4097, bytes([VIRTIO_BLK_S_OK]), pattern)
        finally:
            restored.close()
    finally:
        original.close()


class NetSide:
    RX, TX = 0x200000, 0x280000

    def __init__(self, restore_from=None):
        self.m = SoftMachine(ram_size=RAM)
        self.tap = SocketPort.pair()
        if restore_from is None:
            self.net = VirtioNet(self.tap, mac=b"\x52\x54\x00\x00\x00\x07")
            self.t = self.m.virtio_pci(self.net)
            self.d = VirtioPciDriver(self.m, self.m.pci.add(self.t))
            self.d.negotiate(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC)
            self.d.enable_msix()
            self.rxq = self.d.setup_queue(0, 16, vector=1)
            self.txq = self.d.setup_queue(1, 16, vector=2)
            self.d.driver_ok()
        else:
            other = restore_from
            # As a snapshot does, the device first: taking its state waits for the batch
            # in progress, whose last step (the NO_NOTIFY flag or avail_event written
            # back) may come after the driver saw its used entry.
            other.t.state()
            self.m.memory.write(0, other.m.memory.read(0, RAM))
            self.net = VirtioNet.from_state(other.net.state(), self.tap)
            self.t = VirtioPciTransport.from_state(other.t.state(), self.m.platform, self.m.events, self.net,
                                                   self.m.pci)
            self.d = VirtioPciDriver(self.m, self.t.slot)
            self.d.enable()
            self.d.enable_msix()
            for i, name in ((0, "rxq"), (1, "txq")):
                q = copy.copy(getattr(other, name))
                q.memory = self.m.memory
                q.free, q.chains = list(q.free), {k: list(v) for k, v in q.chains.items()}
                setattr(self, name, q)
                self.d.queues[i] = q

    def send(self, frame: bytes):
        self.m.memory.write(self.TX, bytes(12) + frame)
        self.txq.add([(self.TX, 12 + len(frame))], [])
        self.d.kick(1)
        self.d.wait_used(1)
        return self.tap.host.recv(4096)

    def post_rx(self, n):
        for i in range(n):
            self.rxq.add([], [(self.RX + 0x1000 * i, 2048)])
        self.d.kick(0)

    def receive(self, frame: bytes):
        self.tap.host.send(bytes(12) + frame)
        return self.d.wait_used(0)

    def close(self):
        self.t.close()
        self.tap.close()
        self.m.close()


def test_restored_net_answers_like_the_original():
    original = NetSide()
    restored = None
    try:
        assert original.send(b"\xff" * 6 + b"x" * 50) == bytes(12) + b"\xff" * 6 + b"x" * 50
        original.post_rx(4)                     # buffers posted before the snapshot, filled after it
        assert original.receive(b"first") != []
        restored = NetSide(restore_from=original)
        assert restored.t.state() == original.t.state() and restored.net.state() == original.net.state()
        assert restored.tap.offload_calls == [0] and original.tap.offload_calls == [0]   # re-applied on restore
        for side in (original, restored):
            assert side.receive(b"second" * 10) == [(1, 72)]
            assert side.send(b"y" * 60) == bytes(12) + b"y" * 60
        assert restored.t.state() == original.t.state() and restored.net.state() == original.net.state()
        assert restored.m.memory.read(0, RAM) == original.m.memory.read(0, RAM)
    finally:
        original.close()
        if restored is not None:
            restored.close()
