"""virtio-net's native data plane (netplane.py, c_ext/dataplane/net_dataplane.c) on a real tap.

Each tap lives in a network namespace made for the test, with no bridge: a packet
socket bound to the tap's interface plays the other host (what the guest sends
arrives there, what it sends the guest reads from the tap). The same traffic runs
with ``dataplane="native"`` and ``"python"``: the C thread must deliver the same
frames with the same used entries, hand the pair back at what only the model may
judge, and stop cleanly on reset, hold and ``state()``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import time
import types

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvmpy.config import ConfigError, load_config, parse_netdev
from kvmpy.devices.virtio import netplane
from kvmpy.devices.virtio.dataplane import RegionPointers
from kvmpy.devices.virtio.net import VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VirtioNet
from kvmpy.devices.virtio.pci import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1
from kvmpy.devices.virtio.queue import SplitQueue
from kvmpy.tap import TapNetwork
from support.net_ports import SocketPort
from support.net_rig import TapNicRig, packet_socket
from support.polling import wait_for
from support.virtio_driver import DriverQueue, SoftMachine, VirtioPciDriver

needs_native = pytest.mark.skipif(not netplane.available(),
                                  reason=f"net data plane not built: {netplane.unavailable_reason()}")

ETH_TYPE = 0x88B5           # IEEE local experimental: nothing else in the namespace speaks it
PEER = b"\x02\x00\x00\x00\x00\x01"
RXBUF = 0x400000            # 64 rx buffers of 2 KiB
TXBUF = 0x480000            # 64 tx frames of 2 KiB
SLOT = 0x800


def ours(frame: bytes) -> bool:
    return frame[12:14] == struct.pack("!H", ETH_TYPE)


class Rig(TapNicRig):
    def __init__(self, ns, mode="native", event_idx=False, queue_size=64):
        super().__init__(ns, vm_name="np", ram_size=8 << 20, dataplane=mode)   # one MAC for both modes
        self.event_idx = event_idx
        self.queue_size = queue_size
        self.sock = packet_socket(ns, self.net.tap.name, ETH_TYPE)
        self.rx_buffer_of: dict[int, int] = {}
        self.start()

    def start(self):
        self.start_driver(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
                          | self.event_idx << VIRTIO_F_RING_EVENT_IDX)
        self.rxq = self.d.setup_queue(0, self.queue_size, vector=1, event_idx=self.event_idx)
        self.txq = self.d.setup_queue(1, self.queue_size, vector=2, event_idx=self.event_idx)
        self.d.driver_ok()

    def frame(self, i: int, size: int = 60) -> bytes:
        payload = b"np-%05d-" % i
        return self.net.mac + PEER + struct.pack("!H", ETH_TYPE) + (payload * (size // len(payload) + 1))[:size]

    def send_from_guest(self, frames, layouts=None):
        """Each frame as one tx chain (header + frame), laid out in the ways drivers do."""
        mem = self.m.memory
        for i, frame in enumerate(frames):
            base = TXBUF + SLOT * (i % 64)
            mem.write(base, bytes(12) + frame)
            n = 12 + len(frame)
            layout = (layouts or "abc")[i % len(layouts or "abc")]
            if layout == "a":       # header apart, as Linux sends
                self.txq.add([(base, 12), (base + 12, len(frame))], [])
            elif layout == "b":     # one buffer
                self.txq.add([(base, n)], [])
            else:                   # three, the header split
                self.txq.add([(base, 7), (base + 7, 20), (base + 27, n - 27)], [])
        self.d.kick(1)

    def host_receives(self, count: int) -> list[bytes]:
        got = []
        while len(got) < count:
            data = self.sock.recv(4096)
            if ours(data):
                got.append(data)
        return got

    def guest_receives(self, count: int, timeout: float = 5.0) -> list[tuple[int, bytes, int]]:
        """(head, frame, num_buffers) of our frames, in used order."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            for head, length in self.d.wait_used(0, 1, timeout=max(0.1, deadline - time.monotonic())):
                data = self.m.memory.read(self.rx_buffer_of.pop(head), length)
                if ours(data[12:]):
                    out.append((head, data[12:], struct.unpack_from("<H", data, 10)[0]))
        return out

    def post_rx_mapped(self, count: int, split: bool = False):
        """Make ``count`` rx chains of 2 KiB available (header apart if ``split``) and kick."""
        for i in range(count):
            base = RXBUF + SLOT * (i % 64)
            bufs = [(base, 12), (base + 12, SLOT - 12)] if split else [(base, SLOT)]
            self.rx_buffer_of[self.rxq.add([], bufs)] = base
        self.d.kick(0)

    def native(self) -> tuple[bool, ...]:
        """rx and tx (the control queue is always the model's)."""
        return self.dev.native_queues[:2]


