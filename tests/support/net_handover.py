"""A virtio-net driver that checks every used entry while another thread keeps
taking its rx/tx pair from the native data plane and giving it back.

``HandoverRig`` puts a VirtioNet (native data plane) on a SocketPort, so the
other end of the wire is a socket the test holds. Three threads then run at once:

- the driver (``DriverSide``): keeps tx chains and rx buffers posted, kicks as a
  Linux driver does (only where the device asked: EVENT_IDX avail_event or
  NO_NOTIFY), takes used entries and holds them to a driver's invariants: every
  used id is the head of a chain it has outstanding, no chain completes twice, used
  idx never moves past what is outstanding, rx frames arrive whole, once and in
  order. When it has nothing to do it waits for the queue's interrupt, as
  virtqueue_enable_cb does: an interrupt the device owed and never sent shows as
  used entries nobody was woken for.
- the host (``HostSide``): reads the frames the guest sent (each exactly once, in
  order) and sends the guest frames of its own.
- the hand-over thread (``run_handovers``): control-queue rx filter changes (the
  pair goes back to the model and, once the filter is the default again, to C),
  the transport's ``state()``, ``hold_native`` on and off, an MSI-X vector masked
  and unmasked: each takes the pair back from the C thread mid-stream.

Everything a thread finds wrong goes into ``Failures``; the test asserts it is
empty once traffic has drained.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

from kvmpy.devices.virtio.net import (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_RX,
                                      VIRTIO_NET_CTRL_RX_ALLMULTI, VIRTIO_NET_CTRL_RX_PROMISC,
                                      VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC,
                                      VIRTIO_NET_F_MRG_RXBUF, VirtioNet)
from kvmpy.devices.virtio.pci import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1
from kvmpy.devices.virtio.queue import vring_need_event

from .net_ports import SocketPort
from .virtio_driver import DriverQueue, SoftMachine, VirtioPciDriver

MAC = b"\x52\x54\x00\x12\x34\x56"
PEER = b"\x02\x00\x00\x00\x00\x02"
ETH_TYPE = 0x88B5
HDR = 12
RX, TX = 0, 1
CTRL = 2
VECTORS = {RX: 1, TX: 2, CTRL: 3}
TXBUF, RXBUF, CTRLBUF, INDIRECT = 0x400000, 0x600000, 0x7F0000, 0x380000
SLOT = 0x800
# With odd_chains: every BARE_EVERY-th tx chain a bare header, every TINY_EVERY-th
# rx buffer 4 bytes; the thread hands the pair back at each.
BARE_EVERY, TINY_EVERY = 97, 61
# With merged rx buffers and no odd chains: every BIG_EVERY-th rx frame spans
# several buffers, and waits whole (in the model) when the ring has too few.
BIG_EVERY = 53
# How long a driver waiting for an interrupt, or a test waiting for traffic to
# drain, gives the device: far beyond any batch, so only a lost one runs out.
PATIENCE = 3.0


def frame_for(direction: str, seq: int, big: bool = False) -> bytes:
    """The frame number ``seq`` of one direction: its length and every byte follow
    from ``seq``, so a frame cut, mixed with another or stale is seen. ``big``: now
    and then one longer than an rx buffer (for merged rx buffers)."""
    length = 46 + (seq * 97) % 1400
    if big and seq % BIG_EVERY == BIG_EVERY - 1:
        length = 2500 + (seq * 131) % 6000
    body = (b"%s%08d|" % (direction.encode(), seq)) * (length // 10 + 1)
    dst, src = (PEER, MAC) if direction == "t" else (MAC, PEER)
    return dst + src + struct.pack("!H", ETH_TYPE) + body[:length]


def seq_of(frame: bytes) -> int:
    return int(frame[15:23])


class Failures:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.items: list[str] = []
        self.stop = threading.Event()

    def add(self, what: str) -> None:
        with self._lock:
            self.items.append(what)
        self.stop.set()


class HandoverRig:
    """A VirtioNet with the native plane on a SocketPort, MSI-X on, rx (vector 1),
    tx (2) and the control queue (3) set up, DRIVER_OK."""

    def __init__(self, event_idx: bool, mrg_rxbuf: bool, queue_size: int, indirect: bool = True,
                 extra_features: int = 0, dataplane: str = "native") -> None:
        self.port = SocketPort.pair("hover0")
        self.port.host.settimeout(0.05)
        # Room for every frame of a run: a full socket is a congested host, where
        # the device drops (and counts) tx frames; the host side allows for that.
        for sock, opt in ((self.port._ours, socket.SO_SNDBUF), (self.port.host, socket.SO_RCVBUF),
                          (self.port.host, socket.SO_SNDBUF)):
            sock.setsockopt(socket.SOL_SOCKET, opt, 16 << 20)
        self.m = SoftMachine(ram_size=8 << 20)
        self.model = VirtioNet(self.port, mac=MAC, dataplane=dataplane)
        self.dev = self.m.virtio_pci(self.model)
        self.d = VirtioPciDriver(self.m, self.m.pci.add(self.dev))
        wanted = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_CTRL_VQ
                  | 1 << VIRTIO_NET_F_CTRL_RX | event_idx << VIRTIO_F_RING_EVENT_IDX
                  | mrg_rxbuf << VIRTIO_NET_F_MRG_RXBUF | indirect << VIRTIO_F_RING_INDIRECT_DESC | extra_features)
        self.features = self.d.negotiate(wanted)
        assert self.features == wanted, f"features {self.features:#x}, wanted {wanted:#x}"
        self.d.enable_msix()
        self.d.common_write(0x10, 2, 0)
        self.event_idx = event_idx
        self.queues = {q: self.d.setup_queue(q, queue_size if q != CTRL else 16, vector=VECTORS[q],
                                             event_idx=event_idx) for q in (RX, TX, CTRL)}
        # The notify addresses once: kicking through queue_select from two threads
        # would race on the select register, which a guest driver serialises.
        self.notify = {}
        for q in (RX, TX, CTRL):
            self.d.common_write(0x16, 2, q)
            self.notify[q] = self.d._region(2) + self.d.common_read(0x1E, 2) * self.d.notify_mult
        self.msix_table = self._msix_table()
        self.big_rx = False         # the driver side says whether rx frames may span buffers
        self.d.driver_ok()

    def _msix_table(self) -> int:
        table = self.m.cfg_read(self.d.slot, self.d.msix_cap + 4, 4)
        return self.d.bar_addr(table & 7) + (table & ~7)

    def kick(self, q: int) -> None:
        self.m.mmio_write(self.notify[q], 2, q)

    def msis(self, q: int) -> int:
        data = 0x30 + VECTORS[q]
        with self.m.cond:
            return sum(1 for _, d in self.m.msis if d == data)

    def wait_msi(self, q: int, seen: int, timeout: float) -> bool:
        data = 0x30 + VECTORS[q]
        with self.m.cond:
            return self.m.cond.wait_for(lambda: sum(1 for _, d in self.m.msis if d == data) > seen, timeout)

    def native(self) -> tuple[bool, bool]:
        return self.dev.native_queues[RX], self.dev.native_queues[TX]

    def close(self) -> None:
        self.dev.close()
        self.port.close()
        self.m.close()


def wants_kick(dq: DriverQueue, old_avail: int) -> bool:
    """virtqueue_kick_prepare: whether the device asked to hear of chains made
    available since ``old_avail``."""
    if dq.event_idx:
        return vring_need_event(dq.avail_event(), dq.avail_idx, old_avail)
    return dq.device_wants_notify()


class DriverSide(threading.Thread):
    """The guest driver: tx chains of frames ``t`` 0, 1, ... (until ``generating``
    goes False) and rx buffers, every used entry checked; it ends (after
    ``finish``) once its tx chains completed and ``rx_total`` rx frames arrived."""

    def __init__(self, rig: HandoverRig, failures: Failures, odd_chains: bool = False) -> None:
        super().__init__(name="handover-driver", daemon=True)
        self.rig, self.failures = rig, failures
        self.generating = True                     # False: no new tx frames
        self.rx_total: int | None = None           # the rx frames to wait for once the host stopped
        self.tx_posted = 0
        self.tx_done: set[int] = set()
        self.tx_out: dict[int, int] = {}           # head -> seq
        self.rx_out: dict[int, int] = {}           # head -> buffer address
        self.rx_next = 0                           # the next rx frame's seq
        self.mrg = bool(rig.features >> VIRTIO_NET_F_MRG_RXBUF & 1)
        self.indirect = bool(rig.features >> VIRTIO_F_RING_INDIRECT_DESC & 1)
        self.odd_chains = odd_chains
        # (A 4-byte buffer may carry a merged frame's last bytes: big frames only without them.)
        self.big = self.mrg and not odd_chains
        rig.big_rx = self.big
        self.rx_posted = 0
        self.rx_tiny: set[int] = set()
        self.finish = threading.Event()            # no more waiting for interrupts: drain and end
        self.wakeups = 0

    # checks ------------------------------------------------------------------------

    def _check_used_idx(self, q: int, dq: DriverQueue, outstanding: int) -> bool:
        moved = (dq.used_idx() - dq.last_used) & 0xFFFF
        if moved > outstanding:
            self.failures.add(f"queue {q}: used idx {dq.used_idx()} is {moved} past {dq.last_used} with only "
                              f"{outstanding} chains outstanding")
            return False
        return True

    def _collect(self, q: int, dq: DriverQueue, outstanding: dict[int, int]) -> list[tuple[int, int, int]]:
        """Used entries as (head, len, what the head stood for); a head the driver
        does not have outstanding is the bug Linux reports as 'id N is not a head!'."""
        if not self._check_used_idx(q, dq, len(outstanding)):
            return []
        out = []
        before = len(dq.free)
        used = dq.collect()
        # Linux reuses the chain freed last first (its free list is a stack): a head
        # completed twice then likely names a chain posted since.
        freed = dq.free[before:]
        del dq.free[before:]
        dq.free[:0] = freed[::-1]
        for head, length in used:
            if head not in outstanding:
                self.failures.add(f"queue {q}: used id {head} is not a head the driver has outstanding "
                                  f"(outstanding {sorted(outstanding)})")
                return out
            out.append((head, length, outstanding.pop(head)))
        return out

    # the queues ---------------------------------------------------------------------

    def _post_tx(self) -> None:
        rig, dq = self.rig, self.rig.queues[TX]
        old = dq.avail_idx
        while self.generating and len(dq.free) >= 2:
            seq = self.tx_posted
            frame = frame_for("t", seq)
            slot = dq.free[0]
            base = TXBUF + SLOT * slot
            rig.m.memory.write(base, bytes(HDR) + frame)
            # Linux's layouts: the header apart, or header and frame in one buffer;
            # several buffers in an indirect table where INDIRECT_DESC is on.
            bufs = [(base, HDR), (base + HDR, len(frame))] if seq % 3 else [(base, HDR + len(frame))]
            if self.odd_chains and seq % BARE_EVERY == BARE_EVERY - 1:
                # A bare header: the model drops (and counts) it, so the thread hands
                # the pair back at it.
                self.tx_out[dq.add([(base, HDR)], [])] = seq
            elif self.indirect and seq % 3 == 2:
                cut = HDR + len(frame) // 2
                bufs = [(base, HDR), (base + HDR, cut - HDR), (base + cut, HDR + len(frame) - cut)]
                self.tx_out[dq.add(bufs, [], indirect_at=INDIRECT + 64 * slot)] = seq
            else:
                self.tx_out[dq.add(bufs, [])] = seq
            self.tx_posted += 1
        if dq.avail_idx != old and wants_kick(dq, old):
            rig.kick(TX)

    def _post_rx(self) -> None:
        rig, dq = self.rig, self.rig.queues[RX]
        old = dq.avail_idx
        while dq.free:
            slot = dq.free[0]
            base = RXBUF + SLOT * slot
            rig.m.memory.write(base, b"\xee" * HDR)
            self.rx_posted += 1
            tiny = self.odd_chains and self.rx_posted % TINY_EVERY == 0
            # Too small for the header: returned empty by the model, which takes the
            # pair back from the thread for it.
            head = dq.add([], [(base, 4 if tiny else SLOT)])
            self.rx_out[head] = base
            if tiny:
                self.rx_tiny.add(head)
        if dq.avail_idx != old and wants_kick(dq, old):
            rig.kick(RX)

    def _take_tx(self) -> int:
        entries = self._collect(TX, self.rig.queues[TX], self.tx_out)
        for _, _, seq in entries:
            if seq in self.tx_done:
                self.failures.add(f"tx frame {seq} completed twice")
            self.tx_done.add(seq)
        return len(entries)

    def _take_rx(self) -> int:
        mem = self.rig.m.memory
        entries = self._collect(RX, self.rig.queues[RX], self.rx_out)
        i = 0
        while i < len(entries):
            head, length, base = entries[i]
            if head in self.rx_tiny:
                self.rx_tiny.discard(head)
                if length != 0:
                    self.failures.add(f"rx buffer {head} of 4 bytes came back with {length}")
                i += 1
                continue
            if length == 0:
                self.failures.add(f"rx buffer {head} returned empty (frame {self.rx_next} expected)")
                i += 1
                continue
            data = mem.read(base, length)
            # A merged frame's buffers are published together (one used idx update).
            num_buffers = struct.unpack_from("<H", data, 10)[0] if self.mrg else 1
            if not 1 <= num_buffers <= len(entries) - i:
                self.failures.add(f"rx frame {self.rx_next}: num_buffers {num_buffers}, "
                                  f"{len(entries) - i} entries published")
                return len(entries)
            for _, more_length, more_base in entries[i + 1:i + num_buffers]:
                data += mem.read(more_base, more_length)
            frame = data[HDR:]
            want = frame_for("r", self.rx_next, self.big)
            if frame != want:
                got = seq_of(frame) if len(frame) >= 23 and frame[14:15] == b"r" else None
                self.failures.add(f"rx: frame {got} ({len(frame)} bytes, {num_buffers} buffers) where frame "
                                  f"{self.rx_next} ({len(want)} bytes) was due")
            self.rx_next += 1
            i += num_buffers
        return len(entries)

    def _wait_interrupt(self) -> None:
        """Nothing to do: callbacks on (used_event at what we took, as
        virtqueue_enable_cb_prepare), then sleep until an interrupt, unless entries
        came meanwhile (virtqueue_poll)."""
        rig = self.rig
        seen = {q: rig.msis(q) for q in (RX, TX)}
        for q in (RX, TX):
            dq = rig.queues[q]
            if dq.event_idx:
                dq.set_used_event(dq.last_used)
        if any(rig.queues[q].used_idx() != rig.queues[q].last_used for q in (RX, TX)):
            return
        # Only tx chains in flight oblige the device to answer (rx needs frames).
        waiting_tx = bool(self.tx_out)
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline and not self.failures.stop.is_set():
            if any(rig.msis(q) > seen[q] for q in (RX, TX)) or self.finish.is_set() and not waiting_tx:
                self.wakeups += 1
                return
            rig.wait_msi(TX, seen[TX], 0.02)
        if waiting_tx and not self.failures.stop.is_set():
            txq = rig.queues[TX]
            if txq.used_idx() != txq.last_used:
                self.failures.add(f"tx: used idx {txq.used_idx()} moved past used_event {txq.last_used} "
                                  f"and no interrupt came in {PATIENCE} s")
            else:
                self.failures.add(f"tx: {len(self.tx_out)} chains outstanding (avail idx {txq.avail_idx}), "
                                  f"none completed in {PATIENCE} s")

    def run(self) -> None:
        try:
            while not self.failures.stop.is_set():
                self._post_tx()
                self._post_rx()
                did = self._take_tx() + self._take_rx()
                if did:
                    continue
                if self.finish.is_set() and not self.tx_out and self.rx_next >= (self.rx_total or 0):
                    return
                self._wait_interrupt()
        except Exception as e:  # noqa: BLE001 - a bug in the double is a failure too, not a silent thread
            self.failures.add(f"driver thread: {e!r}")


class HostSide(threading.Thread):
    """The other end of the wire: takes the guest's frames and checks their order,
    sends frames ``r`` 0, 1, ... to the guest (until ``generating`` goes False)."""

    def __init__(self, rig: HandoverRig, failures: Failures) -> None:
        super().__init__(name="handover-host", daemon=True)
        self.rig, self.failures = rig, failures
        self.generating = True                     # False: no new rx frames
        self.stopped_sending = threading.Event()   # set once it saw generating go False
        self.rx_sent = 0
        self.tx_next = 0
        self.tx_received = 0
        self.tx_dropped_seen = 0
        self.finish = threading.Event()

    def run(self) -> None:
        host = self.rig.port.host
        try:
            while not self.failures.stop.is_set() and not self.finish.is_set():
                if not self.generating:
                    self.stopped_sending.set()
                else:
                    try:
                        host.send(bytes(HDR) + frame_for("r", self.rx_sent, self.rig.big_rx),
                                  socket.MSG_DONTWAIT)
                        self.rx_sent += 1
                    except (BlockingIOError, socket.timeout):
                        pass        # the device's socket is full: the guest is behind
                try:
                    data = host.recv(4096, 0 if not self.generating else socket.MSG_DONTWAIT)
                except (BlockingIOError, socket.timeout):
                    continue
                frame = data[HDR:]
                seq = seq_of(frame) if len(frame) >= 23 and frame[14:15] == b"t" else None
                if seq is None or seq < self.tx_next or frame != frame_for("t", seq):
                    self.failures.add(f"host: tx frame {seq} ({len(frame)} bytes) where frame {self.tx_next} "
                                      f"or a later one was due")
                    return
                # Frames skipped were dropped by a congested device: counted, checked at the end.
                self.tx_dropped_seen += seq - self.tx_next
                self.tx_next = seq + 1
                self.tx_received += 1
        except Exception as e:  # noqa: BLE001
            self.failures.add(f"host thread: {e!r}")


# -- the hand-overs -------------------------------------------------------------------------

class ControlSide:
    """The driver's control queue, used by the hand-over thread alone."""

    def __init__(self, rig: HandoverRig, failures: Failures) -> None:
        self.rig, self.failures = rig, failures

    def command(self, cls: int, cmd: int, data: bytes) -> None:
        rig, dq = self.rig, self.rig.queues[CTRL]
        mem = rig.m.memory
        mem.write(CTRLBUF, bytes([cls, cmd]))
        mem.write(CTRLBUF + 0x100, data)
        mem.write(CTRLBUF + 0x1000, b"\x77")
        old = dq.avail_idx
        head = dq.add([(CTRLBUF, 2), (CTRLBUF + 0x100, len(data))], [(CTRLBUF + 0x1000, 1)])
        if wants_kick(dq, old):
            rig.kick(CTRL)
        deadline = time.monotonic() + PATIENCE
        used: list[tuple[int, int]] = []
        while not used and time.monotonic() < deadline:
            used = dq.collect()
            if not used:
                time.sleep(0.0005)
        if used != [(head, 1)] or mem.read(CTRLBUF + 0x1000, 1) != b"\x00":
            self.failures.add(f"control command {cls}/{cmd}: used {used}, ack {mem.read(CTRLBUF + 0x1000, 1)!r}")


