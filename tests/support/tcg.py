"""Shared setup for the translator tests: guest RAM, page tables, CPU modes.

Imported by tests/test_tcg_*.py (pytest puts tests/ on sys.path); holds no tests.
"""

from __future__ import annotations

import pytest

from kvmpy.memory import GuestMemory
from kvmpy.hv.regs import Regs, Segment, flat_segment

tcg = pytest.importorskip("kvmpy.hv.tcg.vcpu")
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


def set_protected_flat(vcpu, data_selector: int = 0x10, cr0: int = 0x60000011, cr4: int = 0x600) -> None:
    """32-bit protected mode, flat code at selector 8 and flat data, no paging."""
    sr = vcpu.get_sregs()
    sr.cs = flat_segment(0x8, True, False)
    sr.ds = sr.es = sr.ss = sr.fs = sr.gs = flat_segment(data_selector, False, False)
    sr.cr0 = cr0
    sr.cr4 = cr4
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


def assemble(source: str, org: int, bits: int = 64):
    """GNU as + ld into a flat binary at `org`; returns (bytes, {symbol: address}).

    binutils is a build dependency of the project (Makefile APT_PACKAGES); the
    tests skip visibly where it is missing.
    """
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    if not shutil.which("as") or not shutil.which("ld") or not shutil.which("objcopy"):
        pytest.skip("binutils (as/ld/objcopy) not installed")
    code = {16: ".code16", 32: ".code32", 64: ".code64"}[bits]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "t.s").write_text(f".intel_syntax noprefix\n{code}\n.globl _start\n_start:\n{source}\n")
        subprocess.run(["as", "--64", "-o", str(d / "t.o"), str(d / "t.s")], check=True,
                       capture_output=True)
        subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext", hex(org), "-e", "_start", "-o",
                        str(d / "t.elf"), str(d / "t.o")], check=True, capture_output=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(d / "t.elf"), str(d / "t.bin")],
                       check=True, capture_output=True)
        nm = subprocess.run(["nm", str(d / "t.elf")], check=True, capture_output=True, text=True).stdout
        syms = {}
        for line in nm.splitlines():
            parts = line.split()
            if len(parts) == 3:
                syms[parts[2]] = int(parts[0], 16)
        return (d / "t.bin").read_bytes(), syms


def idt64_gate(handler: int, selector: int = 0x8, ist: int = 0, dpl: int = 0, trap: bool = False) -> bytes:
    import struct
    typ = 0xF if trap else 0xE
    attr = 0x80 | (dpl << 5) | typ
    return struct.pack("<HHBBHII", handler & 0xFFFF, selector, ist, attr, (handler >> 16) & 0xFFFF,
                       handler >> 32, 0)


# GDT used by the long-mode system tests: null, code64 (0x08), data (0x10),
# user data (0x1b), user code64 (0x23), TSS (0x28, 16 bytes)
GDT_ENTRIES = [0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00CFF2000000FFFF, 0x00AFFA000000FFFF]


def tss_descriptor(base: int, limit: int = 0x67):
    lo = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89 << 40) | (((limit >> 16) & 0xF) << 48) | \
        (((base >> 24) & 0xFF) << 56)
    return [lo, base >> 32]