@pytest.fixture
def make_rig(netns):
    rigs = []

    def make(mode="native", **kw):
        rig = Rig(netns, mode, **kw)
        rigs.append(rig)
        return rig
    yield make
    for rig in rigs:
        rig.close()


def exchange(rig, n_tx: int, n_rx: int, split: bool):
    """Frames both ways; returns what the host and the guest received."""
    frames = [rig.frame(i, 60 + 37 * i % 1400) for i in range(n_tx)]
    sent = []
    for start in range(0, n_tx, 20):
        batch = frames[start:start + 20]
        rig.send_from_guest(batch)
        sent += rig.host_receives(len(batch))
        rig.d.wait_used(1, len(batch))
    received = []
    for start in range(0, n_rx, 20):
        batch = [rig.frame(1000 + i, 60 + 53 * i % 1400) for i in range(start, min(n_rx, start + 20))]
        rig.post_rx_mapped(len(batch), split=split)
        for f in batch:
            rig.sock.send(f)
        received += [(frame, nb) for _, frame, nb in rig.guest_receives(len(batch))]
    return sent, received


@needs_native
@pytest.mark.parametrize("event_idx", [False, True])
def test_same_frames_as_the_python_model(make_rig, event_idx):
    results = {}
    for mode in ("native", "python"):
        rig = make_rig(mode, event_idx=event_idx)
        assert wait_for(lambda: rig.native() == ((True, True) if mode == "native" else (False, False)))
        sent, received = exchange(rig, 150, 150, split=event_idx)
        if mode == "native":
            assert rig.native() == (True, True), "the pair went back to Python on plain traffic"
        counts = rig.model.counts()
        assert counts["tx_frames"] == 150 and counts["rx_frames"] >= 150 and counts["tx_dropped"] == 0
        results[mode] = (sent, received)
    assert results["native"] == results["python"]
    sent, received = results["native"]
    assert [f[14:22] for f in sent] == [b"np-%05d" % i for i in range(150)]
    assert all(nb == 1 for _, nb in received) and len(received) == 150


@needs_native
def test_interrupts_follow_event_idx(make_rig):
    rig = make_rig(event_idx=True)
    assert wait_for(lambda: rig.native() == (True, True))
    # the first used entry interrupts (nothing signalled yet)
    rig.send_from_guest([rig.frame(0)])
    rig.host_receives(1)
    assert rig.m.wait_msi(1)
    # used_event far ahead: 20 frames sent, no interrupt wanted
    rig.txq.set_used_event(1000)
    rig.send_from_guest([rig.frame(i) for i in range(1, 21)])
    rig.host_receives(20)
    assert wait_for(lambda: rig.txq.used_idx() == 21)
    time.sleep(0.05)
    assert len(rig.m.msis) == 1
    # used_event at 25: the 26th used entry interrupts
    rig.txq.set_used_event(25)
    rig.send_from_guest([rig.frame(i) for i in range(21, 31)])
    rig.host_receives(10)
    assert rig.m.wait_msi(2)
    # the thread asked for the next kick where it stopped
    assert wait_for(lambda: rig.txq.avail_event() == 31)


@needs_native
def test_bad_descriptor_mid_stream(make_rig, caplog):
    rig = make_rig()
    assert wait_for(lambda: rig.native() == (True, True))
    mem = rig.m.memory
    good = [rig.frame(i) for i in range(3)]
    for i, f in enumerate(good):
        mem.write(TXBUF + SLOT * i, bytes(12) + f)
        rig.txq.add([(TXBUF + SLOT * i, 12 + len(f))], [])
    rig.txq.add([(0x7FFFFFFF000, 64)], [])          # outside guest RAM
    mem.write(TXBUF + SLOT * 5, bytes(12) + rig.frame(5))
    rig.txq.add([(TXBUF + SLOT * 5, 72)], [])
    with caplog.at_level(logging.ERROR):
        rig.d.kick(1)
        assert rig.host_receives(3) == good
        assert wait_for(lambda: rig.d.status & 0x40)
    assert rig.txq.used_idx() == 3                  # the frames before it, not it, not after it
    assert rig.native() == (False, False)
    assert any("needs reset" in r.getMessage() for r in caplog.records)
    rig.sock.settimeout(0.2)
    with pytest.raises(socket.timeout):
        rig.host_receives(1)
    # the driver resets and starts again: the pair goes native again
    rig.start()
    assert wait_for(lambda: rig.native() == (True, True))
    rig.send_from_guest([rig.frame(9)])
    rig.sock.settimeout(5)
    assert rig.host_receives(1) == [rig.frame(9)]


