"""MMX, SSSE3, SSE4.1 and SSE4.2 on the translator against unicorn (QEMU's TCG), with
test_tcg_oracle's harness.

A stream loads MM0-MM7 from the data region, runs random MMX instructions (every
opcode of the set: register and memory forms, immediates, the SSE additions on MMX
registers, movd/movq to and from general registers, maskmovq through rDI), then
stores MM0-MM7 and the x87 status word (TOP must be 0 after MMX code) into the
compared data region and ends with EMMS. SSSE3 (both widths), SSE4.1 and SSE4.2
(crc32 and the string compares, with small explicit lengths and planted zero
elements) run in test_tcg_oracle's SSE streams. Registers, flags, XMM and memory are
compared as in test_tcg_oracle; each opcode also runs once on fixed edge operands. The x87 tag effects, which the data region does not
show, are checked on ours against the SDM in test_mmx_x87_state.
"""

from __future__ import annotations

import random
import struct

import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("unicorn")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_tcg_oracle import (FUZZ, GPR64, LAYOUT, MXCSR_EPILOGUE, MXCSR_PROLOGUE, Asm, check,  # noqa: E402
                             g_mov, g_sse, initial_state, sse_programs)

MM_IN = 0x100       # [r15 + MM_IN + 8n]: MMn's initial value
MM_OUT = 0x1100     # [r15 + MM_OUT + 8n]: MMn at the end; the x87 status word after them

# mm, mm/m64
MMX_BINARY = ["60", "61", "62", "63", "64", "65", "66", "67", "68", "69", "6a", "6b", "74", "75", "76",
              "d1", "d2", "d3", "d4", "d5", "d8", "d9", "da", "db", "dc", "dd", "de", "df",
              "e0", "e1", "e2", "e3", "e4", "e5", "e8", "e9", "ea", "eb", "ec", "ed", "ee", "ef",
              "f1", "f2", "f3", "f4", "f5", "f6", "f8", "f9", "fa", "fb", "fc", "fd", "fe", "6f"]
SHIFT_IMM = [("71", 2), ("71", 4), ("71", 6), ("72", 2), ("72", 4), ("72", 6), ("73", 2), ("73", 6)]
# SSSE3 (0F 38 xx; palignr is 0F 3A 0F ib), in MMX (no prefix) and XMM (66) forms
SSSE3 = ["00", "01", "02", "03", "04", "05", "06", "07", "08", "09", "0a", "0b", "1c", "1d", "1e"]
FORMS = ["binary"] * 6 + ["ssse3"] * 3 + ["palignr", "pshufw", "shift", "movd_in", "movd_out", "movq_out", "movntq", "pinsrw",
                          "pextrw", "pmovmskb", "maskmovq"]


def r15_disp32(reg: int, opcode: bytes, disp: int, rex_w: bool = False) -> bytes:
    """opcode with ModRM [r15 + disp32], reg field ``reg``."""
    rex = 0x41 | (8 if rex_w else 0)
    return bytes([rex]) + opcode + bytes([0x80 | (reg << 3) | 7]) + struct.pack("<i", disp)


def mmx_prologue() -> bytes:
    return MXCSR_PROLOGUE + b"".join(r15_disp32(n, b"\x0f\x6f", MM_IN + 8 * n) for n in range(8))


def mmx_epilogue() -> bytes:
    stores = b"".join(r15_disp32(n, b"\x0f\x7f", MM_OUT + 8 * n) for n in range(8))
    fnstsw = r15_disp32(7, b"\xdd", MM_OUT + 64)
    return stores + fnstsw + b"\x0f\x77" + MXCSR_EPILOGUE


def mm_reg(draw) -> int:
    # REX.R/REX.B do not extend MMX registers: 8-15 must act as 0-7
    return draw(st.integers(0, 15)) if draw(st.integers(0, 7)) == 0 else draw(st.integers(0, 7))


