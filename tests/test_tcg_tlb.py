"""The translator's TLB across flushes: a CR3 write drops the non-global translations
and keeps the global ones, a CR4.PGE toggle drops both. A flush clears only the
entries filled since the last one (CPU.tlb_log) unless more than TLB_LOG_MAX were,
when it sweeps the whole arrays: the program below goes through both."""

from __future__ import annotations

import pytest

from kvmpy.hv import exits
from test_tcg_system import PD, PT, LongMachine

X, Y = 0x210000, 0x211000            # 4 KiB pages of the page table at PT
NEW_X, NEW_Y = 0x220000, 0x221000
MARKS = {X: 0x1111, Y: 0x2222, NEW_X: 0x3333, NEW_Y: 0x4444}
ALIAS = 0x400000                      # 4 MiB more of linear pages over the same RAM


def pte_of(lin):
    return PT + 8 * ((lin - 0x200000) >> 12)


PROGRAM = f"""
_start:
    mov rdi, {pte_of(X)}
    mov rsi, {pte_of(Y)}
    mov rax, [{X}]
    mov rax, [{Y}]
    mov qword ptr [rdi], {NEW_X | 0x3}
    mov qword ptr [rsi], {NEW_Y | 0x103}    # global
    mov rax, cr3
    mov cr3, rax
    mov r8, [{X}]                   # the new page: the old translation was dropped
    mov r9, [{Y}]                   # the old page: a global translation stays
    call toggle_pge
    mov r10, [{Y}]                  # the new page
    # more pages than the flush log holds: the next flush sweeps
    xor ebx, ebx
low:
    mov rax, [rbx]
    add rbx, 0x1000
    cmp rbx, 0x200000
    jne low
    mov rbx, {ALIAS}
high:
    mov rax, [rbx]
    add rbx, 0x1000
    cmp rbx, {ALIAS + 0x400000}
    jne high
    mov qword ptr [rdi], {X | 0x3}
    mov qword ptr [rsi], {Y | 0x103}
    mov rax, cr3
    mov cr3, rax
    mov r11, [{X}]                  # back to the first page
    mov r12, [{Y}]                  # the sweep kept the global translation
    mov rax, cr3
    mov cr3, rax
    mov r13, [{Y}]                  # and logged it again: still kept
    call toggle_pge
    mov r14, [{Y}]                  # dropped at last
    hlt
toggle_pge:
    mov rax, cr4
    and rax, -0x81
    mov cr4, rax
    or rax, 0x80
    mov cr4, rax
    ret
"""


@pytest.mark.parametrize("threshold", [None, 0, 1])
def test_cr3_write_keeps_global_translations_and_drops_the_rest(threshold):
    m = LongMachine(PROGRAM)
    try:
        m.mem.write_u64(PD + 8 * (ALIAS >> 21), 0x000000 | 0x83)
        m.mem.write_u64(PD + 8 * ((ALIAS >> 21) + 1), 0x200000 | 0x83)
        m.mem.write_u64(pte_of(Y), Y | 0x107)     # global from the start
        for page, mark in MARKS.items():
            m.mem.write_u64(page, mark)
        m.vcpu.set_native_threshold(threshold)
        assert m.run() == exits.EXIT_HLT
        r = m.regs()
        assert (r.r8, r.r9, r.r10) == (0x3333, 0x2222, 0x4444)
        assert (r.r11, r.r12, r.r13, r.r14) == (0x1111, 0x4444, 0x4444, 0x2222)
    finally:
        m.close()