@needs_native
def test_bad_rx_descriptor_mid_stream(make_rig, caplog):
    rig = make_rig()
    assert wait_for(lambda: rig.native() == (True, True))
    rig.post_rx_mapped(2)
    loop = rig.rxq.add([], [(RXBUF + 2 * SLOT, 64), (RXBUF + 2 * SLOT + 64, 64)])
    last = rig.rxq.desc_addr + 16 * rig.rxq.chains[loop][1]
    rig.m.memory.write_u16(last + 12, 3)                        # NEXT | WRITE ...
    rig.m.memory.write_u16(last + 14, rig.rxq.chains[loop][0])  # ... back to the head: a loop
    with caplog.at_level(logging.ERROR):
        for i in range(3):
            rig.sock.send(rig.frame(i))
        rig.d.kick(0)
        assert [f for _, f, _ in rig.guest_receives(2)] == [rig.frame(0), rig.frame(1)]
        assert wait_for(lambda: rig.d.status & 0x40)      # the loop: NEEDS_RESET, nothing written for it
    assert rig.rxq.used_idx() == 2 and rig.native() == (False, False)
    assert any("needs reset" in r.getMessage() for r in caplog.records)


@needs_native
def test_unusual_chains_go_to_the_model_and_come_back(make_rig):
    rig = make_rig()
    assert wait_for(lambda: rig.native() == (True, True))
    mem = rig.m.memory
    # a tx chain of a bare header: the model drops and counts it, then the thread carries on
    head = rig.txq.add([(TXBUF, 12)], [])
    rig.d.kick(1)
    assert rig.d.wait_used(1) == [(head, 0)]
    assert wait_for(lambda: rig.model.counts()["tx_dropped"] == 1)
    assert wait_for(lambda: rig.native() == (True, True))
    # an rx chain too small for the header: returned empty by the model, not written past
    mem.write(RXBUF, b"\xaa" * 16)
    head = rig.rxq.add([], [(RXBUF, 4)])
    rig.d.kick(0)
    rig.sock.send(rig.frame(1))
    assert rig.d.wait_used(0) == [(head, 0)]
    assert mem.read(RXBUF, 16) == b"\xaa" * 16
    assert wait_for(lambda: rig.native() == (True, True))
    rig.post_rx_mapped(1)
    (_, frame, nb), = rig.guest_receives(1)
    assert frame == rig.frame(1) and nb == 1


@needs_native
def test_rx_backpressure_waits_for_buffers(make_rig):
    rig = make_rig()
    assert wait_for(lambda: rig.native() == (True, True))
    frames = [rig.frame(i, 100) for i in range(10)]
    for f in frames:
        rig.sock.send(f)
    time.sleep(0.1)
    assert rig.model.counts()["rx_frames"] == 0 and rig.model.counts()["rx_dropped"] == 0
    rig.post_rx_mapped(4)
    got = rig.guest_receives(4)
    time.sleep(0.05)
    assert rig.rxq.used_idx() == 4                  # no more buffers: the rest wait in the tap
    rig.post_rx_mapped(6)
    got += rig.guest_receives(6)
    assert [f for _, f, _ in got] == frames


@needs_native
def test_reset_with_frames_queued(make_rig):
    rig = make_rig()
    assert wait_for(lambda: rig.native() == (True, True))
    for i in range(5):
        rig.sock.send(rig.frame(i))
    for i in range(5):                              # tx chains made available, never kicked
        rig.m.memory.write(TXBUF + SLOT * i, bytes(12) + rig.frame(100 + i))
        rig.txq.add([(TXBUF + SLOT * i, 72)], [], publish=False)
    rig.d.set_status(0)
    assert rig.native() == (False, False) and rig.d.status == 0
    rig.start()
    assert wait_for(lambda: rig.native() == (True, True))
    rig.post_rx_mapped(5)
    assert [f for _, f, _ in rig.guest_receives(5)] == [rig.frame(i) for i in range(5)]


