"""BMI1, BMI2, ADX, MOVBE, POPCNT/LZCNT/TZCNT, RDRAND/RDSEED and the MMX-operand SSE
conversions on the translator, against unicorn (QEMU's TCG) with test_tcg_oracle's
harness: where the two disagree on a 64-bit stream the host CPU decides.

Unicorn runs as a Broadwell (its default model does not decode adcx/adox; neither
model has AVX, so a VEX-encoded AVX instruction is #UD on it as on ours). The VEX
encoder below writes the three-byte C4 form (and C5 where a test wants it).

Flags the SDM leaves undefined are neutralised as in test_tcg_oracle (the SDM's
"Flags Affected" of each): ANDN, BLSR, BLSMSK, BLSI, BZHI: AF PF; BEXTR: AF SF PF.
Where unicorn is wrong the SDM wins; in 64-bit streams the host CPU says so, in
32-bit ones (no referee) the difference is neutralised:
  * BLSI with a zero source: the SDM clears CF ("CF is set if the source is not
    zero"), QEMU 5 sets it. Its CF is left out of 32-bit streams.
  * BZHI r32 with an index of 31 or more: the SDM leaves the source as it is from 32
    up and sets CF from 32 up; QEMU 5 clamps the index to 31 (clearing bit 31) and
    sets CF from 31 up. 32-bit streams use indexes below 31.
  * BEXTR r32 with start 0 and a length of 32 or more: the SDM extracts the whole
    source; QEMU 5 clears its bit 31. 32-bit streams use lengths below 32 there.

RDRAND/RDSEED return random values: checked on ours only, for CF=1 and values
that vary.
"""

from __future__ import annotations

import struct

import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("unicorn")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from unicorn import x86_const as U  # noqa: E402

from test_tcg_oracle import (AF, CF, FUZZ, LAYOUT, PF,  # noqa: E402
                             SF, Asm, _add_rex_b, check, g_alu, g_bitcount, g_mov, initial_state)
from test_tcg_oracle_mmx import fixed_state, mmx_epilogue, mmx_prologue, mm_reg  # noqa: E402

MODEL = U.UC_CPU_X86_BROADWELL

# name: (opcode map, pp, opcode, ModRM.reg for group 17 or None, undefined flags)
BMI = {
    "andn": (2, 0, 0xF2, None, AF | PF),
    "blsr": (2, 0, 0xF3, 1, AF | PF),
    "blsmsk": (2, 0, 0xF3, 2, AF | PF),
    "blsi": (2, 0, 0xF3, 3, AF | PF),
    "bzhi": (2, 0, 0xF5, None, AF | PF),
    "pdep": (2, 3, 0xF5, None, 0),
    "pext": (2, 2, 0xF5, None, 0),
    "mulx": (2, 3, 0xF6, None, 0),
    "bextr": (2, 0, 0xF7, None, AF | SF | PF),
    "shlx": (2, 1, 0xF7, None, 0),
    "sarx": (2, 2, 0xF7, None, 0),
    "shrx": (2, 3, 0xF7, None, 0),
    "rorx": (3, 3, 0xF0, None, 0),
}
# the operand VEX.vvvv names: a source (index, count, mask...) or, for group 17, the destination
VVVV_IS_DEST = ("blsr", "blsmsk", "blsi", "mulx")


def modrm_bytes(reg: int, rm) -> tuple[bytes, int, int]:
    """ModRM (+SIB, displacement) for rm = ('r', n) or ('m', Asm.mem operand), and the
    REX.X / REX.B bits it needs."""
    if rm[0] == "r":
        n = rm[1]
        return bytes([0xC0 | (reg & 7) << 3 | (n & 7)]), 0, int(n >= 8)
    mod, r, sib, disp, rx, rb = rm[1]
    out = bytes([mod << 6 | (reg & 7) << 3 | r]) + (bytes([sib]) if sib is not None else b"") + disp
    return out, rx, rb