def unit(draw, a: Asm, form: str) -> bytes:
    imm = bytes([draw(st.integers(0, 255))])
    if form == "binary":
        opc = bytes.fromhex("0f" + draw(st.sampled_from(MMX_BINARY)))
        rm = ("m", a.mem(draw, 8)) if draw(st.booleans()) else ("r", mm_reg(draw))
        return a.enc(opc, mm_reg(draw), rm, 4)
    if form in ("ssse3", "palignr"):
        rm = ("m", a.mem(draw, 8)) if draw(st.booleans()) else ("r", mm_reg(draw))
        if form == "palignr":
            return a.enc(b"\x0f\x3a\x0f", mm_reg(draw), rm, 4, bytes([draw(st.integers(0, 20))]))
        return a.enc(bytes.fromhex("0f38" + draw(st.sampled_from(SSSE3))), mm_reg(draw), rm, 4)
    if form == "pshufw":
        rm = ("m", a.mem(draw, 8)) if draw(st.booleans()) else ("r", mm_reg(draw))
        return a.enc(b"\x0f\x70", mm_reg(draw), rm, 4, imm)
    if form == "shift":
        op, kind = draw(st.sampled_from(SHIFT_IMM))
        count = bytes([draw(st.sampled_from([0, 1, 7, 8, 15, 16, 31, 32, 63, 64, 200]))])
        return a.enc(bytes.fromhex("0f" + op), kind, ("r", mm_reg(draw)), 4, count)
    if form == "movd_in":
        size = draw(st.sampled_from([4, 8]))
        rm = ("m", a.mem(draw, 8)) if draw(st.booleans()) else ("r", draw(st.sampled_from(GPR64)))
        return a.enc(b"\x0f\x6e", mm_reg(draw), rm, size)
    if form == "movd_out":
        size = draw(st.sampled_from([4, 8]))
        rm = ("m", a.mem(draw, 8)) if draw(st.booleans()) else ("r", draw(st.sampled_from(GPR64)))
        return a.enc(b"\x0f\x7e", mm_reg(draw), rm, size)
    if form == "movq_out":
        rm = ("m", a.mem(draw, 8)) if draw(st.booleans()) else ("r", mm_reg(draw))
        return a.enc(b"\x0f\x7f", mm_reg(draw), rm, 4)
    if form == "movntq":
        return a.enc(b"\x0f\xe7", mm_reg(draw), ("m", a.mem(draw, 8)), 4)
    if form == "pinsrw":
        rm = ("m", a.mem(draw, 2)) if draw(st.booleans()) else ("r", draw(st.sampled_from(GPR64)))
        return a.enc(b"\x0f\xc4", mm_reg(draw), rm, 4, imm)
    if form in ("pextrw", "pmovmskb"):
        opc = b"\x0f\xc5" if form == "pextrw" else b"\x0f\xd7"
        return a.enc(opc, draw(st.sampled_from(GPR64)), ("r", mm_reg(draw)), 4,
                     imm if form == "pextrw" else b"")
    # maskmovq: rDI into the data region first (lea rdi, [r15 + disp32])
    lea = r15_disp32(7, b"\x8d", draw(st.integers(-0x4000, 0x4000)), rex_w=True)
    return lea + a.enc(b"\x0f\xf7", mm_reg(draw), ("r", mm_reg(draw)), 4)


