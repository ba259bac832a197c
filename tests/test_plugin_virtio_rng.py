"""The virtio-rng plug-in (examples/plugins/virtio_rng.py) on the virtio-pci
transport, driven from Python as a guest driver would, honest and hostile."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.plugins.virtio_rng import VirtioRng, VirtioRngState
from kvmpy.devices.virtio.pci import DEVICE_NEEDS_RESET, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1
from kvmpy.errors import ConfigError
from support.virtio_driver import SoftMachine, VirtioPciDriver

RAM = 4 << 20


def rng_context(options=None, name="virtio-rng"):
    """What the plug-in reads of its DeviceContext: its name and options."""
    return SimpleNamespace(name=name, options={} if options is None else options)

BUF = 0x300000
QUEUE_SIZE = 16


class RngRig:
    def __init__(self, options=None, features=1 << VIRTIO_F_VERSION_1):
        self.m = SoftMachine(ram_size=RAM)
        self.rng = VirtioRng(rng_context(options))
        self.dev = self.m.virtio_pci(self.rng)
        self.slot = self.m.pci.add(self.dev)
        self.d = VirtioPciDriver(self.m, self.slot)
        self.start(features)

    def start(self, features=1 << VIRTIO_F_VERSION_1):
        self.features = self.d.negotiate(features)
        self.d.enable_msix()
        self.d.common_write(0x10, 2, 0)   # config vector 0
        self.q = self.d.setup_queue(0, QUEUE_SIZE, vector=1)
        self.d.driver_ok()

    def request(self, writable, readable=()):
        """One request; returns its used length."""
        head = self.q.add(list(readable), list(writable))
        msis = len(self.m.msis)
        self.d.kick(0)
        (h, used), = self.d.wait_used(0)
        assert h == head
        assert self.m.wait_msi(msis + 1), "no interrupt for a used request"
        return used

    def hostile(self, fill_descriptors):
        """Publish a chain whose descriptors ``fill_descriptors(memory, desc_addr)``
        writes, kick, and wait for the device to give up on it."""
        q = self.q
        head = q.free[0]
        fill_descriptors(self.m.memory, q.desc_addr, head)
        q.publish(head)
        msis = len(self.m.msis)
        self.d.kick(0)
        assert self.m.wait_msi(msis + 1), "no config interrupt for a hostile request"
        assert self.d.status & DEVICE_NEEDS_RESET
        assert (0xFEE00000, 0x30) in self.m.msis[msis:]     # config vector 0

    def close(self):
        self.dev.close()
        self.m.close()


@pytest.fixture
def rig():
    r = RngRig()
    yield r
    r.close()


def _desc(mem, table, i, addr, length, flags, nxt):
    mem.write_u64(table + 16 * i, addr)
    mem.write_u32(table + 16 * i + 8, length)
    mem.write_u16(table + 16 * i + 12, flags)
    mem.write_u16(table + 16 * i + 14, nxt)


def test_identity_and_no_config(rig):
    assert rig.m.cfg_read(rig.slot, 0, 4) == 0x1044_1AF4         # virtio device id 4: entropy
    assert rig.m.cfg_read(rig.slot, 0x08, 4) >> 8 == 0xFF0000
    assert rig.d.common_read(0x12, 2) == 1                      # one queue
    assert rig.d.device_features() & 0xFFFFFF == 0              # no device feature bits
    assert rig.d.device_cfg(0, 4) == 0


def test_fills_writable_buffers_with_fresh_bytes(rig):
    mem = rig.m.memory
    bufs = [(BUF, 16), (BUF + 0x1000, 100), (BUF + 0x2000, 4000)]
    for addr, n in bufs:
        mem.write(addr, b"\0" * n)
    assert rig.request(bufs) == 4116
    first = b"".join(mem.read(a, n) for a, n in bufs)
    assert first.count(0) < 200                                 # ~16 zero bytes expected in 4116
    assert rig.request(bufs) == 4116
    assert b"".join(mem.read(a, n) for a, n in bufs) != first
    assert rig.rng.requests == 2 and rig.rng.bytes_served == 2 * 4116
    assert not rig.d.status & DEVICE_NEEDS_RESET


def test_bytes_per_request_are_bounded():
    r = RngRig({"max_bytes_per_request": 64})
    try:
        r.m.memory.write(BUF, b"\xaa" * 4096)
        assert r.request([(BUF, 4096)]) == 64
        assert r.m.memory.read(BUF + 64, 4096 - 64) == b"\xaa" * (4096 - 64)
        assert r.request([(BUF, 10), (BUF + 0x100, 10)]) == 20
    finally:
        r.close()


def test_empty_request_is_answered():
    r = RngRig()
    try:
        assert r.request([(BUF, 0)]) == 0
        assert not r.d.status & DEVICE_NEEDS_RESET
    finally:
        r.close()


def test_read_only_descriptor_is_a_device_error(rig, caplog):
    with caplog.at_level(logging.WARNING):
        head = rig.q.add([(BUF, 16)], [(BUF + 0x100, 16)])
        msis = len(rig.m.msis)
        rig.d.kick(0)
        assert rig.m.wait_msi(msis + 1)
        assert rig.d.status & DEVICE_NEEDS_RESET
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "device-readable" in errors[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)
    assert rig.q.collect() == []            # the request is not answered
    assert rig.q.avail_idx == 1 and head in rig.q.chains
    # the driver resets the device and it serves again
    rig.start()
    assert rig.request([(BUF, 32)]) == 32


def test_chain_longer_than_the_queue_is_a_device_error(rig, caplog):
    def looping(mem, table, head):
        # every descriptor of the ring, each chained to the next, the last back to the first
        for i in range(QUEUE_SIZE):
            _desc(mem, table, i, BUF + 0x100 * i, 16, 1 | 2, (i + 1) % QUEUE_SIZE)
    with caplog.at_level(logging.WARNING):
        rig.hostile(looping)
    assert any("longer than its table" in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records)
    assert rig.rng.requests == 0


def test_indirect_chain_longer_than_its_table_is_a_device_error(caplog):
    r = RngRig(features=1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_RING_INDIRECT_DESC)
    try:
        table = 0x200000

        def indirect_loop(mem, desc, head):
            for i in range(4):
                _desc(mem, table, i, BUF, 8, 1 | 2, (i + 1) % 4)
            _desc(mem, desc, head, table, 16 * 4, 4, 0)
        with caplog.at_level(logging.WARNING):
            r.hostile(indirect_loop)
        assert not any(rec.exc_info for rec in caplog.records)
    finally:
        r.close()


@pytest.mark.parametrize("addr,length", [(RAM - 16, 4096), (RAM + 0x1000, 16), (BUF, 0xFFFFFFFF),
                                         (2**64 - 8, 16)])
def test_buffer_past_ram_is_a_device_error(rig, caplog, addr, length):
    before = rig.m.memory.read(0, RAM)

    def past_ram(mem, table, head):
        _desc(mem, table, head, addr, length, 2, 0)
    with caplog.at_level(logging.WARNING):
        rig.hostile(past_ram)
    assert any("outside" in r.getMessage() or "RAM" in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records)
    # nothing was written anywhere (the descriptor and ring writes are the driver's own)
    after = rig.m.memory.read(0, RAM)
    assert after[BUF:] == before[BUF:]


RING_AND_SENTINEL = (0x100000, BUF)     # the driver's rings, then bytes nothing may point at


@settings(max_examples=60, deadline=None)
@given(descs=st.lists(st.tuples(st.integers(0, RAM + 0x2000) | st.integers(0, 2**64 - 1),
                                st.integers(0, 0x3000) | st.just(0xFFFFFFFF),
                                st.integers(0, 7), st.integers(0, QUEUE_SIZE + 2)),
                      min_size=1, max_size=QUEUE_SIZE),
       head=st.integers(0, QUEUE_SIZE - 1))
def test_random_descriptor_tables_never_crash(descs, head):
    """Whatever the table holds: an answer or a device error, never a traceback,
    and bytes land only in buffers the table declares."""
    r = RngRig({"max_bytes_per_request": 256}, features=1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_RING_INDIRECT_DESC)
    try:
        mem = r.m.memory
        q = r.q
        low, high = RING_AND_SENTINEL
        sentinel = (0x200000, BUF - 0x200000)
        mem.write(sentinel[0], b"\x5a" * sentinel[1])
        for i, (addr, length, flags, nxt) in enumerate(descs):
            if addr < high and addr + length > low:
                # the rings are the driver's business: aim such buffers elsewhere
                addr, length = BUF, min(length, 0x1000)
            _desc(mem, q.desc_addr, i, addr, length, flags, nxt)
        q.publish(head)
        msis = len(r.m.msis)
        with _no_tracebacks():
            r.d.kick(0)
            assert r.m.wait_msi(msis + 1)
        if not r.d.status & DEVICE_NEEDS_RESET:
            (h, used), = q.collect()
            assert h == head and used <= 256
        assert mem.read(*sentinel) == b"\x5a" * sentinel[1]
    finally:
        r.close()


class _no_tracebacks:
    def __enter__(self):
        self.records = []
        self.handler = logging.Handler()
        self.handler.emit = self.records.append
        logging.getLogger().addHandler(self.handler)

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self.handler)
        assert not any(r.exc_info for r in self.records), [r.getMessage() for r in self.records]


def test_options():
    assert VirtioRng(rng_context()).max_bytes_per_request == 64 << 10
    assert VirtioRng(rng_context({"max_bytes_per_request": 1, "queue_size": 8})).queue_max_sizes == (8,)
    for bad in ({"max_bytes_per_request": 0}, {"max_bytes_per_request": (1 << 20) + 1},
                {"max_bytes_per_request": "4096"}, {"max_bytes_per_request": True}, {"queue_size": 100},
                {"queue_size": 65536}, {"name": "x"}, {"rate": 1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            VirtioRng(rng_context(bad))
    with pytest.raises(ConfigError):
        VirtioRng(rng_context(["max_bytes_per_request"]))


@given(max_bytes=st.integers(1, 1 << 20), queue_log2=st.integers(0, 15), requests=st.integers(0, 2**32),
       served=st.integers(0, 2**64))
def test_state_round_trips(max_bytes, queue_log2, requests, served):
    state = VirtioRngState(max_bytes, 1 << queue_log2, requests, served)
    assert VirtioRng.from_state(state, rng_context()).state() == state


def test_restored_device_keeps_serving(rig):
    assert rig.request([(BUF, 32)]) == 32
    saved_dev, saved_transport = rig.rng.state(), rig.dev.state()
    m2 = SoftMachine(ram_size=RAM)
    try:
        m2.memory.write(0, rig.m.memory.read(0, RAM))
        rng2 = VirtioRng.from_state(saved_dev, rng_context())
        dev2 = type(rig.dev).from_state(saved_transport, m2.platform, m2.events, rng2, m2.pci)
        d2 = VirtioPciDriver(m2, dev2.slot)
        d2.enable()
        d2.enable_msix()
        d2.queues[0] = rig.q                       # the driver's own ring bookkeeping carries over
        rig.q.memory = m2.memory
        head = rig.q.add([], [(BUF, 48)])
        d2.kick(0)
        assert d2.wait_used(0) == [(head, 48)]
        assert rng2.requests == 2 and rng2.bytes_served == 80
        assert dev2.state().queues[0].next_used == saved_transport.queues[0].next_used + 1
        dev2.close()
    finally:
        m2.close()
