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
from typing import Sequence

from ...events import EVENT_READ
from ...memory import GuestMemory
from ...tap import (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO, VNET_HDR_SIZE, format_mac,
                    stable_mac)
from .device import FdWatch, VirtioTransport
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
        ``no_offloads = True`` none of a tap's is offered, only the feature bits in
        its ``virtio_net_offloads`` (kvmpy.net.slirp.FramePort). The device uses its
        fd, the caller closes it after the transport's ``close()``.
      mac: 6 bytes; default stable_mac(vm_name, index).
      vm_name, index: for the default MAC.
      queue_size: maximum ring size offered.
      name: for log messages.
    Put it on PCI with ``pci_bus.add(VirtioPciTransport(platform, events, VirtioNet(...)))``.
    """

    device_type = 1

    def __init__(self, tap, mac: bytes | None = None, vm_name: str = "kvmpy", index: int = 0,
                 queue_size: int = 256, name: str = "virtio-net") -> None:
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
        log.info("%s: tap %s, MAC %s", name, tap.name, format_mac(self.mac))

    # state -------------------------------------------------------------------------

    def state(self) -> VirtioNetState:
        return VirtioNetState(mac=self.mac, queue_size=self.queue_size, **self.stats)

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
            # A user-mode network (kvmpy.net) is no tap: it offers what it finishes itself.
            return 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | getattr(self.tap, "virtio_net_offloads", 0)
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
        if not self.tap.set_offload(flags):
            raise RuntimeError(f"tap {self.tap.name} refused offloads {flags:#x}")
        self._queues = queues
        self._transport = transport

    def fd_watches(self) -> Sequence[FdWatch]:
        self._rx_polling = True
        return (FdWatch(self.tap.fd, EVENT_READ, self._tap_readable),)

    def reset(self) -> None:
        if self._transport is not None:
            self.tap.set_offload(0)
        self._queues = ()
        self._transport = None
        self._rx_polling = False
        self.acked_features = 0

    # event loop thread ---------------------------------------------------------------

    def _rx_poll(self, on: bool) -> None:
        if on != self._rx_polling:
            self._rx_polling = on
            self._transport.set_fd_events(self.tap.fd, EVENT_READ if on else 0)

    def _tap_readable(self, events: int) -> None:
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
