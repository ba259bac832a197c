"""The C translator as the machine's accelerator (no KVM needed).

Interrupt lines and MSIs land in a SoftPlatform; until the software interrupt
controllers exist (the Linux-on-translator work), the translator runs guests
that poll their devices, and only the bootstrap vCPU runs.
"""

from __future__ import annotations

import logging

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
        self.machine = machine
        self.platform = SoftPlatform(machine.memory, on_irq=self._irq, on_msi=self._msi)
        self.vcpus = [TcgVcpu(machine.memory, 0)]
        if machine.cfg.cpus > 1:
            log.warning("the translator runs 1 vCPU for now; %d requested", machine.cfg.cpus)
        self.vcpus[0].set_cpuid(translator_cpuid(1))

    def _irq(self, gsi: int, level: bool) -> None:
        pass

    def _msi(self, address: int, data: int) -> None:
        vector = data & 0xFF
        if vector >= 16:
            self.vcpus[0].request_interrupt(vector)

    def load_boot_state(self, boot) -> None:
        v = self.vcpus[0]
        v.set_sregs(boot.sregs)
        v.set_regs(boot.regs)

    def reset(self) -> None:
        # The loader rewrites guest RAM from Python, behind the translator's back:
        # drop every translated block.
        for v in self.vcpus:
            for region in self.machine.memory.regions:
                v.invalidate_ram(region.gpa, region.size)

    def close(self) -> None:
        self.platform.close()
