"""virtio-net (virtio 1.x, section 5.1) over a tap device.

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
import select
import struct

from ...tap import (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO, VNET_HDR_SIZE, format_mac,
                    stable_mac)
from .pci import VirtioPciDevice

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
# Frames handled per wake-up before yielding to the other queue and the doorbells.
BATCH = 64


class VirtioNet(VirtioPciDevice):
    """A virtio-net PCI function on an open tap.

    Arguments:
      platform: the machine's Platform.
      tap: a kvmpy.tap.Tap (``TapNetwork.open(...).tap``); the device uses its fd
        and sets its offloads, the caller closes it after ``close()``.
      mac: 6 bytes; default stable_mac(vm_name, index).
      vm_name, index: for the default MAC.
      queue_size: maximum ring size offered.
      name: for log messages and the I/O thread name.
    Plug into the bus with ``pci_bus.add(VirtioNet(...))``.
    """

    DEVICE_TYPE = 1
    CLASS_CODE = 0x020000  # network, ethernet

    def __init__(self, platform, tap, mac: bytes | None = None, vm_name: str = "kvmpy", index: int = 0,
                 queue_size: int = 256, name: str = "virtio-net") -> None:
        self.tap = tap
        self.mac = bytes(mac) if mac else stable_mac(vm_name, index)
        if len(self.mac) != 6:
            raise ValueError(f"{name}: MAC must be 6 bytes")
        self._rx_polling = False
        self.stats = {"rx_frames": 0, "tx_frames": 0, "rx_dropped": 0, "tx_dropped": 0}
        super().__init__(platform, num_queues=2, queue_max_size=queue_size, name=name)
        log.info("%s: tap %s, MAC %s", name, tap.name, format_mac(self.mac))

    def device_features(self) -> int:
        f = 0
        for bit in (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_GUEST_TSO4,
                    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_HOST_TSO4,
                    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_STATUS):
            f |= 1 << bit
        if getattr(self.tap, "supports_ufo", False):
            f |= 1 << VIRTIO_NET_F_GUEST_UFO
        return f

    def config_bytes(self) -> bytes:
        return struct.pack("<6sHHH", self.mac, VIRTIO_NET_S_LINK_UP, 1, 1500)

    def activate(self) -> None:
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

    def deactivate(self) -> None:
        self.tap.set_offload(0)

    # I/O thread -------------------------------------------------------------------

    def extra_poll(self):
        self._rx_polling = True
        return [(self.tap.fd, select.POLLIN)]

    def _rx_poll(self, on: bool) -> None:
        if on != self._rx_polling:
            self._rx_polling = on
            self.set_poll(self.tap.fd, select.POLLIN if on else 0)

    def on_fd_ready(self, fd: int, events: int) -> None:
        self._receive()

    def process_queue(self, index: int) -> None:
        if index == TX_QUEUE:
            self._transmit()
        else:
            # New RX buffers: frames may be waiting in the tap.
            self._rx_poll(True)
            self._receive()

    def _receive(self) -> None:
        if not self.queue_enable[RX_QUEUE]:
            return
        q = self.queues[RX_QUEUE]
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
            self.signal_used(RX_QUEUE)
        # After BATCH frames, the level-triggered poll brings us back once the
        # doorbells had their turn.

    def _transmit(self) -> None:
        q = self.queues[TX_QUEUE]
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
                self.signal_used(TX_QUEUE)
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
