"""System-level behaviour of the translator, on small hand-written programs.

Mode switches (real -> protected -> long), page faults (CR2 and error codes), IDT
delivery with privilege change / IST and iretq, syscall/sysret/swapgs, port I/O and
MMIO exits completed by the loop, HLT and interrupts, kick() from another thread,
self-modifying code, triple fault, #UD for undecodable bytes.
"""

from __future__ import annotations

import struct
import threading
import time

import pytest

from support.tcg import (GDT_ENTRIES, TcgVcpu, assemble, idt64_gate, make_memory, regs,
                              set_real_mode, tss_descriptor)
from kvmpy.hv import exits
from kvmpy.hv.regs import DTable, Segment, flat_segment

CODE = 0x100000
GDT = 0x5000
TSS = 0x5800
IDT = 0x6000
PML4, PDPT, PD, PT = 0x1000, 0x2000, 0x3000, 0x4000
KSTACK = 0x90000
ISTSTACK = 0x80000
USTACK = 0x2F0000
LOG = 0x70000
MMIO = 0x10000000

# 4 KiB pages in [0x200000, 0x400000): special pages for the fault tests
NOT_PRESENT = 0x201000
READ_ONLY = 0x202000
SUPERVISOR = 0x203000
NO_EXEC = 0x204000


class LongMachine:
    """4 MiB of RAM, identity mapped (user-accessible 2 MiB pages, 4 KiB pages at 2 MiB),
    GDT with user segments and a TSS, an IDT filled from the program's handler symbols."""

    def __init__(self, source: str, handlers: dict[int, tuple] | None = None, idt_limit=None):
        self.mem = make_memory(4 << 20)
        self.code, self.syms = assemble(source, CODE)
        self.mem.write(CODE, self.code)
        m = self.mem
        m.write_u64(PML4, PDPT | 7)
        m.write_u64(PDPT, PD | 7)
        for i in range(512):
            m.write_u64(PD + 8 * i, (i << 21) | 0x87)
        m.write_u64(PD + 8, PT | 7)
        for i in range(512):
            pa = 0x200000 + (i << 12)
            flags = 0x7
            if pa == NOT_PRESENT:
                flags = 0
            elif pa == READ_ONLY:
                flags = 0x5
            elif pa == SUPERVISOR:
                flags = 0x3
            m.write_u64(PT + 8 * i, pa | flags | ((1 << 63) if pa == NO_EXEC else 0))
        gdt = GDT_ENTRIES + tss_descriptor(TSS)
        m.write(GDT, b"".join(struct.pack("<Q", e) for e in gdt))
        tss = bytearray(0x68)
        struct.pack_into("<Q", tss, 4, KSTACK)       # rsp0
        struct.pack_into("<Q", tss, 0x24, ISTSTACK)  # ist1
        m.write(TSS, bytes(tss))
        for vec, spec in (handlers or {}).items():
            name, *opts = spec
            ist = opts[0] if opts else 0
            dpl = opts[1] if len(opts) > 1 else 0
            m.write(IDT + 16 * vec, idt64_gate(self.syms[name], ist=ist, dpl=dpl))
        self.vcpu = TcgVcpu(m)
        sr = self.vcpu.get_sregs()
        sr.cs = flat_segment(0x8, True, True)
        sr.ds = sr.es = sr.ss = sr.fs = sr.gs = flat_segment(0x10, False, True)
        sr.tr = Segment(base=TSS, limit=0x67, selector=0x28, type=0xB, s=0, present=1)
        sr.gdt = DTable(GDT, 8 * len(gdt) - 1)
        sr.idt = DTable(IDT, 0xFFF if idt_limit is None else idt_limit)
        sr.cr0 = 0x80050033
        sr.cr3 = PML4
        sr.cr4 = 0x6A0
        sr.efer = 0xD01
        self.vcpu.set_sregs(sr)
        self.vcpu.set_regs(regs(rip=self.syms["_start"], rsp=KSTACK, rflags=2))

    def run(self):
        return self.vcpu.run()

    def regs(self):
        return self.vcpu.get_regs()

    def close(self):
        self.vcpu.close()
        self.mem.close()


@pytest.fixture
def machines():
    made = []

    def make(*a, **kw):
        m = LongMachine(*a, **kw)
        made.append(m)
        return m
    yield make
    for m in made:
        m.close()


