"""virtio-net over a real tap on a real bridge, inside a network namespace made for the test.

A raw AF_PACKET socket on the bridge plays the other host: it receives what the
guest sends and answers to the guest's MAC.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from kvmpy.devices.virtio.net import (VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MAC,
                                      VIRTIO_NET_F_STATUS)
from kvmpy.devices.virtio.pci import VIRTIO_F_VERSION_1
from kvmpy.tap import TapError, TapNetwork, format_mac, parse_mac, run_in_netns, stable_mac
from support.net_rig import TapNicRig, packet_socket

ETH_TYPE = 0x88B5  # IEEE local experimental: nothing else in the namespace speaks it
RXBUF = 0x400000
TXBUF = 0x500000


def test_stable_mac():
    a, b = stable_mac("vm1", 0), stable_mac("vm1", 1)
    assert a[:3] == b"\x52\x54\x00" and a != b and a == stable_mac("vm1", 0)
    assert parse_mac(format_mac(a)) == a
    with pytest.raises(Exception):
        parse_mac("01:00:5e:00:00:01")
    with pytest.raises(Exception):
        parse_mac("zz:00")


def _links(ns):
    out = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_tap_bridge_lifecycle(netns):
    net = TapNetwork.open(bridge="kbr0", vm_name="t", netns=netns)
    assert {"kbr0", net.tap.name} <= _links(netns)
    master = subprocess.run(["ip", "-n", netns, "-o", "link", "show", net.tap.name],
                            capture_output=True, text=True).stdout
    assert "master kbr0" in master and "UP" in master
    name = net.tap.name
    net.close()
    assert name not in _links(netns) and "kbr0" not in _links(netns)
    # an existing bridge is reused and kept
    subprocess.run(["ip", "-n", netns, "link", "add", "kbr1", "type", "bridge"], check=True)
    net = TapNetwork.open(bridge="kbr1", netns=netns)
    assert not net.created_bridge
    net.close()
    assert "kbr1" in _links(netns)


def test_tap_errors_are_user_errors(netns):
    net = TapNetwork.open("ktap0", netns=netns)
    try:
        with pytest.raises(TapError, match="ktap0"):
            TapNetwork.open("ktap0", netns=netns)
    finally:
        net.close()
    with pytest.raises(TapError, match="no-such-ns"):
        TapNetwork.open("x", netns="kvmpytest-no-such-ns")
    # not permitted: drop CAP_NET_ADMIN in a child process
    if subprocess.run(["which", "setpriv"], capture_output=True).returncode == 0:
        code = ("import sys\nfrom kvmpy.tap import TapNetwork, TapError\n"
                "try:\n TapNetwork.open('kperm0')\nexcept TapError as e:\n print(e); sys.exit(3)\n")
        r = subprocess.run(["ip", "netns", "exec", netns, "setpriv", "--inh-caps=-all", "--bounding-set=-all",
                            sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.dirname(__file__)))
        assert r.returncode == 3, r.stderr
        assert "kperm0" in r.stdout and "not permitted" in r.stdout


class NetRig(TapNicRig):
    def __init__(self, ns, want_extra=0):
        super().__init__(ns, vm_name="rig", ram_size=8 << 20, bridge="kbr0")
        self.features = self.start_driver(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
                                          | want_extra)
        self.rxq = self.d.setup_queue(0, 64, vector=1)
        self.txq = self.d.setup_queue(1, 64, vector=2)
        self.d.driver_ok()
        # the "other host": a packet socket on the bridge, made inside the namespace
        self.sock = packet_socket(ns, "kbr0", ETH_TYPE)


@pytest.fixture
def rig(netns):
    r = NetRig(netns)
    yield r
    r.close()


def _frame(dst, src, payload):
    return dst + src + struct.pack("!H", ETH_TYPE) + payload


def _receive_ours(rig, split=False, tries=20):
    """Post RX buffers until our frame type arrives (the bridge also sends its own
    multicast chatter to the port); returns the frame without the vnet header."""
    mem = rig.m.memory
    for _ in range(tries):
        bufs = [(RXBUF, 12), (RXBUF + 12, 1514)] if split else [(RXBUF, 2048)]
        head = rig.rxq.add([], bufs)
        rig.d.kick(0)
        (h, length), = rig.d.wait_used(0)
        assert h == head and length >= 14
        assert mem.read_u16(RXBUF + 10) == 1  # num_buffers
        frame = mem.read(RXBUF + 12, length - 12)
        if frame[12:14] == struct.pack("!H", ETH_TYPE):
            return frame
    raise AssertionError("our frame never arrived")


def test_config_space(rig):
    assert bytes(rig.d.device_cfg(i, 1) for i in range(6)) == rig.net.mac
    assert rig.d.device_cfg(6, 2) & 1  # LINK_UP


def test_tx_then_rx_echo(rig):
    mem = rig.m.memory
    for i in range(5):
        payload = b"kvmpy-%d-" % i + os.urandom(40)
        frame = _frame(b"\xff" * 6, rig.net.mac, payload)
        mem.write(TXBUF, bytes(12) + frame)
        # header and frame in separate descriptors, as Linux sends them
        rig.txq.add([(TXBUF, 12), (TXBUF + 12, len(frame))], [])
        # MSIs go through an eventfd and may coalesce: expect one more than before the kick
        msis_before = len(rig.m.msis)
        rig.d.kick(1)
        rig.d.wait_used(1)
        assert rig.m.wait_msi(msis_before + 1), "no interrupt for a sent frame"
        while True:
            data, addr = rig.sock.recvfrom(2048)
            if data[12:14] == struct.pack("!H", ETH_TYPE):
                break
        assert data == frame
        # answer to the guest's MAC; the bridge learnt it from the frame above
        reply = _frame(rig.net.mac, b"\x02\x00\x00\x00\x00\x01", b"echo:" + payload)
        rig.sock.send(reply)
        msis_before = len(rig.m.msis)
        got = _receive_ours(rig, split=True)
        assert got == reply
        assert mem.read_u16(RXBUF + 10) == 1  # num_buffers
        assert rig.m.wait_msi(msis_before + 1), "no interrupt for a received frame"
    counts = rig.dev.device.counts()
    assert counts["tx_frames"] == 5 and counts["rx_frames"] >= 5
    assert {d for _, d in rig.m.msis} <= {0x31, 0x32}  # the RX and TX vectors


def test_rx_waits_for_buffers_and_small_chains_drop(rig):
    mem = rig.m.memory
    # a frame arrives while the guest has no buffers: it waits in the tap
    reply = _frame(rig.net.mac, b"\x02\x00\x00\x00\x00\x01", b"x" * 100)
    rig.sock.send(reply)
    time.sleep(0.05)
    assert rig.dev.device.counts()["rx_frames"] == 0
    assert _receive_ours(rig) == reply
    # a chain too small for the header is returned empty, not written past
    head = rig.rxq.add([], [(RXBUF, 4)])
    mem.write(RXBUF, b"\xaa" * 16)
    rig.sock.send(reply)
    rig.d.kick(0)
    assert rig.d.wait_used(0) == [(head, 0)]
    assert mem.read(RXBUF, 16) == b"\xaa" * 16


def _ethtool_get(ns, ifname, cmd):
    """SIOCETHTOOL get-value (ETHTOOL_GTSO 0x1e, ETHTOOL_GTXCSUM 0x16) on ``ifname`` in ``ns``."""
    import array
    import fcntl

    def query():
        ev = array.array("I", [cmd, 0])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s.fileno(), 0x8946, struct.pack("16sP", ifname.encode(), ev.buffer_info()[0]))
        return ev[1]
    return run_in_netns(ns, query)


def test_offloads_follow_negotiation(netns):
    plain = NetRig(netns)
    try:
        # nothing negotiated: the kernel must segment and checksum before frames reach us
        assert _ethtool_get(netns, plain.net.tap.name, 0x1E) == 0
        assert _ethtool_get(netns, plain.net.tap.name, 0x16) == 0
    finally:
        plain.close()
    r = NetRig(netns, want_extra=1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4)
    try:
        assert r.features >> VIRTIO_NET_F_GUEST_TSO4 & 1
        assert _ethtool_get(netns, r.net.tap.name, 0x1E) == 1
        assert _ethtool_get(netns, r.net.tap.name, 0x16) == 1
        # a reset withdraws them again
        r.d.set_status(0)
        assert _ethtool_get(netns, r.net.tap.name, 0x1E) == 0
    finally:
        r.close()


def test_hostile_tx_chain(rig):
    # a TX chain pointing outside RAM resets the device instead of writing anywhere
    rig.txq.add([(0x7FFFFFFF000, 64)], [])
    n = len(rig.m.msis)
    rig.d.kick(1)
    assert rig.m.wait_msi(n + 1)
    assert rig.d.status & 0x40
