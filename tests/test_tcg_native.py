"""The translator's native tier (c_ext/native/) against its own interpreter.

Random straight-line blocks of the instructions with native forms (mov, ALU, test,
lea, shifts (by a constant, by 1, by cl), rol/ror, not/neg, bswap, loads/stores
through the inline TLB path, byte and immediate movs, movzx/movsx/movsxd, setcc,
cmovcc, push/pop, byte, memory and adc/sbb ALU forms, a closing jcc, call or ret), mixed with instructions the native code hands to the interpreter's handler
(neg, lock-prefixed and 16-bit forms), run
from random register, flag and memory
states on two translator vCPUs: one compiling every block before its first run
(threshold 0), one never compiling. Every register, rip, the arithmetic flags and
the data page must match. Then the invariants the interpreter relies on when it
takes over from native code: a page fault in the middle of a compiled block leaves
rip precise and the earlier instructions' results in place; code that rewrites
itself runs its new bytes; a push, pop, call or ret whose stack page is not mapped
faults with rsp and rip as they were before it; blocks chained straight into each
other still take interrupts, stop when kicked and see code they rewrite; the switch
and the statistics work.
Run more cases with KVMPY_FUZZ=1.
"""

from __future__ import annotations

import os
import struct

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from support.tcg import TcgVcpu, identity_map_2m, make_memory, regs, set_long_mode  # noqa: E402
from kvmpy.hv import exits  # noqa: E402

FUZZ = os.environ.get("KVMPY_FUZZ") == "1"
EXAMPLES = 3000 if FUZZ else 300

CODE = 0x100000
DATA = 0x200000
DATA_SIZE = 0x1000
POOL = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13]   # rsp, r14 spare, r15 = DATA
STACK = DATA + DATA_SIZE // 2   # rsp: pushes and pops land in the compared page
NAMES = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
ARITH = 0x8D5   # CF PF AF ZF SF OF


def rex(w, r=0, x=0, b=0):
    return bytes([0x40 | (w << 3) | ((r >> 3) << 2) | ((x >> 3) << 1) | (b >> 3)])


def modrm(mod, reg, rm):
    return bytes([(mod << 6) | ((reg & 7) << 3) | (rm & 7)])


reg = st.sampled_from(POOL)
wide = st.sampled_from([0, 1])
# operand-size (66) and address-size (67) prefixes: forms the native code leaves to the
# interpreter's handler, next to the same instruction in native form
osz16 = st.sampled_from([b"", b"", b"\x66"])
asz32 = st.sampled_from([b"", b"", b"\x67"])
disp = st.integers(0, DATA_SIZE - 8)


@st.composite
def rr_op(draw):
    opc = draw(st.sampled_from([0x89, 0x8B, 0x01, 0x03, 0x09, 0x0B, 0x21, 0x23, 0x29, 0x2B,
                                0x31, 0x33, 0x39, 0x3B, 0x85, 0x11, 0x19]))
    w, a, b = draw(wide), draw(reg), draw(reg)
    return draw(osz16) + rex(w, a, 0, b) + bytes([opc]) + modrm(3, a, b)


@st.composite
def ri_op(draw):
    op = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]))
    w, r = draw(wide), draw(reg)
    if draw(st.booleans()):
        return rex(w, 0, 0, r) + b"\x83" + modrm(3, op, r) + struct.pack("<b", draw(st.integers(-128, 127)))
    return rex(w, 0, 0, r) + b"\x81" + modrm(3, op, r) + struct.pack("<i", draw(st.integers(-2**31, 2**31 - 1)))


@st.composite
def shift_op(draw):
    kind = draw(st.sampled_from([4, 5, 7]))
    w, r = draw(wide), draw(reg)
    return draw(osz16) + rex(w, 0, 0, r) + b"\xC1" + modrm(3, kind, r) + bytes([draw(st.integers(0, 255))])


@st.composite
def lea_op(draw):
    w, r, base = draw(wide), draw(reg), draw(reg)
    index = draw(st.sampled_from([x for x in POOL if x != 4]))
    scale = draw(st.integers(0, 3))
    short_addr = b"\x67" if draw(st.booleans()) else b""
    return (short_addr + rex(w | 1, r, index, base) + b"\x8D" + modrm(2, r, 4) +
            bytes([(scale << 6) | ((index & 7) << 3) | (base & 7)]) +
            struct.pack("<i", draw(st.integers(-2**31, 2**31 - 1))))


@st.composite
def imm_op(draw):
    r = draw(reg)
    if draw(st.booleans()):
        return rex(1, 0, 0, r) + bytes([0xB8 + (r & 7)]) + struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return rex(0, 0, 0, r) + bytes([0xB8 + (r & 7)]) + struct.pack("<I", draw(st.integers(0, 2**32 - 1)))


@st.composite
def mem_op(draw):
    """load, store or load-ALU at [r15 + disp32]"""
    opc = draw(st.sampled_from([0x8B, 0x89, 0x03, 0x0B, 0x23, 0x2B, 0x33, 0x3B]))
    w, r = draw(wide), draw(reg)
    return (draw(osz16) + draw(asz32) + rex(w, r, 0, 15) + bytes([opc]) + modrm(2, r, 7) +
            struct.pack("<i", draw(disp)))


@st.composite
def extend_op(draw):
    opc = draw(st.sampled_from([0xB6, 0xB7, 0xBE, 0xBF]))
    w, r = draw(wide), draw(reg)
    if draw(st.booleans()):
        return (draw(osz16) + draw(asz32) + rex(w, r, 0, 15) + b"\x0F" + bytes([opc]) + modrm(2, r, 7) +
                struct.pack("<i", draw(disp)))
    src = draw(reg)
    if draw(st.booleans()) and r < 8 and src < 8 and not w:
        return b"\x0F" + bytes([opc]) + modrm(3, r, src)   # no REX: AH-BH as byte sources
    return draw(osz16) + rex(w, r, 0, src) + b"\x0F" + bytes([opc]) + modrm(3, r, src)


@st.composite
def inc_imul_op(draw):
    w, a, b = draw(wide), draw(reg), draw(reg)
    imm8 = struct.pack("<b", draw(st.integers(-128, 127)))
    imm32 = struct.pack("<i", draw(st.integers(-2**31, 2**31 - 1)))
    o16 = draw(osz16)   # not before 69: it would shorten the immediate
    return draw(st.sampled_from([
        o16 + rex(w, 0, 0, a) + b"\xFF" + modrm(3, 0, a),                     # inc
        o16 + rex(w, 0, 0, a) + b"\xFF" + modrm(3, 1, a),                     # dec
        o16 + rex(w, a, 0, b) + b"\x0F\xAF" + modrm(3, a, b),                 # imul r, r
        o16 + rex(w, a, 0, b) + b"\x6B" + modrm(3, a, b) + imm8,              # imul r, r, imm8
        rex(w, a, 0, b) + b"\x69" + modrm(3, a, b) + imm32,                   # imul r, r, imm32
        o16 + rex(w, a, 0, 15) + b"\x0F\xAF" + modrm(2, a, 7) + struct.pack("<i", draw(disp)),
    ]))


@st.composite
def cond_op(draw):
    """setcc (REX or not: AH-BH as destinations) and cmovcc, with or without live host flags"""
    w, a, b = draw(wide), draw(reg), draw(reg)
    cc = draw(st.integers(0, 15))
    return draw(st.sampled_from([
        rex(0, 0, 0, a) + bytes([0x0F, 0x90 + cc]) + modrm(3, 0, a),    # setcc
        (bytes([0x0F, 0x90 + cc]) + modrm(3, 0, a & 7)) if a < 8 else b"\x90",   # setcc ah..bh
        draw(osz16) + rex(w, a, 0, b) + bytes([0x0F, 0x40 + cc]) + modrm(3, a, b),   # cmovcc
        rex(w, 0, 0, a) + b"\xF7" + modrm(3, 3, a),                     # neg: through the helper
    ]))