def test_real_to_protected_to_long_mode():
    mem = make_memory(4 << 20)
    mem.write_u64(PML4, PDPT | 3)
    mem.write_u64(PDPT, PD | 3)
    for i in range(512):
        mem.write_u64(PD + 8 * i, (i << 21) | 0x83)
    src = """
        cli
        xor ax, ax
        mov ds, ax
        mov ss, ax
        mov sp, 0x7000
        int 0x40                       # real-mode IVT delivery
        lgdt [gdtr]
        mov eax, cr0
        or eax, 1
        mov cr0, eax
        .byte 0x66, 0xea               # ljmp 0x08:pm32 (ptr16:32)
        .long pm32
        .word 0x08
    rm_handler:
        mov bx, 0x1234
        iret
    .code32
    pm32:
        mov ax, 0x10
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov esp, 0x8000
        push 0xabcdef                  # 32-bit stack works
        pop esi
        mov eax, cr4
        or eax, 0x20
        mov cr4, eax
        mov eax, 0x1000
        mov cr3, eax
        mov ecx, 0xC0000080
        rdmsr
        or eax, 0x100
        wrmsr
        mov eax, cr0
        or eax, 0x80000000
        mov cr0, eax
        .byte 0xea                     # ljmp 0x18:lm64
        .long lm64
        .word 0x18
    .code64
    lm64:
        mov rax, 0x1122334455667788
        lea rdx, [rip + lm64]
        hlt
    .balign 8
    gdt:
        .quad 0
        .quad 0x00CF9A000000FFFF
        .quad 0x00CF92000000FFFF
        .quad 0x00AF9A000000FFFF
    gdtr:
        .word 31
        .long gdt
    """
    code, syms = assemble(src, 0x7000, bits=16)
    mem.write(0x7000, code)
    mem.write_u32(0x40 * 4, (0 << 16) | syms["rm_handler"])   # IVT[0x40] = 0000:rm_handler
    vcpu = TcgVcpu(mem)
    try:
        set_real_mode(vcpu)
        vcpu.set_regs(regs(rip=0x7000, rflags=2))
        assert vcpu.run() == exits.EXIT_HLT
        r = vcpu.get_regs()
        sr = vcpu.get_sregs()
        assert r.rbx & 0xFFFF == 0x1234
        assert r.rsi == 0xABCDEF
        assert r.rax == 0x1122334455667788
        assert r.rdx == syms["lm64"]
        assert sr.cs.l == 1 and sr.cs.selector == 0x18
        assert sr.efer & 0x500 == 0x500      # LME and LMA
        assert sr.cr0 & 0x80000001 == 0x80000001
    finally:
        vcpu.close()
        mem.close()


PF_HANDLER = """
    pf_handler:
        pop rax                        # error code
        mov [rdi], rax
        mov rax, cr2
        mov [rdi + 8], rax
        mov [rdi + 16], rsp
        mov rax, [rsp + 8]             # saved CS
        mov [rdi + 24], rax
        add rdi, 32
        mov [rsp], r15                 # resume at the recovery label
        iretq
"""


def read_log(m, n):
    return [struct.unpack_from("<QQQQ", m.mem.read(LOG + 32 * k, 32)) for k in range(n)]


def test_page_faults_supervisor(machines):
    src = f"""
        mov rdi, {LOG}
        lea r15, [rip + 1f]
        mov rax, [{NOT_PRESENT + 0x10}]
    1:  lea r15, [rip + 2f]
        mov qword ptr [{READ_ONLY + 8}], 1
    2:  lea r15, [rip + 3f]
        mov rax, {NO_EXEC}
        call rax
    3:  lea r15, [rip + 4f]
        mov byte ptr [{NOT_PRESENT + 0xff}], 1
    4:  mov rax, cr0
        and eax, 0xfffeffff            # clear WP: supervisor writes to read-only pages succeed
        mov cr0, rax
        mov qword ptr [{READ_ONLY + 16}], 0x77
        hlt
    {PF_HANDLER}
    """
    m = machines(src, {14: ("pf_handler",)})
    assert m.run() == exits.EXIT_HLT
    log = read_log(m, 4)
    assert [(e, cr2) for e, cr2, _, _ in log] == [
        (0x0, NOT_PRESENT + 0x10),
        (0x3, READ_ONLY + 8),
        (0x11, NO_EXEC),
        (0x2, NOT_PRESENT + 0xFF),
    ]
    assert m.regs().rdi == LOG + 4 * 32
    assert m.mem.read_u64(READ_ONLY + 16) == 0x77
    assert m.vcpu.get_sregs().cr2 == NOT_PRESENT + 0xFF


