"""The native net plane's receive filter (np_filter_accepts in net_dataplane.c)
against the model's (net.RxFilter.accepts) on random frames and filters, and on
the running thread: a filter set through the control queue keeps the pair native
and drops (and counts) what the model would."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvmpy.devices.virtio import netplane
from kvmpy.devices.virtio.net import (MAC_TABLE_ENTRIES, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET,
                                      VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_RX,
                                      VIRTIO_NET_CTRL_RX_ALLMULTI, VIRTIO_NET_CTRL_RX_PROMISC,
                                      VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD, VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_VLAN,
                                      RxFilter)
from support.net_handover import (ETH_TYPE, HDR, MAC, PEER, RX, RXBUF, SLOT, ControlSide, Failures,
                                  HandoverRig)
from support.polling import wait_for

needs_native = pytest.mark.skipif(not netplane.available(),
                                  reason=f"net data plane not built: {netplane.unavailable_reason()}")

FUZZ = int(os.environ.get("KVMPY_FUZZ", "0") or 0)

# A few addresses the frames and the tables share, so hits are common.
MACS = [MAC, PEER, b"\xff" * 6, b"\x01\x00\x5e\x00\x00\x01", b"\x33\x33\x00\x00\x00\x01",
        b"\x01\x00\x5e\x00\x00\x42", b"\x02\x11\x22\x33\x44\x55"]
mac = st.sampled_from(MACS) | st.binary(min_size=6, max_size=6)
vlan = st.sampled_from([0, 1, 5, 4095]) | st.integers(0, 4095)

filters = st.builds(
    RxFilter, promisc=st.booleans(), allmulti=st.booleans(), alluni=st.booleans(), nomulti=st.booleans(),
    nouni=st.booleans(), nobcast=st.booleans(),
    unicast=st.lists(mac, max_size=MAC_TABLE_ENTRIES).map(tuple),
    multicast=st.lists(mac, max_size=MAC_TABLE_ENTRIES).map(tuple),
    unicast_overflow=st.booleans(), multicast_overflow=st.booleans(),
    vlans=st.sets(vlan, max_size=8).map(lambda v: tuple(sorted(v))))


@st.composite
def frames(draw):
    dst = draw(mac)
    tagged = draw(st.booleans())
    tag = b"\x81\x00" + draw(vlan).to_bytes(2, "big") if tagged else b""
    whole = dst + draw(mac) + tag + b"\x08\x00" + draw(st.binary(max_size=8))
    # Runts too: shorter than an Ethernet header, or a tag cut short.
    return whole[:draw(st.integers(0, len(whole)))] if draw(st.booleans()) else whole


@needs_native
@settings(max_examples=2000 if FUZZ else 300, deadline=None)
@given(rx_filter=filters, frame=frames(), own=mac, vlan_filtering=st.booleans())
@example(rx_filter=RxFilter(promisc=False), frame=MAC + PEER + b"\x81\x00", own=MAC, vlan_filtering=True)
@example(rx_filter=RxFilter(promisc=False, vlans=(5,)), frame=MAC + PEER + b"\x81\x00\x00\x05",
         own=MAC, vlan_filtering=True)
def test_c_filter_judges_as_the_model(rx_filter, frame, own, vlan_filtering):
    backend = netplane.NetPairBackend(rx_queue=0, tx_queue=1, tap_fd=-1, hdr_len=12, mrg_rxbuf=False,
                                      rx_frame_max=12 + 1514, rx_filter=rx_filter, own_mac=own,
                                      vlan_filtering=vlan_filtering)
    assert netplane.filter_accepts(backend, frame) == rx_filter.accepts(frame, own, vlan_filtering)


def _frame(dst: bytes, seq: int) -> bytes:
    return dst + PEER + struct.pack("!H", ETH_TYPE) + b"filter-%04d" % seq + bytes(40)


@needs_native
@pytest.mark.parametrize("mrg_rxbuf", [False, True])
def test_thread_filters_without_a_handover(mrg_rxbuf):
    rig = HandoverRig(event_idx=True, mrg_rxbuf=mrg_rxbuf, queue_size=64,
                      extra_features=1 << VIRTIO_NET_F_CTRL_MAC_ADDR)
    try:
        assert wait_for(lambda: rig.native() == (True, True))
        started = rig.dev.native_requests
        ctrl = ControlSide(rig, Failures())
        listed, group = b"\x02\x11\x22\x33\x44\x55", b"\x01\x00\x5e\x00\x00\x42"
        ctrl.command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x00")
        ctrl.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET,
                     struct.pack("<I", 1) + listed + struct.pack("<I", 1) + group)
        assert not ctrl.failures.items, ctrl.failures.items
        dq = rig.queues[RX]
        bufs = {}
        for i in range(8):
            bufs[dq.add([], [(RXBUF + SLOT * i, SLOT)])] = RXBUF + SLOT * i
        rig.kick(RX)
        dests = [MAC, PEER, listed, b"\x02\x99\x99\x99\x99\x99", group, b"\x01\x00\x5e\x00\x00\x43",
                 b"\xff" * 6]
        for seq, dst in enumerate(dests):
            rig.port.host.send(bytes(HDR) + _frame(dst, seq))
        wanted = [seq for seq, dst in enumerate(dests) if dst in (MAC, listed, group, b"\xff" * 6)]
        got: list[tuple[int, int]] = []
        assert wait_for(lambda: got.extend(dq.collect()) or len(got) >= len(wanted))
        frames = [rig.m.memory.read(bufs[head], n)[HDR:] for head, n in got]
        assert frames == [_frame(dests[seq], seq) for seq in wanted]
        assert wait_for(lambda: rig.model.counts()["rx_filtered"] == len(dests) - len(wanted))
        # allmulti lets the other group in; a new MAC moves what is "own"
        ctrl.command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, b"\x01")
        ctrl.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, PEER)
        assert not ctrl.failures.items, ctrl.failures.items
        got.clear()
        rig.port.host.send(bytes(HDR) + _frame(MAC, 20))
        rig.port.host.send(bytes(HDR) + _frame(b"\x01\x00\x5e\x00\x00\x43", 21))
        rig.port.host.send(bytes(HDR) + _frame(PEER, 22))
        assert wait_for(lambda: got.extend(dq.collect()) or len(got) >= 2)
        assert [rig.m.memory.read(bufs[h], n)[HDR:] for h, n in got] == [
            _frame(b"\x01\x00\x5e\x00\x00\x43", 21), _frame(PEER, 22)]
        assert wait_for(lambda: rig.model.counts()["rx_filtered"] == len(dests) - len(wanted) + 1)
        # the thread served it all: no hand-over happened
        assert rig.native() == (True, True) and rig.dev.native_requests == started
    finally:
        rig.close()


@needs_native
def test_vlan_filter_in_the_thread():
    """With CTRL_VLAN negotiated a tagged frame passes only with its VLAN id listed
    (the model's rule), judged in the thread."""
    rig = HandoverRig(event_idx=False, mrg_rxbuf=False, queue_size=16, extra_features=1 << VIRTIO_NET_F_CTRL_VLAN)
    try:
        assert wait_for(lambda: rig.native() == (True, True))
        ctrl = ControlSide(rig, Failures())
        ctrl.command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x00")
        ctrl.command(VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD, (7).to_bytes(2, "little"))
        assert not ctrl.failures.items, ctrl.failures.items
        dq = rig.queues[RX]
        bufs = {dq.add([], [(RXBUF + SLOT * i, SLOT)]): RXBUF + SLOT * i for i in range(4)}
        rig.kick(RX)

        def tagged(vid: int) -> bytes:
            return MAC + PEER + b"\x81\x00" + vid.to_bytes(2, "big") + struct.pack("!H", ETH_TYPE) + bytes(46)
        for vid in (8, 7):
            rig.port.host.send(bytes(HDR) + tagged(vid))
        got: list[tuple[int, int]] = []
        assert wait_for(lambda: got.extend(dq.collect()) or len(got) >= 1)
        assert [rig.m.memory.read(bufs[h], n)[HDR:] for h, n in got] == [tagged(7)]
        assert wait_for(lambda: rig.model.counts()["rx_filtered"] == 1)
        assert rig.native() == (True, True)
    finally:
        rig.close()
