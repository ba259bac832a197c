"""The CPU the translator announces (kvmpy.hv.tcg.accel.translator_cpuid): a real
vendor and model, a brand string, Intel's cache and topology leaves with one thread
per core, a TSC frequency Linux can compute in 32 bits, and every feature bit backed
by an instruction that executes (no #UD) on the C CPU."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, strategies as st

from support.tcg import TcgVcpu, identity_map_2m, make_memory, regs, set_long_mode
from kvmpy.hv import exits
from kvmpy.hv.tcg.accel import BRAND, CRYSTAL_HZ, translator_cpuid, tsc_ratio
from kvmpy.hv.tcg.vcpu import filter_cpuid


def table(num_cpus=2, apic_id=0, tsc_hz=2_600_000_000):
    rows = filter_cpuid(translator_cpuid(num_cpus, apic_id, tsc_hz))
    return {(fn, idx if flags & 1 else 0): (a, b, c, d) for fn, idx, flags, a, b, c, d in rows}


def test_vendor_family_model_brand():
    t = table()
    _max, b, c, d = t[(0, 0)]
    assert struct.pack("<III", b, d, c) == b"GenuineIntel"
    eax = t[(1, 0)][0]
    family = (eax >> 8) & 0xF
    model = ((eax >> 4) & 0xF) | (((eax >> 16) & 0xF) << 4)
    assert (family, model, eax & 0xF) == (6, 61, 2)      # QEMU's Broadwell
    # No model older than the extensions announced: Intel's first family-6 models with
    # each (Haswell 60: BMI1, BMI2, MOVBE; Broadwell 61: ADX, RDSEED).
    first_model = {3: 60, 8: 60, 18: 61, 19: 61}       # CPUID 7.0 EBX bit -> model
    leaf7_ebx = t[(7, 0)][1]
    assert all(model >= first for bit, first in first_model.items() if leaf7_ebx >> bit & 1)
    assert leaf7_ebx & ~sum(1 << bit for bit in first_model) == 0, "a leaf-7 bit this test does not know"
    brand = b"".join(struct.pack("<IIII", *t[(fn, 0)]) for fn in (0x80000002, 0x80000003, 0x80000004))
    assert brand.rstrip(b"\0") == BRAND
    assert brand.endswith(b"\0")


def test_leaf_ranges_cover_every_leaf():
    t = table()
    basic_max, ext_max = t[(0, 0)][0], t[(0x80000000, 0)][0]
    for fn, _idx in t:
        if fn < 0x80000000:
            assert fn <= basic_max, hex(fn)
        else:
            assert fn <= ext_max, hex(fn)


@pytest.mark.parametrize("num_cpus", [1, 2, 3, 8])
def test_one_thread_per_core(num_cpus):
    """Linux's topology: the SMT level of leaf 0xB holds one thread, the core level all
    vCPUs; no cache in leaf 4 is shared between threads; leaf 4's core count matches."""
    for apic in range(num_cpus):
        t = table(num_cpus, apic)
        smt = t[(0xB, 0)]
        assert smt[1] == 1 and (smt[2] >> 8) & 0xFF == 1 and smt[3] == apic
        core = t[(0xB, 1)]
        assert core[1] == num_cpus and (core[2] >> 8) & 0xFF == 2
        assert (1 << core[0]) >= num_cpus
        assert (t[(1, 0)][1] >> 24) == apic
        sub = 0
        while (t.get((4, sub)) or (0, 0, 0, 0))[0] & 0x1F:
            eax = t[(4, sub)][0]
            assert (eax >> 14) & 0xFFF == 0, "a cache shared by SMT siblings"
            assert ((eax >> 26) & 0x3F) + 1 >= num_cpus
            sub += 1
        assert sub == 3     # L1d, L1i, L2


