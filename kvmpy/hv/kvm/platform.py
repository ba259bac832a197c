"""Platform (kvmpy.hv.protocol) implemented with KVM: irq lines, GSI-routed MSIs
behind irqfds, and ioeventfd doorbells."""

from __future__ import annotations

import os
import threading

from ...memory import GuestMemory
from ._kvm_cffi import lib
from .api import Vm

FIRST_MSI_GSI = 24   # 0-23 are the IOAPIC pins


def legacy_routes() -> list[tuple]:
    """GSI 0-15 to both 8259s and the IOAPIC, 16-23 to the IOAPIC, with the PC's
    IRQ0 -> IOAPIC pin 2 override (the MADT announces it)."""
    routes: list[tuple] = []
    for gsi in range(16):
        if gsi == 2:
            continue  # the cascade
        chip = lib.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else lib.KVM_IRQCHIP_PIC_SLAVE
        routes.append(("irqchip", gsi, chip, gsi % 8))
    for gsi in range(24):
        if gsi == 2:
            continue
        routes.append(("irqchip", gsi, lib.KVM_IRQCHIP_IOAPIC, 2 if gsi == 0 else gsi))
    return routes


class KvmPlatform:
    def __init__(self, vm: Vm, memory: GuestMemory) -> None:
        self.vm = vm
        self.memory = memory
        self._lock = threading.Lock()
        self._legacy = legacy_routes()
        self._msi_routes: dict[int, tuple[int, int, int]] = {}   # fd -> (gsi, address, data)
        self._free_gsis: list[int] = []
        self._next_gsi = FIRST_MSI_GSI
        self._doorbells: dict[int, tuple[int, int, int | None, bool]] = {}
        self.vm.set_gsi_routing(self._legacy)

    def set_irq_level(self, gsi: int, level: bool) -> None:
        self.vm.irq_line(gsi, level)

    def send_msi(self, address: int, data: int) -> None:
        self.vm.signal_msi(address, data)

    def _commit_routes(self) -> None:
        routes = list(self._legacy)
        routes += [("msi", gsi, a, d) for gsi, a, d in self._msi_routes.values()]
        self.vm.set_gsi_routing(routes)

    def msi_eventfd(self, address: int, data: int) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        with self._lock:
            gsi = self._free_gsis.pop() if self._free_gsis else self._next_gsi
            if gsi == self._next_gsi:
                self._next_gsi += 1
            self._msi_routes[fd] = (gsi, address, data)
            self._commit_routes()
            self.vm.irqfd(fd, gsi)
        return fd

    def update_msi_eventfd(self, fd: int, address: int, data: int) -> None:
        with self._lock:
            gsi, _, _ = self._msi_routes[fd]
            self._msi_routes[fd] = (gsi, address, data)
            self._commit_routes()

    def release_msi_eventfd(self, fd: int) -> None:
        with self._lock:
            entry = self._msi_routes.pop(fd, None)
            if entry is not None:
                self.vm.irqfd(fd, entry[0], deassign=True)
                self._free_gsis.append(entry[0])
                self._commit_routes()
        os.close(fd)

    def add_doorbell(self, addr: int, size: int, datamatch: int | None, pio: bool) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.vm.ioeventfd(fd, addr, size, datamatch, pio)
        self._doorbells[fd] = (addr, size, datamatch, pio)
        return fd

    def remove_doorbell(self, fd: int) -> None:
        entry = self._doorbells.pop(fd, None)
        if entry is not None:
            addr, size, datamatch, pio = entry
            self.vm.ioeventfd(fd, addr, size, datamatch, pio, deassign=True)
            os.close(fd)

    def doorbell_write(self, addr: int, size: int, value: int, pio: bool) -> bool:
        return False        # the ioeventfd took the write in the kernel: no exit came here

    def close(self) -> None:
        for fd in list(self._doorbells):
            try:
                self.remove_doorbell(fd)
            except OSError:
                pass
        for fd in list(self._msi_routes):
            try:
                self.release_msi_eventfd(fd)
            except OSError:
                pass