@st.composite
def rotate_movsxd_op(draw):
    w, a, b = draw(wide), draw(reg), draw(reg)
    return draw(st.sampled_from([
        draw(osz16) + rex(w, 0, 0, a) + b"\xC1" + modrm(3, draw(st.sampled_from([0, 1])), a) +
        bytes([draw(st.integers(0, 255))]),                                     # rol/ror imm8
        draw(osz16) + rex(w, 0, 0, a) + b"\xD1" + modrm(3, draw(st.sampled_from([0, 1, 4, 5, 7])), a),   # by 1
        draw(osz16) + rex(w, 0, 0, a) + b"\xD3" + modrm(3, draw(st.sampled_from([4, 5, 7])), a),   # by cl
        b"\xB1" + bytes([draw(st.sampled_from([0, 1, 31, 32, 33, 63, 64, 200]))]),               # mov cl, n
        rex(1, a, 0, b) + b"\x63" + modrm(3, a, b),                             # movsxd r64, r32
        draw(asz32) + rex(1, a, 0, 15) + b"\x63" + modrm(2, a, 7) + struct.pack("<i", draw(disp)),
        b"\x0F\x1F" + modrm(1, 0, 0) + b"\x00",                                # nop dword [rax]
        draw(osz16) + rex(w, 0, 0, a) + b"\xF7" + modrm(3, draw(st.sampled_from([2, 3])), a),      # not, neg
        rex(0, 0, 0, a) + b"\xF6" + modrm(3, draw(st.sampled_from([2, 3])), a),
        b"\xF6" + modrm(3, draw(st.sampled_from([2, 3])), a & 7),                                 # AH-BH
        rex(w, 0, 0, a) + b"\x0F" + bytes([0xC8 + (a & 7)]),                                      # bswap
        draw(asz32) + rex(0, a, b, 15) + b"\x8D" + modrm(2, a, 4) +
        bytes([(draw(st.integers(0, 3)) << 6) | ((b & 7) << 3) | 7]) + struct.pack("<i", draw(disp)),   # lea r32
    ]))


@st.composite
def byte_imm_mov_op(draw):
    """mov of bytes (AH-BH without REX) and mov r/m, imm to registers and memory"""
    w, a, b = draw(wide), draw(reg), draw(reg)
    mem = struct.pack("<i", draw(disp))
    return draw(st.sampled_from([
        rex(0, a, 0, b) + bytes([draw(st.sampled_from([0x88, 0x8A]))]) + modrm(3, a, b),
        bytes([draw(st.sampled_from([0x88, 0x8A]))]) + modrm(3, a & 7, b & 7),
        draw(asz32) + rex(0, a, 0, 15) + bytes([draw(st.sampled_from([0x88, 0x8A]))]) + modrm(2, a, 7) + mem,
        rex(0, 0, 0, a) + b"\xC6" + modrm(3, 0, a) + bytes([draw(st.integers(0, 255))]),
        rex(w, 0, 0, a) + b"\xC7" + modrm(3, 0, a) + struct.pack("<i", draw(st.integers(-2**31, 2**31 - 1))),
        b"\x66" + rex(0, 0, 0, a) + b"\xC7" + modrm(3, 0, a) + struct.pack("<h", draw(st.integers(-2**15, 2**15 - 1))),
        rex(0, 0, 0, 15) + b"\xC6" + modrm(2, 0, 7) + mem + bytes([draw(st.integers(0, 255))]),
        rex(w, 0, 0, 15) + b"\xC7" + modrm(2, 0, 7) + mem + struct.pack("<i", draw(st.integers(-2**31, 2**31 - 1))),
    ]))


@st.composite
def stack_op(draw):
    """push/pop of registers (rsp too) and immediates, with the stack in the data page"""
    a = draw(st.sampled_from(POOL + [4]))
    return draw(st.sampled_from([
        rex(0, 0, 0, a) + bytes([0x50 + (a & 7)]),
        rex(0, 0, 0, a % 4) + bytes([0x58 + (a % 4)]) if a == 4 else
        rex(0, 0, 0, a) + bytes([0x58 + (a & 7)]),                               # never pop rsp
        b"\x66" + rex(0, 0, 0, a) + bytes([0x50 + (a & 7)]),                      # 16-bit: helper
        b"\x68" + struct.pack("<i", draw(st.integers(-2**31, 2**31 - 1))),
        b"\x6A" + struct.pack("<b", draw(st.integers(-128, 127))),
    ]))


@st.composite
def gen_alu_op(draw):
    """the ALU forms the decoder does not specialise: byte operands (AH-BH without REX),
    memory operands (read-modify-write, and lock-prefixed: the helper's atomics), adc and
    sbb, the accumulator with an immediate, test; 16-bit ones through the helper"""
    w, a, b = draw(wide), draw(reg), draw(reg)
    op, d, full = draw(st.integers(0, 7)), draw(st.integers(0, 1)), draw(st.integers(0, 1))
    imm8 = struct.pack("<b", draw(st.integers(-128, 127)))
    imm32 = struct.pack("<i", draw(st.integers(-2**31, 2**31 - 1)))
    mem = struct.pack("<i", draw(disp))
    o16 = draw(osz16)
    return draw(st.sampled_from([
        o16 + rex(w, a, 0, b) + bytes([op * 8 + d * 2 + full]) + modrm(3, a, b),
        bytes([op * 8 + d * 2]) + modrm(3, a & 7, b & 7),                        # no REX: AH-BH
        o16 + rex(w, a, 0, 15) + bytes([op * 8 + d * 2 + full]) + modrm(2, a, 7) + mem,
        b"\xF0" + rex(w, a, 0, 15) + bytes([op % 7 * 8 + full]) + modrm(2, a, 7) + mem,   # lock (not cmp)
        o16 + rex(w) + bytes([op * 8 + 4]) + imm8,
        rex(w) + bytes([op * 8 + 5]) + imm32,
        rex(w, 0, 0, a) + b"\x80" + modrm(3, op, a) + imm8,
        b"\x80" + modrm(3, op, a & 7) + imm8,
        o16 + rex(w, 0, 0, a) + b"\x83" + modrm(3, op, a) + imm8,
        rex(w, 0, 0, 15) + bytes([draw(st.sampled_from([0x80, 0x83]))]) + modrm(2, op, 7) + mem + imm8,
        rex(w, 0, 0, 15) + b"\x81" + modrm(2, op, 7) + mem + imm32,
        o16 + rex(w, a, 0, b) + bytes([0x84 + full]) + modrm(3, a, b),
        rex(w, a, 0, 15) + bytes([0x84 + full]) + modrm(2, a, 7) + mem,
        rex(w) + b"\xA8" + imm8, rex(w) + b"\xA9" + imm32,
        rex(w, 0, 0, a) + b"\xF6" + modrm(3, 0, a) + imm8,
        rex(w, 0, 0, 15) + b"\xF7" + modrm(2, 0, 7) + mem + imm32,
    ]))


lock_prefix = st.sampled_from([b"", b"\xF0"])


@st.composite
def atomic_op(draw):
    """lock-prefixed read-modify-writes of memory (ALU at every size, inc/dec), xchg and
    cmpxchg with memory (the latter after a load of the accumulator from there, so both
    outcomes come up): the host's own atomics past the inline TLB check"""
    w, a = draw(wide), draw(reg)
    op, full, incdec = draw(st.integers(0, 6)), draw(st.integers(0, 1)), draw(st.integers(0, 1))
    mem = struct.pack("<i", draw(disp))
    o16 = draw(osz16)
    imm8 = struct.pack("<b", draw(st.integers(-128, 127)))
    imm = struct.pack("<h", draw(st.integers(-2**15, 2**15 - 1))) if o16 and not w else \
        struct.pack("<i", draw(st.integers(-2**31, 2**31 - 1)))
    acc_load = (o16 + rex(w, 0, 0, 15) + b"\x8B" + modrm(2, 0, 7) + mem) if draw(st.booleans()) else b""
    return draw(st.sampled_from([
        b"\xF0" + o16 + rex(w, a, 0, 15) + bytes([op * 8 + full]) + modrm(2, a, 7) + mem,
        b"\xF0" + o16 + rex(w, 0, 0, 15) + b"\x83" + modrm(2, op, 7) + mem + imm8,
        b"\xF0" + o16 + rex(w, 0, 0, 15) + b"\x81" + modrm(2, op, 7) + mem + imm,
        b"\xF0" + rex(0, 0, 0, 15) + b"\x80" + modrm(2, op, 7) + mem + imm8,
        draw(lock_prefix) + o16 + rex(w, 0, 0, 15) + b"\xFF" + modrm(2, incdec, 7) + mem,
        draw(lock_prefix) + rex(0, 0, 0, 15) + b"\xFE" + modrm(2, incdec, 7) + mem,
        draw(lock_prefix) + o16 + rex(w, a, 0, 15) + b"\x87" + modrm(2, a, 7) + mem,
        draw(lock_prefix) + rex(0, a, 0, 15) + b"\x86" + modrm(2, a, 7) + mem,
        acc_load + draw(lock_prefix) + o16 + rex(w, a, 0, 15) + b"\x0F\xB1" + modrm(2, a, 7) + mem,
        acc_load + draw(lock_prefix) + rex(0, a, 0, 15) + b"\x0F\xB0" + modrm(2, a, 7) + mem,
    ]))