@given(st.integers(500_000_000, 4_200_000_000))
def test_tsc_frequency_as_linux_computes_it(tsc_hz):
    """Linux 6.1 native_calibrate_tsc: crystal_khz * EBX / EAX in unsigned 32-bit
    arithmetic must neither overflow nor stray from the TSC (a clock error; Linux's
    own truncation to kHz is at most 2 ppm from 500 MHz up)."""
    tsc_hz = tsc_hz // 1000 * 1000
    rows = {fn: (a, b, c, d) for fn, _i, _f, a, b, c, d in translator_cpuid(1, 0, tsc_hz)}
    eax, ebx, ecx, _ = rows[0x15]
    assert ecx == CRYSTAL_HZ and eax > 0 and ebx > 0
    crystal_khz = ecx // 1000
    assert crystal_khz * ebx < 1 << 32
    khz = crystal_khz * ebx // eax
    assert abs(khz * 1000 - tsc_hz) / tsc_hz < 1e-5
    assert (ebx, eax) == tsc_ratio(tsc_hz)


def test_no_tsc_frequency_without_a_measurement():
    rows = {fn for fn, *_ in translator_cpuid(1, 0, 0)}
    assert 0x15 not in rows and 0x16 not in rows


# Every announced bit: the code that must execute without #UD (64-bit, CPL 0, rbx ->
# a 16-byte aligned scratch buffer), or None for a bit that is no instruction.
SCRATCH = 0x200000
FEATURES = {
    (1, "edx", 0): "d9e8",                  # fpu: fld1
    (1, "edx", 4): "0f31",                  # tsc: rdtsc
    (1, "edx", 5): "b910000000" "0f32",     # msr: rdmsr IA32_TSC
    (1, "edx", 6): None,                    # pae (paging mode)
    (1, "edx", 8): "0fc70b",                # cx8: cmpxchg8b [rbx]
    (1, "edx", 9): None,                    # apic (device)
    (1, "edx", 13): None,                   # pge (paging)
    (1, "edx", 15): "480f44c1",             # cmov: cmovz rax, rcx
    (1, "edx", 19): "0fae3b",               # clflush [rbx]
    (1, "edx", 23): "0ffcc1" "0f77",        # mmx: paddb mm0, mm1; emms
    (1, "edx", 24): "0fae03" "0fae0b",      # fxsr: fxsave [rbx]; fxrstor [rbx]
    (1, "edx", 25): "0f58c1",               # sse: addps
    (1, "edx", 26): "66480fd4c1",           # sse2: paddq xmm0, xmm1
    (1, "edx", 28): None,                   # htt (topology field valid)
    (1, "ecx", 0): "f20f7cc1",              # sse3: haddps
    (1, "ecx", 9): "660f3800c1" "0f3804c1" "0f77",   # ssse3: pshufb xmm0, xmm1; pmaddubsw mm0, mm1
    (1, "ecx", 13): "480fc70b",             # cx16: cmpxchg16b [rbx]
    (1, "ecx", 19): "660f3a0bc105" "660f3817c1" "660f3a40c1ff",   # sse4.1: roundsd, ptest, dpps
    (1, "ecx", 20): "f20f38f1c1" "660f3a63c10c" "660f3837c1",      # sse4.2: crc32, pcmpistri, pcmpgtq
    (1, "ecx", 22): "480f38f003" "480f38f103",   # movbe rax, [rbx]; movbe [rbx], rax
    (1, "ecx", 23): "f3480fb8c1",           # popcnt rax, rcx
    (1, "ecx", 30): "480fc7f0",             # rdrand rax
    (1, "ecx", 31): None,                   # hypervisor
    (7, "ebx", 3): "c4e2f0f2c2" "c4e2f8f3cb" "f3480fbcc1",   # bmi1: andn rax, rcx, rdx; blsr rax, rbx; tzcnt
    (7, "ebx", 8): "c4e2f3f5c2" "c4e3fbf0c105" "c4e2ebf6c1",   # bmi2: pdep rax, rcx, rdx; rorx; mulx
    (7, "ebx", 18): "480fc7f8",             # rdseed rax
    (7, "ebx", 19): "66480f38f6c1" "f3480f38f6c1",   # adx: adcx rax, rcx; adox rax, rcx
    (7, "edx", 26): "b948000000" "0f32" "0f30" "b949000000" "31c0" "31d2" "0f30",   # ibrs/ibpb msrs
    (7, "edx", 29): "b90a010000" "0f32",    # arch_capabilities: rdmsr
    (0x80000001, "ecx", 0): "9f",           # lahf_lm: lahf in 64-bit mode
    (0x80000001, "ecx", 5): "f3480fbdc1",   # abm: lzcnt rax, rcx
    (0x80000001, "edx", 11): None,          # syscall (checked by the Linux boot)
    (0x80000001, "edx", 20): None,          # nx (paging)
    (0x80000001, "edx", 29): None,          # lm (mode)
    (0x80000007, "edx", 8): None,           # invariant TSC
}


