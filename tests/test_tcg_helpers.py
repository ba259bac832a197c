"""Shared setup for the translator tests: guest RAM, page tables, CPU modes.

Imported by tests/test_tcg_*.py (pytest puts tests/ on sys.path); holds no tests.
"""

from __future__ import annotations

import pytest

from kvmpy.memory import GuestMemory
from kvmpy.vcpu.state import Regs, Segment, flat_segment

tcg = pytest.importorskip("kvmpy.vcpu.tcg")
if tcg._tcg is None:  # pragma: no cover
    pytest.skip(f"kvmpy._tcg not built: {tcg._IMPORT_ERROR}", allow_module_level=True)

TcgVcpu = tcg.TcgVcpu

PML4 = 0x1000
PDPT = 0x2000
PD = 0x3000


def make_memory(size: int = 4 << 20) -> GuestMemory:
    return GuestMemory.anonymous([(0, size)])


def identity_map_2m(mem: GuestMemory, gib: int = 1) -> None:
    """Identity-map the first `gib` GiB with 2 MiB pages (PML4 0x1000, PDPT 0x2000, PD 0x3000...)."""
    mem.write_u64(PML4, PDPT | 3)
    for g in range(gib):
        mem.write_u64(PDPT + 8 * g, (PD + 0x1000 * g) | 3)
        for i in range(512):
            mem.write_u64(PD + 0x1000 * g + 8 * i, ((g << 30) | (i << 21)) | 0x83)


def set_long_mode(vcpu, cr3: int = PML4, cpl: int = 0) -> None:
    sr = vcpu.get_sregs()
    sr.cs = flat_segment(0x8 | cpl, True, True)
    sr.cs.dpl = cpl
    data = flat_segment(0x10 | cpl, False, True)
    data.dpl = cpl
    sr.ds = sr.es = sr.ss = sr.fs = sr.gs = data
    sr.cr0 = 0x80050033
    sr.cr3 = cr3
    sr.cr4 = 0x6A0   # PAE PGE OSFXSR OSXMMEXCPT
    sr.efer = 0xD01  # SCE LME LMA NXE
    vcpu.set_sregs(sr)


def set_protected_flat(vcpu) -> None:
    sr = vcpu.get_sregs()
    sr.cs = flat_segment(0x8, True, False)
    sr.ds = sr.es = sr.ss = sr.fs = sr.gs = flat_segment(0x10, False, False)
    sr.cr0 = 0x60000011
    sr.cr4 = 0x600
    sr.efer = 0
    vcpu.set_sregs(sr)


def set_real_mode(vcpu, cs: int = 0) -> None:
    sr = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        seg = Segment(base=(cs << 4) if name == "cs" else 0, limit=0xFFFF,
                      selector=cs if name == "cs" else 0, type=0xB if name == "cs" else 3)
        setattr(sr, name, seg)
    sr.cr0 = 0x60000010
    sr.cr4 = 0
    sr.efer = 0
    sr.idt.base = 0
    sr.idt.limit = 0x3FF
    vcpu.set_sregs(sr)


def regs(**kw) -> Regs:
    r = Regs()
    for k, v in kw.items():
        setattr(r, k, v)
    return r
