"""Modern virtio-pci transport (virtio 1.x, section 4.1) and the per-device I/O thread.

Layout of the device's BARs:
  BAR0 (64-bit memory, 16 KiB): common cfg @0x0000, ISR @0x1000,
        device cfg @0x2000, notify @0x3000 (queue n at 0x3000 + 4*n)
  BAR2 (32-bit memory, 4 KiB): MSI-X table @0x000, PBA @0x800

Queue notifications are Platform doorbells (ioeventfds under KVM) on the notify
addresses, so a guest kick never runs device code on the vCPU thread: the I/O
thread polls the doorbell eventfds and runs ``process_queue``. Interrupts go out
through the MSI-X vector's eventfd, or INTx + ISR when MSI-X is disabled.

A device model subclasses VirtioPciDevice and provides DEVICE_TYPE, the feature
bits, the config space and ``process_queue``. Anything the guest does wrong in a
queue ends as DEVICE_NEEDS_RESET plus a config-change interrupt and one logged
error; the device then ignores its queues until the driver resets it.
"""

from __future__ import annotations

import logging
import os
import select
import struct
import threading

from ...errors import GuestMemoryError
from ..pci.device import BAR_MEM32, BAR_MEM64, CAP_ID_VENDOR, PciDevice
from ..pci.msix import NO_VECTOR, MsixCapability
from .queue import QueueError, SplitQueue

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