#: what the hand-over thread may do; each takes the pair back from C at once
ACTIONS = ("promisc_off", "promisc_on", "mac_table", "allmulti", "state", "hold", "mask_rx", "mask_tx")


def run_handovers(rig: HandoverRig, failures: Failures, actions, stop: threading.Event) -> int:
    """Play ``actions`` ((name, delay in ms) pairs) over and over until ``stop``;
    returns how many ran. The filter is back at the default between rounds, so
    the pair may go native again."""
    ctrl = ControlSide(rig, failures)
    done = 0

    def mask(q: int, on: bool) -> None:
        rig.m.mmio_write(rig.msix_table + 16 * VECTORS[q] + 12, 4, int(on))

    while not stop.is_set() and not failures.stop.is_set():
        for name, delay_ms in actions:
            if stop.is_set() or failures.stop.is_set():
                break
            time.sleep(delay_ms / 1000)
            if name == "promisc_off":
                ctrl.command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x00")
            elif name == "promisc_on":
                ctrl.command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x01")
            elif name == "allmulti":
                ctrl.command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, b"\x01")
                ctrl.command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, b"\x00")
            elif name == "mac_table":
                # Linux's rx mode: its multicast groups, then (here) the empty table again.
                groups = b"\x33\x33\x00\x00\x00\x01\x01\x00\x5e\x00\x00\x01"
                ctrl.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET,
                             struct.pack("<I", 0) + struct.pack("<I", 2) + groups)
                ctrl.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, struct.pack("<II", 0, 0))
            elif name == "state":
                rig.dev.state()
                rig.model.state()
            elif name == "hold":
                rig.dev.hold_native(True)
                time.sleep(delay_ms / 2000)
                rig.dev.hold_native(False)
            elif name in ("mask_rx", "mask_tx"):
                q = RX if name == "mask_rx" else TX
                mask(q, True)
                time.sleep(delay_ms / 2000)
                mask(q, False)
            done += 1
        # The default filter again: the pair may go back to its thread.
        ctrl.command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x01")
    return done
