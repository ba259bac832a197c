"""Debugging output: `--trace exits` and the internal-error register dump, under the
translator and KVM, plus the guest page walk the tracer reads code through."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings, strategies as st

from conftest import KVM_SKIP_REASON, ROOT, guest_path, run_kvmpy
from kvmpy.errors import ConfigError
from kvmpy.memory import GuestMemory
from kvmpy.hv import exits
from kvmpy.hv.regs import Regs, Segment, SRegs, flat_segment
from kvmpy.vcpu.trace import (TRACE_EVENTS, Disassembler, code_bits, code_line, could_cause,
                              describe_instruction, linear_to_physical, parse_trace, read_linear,
                              register_dump, rip_after_exit)



@pytest.fixture(params=["tcg", "kvm"])
def accel(request):
    """Command-line options for each backend; KVM skips with the reason where it is missing."""
    if request.param == "kvm":
        if KVM_SKIP_REASON:
            pytest.skip(KVM_SKIP_REASON)
        return ["--enable-kvm"]
    return ["--accel", "tcg"]


# "lin=0x1011bb: ee  out dx, al" or, where RIP is past it, "lin=0x1011bc, after 0x1011bb: ee  out dx, al"
INSN_RE = re.compile(r"lin=(0x[0-9a-f]+)(?:, after (0x[0-9a-f]+))?: ((?:[0-9a-f]{2} )*[0-9a-f]{2})  (.*)$")


def trace_lines(stderr: bytes) -> list[str]:
    return [ln for ln in stderr.decode().splitlines() if ln.startswith("trace: vcpu0 ")]


def insn_of(line: str) -> tuple[int, str, str]:
    """(address, bytes, text) of the instruction a trace line shows."""
    m = INSN_RE.search(line)
    assert m, line
    return int(m.group(2) or m.group(1), 16), m.group(3), m.group(4)


# --- end to end: the hello guest ------------------------------------------------------

def test_hello_trace_shows_each_port_access_with_its_instruction(accel):
    p = run_kvmpy(["run", *accel, "-m", "128", "--trace", "exits", "--kernel", guest_path("hello")])
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    out = p.stdout
    assert b"Hello from kvmpy test guest" in out
    lines = trace_lines(p.stderr)
    thr = [ln for ln in lines if " io out port=0x03f8 size=1 " in ln]
    # One traced exit per byte the guest printed, each with its value and the `out`.
    assert bytes(int(re.search(r"value=(0x[0-9a-f]+)", ln).group(1), 16) for ln in thr).endswith(out[-200:])
    assert len(thr) >= len(out)
    for ln in thr:
        assert re.search(r" at 0010:[0-9a-f]{16} lin=0x", ln), ln
        _, code, text = insn_of(ln)
        assert (code, text) == ("ee", "out dx, al"), ln
    lsr = [ln for ln in lines if " io in port=0x03fd size=1 " in ln]
    assert lsr and all(insn_of(ln)[1:] == ("ec", "in al, dx") for ln in lsr)
    assert all(re.search(r"value=0x[0-9a-f]+ at ", ln) for ln in lsr)   # the value the device returned
    exit_line = [ln for ln in lines if " io out port=0x00f4 size=4 value=0x0 " in ln]
    assert len(exit_line) == 1
    assert insn_of(exit_line[0])[1:] == ("e7 f4", "out 0xf4, eax")


@pytest.mark.usefixtures("kvm_required")
def test_both_backends_name_the_same_instruction_addresses():
    """KVM may report RIP past the `out`; the trace still shows the `out` itself."""
    seen = {}
    for accel in (["--accel", "tcg"], ["--enable-kvm"]):
        p = run_kvmpy(["run", *accel, "-m", "128", "--serial", "none", "--trace", "exits",
                       "--kernel", guest_path("hello")])
        assert p.returncode == 0, p.stderr.decode()[-2000:]
        # Sets: how often the guest polls the LSR depends on timing, not on the backend.
        seen[accel[-1]] = {(ln.split(" at ")[0].split(" size=")[0], insn_of(ln)[0])
                           for ln in trace_lines(p.stderr) if " io " in ln}
    assert len(seen["tcg"]) > 10
    assert seen["tcg"] == seen["--enable-kvm"]


def test_translator_hlt_exits_show_the_hlt():
    """The translator reports RIP past a hlt (where an interrupt returns to)."""
    p = run_kvmpy(["run", "--accel", "tcg", "--serial", "none", "--trace", "exits",
                   "--kernel", guest_path("irq"), "--append", "pit=1"])
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    hlts = [ln for ln in trace_lines(p.stderr) if ln.startswith("trace: vcpu0 hlt at ")]
    assert hlts
    for ln in hlts:
        addr, code, text = insn_of(ln)
        assert (code, text) == ("f4", "hlt") and ", after " in ln, ln


def test_trace_off_prints_nothing():
    p = run_kvmpy(["run", "-m", "64", "--serial", "none", "--kernel", guest_path("hello")])
    assert p.returncode == 0
    assert b"trace:" not in p.stderr


def test_vm_toml_debug_trace(tmp_path):
    cfg = tmp_path / "vm.toml"
    cfg.write_text(f'accel = "tcg"\nmemory = "64M"\nkernel = "{guest_path("exit")}"\ncmdline = "code=3"\n'
                   'serial = "none"\n[debug]\ntrace = ["exits"]\n')
    p = run_kvmpy(["run", str(cfg)])
    assert p.returncode == 3
    assert any(" io out port=0x00f4 size=4 value=0x3 " in ln and "out 0xf4, eax" in ln
               for ln in trace_lines(p.stderr)), p.stderr.decode()[-2000:]


def test_without_capstone_trace_shows_hex_and_says_so_once(tmp_path):
    # A capstone that cannot be imported, first on the path: what a host without it sees.
    (tmp_path / "capstone.py").write_text("raise ImportError('capstone blocked for this test')\n")
    p = run_kvmpy(["run", "-m", "64", "--smp", "2", "--serial", "none", "--trace", "exits",
                   "--kernel", guest_path("hello")],
                  env={"PYTHONPATH": f"{tmp_path}:{ROOT}"})
    err = p.stderr.decode()
    assert p.returncode == 0, err[-2000:]
    assert err.count("capstone is missing") == 1
    lines = [ln for ln in trace_lines(p.stderr) if " io out port=0x03f8 " in ln]
    assert lines and all(re.search(r"lin=0x[0-9a-f]+: ee( [0-9a-f]{2}){14}  \(capstone missing\)$", ln)
                         for ln in lines), lines[:3]
    assert not any("out dx, al" in ln for ln in lines)


# --- end to end: MMIO and the internal error -----------------------------------------

def test_mmio_exits_show_the_accessing_instruction(accel):
    p = run_kvmpy(["run", *accel, "-m", "128", "--serial", "none", "--trace", "exits",
                   "--kernel", guest_path("internal_error")])
    lines = trace_lines(p.stderr)
    write = [ln for ln in lines if "mmio write addr=0xfebff000 size=4 value=0x1234abcd " in ln]
    read = [ln for ln in lines if "mmio read addr=0xfebff000 size=4 value=0xffffffff " in ln]
    assert len(write) == 1 and len(read) == 1, "\n".join(lines[-10:])
    w_addr, _, w_text = insn_of(write[0])
    r_addr, _, r_text = insn_of(read[0])
    assert w_text.startswith("mov dword ptr [") and w_text.endswith("], 0x1234abcd"), write[0]
    assert r_text.startswith("mov ") and ", dword ptr [" in r_text, read[0]
    assert w_addr < r_addr
    assert any(ln.startswith("trace: vcpu0 internal-error (") for ln in lines)


def test_internal_error_dumps_registers_and_code(accel):
    p = run_kvmpy(["run", *accel, "-m", "128", "--kernel", guest_path("internal_error")])
    out, err = p.stdout.decode(), p.stderr.decode()
    assert p.returncode == 1, out + err
    assert "survived" not in out
    target = int(re.search(r"jumping to (0x[0-9a-f]+) \(straddle\)", out).group(1), 16)
    assert target == (128 << 20) - 2
    assert re.search(r"^kvmpy: vCPU 0: .*(emulation failure|outside RAM)", err, re.M), err
    assert f"RIP={target:016x} RFL=" in err
    for reg in ("RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP", "R8 ", "R15"):
        assert re.search(rf"^(.* )?{reg}=[0-9a-f]{{16}}", err, re.M), reg
    assert re.search(r"^CS =0010 0000000000000000 ffffffff 00a09[ab]00 DPL=0 CS64 \[-R.\]$", err, re.M), err
    assert re.search(r"^SS =0018 0000000000000000 ffffffff 00c09[23]00 DPL=0 DS   \[-W.\]$", err, re.M), err
    assert re.search(r"^TR =0030 [0-9a-f]{16} 00000067 00008b00 DPL=0 TSS64-busy$", err, re.M), err
    assert re.search(r"^GDT=     [0-9a-f]{16} [0-9a-f]{8}$", err, re.M)
    assert re.search(r"^IDT=     [0-9a-f]{16} 00000fff$", err, re.M)
    assert re.search(r"^CR0=8[0-9a-f]{7} CR2=[0-9a-f]{16} CR3=[0-9a-f]{16} CR4=[0-9a-f]{8}$", err, re.M)
    assert re.search(r"^EFER=0000000000000[5d]00$", err, re.M)
    code = re.search(r"^Code=(.*)$", err, re.M).group(1).split(" ")
    # QEMU's layout: 50 bytes, 20 before RIP, the byte at RIP in <>; the two bytes the
    # guest stored end RAM, so the rest of the instruction is unreadable.
    assert len(code) == 50
    assert code[20:23] == ["<48>", "b8", "??"]
    assert all(re.fullmatch(r"[0-9a-f]{2}", b) for b in code[:20])
    assert set(code[22:]) == {"??"}
    assert err.index("RAX=") > err.index("kvmpy: vCPU 0: ")


def test_internal_error_in_the_pci_hole(accel):
    p = run_kvmpy(["run", *accel, "-m", "128", "--serial", "none", "--kernel", guest_path("internal_error"),
                   "--append", "mode=hole"])
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert "RIP=00000000febff000 " in err
    code = re.search(r"^Code=(.*)$", err, re.M).group(1).split(" ")
    assert len(code) == 50 and code[20] == "<??>" and set(code) == {"??", "<??>"}


# --- bad input ---------------------------------------------------------------------

def test_unknown_trace_name_is_one_line_exit_2():
    p = run_kvmpy(["run", "--trace", "exits,bogus", "--kernel", guest_path("hello")])
    assert p.returncode == 2
    err = p.stderr.decode().strip().splitlines()
    assert len(err) == 1, err
    assert "bogus" in err[0] and "exits" in err[0] and err[0].startswith("kvmpy: ")


def test_trace_help_lists_the_items():
    p = run_kvmpy(["run", "--trace", "help"])
    assert p.returncode == 0
    for name in TRACE_EVENTS:
        assert name in p.stdout.decode()


@pytest.mark.parametrize("debug,needle", [
    ('[debug]\ntrace = ["exits", "nope"]\n', "'nope'"),
    ('[debug]\ntrace = 5\n', "[debug] key 'trace'"),
    ('[debug]\ntraces = ["exits"]\n', "unknown key 'traces'"),
    ('debug = 1\n', "key 'debug'"),
])
def test_bad_debug_table_is_one_line_exit_2(tmp_path, debug, needle):
    cfg = tmp_path / "vm.toml"
    cfg.write_text(f'kernel = "{guest_path("hello")}"\n{debug}')
    p = run_kvmpy(["run", str(cfg)])
    assert p.returncode == 2
    err = p.stderr.decode().strip().splitlines()
    assert len(err) == 1 and needle in err[0] and str(cfg) in err[0], err


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["exits", "", " ", ",", "help", "exit", "EXITS", "x"]), max_size=6).map("".join))
def test_parse_trace_accepts_known_names_only(spec):
    try:
        names = parse_trace(spec, "--trace")
    except ConfigError as e:
        assert "--trace" in str(e) and "exits" in str(e) and "\n" not in str(e)
    else:
        assert set(names) <= set(TRACE_EVENTS)
        assert names == [n.strip() for n in spec.split(",") if n.strip()]


# --- the page walk ------------------------------------------------------------------

P, W, PS = 0x1, 0x2, 0x80
MB = 1 << 20


class Tables:
    """Page tables built in guest RAM from a bump allocator at 1 MiB."""

    def __init__(self, mem: GuestMemory, entry_size: int = 8) -> None:
        self.mem = mem
        self.next = 1 * MB
        self.esize = entry_size

    def table(self) -> int:
        addr = self.next
        self.next += 4096
        self.mem.write(addr, bytes(4096))
        return addr

    def set(self, table: int, index: int, value: int) -> None:
        if self.esize == 8:
            self.mem.write_u64(table + index * 8, value)
        else:
            self.mem.write_u32(table + index * 4, value)


def long_sregs(cr3: int, la57: bool = False) -> SRegs:
    return SRegs(cs=flat_segment(0x10, True, True), cr0=0x80010011, cr3=cr3,
                 cr4=0x20 | (1 << 12 if la57 else 0), efer=0x500)


@pytest.fixture
def mem():
    m = GuestMemory.anonymous([(0, 16 * MB)])
    yield m
    m.close()


def map_4k(t: Tables, pml4: int, lin: int, gpa: int) -> None:
    table = pml4
    for shift in (39, 30, 21):
        idx = (lin >> shift) & 511
        entry = t.mem.read_u64(table + idx * 8)
        if not entry & P:
            nxt = t.table()
            t.set(table, idx, nxt | P | W)
            table = nxt
        else:
            table = entry & ~0xFFF
    t.set(table, (lin >> 12) & 511, gpa | P | W)


def test_four_level_4k_2m_1g_and_not_present(mem):
    t = Tables(mem)
    pml4 = t.table()
    sregs = long_sregs(pml4)
    map_4k(t, pml4, 0x7F12_3456_7000, 0x20_3000)
    assert linear_to_physical(mem, sregs, 0x7F12_3456_7ABC) == 0x20_3ABC
    assert linear_to_physical(mem, sregs, 0x7F12_3456_8000) is None        # next PTE: not present
    # A 2 MiB page in the upper half, and a 1 GiB page.
    pdpt_hi, pd_hi = t.table(), t.table()
    t.set(pml4, 511, pdpt_hi | P)
    t.set(pdpt_hi, 510, pd_hi | P)
    t.set(pd_hi, 3, 0x60_0000 | P | PS | (1 << 63))                           # NX does not matter
    lin = 0xFFFF_FFFF_8000_0000 + 3 * (2 * MB) + 0x12345
    assert linear_to_physical(mem, sregs, lin) == 0x60_0000 + 0x12345
    t.set(pdpt_hi, 5, (3 << 30) | P | PS | (1 << 12))                        # PAT bit is not address
    assert linear_to_physical(mem, sregs, 0xFFFF_FF81_4567_89AB) == (3 << 30) + 0x0567_89AB
    # Non-canonical, and a missing PML4 entry.
    assert linear_to_physical(mem, sregs, 0x0000_8000_0000_0000) is None
    assert linear_to_physical(mem, sregs, 0x0000_0080_0000_0000) is None
    # A table pointer outside RAM reads as not present instead of raising.
    t.set(pml4, 2, (1 << 40) | P)
    assert linear_to_physical(mem, sregs, 2 << 39) is None
    assert read_linear(mem, sregs, 2 << 39, 4) == [None] * 4


def test_five_level(mem):
    t = Tables(mem)
    pml5, pml4 = t.table(), t.table()
    t.set(pml5, 1, pml4 | P)
    lin = (1 << 48) | 0x1234
    map_4k(t, pml4, lin & ((1 << 48) - 1), 0x30_0000)
    assert linear_to_physical(mem, long_sregs(pml5, la57=True), lin) == 0x30_0234
    assert linear_to_physical(mem, long_sregs(pml5, la57=True), 1 << 56) is None   # non-canonical in 57 bits


def test_pae(mem):
    t = Tables(mem)
    pdpt = t.next
    t.next += 4096
    mem.write(pdpt, bytes(32))
    pd, pt = t.table(), t.table()
    t.set(pdpt, 3, pd | P)
    t.set(pd, 5, 0x40_0000 | P | PS)
    t.set(pd, 6, pt | P)
    t.set(pt, 7, 0x9000 | P)
    sregs = SRegs(cs=flat_segment(0x8, True, False), cr0=0x80000011, cr3=pdpt, cr4=0x20, efer=0)
    assert linear_to_physical(mem, sregs, (3 << 30) | (5 << 21) | 0x1_2345) == 0x41_2345
    assert linear_to_physical(mem, sregs, (3 << 30) | (6 << 21) | (7 << 12) | 0xABC) == 0x9ABC
    assert linear_to_physical(mem, sregs, (3 << 30) | (6 << 21) | (8 << 12)) is None
    assert linear_to_physical(mem, sregs, 2 << 30) is None                     # PDPTE not present


def test_32bit_paging_4k_and_4m(mem):
    t = Tables(mem, entry_size=4)
    pd, pt = t.table(), t.table()
    t.set(pd, 0x300, pt | P)
    t.set(pt, 0x12, 0x7000 | P)
    t.set(pd, 0x301, 0x0080_0000 | P | PS | (0x3 << 13))                   # PSE-36: bits 32-33 = 3
    sregs = SRegs(cs=flat_segment(0x8, True, False), cr0=0x80000011, cr3=pd, cr4=0x10, efer=0)
    assert linear_to_physical(mem, sregs, 0xC001_2345) == 0x7345
    assert linear_to_physical(mem, sregs, 0xC040_0010) == (3 << 32) | 0x80_0010
    assert linear_to_physical(mem, sregs, 0xC001_3000) is None
    sregs.cr4 = 0                                                             # PS ignored without PSE
    assert linear_to_physical(mem, sregs, 0xC040_0010) is None               # 0x80_0000 as a table: zeros
    # Paging off: linear is physical (32 bits).
    sregs.cr0 = 0x11
    assert linear_to_physical(mem, sregs, 0x1_0000_1234) == 0x1234


def test_read_linear_crosses_pages_and_stops_at_unmapped(mem):
    t = Tables(mem)
    pml4 = t.table()
    sregs = long_sregs(pml4)
    base = 0x4000_0000
    map_4k(t, pml4, base, 0x50_0000)
    map_4k(t, pml4, base + 0x1000, 0x20_0000)                                 # not contiguous physically
    mem.write(0x50_0FFE, b"\x0f\x0b")
    mem.write(0x20_0000, b"\x90\xf4")
    assert read_linear(mem, sregs, base + 0xFFE, 4) == [0x0F, 0x0B, 0x90, 0xF4]
    assert read_linear(mem, sregs, base + 0x1FFF, 3) == [0, None, None]
    map_4k(t, pml4, base + 0x2000, 0xF00_0000)                                # mapped, but not RAM
    assert read_linear(mem, sregs, base + 0x2000, 2) == [None, None]


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.integers(0, (1 << 36) - 1), st.integers(0x80, 0xFFF), min_size=1, max_size=12),
       st.lists(st.integers(0, (1 << 36) - 1), max_size=12))
def test_page_walk_matches_a_model(pages, probes):
    """Random 4 KiB mappings (virtual page number -> physical page) against a dict."""
    m = GuestMemory.anonymous([(0, 16 * MB)])
    try:
        t = Tables(m)
        pml4 = t.table()
        for vpn, ppn in pages.items():
            map_4k(t, pml4, vpn << 12, ppn << 12)
        sregs = long_sregs(pml4)
        for vpn in list(pages) + probes:
            lin = (vpn << 12) | 0x5A5
            expect = (pages[vpn] << 12) | 0x5A5 if vpn in pages else None
            if lin >= 1 << 47:
                lin |= 0xFFFF << 48
            assert linear_to_physical(m, sregs, lin) == expect
    finally:
        m.close()


# --- CPU mode, disassembly, dump format --------------------------------------------------

def test_code_bits_follow_cr0_efer_and_cs():
    real = SRegs()
    assert code_bits(real) == 16
    prot32 = SRegs(cs=flat_segment(0x8, True, False), cr0=0x11)
    assert code_bits(prot32) == 32
    assert code_bits(prot32, rflags=1 << 17) == 16                            # virtual-8086
    prot16 = SRegs(cs=Segment(type=0xB, db=0), cr0=0x11)
    assert code_bits(prot16) == 16
    assert code_bits(long_sregs(0)) == 64
    compat = long_sregs(0)
    compat.cs = flat_segment(0x8, True, False)
    assert code_bits(compat) == 32


def test_describe_instruction_modes_and_unmapped(mem):
    d = Disassembler(lambda text: None)
    mem.write(0xF0000 + 0x100, b"\xee")                                       # real mode: f000:0100
    real = SRegs(cs=Segment(base=0xF0000, selector=0xF000, type=0xB))
    assert describe_instruction(mem, real, 0x100, 2, d).endswith("lin=0xf0100: ee  out dx, al")
    mem.write(0x2000, b"\x66\xb8\x34\x12")                                   # 32-bit: mov ax, 0x1234
    prot = SRegs(cs=flat_segment(0x8, True, False), cr0=0x11)
    assert describe_instruction(mem, prot, 0x2000, 2, d).endswith(": 66 b8 34 12  mov ax, 0x1234")
    assert describe_instruction(mem, prot, 0xFEBF_F000, 2, d).endswith(": <unmapped>")
    # RIP past the instruction (KVM after a port write): the `out` before RIP is shown.
    mem.write(0x3000, b"\x89\xf0\xee\x90")
    line = describe_instruction(mem, prot, 0x3003, 2, d, exits.EXIT_IO, True, after_first=True)
    assert line.endswith("lin=0x3003, after 0x3002: ee  out dx, al")
    # Expected place wrong (RIP is at the `out` after all): still the `out`.
    line = describe_instruction(mem, prot, 0x3002, 2, d, exits.EXIT_IO, True, after_first=True)
    assert line.endswith("lin=0x3002: ee  out dx, al")


def test_could_cause():
    assert could_cause(exits.EXIT_IO, True, "rep outsb dx, byte ptr [rsi]")
    assert not could_cause(exits.EXIT_IO, True, "in al, dx")
    assert could_cause(exits.EXIT_IO, False, "in eax, 0x60")
    assert not could_cause(exits.EXIT_IO, False, "int3")
    assert could_cause(exits.EXIT_MMIO, True, "mov dword ptr [rax], ecx")
    assert not could_cause(exits.EXIT_MMIO, True, "mov eax, ecx")


def test_register_dump_layout(mem):
    regs = Regs(**{n: i for i, n in enumerate(("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                                                "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"), 1)},
                rip=0x10, rflags=0x246)
    sregs = SRegs(cs=flat_segment(0x10, True, True), cr0=0x11, efer=0x500)
    mem.write(0, bytes(range(0x40, 0x80)))
    dump = register_dump(regs, sregs, mem).splitlines()
    assert dump[0] == ("RAX=0000000000000001 RBX=0000000000000002 RCX=0000000000000003 "
                       "RDX=0000000000000004")
    assert dump[1].startswith("RSI=0000000000000005 RDI=0000000000000006 RBP=0000000000000008 RSP=")
    assert dump[2].startswith("R8 =0000000000000009 ")
    assert dump[4] == "RIP=0000000000000010 RFL=00000246 [---Z-P-] CPL=0"
    assert dump[6] == "CS =0010 0000000000000000 ffffffff 00a09b00 DPL=0 CS64 [-RA]"
    assert dump[-1].startswith("Code=40 41 42 43 44 45 46 47 48 49 4a 4b 4c 4d 4e 4f <50> 51 ")
    assert len(dump[-1].split()) == 50                       # rip < 20: fewer before, more after
    # 32-bit protected mode uses QEMU's E-register layout.
    sregs32 = SRegs(cs=flat_segment(0x8, True, False), cr0=0x11)
    dump32 = register_dump(regs, sregs32, mem)
    assert dump32.splitlines()[0] == "EAX=00000001 EBX=00000002 ECX=00000003 EDX=00000004"
    assert "CS =0008 00000000 ffffffff 00c09b00 DPL=0 CS32 [-RA]" in dump32
    assert code_line(mem, sregs32, 0x30).split()[20] == "<70>"



def test_info_registers_is_the_register_dump_per_vcpu():
    """The monitor's `info registers` prints the internal-error dump's layout (QEMU's),
    each vCPU under its CPU#N line, without the Code= line (no guest memory read)."""
    from kvmpy.monitor.hmp import Hmp
    states = [(Regs(rip=0x10 + i, rflags=0x246), SRegs(cs=flat_segment(0x10, True, True), cr0=0x11, efer=0x500))
              for i in range(2)]

    class TwoVcpus:
        name = "t"

        def vcpu_registers(self):
            return states

    out = Hmp(TwoVcpus()).execute("info registers")
    assert out == "".join(f"CPU#{i}\n{register_dump(r, s)}\n" for i, (r, s) in enumerate(states))
    assert "Code=" not in out and "RIP=0000000000000011 RFL=00000246" in out


_ANY_U64 = st.integers(0, (1 << 64) - 1)


@settings(max_examples=150, deadline=None)
@given(page=st.binary(min_size=64, max_size=64), cr0=st.sampled_from([0x10, 0x11, 0x80000011, 0x80010033]),
       cr3=_ANY_U64, cr4=st.integers(0, 0x3FFFFF), efer=st.sampled_from([0, 0x500, 0xD00, 0x400]),
       rip=_ANY_U64, cs_l=st.booleans(), cs_db=st.booleans(), cs_base=st.integers(0, 0xFFFFFFFF),
       kind=st.sampled_from(sorted(exits.NAMES)), write=st.booleans(), after=st.booleans())
def test_hostile_state_never_raises(page, cr0, cr3, cr4, efer, rip, cs_l, cs_db, cs_base, kind, write, after):
    """Whatever the guest leaves in its registers and page tables, the dump and trace are text."""
    m = GuestMemory.anonymous([(0, 1 * MB)])
    try:
        for off in range(0, 1 * MB, 4096):        # every table entry points somewhere
            m.write(off, page)
        sregs = SRegs(cs=Segment(base=cs_base, selector=0x8, type=0xB, l=int(cs_l), db=int(cs_db)),
                      cr0=cr0, cr3=cr3, cr4=cr4, efer=efer)
        regs = Regs(rip=rip, rflags=0x2)
        d = Disassembler(lambda text: None)
        assert isinstance(describe_instruction(m, sregs, rip, 0x2, d, kind, write, after), str)
        dump = register_dump(regs, sregs, m)
        assert len(dump.splitlines()[-1].split()) == 50
    finally:
        m.close()


# --- where each backend leaves RIP at each exit kind --------------------------------

# Real-mode code at 0x1000; RAM is only the first 64 KiB, so ds=0x2000 is MMIO.
RIP_PROBE = [  # (offset, bytes, text, exit kind, write)
    (0x0, "ba f8 03", "mov dx, 0x3f8", None, None),
    (0x3, "b0 41", "mov al, 0x41", None, None),
    (0x5, "ee", "out dx, al", exits.EXIT_IO, True),
    (0x6, "ec", "in al, dx", exits.EXIT_IO, False),
    (0x7, "b8 00 20", "mov ax, 0x2000", None, None),
    (0xA, "8e d8", "mov ds, ax", None, None),
    (0xC, "a2 10 00", "mov byte ptr [0x10], al", exits.EXIT_MMIO, True),
    (0xF, "a0 10 00", "mov al, byte ptr [0x10]", exits.EXIT_MMIO, False),
    (0x12, "f4", "hlt", exits.EXIT_HLT, False),
    (0x13, "f4", "hlt", None, None),
]


def _run_probe(vcpu, mem):
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        seg = getattr(sregs, name)
        seg.base, seg.selector, seg.limit = 0, 0, 0xFFFF
    sregs.cr0 = 0x10
    vcpu.set_sregs(sregs)
    vcpu.set_regs(Regs(rip=0x1000, rflags=2, rsp=0x8000))
    seen = []
    for _ in range(8):
        kind = vcpu.run()
        if kind == exits.EXIT_INTR:
            continue
        write = vcpu.io_write if kind == exits.EXIT_IO else vcpu.mmio_write if kind == exits.EXIT_MMIO else False
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        line = describe_instruction(mem, sregs, regs.rip, regs.rflags, Disassembler(print), kind, write,
                                    rip_after_exit(vcpu.accel_name, kind, write))
        seen.append((kind, write, regs.rip, line))
        if kind == exits.EXIT_IO and not write:
            vcpu.io_data[:] = b"\x60"
        elif kind == exits.EXIT_MMIO and not write:
            vcpu.mmio_data[:] = bytes(len(vcpu.mmio_data))
        elif kind != exits.EXIT_IO and kind != exits.EXIT_MMIO:
            break
    return seen


def _check_probe(seen, exact: bool):
    expected = [(off, code, text, kind, write) for off, code, text, kind, write in RIP_PROBE if kind]
    assert [(k, w) for k, w, _, _ in seen] == [(k, w) for *_, k, w in expected]
    for (kind, write, rip, line), (off, code, text, _, _) in zip(seen, expected):
        start, end = 0x1000 + off, 0x1000 + off + len(code.split())
        assert rip in (start, end), (text, hex(rip))
        if exact:
            assert rip == (end if rip_after_exit("tcg", kind, write) else start), (text, hex(rip))
        # Whichever it is, the trace shows the instruction that exited, at its own address.
        assert line.endswith(f"{start:#x}: {code}  {text}"), line
        print(f"{text:24s} rip {'after' if rip == end else 'at'} the instruction")


def test_translator_rip_at_each_exit_kind():
    from kvmpy.hv.tcg.vcpu import TcgVcpu
    mem = GuestMemory.anonymous([(0, 0x10000)])
    mem.write(0x1000, bytes.fromhex("".join(code for _, code, *_ in RIP_PROBE)))
    vcpu = TcgVcpu(mem)
    vcpu.accel_name = "tcg"
    try:
        _check_probe(_run_probe(vcpu, mem), exact=True)
    finally:
        vcpu.close()
        mem.close()


def test_kvm_rip_at_each_exit_kind(kvm_required):
    """A bare VM (no in-kernel irqchip, so hlt exits too); RIP placement varies by kernel."""
    from kvmpy.boot import layout
    from kvmpy.hv.kvm._kvm_cffi import ffi
    from kvmpy.hv.kvm.api import Kvm
    mem = GuestMemory.anonymous([(0, 0x10000)])
    mem.write(0x1000, bytes.fromhex("".join(code for _, code, *_ in RIP_PROBE)))
    kvm = Kvm()
    vm = kvm.create_vm()
    try:
        vm.set_tss_addr(layout.TSS_ADDR)
        vm.set_identity_map_addr(layout.IDENTITY_MAP_ADDR)
        vm.set_user_memory_region(0, 0, 0x10000, int(ffi.cast("uintptr_t", ffi.from_buffer(mem.regions[0].mm))))
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.supported_cpuid())
        vcpu.accel_name = "kvm"
        _check_probe(_run_probe(vcpu, mem), exact=False)
    finally:
        vm.close()
        kvm.close()
        mem.close()