@st.composite
def mmx_programs(draw, max_units: int):
    a = Asm(64)
    forms = draw(st.lists(st.sampled_from(FORMS), min_size=max_units // 2, max_size=max_units))
    return mmx_prologue() + b"".join(unit(draw, a, f) for f in forms) + mmx_epilogue()


N_MMX = 3000 if FUZZ else 300


@settings(max_examples=N_MMX, deadline=None, suppress_health_check=list(HealthCheck))
@given(code=mmx_programs(24), state=initial_state(64))
def test_oracle_mmx(code, state):
    check(64, code, state)


def g_ssse3_xmm(draw, a: Asm):
    """An SSSE3 instruction in its XMM form: 66 0F 38 xx /r, or palignr 66 0F 3A 0F /r ib;
    m128 operands 16-byte aligned (legacy SSE: misaligned is #GP)."""
    if draw(st.booleans()):
        rm = ("m", (2, 7, None, struct.pack("<i", draw(st.integers(-0x100, 0x100)) * 16), 0, 1))
    else:
        rm = ("r", draw(st.integers(0, 15)))
    reg = draw(st.integers(0, 15))
    if draw(st.integers(0, 5)) == 0:
        return a.enc(b"\x0f\x3a\x0f", reg, rm, 4, bytes([draw(st.integers(0, 40))]), prefix=b"\x66"), 0
    return a.enc(bytes.fromhex("0f38" + draw(st.sampled_from(SSSE3))), reg, rm, 4, prefix=b"\x66"), 0


@settings(max_examples=N_MMX, deadline=None, suppress_health_check=list(HealthCheck))
@given(code=sse_programs(24, gens=(g_ssse3_xmm, g_ssse3_xmm, g_ssse3_xmm, g_sse, g_mov)), state=initial_state(64))
def test_oracle_ssse3_xmm(code, state):
    check(64, code, state)


@pytest.mark.parametrize("opc", SSSE3 + ["palignr"])
@pytest.mark.parametrize("width", ["mmx", "xmm"])
def test_each_ssse3_op(opc, width):
    """Every SSSE3 opcode once in each width, register and memory source, on edge
    bytes (0x80 saturates pabs/psign/pmulhrsw, 0x7f/0xff the horizontal sums)."""
    a = Asm(64)
    pfx = b"" if width == "mmx" else b"\x66"
    opcode, imm = (b"\x0f\x3a\x0f", b"\x05") if opc == "palignr" else (bytes.fromhex("0f38" + opc), b"")
    mem = (2, 7, None, struct.pack("<i", MM_IN), 0, 1)
    body = a.enc(opcode, 0, ("r", 1), 4, imm, prefix=pfx) + a.enc(opcode, 2, ("m", mem), 4, imm, prefix=pfx)
    code = mmx_prologue() + body + mmx_epilogue()
    vals, flags, _data, xmm = fixed_state(sum(opc.encode()))
    data = bytes([0x7f, 0x80, 0xff, 0x00, 0x01, 0xfe, 0x81, 0x7e]) * 8
    check(64, code, (vals, flags, data, xmm))


# SSE4.1 (and SSE4.2's pcmpgtq), all 66-prefixed: (opcode, form)
SSE41 = ([("0f38" + o, "x") for o in ("10", "14", "15", "17", "28", "29", "2b", "37", "38", "39", "3a", "3b",
                                      "3c", "3d", "3e", "3f", "40", "41")]
         + [("0f3a" + o, "xi") for o in ("0c", "0d", "0e", "40", "41", "42", "08", "09")]
         + [("0f38" + o, "part") for o in ("20", "21", "22", "23", "24", "25", "30", "31", "32", "33", "34", "35")]
         + [("0f3a0a", "part_i"), ("0f3a0b", "part_i"), ("0f382a", "load")]
         + [("0f3a" + o, "extract") for o in ("14", "15", "16", "17")]
         + [("0f3a20", "insert"), ("0f3a22", "insert"), ("0f3a21", "insertps")])


def g_sse41(draw, a: Asm):
    opc, form = draw(st.sampled_from(SSE41))
    opcode = bytes.fromhex(opc)
    reg = draw(st.integers(0, 15))
    imm = bytes([draw(st.integers(0, 255))])
    aligned = ("m", (2, 7, None, struct.pack("<i", draw(st.integers(-0x100, 0x100)) * 16), 0, 1))
    xreg = ("r", draw(st.integers(0, 15)))
    if form in ("x", "xi"):
        rm = aligned if draw(st.booleans()) else xreg
        return a.enc(opcode, reg, rm, 4, imm if form == "xi" else b"", prefix=b"\x66"), 0
    if form in ("part", "part_i"):
        rm = ("m", a.mem(draw, 8)) if draw(st.booleans()) else xreg
        return a.enc(opcode, reg, rm, 4, imm if form == "part_i" else b"", prefix=b"\x66"), 0
    if form == "load":
        return a.enc(opcode, reg, aligned, 4, prefix=b"\x66"), 0
    size = draw(st.sampled_from([4, 8])) if opc in ("0f3a16", "0f3a22") else 4
    if form in ("extract", "insert"):
        rm = ("m", a.mem(draw, 8)) if draw(st.booleans()) else ("r", draw(st.sampled_from(GPR64)))
        return a.enc(opcode, reg, rm, size, imm, prefix=b"\x66"), 0
    rm = ("m", a.mem(draw, 4)) if draw(st.booleans()) else xreg     # insertps
    return a.enc(opcode, reg, rm, 4, imm, prefix=b"\x66"), 0


@settings(max_examples=N_MMX, deadline=None, suppress_health_check=list(HealthCheck))
@given(code=sse_programs(24, gens=(g_sse41, g_sse41, g_sse41, g_sse, g_mov)), state=initial_state(64))
def test_oracle_sse41(code, state):
    check(64, code, state)


# Two NaN products: which one a dot product returns is the order of its adds (found by
# a random stream: packusdw made elements 2 and 3 NaNs, dpps 0xc1). Hosts' CPUs have
# not agreed on it (some add each pair's high element first, some the low one, as the
# SDM does), nor has unicorn (its softfloat prefers the larger NaN), so ours runs the
# host's own dpps/dppd (c_ext/sse41.c) and the host CPU judges these.
DP_NANS = [(0, 0, 0xFFFF0000, 0xFFFFFFFF), (0xFFFF0000, 0xFFFFFFFF, 0, 0), (0xFFFFFFFF, 0, 0xFFFF0000, 0),
           (0xFFFF0000, 0xFFFFFFFF, 0x7FC00001, 0xFFC00000), (0xFFC00000, 0, 0, 0x7FC00001)]


@pytest.mark.parametrize("elements", DP_NANS, ids=lambda e: "-".join(f"{x:08x}" for x in e))
@pytest.mark.parametrize("imm", [0xC1, 0x31, 0x51, 0xF1, 0x91])
def test_dot_products_pick_the_hardwares_nan(elements, imm):
    vals = {n: 0 for n in range(16)}
    vals[4] = LAYOUT[64]["stack"]
    vals[15] = 0x208000
    data = b"".join(x.to_bytes(4, "little") for x in elements) * 4
    xmm = [int.from_bytes(data[:16], "little")] + [0] * 15
    dpps = b"\x66\x0f\x3a\x40\xc0" + bytes([imm])                  # dpps xmm0, xmm0, imm
    dppd = b"\x66\x0f\x3a\x41\xc8" + bytes([imm & 0x33])           # dppd xmm1, xmm0, imm
    movdqa = b"\x66\x0f\x6f\xc8"                                       # movdqa xmm1, xmm0
    check(64, MXCSR_PROLOGUE + movdqa + dpps + dppd + MXCSR_EPILOGUE, (vals, 2, data, xmm))


@pytest.mark.parametrize("entry", SSE41, ids=lambda e: e[0])
def test_each_sse41_op(entry):
    """Every SSE4.1 opcode once, register and memory forms, fixed edge operands."""
    opc, form = entry
    a = Asm(64)
    opcode = bytes.fromhex(opc)
    imm = b"\xa5" if form not in ("x", "part", "load") else b""
    mem = ("m", (2, 7, None, struct.pack("<i", MM_IN), 0, 1))
    if form in ("extract", "insert"):
        body = a.enc(opcode, 1, ("r", 3), 4, imm, prefix=b"\x66") + a.enc(opcode, 2, mem, 4, imm, prefix=b"\x66")
    elif form == "load":
        body = a.enc(opcode, 2, mem, 4, prefix=b"\x66")
    else:
        body = a.enc(opcode, 0, ("r", 1), 4, imm, prefix=b"\x66") + a.enc(opcode, 2, mem, 4, imm, prefix=b"\x66")
    code = MXCSR_PROLOGUE + body + MXCSR_EPILOGUE
    vals, flags, _data, xmm = fixed_state(sum(opc.encode()))
    data = bytes([0x7f, 0x80, 0xff, 0x00, 0x01, 0xfe, 0x81, 0x7e]) * 8
    check(64, code, (vals, flags, data, xmm))


def g_sse42(draw, a: Asm):
    """crc32 (every operand size, register and memory) and the four string compares
    with random control bytes; explicit lengths in eax/edx set small (signed) first,
    and zero bytes planted in XMM registers for the implicit-length forms."""
    k = draw(st.integers(0, 5))
    if k == 0:
        opc = draw(st.sampled_from(["0f38f0", "0f38f1"]))
        size = draw(st.sampled_from([4, 8])) if opc == "0f38f1" else draw(st.sampled_from([4, 8]))
        src_size = 1 if opc == "0f38f0" else size
        pfx = b"\xf2"
        no66 = True
        if opc == "0f38f1" and draw(st.booleans()):
            pfx, size = b"\x66\xf2", 4      # crc32 r32, r/m16
        rm = ("m", a.mem(draw, src_size)) if draw(st.booleans()) else ("r", draw(st.sampled_from(GPR64)))
        return a.enc(bytes.fromhex(opc), draw(st.sampled_from(GPR64)), rm, size, prefix=pfx, no66=no66), 0
    if k == 1:   # a zero element where the implicit forms stop
        return (b"\x31\xc0" + a.enc(b"\x0f\x3a\x20", draw(st.integers(0, 15)), ("r", 0), 4,
                                     bytes([draw(st.integers(0, 15))]), prefix=b"\x66")), 0
    if k == 2:   # explicit lengths, sometimes negative or past the end
        return (b"\xb8" + struct.pack("<i", draw(st.integers(-20, 20))) +
                b"\xba" + struct.pack("<i", draw(st.integers(-20, 20)))), 0
    opc = bytes.fromhex(draw(st.sampled_from(["0f3a60", "0f3a61", "0f3a62", "0f3a63"])))
    rm = ("m", a.mem(draw, 16)) if draw(st.booleans()) else ("r", draw(st.integers(0, 15)))
    size = 8 if draw(st.booleans()) else 4    # REX.W: 64-bit lengths
    lengths = b""
    if opc[2] in (0x60, 0x61):
        # The explicit forms get their lengths just before: unicorn's helper crashes
        # the process on some random 64-bit lengths (a sign-extended mov keeps them
        # small, negative ones included, in both widths).
        lengths = (b"\x48\xc7\xc0" + struct.pack("<i", draw(st.integers(-40, 40))) +
                   b"\x48\xc7\xc2" + struct.pack("<i", draw(st.integers(-40, 40))))
    return lengths + a.enc(opc, draw(st.integers(0, 15)), rm, size, bytes([draw(st.integers(0, 127))]),
                           prefix=b"\x66"), 0


@settings(max_examples=N_MMX, deadline=None, suppress_health_check=list(HealthCheck))
@given(code=sse_programs(24, gens=(g_sse42, g_sse42, g_sse42, g_sse, g_mov)), state=initial_state(64))
def test_oracle_sse42(code, state):
    check(64, code, state)


def fixed_state(seed: int):
    rnd = random.Random(seed)
    vals = {n: rnd.getrandbits(64) for n in range(16)}
    vals[4] = LAYOUT[64]["stack"]
    vals[14] = rnd.randrange(256)
    vals[15] = 0x208000
    data = bytes(rnd.getrandbits(8) for _ in range(64))
    xmm = [rnd.getrandbits(128) for _ in range(16)]
    return vals, 2, data, xmm


@pytest.mark.parametrize("opc", MMX_BINARY)
def test_each_mmx_binary_op_register_and_memory(opc):
    """Every mm, mm/m64 opcode once each way, on saturating and sign-edge operands
    (the data region's pattern is fixed: 0x7f/0x80/0xff/0x00 bytes)."""
    a = Asm(64)
    mem = (2, 7, None, struct.pack("<i", MM_IN + 8), 0, 1)    # [r15 + MM_IN + 8] = MM1's image
    body = a.enc(bytes.fromhex("0f" + opc), 0, ("r", 1), 4) + a.enc(bytes.fromhex("0f" + opc), 2, ("m", mem), 4)
    code = mmx_prologue() + body + mmx_epilogue()
    vals, flags, _data, xmm = fixed_state(int(opc, 16))
    data = bytes([0x7f, 0x80, 0xff, 0x00, 0x01, 0xfe, 0x81, 0x7e]) * 8
    check(64, code, (vals, flags, data, xmm))


def test_mmx_x87_state():
    """SDM Vol. 1, 9.5: an MMX instruction sets TOP to 0 and every tag valid; a write
    sets the register's exponent and sign to all ones (x87 sees a NaN); EMMS empties
    every tag. Read back through fnstenv (TOP, full tag word) and fnsave (ST values)."""
    from support.tcg import TcgVcpu, identity_map_2m, make_memory, regs, set_long_mode
    from kvmpy.hv import exits
    mem = make_memory(8 << 20)
    identity_map_2m(mem)
    code = bytes.fromhex(
        "d9e8"                  # fld1: TOP 7, ST0 valid
        "0f6ec0"                # movd mm0, eax: TOP 0, all tags valid, R0 = eax | 0xffff << 64
        "0f7f0c25" "00002000"  # movq [0x200000], mm1: reads only (still sets TOP 0)
        "d9342500102000"        # fnstenv [0x201000]
        "0f77"                  # emms
        "d9342540102000"        # fnstenv [0x201040]
        "dd342500202000"        # fnsave [0x202000]
        "f4")                   # hlt
    mem.write(0x100000, code)
    v = TcgVcpu(mem)
    set_long_mode(v)
    v.set_regs(regs(rip=0x100000, rsp=0x300000, rax=0x1234_5678))
    kind = v.run()
    assert kind == exits.EXIT_HLT, kind
    env = mem.read(0x201000, 28)
    fsw, ftw = struct.unpack_from("<H", env, 4)[0], struct.unpack_from("<H", env, 8)[0]
    assert (fsw >> 11) & 7 == 0
    # R0 written by movd: exponent 0x7fff -> special (2); R7 (fld1): valid (0); the others
    # hold zeros with a zero exponent -> zero (1), as the hardware computes tags
    assert ftw & 3 == 2
    assert (ftw >> 14) & 3 == 0
    env2 = mem.read(0x201040, 28)
    assert struct.unpack_from("<H", env2, 8)[0] == 0xFFFF
    image = mem.read(0x202000 + 28, 10)     # ST0 = R0 now that TOP is 0
    assert image[:8] == struct.pack("<Q", 0x1234_5678)
    assert image[8:] == b"\xff\xff"
    v.close()
