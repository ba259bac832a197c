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


def eventfd_signal(fd: int) -> None:
    os.eventfd_write(fd, 1)


class SoftPlatform:
    """Platform in software: used by the translator machine and by device unit tests.

    ``on_msi(address, data)`` and ``on_irq(gsi, level)`` are called for every
    injection; tests record them, the translator forwards them to its APIC model.
    Doorbells are checked by ``doorbell_write`` which the software MMIO/PIO
    dispatch calls before the bus.
    """

    def __init__(self, memory: GuestMemory,
                 on_irq: Callable[[int, bool], None] | None = None,
                 on_msi: Callable[[int, int], None] | None = None) -> None:
        self.memory = memory
        self.on_irq = on_irq or (lambda gsi, level: None)
        self.on_msi = on_msi or (lambda address, data: None)
        self.irq_levels: dict[int, bool] = {}
        self._lock = threading.Lock()
        self._msi_fds: dict[int, tuple[int, int]] = {}
        self._doorbells: dict[int, tuple[int, int, int | None, bool]] = {}
        self._msi_thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False

    # legacy lines and direct MSIs
    def set_irq_level(self, gsi: int, level: bool) -> None:
        self.irq_levels[gsi] = level
        self.on_irq(gsi, level)

    def send_msi(self, address: int, data: int) -> None:
        self.on_msi(address, data)

    # MSI eventfds: a small poller thread turns eventfd writes into on_msi calls
    def msi_eventfd(self, address: int, data: int) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        with self._lock:
            self._msi_fds[fd] = (address, data)
        self._ensure_msi_thread()
        os.write(self._wake_w, b"x")
        return fd

    def update_msi_eventfd(self, fd: int, address: int, data: int) -> None:
        with self._lock:
            if fd in self._msi_fds:
                self._msi_fds[fd] = (address, data)

    def release_msi_eventfd(self, fd: int) -> None:
        with self._lock:
            self._msi_fds.pop(fd, None)
        os.write(self._wake_w, b"x")
        os.close(fd)

    def _ensure_msi_thread(self) -> None:
        if self._msi_thread is None:
            self._msi_thread = threading.Thread(target=self._msi_loop, name="soft-msi", daemon=True)
            self._msi_thread.start()

    def _msi_loop(self) -> None:
        import select
        while not self._closed:
            with self._lock:
                fds = list(self._msi_fds)
            try:
                ready, _, _ = select.select(fds + [self._wake_r], [], [])
            except (OSError, ValueError):
                continue
            for fd in ready:
                if fd == self._wake_r:
                    os.read(self._wake_r, 4096)
                    continue
                try:
                    os.eventfd_read(fd)
                except (BlockingIOError, OSError):
                    continue
                with self._lock:
                    target = self._msi_fds.get(fd)
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

    def close(self) -> None:
        self._closed = True
        os.write(self._wake_w, b"x")
        for fd in list(self._doorbells):
            self.remove_doorbell(fd)