def test_user_mode_faults_switch_stack_and_report_user_bit(machines):
    src = f"""
        mov rdi, {LOG}
        push 0x1b                      # ss: user data
        push {USTACK}
        push 0x2                       # rflags
        push 0x23                      # cs: user code64
        lea rax, [rip + user]
        push rax
        iretq
    user:
        lea r15, [rip + 1f]
        mov rax, [{SUPERVISOR}]        # user read of a supervisor page: P|U
    1:  lea r15, [rip + 2f]
        mov qword ptr [{READ_ONLY}], 5 # user write to read-only page: P|W|U
    2:  lea r15, [rip + 3f]
        mov rax, [{NOT_PRESENT}]       # not present from user: U
    3:  mov rbx, rsp
        hlt                            # privileged: #GP(0) from ring 3
    gp_handler:
        pop rax
        mov [rdi], rax
        mov rax, [rsp + 8]
        mov [rdi + 8], rax             # CS of the interrupted code
        mov rax, [rsp + 32]
        mov [rdi + 16], rax            # SS
        mov [rdi + 24], rsp
        hlt
    {PF_HANDLER}
    """
    m = machines(src, {14: ("pf_handler",), 13: ("gp_handler",)})
    assert m.run() == exits.EXIT_HLT
    log = read_log(m, 4)
    frame_rsp = KSTACK - 5 * 8     # after the handler popped the error code
    assert log[0] == (0x5, SUPERVISOR, frame_rsp, 0x23)
    assert log[1] == (0x7, READ_ONLY, frame_rsp, 0x23)
    assert log[2] == (0x4, NOT_PRESENT, frame_rsp, 0x23)
    err, cs, ss, rsp = log[3]
    assert (err, cs, ss) == (0, 0x23, 0x1B)
    assert rsp == frame_rsp
    assert m.regs().rbx == USTACK
    sr = m.vcpu.get_sregs()
    assert sr.cs.selector == 0x8 and sr.cs.dpl == 0


def test_idt_delivery_ist_and_iretq(machines):
    src = """
        mov rbx, 0
        mov rsp, 0x90000
        pushfq
        pop r10
        int 0x80
        int 0x80
    ret1:
        int 0x81                       # IST 1
        pushfq
        pop r11
        mov r12, rsp
        hlt
    h80:
        add rbx, 1
        mov r8, [rsp]                  # return rip
        iretq
    h81:
        mov r9, rsp
        iretq
    """
    m = machines(src, {0x80: ("h80",), 0x81: ("h81", 1)})
    assert m.run() == exits.EXIT_HLT
    r = m.regs()
    assert r.rbx == 2
    assert r.r8 == m.syms["ret1"]
    assert r.r9 == ISTSTACK - 5 * 8
    assert r.r10 == r.r11
    assert r.r12 == 0x90000


def test_syscall_sysret_swapgs(machines):
    src = """
        mov r12, 0
        mov rcx, 0x20000              # user rip placeholder, replaced below
        lea rcx, [rip + user]
        mov r11, 0x202
        sysretq                        # enter ring 3
    user:
        mov rdi, 5
        mov r13, cs
        syscall
        mov rsi, rdi
        mov rdx, cs
        syscall                        # second call halts in the kernel
    entry:
        swapgs
        mov r14, gs:[0]
        swapgs
        inc r12
        cmp r12, 2
        je done
        add rdi, 100
        mov r9, rcx
        mov r10, r11
        sysretq
    done:
        mov rbp, cs
        hlt
    """
    m = machines(src)
    m.vcpu.set_msrs({0xC0000081: (0x10 << 48) | (0x08 << 32), 0xC0000082: m.syms["entry"],
                     0xC0000084: 0x200, 0xC0000102: 0x60000, 0xC0000101: 0})
    m.mem.write_u64(0x60000, 0xFEEDFACE)
    assert m.run() == exits.EXIT_HLT
    r = m.regs()
    assert r.r12 == 2
    assert r.rsi == 105
    assert r.r13 == 0x23 and r.rdx == 0x23 and r.rbp == 0x08
    assert r.r14 == 0xFEEDFACE
    assert r.r9 == m.syms["user"] + 7 + 3 + 2     # return rip after the first syscall
    assert r.r10 & 0x200                           # user rflags saved in r11 (IF set)
    assert m.vcpu.get_msrs([0xC0000101])[0xC0000101] == 0   # swapgs pairs restored GS base