@st.composite
def word_div_op(draw):
    """16-bit ALU, mov and mov-immediate on memory, nop and pause, and unsigned div of
    a register or memory made non-zero first, with rdx cleared (no #DE: that has a test
    of its own)"""
    w, a = draw(wide), draw(st.sampled_from([x for x in POOL if x != 2]))
    op = draw(st.integers(0, 7))
    mem = struct.pack("<i", draw(disp))
    imm8 = struct.pack("<b", draw(st.integers(-128, 127)))
    imm16 = struct.pack("<h", draw(st.integers(-2**15, 2**15 - 1)))
    return draw(st.sampled_from([
        b"\x66" + rex(0, 0, 0, 15) + b"\x83" + modrm(2, op, 7) + mem + imm8,
        b"\x66" + rex(0, 0, 0, 15) + b"\x81" + modrm(2, op, 7) + mem + imm16,
        b"\x66" + rex(0, 0, 0, 15) + b"\xC7" + modrm(2, 0, 7) + mem + imm16,
        b"\x66" + rex(0, a, 0, 15) + bytes([draw(st.sampled_from([0x89, 0x8B]))]) + modrm(2, a, 7) + mem,
        b"\x90", b"\xF3\x90",
        rex(1, 0, 0, a) + b"\x83" + modrm(3, 1, a) + b"\x01" + b"\x31\xD2" +
        rex(w, 0, 0, a) + b"\xF7" + modrm(3, 6, a),                                  # or a, 1; xor edx, edx; div a
        rex(1, 0, 0, 15) + b"\x83" + modrm(2, 1, 7) + mem + b"\x01" + b"\x31\xD2" +
        rex(w, 0, 0, 15) + b"\xF7" + modrm(2, 6, 7) + mem,                            # the same on memory
    ]))


@st.composite
def mul_sreg_hint_op(draw):
    """unsigned mul of a register or memory (any product, both flag outcomes), mov from
    a segment register to a register (16, 32 and 64 bits) or memory, prefetches and hint
    nops (0F 0D, 0F 18-1E), bt/bts/btr/btc with an immediate (any byte: it wraps) on a
    register or memory, lock-prefixed or not"""
    w, a = draw(wide), draw(reg)
    mem = struct.pack("<i", draw(disp))
    sreg = draw(st.integers(0, 5))
    small = draw(st.booleans())   # a product that fits the low half: CF = OF = 0
    bt, bit = draw(st.integers(4, 7)), bytes([draw(st.integers(0, 255))])
    return draw(st.sampled_from([
        rex(w, 0, 0, a) + b"\xF7" + modrm(3, 4, a),
        rex(w, 0, 0, 15) + b"\xF7" + modrm(2, 4, 7) + mem,
        (b"\x31\xC0\xB0\x07" if small else b"") + b"\x41\xBA\x0B\x00\x00\x00" + rex(w, 0, 0, 10) +
        b"\xF7" + modrm(3, 4, 10),                       # [xor eax, eax; mov al, 7;] mov r10d, 11; mul r10
        draw(osz16) + rex(draw(wide), 0, 0, a) + b"\x8C" + modrm(3, sreg, a),
        rex(0, 0, 0, 15) + b"\x8C" + modrm(2, sreg, 7) + mem,
        rex(0, 0, 0, 15) + bytes([0x0F, draw(st.sampled_from([0x0D, 0x18, 0x19, 0x1C, 0x1E]))]) +
        modrm(2, draw(st.integers(0, 7)), 7) + mem,
        rex(w, 0, 0, a) + b"\x0F\xBA" + modrm(3, bt, a) + bit,                 # bt/bts/btr/btc r, imm8
        draw(lock_prefix if bt > 4 else st.just(b"")) + rex(w, 0, 0, 15) + b"\x0F\xBA" + modrm(2, bt, 7) + mem + bit,
    ]))


# a flag producer right before a reader: the native code hands the flags over in the
# host's flags register there, not through the lazy record
flag_pair = st.tuples(st.one_of(gen_alu_op(), rr_op(), ri_op(), inc_imul_op()),
                      st.one_of(cond_op(), gen_alu_op())).map(b"".join)


@st.composite
def flag_helper_op(draw):
    """instructions the interpreter's handler runs that read the flags (cmc, lahf, pushf,
    adc of a word) or replace some (sahf, clc, stc): in front of them the lazy record
    must be whole, AF included, whatever the native code kept in the host flags"""
    a = draw(reg)
    return draw(st.sampled_from([
        b"\xF5", b"\x9F", b"\x9E", b"\xF8", b"\xF9",
        b"\x9C" + rex(0, 0, 0, a) + bytes([0x58 + (a & 7)]),                  # pushfq; pop a
        b"\x66" + rex(0, 0, 0, a) + b"\x83" + modrm(3, 2, a) + b"\x05",         # adc a16, 5
    ]))


@st.composite
def flag_between_op(draw):
    """what may stand between a flag producer and its reader: movs that keep the host
    flags, lea and loads/stores whose TLB check clobbers them (the slow path of a miss
    too), pushes and pops, instructions the helper runs"""
    a, b = draw(reg), draw(reg)
    return draw(st.one_of(
        st.just(rex(1, a, 0, b) + b"\x89" + modrm(3, a, b)), imm_op(), st.just(b"\x90"),
        lea_op(), mem_op(), extend_op(), stack_op(), byte_imm_mov_op(), flag_helper_op(),
        st.just(rex(1, a, 0, b) + b"\x87" + modrm(3, a, b)),                   # xchg r, r: the helper
    ))


# a flag producer, then readers (jcc, setcc, cmovcc, adc/sbb, inc/dec, rol/ror) with
# anything between them: the host flags the native code hands over must be the guest's
# at every reader, and the lazy record whole wherever something else can see it
flag_producer = st.one_of(gen_alu_op(), rr_op(), ri_op(), inc_imul_op(), shift_op(), atomic_op(),
                          mem_op(), rotate_movsxd_op())
flag_reader = st.one_of(cond_op(), gen_alu_op(), inc_imul_op(), rotate_movsxd_op(), flag_helper_op())
flag_chain_insns = st.tuples(flag_producer, st.lists(st.one_of(flag_between_op(), flag_reader), max_size=4),
                             flag_reader).map(lambda t: [t[0], *t[1], t[2]])
flag_chain = flag_chain_insns.map(b"".join)

insn = st.one_of(rr_op(), ri_op(), shift_op(), lea_op(), imm_op(), mem_op(), extend_op(), inc_imul_op(),
                 cond_op(), rotate_movsxd_op(), stack_op(), gen_alu_op(), byte_imm_mov_op(), flag_pair,
                 atomic_op(), word_div_op(), mul_sreg_hint_op(), flag_chain, flag_helper_op())


