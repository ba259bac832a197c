"""The C translator as the machine's accelerator (no KVM needed).

What KVM does in the kernel is done here in software: the interrupt controllers
and the PIT (kvmpy.devices.irqchip), interrupt lines and MSIs through a
SoftPlatform, doorbells checked by the vCPU loop. One vCPU for now.
"""

from __future__ import annotations

import logging
import threading

from ..devices.platform import SoftPlatform
from ..errors import UserError

log = logging.getLogger(__name__)

# What the translator advertises: a plain x86-64 CPU without the extensions it
# does not implement (no AVX, XSAVE, x2APIC, PCID...).
VENDOR = b"KvmpyTCGCPU\0"  # 12 bytes: ebx, edx, ecx order below


def translator_cpuid(num_cpus: int) -> list[tuple[int, int, int, int, int, int, int]]:
    ebx = int.from_bytes(VENDOR[0:4], "little")
    edx = int.from_bytes(VENDOR[4:8], "little")
    ecx = int.from_bytes(VENDOR[8:12], "little")
    leaf1_edx = (1 << 0) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 8) | (1 << 9) | (1 << 13) | (1 << 15) \
        | (1 << 19) | (1 << 23) | (1 << 24) | (1 << 25) | (1 << 26)   # fpu tsc msr pae cx8 apic pge cmov clflush mmx fxsr sse sse2
    leaf1_ecx = (1 << 0) | (1 << 13) | (1 << 31)                      # sse3 cx16 hypervisor
    return [
        (0, 0, 0, 0xD, ebx, ecx, edx),
        (1, 0, 0, 0x000606A0, (1 << 16) | (8 << 8), leaf1_ecx, leaf1_edx),
        (0x80000000, 0, 0, 0x80000008, 0, 0, 0),
        (0x80000001, 0, 0, 0, 0, 1, (1 << 11) | (1 << 20) | (1 << 29)),   # lahf, syscall, nx, lm
        (0x80000008, 0, 0, 0x3028, 0, 0, 0),                                # 40-bit phys, 48-bit virt
    ]


class TcgAccel:
    name = "tcg"

    def __init__(self, machine) -> None:
        try:
            from .tcg import TcgVcpu
        except ImportError as e:
            raise UserError(f"the translator (kvmpy._tcg) is not available: {e}; "
                            "build it with `make build` or run with --enable-kvm") from None
        from ..devices.irqchip import SoftIrqChip, TimerWheel
        self.machine = machine
        self.vcpus = [TcgVcpu(machine.memory, 0)]
        if machine.cfg.cpus > 1:
            log.warning("the translator runs 1 vCPU for now; %d requested", machine.cfg.cpus)
        self.vcpus[0].set_cpuid(translator_cpuid(1))
        self._wakeups = [threading.Event() for _ in self.vcpus]
        self.timer_wheel = TimerWheel()
        # The platform devices KVM keeps in the kernel: 8259s, IOAPIC, LAPIC, PIT (and port 0x61).
        self.irqchip = SoftIrqChip(len(self.vcpus), cpu_kick=self._kick, timer_wheel=self.timer_wheel)
        self.irqchip.register(machine.pio_bus, machine.mmio_bus, port_b=True)
        self.platform = SoftPlatform(machine.memory, on_irq=self.irqchip.set_irq_level,
                                     on_msi=self.irqchip.send_msi)
        machine.memory.dma_listeners.append(self._dma_written)

    def _dma_written(self, gpa: int, length: int) -> None:
        # Device writes bypass the translator's write tracking: drop code translated there.
        for v in self.vcpus:
            v.invalidate_ram(gpa, length)

    def _kick(self, cpu: int) -> None:
        if 0 <= cpu < len(self.vcpus):
            self._wakeups[cpu].set()
            self.vcpus[cpu].kick()

    # --- hooks the vCPU thread calls ------------------------------------------------
    def vcpu_thread_started(self, index: int) -> None:
        self.irqchip.set_current_cpu(index)

    def pre_run(self, index: int) -> None:
        """Move interrupts the interrupt controllers have for this CPU into the CPU.

        The translator holds a requested vector until IF=1; acknowledging it here,
        before the guest can take it, is an approximation (the vector sits in the
        LAPIC's ISR slightly early)."""
        chip = self.irqchip
        while chip.has_pending(index):
            vector = chip.intr_ack(index)
            if vector < 0:
                break
            self.vcpus[index].request_interrupt(vector)

    def wait_halted(self, index: int) -> None:
        wake = self._wakeups[index]
        if not self.irqchip.has_pending(index):
            wake.wait(0.05)
        wake.clear()

    def load_boot_state(self, boot) -> None:
        v = self.vcpus[0]
        v.set_sregs(boot.sregs)
        v.set_regs(boot.regs)

    def reset(self) -> None:
        self.irqchip.reset()
        # The loader rewrites guest RAM from Python, behind the translator's back:
        # drop every translated block.
        for v in self.vcpus:
            for region in self.machine.memory.regions:
                v.invalidate_ram(region.gpa, region.size)

    def close(self) -> None:
        if self._dma_written in self.machine.memory.dma_listeners:
            self.machine.memory.dma_listeners.remove(self._dma_written)
        self.platform.close()
        self.irqchip.close()
        self.timer_wheel.close()
        for v in self.vcpus:          # before guest RAM goes: the vCPU holds exports of it
            v.close()