@needs_native
def test_hold_and_state_take_the_pair_back(make_rig):
    rig = make_rig()
    assert wait_for(lambda: rig.native() == (True, True))
    rig.send_from_guest([rig.frame(i) for i in range(7)])
    rig.host_receives(7)
    rig.d.wait_used(1, 7)
    rig.dev.hold_native(True)
    assert rig.native() == (False, False)
    # the thread asked for no kicks while it worked; the model must get them again
    assert rig.txq.device_wants_notify() and rig.rxq.device_wants_notify()
    assert rig.dev.queues[1].next_used == 7 and rig.dev.queues[1].next_avail == 7
    # while held the model serves the queues
    rig.send_from_guest([rig.frame(7)])
    assert rig.host_receives(1) == [rig.frame(7)]
    assert rig.native() == (False, False)
    rig.dev.hold_native(False)
    assert wait_for(lambda: rig.native() == (True, True))
    rig.send_from_guest([rig.frame(8)])
    rig.host_receives(1)
    assert wait_for(lambda: rig.dev.queues[1].next_used == 9 or rig.txq.used_idx() == 9)
    state = rig.dev.state()
    assert state.queues[1].next_used == 9 and rig.model.state().tx_frames == 9
    assert wait_for(lambda: rig.native() == (True, True))   # state() gives the pair back afterwards


@needs_native
def test_intx_and_no_vector_routes(netns):
    """Without MSI-X the thread's used entries raise INTx with the ISR's queue bit
    (through the event loop); with MSI-X on and no vector, nothing at all."""
    net = TapNetwork.open(vm_name="np", netns=netns)
    m = SoftMachine(ram_size=8 << 20)
    dev = m.virtio_pci(VirtioNet(net.tap, mac=net.mac))
    sock = packet_socket(netns, net.tap.name, ETH_TYPE)
    try:
        d = VirtioPciDriver(m, m.pci.add(dev))
        d.negotiate(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC)
        d.setup_queue(0, 16)
        txq = d.setup_queue(1, 16)
        d.driver_ok()
        assert wait_for(lambda: dev.native_queues[:2] == (True, True))   # the control queue is the model's
        frame = net.mac + PEER + struct.pack("!H", ETH_TYPE) + b"intx".ljust(46, b"-")
        m.memory.write(TXBUF, bytes(12) + frame)
        txq.add([(TXBUF, 12 + len(frame))], [])
        d.kick(1)
        d.wait_used(1)
        with m.cond:
            assert m.cond.wait_for(lambda: (dev.intx_gsi, True) in m.irq_changes, 5)
        assert d.isr() & 1
        assert sock.recv(2048) == frame
        # MSI-X on, the queues without a vector: the thread raises nothing
        d.negotiate(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC)
        d.enable_msix()
        d.setup_queue(0, 16)
        txq = d.setup_queue(1, 16)
        d.driver_ok()
        assert wait_for(lambda: dev.native_queues[:2] == (True, True))   # the control queue is the model's
        m.irq_changes.clear()
        txq.add([(TXBUF, 12 + len(frame))], [])
        d.kick(1)
        d.wait_used(1)
        assert sock.recv(2048) == frame
        time.sleep(0.05)
        assert m.msis == [] and (dev.intx_gsi, True) not in m.irq_changes
        assert dev.state().queues[1].next_used == 1
    finally:
        sock.close()
        dev.close()
        net.close()
        m.close()


@needs_native
def test_translator_memory_keeps_frames_in_python(make_rig):
    """Under the translator, device writes must reach memory.dma_listeners (its
    translated code is dropped on them), which a C thread would bypass."""
    rig = make_rig()
    heard = []
    rig.m.memory.dma_listeners.append(lambda gpa, n: heard.append((gpa, n)))
    rig.start()                         # reset, and DRIVER_OK again with the listener there
    rig.post_rx_mapped(1)
    rig.sock.send(rig.frame(0))
    (head, frame, _), = rig.guest_receives(1)
    assert frame == rig.frame(0) and heard and rig.native() == (False, False)


@needs_native
def test_python_mode_stays_in_python(make_rig):
    rig = make_rig("python")
    rig.send_from_guest([rig.frame(0)])
    rig.host_receives(1)
    time.sleep(0.05)
    assert rig.native() == (False, False)


# -- the C plane on its own: MRG_RXBUF, which the model does not offer yet ----------------

