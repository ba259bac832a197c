"""The native virtio-net data plane's Python side: hand an rx/tx queue pair to its C thread and take it back.

For hosts without vhost-net. The C thread (c_ext/dataplane/net_dataplane.c) serves
one rx/tx pair from the two doorbell eventfds and the tap fd: each tx chain is one
writev of header and frame to the tap, each frame the tap has is one readv into
rx chains (several with VIRTIO_NET_F_MRG_RXBUF, num_buffers set), in batches of up
to NP_BATCH frames per queue with one used-index update and at most one interrupt
(EVENT_IDX or NO_INTERRUPT decided in C) per batch. While the guest has no rx
buffers the thread stops reading the tap until the rx doorbell rings.

It walks the rings with the blk plane's walker (vring.c, the checks of queue.py)
and never decides anything the model decides: at the first chain it does not take
as the model would (a bad descriptor, a chain the model drops and counts, a tap
error) it stops before consuming it and writes its hand-back eventfd; the
transport then puts both queues' indices back into their SplitQueues and lets the
model carry on (pci.py). Frames and drops the thread counted go into the model's
statistics when it stops.

The guest's receive filter (control queue CTRL_RX, CTRL_MAC, CTRL_VLAN) travels
with the pair and is applied in the thread (np_filter_accepts, held to
net.RxFilter.accepts by tests/test_netplane_filter.py); a change reaches the
running thread through np_set_filter, so Linux turning promiscuous mode off at
link-up leaves the pair where it is. Every read goes on into a bounce buffer: a
tap's read returns what fit, so only that shows a frame longer than the chains
(the chain goes back empty, or with MRG_RXBUF the frame goes to the model whole,
NetStopInfo.rx_waiting, to wait for more buffers).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace

from ...memory import GuestMemory
from . import plane_glue
from .dataplane import RegionPointers
from .queue import SplitQueue

ffi, lib, _IMPORT_ERROR = plane_glue.load_cffi("_netplane_cffi")


def available() -> bool:
    """Whether the native module was built (``setup.py build_ext``, or a pip install)."""
    return lib is not None


def unavailable_reason() -> str:
    return _IMPORT_ERROR


#: an ``irq_fds`` entry: the queue raises no interrupt
NO_INTERRUPT = -1


def spin_helps() -> bool:
    """Whether a thread may wait a few microseconds for the driver after work
    instead of asking for a kick: only when this process may run on several CPUs,
    so the guest's vCPU can refill the ring meanwhile. On one CPU (a 1-vCPU nested
    L1, a pinned VMM) the spin takes the very CPU the driver needs: in the L1 the
    TCP rows cost kvmpy twice QEMU's CPU with it."""
    return len(os.sched_getaffinity(0)) > 1


# Read once at import, before the sandbox (which has no sched_getaffinity).
SPIN = spin_helps()


@dataclass(frozen=True)
class NetPairBackend:
    """What a virtio-net model lets a data plane thread do with one rx/tx pair, as plain values."""

    rx_queue: int
    tx_queue: int
    tap_fd: int              # non-blocking, with the vnet header of hdr_len bytes
    hdr_len: int             # 12 (VERSION_1 or MRG_RXBUF: with num_buffers) or 10
    mrg_rxbuf: bool          # a frame may fill several rx chains
    rx_frame_max: int        # header + the largest frame the tap may hand the guest
    # The receive filter the thread applies: net.RxFilter (a plain frozen value),
    # the MAC it lets through, and whether tagged frames need their VLAN listed.
    rx_filter: object = None     # None: every frame (the promiscuous default)
    own_mac: bytes = bytes(6)
    vlan_filtering: bool = False

    def same_but_filter(self, other: "NetPairBackend") -> bool:
        """Whether ``other`` differs from this at most in its receive filter (a
        running thread takes such a change without stopping)."""
        return replace(self, rx_filter=None, own_mac=bytes(6), vlan_filtering=False) == replace(
            other, rx_filter=None, own_mac=bytes(6), vlan_filtering=False)