def vex(opmap: int, pp: int, opcode: int, reg: int, vvvv: int, rm, w: int = 0, length: int = 0,
        imm: bytes = b"", two_byte: bool = False) -> bytes:
    """A VEX-encoded instruction: C4 RXB.mmmmm W.vvvv.L.pp, or C5 R.vvvv.L.pp (map 1, W0,
    no X/B) with two_byte; R, X, B and vvvv are stored inverted."""
    modrm, x, b = modrm_bytes(reg, rm)
    r = int(reg >= 8)
    tail = (~vvvv & 15) << 3 | length << 2 | pp
    if two_byte:
        assert opmap == 1 and not (w or x or b)
        return bytes([0xC5, (r ^ 1) << 7 | tail, opcode]) + modrm + imm
    return bytes([0xC4, (r ^ 1) << 7 | (x ^ 1) << 6 | (b ^ 1) << 5 | opmap, w << 7 | tail, opcode]) + modrm + imm


def mov_imm32(a: Asm, reg: int, value: int) -> bytes:
    """mov r32, imm32 (zero-extends in 64-bit mode)."""
    code = a.enc(bytes([0xB8 + (reg & 7)]), 0, None, 4, struct.pack("<I", value & 0xFFFFFFFF))
    return _add_rex_b(code, 4) if reg >= 8 else code


def bmi_unit(name: str, a: Asm, size: int, reg: int, vreg: int, rm, imm: int = 0) -> bytes:
    opmap, pp, opcode, group, _ = BMI[name]
    if group is not None:
        reg = group
    if name == "rorx":
        vreg = 0          # vvvv reserved: 1111b
    return vex(opmap, pp, opcode, reg, vreg, rm, w=int(size == 8), imm=bytes([imm]) if name == "rorx" else b"")


def g_bmi(draw, a: Asm):
    name = draw(st.sampled_from(sorted(BMI)))
    size = draw(st.sampled_from([4, 8])) if a.mode == 64 else 4
    gprs = a.gprs()
    reg, vreg = draw(st.sampled_from(gprs)), draw(st.sampled_from(gprs))
    rm = ("m", a.mem(draw, size)) if draw(st.booleans()) else ("r", draw(st.sampled_from(gprs)))
    setup = b""
    # In 32-bit streams always: a control left to earlier units (a shlx result) once
    # hit unicorn's whole-source extract (test_bextr32_whole_source_from_a_computed_control).
    if name == "bextr" and (a.mode != 64 or draw(st.integers(0, 3))):   # start and length near the width
        start, length = draw(st.integers(0, 70)), draw(st.integers(0, 70))
        if a.mode != 64 and start == 0 and length >= 32:
            length = 31       # unicorn's whole-source extract (module docstring)
        setup = mov_imm32(a, vreg, start | length << 8 | draw(st.integers(0, 0xFFFF)) << 16)
    elif name == "bzhi" and a.mode != 64:             # unicorn's index >= 32 (module docstring)
        setup = mov_imm32(a, vreg, draw(st.integers(0, 30)) | draw(st.integers(0, 0xFFFFFF)) << 8)
    elif name == "bzhi" and draw(st.integers(0, 3)):    # the index byte only; bits above ignored
        setup = mov_imm32(a, vreg, draw(st.integers(0, 70)) | draw(st.integers(0, 0xFFFFFF)) << 8)
    if rm[0] == "r" and draw(st.integers(0, 5)) == 0:   # a zero source
        setup += a.enc(b"\x31", rm[1], rm, 4)
    imm = draw(st.integers(0, 255))
    undefined = BMI[name][4]
    if name == "blsi" and a.mode != 64:
        undefined |= CF       # unicorn's CF of a zero source (module docstring)
    return setup + bmi_unit(name, a, size, reg, vreg, rm, imm), undefined


def g_adx(draw, a: Asm):
    """adcx (66) / adox (F3) r32/64, r/m; a stc/clc or an add first to vary CF and OF."""
    size = draw(st.sampled_from([4, 8])) if a.mode == 64 else 4
    reg, rm, _ = a.operands(draw, size, load=True)
    pre = draw(st.sampled_from([b"", b"\xf9", b"\xf8"]))
    return pre + a.enc(b"\x0f\x38\xf6", reg, rm, size, prefix=draw(st.sampled_from([b"\x66", b"\xf3"])),
                       no66=True), 0


