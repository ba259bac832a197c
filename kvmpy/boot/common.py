"""Pieces both boot protocols share: GDT, identity page tables, initial register state."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..memory import GuestMemory
from ..hv.regs import DTable, Regs, Segment, SRegs, flat_segment
from . import layout

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10


@dataclass
class BootState:
    """What the loader leaves for the bootstrap vCPU."""
    regs: Regs
    sregs: SRegs
    entry: int
    kernel_end: int = 0
    notes: list[str] = field(default_factory=list)


def _gdt_entry(flags: int, base: int, limit: int) -> int:
    return (((base & 0xFF000000) << 32) | ((flags & 0xF0FF) << 40) | ((limit & 0xF0000) << 32)
            | ((base & 0x00FFFFFF) << 16) | (limit & 0xFFFF))


def write_gdt(memory: GuestMemory) -> None:
    # null, null, code (0x10), data (0x18), TSS (0x20): the selectors both the
    # Linux 64-bit boot protocol (__BOOT_CS/__BOOT_DS) and PVH expect.
    gdt = [
        0,
        0,
        _gdt_entry(0xA09B, 0, 0xFFFFF),   # 64-bit code; for PVH replaced with 32-bit below
        _gdt_entry(0xC093, 0, 0xFFFFF),
        _gdt_entry(0x808B, 0, 0xFFFFF),
    ]
    memory.write(layout.GDT_ADDR, b"".join(struct.pack("<Q", e) for e in gdt))


def write_gdt32(memory: GuestMemory) -> None:
    gdt = [0, 0, _gdt_entry(0xC09B, 0, 0xFFFFF), _gdt_entry(0xC093, 0, 0xFFFFF), _gdt_entry(0x808B, 0, 0xFFFFF)]
    memory.write(layout.GDT_ADDR, b"".join(struct.pack("<Q", e) for e in gdt))


def write_identity_page_tables(memory: GuestMemory) -> None:
    """Identity-map the first 4 GiB with 2 MiB pages (PML4 -> PDPT -> 4 PDs)."""
    memory.write(layout.PML4_ADDR, struct.pack("<Q", layout.PDPT_ADDR | 0x3) + bytes(4088))
    memory.write(layout.PDPT_ADDR, b"".join(struct.pack("<Q", (layout.PD_ADDR + i * 0x1000) | 0x3)
                                           for i in range(4)) + bytes(4096 - 32))
    entries = struct.pack("<2048Q", *[(i << 21) | 0x83 for i in range(2048)])
    memory.write(layout.PD_ADDR, entries)


def _tss_segment() -> Segment:
    return Segment(base=0, limit=0xFFFFF, selector=layout.BOOT_TSS, type=0xB, present=1, s=0, g=1)


def _flat_sregs(long_mode: bool) -> SRegs:
    """Flat code and data over the boot GDT; paging (the boot page tables) only in long mode."""
    code = flat_segment(layout.BOOT_CS, code=True, long_mode=long_mode)
    data = flat_segment(layout.BOOT_DS, code=False, long_mode=long_mode)
    sregs = SRegs(cs=code, ds=data, es=data, fs=data, gs=data, ss=data,
                  tr=_tss_segment(), ldt=Segment(type=2, s=0, present=1, limit=0xFFFF),
                  gdt=DTable(layout.GDT_ADDR, 5 * 8 - 1), idt=DTable(layout.IDT_ADDR, 0),
                  cr0=CR0_PE | CR0_ET, cr3=0, cr4=0, efer=0)
    if long_mode:
        sregs.cr0 |= CR0_PG
        sregs.cr3, sregs.cr4, sregs.efer = layout.PML4_ADDR, CR4_PAE, EFER_LME | EFER_LMA
    return sregs


def long_mode_sregs() -> SRegs:
    return _flat_sregs(long_mode=True)


def protected_mode_sregs() -> SRegs:
    return _flat_sregs(long_mode=False)


def write_cmdline(memory: GuestMemory, cmdline: str, limit: int = layout.CMDLINE_MAX) -> int:
    data = cmdline.encode() + b"\0"
    if len(data) > limit:
        from ..errors import BootError
        raise BootError(f"kernel command line is {len(data) - 1} bytes; this kernel accepts at most {limit - 1}")
    memory.write(layout.CMDLINE_ADDR, data)
    return layout.CMDLINE_ADDR


def place_initrd(memory: GuestMemory, data_len: int, low: int, high_limit: int, what: str) -> int:
    """Highest page-aligned address for an initrd of ``data_len`` bytes that stays
    below ``high_limit``, inside low RAM and above ``low``."""
    from ..errors import BootError
    low_ram_end = max(r.end for r in memory.regions if r.gpa < layout.PCI_HOLE_START)
    top = min(high_limit + 1, low_ram_end)
    addr = (top - data_len) & ~0xFFF
    if addr < low:
        raise BootError(f"{what}: {data_len} bytes do not fit in guest RAM below {top:#x} "
                        f"after the kernel (ends at {low:#x}); give the guest more memory (-m)")
    return addr
