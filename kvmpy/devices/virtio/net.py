"""virtio-net (virtio 1.x, section 5.1): a VirtioDevice on a tap device.

The tap carries the same 12-byte virtio-net header the guest uses, so frames
move with one readv (tap -> guest RX buffers) or writev (guest TX buffers -> tap)
straight on guest RAM slices. The kernel validates the GSO/checksum fields of
guest headers; we only tell it (TUNSETOFFLOAD) which offloaded frames the guest
agreed to receive.

With VIRTIO_NET_F_MRG_RXBUF a frame may span several RX chains (Linux then posts
small page-fragment buffers): the read lands in the first chain and, past its
end, in a bounce buffer copied into the next chains; num_buffers tells the
driver how many. A frame that finds too few chains waits, whole, for the driver
to add more (nothing is lost to a half-filled ring).

The control queue (VIRTIO_NET_F_CTRL_VQ) sets the receive filter (CTRL_RX,
CTRL_RX_EXTRA, CTRL_MAC, CTRL_VLAN, as QEMU applies them to incoming frames),
the MAC address (CTRL_MAC_ADDR), acknowledges announcements (GUEST_ANNOUNCE)
and, with VIRTIO_NET_F_MQ, how many RX/TX queue pairs are in use; each pair has
a tap queue of its own (IFF_MULTI_QUEUE), detached from the tap while its pair
is unused so the kernel does not steer frames to it. Every command is checked;
a malformed one is answered VIRTIO_NET_ERR and logged, never raised.

Queues: RX0, TX0, RX1, TX1, ..., then the control queue, which is queue 2
without MQ negotiated and queue 2*max_pairs with it (section 5.1.2).

vhost-net (vhost.py): where a ``vhost`` backend factory is given, the transport
hands each enabled RX/TX queue to the kernel (``native_queue``) once the model
served it, as it hands virtio-blk queues to their C threads, and takes it back
on reset, pause, ``state()`` or a ring error. The control queue stays here; the
receive filter is then not applied to what the kernel delivers (as with QEMU's
vhost=on), and the model's own tap watch sleeps while the kernel reads the tap.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from ...events import EVENT_READ
from ...memory import GuestMemory
from ...net.announce import rarp_frame
from ...net.backend import (OFFLOAD_FEATURES, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO,
                            VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
                            VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, NetBackend)
from ...tap import VNET_HDR_SIZE, format_mac, stable_mac
from . import netplane
from .device import FdWatch, ServedQueue, VirtioDevice, VirtioTransport
from .netplane import NetPairBackend, NetPairs, NetStopInfo
from .queue import QueueError, SplitQueue, gather, write_views

log = logging.getLogger(__name__)

# The offload bits (CSUM, GUEST_*, HOST_*) are the backend's to offer (net/backend.py).
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_CTRL_RX_EXTRA = 20
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23

VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2

# control queue: classes, commands, acks (section 5.1.6.5)
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1
VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_RX_PROMISC = 0
VIRTIO_NET_CTRL_RX_ALLMULTI = 1
VIRTIO_NET_CTRL_RX_ALLUNI = 2
VIRTIO_NET_CTRL_RX_NOMULTI = 3
VIRTIO_NET_CTRL_RX_NOUNI = 4
VIRTIO_NET_CTRL_RX_NOBCAST = 5
VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_MAC_TABLE_SET = 0
VIRTIO_NET_CTRL_MAC_ADDR_SET = 1
VIRTIO_NET_CTRL_VLAN = 2
VIRTIO_NET_CTRL_VLAN_ADD = 0
VIRTIO_NET_CTRL_VLAN_DEL = 1
VIRTIO_NET_CTRL_ANNOUNCE = 3
VIRTIO_NET_CTRL_ANNOUNCE_ACK = 0
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0

# QEMU's sizes: a longer MAC table than this accepts all frames of its kind
# (the guest asked for more addresses than a filter holds, as a NIC's overflow bit).
MAC_TABLE_ENTRIES = 64
MAX_VLAN = 4096
# QEMU's limit on queue pairs (the tap's IFF_MULTI_QUEUE allows 256).
MAX_QUEUE_PAIRS = 16
CTRL_QUEUE_SIZE = 64
# A control command is a few bytes; a full MAC table of overflowing lists is at
# most a few KiB. Anything longer is refused without being read.
MAX_CTRL_BYTES = 64 << 10

RX_QUEUE = 0
TX_QUEUE = 1
IOV_MAX = 1024
# Frames handled per wake-up before yielding to the other queue, the doorbells
# and the other devices on the event loop.
BATCH = 64
# The largest frame a tap hands out: a 64 KiB GSO frame, its Ethernet and VLAN
# headers and the vnet header.
MAX_TAP_FRAME = 65536 + 64
BROADCAST = b"\xff" * 6
ETH_P_8021Q = 0x8100


@dataclass(frozen=True)
class RxFilter:
    """What the guest lets in (QEMU's receive_filter): promiscuous by default,
    as the spec's device starts."""

    promisc: bool = True
    allmulti: bool = False
    alluni: bool = False
    nomulti: bool = False
    nouni: bool = False
    nobcast: bool = False
    unicast: tuple[bytes, ...] = ()
    multicast: tuple[bytes, ...] = ()
    unicast_overflow: bool = False
    multicast_overflow: bool = False
    vlans: tuple[int, ...] = ()     # VLAN ids let through when VLAN filtering is on (sorted)

    def accepts(self, frame: bytes, own_mac: bytes, vlan_filtering: bool) -> bool:
        """Whether a frame starting with ``frame`` (at least its first 16 bytes)
        reaches the guest."""
        if self.promisc:
            return True
        if len(frame) < 14:
            return False
        if vlan_filtering and frame[12:14] == b"\x81\x00":
            if len(frame) < 16 or (int.from_bytes(frame[14:16], "big") & 0xFFF) not in self.vlans:
                return False
        dst = frame[:6]
        if dst[0] & 1:
            if dst == BROADCAST:
                return not self.nobcast
            if self.nomulti:
                return False
            return self.allmulti or self.multicast_overflow or dst in self.multicast
        if self.nouni:
            return False
        return self.alluni or self.unicast_overflow or dst == own_mac or dst in self.unicast

    def validate(self, where: str) -> None:
        for name in ("unicast", "multicast"):
            macs = getattr(self, name)
            if (not isinstance(macs, tuple) or len(macs) > MAC_TABLE_ENTRIES
                    or any(not isinstance(m, bytes) or len(m) != 6 for m in macs)):
                raise ValueError(f"{where}: rx_filter.{name}: at most {MAC_TABLE_ENTRIES} 6-byte MACs")
        if not isinstance(self.vlans, tuple) or any(not isinstance(v, int) or not 0 <= v < MAX_VLAN
                                                     for v in self.vlans):
            raise ValueError(f"{where}: rx_filter.vlans: VLAN ids 0-{MAX_VLAN - 1}")

#: ``[[net]] dataplane`` / ``--net dataplane=`` values
NET_DATAPLANE_MODES = ("native", "python")
_VIRTIO_F_VERSION_1 = 32
_MRG_RXBUF_BIT = 15
# What the tap may hand over after the header: a 64 KiB GSO frame, its Ethernet
# and VLAN headers, with room to spare (QEMU's receive buffer is as large).
_RX_FRAME_MAX = 69632
# The longest frame that may wait for merged buffers, header included: one the
# model read (MAX_TAP_FRAME) or one a native thread handed back (its header and
# up to _RX_FRAME_MAX), so a state() of either is taken back by from_state.
RX_WAITING_MAX = max(MAX_TAP_FRAME, 12 + _RX_FRAME_MAX)


@dataclass(frozen=True)
class VirtioNetState:
    """virtio-net's own state: its MAC, ring size, counters, the receive filter
    and queue pairs the driver set, and frames that wait for RX buffers (at most
    one per pair: a merged frame that found too few; none without MRG_RXBUF)."""

    mac: bytes
    queue_size: int
    rx_frames: int
    tx_frames: int
    rx_dropped: int
    tx_dropped: int
    queue_pairs: int = 1
    active_pairs: int = 1
    rx_filter: RxFilter = field(default_factory=RxFilter)
    announce: bool = False
    rx_filtered: int = 0
    rx_waiting: tuple[bytes, ...] = ()


class VirtioNet(VirtioDevice):
    """virtio-net, a VirtioDevice on an open tap.

    Arguments:
      tap: its NetBackend (kvmpy.net.backend): a kvmpy.tap.Tap
        (``TapNetwork.open(...).tap``) or the user network's
        kvmpy.net.slirp.FramePort; the driver is offered the backend's
        ``offloads``. The device uses its fds, the caller closes them after the
        transport's ``close()``. With ``queue_pairs`` > 1 it is a multiqueue tap:
        ``fds`` holds one fd per pair and ``set_queue_attached(i, on)``
        (TUNSETQUEUE) steers the kernel's frames away from unused ones.
      mac: 6 bytes; default stable_mac(vm_name, index).
      vm_name, index: for the default MAC.
      queue_size: maximum ring size offered.
      name: for log messages.
      dataplane: "native" lets the transport serve each rx/tx pair from a C thread
        (netplane.py) while the model would do nothing else with it; "python"
        keeps every frame here.
      queue_pairs: RX/TX pairs offered (VIRTIO_NET_F_MQ when > 1).
      vhost: one open kvmpy.devices.virtio.vhost.VhostNet per pair (the caller's to
        close, after the transport's ``close()``), or None: the kernel's data plane
        then serves the RX/TX queues.
    Put it on PCI with ``pci_bus.add(VirtioPciTransport(platform, events, VirtioNet(...)))``.
    """

    device_type = 1

    def __init__(self, tap: NetBackend, mac: bytes | None = None, vm_name: str = "kvmpy", index: int = 0,
                 queue_size: int = 256, name: str = "virtio-net", dataplane: str = "native",
                 queue_pairs: int = 1, vhost: Sequence | None = None) -> None:
        if dataplane not in NET_DATAPLANE_MODES:
            raise ValueError(f"{name}: dataplane={dataplane!r}")
        self.dataplane = dataplane
        self.name = name
        self.tap = tap
        self.mac = bytes(mac) if mac else stable_mac(vm_name, index)
        if len(self.mac) != 6:
            raise ValueError(f"{name}: MAC must be 6 bytes")
        if not 1 <= queue_pairs <= MAX_QUEUE_PAIRS:
            raise ValueError(f"{name}: queue pairs {queue_pairs} not in 1-{MAX_QUEUE_PAIRS}")
        self.queue_pairs = queue_pairs
        self.fds = tuple(tap.fds) if queue_pairs > 1 else (tap.fd,)
        if len(self.fds) != queue_pairs:
            raise ValueError(f"{name}: {queue_pairs} queue pairs need as many tap queues, got {len(self.fds)}")
        self.queue_size = queue_size
        self.queue_max_sizes = (queue_size,) * (2 * queue_pairs) + (CTRL_QUEUE_SIZE,)
        self.stats = {"rx_frames": 0, "tx_frames": 0, "rx_dropped": 0, "tx_dropped": 0, "rx_filtered": 0}
        self.acked_features = 0
        self.rx_filter = RxFilter()
        self.active_pairs = 1
        self.announce_pending = False
        self._announce_at_activation = False
        self._ctrl_index = 2
        self._mergeable = False
        self._vlan_filtering = False
        self._queues: Sequence[SplitQueue] = ()
        self._transport: VirtioTransport | None = None
        self._rx_polling = [False] * queue_pairs
        # A frame read from the tap that found too few merged RX buffers: (bytes, length).
        self._rx_waiting: list[bytes | None] = [None] * queue_pairs
        self._bounce = memoryview(bytearray(MAX_TAP_FRAME))
        if vhost is not None and len(vhost) != queue_pairs:
            raise ValueError(f"{name}: {queue_pairs} queue pairs need as many vhost devices, got {len(vhost)}")
        self.vhost = tuple(vhost) if vhost is not None else None
        # Queues the kernel serves now: the model keeps its hands off their rings.
        self._in_kernel: set[int] = set()
        # Pairs a native thread serves (by pair): a readiness the loop reported
        # before the thread started is not the model's to act on.
        self._native_rx: set[int] = set()
        # Per native pair: the thread's own counts so far.
        self._native_counts: dict[int, Callable[[], dict[str, int]]] = {}
        # counts() may run on any thread (a monitor's, state()): a stopped thread's
        # counts move into stats under this lock, so a reader sees them in exactly one.
        self._counts_lock = threading.Lock()
        log.info("%s: tap %s, MAC %s%s", name, tap.name, format_mac(self.mac),
                 f", {queue_pairs} queue pairs" if queue_pairs > 1 else "")

    # state -------------------------------------------------------------------------

    def state(self) -> VirtioNetState:
        s = self.counts()
        return VirtioNetState(mac=self.mac, queue_size=self.queue_size, rx_frames=s["rx_frames"],
                              tx_frames=s["tx_frames"], rx_dropped=s["rx_dropped"], tx_dropped=s["tx_dropped"],
                              queue_pairs=self.queue_pairs, active_pairs=self.active_pairs,
                              rx_filter=self.rx_filter, announce=self.announce_pending,
                              rx_filtered=s["rx_filtered"],
                              rx_waiting=tuple(w or b"" for w in self._rx_waiting)
                              if any(self._rx_waiting) else ())

    @classmethod
    def from_state(cls, state: VirtioNetState, tap: NetBackend, name: str = "virtio-net", **kwargs) -> "VirtioNet":
        """The device ``state`` describes, on ``tap`` (``kwargs``: the constructor's
        backend arguments, e.g. ``vhost``). ValueError if the state is malformed or
        does not fit the tap."""
        if not isinstance(state, VirtioNetState):
            raise ValueError(f"{name}: not a virtio-net state: {type(state).__name__}")
        if not isinstance(state.rx_filter, RxFilter):
            raise ValueError(f"{name}: rx_filter is not an RxFilter")
        state.rx_filter.validate(name)
        if not 1 <= state.active_pairs <= state.queue_pairs:
            raise ValueError(f"{name}: active pairs {state.active_pairs} of {state.queue_pairs}")
        if len(state.rx_waiting) not in (0, state.queue_pairs) or any(
                not isinstance(w, bytes) or len(w) > RX_WAITING_MAX for w in state.rx_waiting):
            raise ValueError(f"{name}: rx_waiting must hold one frame (or b'') per pair")
        dev = cls(tap, mac=state.mac, queue_size=state.queue_size, name=name, queue_pairs=state.queue_pairs,
                  **kwargs)
        dev.stats.update(rx_frames=state.rx_frames, tx_frames=state.tx_frames, rx_dropped=state.rx_dropped,
                         tx_dropped=state.tx_dropped, rx_filtered=state.rx_filtered)
        dev.rx_filter = state.rx_filter
        dev.active_pairs = state.active_pairs
        dev.announce_pending = state.announce
        for pair, frame in enumerate(state.rx_waiting):
            dev._rx_waiting[pair] = frame or None
        # A restored NIC may sit on another host's bridge now: as QEMU after a
        # migration, the driver is asked to announce itself once it runs again.
        dev._announce_at_activation = True
        return dev

    # what the driver sees ----------------------------------------------------------

    def device_features(self) -> int:
        f = 0
        for bit in (VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_CTRL_VQ,
                    VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_RX_EXTRA, VIRTIO_NET_F_CTRL_VLAN,
                    VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_GUEST_ANNOUNCE):
            f |= 1 << bit
        if self.queue_pairs > 1:
            f |= 1 << VIRTIO_NET_F_MQ
        # Only offload bits: a backend cannot offer the driver anything else.
        return f | self.tap.offloads & OFFLOAD_FEATURES

    def ack_features(self, features: int) -> None:
        self.acked_features = features
        self._mergeable = self.negotiated(VIRTIO_NET_F_MRG_RXBUF)
        self._vlan_filtering = self.negotiated(VIRTIO_NET_F_CTRL_VLAN)
        self._ctrl_index = 2 * self.queue_pairs if self.negotiated(VIRTIO_NET_F_MQ) else 2

    def negotiated(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    def config_bytes(self) -> bytes:
        status = VIRTIO_NET_S_LINK_UP | (VIRTIO_NET_S_ANNOUNCE if self.announce_pending else 0)
        return struct.pack("<6sHHH", self.mac, status, self.queue_pairs, 1500)

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Read-only for a virtio 1.x driver: the MAC changes through CTRL_MAC_ADDR_SET."""

    def announce(self) -> None:
        """Ask the driver to announce itself (gratuitous ARP), as after a migration:
        the ANNOUNCE status bit and a config interrupt, until it acknowledges."""
        if self._transport is None or not self.negotiated(VIRTIO_NET_F_GUEST_ANNOUNCE):
            return
        self.announce_pending = True
        self._transport.config_changed()

    def announce_self(self) -> None:
        """One round of announce-self for this NIC (event loop thread), as QEMU's
        qemu_announce_self_iter: a RARP for its MAC from the host side, as if the
        guest had sent it, and the ANNOUNCE status where the driver negotiated
        GUEST_ANNOUNCE (which needs the control queue for its acknowledgement)."""
        frame = bytes(VNET_HDR_SIZE) + rarp_frame(self.mac)
        try:
            os.write(self.fds[0], frame)
        except OSError as e:
            # A full or gone backend: the next round tries again, as a lost frame would.
            log.debug("%s: announce RARP: %s", self.name, e)
        if self.negotiated(VIRTIO_NET_F_CTRL_VQ):
            self.announce()

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
        self._attach_tap_queues()
        if self._announce_at_activation:
            self._announce_at_activation = False
            self.announce()

    def fd_watches(self) -> Sequence[FdWatch]:
        watches = []
        for pair, fd in enumerate(self.fds):
            on = pair < self.active_pairs
            self._rx_polling[pair] = on
            watches.append(FdWatch(fd, EVENT_READ if on else 0,
                                   lambda _events, pair=pair: self._tap_readable(pair)))
        return watches

    def reset(self) -> None:
        if self._transport is not None:
            self.tap.set_offload(0)
        self._queues = ()
        self._transport = None
        self._rx_polling = [False] * self.queue_pairs
        self._rx_waiting = [None] * self.queue_pairs
        self._in_kernel.clear()
        self._native_rx.clear()
        with self._counts_lock:
            self._native_counts.clear()
        self.acked_features = 0
        self._mergeable = self._vlan_filtering = False
        self._ctrl_index = 2
        self.rx_filter = RxFilter()
        self.active_pairs = 1
        self.announce_pending = False
        self._attach_tap_queues()

    def _attach_tap_queues(self) -> None:
        if self.queue_pairs == 1:
            return
        for pair in range(self.queue_pairs):
            self.tap.set_queue_attached(pair, pair < self.active_pairs)

    # the kernel's data plane (vhost-net) --------------------------------------------

    def native_queue(self, index: int, queue: SplitQueue, kick_fd: int, irq_fd: int | None) -> ServedQueue | None:
        """The transport offers queue ``index`` to a data plane outside Python: a
        started vhost ring (vhost.VhostQueue, a ServedQueue), or None to keep it in
        the model (no vhost, the control queue, an unused pair)."""
        if self.vhost is None or index >= 2 * self.active_pairs or self._transport is None:
            return None
        pair, ring = divmod(index, 2)
        if ring == RX_QUEUE and self._rx_waiting[pair] is not None:
            return None     # the model delivers what it holds first
        vhost = self.vhost[pair]
        if ring == RX_QUEUE:
            # The kernel reads the tap now; the model's watch sleeps until it is back.
            self._rx_poll(pair, False)

        def stopped() -> None:
            self._in_kernel.discard(index)
            if ring == RX_QUEUE and self._transport is not None:
                self._rx_poll(pair, True)
        try:
            started = vhost.start_ring(ring, queue, self.acked_features, kick_fd, irq_fd, on_stop=stopped)
        except OSError:
            stopped()
            raise
        self._in_kernel.add(index)
        return started

    # native data plane (netplane.py) -------------------------------------------------

    def native_backend(self) -> NetPairs | None:
        """The pairs a native thread may serve now, or None while every frame must
        come here: the Python data plane chosen, the module missing, or a backend
        that needs Python per frame (user networking).

        The receive filter (control queue CTRL_RX / CTRL_MAC / CTRL_VLAN) goes with
        each pair: the thread applies it as this model does, and a change reaches
        the running thread (the transport compares the offers) without a hand-over."""
        if (self.dataplane != "native" or not self.tap.allows_native_plane or not netplane.available()
                or self.vhost is not None):
            return None
        mrg = self._mergeable
        hdr_len = 12 if mrg or self.negotiated(_VIRTIO_F_VERSION_1) else 10
        # One thread per active pair, each on its own tap queue; a pair whose model
        # holds a frame for merged buffers delivers it first.
        pairs = tuple(NetPairBackend(rx_queue=2 * pair + RX_QUEUE, tx_queue=2 * pair + TX_QUEUE,
                                     tap_fd=self.fds[pair], hdr_len=hdr_len, mrg_rxbuf=mrg,
                                     rx_frame_max=hdr_len + _RX_FRAME_MAX,
                                     rx_filter=None if self.rx_filter.promisc else self.rx_filter,
                                     own_mac=self.mac, vlan_filtering=self._vlan_filtering)
                      for pair in range(self.active_pairs) if self._rx_waiting[pair] is None)
        return NetPairs(pairs=pairs) if pairs else None

    def native_started(self, pair: NetPairBackend, counts: Callable[[], dict[str, int]]) -> None:
        """A thread serves ``pair`` now: its tap is the thread's to read; ``counts()``
        tells what it moved so far."""
        index = pair.rx_queue // 2
        with self._counts_lock:
            self._native_counts[index] = counts
        self._native_rx.add(index)
        self._rx_poll(index, False)

    def native_stopped(self, pair: NetPairBackend, info: NetStopInfo) -> None:
        """The thread of ``pair`` stopped: its counts join the model's (the transport
        runs both queues next, and the rx queue's run polls the tap again)."""
        index = pair.rx_queue // 2
        self._native_rx.discard(index)
        if info.rx_waiting:
            # The thread read a frame too big for the buffers there were: it waits
            # here, whole, as one the model read itself would.
            self._rx_waiting[index] = info.rx_waiting
        with self._counts_lock:
            self._native_counts.pop(index, None)
            self.stats["rx_frames"] += info.rx_frames
            self.stats["tx_frames"] += info.tx_frames
            self.stats["rx_dropped"] += info.rx_dropped
            self.stats["tx_dropped"] += info.tx_dropped
            self.stats["rx_filtered"] += info.rx_filtered

    def counts(self) -> dict[str, int]:
        """Frames moved and dropped, by the model and the native threads running now."""
        with self._counts_lock:
            total = dict(self.stats)
            for counts in self._native_counts.values():
                for key, value in counts().items():
                    total[key] += value
        return total

    # event loop thread ---------------------------------------------------------------

    def _rx_poll(self, pair: int, on: bool) -> None:
        if on != self._rx_polling[pair]:
            self._rx_polling[pair] = on
            self._transport.set_fd_events(self.fds[pair], EVENT_READ if on else 0)

    def _tap_readable(self, pair: int) -> None:
        if pair not in self._native_rx:
            self._receive(pair)

    def process_queue(self, index: int) -> None:
        if index == self._ctrl_index:
            self._control()
            return
        pair, ring = divmod(index, 2)
        if pair >= self.active_pairs:
            log.debug("%s: queue %d of an unused pair notified; ignored", self.name, index)
            return
        if ring == TX_QUEUE:
            self._transmit(pair)
        else:
            # New RX buffers: frames may be waiting in the tap.
            self._rx_poll(pair, True)
            self._receive(pair)

    def _receive(self, pair: int) -> None:
        q = self._queues[2 * pair]
        # A tap readiness reported in the same wake-up as the kernel took the ring.
        if not q.ready or 2 * pair in self._in_kernel:
            return
        fd = self.fds[pair]
        filt = self.rx_filter
        done = 0
        used: list[tuple[int, int]] = []
        while done < BATCH:
            waiting = self._rx_waiting[pair]
            if waiting is not None:
                entries = self._merge_copy(q, waiting, 0, None)
                if entries is None:
                    if q.ask_for_more():
                        continue
                    # Still too few buffers: the tap waits too, until the driver adds some.
                    self._rx_poll(pair, False)
                    break
                self._rx_waiting[pair] = None
                used += entries
                self.stats["rx_frames"] += 1
                done += 1
                continue
            chain = q.pop()
            if chain is None:
                # Out of guest buffers: stop watching the tap until the driver adds some.
                if not q.set_notification(True):
                    self._rx_poll(pair, False)
                    break
                continue
            # (One iovec of a read is the bounce buffer's.)
            if len(chain.writable) >= IOV_MAX or chain.writable_len < VNET_HDR_SIZE:
                used.append((chain.head, 0))
                self.stats["rx_dropped"] += 1
                done += 1
                log.debug("%s: unusable RX chain of %d bytes", self.name, chain.writable_len)
                continue
            cap = chain.writable_len
            # A tap's read returns what fit, not the frame's length: only a read
            # that reaches into the bounce buffer shows the chain was too short.
            iov = chain.writable + [self._bounce]
            try:
                n = os.readv(fd, iov)
            except BlockingIOError:
                q.undo_pop()
                break
            except OSError as e:
                q.undo_pop()
                log.error("%s: tap read: %s", self.name, e)
                break
            done += 1
            if not filt.promisc:
                head, _ = gather(iov, min(n, VNET_HDR_SIZE + 16))
                if not filt.accepts(head[VNET_HDR_SIZE:], self.mac, self._vlan_filtering):
                    # The chain was only scribbled on: the next frame takes it.
                    q.undo_pop()
                    self.stats["rx_filtered"] += 1
                    continue
            if n <= cap:
                _set_num_buffers(chain.writable, 1)
                used.append((chain.head, n))
                self.stats["rx_frames"] += 1
            elif not self._mergeable:
                # The frame did not fit: hand back an empty buffer (the guest counts a length error).
                self.stats["rx_dropped"] += 1
                used.append((chain.head, 0))
            else:
                entries = self._merge_copy(q, self._bounce[:n - cap], 1, chain.writable)
                if entries is None:
                    # Too few buffers for the rest: the whole frame waits for more
                    # (the next round of the loop asks the driver for them).
                    q.undo_pop()
                    self._rx_waiting[pair] = b"".join(chain.writable) + bytes(self._bounce[:n - cap])
                    continue
                used.append((chain.head, cap))
                used += entries
                self.stats["rx_frames"] += 1
        if used:
            q.add_used_many(used)
            self._transport.signal_used(2 * pair)
        # After BATCH frames, the level-triggered poll brings us back once the
        # doorbells had their turn.

    def _merge_copy(self, q: SplitQueue, data, chains_before: int,
                    first: list[memoryview] | None) -> list[tuple[int, int]] | None:
        """Copy ``data`` into the next chains (with ``first``, the views of a chain
        already holding the frame's start and its header); returns their used
        entries, or None with nothing popped when there are too few."""
        start = q.next_avail
        entries: list[tuple[int, int]] = []
        header_views = first
        header_at = 0           # entries before it are chains returned empty, not the frame's
        off = 0
        # Counted only once the copy is done: a round short of chains pops nothing
        # and comes again, and its empty chains with it.
        dropped = 0
        while off < len(data) or not entries and first is None:
            chain = q.pop()
            if chain is None:
                q.next_avail = start
                return None
            if header_views is None:
                if chain.writable_len < VNET_HDR_SIZE:
                    # Not even room for the header: returned empty, as above.
                    entries.append((chain.head, 0))
                    dropped += 1
                    continue
                header_views = chain.writable
                header_at = len(entries)
            n = write_views(chain.writable, data[off:off + chain.writable_len])
            entries.append((chain.head, n))
            off += n
            if first is None and not self._mergeable and off < len(data):
                # Only one chain per frame without MRG_RXBUF (after a restore into
                # a driver that did not negotiate it): the rest is lost.
                dropped += 1
                break
        self.stats["rx_dropped"] += dropped
        _set_num_buffers(header_views, chains_before + len(entries) - header_at)
        return entries

    def _transmit(self, pair: int) -> None:
        q = self._queues[2 * pair + 1]
        fd = self.fds[pair]
        while True:
            did = 0
            # No doorbell for what the driver adds while this batch runs: it is taken
            # below (set_notification(True) looks again), as QEMU's tx does.
            q.set_notification(False)
            for chain in q.iter_chains():
                if chain.readable_len <= VNET_HDR_SIZE or len(chain.readable) > IOV_MAX:
                    self.stats["tx_dropped"] += 1
                else:
                    try:
                        os.writev(fd, chain.readable)
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
                self._transport.signal_used(2 * pair + 1)
            if not q.set_notification(True):
                return

    # the control queue ------------------------------------------------------------------

    def _control(self) -> None:
        q = self._queues[self._ctrl_index]
        if not q.ready:
            return
        while True:
            self._control_batch(q)
            # With EVENT_IDX the driver kicks only past avail_event: ask for the next one.
            if not q.set_notification(True):
                return

    def _control_batch(self, q: SplitQueue) -> None:
        did = False
        for chain in q.iter_chains():
            did = True
            if not chain.writable:
                # Nowhere to put the ack: a driver bug, answered with nothing.
                log.warning("%s: control command without an ack buffer; ignored", self.name)
                q.add_used(chain.head, 0)
                continue
            if chain.readable_len > MAX_CTRL_BYTES or chain.readable_len < 2:
                ack = self._ctrl_refuse(f"control command of {chain.readable_len} bytes")
            else:
                data, _ = gather(chain.readable, chain.readable_len)
                ack = self._ctrl_command(data[0], data[1], data[2:])
                # The driver may send the next frame as soon as it sees the ack: a
                # running thread must filter with the new tables by then.
                self._transport.native_offer_changed()
            write_views(chain.writable, bytes([ack]))
            q.add_used(chain.head, 1)
        if did:
            self._transport.signal_used(self._ctrl_index)

    def _ctrl_refuse(self, why: str) -> int:
        log.warning("%s: control queue: %s; answered VIRTIO_NET_ERR", self.name, why)
        return VIRTIO_NET_ERR

    def _ctrl_command(self, cls: int, cmd: int, data: bytes) -> int:
        if cls == VIRTIO_NET_CTRL_RX and self.negotiated(VIRTIO_NET_F_CTRL_RX):
            return self._ctrl_rx(cmd, data)
        if cls == VIRTIO_NET_CTRL_MAC:
            return self._ctrl_mac(cmd, data)
        if cls == VIRTIO_NET_CTRL_VLAN and self.negotiated(VIRTIO_NET_F_CTRL_VLAN):
            if cmd not in (VIRTIO_NET_CTRL_VLAN_ADD, VIRTIO_NET_CTRL_VLAN_DEL) or len(data) != 2:
                return self._ctrl_refuse(f"VLAN command {cmd} with {len(data)} bytes")
            vid = int.from_bytes(data, "little")
            if vid >= MAX_VLAN:
                return self._ctrl_refuse(f"VLAN id {vid}")
            vlans = set(self.rx_filter.vlans)
            if cmd == VIRTIO_NET_CTRL_VLAN_ADD:
                vlans.add(vid)
            else:
                vlans.discard(vid)
            self.rx_filter = replace(self.rx_filter, vlans=tuple(sorted(vlans)))
            return VIRTIO_NET_OK
        if cls == VIRTIO_NET_CTRL_ANNOUNCE and self.negotiated(VIRTIO_NET_F_GUEST_ANNOUNCE):
            if cmd != VIRTIO_NET_CTRL_ANNOUNCE_ACK or data:
                return self._ctrl_refuse(f"ANNOUNCE command {cmd} with {len(data)} bytes")
            if not self.announce_pending:
                # QEMU's answer to an ack of nothing; a driver may ack twice, no warning
                log.debug("%s: control queue: ANNOUNCE_ACK with no announcement pending", self.name)
                return VIRTIO_NET_ERR
            self.announce_pending = False
            return VIRTIO_NET_OK
        if cls == VIRTIO_NET_CTRL_MQ and self.negotiated(VIRTIO_NET_F_MQ):
            if cmd != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET or len(data) != 2:
                return self._ctrl_refuse(f"MQ command {cmd} with {len(data)} bytes")
            pairs = int.from_bytes(data, "little")
            if not 1 <= pairs <= self.queue_pairs:
                return self._ctrl_refuse(f"{pairs} queue pairs (1-{self.queue_pairs})")
            self._set_active_pairs(pairs)
            return VIRTIO_NET_OK
        return self._ctrl_refuse(f"unknown or not negotiated class {cls} command {cmd}")

    def _ctrl_rx(self, cmd: int, data: bytes) -> int:
        names = {VIRTIO_NET_CTRL_RX_PROMISC: "promisc", VIRTIO_NET_CTRL_RX_ALLMULTI: "allmulti"}
        if self.negotiated(VIRTIO_NET_F_CTRL_RX_EXTRA):
            names.update({VIRTIO_NET_CTRL_RX_ALLUNI: "alluni", VIRTIO_NET_CTRL_RX_NOMULTI: "nomulti",
                          VIRTIO_NET_CTRL_RX_NOUNI: "nouni", VIRTIO_NET_CTRL_RX_NOBCAST: "nobcast"})
        if cmd not in names or len(data) != 1:
            return self._ctrl_refuse(f"RX command {cmd} with {len(data)} bytes")
        self.rx_filter = replace(self.rx_filter, **{names[cmd]: bool(data[0])})
        return VIRTIO_NET_OK

    def _ctrl_mac(self, cmd: int, data: bytes) -> int:
        if cmd == VIRTIO_NET_CTRL_MAC_ADDR_SET and self.negotiated(VIRTIO_NET_F_CTRL_MAC_ADDR):
            if len(data) != 6:
                return self._ctrl_refuse(f"MAC_ADDR_SET with {len(data)} bytes")
            self.mac = bytes(data)
            return VIRTIO_NET_OK
        if cmd != VIRTIO_NET_CTRL_MAC_TABLE_SET or not self.negotiated(VIRTIO_NET_F_CTRL_RX):
            return self._ctrl_refuse(f"MAC command {cmd}")
        tables = []
        off = 0
        for _ in range(2):
            if off + 4 > len(data):
                return self._ctrl_refuse("MAC table shorter than its entry count")
            entries = int.from_bytes(data[off:off + 4], "little")
            off += 4
            if entries > (len(data) - off) // 6:
                return self._ctrl_refuse(f"MAC table of {entries} entries in {len(data) - off} bytes")
            tables.append(tuple(data[off + 6 * i:off + 6 * i + 6] for i in range(entries)))
            off += 6 * entries
        if off != len(data):
            return self._ctrl_refuse(f"{len(data) - off} bytes after the MAC tables")
        uc, mc = tables
        self.rx_filter = replace(self.rx_filter,
                                 unicast=uc if len(uc) <= MAC_TABLE_ENTRIES else (),
                                 unicast_overflow=len(uc) > MAC_TABLE_ENTRIES,
                                 multicast=mc if len(mc) <= MAC_TABLE_ENTRIES else (),
                                 multicast_overflow=len(mc) > MAC_TABLE_ENTRIES)
        return VIRTIO_NET_OK

    def _set_active_pairs(self, pairs: int) -> None:
        old = self.active_pairs
        if pairs == old:
            return
        self.active_pairs = pairs
        self._attach_tap_queues()
        for pair in range(min(old, pairs), max(old, pairs)):
            self._rx_poll(pair, pair < pairs)
        log.info("%s: %d queue pairs in use", self.name, pairs)


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


__all__ = ["QueueError", "RxFilter", "VirtioNet", "VirtioNetState"]