@dataclass(frozen=True)
class NetPairs:
    """Every pair a virtio-net model lets native threads serve now."""

    pairs: tuple[NetPairBackend, ...]

    def pair_of(self, queue: int) -> NetPairBackend | None:
        for pair in self.pairs:
            if queue in (pair.rx_queue, pair.tx_queue):
                return pair
        return None


@dataclass(frozen=True)
class NetStopInfo:
    """What a stopped net pair thread did, and whether it handed a chain back."""

    handed_back: bool        # the thread stopped at a chain the model must see
    handback_queue: int | None    # which queue's chain (a queue index of the device)
    tap_errno: int           # the tap failed (not EAGAIN) with this errno: the pair stays the model's
    rx_frames: int
    tx_frames: int
    rx_dropped: int
    tx_dropped: int
    rx_filtered: int = 0
    # A merged frame too big for the rx buffers the guest had given: header and
    # frame, for the model to deliver whole once there are more (b"": none).
    rx_waiting: bytes = b""

    @property
    def completed(self) -> int:
        return self.rx_frames + self.tx_frames + self.rx_dropped + self.tx_dropped


class NativeNetPair:
    """One rx/tx pair served by a C thread from construction until ``stop``.

    ``irq_fds``: per queue, the unmasked MSI-X vector's eventfd the thread may write
    itself (an irqfd under KVM); NO_INTERRUPT when the queue has no interrupt at all
    (MSI-X on, no vector: a polling driver), so nothing wakes the event loop per
    batch; or None: then it writes that queue's ``call_fds`` entry and the
    transport raises the interrupt on the event loop."""

    def __init__(self, regions: RegionPointers, rx: SplitQueue, tx: SplitQueue, backend: NetPairBackend,
                 kick_fds: tuple[int, int], irq_fds: tuple[int | None, int | None]) -> None:
        self.backend = backend
        self.queue_indices = (backend.rx_queue, backend.tx_queue)
        self.queues = (rx, tx)
        self.irq_fds = irq_fds
        self.call_fds = (plane_glue.new_eventfd(), plane_glue.new_eventfd())
        self.handback_fd = plane_glue.new_eventfd()
        cfg = ffi.new("struct np_config *")
        cfg.nregions = regions.fill(cfg.regions)
        if rx.event_idx != tx.event_idx or rx.indirect != tx.indirect:
            self._close_fds()
            raise ValueError("rx and tx queues disagree on EVENT_IDX or INDIRECT_DESC")
        cfg.event_idx, cfg.indirect = int(rx.event_idx), int(rx.indirect)
        for i, q in enumerate(self.queues):
            rc = cfg.rings[i]
            plane_glue.ring_to_c(rc, q)
            rc.kick_fd = kick_fds[i]
            rc.call_fd = self.call_fds[i] if irq_fds[i] is None else irq_fds[i]
        cfg.tap_fd = backend.tap_fd
        cfg.hdr_len = backend.hdr_len
        cfg.mrg_rxbuf = int(backend.mrg_rxbuf)
        cfg.rx_frame_max = backend.rx_frame_max
        cfg.handback_fd = self.handback_fd
        cfg.spin = int(SPIN)
        fill_filter(cfg.filter, backend)
        self._regions = regions
        # counts() may come from any thread: never on a pair np_stop freed.
        self._handle_lock = threading.Lock()
        # What the thread counted when it stopped: counts() goes on answering them
        # until the model has taken them into its own statistics (native_stopped).
        self._final_counts: dict[str, int] | None = None
        err = ffi.new("int *")
        self._handle = lib.np_start(cfg, err)
        if self._handle == ffi.NULL:
            self._close_fds()
            raise OSError(err[0], f"net data plane did not start: {os.strerror(err[0])}")

    def stop(self) -> NetStopInfo:
        """Join the thread (it finishes the frame in hand) and put both rings'
        indices back into their SplitQueues, which carry on from there."""
        out = ffi.new("struct np_result *")
        waiting = bytearray(self.backend.rx_frame_max)
        with self._handle_lock:
            lib.np_stop(self._handle, out, ffi.from_buffer(waiting), len(waiting))
            self._handle = None
            self._final_counts = _counts(out)
        for i, q in enumerate(self.queues):
            plane_glue.ring_from_c(q, out.rings[i])
        handed_back = out.exit_reason == lib.NP_EXIT_HANDBACK
        return NetStopInfo(handed_back=handed_back,
                           handback_queue=self.queue_indices[out.handback_queue] if handed_back else None,
                           tap_errno=out.tap_errno, rx_frames=out.rx_frames, tx_frames=out.tx_frames,
                           rx_dropped=out.rx_dropped, tx_dropped=out.tx_dropped, rx_filtered=out.rx_filtered,
                           rx_waiting=bytes(waiting[:out.waiting_len]))

    def counts(self) -> dict[str, int]:
        """The frames the thread moved and dropped so far (once stopped: all it did)."""
        out = ffi.new("struct np_result *")
        with self._handle_lock:
            if self._handle is None:
                return dict(self._final_counts or _counts(out))
            lib.np_counters(self._handle, out)
        return _counts(out)

    def set_filter(self, backend: NetPairBackend) -> None:
        """The guest changed its receive filter: the thread judges every frame it
        reads from now on by ``backend``'s (which differs from the pair's at most there)."""
        f = ffi.new("struct np_filter *")
        fill_filter(f, backend)
        with self._handle_lock:
            if self._handle is not None:
                lib.np_set_filter(self._handle, f)
        self.backend = backend

    def take_interrupt(self, queue: int) -> bool:
        """Whether the thread asked for an interrupt for device queue ``queue``
        through its call eventfd since the last call."""
        return plane_glue.take_event(self.call_fds[self.queue_indices.index(queue)])

    def close(self) -> None:
        """After ``stop``: release the eventfds."""
        self._close_fds()

    def _close_fds(self) -> None:
        plane_glue.close_fds((*self.call_fds, self.handback_fd))
        self.call_fds = (-1, -1)
        self.handback_fd = -1


