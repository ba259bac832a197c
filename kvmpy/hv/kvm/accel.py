"""KVM as the machine's accelerator (kvmpy.hv.protocol.Accel): VM with in-kernel
irqchip and PIT, vCPUs set up like a PC after its BIOS, and the state to go back to
on system reset."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Callable

from ...boot import layout
from ._kvm_cffi import ffi, lib
from .api import Kvm, KvmError
from .coalesced import CoalescedPio
from .cpu_setup import announced_phys_bits, boot_msrs, cpuid_for_vcpu, setup_lapic
from .platform import KvmPlatform

if TYPE_CHECKING:  # pragma: no cover
    from ...boot.common import BootState
    from ...devices.bus import Bus
    from ..protocol import AccelHost

log = logging.getLogger(__name__)


# With the in-kernel LAPIC, KVM keeps a halted vCPU inside KVM_RUN; should a halt
# exit reach userspace all the same, this pause keeps the loop from spinning on it.
HALT_EXIT_PAUSE = 0.001


class PublishedReads:
    """kvmpy.hv.protocol.PublishedPortReads: cells in the exit map that the vCPUs' C
    loops answer one-byte port reads from (KVMPY_PUBLISHED in _build.py)."""

    def __init__(self, exit_map) -> None:
        self._exit_map = exit_map

    def publisher(self, port: int) -> Callable[[int | None], None] | None:
        cell = lib.kvmpy_exit_map_published_cell(self._exit_map, port)
        if cell == ffi.NULL:
            log.debug("no published-read slot left for port %#x: its reads exit", port)
            return None
        published = lib.KVMPY_PUBLISHED

        # The map stays alive while a publisher can still store into it.
        def publish(value: int | None, cell=cell, exit_map=self._exit_map) -> None:
            cell[0] = 0 if value is None else published | (value & 0xFF)
        return publish


class KvmAccel:
    name = "kvm"
    timer_wheel = None               # the PIT and LAPIC timers run in the kernel
    software_doorbells = False       # ioeventfds take doorbell writes in the kernel
    needs_before_guest_entry = False  # the in-kernel irqchip injects interrupts

    def __init__(self, host: AccelHost) -> None:
        self.kvm = Kvm()
        num_cpus = host.cfg.cpus
        if num_cpus > self.kvm.max_vcpus():
            from ...errors import ConfigError
            raise ConfigError(f"{host.cfg.source}: key 'cpus': KVM here allows at most {self.kvm.max_vcpus()}")
        self.vm = self.kvm.create_vm()
        vm = self.vm
        tss, identity_map = layout.TSS_ADDR, layout.IDENTITY_MAP_ADDR
        if any(r.gpa < tss + 3 * 0x1000 and identity_map < r.end for r in host.memory.regions):
            tss, identity_map = layout.FIRMWARE_TSS_ADDR, layout.FIRMWARE_IDENTITY_MAP_ADDR
        vm.set_tss_addr(tss)
        vm.set_identity_map_addr(identity_map)
        vm.create_irqchip()
        vm.create_pit2()
        try:
            vm.enable_cap("KVM_CAP_EXIT_ON_EMULATION_FAILURE", 1)
        except KvmError:
            log.debug("KVM_CAP_EXIT_ON_EMULATION_FAILURE not available")
        self.memory = host.memory
        self._slots: dict[int, int] = {}         # region gpa -> KVM slot
        for slot, region in enumerate(host.memory.regions):
            self._slots[region.gpa] = slot
            self._map_region(region, host.memory.is_readonly(region))
        host.memory.protection_listeners.append(self._protection_changed)
        self.platform = KvmPlatform(vm, host.memory)
        supported = self.kvm.supported_cpuid()
        self.phys_bits = announced_phys_bits(cpuid_for_vcpu(supported, 0, num_cpus))
        msrs = boot_msrs(self.kvm.msr_index_list())
        try:
            tsc_deadline = self.kvm.check_extension("KVM_CAP_TSC_DEADLINE_TIMER") > 0
        except KvmError:
            tsc_deadline = False
        self.vcpus = []
        self._reset_state = []
        for i in range(num_cpus):
            v = vm.create_vcpu(i)
            v.set_cpuid(cpuid_for_vcpu(supported, i, num_cpus, tsc_deadline))
            if msrs:
                v.set_msrs(msrs)
            setup_lapic(v)
            self.vcpus.append(v)
            self._reset_state.append((v.get_regs(), v.get_sregs(), v.get_lapic(), msrs))
        # Queued port writes (the UART's THR while its interrupts are off), drained
        # by the vCPU loop before each exit is handled.
        self.port_write_queue: CoalescedPio | None = None
        try:
            if vm.check_extension("KVM_CAP_COALESCED_PIO") > 0:
                self.port_write_queue = CoalescedPio(vm, self.vcpus[0].run_mmap, host.pio_bus.write,
                                                     host.events, write_burst=host.pio_bus.write_burst)
        except (KvmError, ValueError) as e:
            log.debug("coalesced port writes not available: %s", e)
        # The claimed port and MMIO ranges, in C memory the vCPUs' run loops read
        # (KvmVcpu.use_exit_map), kept current through the buses' listener interface.
        exit_map = lib.kvmpy_exit_map_new()
        if exit_map == ffi.NULL:
            raise MemoryError("kvmpy_exit_map_new")
        self._exit_map = ffi.gc(exit_map, lib.kvmpy_exit_map_free)
        # Two threads changing buses at once must not leave the older map in C.
        self._exit_map_lock = threading.Lock()
        self._pio_bus, self._mmio_bus = host.pio_bus, host.mmio_bus
        host.pio_bus.add_listener(self)
        host.mmio_bus.add_listener(self)
        for v in self.vcpus:
            v.use_exit_map(self._exit_map)
        self.published_port_reads = PublishedReads(self._exit_map)
        self._irqchip_reset = vm.get_irqchip_state()
        self._pit_reset = vm.get_pit_state()

    def _map_region(self, region, readonly: bool) -> None:
        host_addr = int(ffi.cast("uintptr_t", ffi.from_buffer(region.view)))
        # A read-only slot makes guest writes exit as MMIO (dropped by the bus), as
        # writes to a PC's ROM go nowhere.
        flags = lib.KVM_MEM_READONLY if readonly else 0
        self.vm.set_user_memory_region(self._slots[region.gpa], region.gpa, region.size, host_addr, flags)

    def _protection_changed(self, region, readonly: bool) -> None:
        # KVM cannot change a slot's flags in place: it goes (size 0) and comes back.
        slot = self._slots[region.gpa]
        self.vm.set_user_memory_region(slot, region.gpa, 0, 0)
        self._map_region(region, readonly)

    def bus_changed(self, bus: Bus) -> None:
        """BusListener: copy the bus's claimed ranges into the C map."""
        with self._exit_map_lock:
            ranges = bus.claimed_ranges()
            flat = ffi.new("__u64[]", [v for r in ranges for v in r] or [0])
            err = lib.kvmpy_exit_map_set(self._exit_map, int(bus is self._pio_bus), flat, len(ranges))
        if err < 0:
            raise MemoryError(f"kvmpy_exit_map_set: {os.strerror(-err)}")

    def load_boot_state(self, boot: BootState) -> None:
        bsp = self.vcpus[0]
        bsp.set_sregs(boot.sregs)
        bsp.set_regs(boot.regs)

    def reset(self) -> None:
        self.vm.set_irqchip_state(self._irqchip_reset)
        self.vm.set_pit_state(self._pit_reset)
        for i, (v, (regs, sregs, lapic, msrs)) in enumerate(zip(self.vcpus, self._reset_state)):
            v.set_lapic(lapic)
            v.set_sregs(sregs)
            v.set_regs(regs)
            if msrs:
                v.set_msrs(msrs)
            v.set_mp_state(lib.KVM_MP_STATE_RUNNABLE if i == 0 else lib.KVM_MP_STATE_UNINITIALIZED)

    def vcpu_thread_started(self, index: int) -> None:
        pass

    def before_guest_entry(self, index: int) -> None:
        pass

    def wait_halted(self, index: int) -> None:
        time.sleep(HALT_EXIT_PAUSE)

    def serve_pm_timer(self, port: int, clock) -> None:
        pass        # KVM exits to userspace for every port read: the model answers

    def close(self) -> None:
        self._pio_bus.remove_listener(self)
        self._mmio_bus.remove_listener(self)
        if self._protection_changed in self.memory.protection_listeners:
            self.memory.protection_listeners.remove(self._protection_changed)
        if self.port_write_queue is not None:
            self.port_write_queue.close()      # the last queued writes reach their device
        self.platform.close()
        self.vm.close()
        self.kvm.close()