def test_port_io_exits_and_completion(machines):
    src = """
        mov al, 0x42
        out 0x80, al
        in al, 0x71
        mov r8, rax
        mov dx, 0x3f8
        lea rsi, [rip + msg]
        mov rcx, 5
        rep outsb
        mov dx, 0x60
        mov rdi, 0x70000
        mov rcx, 4
        rep insb
        mov eax, 0x12345678
        out dx, eax
        in ax, dx
        hlt
    msg: .ascii "hello"
    """
    m = machines(src)
    v = m.vcpu
    assert m.run() == exits.EXIT_IO
    assert (v.io_port, v.io_size, v.io_write, v.io_count, bytes(v.io_data)) == (0x80, 1, True, 1, b"\x42")
    assert m.run() == exits.EXIT_IO
    assert (v.io_port, v.io_size, v.io_write, v.io_count) == (0x71, 1, False, 1)
    v.io_data[:] = b"\x99"
    assert m.run() == exits.EXIT_IO
    assert m.regs().r8 & 0xFF == 0x99
    assert (v.io_port, v.io_write, v.io_count, bytes(v.io_data)) == (0x3F8, True, 5, b"hello")
    assert m.run() == exits.EXIT_IO
    assert (v.io_port, v.io_write, v.io_size, v.io_count) == (0x60, False, 1, 4)
    v.io_data[:] = b"WXYZ"
    assert m.run() == exits.EXIT_IO
    assert m.mem.read(0x70000, 4) == b"WXYZ"
    assert m.regs().rcx == 0
    assert (v.io_port, v.io_size, v.io_write, bytes(v.io_data)) == (0x60, 4, True, struct.pack("<I", 0x12345678))
    assert m.run() == exits.EXIT_IO
    assert (v.io_size, v.io_write) == (2, False)
    v.io_data[:] = b"\xcd\xab"
    assert m.run() == exits.EXIT_HLT
    assert m.regs().rax & 0xFFFFFFFF == 0x1234ABCD


def test_mmio_exits_outside_ram(machines):
    src = f"""
        mov rbx, 0x0102030405060708
        mov eax, [{MMIO}]
        mov [{MMIO + 8}], rbx
        add dword ptr [{MMIO + 16}], 5
        mov rcx, 0xabc
        hlt
    """
    m = machines(src)
    v = m.vcpu
    assert m.run() == exits.EXIT_MMIO
    assert (v.mmio_addr, v.mmio_size, v.mmio_write) == (MMIO, 4, False)
    v.mmio_data[:] = struct.pack("<I", 0xCAFEBABE)
    assert m.run() == exits.EXIT_MMIO
    assert m.regs().rax == 0xCAFEBABE
    assert (v.mmio_addr, v.mmio_size, v.mmio_write, bytes(v.mmio_data)) == \
        (MMIO + 8, 8, True, struct.pack("<Q", 0x0102030405060708))
    # read-modify-write: a read exit, then the write exit with the sum
    assert m.run() == exits.EXIT_MMIO
    assert (v.mmio_addr, v.mmio_size, v.mmio_write) == (MMIO + 16, 4, False)
    v.mmio_data[:] = struct.pack("<I", 10)
    assert m.run() == exits.EXIT_MMIO
    assert (v.mmio_addr, v.mmio_write, bytes(v.mmio_data)) == (MMIO + 16, True, struct.pack("<I", 15))
    assert m.run() == exits.EXIT_HLT
    assert m.regs().rcx == 0xABC


def test_hlt_and_request_interrupt_wakes_it(machines):
    src = """
        mov rsp, 0x90000
        sti
        hlt
        mov r8, 1
        cli
        hlt
    h40:
        mov rbx, 0x40
        iretq
    """
    m = machines(src, {0x40: ("h40",)})
    assert m.run() == exits.EXIT_HLT
    assert m.vcpu.halted
    assert m.run() == exits.EXIT_HLT         # nothing pending: stays halted
    m.vcpu.request_interrupt(0x40)
    assert m.run() == exits.EXIT_HLT
    r = m.regs()
    assert r.rbx == 0x40 and r.r8 == 1
    # IF=0 now: a pending interrupt does not wake the second hlt
    m.vcpu.request_interrupt(0x40)
    assert m.run() == exits.EXIT_HLT
    assert m.regs().r8 == 1 and m.regs().rip == r.rip


def test_interrupt_from_another_thread_during_run(machines):
    src = """
        mov rsp, 0x90000
        sti
    spin:
        cmp rbx, 0
        je spin
        hlt
    h41:
        mov rbx, 0x41
        iretq
    """
    m = machines(src, {0x41: ("h41",)})
    t = threading.Timer(0.05, m.vcpu.request_interrupt, args=(0x41,))
    t.start()
    assert m.run() == exits.EXIT_HLT
    assert m.regs().rbx == 0x41
    t.join()


