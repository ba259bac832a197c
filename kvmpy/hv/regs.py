"""Architectural vCPU state, shared by the KVM and translator backends.

Field names follow struct kvm_regs / kvm_sregs so both backends convert 1:1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")


@dataclass
class Regs:
    """A vCPU's general-purpose registers, rip and rflags (KVM's struct kvm_regs)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2


@dataclass
class Segment:
    """One segment register with its hidden descriptor part (KVM's struct kvm_segment)."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 0      # 4-bit descriptor type
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1         # code/data (1) vs system (0)
    l: int = 0
    g: int = 0
    avl: int = 0
    unusable: int = 0


@dataclass
class DTable:
    """The GDT or IDT register: base and limit (KVM's struct kvm_dtable)."""

    base: int = 0
    limit: int = 0xFFFF


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


@dataclass
class SRegs:
    """A vCPU's segment, descriptor-table and control registers (KVM's struct kvm_sregs)."""

    cs: Segment = field(default_factory=lambda: Segment(type=0xB))
    ds: Segment = field(default_factory=lambda: Segment(type=3))
    es: Segment = field(default_factory=lambda: Segment(type=3))
    fs: Segment = field(default_factory=lambda: Segment(type=3))
    gs: Segment = field(default_factory=lambda: Segment(type=3))
    ss: Segment = field(default_factory=lambda: Segment(type=3))
    tr: Segment = field(default_factory=lambda: Segment(type=0xB, s=0))
    ldt: Segment = field(default_factory=lambda: Segment(type=2, s=0))
    gdt: DTable = field(default_factory=DTable)
    idt: DTable = field(default_factory=DTable)
    cr0: int = 0x60000010
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0xFEE00900


def flat_segment(selector: int, code: bool, long_mode: bool) -> Segment:
    """A flat 4 GiB segment as the boot protocols require (base 0, limit max, granular)."""
    return Segment(base=0, limit=0xFFFFFFFF, selector=selector,
                   type=0xB if code else 0x3, present=1, dpl=0,
                   db=0 if (code and long_mode) else 1, s=1,
                   l=1 if (code and long_mode) else 0, g=1)


def copy_fields(src, dst) -> None:
    for f in fields(src):
        setattr(dst, f.name, getattr(src, f.name))