def block_end(draw, body, code_base, long64=True):
    """the block's last instruction: none, a taken jcc, a call to the next instruction,
    a ret to a pushed address, a jmp or call through a register (r14; 32-bit code: esi)
    or through memory holding it; then the hlt the run stops at"""
    kind = draw(st.sampled_from(["none", "jcc", "call", "ret", "jmp r", "call r", "jmp m", "call m"]))
    if not long64 and kind in ("jmp r", "call r"):
        target = code_base + len(body) + 7   # after mov esi, imm32 and the 2-byte jump
        return body + b"\xBE" + struct.pack("<I", target) + (b"\xFF\xE6" if kind == "jmp r" else b"\xFF\xD6") + b"\xF4"
    if not long64 and kind in ("jmp m", "call m"):
        slot = struct.pack("<i", draw(disp))   # [ebx + disp32]
        target = code_base + len(body) + 17
        return body + b"\xBE" + struct.pack("<I", target) + b"\x89\xB3" + slot + \
            b"\xFF" + (b"\xA3" if kind == "jmp m" else b"\x93") + slot + b"\xF4"
    if kind in ("jmp r", "call r"):
        target = code_base + len(body) + 13   # after mov r14, imm64 and the 3-byte jump
        return body + b"\x49\xBE" + struct.pack("<Q", target) + \
            (b"\x41\xFF\xE6" if kind == "jmp r" else b"\x41\xFF\xD6") + b"\xF4"
    if kind in ("jmp m", "call m"):
        slot = struct.pack("<i", draw(disp))
        target = code_base + len(body) + 24   # after mov r14, imm64; mov [r15+d], r14; the jump
        return body + b"\x49\xBE" + struct.pack("<Q", target) + b"\x4D\x89\xB7" + slot + \
            b"\x41\xFF" + (b"\xA7" if kind == "jmp m" else b"\x97") + slot + b"\xF4"
    if kind == "jcc":
        return body + bytes([0x70 + draw(st.integers(0, 15)), 1]) + b"\xF4\xF4"
    if kind == "call":
        return body + b"\xE8" + struct.pack("<i", 0) + b"\xF4"
    if kind == "ret":
        target = code_base + len(body) + 6   # after push imm32 and ret
        return body + b"\x68" + struct.pack("<I", target) + b"\xC3" + b"\xF4"
    return body + b"\xF4\xF4"


@st.composite
def block(draw):
    body = b"".join(draw(st.lists(insn, min_size=1, max_size=40)))
    return block_end(draw, body, CODE)


@st.composite
def start_state(draw):
    vals = {n: draw(st.integers(0, 2**64 - 1)) for n in POOL}
    flags = draw(st.integers(0, ARITH)) & ARITH
    data = draw(st.binary(min_size=DATA_SIZE, max_size=DATA_SIZE))
    return vals, flags, data


class Cpu:
    """A translator vCPU in 64-bit mode over its own RAM (identity mapped)."""

    def __init__(self, threshold):
        self.mem = make_memory(4 << 20)
        identity_map_2m(self.mem)
        self.vcpu = TcgVcpu(self.mem)
        self.vcpu.set_native_threshold(threshold)

    def run(self, code, state):
        vals, flags, data = state
        self.mem.write(CODE, code)
        self.mem.write(DATA, data)
        self.vcpu.invalidate_ram(CODE, len(code))
        set_long_mode(self.vcpu)
        r = regs(rip=CODE, rflags=flags | 2, r15=DATA, rsp=STACK)
        for n, v in vals.items():
            setattr(r, NAMES[n], v)
        self.vcpu.set_regs(r)
        kind = self.vcpu.run()
        return kind, self.vcpu.get_regs(), self.mem.read(DATA, DATA_SIZE)

    def close(self):
        self.vcpu.close()
        self.mem.close()


@pytest.fixture(scope="module")
def pair():
    native, interp = Cpu(0), Cpu(None)
    yield native, interp
    native.close()
    interp.close()


def _state(r):
    out = {n: getattr(r, n) for n in NAMES + ["rip"]}
    out["flags"] = r.rflags & ARITH
    return out


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(code=block(), state=start_state())
def test_native_block_matches_interpreter(pair, code, state):
    native, interp = pair
    got = native.run(code, state)
    want = interp.run(code, state)
    assert got[0] == want[0] == exits.EXIT_HLT
    assert _state(got[1]) == _state(want[1])
    assert got[2] == want[2]


def test_native_tier_runs_the_blocks(pair):
    """the differential test compares something: the native vCPU compiled and ran its
    blocks natively, the other did not"""
    native, interp = pair
    # add rax, rcx; add rcx, 7; mov rax, [r15]; mov [r15+8], rax; hlt
    code = b"\x48\x01\xc8\x48\x83\xc1\x07\x49\x8b\x07\x49\x89\x47\x08\xf4"
    native.run(code, ({}, 0, bytes(DATA_SIZE)))
    interp.run(code, ({}, 0, bytes(DATA_SIZE)))
    s = native.vcpu.stats()
    assert s["native_blocks"] > 0 and s["native_insns"] > s["native_helper_insns"]
    assert interp.vcpu.stats()["native_insns"] == 0
    assert native.vcpu.native_threshold == 0 and interp.vcpu.native_threshold is None



# ---- the same in 32-bit protected mode: inc/dec 40-4F, linear addresses through a
# data segment with a base, 32-bit wrap-around ----

POOL32 = [0, 1, 2, 5, 6, 7]   # esp unused, ebx = data base
DS_BASE = 0x100000


@st.composite
def insn32(draw):
    a, b = draw(st.sampled_from(POOL32)), draw(st.sampled_from(POOL32))
    o16 = draw(osz16)
    mem = modrm(2, a, 3) + struct.pack("<i", draw(disp))   # [ebx + disp32]
    imm8 = struct.pack("<b", draw(st.integers(-128, 127)))
    imm32 = struct.pack("<i", draw(st.integers(-2**31, 2**31 - 1)))
    cc = draw(st.integers(0, 15))
    opc = draw(st.sampled_from([0x89, 0x8B, 0x01, 0x03, 0x09, 0x0B, 0x21, 0x23, 0x29, 0x2B,
                                0x31, 0x33, 0x39, 0x3B, 0x85, 0x11, 0x19]))
    return draw(st.sampled_from([
        o16 + bytes([opc]) + modrm(3, a, b),
        o16 + bytes([opc if opc != 0x85 else 0x8B]) + mem,
        b"\x83" + modrm(3, draw(st.integers(0, 7)), a) + imm8,
        b"\x81" + modrm(3, draw(st.integers(0, 7)), a) + imm32,
        o16 + b"\xC1" + modrm(3, draw(st.sampled_from([4, 5, 7])), a) + bytes([draw(st.integers(0, 255))]),
        b"\x8D" + modrm(2, a, 4) + bytes([(draw(st.integers(0, 3)) << 6) | (b << 3) | 3]) + imm32,
        bytes([0xB8 + a]) + imm32,
        o16 + bytes([0x40 + a]), o16 + bytes([0x48 + a]),               # inc, dec
        o16 + b"\x0F" + bytes([draw(st.sampled_from([0xB6, 0xB7, 0xBE, 0xBF]))]) + modrm(3, a, b),
        o16 + b"\x0F" + bytes([draw(st.sampled_from([0xB6, 0xB7, 0xBE, 0xBF]))]) + mem,
        o16 + b"\x0F\xAF" + modrm(3, a, b), b"\x69" + modrm(3, a, b) + imm32, o16 + b"\x0F\xAF" + mem,
        bytes([0x0F, 0x90 + cc]) + modrm(3, 0, a), bytes([0x0F, 0x40 + cc]) + modrm(3, a, b),
        o16 + b"\xC1" + modrm(3, draw(st.sampled_from([0, 1])), a) + bytes([draw(st.integers(0, 255))]),
        o16 + bytes([0x50 + draw(st.sampled_from(POOL32 + [4]))]), o16 + bytes([0x58 + a]),   # push, pop
        b"\x68" + imm32, b"\x6A" + imm8,
    ]))