def test_kick_from_another_thread(machines):
    m = machines("spin: jmp spin")
    m.vcpu.kick()
    assert m.run() == exits.EXIT_INTR          # a kick before run() is not lost
    t = threading.Timer(0.05, m.vcpu.kick)
    t0 = time.monotonic()
    t.start()
    assert m.run() == exits.EXIT_INTR
    assert time.monotonic() - t0 < 5
    assert m.regs().rip == m.syms["spin"]
    t.join()


def test_self_modifying_code(machines):
    src = """
        mov ecx, 3
        xor ebx, ebx
    again:
    patch:
        mov eax, 1
        add ebx, eax
        mov byte ptr [patch + 1], 10   # rewrite the immediate of an already translated block
        dec ecx
        jnz again
        mov byte ptr [target + 1], 7   # rewrite a later instruction of the running block
    target:
        mov edx, 1
        hlt
    """
    m = machines(src)
    assert m.run() == exits.EXIT_HLT
    r = m.regs()
    assert r.rbx == 21
    assert r.rdx == 7
    assert m.vcpu.stats()["invalidations"] >= 2


def test_triple_fault_shuts_down(machines):
    m = machines("ud2", idt_limit=0)
    assert m.run() == exits.EXIT_SHUTDOWN


def test_double_fault_delivered(machines):
    src = """
        mov rsp, 0x90000
        mov rax, 0x123456789
        mov rsp, 0x201800              # stack on a not-present page
        push rax                       # #PF, and delivering it faults again: #DF on IST1
        hlt
    df_handler:
        mov rbx, [rsp]                 # error code 0
        mov rcx, 0x88
        hlt
    pf_handler:
        hlt
    """
    m = machines(src, {8: ("df_handler", 1), 14: ("pf_handler",)})
    assert m.run() == exits.EXIT_HLT
    r = m.regs()
    assert r.rcx == 0x88 and r.rbx == 0
    assert r.rsp == ISTSTACK - 6 * 8


@pytest.mark.parametrize("bad", [b"\x0f\xff\x00", b"\xd6", b"\x0f\x0b", b"\x0f\x38\xff\xc0"])
def test_undecodable_raises_ud_in_guest(machines, bad):
    src = """
        mov rsp, 0x90000
        lea r15, [rip + after]
    bad:
        .byte """ + ", ".join(str(b) for b in bad) + """
    after:
        hlt
    ud_handler:
        mov rbx, [rsp]                 # faulting rip
        mov [rsp], r15
        iretq
    """
    m = machines(src, {6: ("ud_handler",)})
    assert m.run() == exits.EXIT_HLT
    assert m.regs().rbx == m.syms["bad"]


def test_cpuid_table_and_msrs(machines):
    m = machines("cpuid\nhlt")
    m.vcpu.set_cpuid([(0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),
                      (1, 0, 0, 0x806F8, 0, 0xFFFFFFFF, 0xFFFFFFFF)])
    m.vcpu.set_regs(regs(rip=m.syms["_start"], rsp=KSTACK, rflags=2, rax=1))
    assert m.run() == exits.EXIT_HLT
    r = m.regs()
    assert r.rax == 0x806F8
    assert r.rcx & (1 << 28) == 0          # AVX filtered out: the translator does not implement it
    assert r.rcx & (1 << 23)               # popcnt kept
    msrs = m.vcpu.get_msrs([0xC0000080, 0x277, 0x12345])
    assert msrs[0xC0000080] & 0x500 == 0x500
    assert 0x12345 not in msrs