def _counts(out) -> dict[str, int]:
    return {"rx_frames": out.rx_frames, "tx_frames": out.tx_frames, "rx_dropped": out.rx_dropped,
            "tx_dropped": out.tx_dropped, "rx_filtered": out.rx_filtered}


def fill_filter(f, backend: NetPairBackend) -> None:
    """``backend``'s receive filter into ``f``, a ``struct np_filter``."""
    rx = backend.rx_filter
    if rx is None:
        f.promisc = 1
        return
    for name in ("promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast", "unicast_overflow",
                 "multicast_overflow"):
        setattr(f, name, int(getattr(rx, name)))
    f.vlan_filtering = int(backend.vlan_filtering)
    f.own_mac = list(backend.own_mac)
    # RxFilter.validate holds the tables to NP_MAC_TABLE entries; more never reach here.
    unicast, multicast = rx.unicast[:lib.NP_MAC_TABLE], rx.multicast[:lib.NP_MAC_TABLE]
    f.n_unicast, f.n_multicast = len(unicast), len(multicast)
    for i, mac in enumerate(unicast):
        f.unicast[i] = list(mac)
    for i, mac in enumerate(multicast):
        f.multicast[i] = list(mac)
    bitmap = bytearray(len(f.vlans))
    for vid in rx.vlans:
        bitmap[vid // 8] |= 1 << vid % 8
    f.vlans = list(bitmap)


def filter_accepts(backend: NetPairBackend, frame: bytes) -> bool:
    """The C filter (np_filter_accepts) on one frame, as a thread with ``backend``
    judges it; the tests hold it to net.RxFilter.accepts."""
    f = ffi.new("struct np_filter *")
    fill_filter(f, backend)
    return bool(lib.np_filter_accepts(f, ffi.from_buffer(frame), len(frame)))


def walk_chain(memory: GuestMemory, desc_addr: int, size: int, indirect: bool,
               head: int) -> list[tuple[int, int, bool]] | None:
    """This module's copy of the shared walker (vring.c) on one chain: its buffers
    as (gpa, len, writable), or None where it refuses the chain; the tests hold it
    to SplitQueue and to the blk plane's."""
    return plane_glue.walk_chain(ffi, lib, RegionPointers(memory), lib.NP_MAX_SEGS, desc_addr, size, indirect,
                                 head)