@st.composite
def atomic_div32(draw):
    """locked ALU, inc/dec, xchg, cmpxchg on [ebx + disp32], 16-bit ALU on memory, div"""
    a = draw(st.sampled_from(POOL32))
    op = draw(st.integers(0, 6))
    mem = struct.pack("<i", draw(disp))
    o16 = draw(osz16)
    return draw(st.sampled_from([
        b"\xF0" + o16 + bytes([op * 8 + 1]) + modrm(2, a, 3) + mem,
        b"\xF0" + o16 + b"\x83" + modrm(2, op, 3) + mem + struct.pack("<b", draw(st.integers(-128, 127))),
        draw(lock_prefix) + o16 + b"\xFF" + modrm(2, draw(st.integers(0, 1)), 3) + mem,
        draw(lock_prefix) + o16 + b"\x87" + modrm(2, a, 3) + mem,
        b"\x8B" + modrm(2, 0, 3) + mem + draw(lock_prefix) + o16 + b"\x0F\xB1" + modrm(2, a, 3) + mem,
        b"\x66\x83" + modrm(2, draw(st.integers(0, 7)), 3) + mem + struct.pack("<b", draw(st.integers(-128, 127))),
        b"\x83" + modrm(3, 1, a) + b"\x01" + b"\x31\xD2" + b"\xF7" + modrm(3, 6, a) if a != 2 else b"\x90",
        b"\x83" + modrm(2, 1, 3) + mem + b"\x01" + b"\x31\xD2" + b"\xF7" + modrm(2, 6, 3) + mem,
        b"\xF7" + modrm(3, 4, a),
        b"\xF7" + modrm(2, 4, 3) + mem,
        o16 + b"\x8C" + modrm(3, draw(st.integers(0, 5)), a),
        b"\x8C" + modrm(2, draw(st.integers(0, 5)), 3) + mem,
    ]))


@st.composite
def block32(draw):
    body = b"".join(draw(st.lists(st.one_of(insn32(), atomic_div32()), min_size=1, max_size=40)))
    return block_end(draw, body, CODE, long64=False)