def test_protected_mode_paging_32bit_pse_pae_and_idt32():
    """32-bit paging (4 KiB and 4 MiB PSE pages), PAE paging, 8-byte IDT gates and iret."""
    mem = make_memory(4 << 20)
    m = mem
    # non-PAE: PD at 0x1000; PDE0 -> PT 0x2000 (identity 4 KiB pages), PDE1 = 4 MiB page -> phys 0
    m.write_u32(0x1000, 0x2000 | 3)
    m.write_u32(0x1004, 0x0 | 0x83)
    for i in range(1024):
        pa = i << 12
        flags = 3
        if pa == 0x301000:
            flags = 0
        elif pa == 0x302000:
            flags = 1
        m.write_u32(0x2000 + 4 * i, pa | flags)
    # PAE: PDPT at 0x3000 (4 entries), PD 0x4000 identity 2 MiB pages, PDPTE1 -> PD 0x8000 -> phys 0
    m.write_u64(0x3000, 0x4000 | 1)
    m.write_u64(0x3008, 0x8000 | 1)
    for i in range(512):
        m.write_u64(0x4000 + 8 * i, (i << 21) | 0x83)
    m.write_u64(0x8000, 0x83)
    m.write(0x5000, struct.pack("<QQQ", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF))
    src = """
        mov esp, 0x90000
        mov eax, 0x1000
        mov cr3, eax
        mov eax, cr4
        or eax, 0x10                   # PSE
        mov cr4, eax
        mov eax, cr0
        or eax, 0x80010000             # PG | WP
        mov cr0, eax
        mov dword ptr [0x407000], 0x1234   # through the 4 MiB alias of physical 0
        mov edi, [0x7000]
        mov ebp, 0x70000
        lea esi, [1f]
        mov eax, [0x301008]
    1:  lea esi, [2f]
        mov dword ptr [0x302000], 1
    2:  int 0x30
        mov eax, cr0                   # PAE: paging off, CR4.PAE, PDPT, paging on
        and eax, 0x7fffffff
        mov cr0, eax
        mov eax, cr4
        or eax, 0x20
        mov cr4, eax
        mov eax, 0x3000
        mov cr3, eax
        mov eax, cr0
        or eax, 0x80000000
        mov cr0, eax
        mov edx, [0x40007000]          # PDPTE 1 maps 1 GiB -> physical 0
        hlt
    pf:
        pop eax
        mov [ebp], eax
        mov eax, cr2
        mov [ebp + 4], eax
        add ebp, 8
        mov [esp], esi
        iret
    int30:
        mov ebx, 0x30
        mov ecx, [esp + 4]             # CS pushed by the gate
        iret
    """
    code, syms = assemble(src, CODE, bits=32)
    m.write(CODE, code)
    for vec, name in ((14, "pf"), (0x30, "int30")):
        h = syms[name]
        m.write(IDT + 8 * vec, struct.pack("<HHBBH", h & 0xFFFF, 0x08, 0, 0x8E, h >> 16))
    vcpu = TcgVcpu(mem)
    try:
        sr = vcpu.get_sregs()
        sr.cs = flat_segment(0x8, True, False)
        sr.ds = sr.es = sr.ss = sr.fs = sr.gs = flat_segment(0x10, False, False)
        sr.gdt = DTable(0x5000, 23)
        sr.idt = DTable(IDT, 0x7FF)
        sr.cr0 = 0x11
        sr.cr4 = 0
        sr.efer = 0
        vcpu.set_sregs(sr)
        vcpu.set_regs(regs(rip=CODE, rflags=2))
        assert vcpu.run() == exits.EXIT_HLT
        r = vcpu.get_regs()
        assert r.rdi == 0x1234
        assert struct.unpack("<IIII", mem.read(0x70000, 16)) == (0, 0x301008, 3, 0x302000)
        assert r.rbx == 0x30 and r.rcx == 0x08
        assert r.rdx == 0x1234
        assert vcpu.get_sregs().cr4 & 0x20
    finally:
        vcpu.close()
        mem.close()


def test_rep_movs_stos_bulk_and_smc(machines):
    """Page-chunked rep movs/stos match element-wise semantics, incl. overlap and code pages."""
    src = """
        cld
        mov rdi, 0x180800              # stos across a page boundary
        mov rax, 0x1122334455667788
        mov rcx, 0x300
        rep stosq
        mov rsi, 0x180800              # copy it elsewhere
        mov rdi, 0x1A0000
        mov rcx, 0x1800
        rep movsb
        mov rsi, 0x1C0000              # forward overlap replicates the first bytes
        mov byte ptr [rsi], 0xAB
        mov byte ptr [rsi + 1], 0xCD
        lea rdi, [rsi + 2]
        mov rcx, 100
        rep movsb
        lea rdi, [rip + patch + 1]     # rep stos over translated code
        mov al, 9
        mov rcx, 2
        rep stosb
    patch:
        mov ebx, 1
        hlt
    """
    m = machines(src)
    assert m.run() == exits.EXIT_HLT
    pattern = struct.pack("<Q", 0x1122334455667788) * 0x300
    assert m.mem.read(0x180800, len(pattern)) == pattern
    assert m.mem.read(0x1A0000, 0x1800) == pattern
    assert m.mem.read(0x1C0000, 102) == b"\xab\xcd" * 51
    assert m.regs().rbx == 0x909


