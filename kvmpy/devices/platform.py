"""What a device model may ask of the machine: guest memory, interrupts, doorbells.

Device models import this module, never ``kvmpy.kvm`` or ``kvmpy.vcpu``. The KVM
machine implements Platform with KVM_IRQ_LINE, GSI routing + irqfd for MSIs and
ioeventfd for doorbells; the translator machine and unit tests use SoftPlatform,
which does the same work in software with real eventfds.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Protocol

from ..events import EVENT_READ, EventLoop
from ..memory import GuestMemory


class Platform(Protocol):
    memory: GuestMemory

    def set_irq_level(self, gsi: int, level: bool) -> None:
        """Drive a legacy interrupt line (ISA IRQ / IOAPIC pin ``gsi``)."""

    def send_msi(self, address: int, data: int) -> None:
        """Inject one message-signalled interrupt now."""

    def msi_eventfd(self, address: int, data: int) -> int:
        """An eventfd; each write of a nonzero count to it injects this MSI.

        Under KVM this is an irqfd on a GSI route, so the I/O thread injects
        without taking the vCPU out of the guest. Re-aim it with update_msi_eventfd.
        """

    def update_msi_eventfd(self, fd: int, address: int, data: int) -> None: ...

    def release_msi_eventfd(self, fd: int) -> None: ...

    def add_doorbell(self, addr: int, size: int, datamatch: int | None, pio: bool) -> int:
        """An eventfd made readable whenever the guest writes ``addr`` (with
        ``datamatch`` if given). Under KVM this is an ioeventfd: the write never
        leaves the kernel. Returns the eventfd."""

    def remove_doorbell(self, fd: int) -> None: ...

    def map_device_memory(self, region_id: str, gpa: int, view: memoryview) -> None:
        """Let the guest access ``view`` (device memory, page aligned: a framebuffer)
        as RAM at ``gpa``, without exits; mapping ``region_id`` again moves it."""

    def unmap_device_memory(self, region_id: str) -> None:
        """Stop mapping ``region_id`` (its accesses exit to the MMIO bus again)."""

    def dirty_device_pages(self, region_id: str) -> bytes | None:
        """The pages of ``region_id`` the guest wrote since the last call, one bit per
        4 KiB page (bit i of byte i // 8: KVM's dirty log layout); None where the
        accelerator does not track writes (the caller then compares contents)."""


def eventfd_signal(fd: int) -> None:
    os.eventfd_write(fd, 1)


class SoftPlatform:
    """Platform in software: used by the translator machine and by device unit tests.

    ``on_msi(address, data)`` and ``on_irq(gsi, level)`` are called for every
    injection; tests record them, the translator forwards them to its APIC model.
    MSI eventfds are subscribed to ``events`` (the machine's loop; without one, a
    loop of the platform's own started by the first), which turns each write into
    an ``on_msi`` call. Doorbells are checked by ``doorbell_write`` which the
    software MMIO/PIO dispatch calls before the bus.
    """

    def __init__(self, memory: GuestMemory,
                 on_irq: Callable[[int, bool], None] | None = None,
                 on_msi: Callable[[int, int], None] | None = None,
                 events: EventLoop | None = None) -> None:
        self.memory = memory
        self.on_irq = on_irq or (lambda gsi, level: None)
        self.on_msi = on_msi or (lambda address, data: None)
        self.irq_levels: dict[int, bool] = {}
        self._lock = threading.Lock()
        self._msi_fds: dict[int, tuple[int, int]] = {}
        self._doorbells: dict[int, tuple[int, int, int | None, bool]] = {}
        self._events = events
        self._own_events = False
        self._closed = False

    # legacy lines and direct MSIs
    def set_irq_level(self, gsi: int, level: bool) -> None:
        self.irq_levels[gsi] = level
        self.on_irq(gsi, level)

    def send_msi(self, address: int, data: int) -> None:
        self.on_msi(address, data)

    # MSI eventfds: each is a subscriber of the event loop
    def msi_eventfd(self, address: int, data: int) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        with self._lock:
            self._msi_fds[fd] = (address, data)
            events = self._loop_locked()
        events.subscribe(fd, EVENT_READ, lambda ready: self._msi_signalled(fd))
        return fd

    def _loop_locked(self) -> EventLoop:
        if self._events is None:
            self._events = EventLoop(name="soft-msi")
            self._own_events = True
            self._events.start()
        return self._events

    def update_msi_eventfd(self, fd: int, address: int, data: int) -> None:
        with self._lock:
            if fd in self._msi_fds:
                self._msi_fds[fd] = (address, data)

    def release_msi_eventfd(self, fd: int) -> None:
        with self._lock:
            known = self._msi_fds.pop(fd, None) is not None
            events = self._events
        if known and events is not None:
            events.unsubscribe(fd, close=True)
        else:
            os.close(fd)

    def _msi_signalled(self, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except (BlockingIOError, OSError):
            return
        with self._lock:
            target = None if self._closed else self._msi_fds.get(fd)
        if target is not None:
            self.on_msi(*target)

    # doorbells
    def add_doorbell(self, addr: int, size: int, datamatch: int | None, pio: bool) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._doorbells[fd] = (addr, size, datamatch, pio)
        return fd

    def remove_doorbell(self, fd: int) -> None:
        if self._doorbells.pop(fd, None) is not None:
            os.close(fd)

    def doorbell_write(self, addr: int, size: int, value: int, pio: bool) -> bool:
        """Called by software dispatch before the bus; True if a doorbell took the write."""
        for fd, (a, s, match, p) in self._doorbells.items():
            if a == addr and p == pio and (s == 0 or s == size) and (match is None or match == value):
                os.eventfd_write(fd, 1)
                return True
        return False

    # device memory: the translator maps GuestMemory.device_regions as RAM at its
    # next run(); it keeps no dirty log, so callers compare contents
    def map_device_memory(self, region_id: str, gpa: int, view: memoryview) -> None:
        self.memory.map_device_region(region_id, gpa, view)

    def unmap_device_memory(self, region_id: str) -> None:
        self.memory.unmap_device_region(region_id)

    def dirty_device_pages(self, region_id: str) -> bytes | None:
        return None

    def close(self) -> None:
        """Stop delivering MSIs (their eventfds stay open until released) and drop
        the doorbells."""
        with self._lock:
            self._closed = True
            fds = list(self._msi_fds)
            events = self._events
        if events is not None:
            for fd in fds:
                events.unsubscribe(fd)
            if self._own_events:
                events.close()
        for fd in list(self._doorbells):
            self.remove_doorbell(fd)
