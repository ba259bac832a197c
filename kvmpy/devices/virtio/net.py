"""virtio-net (virtio 1.x, section 5.1): a VirtioDevice on a tap device.

The tap carries the same 12-byte virtio-net header the guest uses, so frames
move with one readv (tap -> guest RX buffers) or writev (guest TX buffers -> tap)
straight on guest RAM slices. The kernel validates the GSO/checksum fields of
guest headers; we only tell it (TUNSETOFFLOAD) which offloaded frames the guest
agreed to receive. MRG_RXBUF is not offered: each RX chain holds a whole frame
(Linux then posts 64 KiB "big packet" chains when it negotiates GUEST_TSO).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from dataclasses import dataclass
from typing import Callable, Sequence

from ...events import EVENT_READ
from ...memory import GuestMemory
from ...tap import (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO, VNET_HDR_SIZE, format_mac,
                    stable_mac)
from . import netplane
from .device import FdWatch, VirtioTransport
from .netplane import NetBackend, NetPairBackend, NetStopInfo
from .queue import SplitQueue

log = logging.getLogger(__name__)

VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_STATUS = 16

VIRTIO_NET_S_LINK_UP = 1

RX_QUEUE = 0
TX_QUEUE = 1
IOV_MAX = 1024
# Frames handled per wake-up before yielding to the other queue, the doorbells
# and the other devices on the event loop.
BATCH = 64

#: ``[[net]] dataplane`` / ``--net dataplane=`` values
NET_DATAPLANE_MODES = ("native", "python")
_VIRTIO_F_VERSION_1 = 32
_MRG_RXBUF_BIT = 15
# What the tap may hand over after the header: a 64 KiB GSO frame, its Ethernet
# and VLAN headers, with room to spare (QEMU's receive buffer is as large).
_RX_FRAME_MAX = 69632


@dataclass(frozen=True)
class VirtioNetState:
    """virtio-net's own state: its MAC, ring size and counters (frames move
    straight between the tap and guest buffers, none is held here)."""

    mac: bytes
    queue_size: int
    rx_frames: int
    tx_frames: int
    rx_dropped: int
    tx_dropped: int


class VirtioNet:
    """virtio-net, a VirtioDevice on an open tap.

    Arguments:
      tap: a kvmpy.tap.Tap (``TapNetwork.open(...).tap``), or anything with the same
        ``fd`` framing, ``name``, ``supports_ufo`` and ``set_offload``; with
        ``no_offloads = True`` none is offered and TUNSETOFFLOAD is not used
        (kvmpy.net.slirp.FramePort). The device uses its fd, the caller closes it
        after the transport's ``close()``.
      mac: 6 bytes; default stable_mac(vm_name, index).
      vm_name, index: for the default MAC.
      queue_size: maximum ring size offered.
      name: for log messages.
      dataplane: "native" lets the transport serve each rx/tx pair from a C thread
        (netplane.py) while the model would do nothing else with it; "python"
        keeps every frame here.
    Put it on PCI with ``pci_bus.add(VirtioPciTransport(platform, events, VirtioNet(...)))``.
    """

    device_type = 1

    def __init__(self, tap, mac: bytes | None = None, vm_name: str = "kvmpy", index: int = 0,
                 queue_size: int = 256, name: str = "virtio-net", dataplane: str = "native") -> None:
        if dataplane not in NET_DATAPLANE_MODES:
            raise ValueError(f"{name}: dataplane={dataplane!r}")
        self.dataplane = dataplane
        self.name = name
        self.tap = tap
        # A port that takes complete frames only (kvmpy.net.slirp.FramePort) says so.
        self.offloads = not getattr(tap, "no_offloads", False)
        self.mac = bytes(mac) if mac else stable_mac(vm_name, index)
        if len(self.mac) != 6:
            raise ValueError(f"{name}: MAC must be 6 bytes")
        self.queue_size = queue_size
        self.queue_max_sizes = (queue_size, queue_size)
        self.stats = {"rx_frames": 0, "tx_frames": 0, "rx_dropped": 0, "tx_dropped": 0}
        self.acked_features = 0
        self._queues: Sequence[SplitQueue] = ()
        self._transport: VirtioTransport | None = None
        self._rx_polling = False
        # A native thread reads the tap: a readiness the loop reported before the
        # thread started is not the model's to act on.
        self._native_rx = False
        # Per native pair (by rx queue): the thread's own counts so far.
        self._native_counts: dict[int, Callable[[], dict[str, int]]] = {}
        log.info("%s: tap %s, MAC %s", name, tap.name, format_mac(self.mac))

    # state -------------------------------------------------------------------------

    def state(self) -> VirtioNetState:
        return VirtioNetState(mac=self.mac, queue_size=self.queue_size, **self.counts())

    @classmethod
    def from_state(cls, state: VirtioNetState, tap, name: str = "virtio-net") -> "VirtioNet":
        """The device ``state`` describes, on ``tap``."""
        dev = cls(tap, mac=state.mac, queue_size=state.queue_size, name=name)
        dev.stats.update(rx_frames=state.rx_frames, tx_frames=state.tx_frames, rx_dropped=state.rx_dropped,
                         tx_dropped=state.tx_dropped)
        return dev

    # what the driver sees ----------------------------------------------------------

    def device_features(self) -> int:
        if not self.offloads:
            # A user-mode network (kvmpy.net) takes complete, checksummed frames only.
            return 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
        f = 0
        for bit in (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_GUEST_TSO4,
                    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_HOST_TSO4,
                    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_STATUS):
            f |= 1 << bit
        if self.tap.supports_ufo:
            f |= 1 << VIRTIO_NET_F_GUEST_UFO
        return f

    def ack_features(self, features: int) -> None:
        self.acked_features = features

    def negotiated(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    def config_bytes(self) -> bytes:
        return struct.pack("<6sHHH", self.mac, VIRTIO_NET_S_LINK_UP, 1, 1500)

    def write_config(self, offset: int, size: int, value: int) -> None:
        """The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR, which is not offered."""

    # life cycle --------------------------------------------------------------------

    def activate(self, queues: Sequence[SplitQueue], memory: GuestMemory, transport: VirtioTransport) -> None:
        flags = 0
        if self.negotiated(VIRTIO_NET_F_GUEST_CSUM):
            flags |= TUN_F_CSUM
            # The kernel refuses segmentation offloads without checksum offload.
            if self.negotiated(VIRTIO_NET_F_GUEST_TSO4):
                flags |= TUN_F_TSO4
            if self.negotiated(VIRTIO_NET_F_GUEST_TSO6):
                flags |= TUN_F_TSO6
            if flags & (TUN_F_TSO4 | TUN_F_TSO6) and self.negotiated(VIRTIO_NET_F_GUEST_ECN):
                flags |= TUN_F_TSO_ECN
            if self.negotiated(VIRTIO_NET_F_GUEST_UFO):
                flags |= TUN_F_UFO
        if self.offloads and not self.tap.set_offload(flags):
            raise RuntimeError(f"tap {self.tap.name} refused offloads {flags:#x}")
        self._queues = queues
        self._transport = transport

    def fd_watches(self) -> Sequence[FdWatch]:
        self._rx_polling = True
        return (FdWatch(self.tap.fd, EVENT_READ, self._tap_readable),)

    def reset(self) -> None:
        if self._transport is not None and self.offloads:
            self.tap.set_offload(0)
        self._queues = ()
        self._transport = None
        self._rx_polling = False
        self._native_rx = False
        self._native_counts.clear()
        self.acked_features = 0

    # native data plane (netplane.py) -------------------------------------------------

    def native_backend(self) -> NetBackend | None:
        """The pairs a native thread may serve now, or None while every frame must
        come here: the Python data plane chosen, the module missing, or a port that
        is not a tap with the vnet header (user networking).

        The rx filter rule: a thread delivers every frame the tap has, so while the
        guest has a filter other than the promiscuous default (control queue
        CTRL_RX / CTRL_MAC) the pairs stay here, where each frame passes the filter;
        the filter's return to the default gives them back to the threads."""
        if self.dataplane != "native" or not self.offloads or not netplane.available():
            return None
        mrg = self.negotiated(_MRG_RXBUF_BIT)
        hdr_len = 12 if mrg or self.negotiated(_VIRTIO_F_VERSION_1) else 10
        # With multiqueue each pair has a tap fd of its own.
        return NetBackend(pairs=(NetPairBackend(rx_queue=RX_QUEUE, tx_queue=TX_QUEUE, tap_fd=self.tap.fd,
                                                hdr_len=hdr_len, mrg_rxbuf=mrg,
                                                rx_frame_max=hdr_len + _RX_FRAME_MAX),))

    def native_started(self, pair: NetPairBackend, counts: Callable[[], dict[str, int]]) -> None:
        """A thread serves ``pair`` now: its tap is the thread's to read; ``counts()``
        tells what it moved so far."""
        self._native_counts[pair.rx_queue] = counts
        self._native_rx = True
        self._rx_poll(False)

    def native_stopped(self, pair: NetPairBackend, info: NetStopInfo) -> None:
        """The thread of ``pair`` stopped: its counts join the model's (the transport
        runs both queues next, and the rx queue's run polls the tap again)."""
        self._native_rx = False
        self._native_counts.pop(pair.rx_queue, None)
        self.stats["rx_frames"] += info.rx_frames
        self.stats["tx_frames"] += info.tx_frames
        self.stats["rx_dropped"] += info.rx_dropped
        self.stats["tx_dropped"] += info.tx_dropped

    def counts(self) -> dict[str, int]:
        """Frames moved and dropped, by the model and the native threads running now."""
        total = dict(self.stats)
        for counts in list(self._native_counts.values()):
            for key, value in counts().items():
                total[key] += value
        return total

    # event loop thread ---------------------------------------------------------------

    def _rx_poll(self, on: bool) -> None:
        if on != self._rx_polling:
            self._rx_polling = on
            self._transport.set_fd_events(self.tap.fd, EVENT_READ if on else 0)

    def _tap_readable(self, events: int) -> None:
        if not self._native_rx:
            self._receive()

    def process_queue(self, index: int) -> None:
        if index == TX_QUEUE:
            self._transmit()
        else:
            # New RX buffers: frames may be waiting in the tap.
            self._rx_poll(True)
            self._receive()

    def _receive(self) -> None:
        q = self._queues[RX_QUEUE]
        if not q.ready:
            return
        done = 0
        while done < BATCH:
            chain = q.pop()
            if chain is None:
                # Out of guest buffers: stop watching the tap until the driver adds some.
                if not q.set_notification(True):
                    self._rx_poll(False)
                    break
                continue
            if len(chain.writable) > IOV_MAX or chain.writable_len < VNET_HDR_SIZE:
                q.add_used(chain.head, 0)
                self.stats["rx_dropped"] += 1
                done += 1
                log.debug("%s: unusable RX chain of %d bytes", self.name, chain.writable_len)
                continue
            try:
                n = os.readv(self.tap.fd, chain.writable)
            except BlockingIOError:
                q.undo_pop()
                break
            except OSError as e:
                q.undo_pop()
                log.error("%s: tap read: %s", self.name, e)
                break
            cap = chain.writable_len
            if n > cap:
                # The frame did not fit: hand back an empty buffer (the guest counts a length error).
                self.stats["rx_dropped"] += 1
                n = 0
            else:
                _set_num_buffers(chain.writable, 1)
                self.stats["rx_frames"] += 1
            q.add_used(chain.head, n)
            done += 1
        if done:
            self._transport.signal_used(RX_QUEUE)
        # After BATCH frames, the level-triggered poll brings us back once the
        # doorbells had their turn.

    def _transmit(self) -> None:
        q = self._queues[TX_QUEUE]
        while True:
            did = 0
            for chain in q.iter_chains():
                if chain.readable_len <= VNET_HDR_SIZE or len(chain.readable) > IOV_MAX:
                    self.stats["tx_dropped"] += 1
                else:
                    try:
                        os.writev(self.tap.fd, chain.readable)
                        self.stats["tx_frames"] += 1
                    except OSError as e:
                        # EAGAIN/ENOBUFS: the host is congested, drop like a NIC would.
                        # EINVAL: the guest's vnet header was refused by the kernel.
                        self.stats["tx_dropped"] += 1
                        if e.errno not in (errno.EAGAIN, errno.ENOBUFS):
                            log.debug("%s: tap write: %s", self.name, e)
                q.add_used(chain.head, 0)
                did += 1
            if did:
                self._transport.signal_used(TX_QUEUE)
            if not q.set_notification(True):
                return


def _set_num_buffers(views, value: int) -> None:
    """num_buffers is bytes 10-11 of the header, which may straddle buffers."""
    data = value.to_bytes(2, "little")
    pos = 0
    for v in views:
        for i in range(2):
            off = 10 + i - pos
            if 0 <= off < len(v):
                v[off] = data[i]
        pos += len(v)
        if pos >= 12:
            return