def test_rep_stos_of_each_size_stores_the_accumulators_low_part(machines):
    """the page-chunk path of rep stos: zero (one memset) and non-zero values at every
    size, with the accumulator's bits above the size set"""
    src = """
        cld
        mov rax, 0xFFFFFFFF00000000    # stosd: zero dwords
        mov rdi, 0x180000
        mov rcx, 0x400
        rep stosd
        mov rax, 0xAAAABBBBCCCCDDDD
        mov rcx, 0x200
        rep stosw
        mov rcx, 0x200
        rep stosd
        mov rcx, 0x100
        rep stosq
        hlt
    """
    m = machines(src)
    m.mem.write(0x180000, b"\xEE" * 0x2000)
    assert m.run() == exits.EXIT_HLT
    assert m.mem.read(0x180000, 0x1000) == bytes(0x1000)
    assert m.mem.read(0x181000, 0x400) == b"\xDD\xDD" * 0x200
    assert m.mem.read(0x181400, 0x800) == b"\xDD\xDD\xCC\xCC" * 0x200
    assert m.mem.read(0x181C00, 0x800) == struct.pack("<Q", 0xAAAABBBBCCCCDDDD) * 0x100
    assert m.regs().rdi == 0x182400


def test_fetch_from_mmio_is_an_internal_error_not_a_crash(machines):
    m = machines(f"mov rax, {MMIO}\njmp rax")
    assert m.run() == exits.EXIT_INTERNAL_ERROR
    assert f"{MMIO:#x}" in m.vcpu.internal_error


def test_lar_lsl_verr(machines):
    src = """
        mov ax, 0x23
        lsl ebx, ax
        lar ecx, ax
        mov dx, 0x28                   # TSS: lsl sees it, its limit is 0x67
        lsl edx, dx
        mov si, 0x78                   # beyond the GDT: ZF clear, destination kept
        mov edi, 0x55
        lsl edi, si
        setz r8b
        hlt
    """
    m = machines(src)
    assert m.run() == exits.EXIT_HLT
    r = m.regs()
    assert r.rbx == 0xFFFFFFFF
    assert r.rcx == 0x00A0FA00
    assert r.rdx == 0x67
    assert r.rdi == 0x55 and r.r8 & 0xFF == 0


def test_user_cannot_run_kernel_code_through_the_block_cache(machines):
    """Code run in ring 0 on a supervisor page, then jumped to from ring 3, must #PF."""
    src = f"""
        lea r15, [rip + after]
        mov rax, {SUPERVISOR}
        mov dword ptr [rax], 0x90c3c031   # xor eax, eax; ret; nop
        call rax                       # runs (and gets translated) in ring 0
        mov rdi, {LOG}
        push 0x1b
        push {USTACK}
        push 0x2
        push 0x23
        lea rax, [rip + user]
        push rax
        iretq
    user:
        mov rax, {SUPERVISOR}
        call rax                       # ring 3: instruction fetch from a supervisor page
    after:
        hlt                            # ring 3: #GP
    gp_handler:
        mov rbx, [rsp + 16]            # CS of the hlt
        hlt
    {PF_HANDLER}
    """
    m = machines(src, {14: ("pf_handler",), 13: ("gp_handler",)})
    assert m.run() == exits.EXIT_HLT
    assert read_log(m, 2)[1] == (0, 0, 0, 0)   # exactly one page fault
    err, cr2, _rsp, cs = read_log(m, 1)[0]
    assert (err, cr2, cs) == (0x15, SUPERVISOR, 0x23)   # P | U | I/D
    assert m.regs().rbx == 0x23


def test_invalidate_ram_from_another_thread_while_running(machines):
    """DMA-style writes behind the translator's back take effect after invalidate_ram()."""
    src = """
    again:
        mov rax, 0x150000
        call rax
        cmp eax, 2
        jne again
        hlt
    """
    m = machines(src)
    m.mem.write(0x150000, b"\xb8\x01\x00\x00\x00\xc3")      # mov eax, 1; ret

    def dma():
        m.mem.write(0x150001, b"\x02")                      # behind the translator's back
        m.vcpu.invalidate_ram(0x150000, 16)

    t = threading.Timer(0.05, dma)
    watchdog = threading.Timer(10, m.vcpu.kick)
    t.start()
    watchdog.start()
    try:
        assert m.run() == exits.EXIT_HLT
    finally:
        watchdog.cancel()
        t.join()
    assert m.regs().rax == 2


