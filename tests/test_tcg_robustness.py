"""Hostile guest code: random bytes and random state never crash or hang the VMM.

The translator must turn anything a guest executes into a guest exception, a VM
exit or an internal error; never a host crash, an access outside guest RAM, or a
run() that cannot be interrupted. Hypothesis feeds byte soup (plus random register
state) in every mode; the run loop answers I/O and MMIO exits with zeros.
"""

from __future__ import annotations

import os
import threading

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from support.tcg import (TcgVcpu, identity_map_2m, make_memory, regs, set_long_mode,  # noqa: E402
                              set_protected_flat, set_real_mode)
from kvmpy.hv import exits  # noqa: E402

FUZZ = os.environ.get("KVMPY_FUZZ") == "1"
CODE = {64: 0x100000, 32: 0x100000, 16: 0x1000}
VALID = {exits.EXIT_IO, exits.EXIT_MMIO, exits.EXIT_HLT, exits.EXIT_SHUTDOWN, exits.EXIT_INTERNAL_ERROR,
         exits.EXIT_INTR}

_machines: dict[int, tuple] = {}


def machine(mode: int):
    if mode not in _machines:
        mem = make_memory(4 << 20)
        if mode == 64:
            identity_map_2m(mem)
        _machines[mode] = (mem, TcgVcpu(mem))
    return _machines[mode]


@settings(max_examples=1000 if FUZZ else 150, deadline=None, suppress_health_check=list(HealthCheck))
@given(mode=st.sampled_from([64, 32, 16]), code=st.binary(min_size=1, max_size=96),
       gprs=st.lists(st.integers(0, 2**64 - 1), min_size=16, max_size=16),
       flags=st.integers(0, 0xFFFFFFFF))
def test_random_code_only_ends_in_protocol_exits(mode, code, gprs, flags):
    mem, vcpu = machine(mode)
    base = CODE[mode]
    mem.write(base, code + bytes(64))
    vcpu.invalidate_ram(base, len(code) + 64)
    if mode == 64:
        set_long_mode(vcpu)
    elif mode == 32:
        set_protected_flat(vcpu)
    else:
        set_real_mode(vcpu)
    r = regs(rip=base, rflags=(flags & 0x0CD5) | 2)   # arithmetic flags and DF; IF/TF stay clear
    for name, v in zip(("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
                        "r11", "r12", "r13", "r14", "r15"), gprs):
        setattr(r, name, v if mode == 64 else v & 0xFFFFFFFF)
    vcpu.set_regs(r)
    watchdog = threading.Timer(0.3, vcpu.kick)   # random code often spins: end it
    watchdog.start()
    try:
        for _ in range(64):
            kind = vcpu.run()
            assert kind in VALID, kind
            if kind == exits.EXIT_IO and not vcpu.io_write:
                vcpu.io_data[:] = bytes(len(vcpu.io_data))
            elif kind == exits.EXIT_MMIO and not vcpu.mmio_write:
                vcpu.mmio_data[:] = bytes(len(vcpu.mmio_data))
            elif kind not in (exits.EXIT_IO, exits.EXIT_MMIO):
                break
    finally:
        watchdog.cancel()
    # the vCPU is still usable afterwards
    vcpu.get_regs()
    vcpu.get_sregs()


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("code, start, want_rax, length", [
    # Two REX prefixes: the last one counts (REX.B), so the load is from [r15+0x1000].
    (bytes.fromhex("40418b8700100000"), {"rax": 0, "r15": 0x200000}, 0x5A5A1234, 8),
    # A legacy prefix after a REX makes the REX ignored (SDM 2.2.1): 66 b8 is mov ax, imm16,
    # not REX.W's mov rax, imm64.
    (bytes.fromhex("4866b83412"), {"rax": 2**64 - 1}, 0xFFFFFFFFFFFF1234, 5),
], ids=["last-rex-counts", "rex-before-legacy-prefix-ignored"])
def test_rex_prefix_placement(code, start, want_rax, length, native):
    mem = make_memory(4 << 20)
    identity_map_2m(mem)
    vcpu = TcgVcpu(mem)
    vcpu.set_native_threshold(0 if native else None)
    set_long_mode(vcpu)
    base = CODE[64]
    mem.write(0x201000, (0x5A5A1234).to_bytes(4, "little"))
    mem.write(base, code + b"\xf4")
    vcpu.set_regs(regs(rip=base, rflags=2, rsp=0x80000, **start))
    assert vcpu.run() == exits.EXIT_HLT
    r = vcpu.get_regs()
    assert (r.rax, r.rip) == (want_rax, base + length + 1)