@contextlib.contextmanager
def _mergeable_pair(netns, vm_name: str):
    """A C rx/tx pair with MRG_RXBUF on a tap in ``netns``, its rings driven by the
    test (rig.dqs) and a packet socket on the tap's far side (rig.sock)."""
    rig = types.SimpleNamespace(net=TapNetwork.open(vm_name=vm_name, netns=netns),
                                m=SoftMachine(ram_size=8 << 20), pair=None, sock=None,
                                kicks=[os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)])
    try:
        rig.sock = packet_socket(netns, rig.net.tap.name, ETH_TYPE)
        rig.dqs, rig.sqs = [], []
        for i in range(2):
            dq = DriverQueue(rig.m.memory, 0x100000 + 0x10000 * i, 64)
            sq = SplitQueue(rig.m.memory, 64)
            sq.size, sq.desc_addr, sq.avail_addr, sq.used_addr = 64, dq.desc_addr, dq.avail_addr, dq.used_addr
            sq.activate()
            rig.dqs.append(dq)
            rig.sqs.append(sq)
        backend = netplane.NetPairBackend(rx_queue=0, tx_queue=1, tap_fd=rig.net.tap.fd, hdr_len=12,
                                          mrg_rxbuf=True, rx_frame_max=12 + 69632)
        rig.pair = netplane.NativeNetPair(RegionPointers(rig.m.memory), rig.sqs[0], rig.sqs[1], backend,
                                          kick_fds=tuple(rig.kicks), irq_fds=(None, None))
        yield rig
    finally:
        if rig.pair is not None:
            rig.pair.stop()
            rig.pair.close()
        for fd in rig.kicks:
            os.close(fd)
        if rig.sock is not None:
            rig.sock.close()
        rig.net.close()
        rig.m.close()


@needs_native
def test_mergeable_rx_buffers_spread_a_frame(netns):
    with _mergeable_pair(netns, "np-mrg") as rig:
        m, dqs, sqs, sock, net, kicks, pair = rig.m, rig.dqs, rig.sqs, rig.sock, rig.net, rig.kicks, rig.pair
        # 16 rx chains of 256 bytes; a 1000-byte frame needs 4 of them (1012 bytes with the header)
        heads = [dqs[0].add([], [(RXBUF + 256 * i, 256)]) for i in range(16)]
        os.eventfd_write(kicks[0], 1)
        frame = net.mac + PEER + struct.pack("!H", ETH_TYPE) + bytes(range(256)) * 3 + bytes(986 - 768)
        assert len(frame) == 1000
        sock.send(frame)
        assert wait_for(lambda: dqs[0].used_idx() == 4)
        used = dqs[0].collect()
        assert used == [(heads[0], 256), (heads[1], 256), (heads[2], 256), (heads[3], 244)]
        data = m.memory.read(RXBUF, 1012)
        assert struct.unpack_from("<H", data, 10)[0] == 4 and data[12:] == frame
        # a small one takes the next chain alone
        sock.send(frame[:60])
        assert wait_for(lambda: dqs[0].used_idx() == 5)
        assert dqs[0].collect() == [(heads[4], 72)]
        assert m.memory.read(RXBUF + 4 * 256 + 10, 2) == b"\x01\x00"
        assert pair.take_interrupt(0)
        info = pair.stop()
        pair.close()
        rig.pair = None
        assert info.rx_frames == 2 and not info.handed_back
        assert sqs[0].next_avail == 5 and sqs[0].next_used == 5


# -- configuration ---------------------------------------------------------------------------

def test_dataplane_key_and_option(tmp_path):
    cfg = tmp_path / "vm.toml"
    cfg.write_text('[[net]]\nifname = "t0"\ndataplane = "python"\n')
    assert load_config(str(cfg)).nets[0].dataplane == "python"
    cfg.write_text('[[net]]\nifname = "t0"\ndataplane = "vhost"\n')
    with pytest.raises(ConfigError, match=r"\[\[net\]\] #1 key 'dataplane'"):
        load_config(str(cfg))
    assert parse_netdev("tap,ifname=t0,dataplane=python").dataplane == "python"
    assert parse_netdev("tap,ifname=t0").dataplane == "native"
    with pytest.raises(ConfigError, match="dataplane"):
        parse_netdev("tap,ifname=t0,dataplane=fast")


def test_device_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="dataplane"):
        VirtioNet(SocketPort(), dataplane="fast")


# -- random traffic: the thread and the model answer alike ------------------------------------

FUZZ = int(os.environ.get("KVMPY_FUZZ", "0") or 0)

