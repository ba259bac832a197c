"""Modern virtio-pci transport (virtio 1.x, section 4.1) for any VirtioDevice.

Layout of the device's BARs:
  BAR0 (64-bit memory, 16 KiB): common cfg @0x0000, ISR @0x1000,
        device cfg @0x2000, notify @0x3000 (queue n at 0x3000 + 4*n)
  BAR2 (32-bit memory, 4 KiB): MSI-X table @0x000, PBA @0x800

Queue notifications are Platform doorbells (ioeventfds under KVM, software
doorbells the translator's vCPU loop rings) on the notify addresses, so a guest
kick never runs device code on a vCPU thread: the transport subscribes the
doorbell eventfds, and the device's own fds (a tap), to the machine's EventLoop,
whose thread runs ``process_queue``. Interrupts go out through the MSI-X vector's
eventfd, or INTx + ISR when MSI-X is disabled.

A device that offers a native data plane (``native_backend()``, virtio-blk on a
raw image) gets each enabled queue served by a C thread (dataplane.py) once the
Python model has run it once: the queue's doorbell then belongs to that thread,
not to the event loop. Whatever the thread leaves to the model (it hands the
queue back), a reset, a device error, a BAR move or ``state()`` stop the thread
first and put its ring indices back into the SplitQueue; the next doorbell the
model serves offers the queue to the thread again.

The device model is a VirtioDevice (device.py) the transport wraps:
``VirtioPciTransport(platform, events, VirtioBlk(driver))``. Anything the guest
does wrong in a queue ends as DEVICE_NEEDS_RESET plus a config-change interrupt
and one logged error; the transport then stops serving the device until the
driver resets it.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from dataclasses import dataclass
from typing import Callable

from ...errors import GuestMemoryError
from ...events import EVENT_READ, EventLoop
from ..pci.device import BAR_MEM32, BAR_MEM64, CAP_ID_VENDOR, PciConfigState, PciDevice
from ..pci.bus import PciBus
from ..pci.msix import NO_VECTOR, MsixCapability, MsixState
from ..platform import Platform
from . import dataplane, netplane
from .device import ServedQueue, VirtioDevice
from .queue import AvailJumpError, QueueError, QueueState, SplitQueue

log = logging.getLogger(__name__)

VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_DEVICE_BASE = 0x1040

# device status bits
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 0x40
FAILED = 0x80

# transport feature bits
VIRTIO_F_RING_INDIRECT_DESC = 28
VIRTIO_F_RING_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

# capability cfg_type
CAP_COMMON = 1
CAP_NOTIFY = 2
CAP_ISR = 3
CAP_DEVICE = 4

COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
REGION_SIZE = 0x1000
BAR0_SIZE = 0x4000
NOTIFY_MULTIPLIER = 4
MSIX_BAR = 2
MSIX_PBA_OFFSET = 0x800

COMMON_CFG_SIZE = 0x38

ISR_QUEUE = 1
ISR_CONFIG = 2

# PCI class per virtio device type, as QEMU reports them (drivers match on the
# device id; the class only shows in lspci). Other types: "unclassified device".
_PCI_CLASS_BY_DEVICE_TYPE = {
    1: 0x020000,   # network: ethernet controller
    2: 0x010000,   # block: mass storage, SCSI
}
_PCI_CLASS_OTHER = 0xFF0000



@dataclass(frozen=True)
class VirtioPciState:
    """The transport's state as a value: the PCI function (config space and BARs,
    the MSI-X table), the common config the driver programmed (status, features,
    selectors, MSI-X vectors), the ISR and every queue. The wrapped device has a
    state of its own."""

    status: int
    device_feature_select: int
    driver_feature_select: int
    driver_features: int
    config_msix_vector: int
    queue_select: int
    config_generation: int
    isr: int
    broken: bool
    queue_vectors: tuple[int, ...]
    queues: tuple[QueueState, ...]
    function: PciConfigState
    msix: MsixState


class VirtioPciTransport(PciDevice):
    """A PCI function carrying one VirtioDevice.

    Arguments:
      platform: the machine's Platform (memory, MSI eventfds, doorbells).
      events: the machine's EventLoop; doorbells and the device's fds are served
        on its thread.
      device: the VirtioDevice to carry; its ``name`` names the function.
    Plug into the bus with ``pci_bus.add(transport)``; ``reset()`` on machine
    reset, ``close()`` on shutdown (the device's backend is its owner's to close).
    """

    def __init__(self, platform: Platform, events: EventLoop, device: VirtioDevice) -> None:
        sizes = tuple(device.queue_max_sizes)
        name = device.name
        if not 1 <= len(sizes) <= REGION_SIZE // NOTIFY_MULTIPLIER:
            raise ValueError(f"{name}: {len(sizes)} queues is not supported")
        class_code = _PCI_CLASS_BY_DEVICE_TYPE.get(device.device_type, _PCI_CLASS_OTHER)
        super().__init__(VIRTIO_PCI_VENDOR, VIRTIO_PCI_DEVICE_BASE + device.device_type, class_code,
                         revision=1, subsystem_vendor_id=VIRTIO_PCI_VENDOR, subsystem_id=0x1100,
                         interrupt_pin=1, name=name)
        self.device = device
        self.platform = platform
        self.memory = platform.memory
        self.events = events
        self.num_queues = len(sizes)
        self.queues = [SplitQueue(self.memory, size) for size in sizes]
        self.add_bar(0, BAR0_SIZE, BAR_MEM64)
        self.add_bar(MSIX_BAR, 0x1000, BAR_MEM32)
        for cfg_type, off, length in ((CAP_COMMON, COMMON_OFFSET, COMMON_CFG_SIZE), (CAP_ISR, ISR_OFFSET, 1),
                                      (CAP_DEVICE, DEVICE_OFFSET, REGION_SIZE)):
            self.add_capability(CAP_ID_VENDOR, struct.pack("<BBBBxxII", 16, cfg_type, 0, 0, off, length))
        self.add_capability(CAP_ID_VENDOR, struct.pack("<BBBBxxIII", 20, CAP_NOTIFY, 0, 0, NOTIFY_OFFSET,
                                                      NOTIFY_MULTIPLIER * self.num_queues, NOTIFY_MULTIPLIER))
        self.msix = MsixCapability(self, platform, self.num_queues + 1, MSIX_BAR, 0, MSIX_PBA_OFFSET)
        self.msix.on_change = self._interrupt_route_changed
        # _lock serialises the driver's config accesses (vCPU threads), reset and
        # close (other threads) and the device's callbacks (the event loop thread),
        # so a device never runs a request while the driver reconfigures it.
        # _isr_lock is taken alone: reading the ISR in an INTx handler must not wait
        # for a request in progress.
        self._lock = threading.RLock()
        self._isr_lock = threading.Lock()
        self._doorbells: list[int | None] = [None] * self.num_queues
        self._notify_base: int | None = None
        self._serving = False
        self._device_fds: list[int] = []
        # A plug-in may implement VirtioDevice without deriving from it, and so
        # without the native plane's methods (device.py): it is served in Python.
        self._asks_native_plane = VirtioDevice in type(device).__mro__
        # The queues a native data plane thread serves now (their doorbells are its).
        self._native: list[ServedQueue | netplane.NativeNetPair | None] = [None] * self.num_queues
        self._native_regions: dataplane.RegionPointers | None = None
        self._native_refused = False
        self._native_held = False
        self._native_completed = 0
        self._native_deferred = 0
        self._native_ring_ops = 0
        self._native_ring_enters = 0
        self._native_interrupts = 0
        self._native_interrupts_coalesced = 0
        self._native_interrupt_wakes = 0
        # INTx as the blk threads see it (dataplane.IntxPending): cleared with every ISR read
        self._intx_pending = dataplane.IntxPending() if dataplane.available() else None
        self._reset_state()

    # state ----------------------------------------------------------------------

    def _reset_state(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = NO_VECTOR
        self.queue_select = 0
        self.config_generation = 0
        self.isr = 0
        # Whether _interrupt raised INTx since the driver last read the ISR.
        self._intx_raised = False
        if self._intx_pending is not None:
            self._intx_pending.clear()
        self.broken = False
        for q in self.queues:
            q.reset()
        self.queue_vector = [NO_VECTOR] * self.num_queues
        self._warned: set[str] = set()

    @property
    def queue_enable(self) -> list[bool]:
        return [q.ready for q in self.queues]

    @property
    def serving(self) -> bool:
        """Whether the event loop runs the device for this transport now (from
        DRIVER_OK until a reset, FAILED or a device error)."""
        return self._serving

    def state(self) -> VirtioPciState:
        with self._lock:
            # The ring indices live in the native threads while they run.
            taken_back = [q for q in range(self.num_queues) if self._native[q] is not None]
            for q in taken_back:
                self._stop_native(q, rewatch=True)
            for q in taken_back:
                self.events.call_soon(lambda q=q: self._run_queue(q))
            return VirtioPciState(
                status=self.status, device_feature_select=self.device_feature_select,
                driver_feature_select=self.driver_feature_select, driver_features=self.driver_features,
                config_msix_vector=self.config_msix_vector, queue_select=self.queue_select,
                config_generation=self.config_generation, isr=self.isr, broken=self.broken,
                queue_vectors=tuple(self.queue_vector), queues=tuple(q.state() for q in self.queues),
                function=PciDevice.state(self), msix=self.msix.state())

    @classmethod
    def from_state(cls, state: VirtioPciState, platform: Platform, events: EventLoop,
                   device: VirtioDevice, pci_bus: PciBus) -> "VirtioPciTransport":
        """A transport in ``state`` carrying ``device`` (restored by its own
        ``from_state``), plugged into ``pci_bus``: plugging assigns BARs as firmware
        would, so the saved config space is taken after it. A device the driver had
        started is activated again. Raises ValueError (StateError, or QueueError for
        rings outside ``platform.memory``) if the state does not fit the device."""
        transport = cls(platform, events, device)
        pci_bus.add(transport)
        transport.restore(state)
        return transport

    def restore(self, state: VirtioPciState) -> None:  # type: ignore[override]
        """Take over ``state`` on a transport built with the same device and plugged
        into a bus: the PCI function first (its config space and MSI-X table), then
        the virtio part."""
        if not isinstance(state, VirtioPciState):
            raise ValueError(f"{self.name}: not a virtio-pci state: {type(state).__name__}")
        sizes = tuple(q.max_size for q in state.queues)
        if sizes != tuple(self.device.queue_max_sizes) or len(state.queue_vectors) != len(sizes):
            raise ValueError(f"{self.device.name}: saved queues {sizes} do not match the device's "
                             f"{tuple(self.device.queue_max_sizes)}")
        PciDevice.restore(self, state.function)
        self.msix.restore(state.msix)
        with self._lock:
            for q in range(self.num_queues):
                if self._native[q] is not None:
                    self._stop_native(q, rewatch=True)
            self.queues = [SplitQueue.from_state(self.memory, q) for q in state.queues]
            self.queue_vector = list(state.queue_vectors)
            self.status = state.status
            self.device_feature_select = state.device_feature_select
            self.driver_feature_select = state.driver_feature_select
            self.driver_features = state.driver_features
            self.config_msix_vector = state.config_msix_vector
            self.queue_select = state.queue_select
            self.config_generation = state.config_generation
            self.isr = state.isr
            self._intx_raised = False     # the line is raised anew with the next interrupt
            if self._intx_pending is not None:
                self._intx_pending.clear()
            self.broken = state.broken
            if state.status & FEATURES_OK:
                self.device.ack_features(state.driver_features)
            if state.status & DRIVER_OK and not state.broken:
                self._activate_device()
                if state.status & FAILED:
                    self._stop_serving()

    def _warn(self, fmt: str, *args) -> None:
        """A guest protocol slip: logged once per kind until the next reset, so a
        hostile driver cannot flood the log."""
        if fmt not in self._warned:
            self._warned.add(fmt)
            log.warning("%s: " + fmt, self.name, *args)

    def all_features(self) -> int:
        return (self.device.device_features() | 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_RING_INDIRECT_DESC
                | 1 << VIRTIO_F_RING_EVENT_IDX)

    def negotiated(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1)

    # BAR access ------------------------------------------------------------------

    def bar_read(self, index: int, offset: int, size: int) -> int:
        if index == MSIX_BAR:
            return self.msix.read(offset, size)
        if index != 0 or size not in (1, 2, 4, 8):
            return (1 << (8 * size)) - 1
        if offset < COMMON_OFFSET + COMMON_CFG_SIZE:
            with self._lock:
                return self._common_read(offset, size)
        if offset == ISR_OFFSET and size == 1:
            with self._isr_lock:
                value, self.isr = self.isr, 0
                self._intx_raised = False
                # before the value goes back: the driver's look at the used ring
                # comes after it, so a thread that still saw it set published first
                if self._intx_pending is not None:
                    self._intx_pending.clear()
                if self.pci_bus is not None:
                    self.pci_bus.set_intx(self, False)
                return value
        if DEVICE_OFFSET <= offset < DEVICE_OFFSET + REGION_SIZE:
            o = offset - DEVICE_OFFSET
            cfg = self.device.config_bytes()
            if o + size > len(cfg):
                return 0
            return int.from_bytes(cfg[o:o + size], "little")
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index == MSIX_BAR:
            self.msix.write(offset, size, value)
            return
        if index != 0 or size not in (1, 2, 4, 8):
            return
        value &= (1 << (8 * size)) - 1
        if offset < COMMON_OFFSET + COMMON_CFG_SIZE:
            with self._lock:
                self._common_write(offset, size, value)
        elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + REGION_SIZE:
            with self._lock:
                self.device.write_config(offset - DEVICE_OFFSET, size, value)
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_MULTIPLIER * self.num_queues:
            # Reached only when no doorbell took the write (e.g. an odd access size).
            self._soft_kick((offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER)

    def _soft_kick(self, q: int) -> None:
        fd = self._doorbells[q]
        if fd is not None:
            os.eventfd_write(fd, 1)
        else:
            self.events.call_soon(lambda: self._run_queue(q))

    # common configuration ---------------------------------------------------------

    def _common_bytes(self) -> bytes:
        qs = self.queue_select
        if qs < self.num_queues:
            q = self.queues[qs]
            qfields = (q.size, self.queue_vector[qs], int(q.ready), qs, q.desc_addr, q.avail_addr, q.used_addr)
        else:
            qfields = (0, NO_VECTOR, 0, 0, 0, 0, 0)
        sel = self.device_feature_select
        feat = (self.all_features() >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        dsel = self.driver_feature_select
        dfeat = (self.driver_features >> (32 * dsel)) & 0xFFFFFFFF if dsel < 2 else 0
        return struct.pack("<IIIIHHBBHHHHHQQQ", sel, feat, dsel, dfeat, self.config_msix_vector,
                           self.num_queues, self.status, self.config_generation & 0xFF, qs, *qfields)

    def _common_read(self, offset: int, size: int) -> int:
        data = self._common_bytes()
        if offset + size > len(data):
            return 0
        return int.from_bytes(data[offset:offset + size], "little")

    def _common_write(self, offset: int, size: int, value: int) -> None:
        qs = self.queue_select
        qvalid = qs < self.num_queues
        if offset == 0x00 and size == 4:
            self.device_feature_select = value
        elif offset == 0x08 and size == 4:
            self.driver_feature_select = value
        elif offset == 0x0C and size == 4:
            sel = self.driver_feature_select
            if self.status & FEATURES_OK:
                self._warn("driver features written after FEATURES_OK; ignored")
            elif sel < 2:
                mask = 0xFFFFFFFF << (32 * sel)
                self.driver_features = (self.driver_features & ~mask) | ((value & 0xFFFFFFFF) << (32 * sel))
        elif offset == 0x10 and size == 2:
            self.config_msix_vector = value if value < self.msix.num_vectors else NO_VECTOR
        elif offset == 0x14 and size == 1:
            self._write_status(value)
        elif offset == 0x16 and size == 2:
            self.queue_select = value
        elif qvalid and offset in (0x18, 0x1A, 0x1C) and size == 2:
            if offset == 0x1A:
                self.queue_vector[qs] = value if value < self.msix.num_vectors else NO_VECTOR
                self._interrupt_route_changed()
            elif self.queues[qs].ready:
                self._warn("queue %d reconfigured while enabled; ignored", qs)
            elif offset == 0x18:
                self.queues[qs].size = value
            elif value == 1:
                self._enable_queue(qs)
        elif qvalid and 0x20 <= offset < 0x38 and (size == 8 and offset % 8 == 0 or size == 4 and offset % 4 == 0):
            if self.queues[qs].ready:
                self._warn("queue %d address changed while enabled; ignored", qs)
                return
            q = self.queues[qs]
            field = ("desc_addr", "avail_addr", "used_addr")[(offset - 0x20) // 8]
            old = getattr(q, field)
            if size == 8:
                new = value
            elif offset % 8 == 0:
                new = (old & ~0xFFFFFFFF) | (value & 0xFFFFFFFF)
            else:
                new = (old & 0xFFFFFFFF) | ((value & 0xFFFFFFFF) << 32)
            setattr(q, field, new)
        else:
            log.debug("%s: common cfg write %#x size %d ignored", self.name, offset, size)

    def _enable_queue(self, qs: int) -> None:
        if not self.status & FEATURES_OK or self.status & DRIVER_OK:
            self._warn("queue %d enabled outside FEATURES_OK..DRIVER_OK; ignored", qs)
            return
        try:
            self.queues[qs].activate(event_idx=self.negotiated(VIRTIO_F_RING_EVENT_IDX),
                                     indirect=self.negotiated(VIRTIO_F_RING_INDIRECT_DESC))
        except QueueError as e:
            self.device_error(f"queue {qs}: {e}")

    # status state machine ---------------------------------------------------------------

    def _write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        value &= ~DEVICE_NEEDS_RESET
        old = self.status
        if old & ~value & ~DEVICE_NEEDS_RESET:
            self._warn("driver cleared status bits %#x without a reset; ignored", old & ~value)
            return
        new_bits = value & ~old
        if new_bits & FEATURES_OK:
            missing = self.driver_features & ~self.all_features()
            if missing or not self.negotiated(VIRTIO_F_VERSION_1):
                self._warn("features %#x refused (%s)", self.driver_features,
                           f"unknown bits {missing:#x}" if missing else "VIRTIO_F_VERSION_1 missing")
                value &= ~FEATURES_OK
                new_bits &= ~FEATURES_OK
            else:
                self.device.ack_features(self.driver_features)
        self.status = value | (self.status & DEVICE_NEEDS_RESET)
        if new_bits & DRIVER_OK:
            if not value & FEATURES_OK:
                self.device_error("DRIVER_OK without FEATURES_OK")
                return
            if not self.broken:
                self._activate_device()
        if new_bits & FAILED:
            self._stop_serving()

    def _activate_device(self) -> None:
        try:
            self.device.activate(self.queues, self.memory, self)
        except (QueueError, GuestMemoryError) as e:
            self.device_error(f"activation failed: {e}")
            return
        except Exception as e:  # a backend that cannot start is a device error, not a crash
            log.exception("%s: activation failed", self.name)
            self.device_error(f"activation failed: {e}")
            return
        self._start_serving()

    def reset(self) -> None:
        """Device reset (status 0): stop serving, reset the device, forget queues and features."""
        with self._lock:
            self._stop_serving()
            # The device resets even if it never started: it may hold acked features.
            self.device.reset()
            self._reset_state()
            if self.pci_bus is not None:
                self.pci_bus.set_intx(self, False)

    # errors and interrupts (the device's VirtioTransport) ----------------------------------

    def device_error(self, message: str) -> None:
        """The guest broke the protocol: NEEDS_RESET, config interrupt, one error log line."""
        with self._lock:
            if self.broken:
                return
            # status before broken: whoever sees broken also sees NEEDS_RESET
            self.status |= DEVICE_NEEDS_RESET
            self.broken = True
            log.error("%s: device needs reset: %s", self.name, message)
            # A level-triggered fd (a tap with frames) would wake the loop forever.
            self._stop_serving()
            if self.status & DRIVER_OK:
                self.config_changed()

    def config_changed(self) -> None:
        with self._lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
            self._interrupt(self.config_msix_vector, ISR_CONFIG)

    def signal_used(self, queue_index: int) -> None:
        """Interrupt the driver for queue ``queue_index`` if it wants one."""
        if self.queues[queue_index].needs_notification():
            self._interrupt(self.queue_vector[queue_index], ISR_QUEUE)

    def set_fd_events(self, fd: int, events: int) -> None:
        if fd in self._device_fds:
            self.events.modify(fd, events)

    def _interrupt(self, vector: int, isr_bit: int) -> None:
        if self.msix.enabled:
            if vector != NO_VECTOR:
                self.msix.notify(vector)
            return
        with self._isr_lock:
            self.isr |= isr_bit
            # INTx is a level the driver lowers by reading the ISR: while it is up,
            # raising it again is an ioctl (and a vCPU kick) per completion for
            # nothing; QEMU's pci_set_irq skips an unchanged level too.
            if self._intx_raised or self.pci_bus is None:
                return
            self._intx_raised = True
            self.pci_bus.set_intx(self, True)

    # doorbells ------------------------------------------------------------------------

    def bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        if index != 0:
            return
        with self._lock:
            self._drop_doorbells()
            self._notify_base = new
            if new is not None:
                for q in range(self.num_queues):
                    # size 0: any access width, no datamatch (VIRTIO_F_NOTIFICATION_DATA is not offered)
                    fd = self.platform.add_doorbell(new + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * q, 0, None, False)
                    self._doorbells[q] = fd
                    if self._serving:
                        self._watch_doorbell(q, fd)
            if self._serving:
                # A kick written while no doorbell was there must not be lost.
                self._kick_enabled_queues()

    def _drop_doorbells(self) -> None:
        for q, fd in enumerate(self._doorbells):
            if self._native[q] is not None:
                self._stop_native(q, rewatch=False)
            elif fd is not None and self._serving:
                self.events.unsubscribe(fd)
            if fd is not None:
                self.platform.remove_doorbell(fd)
                self._doorbells[q] = None

    def notify_address(self, q: int) -> int | None:
        return None if self._notify_base is None else self._notify_base + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * q

    # serving the device on the event loop ------------------------------------------------

    def _start_serving(self) -> None:
        if self._serving:
            return
        self._serving = True
        for q, fd in enumerate(self._doorbells):
            if fd is not None:
                self._watch_doorbell(q, fd)
        self._device_fds = []
        for watch in self.device.fd_watches():
            self.events.subscribe(watch.fd, watch.events, self._device_fd_callback(watch.on_ready))
            self._device_fds.append(watch.fd)
        # Buffers made available before DRIVER_OK (or during a re-aim) get a look now.
        self._kick_enabled_queues()

    def _stop_serving(self) -> None:
        if not self._serving:
            return
        self._serving = False
        for q, fd in enumerate(self._doorbells):
            if self._native[q] is not None:
                self._stop_native(q, rewatch=False)
            elif fd is not None:
                self.events.unsubscribe(fd)
        for fd in self._device_fds:
            self.events.unsubscribe(fd)
        self._device_fds = []

    def _watch_doorbell(self, q: int, fd: int) -> None:
        self.events.subscribe(fd, EVENT_READ, lambda _ready: self._doorbell_rang(q, fd))

    def _kick_enabled_queues(self) -> None:
        def run_enabled() -> None:
            for q in range(self.num_queues):
                self._run_queue(q)
        self.events.call_soon(run_enabled)

    def _doorbell_rang(self, q: int, fd: int) -> None:
        with self._lock:
            # A doorbell dropped by a BAR move may still be dispatched once (its fd
            # number may already belong to someone else's eventfd), and one handed
            # to a native thread too: that kick is the thread's to read.
            if self._doorbells[q] != fd:
                return
            if self._native[q] is not None:
                # Watched again though a thread owns it: a stop on another thread
                # queued this watch, and the loop started the next thread before
                # it ran. Left here, the level-triggered kick would bring the loop
                # back at once, again and again, until the thread drained it.
                self.events.unsubscribe(fd)
                return
            _drain(fd)
            self._run_queue(q)

    def _run_queue(self, q: int) -> None:
        with self._lock:
            if (not self._serving or self.broken or not self.queues[q].ready or not self.status & DRIVER_OK
                    or self._native[q] is not None):
                return
            self._guarded(self.device.process_queue, q)
            self._start_native(q)

    # native data plane ------------------------------------------------------------------

    def _start_native(self, q: int) -> None:
        """Hand queue ``q`` to a native thread if the device offers one now (event
        loop thread, under _lock, right after the model served the queue)."""
        fd = self._doorbells[q]
        # The translator drops translated code on device writes through
        # memory.dma_listeners, which a C thread (or the kernel) would bypass.
        if (not self._asks_native_plane or self._native_refused or self._native_held or fd is None
                or self.memory.dma_listeners or not self._serving or self.broken or not self.queues[q].active):
            return
        backend = self.device.native_backend()
        if isinstance(backend, netplane.NetPairs):
            self._start_native_pair(q, backend)
            return
        if backend is None:
            # The model keeps every queue its offer covers now (a request waits
            # for `cont`, a guest's rx filter): the other queues' threads must not
            # run on past it. Rings a device's own plane serves stay where they are.
            for other, native in enumerate(self._native):
                if isinstance(native, (dataplane.NativeQueue, netplane.NativeNetPair)):
                    self._stop_native(other, rewatch=True)
            # A device whose queues a plane of its own serves (virtio-net's vhost
            # rings): it decides per queue, None keeps the queue here.
            try:
                native = self.device.native_queue(q, self.queues[q], fd, self._queue_irq_route(q))
            except OSError as e:
                self._native_refused = True
                log.warning("%s: queue %d stays in Python: %s", self.name, q, e)
                return
            if native is not None:
                self._adopt_native(q, fd, native)
            return
        try:
            if self._native_regions is None:
                self._native_regions = dataplane.RegionPointers(self.memory)
            native = dataplane.NativeQueue(self._native_regions, self.queues[q], backend, fd,
                                           irq_fd=self._queue_irq_route(q), index=q,
                                           intx_pending=self._queue_intx_pending(q))
        except (OSError, ValueError) as e:
            self._native_refused = True
            log.warning("%s: native data plane unavailable, requests stay in Python: %s", self.name, e)
            return
        self._adopt_native(q, fd, native)

    def _adopt_native(self, q: int, fd: int, native: ServedQueue) -> None:
        """Queue ``q``'s doorbell ``fd`` belongs to ``native`` from now on; its
        interrupt and hand-back eventfds are watched."""
        self.events.unsubscribe(fd)
        self._native[q] = native
        log.debug("%s: queue %d served by a native thread", self.name, q)
        self.events.subscribe(native.call_fd, EVENT_READ, lambda _r: self._native_interrupt(q, native))
        self.events.subscribe(native.handback_fd, EVENT_READ, lambda _r: self._native_handback(q, native))

    def _stop_native(self, q: int, rewatch: bool) -> dataplane.StopInfo:
        """Stop queue ``q``'s thread at a request boundary and take its indices back;
        ``rewatch``: the event loop serves the doorbell again."""
        native = self._native[q]
        if native is None:      # a pair's thread, stopped through its other queue
            return dataplane.StopInfo(handed_back=False, completed=0, deferred=0)
        if isinstance(native, netplane.NativeNetPair):
            info = self._stop_native_pair(native, rewatch)
            return dataplane.StopInfo(handed_back=info.handed_back, completed=info.completed, deferred=0)
        self._native[q] = None
        info = native.stop()
        self._native_completed += info.completed
        self._native_deferred += info.deferred
        self._native_ring_ops += info.ring_ops
        self._native_ring_enters += info.ring_enters
        self._native_interrupts += info.interrupts
        self._native_interrupts_coalesced += info.interrupts_coalesced
        # An interrupt the thread asked for that the loop has not delivered yet.
        if native.take_interrupt():
            self._interrupt(self.queue_vector[q], ISR_QUEUE)
        self.events.unsubscribe(native.call_fd, close=True)
        self.events.unsubscribe(native.handback_fd, close=True)
        fd = self._doorbells[q]
        if rewatch and self._serving and fd is not None:
            # A kick the thread had not read yet is still counted in the eventfd,
            # so the loop sees it at once.
            self._watch_doorbell(q, fd)
        return info

    def _interrupt_route_changed(self) -> None:
        """MSI-X was switched, a vector (un)masked or re-aimed, a queue's vector
        changed: a thread raising a vector's eventfd itself restarts with the route
        that applies now (a vCPU thread, after the guest's write)."""
        with self._lock:
            for q, native in enumerate(self._native):
                if isinstance(native, netplane.NativeNetPair):
                    routes = tuple(self._queue_irq_route(i) for i in native.queue_indices)
                    if native.irq_fds != routes:
                        self._stop_native(q, rewatch=True)
                elif native is not None and (native.irq_fd != self._queue_irq_route(q)
                                             or native.intx_pending is not self._queue_intx_pending(q)):
                    self._stop_native(q, rewatch=True)
                    self.events.call_soon(lambda q=q: self._run_queue(q))

    def _native_interrupt(self, q: int, native: ServedQueue) -> None:
        if self._native[q] is native and native.take_interrupt():
            self._native_interrupt_wakes += 1
            self._interrupt(self.queue_vector[q], ISR_QUEUE)

    def _native_handback(self, q: int, native: ServedQueue) -> None:
        """The thread stopped before a request only the model may answer: the model
        takes the queue from there (and may give it back to a new thread)."""
        with self._lock:
            if self._native[q] is not native:
                return
            info = self._stop_native(q, rewatch=True)
            log.debug("%s: queue %d handed back to the model after %d requests", self.name, q, info.completed)
            self._run_queue(q)

    # a native rx/tx pair (virtio-net, netplane.py): one thread, both queues' slots

    def _start_native_pair(self, q: int, backend: netplane.NetPairs) -> None:
        self._refresh_native_pairs(backend)
        pair = backend.pair_of(q)
        if pair is None:
            return      # the control queue stays the model's
        indices = (pair.rx_queue, pair.tx_queue)
        if any(self._native[i] is not None or self._doorbells[i] is None or not self.queues[i].active
               for i in indices):
            return      # the other queue of the pair is not running yet: its own run starts the pair
        try:
            if self._native_regions is None:
                self._native_regions = dataplane.RegionPointers(self.memory)
            native = netplane.NativeNetPair(
                self._native_regions, self.queues[pair.rx_queue], self.queues[pair.tx_queue], pair,
                kick_fds=(self._doorbells[pair.rx_queue], self._doorbells[pair.tx_queue]),
                irq_fds=tuple(self._queue_irq_route(i) for i in indices))
        except (OSError, ValueError) as e:
            self._native_refused = True
            log.warning("%s: native data plane unavailable, frames stay in Python: %s", self.name, e)
            return
        for i in indices:
            self.events.unsubscribe(self._doorbells[i])
            self._native[i] = native
        self.device.native_started(pair, native.counts)
        log.debug("%s: queues %d and %d served by a native thread", self.name, *indices)
        for i, fd in zip(indices, native.call_fds):
            self.events.subscribe(fd, EVENT_READ, lambda _r, i=i: self._native_pair_interrupt(i, native))
        self.events.subscribe(native.handback_fd, EVENT_READ, lambda _r: self._native_pair_handback(native))

    def native_offer_changed(self) -> None:
        with self._lock:
            backend = self.device.native_backend()
            if isinstance(backend, netplane.NetPairs):
                self._refresh_native_pairs(backend)
            elif backend is None:
                for index, native in enumerate(self._native):
                    if isinstance(native, netplane.NativeNetPair):
                        self._stop_native(index, rewatch=True)

    def _refresh_native_pairs(self, backend: netplane.NetPairs) -> None:
        """Running pairs follow the device's offer now: a new receive filter (the
        control queue just ran) goes to the thread as it runs; a pair no longer
        offered, or offered otherwise, is taken back."""
        for native in {n for n in self._native if isinstance(n, netplane.NativeNetPair)}:
            offer = backend.pair_of(native.backend.rx_queue)
            if offer == native.backend:
                continue
            if offer is not None and native.backend.same_but_filter(offer):
                native.set_filter(offer)
            else:
                self._stop_native(native.queue_indices[0], rewatch=True)

    def _queue_intx_pending(self, q: int) -> "dataplane.IntxPending | None":
        """What a blk thread on queue ``q`` shares of the INTx line: the flag that
        spares the event loop a raise of a raised line, where INTx is the route
        (MSI-X off); cleared here, as a thread may start after MSI-X was on and
        off again (the flag set then means nothing now: at worst an interrupt more)."""
        if self._intx_pending is None or self.msix.enabled or self._queue_irq_route(q) is not None:
            return None
        with self._isr_lock:
            if not self._intx_raised:
                self._intx_pending.clear()
        return self._intx_pending

    def _queue_irq_route(self, q: int) -> int | None:
        """Queue ``q``'s interrupt as a plane raises it itself (a blk thread, a net pair,
        the kernel's vhost): the vector's eventfd; NO_INTERRUPT under MSI-X without a
        vector, so nothing wakes the event loop for an interrupt that goes nowhere (a
        polling driver's queues; QEMU's vhost then has no call either); None where the
        transport raises it (INTx, a masked vector)."""
        fd = self.msix.unmasked_fd(self.queue_vector[q])
        if fd is None and self.msix.enabled and self.queue_vector[q] == NO_VECTOR:
            return netplane.NO_INTERRUPT      # what _interrupt does for it: nothing
        return fd

    def _stop_native_pair(self, native: netplane.NativeNetPair, rewatch: bool) -> netplane.NetStopInfo:
        for i in native.queue_indices:
            self._native[i] = None
        info = native.stop()
        self._native_completed += info.completed
        self.device.native_stopped(native.backend, info)
        for i in native.queue_indices:
            if native.take_interrupt(i):
                self._interrupt(self.queue_vector[i], ISR_QUEUE)
        for fd in (*native.call_fds, native.handback_fd):
            self.events.unsubscribe(fd, close=True)
        if info.tap_errno:
            # The model logs the tap's error when it meets it; a thread started again
            # would only hand the pair back at once.
            self._native_refused = True
            log.warning("%s: tap error (%s): frames stay in Python", self.name, os.strerror(info.tap_errno))
        if rewatch and self._serving:
            for i in native.queue_indices:
                if self._doorbells[i] is not None:
                    self._watch_doorbell(i, self._doorbells[i])
            # The model polls the tap again from the rx queue's run.
            first = info.handback_queue if info.handback_queue is not None else native.queue_indices[0]
            for i in (first, *(i for i in native.queue_indices if i != first)):
                self.events.call_soon(lambda i=i: self._run_queue(i))
        return info

    def _native_pair_interrupt(self, q: int, native: netplane.NativeNetPair) -> None:
        if self._native[q] is native and native.take_interrupt(q):
            self._interrupt(self.queue_vector[q], ISR_QUEUE)

    def _native_pair_handback(self, native: netplane.NativeNetPair) -> None:
        """The thread stopped before a chain only the model may handle: the model
        takes both queues from there (their runs may start a new thread)."""
        with self._lock:
            if self._native[native.queue_indices[0]] is not native:
                return
            info = self._stop_native_pair(native, rewatch=True)
            log.debug("%s: queue %s handed back to the model after %d frames", self.name, info.handback_queue,
                      info.completed)

    def hold_native(self, held: bool) -> None:
        """The VM stopped (``held``) or runs again: while it is stopped the event loop
        serves the queues, as it does for a device without a data plane."""
        with self._lock:
            self._native_held = held
            if held:
                for q in range(self.num_queues):
                    if self._native[q] is not None:
                        self._stop_native(q, rewatch=True)
                        self.events.call_soon(lambda q=q: self._run_queue(q))
            elif self._serving:
                self._kick_enabled_queues()

    @property
    def native_requests(self) -> int:
        """Requests native threads answered, counted when each stopped."""
        return self._native_completed

    @property
    def native_deferred_reads(self) -> int:
        """Of those, reads the threads' workers did (not in the page cache)."""
        return self._native_deferred

    @property
    def native_ring_ops(self) -> int:
        """Of those, reads and writes the threads did through io_uring."""
        return self._native_ring_ops

    @property
    def native_ring_enters(self) -> int:
        """The io_uring_enter calls the stopped threads made (submissions and waits)."""
        return self._native_ring_enters

    @property
    def native_interrupt_wakes(self) -> int:
        """How often the event loop raised an interrupt a thread asked for through
        its call eventfd."""
        return self._native_interrupt_wakes

    @property
    def native_interrupts(self) -> tuple[int, int]:
        """The stopped blk threads' call eventfd writes, and the interrupts the
        driver wanted that an INTx level already up covered."""
        return self._native_interrupts, self._native_interrupts_coalesced

    @property
    def native_queues(self) -> tuple[bool, ...]:
        """Which queues a native data plane thread serves now."""
        return tuple(n is not None for n in self._native)

    def _device_fd_callback(self, on_ready: Callable[[int], None]) -> Callable[[int], None]:
        def ready(events: int) -> None:
            with self._lock:
                if self._serving and not self.broken:
                    self._guarded(on_ready, events)
        return ready

    def _guarded(self, fn, *args) -> None:
        try:
            fn(*args)
        except AvailJumpError as e:
            self.device_error(f"{e}; {self._queue_owner(e.queue)}")
        except (QueueError, GuestMemoryError) as e:
            self.device_error(str(e))
        except Exception as e:  # a device bug must not reach the event loop as a traceback per kick
            log.exception("%s: internal error", self.name)
            self.device_error(f"internal error: {e!r}")

    def _queue_owner(self, queue: SplitQueue) -> str:
        """Whose ``queue`` is, for an avail idx jump's error line (error path only): a
        queue object this transport no longer holds, or one another queue shares a
        ring with, names the stale cursor; else who serves it now."""
        index = next((i for i, q in enumerate(self.queues) if q is queue), None)
        if index is None:
            return "that queue object is not one this transport holds now (a stale copy)"
        sharing = [i for i, q in enumerate(self.queues) if i != index and q.ready
                   and {q.avail_addr, q.used_addr} & {queue.avail_addr, queue.used_addr}]
        native = self._native[index]
        owner = "the model" if native is None else f"a {type(native).__name__}"
        return (f"queue {index}, served by {owner}"
                + (f"; queues {sharing} are programmed on the same ring" if sharing else ""))

    def close(self) -> None:
        """Machine shutdown: stop serving, drop doorbells and MSI eventfds."""
        self.reset()
        with self._lock:
            self._drop_doorbells()
        self.msix.close()


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        pass