def g_movbe(draw, a: Asm):
    size = draw(st.sampled_from([2, 4, 8] if a.mode == 64 else [2, 4]))
    reg = draw(st.sampled_from(a.gprs()))
    store = draw(st.booleans())
    mem = ("m", a.mem(draw, size) if store else a.mem_load(draw, size))
    return a.enc(b"\x0f\x38\xf1" if store else b"\x0f\x38\xf0", reg, mem, size), 0


GENS = (g_bmi, g_bmi, g_bmi, g_bmi, g_adx, g_movbe, g_bitcount, g_alu, g_mov)


@st.composite
def bmi_programs(draw, mode: int, max_units: int):
    a = Asm(mode)
    code = bytearray()
    for gen in draw(st.lists(st.sampled_from(GENS), min_size=max_units // 2, max_size=max_units)):
        unit, undefined = gen(draw, a)
        code += unit
        if undefined:
            code += a.neutralize(undefined)
    return bytes(code)


N = 3000 if FUZZ else 300


@settings(max_examples=N, deadline=None, suppress_health_check=list(HealthCheck))
@given(code=bmi_programs(64, 24), state=initial_state(64))
def test_oracle_bmi_64(code, state):
    check(64, code, state, cpu_model=MODEL)


@settings(max_examples=N // 3, deadline=None, suppress_health_check=list(HealthCheck))
@given(code=bmi_programs(32, 24), state=initial_state(32))
def test_oracle_bmi_32(code, state):
    """VEX in 32-bit protected mode: C4/C5 whose next byte has 11 in its top bits."""
    check(32, code, state, cpu_model=MODEL)


def edge_state(seed: int, regs: dict[int, int], flags: int = 2):
    vals, _flags, data, xmm = fixed_state(seed)
    vals.update(regs)
    return vals, flags, data, xmm


def store_results(a: Asm, disp: int) -> bytes:
    """rcx, rdx, rbx (the destinations the BMI units use) and the flags to [r15 + disp]."""
    out = b"".join(a.enc(b"\x89", r, ("m", (2, 7, None, struct.pack("<i", disp + 8 * n), 0, 1)), 8)
                   for n, r in enumerate((1, 2, 3)))
    return out + b"\x9c" + a.enc(b"\x8f", 0, ("m", (2, 7, None, struct.pack("<i", disp + 24), 0, 1)), 4, no66=True)


EDGE_VALUES = [0, 1, 0x8000_0000, 0xFFFF_FFFF, 0x1_0000_0000, 0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF,
               0x0123_4567_89AB_CDEF, 0xF0F0_0000_0F0F_0000]
# bzhi's index, bextr's start | length << 8: zero, inside, at and past 32 and 64 bits
CONTROLS = [0, 1, 5, 31, 32, 33, 63, 64, 65, 255, 0x0804, 0x2000, 0x201F, 0x2020, 0x4000, 0x403F,
            0x1F3F, 0xFF00, 0xFFFF, 0x1234_0810]


@pytest.mark.parametrize("size", [4, 8])
@pytest.mark.parametrize("name", sorted(BMI))
def test_each_bmi_op_on_edge_operands(name, size):
    """Every BMI instruction, 32- and 64-bit, register and memory source, over zero,
    sign-edge and all-ones sources and bzhi/bextr/shift controls at and past the width."""
    a = Asm(64)
    mem = ("m", (2, 7, None, struct.pack("<i", 0x40), 0, 1))     # [r15 + 0x40]
    code = b""
    for k, value in enumerate(EDGE_VALUES):
        control = CONTROLS[k % len(CONTROLS)]
        code += mov_imm32(a, 3, control)                             # ebx: the vvvv operand
        code += a.enc(b"\xb8", 0, None, 8, struct.pack("<Q", value))     # rax: the source
        code += a.enc(b"\x89", 0, mem, 8)                             # ... and [r15 + 0x40]
        code += bmi_unit(name, a, size, 1, 3, ("r", 0), imm=k * 9)
        code += a.neutralize(BMI[name][4]) if BMI[name][4] else b""
        code += store_results(a, 0x100 + 64 * k)
        code += mov_imm32(a, 3, CONTROLS[-1 - k % len(CONTROLS)])
        code += bmi_unit(name, a, size, 2, 3, mem, imm=63 - k)
        code += a.neutralize(BMI[name][4]) if BMI[name][4] else b""
        code += store_results(a, 0x120 + 64 * k)
    check(64, code, edge_state(size, {0: 0, 1: 0, 2: 0, 3: 0}), cpu_model=MODEL)


@pytest.mark.parametrize("control", CONTROLS)
@pytest.mark.parametrize("name", ["bzhi", "bextr", "shlx", "sarx", "shrx"])
def test_controls_past_the_width(name, control):
    """bzhi's CF (index >= width), bextr's start/length >= width, shifts masked."""
    a = Asm(64)
    code = b""
    for size in (4, 8):
        code += bmi_unit(name, a, size, 1, 3, ("r", 2)) + a.neutralize(BMI[name][4] or 0)
        code += a.enc(b"\x89", 1, ("m", (2, 7, None, struct.pack("<i", 0x100 + size), 0, 1)), 8)
        code += b"\x9c" + a.enc(b"\x8f", 0, ("m", (2, 7, None, struct.pack("<i", 0x200 + size), 0, 1)), 4,
                                no66=True)
    check(64, code, edge_state(control, {2: 0x8765_4321_FEDC_BA98, 3: control}), cpu_model=MODEL)


@example(prefix="66", size=8, cf=True, of=False)
@given(prefix=st.sampled_from(["66", "f3"]), size=st.sampled_from([4, 8]), cf=st.booleans(), of=st.booleans())
@settings(max_examples=40, deadline=None)
def test_adx_carry_chains(prefix, size, cf, of):
    """adcx/adox over all-ones and zero operands: the carry in and out of the one flag,
    the other flag (and every other) kept."""
    a = Asm(64)
    op = a.enc(b"\x0f\x38\xf6", 0, ("r", 1), size, prefix=bytes.fromhex(prefix), no66=True)
    code = op + op + a.enc(b"\x0f\x38\xf6", 2, ("r", 3), size, prefix=bytes.fromhex(prefix), no66=True)
    flags = 2 | (1 if cf else 0) | (0x800 if of else 0) | 0x40
    check(64, code, edge_state(7, {0: 2**64 - 1, 1: 1, 2: 0, 3: 0}, flags), cpu_model=MODEL)


# ---- VEX decoding: what must be #UD ----

def run_ours(mode: int, code: bytes, **regs_):
    """code then hlt on ours, with no IDT: a fault ends in a shutdown at the instruction."""
    from support.tcg import TcgVcpu, identity_map_2m, make_memory, regs, set_long_mode, set_protected_flat
    mem = make_memory(4 << 20)
    identity_map_2m(mem)
    mem.write(0x100000, code + b"\xf4")
    v = TcgVcpu(mem)
    if mode == 64:
        set_long_mode(v)
    else:
        set_protected_flat(v)
    sr = v.get_sregs()
    sr.idt.limit = 0
    v.set_sregs(sr)
    v.set_regs(regs(rip=0x100000, rsp=0x300000, **regs_))
    try:
        kind = v.run()
        return kind, v.get_regs(), v.get_sregs(), mem
    finally:
        v.close()


def test_bextr32_whole_source_from_a_computed_control():
    """The stream a user's fresh Hypothesis run found: shlx computes bextr's control
    (start 0, length 32) in 32-bit code. The SDM extracts the whole source; unicorn
    (QEMU 5) clears bit 31, so this is checked on ours alone."""
    from kvmpy.hv import exits
    code = bytes.fromhex("c7050000200001000000"        # mov dword [0x200000], 1
                         "c7051900200000000080"        # mov dword [0x200019], 0x80000000
                         "c4e269f70500002000"          # shlx eax, [0x200000], edx (edx 13: 0x2000)
                         "c4e278f70519002000"          # bextr eax, [0x200019], eax
                         "9c5b")                       # pushfd; pop ebx
    kind, r, _, _ = run_ours(32, code, rdx=13)
    assert kind == exits.EXIT_HLT
    assert r.rax == 0x8000_0000
    assert not r.rbx & 0x41, "bextr clears CF, and ZF with a non-zero result"


def unicorn_rejects(mode: int, code: bytes) -> bool:
    import unicorn
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64 if mode == 64 else unicorn.UC_MODE_32)
    uc.ctl_set_cpu_model(MODEL)
    uc.mem_map(0x100000, 0x10000)
    uc.mem_write(0x100000, code)
    try:
        uc.emu_start(0x100000, 0x100000 + len(code), count=1)
    except unicorn.UcError as e:
        return e.errno == unicorn.UC_ERR_INSN_INVALID
    return False


ANDN = vex(2, 0, 0xF2, 0, 1, ("r", 2))       # andn eax, ecx, edx
UNDEFINED = {
    "vaddps (C5, AVX)": vex(1, 0, 0x58, 0, 1, ("r", 2), two_byte=True),
    "vaddps (C4, AVX)": vex(1, 0, 0x58, 0, 1, ("r", 2)),
    "vpaddd ymm (AVX2)": vex(1, 1, 0xFE, 0, 1, ("r", 2), length=1),
    "vzeroupper": bytes([0xC5, 0xF8, 0x77]),
    "andn with VEX.L=1": vex(2, 0, 0xF2, 0, 1, ("r", 2), length=1),
    "andn with pp=66": vex(2, 1, 0xF2, 0, 1, ("r", 2)),
    "blsr group 17 /0": vex(2, 0, 0xF3, 0, 1, ("r", 2)),
    "rorx with vvvv not 1111b": vex(3, 3, 0xF0, 0, 1, ("r", 2), imm=b"\x03"),
    "reserved opcode map 4": vex(4, 0, 0xF2, 0, 1, ("r", 2)),
    "66 before VEX": b"\x66" + ANDN,
    "F2 before VEX": b"\xf2" + ANDN,
    "F3 before VEX": b"\xf3" + ANDN,
    "LOCK before VEX": b"\xf0" + ANDN,
    "REX before VEX": b"\x40" + ANDN,
    "movbe register form": b"\x0f\x38\xf0\xc1",
    "adcx without its 66": b"\x0f\x38\xf6\xc1",
    "rdrand with F3": b"\xf3\x0f\xc7\xf0",
}


# Unicorn (QEMU 5, no AVX) runs these anyway: VEX-encoded SSE as its legacy form,
# rorx ignoring vvvv, movbe on a register. The SDM's #UD stands; the host CPU judges
# the last two, and has AVX itself, so the AVX ones rest on the SDM alone.
UNICORN_RUNS = ("vaddps (C5, AVX)", "vaddps (C4, AVX)", "vzeroupper", "rorx with vvvv not 1111b",
                "movbe register form")
AVX = ("vaddps (C5, AVX)", "vaddps (C4, AVX)", "vpaddd ymm (AVX2)", "vzeroupper")


@pytest.mark.parametrize("name", sorted(UNDEFINED))
def test_undefined_vex_and_prefixes(name):
    """A CPU with BMI but without AVX: VEX encodings of AVX, reserved fields and
    prefixes before VEX raise #UD on ours, on unicorn (Broadwell, no AVX) but where it
    is documented lax (UNICORN_RUNS), and on the host CPU but for AVX (which it has)."""
    from kvmpy.hv import exits
    from test_tcg_oracle import XMM_LOAD, host_cpu, pair, run_diffs
    code = UNDEFINED[name]
    kind, r, _sr, _mem = run_ours(64, code)
    assert (kind, r.rip) == (exits.EXIT_SHUTDOWN, 0x100000), f"{name}: ours ran it"
    if name not in UNICORN_RUNS:
        assert unicorn_rejects(64, code), f"{name}: unicorn executes it"
    if name in AVX:
        return
    vals, flags, data, xmm = edge_state(1, {})
    ours, _ = pair(64, MODEL).run(code, vals, flags, data, xmm)
    assert (ours.kind, ours.regs.rip) == (exits.EXIT_SHUTDOWN, LAYOUT[64]["code"] + len(XMM_LOAD))
    hp = host_cpu()
    if hp is None:
        from conftest import KVM_SKIP_REASON
        pytest.skip(f"ours and unicorn agree; the host CPU cannot confirm it: {KVM_SKIP_REASON}")
    assert run_diffs(ours, hp.run_hw(code, (vals, flags, data, xmm))) == []


def test_vex_or_les_in_32_bit_mode():
    """In 32-bit code C4 is VEX only when the next byte's top bits are 11 (a register
    operand, invalid for LES); otherwise it stays les. les ecx, [0x200000] with a null
    selector there loads ecx and ES; andn eax, ecx, edx runs as VEX."""
    from kvmpy.hv import exits
    les = b"\xc4\x0d" + struct.pack("<I", 0x200000)
    andn = vex(2, 0, 0xF2, 0, 1, ("r", 2))
    code = (b"\xc7\x05" + struct.pack("<II", 0x200000, 0x12345678) +    # mov dword [0x200000], ...
            b"\x66\xc7\x05" + struct.pack("<IH", 0x200004, 0) +          # mov word [0x200004], 0
            les + andn)
    kind, r, sr, _mem = run_ours(32, code, rdx=0xF0F0, rax=0)
    assert kind == exits.EXIT_HLT, kind
    assert r.rcx & 0xFFFFFFFF == 0x12345678 and sr.es.selector == 0
    assert r.rax == ~0x12345678 & 0xF0F0


def test_rdrand_rdseed():
    """rdrand/rdseed r16/r32/r64 (and r8-r15): CF=1, OF SF ZF AF PF clear, and values
    that differ between calls (64-bit ones colliding: 2^-64)."""
    from kvmpy.hv import exits
    for opcode_reg in (6, 7):
        for size, prefix in ((2, b"\x66"), (4, b""), (8, b"\x48"), (8, b"\x49")):
            insn = prefix + bytes([0x0F, 0xC7, 0xC0 | opcode_reg << 3 | 1])   # rcx (r9 with REX.B)
            values = []
            for _ in range(3):
                kind, r, _sr, _mem = run_ours(64, insn + b"\x9c\x5a", rcx=0, r9=0)   # pushf; pop rdx
                assert kind == exits.EXIT_HLT, kind
                assert r.rdx & 0x8D5 == 0x1, f"flags {r.rdx:#x}"
                got = r.r9 if prefix == b"\x49" else r.rcx
                assert got < 1 << (8 * size)
                values.append(got)
            if size == 8:
                assert len(set(values)) == 3, values


# ---- the SSE conversions with an MMX operand ----

CVT = [("", "2a", "x_from_mm"), ("66", "2a", "x_from_mm"), ("", "2c", "mm_from_x"), ("", "2d", "mm_from_x"),
       ("66", "2c", "mm_from_x128"), ("66", "2d", "mm_from_x128")]


def g_cvt(draw, a: Asm):
    pfx, opc, form = draw(st.sampled_from(CVT))
    opcode, prefix = bytes.fromhex("0f" + opc), bytes.fromhex(pfx)
    if form == "x_from_mm":
        rm = ("m", a.mem(draw, 8)) if draw(st.booleans()) else ("r", mm_reg(draw))
        return a.enc(opcode, draw(st.integers(0, 15)), rm, 4, prefix=prefix)
    if form == "mm_from_x128" and draw(st.booleans()):
        rm = ("m", (2, 7, None, struct.pack("<i", draw(st.integers(-0x100, 0x100)) * 16), 0, 1))
    elif draw(st.booleans()) and form == "mm_from_x":
        rm = ("m", a.mem(draw, 8))
    else:
        rm = ("r", draw(st.integers(0, 15)))
    return a.enc(opcode, mm_reg(draw), rm, 4, prefix=prefix)


def g_cvt_rounding(draw, a: Asm):
    """ldmxcsr with another rounding mode (and sometimes FTZ/DAZ): push imm; ldmxcsr [rsp]"""
    csr = 0x1F80 | draw(st.integers(0, 3)) << 13 | draw(st.sampled_from([0, 0x8000, 0x40, 0x8040]))
    return b"\x68" + struct.pack("<I", csr) + b"\x0f\xae\x14\x24\x48\x8d\x64\x24\x08"


@st.composite
def cvt_programs(draw, max_units: int):
    a = Asm(64)
    units = []
    for _ in range(draw(st.integers(max_units // 2, max_units))):
        units.append(g_cvt_rounding(draw, a) if draw(st.integers(0, 7)) == 0 else g_cvt(draw, a))
    return mmx_prologue() + b"".join(units) + mmx_epilogue()


@settings(max_examples=N, deadline=None, suppress_health_check=list(HealthCheck))
@given(code=cvt_programs(16), state=initial_state(64))
def test_oracle_mmx_conversions(code, state):
    check(64, code, state)


FLOAT_EDGES = struct.pack("<ffffdd", 1.5, -2.5, 2.0**31, -(2.0**31) - 512, 1e300, float("nan"))


@pytest.mark.parametrize("entry", CVT, ids=lambda e: e[0] + e[1])
def test_each_mmx_conversion(entry):
    """Each conversion, register and memory forms, on halves (rounding to even), the
    int32 edges, out-of-range and NaN inputs (integer indefinite 0x80000000)."""
    pfx, opc, form = entry
    a = Asm(64)
    opcode, prefix = bytes.fromhex("0f" + opc), bytes.fromhex(pfx)
    mem = ("m", (2, 7, None, struct.pack("<i", 0x100), 0, 1))     # [r15 + 0x100], 16-byte aligned
    body = a.enc(opcode, 0, ("r", 1), 4, prefix=prefix) + a.enc(opcode, 2, mem, 4, prefix=prefix)
    body += a.enc(opcode, 3, ("r", 4), 4, prefix=prefix)
    code = mmx_prologue() + body + mmx_epilogue()
    vals, flags, _data, xmm = fixed_state(int(opc, 16))
    xmm[1] = int.from_bytes(FLOAT_EDGES[:16], "little")
    xmm[4] = int.from_bytes(FLOAT_EDGES[16:32], "little")
    data = (FLOAT_EDGES[16:] + FLOAT_EDGES[:16])[:32] * 2
    check(64, code, (vals, flags, data, xmm))


def test_vex_or_lds_in_32_bit_mode():
    """C5 alike: lds ecx, [0x200000] (next byte 0x0d: a memory operand) stays lds, while
    C5 with a register-form next byte is VEX, here vaddps (AVX): #UD at it."""
    from kvmpy.hv import exits
    lds = b"\xc5\x0d" + struct.pack("<I", 0x200000)
    code = (b"\xc7\x05" + struct.pack("<II", 0x200000, 0x0BADCAFE) +
            b"\x66\xc7\x05" + struct.pack("<IH", 0x200004, 0) + lds)
    kind, r, sr, _mem = run_ours(32, code)
    assert kind == exits.EXIT_HLT, kind
    assert r.rcx & 0xFFFFFFFF == 0x0BADCAFE and sr.ds.selector == 0
    vaddps = vex(1, 0, 0x58, 0, 1, ("r", 2), two_byte=True)
    assert vaddps[1] & 0xC0 == 0xC0
    kind, r, _sr, _mem = run_ours(32, vaddps)
    assert (kind, r.rip) == (exits.EXIT_SHUTDOWN, 0x100000)   # unicorn runs it as addps (UNICORN_RUNS)
