"""Platform (kvmpy.hv.protocol) implemented with KVM: irq lines, GSI-routed MSIs
behind irqfds, and ioeventfd doorbells."""

from __future__ import annotations

import os
import threading

from ...memory import GuestMemory
from ._kvm_cffi import ffi, lib
from .api import Vm

FIRST_MSI_GSI = 24   # 0-23 are the IOAPIC pins
# Memory slots for device memory (framebuffers) start here, above the few slots
# of guest RAM (kvmpy.hv.kvm.accel numbers those from 0); KVM allows 32 or more.
FIRST_DEVICE_SLOT = 16


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
        self._device_slots: dict[str, tuple[int, object]] = {}   # region id -> (slot, dirty bitmap)
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

    # device memory: a memory slot of its own with KVM's dirty log, so a display
    # re-encodes only the pages the guest wrote
    def map_device_memory(self, region_id: str, gpa: int, view: memoryview) -> None:
        with self._lock:
            self._unmap_locked(region_id)
            used = {slot for slot, _ in self._device_slots.values()}
            slot = next(s for s in range(FIRST_DEVICE_SLOT, FIRST_DEVICE_SLOT + 64) if s not in used)
            region = self.memory.map_device_region(region_id, gpa, view)
            host_addr = int(ffi.cast("uintptr_t", ffi.from_buffer(region.view)))
            self.vm.set_user_memory_region(slot, gpa, region.size, host_addr, lib.KVM_MEM_LOG_DIRTY_PAGES)
            pages = region.size // 4096
            self._device_slots[region_id] = (slot, ffi.new("uint64_t[]", (pages + 63) // 64))

    def unmap_device_memory(self, region_id: str) -> None:
        with self._lock:
            self._unmap_locked(region_id)

    def _unmap_locked(self, region_id: str) -> None:
        entry = self._device_slots.pop(region_id, None)
        if entry is not None:
            self.vm.set_user_memory_region(entry[0], 0, 0, 0)    # size 0 deletes the slot
            self.memory.unmap_device_region(region_id)

    def dirty_device_pages(self, region_id: str) -> bytes | None:
        with self._lock:
            entry = self._device_slots.get(region_id)
            if entry is None:
                return None
            slot, bitmap = entry
            self.vm.get_dirty_log(slot, bitmap)
            return bytes(ffi.buffer(bitmap))

    def doorbell_write(self, addr: int, size: int, value: int, pio: bool) -> bool:
        return False        # the ioeventfd took the write in the kernel: no exit came here

    def close(self) -> None:
        for region_id in list(self._device_slots):
            try:
                self.unmap_device_memory(region_id)
            except OSError:
                pass
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
