"""Per-vCPU CPUID, MSRs and LAPIC set-up for KVM, as a PC BIOS and QEMU leave them."""

from __future__ import annotations

from .api import KvmVcpu

MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102

MISC_ENABLE_FAST_STRING = 1
MTRR_ENABLE_WRITEBACK_DEFAULT = (1 << 11) | 6

APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_EXTINT = 0x7
APIC_MODE_NMI = 0x4

Cpuid = list[tuple[int, int, int, int, int, int, int]]


def _bits_for(n: int) -> int:
    return max(0, (n - 1).bit_length())


CPUID_1_ECX_TSC_DEADLINE = 1 << 24


def cpuid_for_vcpu(supported: Cpuid, index: int, num_cpus: int, tsc_deadline: bool = False) -> Cpuid:
    """KVM's supported CPUID, with this vCPU's APIC id and the topology filled in.

    ``tsc_deadline``: KVM_CAP_TSC_DEADLINE_TIMER, the in-kernel LAPIC's TSC-deadline
    mode, which KVM_GET_SUPPORTED_CPUID leaves out for the VMM to announce (QEMU
    does). With it Linux skips calibrating the LAPIC timer against the PM timer."""
    out: Cpuid = []
    shift = _bits_for(num_cpus)
    for fn, idx, flags, a, b, c, d in supported:
        if fn == 1:
            b = (b & 0x0000FFFF) | (index << 24) | ((num_cpus & 0xFF) << 16)
            if num_cpus > 1:
                d |= 1 << 28                      # HTT: the logical count above is valid
            c |= 1 << 31                          # running under a hypervisor
            if tsc_deadline:
                c |= CPUID_1_ECX_TSC_DEADLINE
        elif fn == 0xB or fn == 0x1F:
            # x2APIC topology: one thread per core, num_cpus cores in one package.
            if idx == 0:
                a, b, c = 0, 1, (1 << 8) | idx
            elif idx == 1:
                a, b, c = shift, num_cpus, (2 << 8) | idx
            else:
                a, b, c = 0, 0, idx
            d = index
        elif fn == 4 and (a & 0x1F):
            a = (a & 0x03FFFFFF) | (((num_cpus - 1) & 0x3F) << 26)
        elif fn == 0x80000008:
            c = (c & ~0xF0FF) | ((num_cpus - 1) & 0xFF) | (shift << 12)
        elif fn == 0x8000001E:
            a = index
            b = (b & ~0xFF) | index
        out.append((fn, idx, flags, a, b, c, d))
    return out


# MAXPHYADDR of a CPU without leaf 0x80000008 that has PAE (Intel SDM vol. 3A 4.1.4),
# as every CPU that runs 64-bit code has.
PHYS_BITS_WITHOUT_LEAF = 36


def announced_phys_bits(cpuid: Cpuid) -> int:
    """The physical address width a guest reads from this CPUID (0x80000008 EAX[7:0])."""
    for fn, _idx, _flags, a, _b, _c, _d in cpuid:
        if fn == 0x80000008 and a & 0xFF:
            return a & 0xFF
    return PHYS_BITS_WITHOUT_LEAF


BOOT_MSRS = {
    MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0, MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0,
    MSR_IA32_TSC: 0, MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
    MSR_MTRR_DEF_TYPE: MTRR_ENABLE_WRITEBACK_DEFAULT,
}


def boot_msrs(available: list[int]) -> dict[int, int]:
    have = set(available)
    return {k: v for k, v in BOOT_MSRS.items() if k in have}


def setup_lapic(vcpu: KvmVcpu) -> None:
    """LINT0 as ExtINT (the 8259 path) and LINT1 as NMI, as the BIOS programs them."""
    regs = vcpu.get_lapic()

    def set_mode(off: int, mode: int) -> None:
        v = int.from_bytes(regs[off:off + 4], "little")
        v = (v & ~0x700) | (mode << 8)
        regs[off:off + 4] = v.to_bytes(4, "little")

    set_mode(APIC_LVT_LINT0, APIC_MODE_EXTINT)
    set_mode(APIC_LVT_LINT1, APIC_MODE_NMI)
    vcpu.set_lapic(bytes(regs))