class VirtioPciDevice(PciDevice):
    """Base class of virtio devices on PCI. Subclasses set:

    DEVICE_TYPE (virtio device id), CLASS_CODE, ``num_queues`` and ``queue_max_size``
    (set before calling this constructor), and override ``device_features``,
    ``config_bytes``/``device_config_write``, ``process_queue``, optionally ``activate``,
    ``deactivate``, ``extra_poll`` and ``on_fd_ready``.
    """

    DEVICE_TYPE = 0
    CLASS_CODE = 0xFF0000

    def __init__(self, platform, num_queues: int, queue_max_size: int = 256, name: str = "virtio") -> None:
        if not 1 <= num_queues <= REGION_SIZE // NOTIFY_MULTIPLIER:
            raise ValueError(f"{name}: {num_queues} queues is not supported")
        super().__init__(VIRTIO_PCI_VENDOR, VIRTIO_PCI_DEVICE_BASE + self.DEVICE_TYPE, self.CLASS_CODE,
                         revision=1, subsystem_vendor_id=VIRTIO_PCI_VENDOR, subsystem_id=0x1100,
                         interrupt_pin=1, name=name)
        self.platform = platform
        self.memory = platform.memory
        self.num_queues = num_queues
        self.queues = [SplitQueue(self.memory, queue_max_size) for _ in range(num_queues)]
        self.queue_vector = [NO_VECTOR] * num_queues
        self.add_bar(0, BAR0_SIZE, BAR_MEM64)
        self.add_bar(MSIX_BAR, 0x1000, BAR_MEM32)
        for cfg_type, off, length in ((CAP_COMMON, COMMON_OFFSET, COMMON_CFG_SIZE), (CAP_ISR, ISR_OFFSET, 1),
                                      (CAP_DEVICE, DEVICE_OFFSET, REGION_SIZE)):
            self.add_capability(CAP_ID_VENDOR, struct.pack("<BBBBxxII", 16, cfg_type, 0, 0, off, length))
        self.add_capability(CAP_ID_VENDOR, struct.pack("<BBBBxxIII", 20, CAP_NOTIFY, 0, 0, NOTIFY_OFFSET,
                                                      NOTIFY_MULTIPLIER * num_queues, NOTIFY_MULTIPLIER))
        self.msix = MsixCapability(self, platform, num_queues + 1, MSIX_BAR, 0, MSIX_PBA_OFFSET)
        # _lock serialises guest config accesses (vCPU threads) and may be held while
        # joining the I/O thread; _state_lock is the inner lock the I/O thread also
        # takes (status bits, ISR), never held across a join.
        self._lock = threading.RLock()
        self._state_lock = threading.RLock()
        self._doorbells: list[int | None] = [None] * num_queues
        self._notify_base: int | None = None
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._soft_kicks: set[int] = set()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._poller = None
        self._reset_state()

    # subclass interface -------------------------------------------------------

    def device_features(self) -> int:
        return 0

    def config_bytes(self) -> bytes:
        """The device-specific config structure as the guest sees it now."""
        return b""

    def device_config_write(self, offset: int, size: int, value: int) -> None:
        """A driver write into the device-specific config (default: read-only)."""

    def activate(self) -> None:
        """Called on DRIVER_OK, before the I/O thread starts. Raise to fail."""

    def deactivate(self) -> None:
        """Called after the I/O thread stopped (reset, FAILED, close)."""

    def process_queue(self, index: int) -> None:
        """The driver kicked queue ``index``. Runs on the I/O thread."""

    def extra_poll(self) -> list[tuple[int, int]]:
        """Additional (fd, poll events) for the I/O thread, e.g. a tap fd."""
        return []

    def on_fd_ready(self, fd: int, events: int) -> None:
        """An ``extra_poll`` fd is ready. Runs on the I/O thread."""

    def set_poll(self, fd: int, events: int) -> None:
        """From the I/O thread: change the events polled on an extra fd (0 = none)."""
        if self._poller is not None:
            if events:
                self._poller.modify(fd, events)
            else:
                self._poller.modify(fd, 0)

    # state --------------------------------------------------------------------

    def _reset_state(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = NO_VECTOR
        self.queue_select = 0
        self.config_generation = 0
        self.isr = 0
        self.broken = False
        for q in self.queues:
            q.reset()
        self.queue_vector = [NO_VECTOR] * self.num_queues
        self.queue_enable = [False] * self.num_queues
        self._soft_kicks.clear()
        self._warned: set[str] = set()

    def _warn(self, fmt: str, *args) -> None:
        """A guest protocol slip: logged once per kind until the next reset, so a
        hostile driver cannot flood the log."""
        if fmt not in self._warned:
            self._warned.add(fmt)
            log.warning("%s: " + fmt, self.name, *args)

    def all_features(self) -> int:
        return (self.device_features() | 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_RING_INDIRECT_DESC
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
            with self._state_lock:
                value, self.isr = self.isr, 0
                if self.pci_bus is not None:
                    self.pci_bus.set_intx(self, False)
                return value
        if DEVICE_OFFSET <= offset < DEVICE_OFFSET + REGION_SIZE:
            o = offset - DEVICE_OFFSET
            cfg = self.config_bytes()
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
                self.device_config_write(offset - DEVICE_OFFSET, size, value)
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_MULTIPLIER * self.num_queues:
            # Reached only when no doorbell took the write (e.g. an odd access size).
            self._soft_kick((offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER)

    def _soft_kick(self, q: int) -> None:
        fd = self._doorbells[q]
        if fd is not None:
            os.eventfd_write(fd, 1)
        else:
            self._soft_kicks.add(q)
            os.eventfd_write(self._wake_fd, 1)

    # common configuration ---------------------------------------------------------

    def _common_bytes(self) -> bytes:
        qs = self.queue_select
        if qs < self.num_queues:
            q = self.queues[qs]
            qfields = (q.size, self.queue_vector[qs], int(self.queue_enable[qs]), qs,
                       q.desc_addr, q.avail_addr, q.used_addr)
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
            elif self.queue_enable[qs]:
                self._warn("queue %d reconfigured while enabled; ignored", qs)
            elif offset == 0x18:
                self.queues[qs].size = value
            elif value == 1:
                self._enable_queue(qs)
        elif qvalid and 0x20 <= offset < 0x38 and (size == 8 and offset % 8 == 0 or size == 4 and offset % 4 == 0):
            if self.queue_enable[qs]:
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
            return
        self.queue_enable[qs] = True

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
        with self._state_lock:
            self.status = value | (self.status & DEVICE_NEEDS_RESET)
        if new_bits & DRIVER_OK:
            if not value & FEATURES_OK:
                self.device_error("DRIVER_OK without FEATURES_OK")
                return
            if not self.broken:
                try:
                    self.activate()
                except Exception as e:  # a backend that cannot start is a device error, not a crash
                    log.exception("%s: activation failed", self.name)
                    self.device_error(f"activation failed: {e}")
                    return
                self._start_worker()
        if new_bits & FAILED:
            self._stop_worker()

    def reset(self) -> None:
        """Device reset (status 0): stop the I/O thread, forget queues and features."""
        with self._lock:
            was_running = self._thread is not None
            self._stop_worker()
            if was_running:
                self.deactivate()
            self._reset_state()
            if self.pci_bus is not None:
                self.pci_bus.set_intx(self, False)

    # errors and interrupts ----------------------------------------------------------------

    def device_error(self, message: str) -> None:
        """The guest broke the protocol: NEEDS_RESET, config interrupt, one error log line."""
        with self._state_lock:
            if self.broken:
                return
            # status before broken: whoever sees broken also sees NEEDS_RESET
            self.status |= DEVICE_NEEDS_RESET
            self.broken = True
            log.error("%s: device needs reset: %s", self.name, message)
            if self.status & DRIVER_OK:
                self.config_changed()

    def config_changed(self) -> None:
        with self._state_lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
            self._interrupt(self.config_msix_vector, ISR_CONFIG)

    def signal_used(self, index: int) -> None:
        """Interrupt the driver for queue ``index`` if it wants one."""
        if self.queues[index].needs_notification():
            self._interrupt(self.queue_vector[index], ISR_QUEUE)

    def _interrupt(self, vector: int, isr_bit: int) -> None:
        if self.msix.enabled:
            if vector != NO_VECTOR:
                self.msix.notify(vector)
            return
        with self._state_lock:
            self.isr |= isr_bit
        if self.pci_bus is not None:
            self.pci_bus.set_intx(self, True)

    # doorbells ------------------------------------------------------------------------

    def bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        if index != 0:
            return
        with self._lock:
            running = self._thread is not None
            self._stop_worker()
            for q, fd in enumerate(self._doorbells):
                if fd is not None:
                    self.platform.remove_doorbell(fd)
                    self._doorbells[q] = None
            self._notify_base = new
            if new is not None:
                for q in range(self.num_queues):
                    # size 0: any access width, no datamatch (VIRTIO_F_NOTIFICATION_DATA is not offered)
                    self._doorbells[q] = self.platform.add_doorbell(
                        new + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * q, 0, None, False)
            if running:
                self._start_worker()

    def notify_address(self, q: int) -> int | None:
        return None if self._notify_base is None else self._notify_base + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * q

    # the I/O thread -----------------------------------------------------------------------

    def _start_worker(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._worker, name=f"{self.name}-io", daemon=True)
        self._thread.start()
        # Buffers made available before DRIVER_OK (or during a re-aim) get a look now.
        for q in range(self.num_queues):
            if self.queue_enable[q]:
                self._soft_kicks.add(q)
        os.eventfd_write(self._wake_fd, 1)

    def _stop_worker(self) -> None:
        t = self._thread
        if t is None:
            return
        self._stop = True
        os.eventfd_write(self._wake_fd, 1)
        if t is not threading.current_thread():
            t.join()
        self._thread = None

    def _worker(self) -> None:
        poller = select.poll()
        self._poller = poller
        by_fd: dict[int, int] = {}
        poller.register(self._wake_fd, select.POLLIN)
        for q, fd in enumerate(self._doorbells):
            if fd is not None:
                by_fd[fd] = q
                poller.register(fd, select.POLLIN)
        extra = set()
        for fd, events in self.extra_poll():
            poller.register(fd, events)
            extra.add(fd)
        try:
            while not self._stop:
                for fd, events in poller.poll():
                    if self._stop:
                        break
                    if fd == self._wake_fd:
                        _drain(fd)
                        kicks, self._soft_kicks = self._soft_kicks, set()
                        for q in sorted(kicks):
                            self._run_queue(q)
                    elif fd in by_fd:
                        _drain(fd)
                        self._run_queue(by_fd[fd])
                    elif fd in extra and not self.broken:
                        self._guarded(self.on_fd_ready, fd, events)
        finally:
            self._poller = None

    def _run_queue(self, q: int) -> None:
        if self.broken or not self.queue_enable[q] or not self.status & DRIVER_OK:
            return
        self._guarded(self.process_queue, q)

    def _guarded(self, fn, *args) -> None:
        try:
            fn(*args)
        except (QueueError, GuestMemoryError) as e:
            self.device_error(str(e))
        except Exception as e:  # a bug must not kill the I/O thread silently
            log.exception("%s: internal error", self.name)
            self.device_error(f"internal error: {e!r}")

    def close(self) -> None:
        """Machine shutdown: stop the thread, drop doorbells and MSI eventfds."""
        self.reset()
        with self._lock:
            for q, fd in enumerate(self._doorbells):
                if fd is not None:
                    self.platform.remove_doorbell(fd)
                    self._doorbells[q] = None
        self.msix.close()
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        pass