def test_cross_vcpu_code_modification(machines):
    """vCPU A patches code that vCPU B has translated and keeps running: B must see it."""
    src = """
    b_start:
        mov rax, 0x150000
        call rax
        mov byte ptr [0x160000], 1     # B has translated and run the old code
        cmp eax, 2
        jne b_start
        hlt
    a_start:
        cmp byte ptr [0x160000], 1
        jne a_start
        mov byte ptr [0x150001], 2     # mov eax, 1 -> mov eax, 2
        hlt
    """
    m = machines(src)
    m.mem.write(0x150000, b"\xb8\x01\x00\x00\x00\xc3")
    m.vcpu.set_regs(regs(rip=m.syms["b_start"], rsp=KSTACK, rflags=2))
    a = TcgVcpu(m.mem, cpu_index=1)
    try:
        a.set_sregs(m.vcpu.get_sregs())
        a.set_regs(regs(rip=m.syms["a_start"], rsp=KSTACK - 0x1000, rflags=2))
        results = {}

        def run_a():
            results["a"] = a.run()

        t = threading.Thread(target=run_a)
        watchdog = threading.Timer(10, lambda: (m.vcpu.kick(), a.kick()))
        watchdog.start()
        t.start()
        try:
            assert m.run() == exits.EXIT_HLT
            t.join()
        finally:
            watchdog.cancel()
        assert results["a"] == exits.EXIT_HLT
        assert m.regs().rax == 2
        assert m.vcpu.stats()["invalidations"] >= 1
    finally:
        a.close()


def test_pm_timer_reads_are_answered_in_the_core_as_the_model_answers(machines):
    """With the ACPI PM timer's clock published (kvmpy.devices.acpi_pm.PmTimerClock), its
    reads never exit: each is the model's counter at an instant between the run's start
    and end, they never go back, and the counter runs at 3.579545 MHz of host time
    (the guest waits for 35795 ticks: 10 ms). Other ports still exit, and with the
    clock withdrawn the timer's reads exit again."""
    from kvmpy.devices.acpi_pm import PM_TIMER_HZ, PM_TMR_OFFSET, AcpiPm
    src = f"""
        mov dx, 0x600 + {PM_TMR_OFFSET}
        mov rdi, {LOG}
        mov rcx, 1000
    1:  in eax, dx
        mov [rdi], eax
        add rdi, 4
        dec rcx
        jnz 1b
        mov r9d, [{LOG}]
    2:  in eax, dx
        sub eax, r9d
        cmp eax, 35795
        jb 2b
        in eax, dx
        mov [rdi], eax
        in ax, dx                      # a 16-bit read: the low half
        mov [rdi + 4], eax
        mov dx, 0x600 + {PM_TMR_OFFSET} + 2
        in ax, dx                      # and the high half on its own
        mov [rdi + 8], eax
        out 0x80, al
        mov dx, 0x600 + {PM_TMR_OFFSET}
        in eax, dx
        hlt
    """
    pm = AcpiPm(lambda slp_typ: None)
    clock = pm.timer_clock
    m = machines(src)
    v = m.vcpu
    m.mem.write(LOG, bytes(4 * 1004))
    v.serve_pm_timer(0x600 + PM_TMR_OFFSET, clock.origin_ns, clock.bits)
    before = pm.timer_value()
    t0 = time.monotonic_ns()
    assert m.run() == exits.EXIT_IO
    elapsed = time.monotonic_ns() - t0
    after = pm.timer_value()
    assert (v.io_port, v.io_write) == (0x80, True)
    log = struct.unpack_from("<1001I", m.mem.read(LOG, 4 * 1001))
    assert all(a <= b for a, b in zip(log, log[1:])), "the counter went back"
    assert before <= log[0] and log[-1] <= after
    assert log[-1] - log[0] >= 35795
    assert elapsed * PM_TIMER_HZ >= (log[-1] - log[0] - 1) * 1_000_000_000, "faster than 3.579545 MHz"
    low, high = struct.unpack_from("<II", m.mem.read(LOG + 4 * 1001, 8))
    assert (low & 0xFFFF) - (log[-1] & 0xFFFF) & 0xFFFF < PM_TIMER_HZ // 10
    assert (high & 0xFFFF) - (log[-1] >> 16) & 0xFFFF <= 1
    assert v.stats()["pm_timer_reads"] >= 1000 + 1 + 3
    v.serve_pm_timer(0, 0, 32)
    assert m.run() == exits.EXIT_IO
    assert (v.io_port, v.io_size, v.io_write) == (0x600 + PM_TMR_OFFSET, 4, False)
    v.io_data[:] = struct.pack("<I", pm.read(PM_TMR_OFFSET, 4))
    assert m.run() == exits.EXIT_HLT
