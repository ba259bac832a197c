"""KVM as the machine's accelerator: VM with in-kernel irqchip and PIT, vCPUs set up
like a PC after its BIOS, and the state to go back to on system reset."""

from __future__ import annotations

import logging

from ..boot import layout
from ._kvm_cffi import ffi, lib
from .api import Kvm, KvmError
from .coalesced import CoalescedPio
from .cpu_setup import boot_msrs, cpuid_for_vcpu, setup_lapic
from .platform import KvmPlatform

log = logging.getLogger(__name__)


class KvmAccel:
    name = "kvm"

    def __init__(self, machine) -> None:
        self.machine = machine
        self.kvm = Kvm()
        num_cpus = machine.cfg.cpus
        if num_cpus > self.kvm.max_vcpus():
            from ..errors import ConfigError
            raise ConfigError(f"{machine.cfg.source}: key 'cpus': KVM here allows at most {self.kvm.max_vcpus()}")
        self.vm = self.kvm.create_vm()
        vm = self.vm
        vm.set_tss_addr(layout.TSS_ADDR)
        vm.set_identity_map_addr(layout.IDENTITY_MAP_ADDR)
        vm.create_irqchip()
        vm.create_pit2()
        try:
            vm.enable_cap("KVM_CAP_EXIT_ON_EMULATION_FAILURE", 1)
        except KvmError:
            log.debug("KVM_CAP_EXIT_ON_EMULATION_FAILURE not available")
        for slot, region in enumerate(machine.memory.regions):
            host = int(ffi.cast("uintptr_t", ffi.from_buffer(region.view)))
            vm.set_user_memory_region(slot, region.gpa, region.size, host)
        self.platform = KvmPlatform(vm, machine.memory)
        supported = self.kvm.supported_cpuid()
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
        self.coalesced: CoalescedPio | None = None
        self.drain_coalesced = None
        try:
            if vm.check_extension("KVM_CAP_COALESCED_PIO") > 0:
                self.coalesced = CoalescedPio(vm, self.vcpus[0].run_mmap, machine.pio_bus.write)
                self.drain_coalesced = self.coalesced.drain
        except (KvmError, ValueError) as e:
            log.debug("coalesced port writes not available: %s", e)
        self._irqchip_reset = vm.get_irqchip_state()
        self._pit_reset = vm.get_pit_state()

    def load_boot_state(self, boot) -> None:
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

    def close(self) -> None:
        if self.coalesced is not None:
            self.coalesced.close()      # the last queued writes reach their device
        self.platform.close()
        self.vm.close()
        self.kvm.close()