# (Lengths are of the payload after the 14-byte Ethernet header.)
# A tx chain: frame length (0: a bare header, which the model drops), where its bytes
# are cut into buffers, and whether a writable buffer follows (the model sends the
# readable part; the thread hands such a chain back).
TX_CHAINS = st.lists(st.tuples(st.sampled_from([0, 46, 47, 200, 1500]) | st.integers(46, 1500),
                               st.lists(st.integers(1, 1600), max_size=3), st.booleans()),
                     min_size=1, max_size=12)
# An rx chain: its buffer sizes (the first may be readable) and the frame sent for it.
RX_CHAINS = st.lists(st.tuples(st.lists(st.integers(1, 1600), min_size=1, max_size=3), st.booleans(),
                               st.integers(46, 1500)),
                     min_size=1, max_size=12)


def _tx_round(rig, chains, serial):
    mem = rig.m.memory
    frames = []
    for i, (length, cuts, writable_tail) in enumerate(chains):
        base = TXBUF + SLOT * i
        frame = rig.frame(serial * 100 + i, length) if length else b""
        mem.write(base, bytes(12) + frame)
        n = 12 + len(frame)
        points = sorted({c for c in cuts if c < n})
        bounds = [0, *points, n]
        segs = [(base + a, b - a) for a, b in zip(bounds, bounds[1:])]
        rig.txq.add(segs, [(base + 0x700, 16)] if writable_tail else [])
        if length:
            frames.append(frame)
    rig.d.kick(1)
    used = rig.d.wait_used(1, len(chains))
    rig.sock.settimeout(2)
    got = rig.host_receives(len(frames))
    return used, got


def _rx_round(rig, chains, serial):
    mem = rig.m.memory
    frames, layout = [], []
    for i, (sizes, readable_first, length) in enumerate(chains):
        base = RXBUF + SLOT * i
        mem.write(base, b"\xee" * SLOT)
        offs = [0]
        for size in sizes:
            offs.append(offs[-1] + min(size, SLOT // 4))
        bufs = [(base + a, b - a) for a, b in zip(offs, offs[1:])]
        split = 1 if readable_first and len(bufs) > 1 else 0
        layout.append((bufs[:split], bufs[split:]))
        # the model takes a frame into every chain whose writable part holds the header
        if sum(n for _, n in bufs[split:]) >= 12:
            frames.append(rig.frame(serial * 100 + i, length))
    for f in frames:
        rig.sock.send(f)
    for readable, writable in layout:
        rig.rxq.add(readable, writable)
    rig.d.kick(0)
    used = rig.d.wait_used(0, len(chains))
    return used, [b"".join(mem.read(a, n) for a, n in writable) for _, writable in layout]


@needs_native
@settings(max_examples=15 * (10 if FUZZ else 1), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(tx=TX_CHAINS, rx=RX_CHAINS)
# A 12-byte rx chain: the tap's read stopped at the header, and the model took that
# for a frame until it read on into a bounce buffer as the thread does.
@example(tx=[(0, [], False)], rx=[([12], False, 46)])
def test_random_traffic_same_answers(netns, tx, rx):
    answers = {}
    for mode in ("native", "python"):
        rig = Rig(netns, mode)
        try:
            answers[mode] = (_tx_round(rig, tx, 1), _rx_round(rig, rx, 2), rig.model.counts())
        finally:
            rig.close()
    assert answers["native"] == answers["python"]


@needs_native
def test_merged_frame_too_big_for_the_buffers_is_handed_back_whole(netns):
    """A tap's read returns what fit, not the frame's length: the thread must see
    the frame did not fit (it reads on into a bounce buffer) and hand it back whole,
    not deliver the part that fit as a frame."""
    with _mergeable_pair(netns, "np-big") as rig:
        dqs, sqs, sock, net, kicks, pair = rig.dqs, rig.sqs, rig.sock, rig.net, rig.kicks, rig.pair
        for i in range(2):
            dqs[0].add([], [(RXBUF + 256 * i, 256)])
        os.eventfd_write(kicks[0], 1)
        frame = net.mac + PEER + struct.pack("!H", ETH_TYPE) + bytes(range(256)) * 3 + bytes(986 - 768)
        sock.send(frame)
        assert wait_for(lambda: netplane.plane_glue.take_event(pair.handback_fd))
        info = pair.stop()
        pair.close()
        rig.pair = None
        assert info.handed_back and info.rx_waiting[12:] == frame and info.rx_dropped == 0
        assert dqs[0].used_idx() == 0 and sqs[0].next_avail == 0