class Cpu32(Cpu):
    """32-bit protected mode without paging; DS with a base, so linear != offset. The
    stack is in the data page: a 32-bit one (flat SS), or with stack16 a 16-bit one
    (SS.B clear, its base at the data page), which native code must leave to the
    interpreter."""

    def __init__(self, threshold, stack16=False):
        super().__init__(threshold)
        self.stack16 = stack16

    def run(self, code, state):
        from kvmpy.hv.regs import flat_segment
        from support.tcg import set_protected_flat

        vals, flags, data = state
        self.mem.write(CODE, code)
        self.mem.write(DATA, data)
        self.vcpu.invalidate_ram(CODE, len(code))
        set_protected_flat(self.vcpu)
        sr = self.vcpu.get_sregs()
        sr.ds = flat_segment(0x10, False, False)
        sr.ds.base = DS_BASE
        if self.stack16:
            sr.ss.db = 0
            sr.ss.base = DATA
        self.vcpu.set_sregs(sr)
        r = regs(rip=CODE, rflags=flags | 2, rsp=DATA_SIZE // 2 if self.stack16 else STACK)
        for n, v in vals.items():
            setattr(r, NAMES[n], v & 0xFFFFFFFF)
        r.rbx = DATA - DS_BASE
        self.vcpu.set_regs(r)
        kind = self.vcpu.run()
        return kind, self.vcpu.get_regs(), self.mem.read(DATA, DATA_SIZE)


@pytest.fixture(scope="module", params=["stack32", "stack16"])
def pair32(request):
    stack16 = request.param == "stack16"
    native, interp = Cpu32(0, stack16), Cpu32(None, stack16)
    yield native, interp
    native.close()
    interp.close()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(code=block32(), state=start_state())
def test_native_block_matches_interpreter_32bit(pair32, code, state):
    native, interp = pair32
    got = native.run(code, state)
    want = interp.run(code, state)
    assert got[0] == want[0] == exits.EXIT_HLT
    assert _state(got[1]) == _state(want[1])
    assert got[2] == want[2]


# ---- the interpreter's invariants at the edges of native code ----

from test_tcg_system import ISTSTACK, NOT_PRESENT, LongMachine  # noqa: E402


def _run_both(source, handlers=None):
    """(native, interpreted) LongMachines run to their hlt"""
    out = []
    for threshold in (0, None):
        m = LongMachine(source, handlers)
        m.vcpu.set_native_threshold(threshold)
        assert m.run() == exits.EXIT_HLT
        out.append(m)
    return out


def assert_same_state(native_regs, interp_regs):
    """Every general register, rip and rflags alike after the native and interpreted runs."""
    names = NAMES + ["rip", "rflags"]
    assert {n: getattr(native_regs, n) for n in names} == {n: getattr(interp_regs, n) for n in names}


# Rotates one after another (each one's flags from the record the one before left),
# and 32-bit ALU operations on cached registers whose records are read (a load, which
# may fault, follows each): pushfq takes the flags at three points.
ROTATES_AND_RECORDS = """
    mov eax, {a:#x}
    mov ecx, {b:#x}
    mov edx, {c:#x}
    lea rdi, [rip + data]
    add eax, ecx
    mov esi, [rdi]
    rol eax, 1
    ror ecx, 3
    rol edx, 31
    ror eax, 1
    pushfq
    pop r8
    cmp eax, ecx
    mov esi, [rdi]
    pushfq
    pop r9
    sub ecx, eax
    mov esi, [rdi]
    adc edx, esi
    pushfq
    pop r10
    hlt
data:
    .long 0x12345678
"""


@pytest.mark.parametrize("a,b,c", [(0x80000001, 0x40000000, 7), (0x7FFFFFFF, 0x1, 0x80000000),
                                   (0, 0, 0), (0xFFFFFFFF, 0xFFFFFFFF, 0x55555555)])
def test_rotates_and_32bit_records_match_interpreter(a, b, c):
    native, interp = _run_both(ROTATES_AND_RECORDS.format(a=a, b=b, c=c))
    try:
        assert native.vcpu.stats()["native_insns"] > 0
        assert_same_state(native.regs(), interp.regs())
    finally:
        native.close()
        interp.close()


FAULT_MID_BLOCK = f"""
    mov rax, 1
    mov rcx, {NOT_PRESENT:#x}
    add rax, 2
    lea rdi, [rax + rax * 2 + 5]
fault:
    mov rdx, [rcx]
    mov rax, 99
    hlt
pf:
    mov rbx, [rsp + 8]
    mov rsi, cr2
    hlt
"""


def test_page_fault_mid_block_is_precise():
    native, interp = _run_both(FAULT_MID_BLOCK, {14: ("pf",)})
    try:
        r = native.regs()
        assert r.rbx == native.syms["fault"]        # the pushed rip: the faulting load
        assert (r.rsi, r.rax, r.rdi) == (NOT_PRESENT, 3, 14)   # earlier results kept, later none
        assert_same_state(r, interp.regs())
        assert native.vcpu.stats()["native_blocks"] > 0
    finally:
        native.close()
        interp.close()


# ---- flags at a fault: random flag chains with a faulting access among them ----

FAULT_CODE = 0x110000   # the random block; LongMachine's own code (the handler) at 0x100000
FAULT_FRAME = 0x30      # the #PF frame on the IST stack: error code, rip, cs, rflags, rsp, ss
FAULT_PROGRAM = """
_start:
    hlt
pf:
    hlt
"""


@st.composite
def faulting_op(draw):
    """an access to the page after the data page, which is not present: a load, a store,
    a read-modify-write and a compare (a flag producer that faults before it writes
    anything), through the inline TLB path's slow side"""
    w, r = draw(wide), draw(reg)
    at = struct.pack("<i", DATA_SIZE + draw(st.integers(0, DATA_SIZE - 8)))
    return draw(st.sampled_from([
        rex(w, r, 0, 15) + b"\x8B" + modrm(2, r, 7) + at,
        rex(w, r, 0, 15) + b"\x89" + modrm(2, r, 7) + at,
        rex(w, r, 0, 15) + b"\x01" + modrm(2, r, 7) + at,
        rex(w, 0, 0, 15) + b"\x83" + modrm(2, 7, 7) + at + b"\x05",
        rex(w, r, 0, 15) + b"\x0F\xB6" + modrm(2, r, 7) + at,
    ]))


@st.composite
def fault_block(draw):
    """flag chains and other instructions with a faulting access somewhere among them
    (mostly between a flag producer and its reader), then the closing hlt"""
    parts = draw(st.lists(st.one_of(flag_chain, insn), min_size=1, max_size=12))
    fault = draw(faulting_op())
    at = draw(st.integers(0, len(parts)))
    chain = draw(flag_chain_insns)
    cut = draw(st.integers(1, len(chain) - 1))
    return b"".join(parts[:at] + chain[:cut] + [fault] + chain[cut:] + parts[at:]) + b"\xF4"


class FaultCpu:
    """A translator vCPU in 64-bit mode with LongMachine's page tables (the page after
    the data page not present) and a #PF handler on IST 1 that halts."""

    def __init__(self, threshold):
        self.m = LongMachine(FAULT_PROGRAM, {14: ("pf", 1)})
        self.m.vcpu.set_native_threshold(threshold)

    def run(self, code, state):
        vals, flags, data = state
        m = self.m
        m.mem.write(FAULT_CODE, code)
        m.mem.write(DATA, data)
        m.mem.write(ISTSTACK - FAULT_FRAME, bytes(FAULT_FRAME))
        m.vcpu.invalidate_ram(FAULT_CODE, len(code))
        r = regs(rip=FAULT_CODE, rflags=flags | 2, r15=DATA, rsp=STACK)
        for n, v in vals.items():
            setattr(r, NAMES[n], v)
        m.vcpu.set_regs(r)
        kind = m.vcpu.run()
        return kind, m.vcpu.get_regs(), m.mem.read(DATA, DATA_SIZE), m.mem.read(ISTSTACK - FAULT_FRAME, FAULT_FRAME)

    def close(self):
        self.m.close()


@pytest.fixture(scope="module")
def fault_pair():
    native, interp = FaultCpu(0), FaultCpu(None)
    yield native, interp
    native.close()
    interp.close()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(code=fault_block(), state=start_state())
def test_flags_at_a_fault_match_interpreter(fault_pair, code, state):
    """A fault between a flag producer and its reader (or anywhere else in the block)
    delivers the flags of the last instruction that completed, AF included, in the
    frame the handler sees and in rflags, as the interpreter does; every register, rip
    (the handler's hlt) and the data page alike too."""
    native, interp = fault_pair
    got = native.run(code, state)
    want = interp.run(code, state)
    assert got[0] == want[0] == exits.EXIT_HLT
    assert _state(got[1]) == _state(want[1])
    assert got[1].rflags == want[1].rflags
    assert got[2] == want[2]
    assert got[3] == want[3]
    assert got[1].rip == native.m.syms["pf"] + 1   # every block faults: the handler's hlt


def test_fault_differential_compiles_and_faults(fault_pair):
    """the fault differential compares compiled code: a flag chain around a faulting
    load ran natively up to the fault on one vCPU, interpreted on the other"""
    native, interp = fault_pair
    # cmp rax, rcx; mov rdx, [r15 + 0x1008]; setb al; hlt
    code = b"\x48\x39\xc8\x49\x8b\x97\x08\x10\x00\x00\x0f\x92\xc0\xf4"
    got = native.run(code, ({0: 1, 1: 2}, 0, bytes(DATA_SIZE)))
    want = interp.run(code, ({0: 1, 1: 2}, 0, bytes(DATA_SIZE)))
    assert got[1].rip == want[1].rip == native.m.syms["pf"] + 1
    assert got[1].rflags & ARITH == want[1].rflags & ARITH == 0x95   # 1 - 2: CF PF AF SF
    assert native.m.vcpu.stats()["native_blocks"] > 0
    assert interp.m.vcpu.stats()["native_insns"] == 0


# A stack access on a page that is not present: the #PF handler (on IST 1, so it has a
# stack) sees the instruction's rip and the rsp from before it; earlier results stay.
STACK_FAULT = f"""
    mov rax, 1
    mov rsp, {NOT_PRESENT + 0x10:#x}
    add rax, 2
fault:
    {{insn}}
    mov rax, 99
    hlt
pf:
    mov rbx, [rsp + 8]
    mov rdi, [rsp + 32]
    mov rsi, cr2
    hlt
target:
    hlt
"""


@pytest.mark.parametrize("insn,cr2", [("push rax", NOT_PRESENT + 8), ("push 7", NOT_PRESENT + 8),
                                      ("pop rcx", NOT_PRESENT + 0x10), ("call target", NOT_PRESENT + 8),
                                      ("ret", NOT_PRESENT + 0x10), ("ret 16", NOT_PRESENT + 0x10)])
def test_stack_fault_is_precise(insn, cr2):
    native, interp = _run_both(STACK_FAULT.replace("{insn}", insn), {14: ("pf", 1)})
    try:
        r = native.regs()
        assert r.rbx == native.syms["fault"]
        assert (r.rdi, r.rsi, r.rax) == (NOT_PRESENT + 0x10, cr2, 3)
        assert_same_state(r, interp.regs())
        # the block was compiled: its stack access missed the TLB and the interpreter's
        # handler, which the native code hands a miss, raised the fault
        assert native.vcpu.stats()["native_blocks"] > 0
    finally:
        native.close()
        interp.close()


# ---- chaining: compiled blocks jumping straight into each other ----

# three blocks in a loop that never ends by itself, every exit a direct jump (a ret
# would return to the run loop each time); the interrupt handler stops it
CHAINED_LOOP = """
    sti
    xor ecx, ecx
    xor edx, edx
    xor esi, esi
spin:
    add rcx, 1
    jmp second
second:
    add rdx, 1
    cmp rdx, rcx
    je third
    hlt
third:
    add rsi, 1
    jmp spin
irq:
    mov rax, 0x1234
    hlt
"""


def _run_in_thread(machine):
    import threading

    result = []
    t = threading.Thread(target=lambda: result.append(machine.run()), daemon=True)
    t.start()
    return t, result


def _loop_takes_kicks_and_interrupts(program: str, stat: str, counters: tuple[str, ...]):
    """A compiled loop that never leaves its blocks (entered by ``stat``'s kind of
    jump) stops on a kick, as pause and stop do, and takes a timer interrupt sent
    from another thread; ``counters``: registers the loop keeps in step."""
    import time

    m = LongMachine(program, {0x40: ("irq",)})
    try:
        m.vcpu.set_native_threshold(0)
        t, result = _run_in_thread(m)
        time.sleep(0.3)
        m.vcpu.kick()                      # what pause and stop do
        t.join(10)
        assert not t.is_alive(), f"a kick did not stop the loop ({stat})"
        assert result == [exits.EXIT_INTR]
        r = m.regs()
        assert r.rcx > 10000 and r.rax != 0x1234
        assert m.syms["spin"] <= r.rip < m.syms["irq"]
        s = m.vcpu.stats()
        assert s[stat] > 10000, s
        t, result = _run_in_thread(m)
        time.sleep(0.2)
        m.vcpu.request_interrupt(0x40)     # a timer interrupt, from another thread
        t.join(10)
        assert not t.is_alive(), f"an interrupt did not reach the loop ({stat})"
        assert result == [exits.EXIT_HLT]
        r = m.regs()
        assert r.rax == 0x1234 and r.rip == m.syms["irq"] + 8   # after the handler's hlt
        values = [getattr(r, name) for name in counters]
        assert max(values) - min(values) <= 1, dict(zip(counters, values))
    finally:
        m.close()


def test_chained_loop_takes_interrupts_and_stops_when_kicked():
    _loop_takes_kicks_and_interrupts(CHAINED_LOOP, "native_chained", ("rcx", "rdx", "rsi"))


# 300 small blocks run 3 times round (more compiled code than a 64 KiB arena holds),
# then 100 others 60 times round
MANY_BLOCKS = "\n".join(
    ["    xor eax, eax", "    mov r15d, 3", "first:"]
    + [f"    add rax, {n}\n    jmp a{n}\na{n}:" for n in range(300)]
    + ["    dec r15d", "    jnz first", "    mov r15d, 60", "second:"]
    + [f"    add rax, {n}\n    jmp b{n}\nb{n}:" for n in range(100)]
    + ["    dec r15d", "    jnz second", "    hlt"])


def test_a_full_arena_flushes_and_compiling_goes_on(monkeypatch):
    """Once the code arena is full the cache is flushed before the next block (QEMU's
    tb_flush): the blocks that are hot from then on are compiled, not left interpreted."""
    monkeypatch.setenv("KVMPY_TCG_ARENA_KB", "64")
    m = LongMachine(MANY_BLOCKS)
    try:
        m.vcpu.set_native_threshold(1)
        assert m.run() == exits.EXIT_HLT
        assert m.regs().rax == 3 * sum(range(300)) + 60 * sum(range(100))
        s = m.vcpu.stats()
        assert s["translated_blocks"] > 400, s          # translated again after a flush
        assert s["native_insns"] > 0.8 * s["insns"], s  # the second loop ran compiled
    finally:
        m.close()


# One block that jumps back to its own start: the compiled loop re-enters its body
# directly, with its registers still in host registers (rcx and rdx are cached: each
# is named twice)
SELF_LOOP = """
    sti
    xor ecx, ecx
    xor edx, edx
spin:
    add rcx, 1
    add rdx, 1
    cmp rcx, rdx
    je spin
    hlt
irq:
    mov rax, 0x1234
    hlt
"""


def test_self_loop_takes_interrupts_and_stops_when_kicked():
    _loop_takes_kicks_and_interrupts(SELF_LOOP, "native_chained", ("rcx", "rdx"))


# a chained loop whose first block is rewritten halfway: the second half adds 1000
SMC_IN_CHAINED_LOOP = """
    xor ebx, ebx
    mov ecx, 200
again:
    .byte 0xb8                      # mov eax, imm32
imm:
    .long 1
    add ebx, eax
    jmp next
next:
    dec ecx
    cmp ecx, 100
    jne skip
    mov edx, 1000
    mov [rip + imm], edx
skip:
    test ecx, ecx
    jnz again
    hlt
"""


# A loop of calls and returns that never ends by itself: every ret, and the call
# through a register, finds its compiled successor through the jump cache and jumps
# there without the run loop; the interrupt handler stops it.
RET_LOOP = """
    sti
    xor ecx, ecx
    xor edx, edx
    xor esi, esi
    lea r8, [rip + through_reg]
spin:
    call direct
    add rdx, 1
    call r8
    jmp spin
direct:
    add rcx, 1
    ret
through_reg:
    add rsi, 1
    ret
irq:
    mov rax, 0x1234
    hlt
"""


def test_ret_chained_loop_takes_interrupts_and_stops_when_kicked():
    _loop_takes_kicks_and_interrupts(RET_LOOP, "native_indirect", ("rcx", "rsi"))


# the block a ret goes back to is rewritten halfway: the second half adds 1000
SMC_OF_RETURN_TARGET = """
    xor ebx, ebx
    mov ecx, 200
again:
    call func
    .byte 0xb8                      # mov eax, imm32: the return target
imm:
    .long 1
    add ebx, eax
    dec ecx
    cmp ecx, 100
    jne skip
    mov edx, 1000
    mov [rip + imm], edx
skip:
    test ecx, ecx
    jnz again
    hlt
func:
    ret
"""


# one block that rewrites its own immediate on every round and jumps back to itself:
# from round 101 on the immediate is 1000
SMC_IN_SELF_LOOP = """
    xor ebx, ebx
    mov ecx, 200
    mov edx, 1
    mov r9d, 1000
    lea rdi, [rip + imm]
again:
    .byte 0xb8                      # mov eax, imm32
imm:
    .long 1
    add ebx, eax
    dec ecx
    cmp ecx, 100
    cmovbe edx, r9d
    mov [rdi], edx
    test ecx, ecx
    jnz again
    hlt
"""


@pytest.mark.parametrize("threshold", [0, 1, 50, None])
def test_self_modifying_code_in_a_self_loop(threshold):
    """A compiled block that stores into its own code and jumps back to its start runs
    the new bytes on the next round."""
    m = LongMachine(SMC_IN_SELF_LOOP)
    try:
        m.vcpu.set_native_threshold(threshold)
        assert m.run() == exits.EXIT_HLT
        assert m.regs().rbx & 0xFFFFFFFF == 100 * 1 + 100 * 1000
    finally:
        m.close()


@pytest.mark.parametrize("threshold", [0, 1, 50, None])
@pytest.mark.parametrize("program,stat", [("SMC_IN_CHAINED_LOOP", "native_chained"),
                                          ("SMC_OF_RETURN_TARGET", "native_indirect")])
def test_self_modifying_code_in_a_compiled_loop(program, stat, threshold):
    """Code rewritten halfway through a loop whose blocks enter each other compiled
    (a direct chain; a ret through the jump cache) runs as rewritten."""
    m = LongMachine(globals()[program])
    try:
        m.vcpu.set_native_threshold(threshold)
        assert m.run() == exits.EXIT_HLT
        assert m.regs().rbx & 0xFFFFFFFF == 100 * 1 + 100 * 1000
        if threshold is not None:
            assert m.vcpu.stats()[stat] > 50
    finally:
        m.close()


# div faults (#DE, no error code) with rip at the div and every register as before it
DIV_FAULT = """
    mov rax, 1
    {setup}
    add rax, 2
fault:
    {insn}
    mov rax, 99
    hlt
de:
    mov rbx, [rsp]
    hlt
zero:
    .quad 0
three:
    .quad 3
"""


@pytest.mark.parametrize("setup,insn", [("xor ecx, ecx\n    xor edx, edx", "div rcx"),
                                        ("mov ecx, 2\n    mov edx, 5", "div ecx"),
                                        ("mov ecx, 2\n    mov edx, 2", "div rcx"),
                                        ("xor edx, edx", "div qword ptr [rip + zero]"),
                                        ("xor edx, edx\n    lea rsi, [rip + zero]\n    mov r9, [rsi]", "div qword ptr [rsi]"),
                                        ("mov edx, 3\n    lea rsi, [rip + three]\n    mov r9, [rsi]", "div dword ptr [rsi]"),
                                        ("mov edx, 4\n    lea rsi, [rip + three]\n    mov r9, [rsi]", "div qword ptr [rsi]")])
def test_div_fault_is_precise(setup, insn):
    native, interp = _run_both(DIV_FAULT.format(setup=setup, insn=insn), {0: ("de",)})
    try:
        r = native.regs()
        assert r.rbx == native.syms["fault"] and r.rax == 3
        assert_same_state(r, interp.regs())
        assert native.vcpu.stats()["native_blocks"] > 0
    finally:
        native.close()
        interp.close()


# cli from ring 3 with IOPL 0 faults #GP(0) at the cli, interrupts still on; from ring 0
# it clears IF and the code goes on
CLI_IN_USER_MODE = """
    mov rsp, 0x90000
    push 0x1b                      # ss: user data
    push 0x80000
    push 0x202                     # rflags: IF, IOPL 0
    push 0x23                      # cs: user code64
    lea rax, [rip + user]
    push rax
    iretq
user:
    mov rax, 7
fault:
    cli
    mov rax, 99
    hlt
gp:
    pop rcx                        # the error code
    mov rbx, [rsp]
    mov rdx, [rsp + 16]            # the interrupted rflags
    cli
    pushfq
    pop rsi
    hlt
"""


def test_cli_faults_in_user_mode_and_clears_if_in_ring_0():
    native, interp = _run_both(CLI_IN_USER_MODE, {13: ("gp",)})
    try:
        r = native.regs()
        assert r.rbx == native.syms["fault"] and (r.rax, r.rcx) == (7, 0)
        assert r.rdx & 0x200 and not r.rsi & 0x200 and not r.rflags & 0x200
        assert_same_state(r, interp.regs())
        assert native.vcpu.stats()["native_blocks"] > 0
    finally:
        native.close()
        interp.close()


def test_new_forms_run_as_host_code(pair):
    """16-bit ALU and mov, lock-prefixed ALU, inc/dec, xchg and cmpxchg on memory, div,
    mul, mov from a segment register, prefetches, rdtsc, nop and pause, an indirect jump
    and cli compile to host code: nothing but the closing hlt goes through the
    interpreter's handler"""
    native, _ = pair
    code = (b"\x66\x41\x83\x47\x10\x05"          # add word [r15+16], 5
            b"\x66\x41\x89\x47\x20"              # mov [r15+32], ax
            b"\x66\x41\xC7\x47\x22\x34\x12"      # mov word [r15+34], 0x1234
            b"\xF0\x49\x01\x4F\x28"              # lock add [r15+40], rcx
            b"\xF0\x41\x83\x77\x30\x7F"          # lock xor dword [r15+48], 127
            b"\xF0\x41\xFF\x47\x38"              # lock inc dword [r15+56]
            b"\x41\xFE\x4F\x3C"                  # dec byte [r15+60]
            b"\x49\x87\x57\x40"                  # xchg [r15+64], rdx
            b"\xF0\x49\x0F\xB1\x5F\x48"          # lock cmpxchg [r15+72], rbx
            b"\x90\xF3\x90"                      # nop, pause
            b"\xB8\x64\x00\x00\x00\xB9\x07\x00\x00\x00"   # mov eax, 100; mov ecx, 7
            b"\x31\xD2\xF7\xF1"                  # xor edx, edx; div ecx
            b"\x49\xF7\xE1"                      # mul r9: r9 = 0
            b"\x41\xF7\x67\x50"                  # mul dword [r15+80]: 0
            b"\x8C\xD6"                          # mov esi, ss
            b"\x41\x8C\x5F\x58"                  # mov [r15+88], ds
            b"\x41\x0F\x18\x4F\x60\x0F\x0D\x08"      # prefetcht0 [r15+96]; prefetch [rax]
            b"\x0F\x31\x49\x89\xC2\x49\x89\xD3"      # rdtsc; mov r10, rax; mov r11, rdx
            b"\x0F\x31\x49\x89\xC4\x49\x89\xD5"      # rdtsc; mov r12, rax; mov r13, rdx
            b"\xF0\x49\x0F\xBA\x6F\x68\x45"          # lock bts qword [r15+104], 69: bit 5
            b"\x0F\xBA\xE6\x04"                  # bt esi, 4: CF = 1 (ss is 0x10)
            b"\x31\xC0\x31\xD2\xB8\x64\x00\x00\x00\x31\xD2\xF7\xF1")   # xor eax, eax; ...; 100 / 7 again
    code += b"\x49\xBE" + struct.pack("<Q", CODE + len(code) + 13) + b"\x41\xFF\xE6"   # mov r14, target; jmp r14
    code += b"\xFA\xF4"                               # cli; hlt
    native.run(code, ({0: 100}, 0, bytes(DATA_SIZE)))   # fills the TLB: a miss is a helper call
    # the second run without Cpu.run's set_sregs, which would flush the TLB again
    native.mem.write(DATA, bytes(DATA_SIZE))
    native.vcpu.set_regs(regs(rip=CODE, rflags=0x202, r15=DATA, rsp=STACK, rax=100))
    native.vcpu.set_profiling(True)
    try:
        before = native.vcpu.stats()["native_helper_ops"]
        kind = native.vcpu.run()
        after = native.vcpu.stats()["native_helper_ops"]
    finally:
        native.vcpu.set_profiling(False)
    r, data = native.vcpu.get_regs(), native.mem.read(DATA, DATA_SIZE)
    assert kind == exits.EXIT_HLT and r.rip == CODE + len(code)
    assert struct.unpack_from("<HHH", data, 16) == (5, 0, 0) and data[32:36] == b"\x64\x00\x34\x12"
    assert (r.rax, r.rdx, r.r9) == (14, 2, 0)   # 100 / 7
    assert r.rsi == 0x10 and struct.unpack_from("<H", data, 88) == (0x10,)   # set_long_mode's data selector
    assert data[104] == 0x20
    tsc1, tsc2 = r.r11 << 32 | r.r10, r.r13 << 32 | r.r12
    assert r.r10 >> 32 == r.r11 >> 32 == 0 and 0 < tsc2 - tsc1 < 10**9
    assert not r.rflags & 0x200   # cli
    grown = {op: n - before.get(op, 0) for op, n in after.items() if n != before.get(op, 0)}
    assert grown == {0xF4: 1}, grown


SELF_MODIFYING = """
    xor ebx, ebx
    mov ecx, 60
again:
    call target
    add ebx, eax
    dec ecx
    jnz again
    mov edx, 1000
    mov [rip + target_imm], edx     # the compiled target block is stale now
    call target
    add ebx, eax
    mov edx, 7
    mov [rip + next_imm], edx       # ... and so is the rest of this block
    .byte 0xb8                      # mov eax, imm32
next_imm:
    .long 5
    hlt
target:
    .byte 0xb8
target_imm:
    .long 1
    ret
"""


@pytest.mark.parametrize("threshold", [0, 1, 50])
def test_self_modifying_code_runs_new_bytes(threshold):
    m = LongMachine(SELF_MODIFYING)
    try:
        m.vcpu.set_native_threshold(threshold)
        assert m.run() == exits.EXIT_HLT
        r = m.regs()
        assert (r.rbx & 0xFFFFFFFF, r.rax & 0xFFFFFFFF) == (60 + 1000, 7)
        assert m.vcpu.stats()["native_blocks"] > 0
    finally:
        m.close()


# ---- the switch ----

def test_vm_toml_and_cli_switch():
    from kvmpy.cli import build_parser
    from kvmpy.config import config_from_dict
    from kvmpy.errors import ConfigError
    from kvmpy.runcmd import build_config

    assert config_from_dict({}, "vm.toml").tcg_native is None     # the environment decides
    assert config_from_dict({"tcg_native": True}, "vm.toml").tcg_native is True
    assert config_from_dict({"tcg_native": False}, "vm.toml").tcg_native is False
    with pytest.raises(ConfigError, match="vm.toml: key 'tcg_native'"):
        config_from_dict({"tcg_native": "no"}, "vm.toml")
    assert build_config(build_parser().parse_args(["run", "--tcg-native", "off"])).tcg_native is False
    assert build_config(build_parser().parse_args(["run", "--tcg-native", "on"])).tcg_native is True
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["run", "--tcg-native", "maybe"])
    assert e.value.code == 2