def announced():
    t = table()
    out = []
    for (fn, idx), (a, b, c, d) in t.items():
        if fn not in (1, 7, 0x80000001, 0x80000007) or idx:
            continue
        for name, value in (("ecx", c), ("edx", d)) if fn != 7 else (("edx", d), ("ebx", b), ("ecx", c)):
            for bit in range(32):
                if value >> bit & 1:
                    out.append((fn, name, bit))
    return out


def test_every_announced_feature_has_a_check():
    missing = [k for k in announced() if k not in FEATURES]
    assert missing == [], "announced bits without an entry in FEATURES"


@pytest.mark.parametrize("feature", [k for k, v in FEATURES.items() if v])
def test_announced_feature_executes(feature):
    if feature not in announced():
        pytest.skip(f"{feature} is not announced")
    mem = make_memory(8 << 20)
    identity_map_2m(mem)
    code = bytes.fromhex(FEATURES[feature]) + b"\xf4"
    mem.write(0x100000, code)
    v = TcgVcpu(mem)
    set_long_mode(v)
    sr = v.get_sregs()
    sr.idt.limit = 0        # any exception (#UD) becomes a triple fault: EXIT_SHUTDOWN
    v.set_sregs(sr)
    v.set_cpuid(translator_cpuid(1, 0, 2_600_000_000))
    v.set_regs(regs(rip=0x100000, rsp=0x300000, rbx=SCRATCH))
    try:
        kind = v.run()
        assert kind == exits.EXIT_HLT, f"{feature}: exit {kind}, not the hlt after the instruction"
        assert v.get_regs().rip == 0x100000 + len(code)
    finally:
        v.close()


def test_the_extensions_after_sse42_are_announced():
    """What c_ext/insn_bmi.h implements is announced with the bits QEMU's Haswell and
    Broadwell models use (leaf 1 ECX, leaf 7 EBX, 0x80000001 ECX), and AVX, AVX2 and
    XSAVE, which it does not implement, are not."""
    t = table()
    leaf1_ecx, leaf7_ebx, ext_ecx = t[(1, 0)][2], t[(7, 0)][1], t[(0x80000001, 0)][2]
    for bit, name in ((22, "movbe"), (23, "popcnt"), (30, "rdrand")):
        assert leaf1_ecx >> bit & 1, name
    for bit, name in ((3, "bmi1"), (8, "bmi2"), (18, "rdseed"), (19, "adx")):
        assert leaf7_ebx >> bit & 1, name
    assert ext_ecx >> 5 & 1, "abm (lzcnt)"
    assert not leaf1_ecx >> 28 & 1 and not leaf1_ecx >> 26 & 1, "avx / xsave"
    assert not leaf7_ebx >> 5 & 1, "avx2"


@pytest.mark.parametrize("code", ["c5f458c2", "c4e17058c2", "c5fc77", "c4e27d18c0"],
                         ids=["vaddps-c5", "vaddps-c4", "vzeroall", "vbroadcastss-ymm"])
def test_an_unannounced_vex_instruction_is_ud(code):
    """AVX is not announced: its VEX encodings raise #UD (a triple fault here, no IDT)
    at the instruction, as on a CPU without AVX, while BMI's VEX forms execute
    (test_announced_feature_executes)."""
    mem = make_memory(8 << 20)
    identity_map_2m(mem)
    mem.write(0x100000, bytes.fromhex(code) + b"\xf4")
    v = TcgVcpu(mem)
    set_long_mode(v)
    sr = v.get_sregs()
    sr.idt.limit = 0
    v.set_sregs(sr)
    v.set_cpuid(translator_cpuid(1, 0, 2_600_000_000))
    v.set_regs(regs(rip=0x100000, rsp=0x300000, rbx=SCRATCH))
    try:
        assert v.run() == exits.EXIT_SHUTDOWN
        assert v.get_regs().rip == 0x100000
    finally:
        v.close()
