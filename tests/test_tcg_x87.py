"""x87 behaviour the differential oracles cannot reach: exception delivery (#MF on
the next waiting instruction, #NM for CR0.EM/TS), and the state round trips of
FNSAVE/FRSTOR and FXSAVE/FXRSTOR."""

from __future__ import annotations

import struct

import pytest

from test_tcg_system import machines  # noqa: F401,F811  (the fixture)
from kvmpy.hv import exits

MF, NM = 16, 7


def test_unmasked_exception_raises_mf_at_the_next_waiting_instruction(machines):
    src = """
        mov rsp, 0x90000
        fninit
        mov word ptr [0x70000], 0x37b      # ZE unmasked
        fldcw [0x70000]
        fld1
        fldz
        fdivr st, st(1)                    # ST0 = ST1/ST0 = 1/0: ZE, ST0 keeps its value
        mov r12, 0x55                      # not an x87 instruction: runs
        fnstsw [0x70010]                   # no-wait: runs, sees ES
    waiting:
        fwait
        hlt
    mf_handler:
        mov rbx, [rsp]
        fnstsw ax
        mov r13, rax
        fnclex
        fstp qword ptr [0x70020]           # ST0 = 0.0
        fstp qword ptr [0x70028]           # ST1 = 1.0, unmodified
        hlt
    """
    m = machines(src, {MF: ("mf_handler",)})
    assert m.run() == exits.EXIT_HLT
    r = m.regs()
    assert r.rbx == m.syms["waiting"] and r.r12 == 0x55
    assert r.r13 & 0xFFFF == 0x8084 | 6 << 11          # B ES ZE, TOP 6
    assert struct.unpack("<H", m.mem.read(0x70010, 2))[0] == 0x8084 | 6 << 11
    assert struct.unpack("<dd", m.mem.read(0x70020, 16)) == (0.0, 1.0)


def test_pending_exception_faults_on_the_next_arithmetic_instruction(machines):
    src = """
        mov rsp, 0x90000
        fninit
        mov word ptr [0x70000], 0x37e      # IE unmasked
        fldcw [0x70000]
        fldz
        fsqrt                              # sqrt(+0) is fine
        fchs
        fld1
        fchs
        fsqrt                              # sqrt(-1): IE pending, ST0 stays -1
    waiting:
        fadd st, st(1)
        hlt
    mf_handler:
        mov rbx, [rsp]
        fnstsw ax
        mov r13, rax
        hlt
    """
    m = machines(src, {MF: ("mf_handler",)})
    assert m.run() == exits.EXIT_HLT
    r = m.regs()
    assert r.rbx == m.syms["waiting"]
    assert r.r13 & 0x80FF == 0x8081


def test_cr0_ts_and_em_raise_nm(machines):
    src = """
        mov rsp, 0x90000
        mov rax, cr0
        or rax, 8                          # TS
        mov cr0, rax
    first:
        fld1
        hlt
    nm_handler:
        mov rbx, [rsp]
        clts
        mov r12, 1
        iretq
    """
    m = machines(src, {NM: ("nm_handler",)})
    assert m.run() == exits.EXIT_HLT
    r = m.regs()
    assert r.rbx == m.syms["first"] and r.r12 == 1
    src_em = src.replace("or rax, 8", "or rax, 4").replace("clts", "mov rax, cr0\n and rax, ~4\n mov cr0, rax")
    m = machines(src_em, {NM: ("nm_handler",)})
    assert m.run() == exits.EXIT_HLT
    assert m.regs().rbx == m.syms["first"]


@pytest.mark.parametrize("mp,faults", [(0, False), (1, True)])
def test_fwait_raises_nm_only_with_ts_and_mp(machines, mp, faults):
    src = f"""
        mov rsp, 0x90000
        mov rax, cr0
        and rax, ~2
        or rax, {8 | (2 if mp else 0)}
        mov cr0, rax
        fwait
        mov r12, 7
        hlt
    nm_handler:
        mov r12, 9
        hlt
    """
    m = machines(src, {NM: ("nm_handler",)})
    assert m.run() == exits.EXIT_HLT
    assert m.regs().r12 == (9 if faults else 7)


def fpu_program(save: str) -> str:
    """Five values with a hole (ffree), TOP moved; save; destroy; restore; save again."""
    return f"""
        mov rsp, 0x90000
        fninit
        mov word ptr [0x70000], 0x0b7f     # round down, double precision
        fldcw [0x70000]
        fld1
        fldpi
        fldz
        fldl2e
        fld1
        fchs
        ffree st(2)
        fdecstp
        {save} [0x71000]
        fninit
        fld1
        fld1
        {save.replace('save', 'rstor').replace('fnrstor', 'frstor')} [0x71000]
        {save} [0x72000]
        hlt
    """


@pytest.mark.parametrize("save,size", [("fnsave", 108), ("fxsave", 512)])
def test_state_round_trips(machines, save, size):
    m = machines(fpu_program(save))
    assert m.run() == exits.EXIT_HLT
    first, second = m.mem.read(0x71000, size), m.mem.read(0x72000, size)
    if save == "fnsave":
        cw, sw, tw = struct.unpack_from("<HxxHxxH", first)
        assert (cw, sw >> 11 & 7) == (0x0B7F, 2)
        # full tags, physical order: R7 1.0, R6 pi, R4 log2(e), R3 -1.0 valid; R5 (the
        # zero, freed as ST(2)) empty; R2 (where fdecstp moved TOP), R1, R0 empty
        assert tw == 0b00_00_11_00_00_11_11_11
        assert first[:12] == second[:12] and first[28:] == second[28:]
    else:
        assert struct.unpack_from("<HHB", first) == (0x0B7F, struct.unpack_from("<H", first, 2)[0], 0b11011000)
        assert first[:160] == second[:160]
        # and the live state is the restored one (fnsave above reinitialised it)
        fcw, fsw, ftw, regs = m.vcpu.get_fpu()
        assert fcw == 0x0B7F and (fsw >> 11) & 7 == 2 and ftw == 0b00_00_11_00_00_11_11_11
        for k in range(8):   # FXSAVE slot k holds ST(k) = R[(TOP + k) & 7]
            assert regs[10 * ((2 + k) & 7):10 * ((2 + k) & 7) + 10] == first[32 + 16 * k:42 + 16 * k]