def test_default_threshold_in_step_with_c(monkeypatch):
    from kvmpy.hv.tcg.vcpu import NATIVE_DEFAULT_THRESHOLD

    monkeypatch.delenv("KVMPY_TCG_NATIVE_THRESHOLD", raising=False)
    mem = make_memory(1 << 20)
    v = TcgVcpu(mem)
    try:
        assert v.native_threshold == NATIVE_DEFAULT_THRESHOLD
    finally:
        v.close()
        mem.close()
    monkeypatch.setenv("KVMPY_TCG_NATIVE_THRESHOLD", "off")
    mem = make_memory(1 << 20)
    v = TcgVcpu(mem)
    try:
        assert v.native_threshold is None
    finally:
        v.close()
        mem.close()


@pytest.mark.parametrize("switch", ["on", "off"])
def test_kvmpy_run_switch_and_profile_stats(switch):
    """`kvmpy run --tcg-native on|off` on the compute guest: same result, and the
    profile's native tier line says whether blocks ran as host code"""
    import re

    from conftest import guest_path, run_kvmpy

    # --sandbox off: with the sandbox, the profile's sampler thread can end the
    # process at exit in glibc's pthread_exit (libgcc_s cannot be opened any more;
    # seen with either setting of the switch, and with the hello guest alike)
    p = run_kvmpy(["run", "--accel", "tcg", "-m", "128", "--trace", "profile", "--tcg-native", switch,
                   "--sandbox", "off", "--kernel", guest_path("compute"), "--append", "iters=20000"])
    err = p.stderr.decode()
    assert p.returncode == 0, err[-2000:]
    assert b"guest: done" in p.stdout, p.stdout[-500:]
    m = re.search(r"native tier\s+(\d+) blocks compiled .*, ([\d.]+) % as host code", err)
    assert m, err
    blocks, share = int(m.group(1)), float(m.group(2))
    if switch == "on":
        assert blocks > 0 and share > 50, err
    else:
        assert blocks == 0 and share == 0, err
