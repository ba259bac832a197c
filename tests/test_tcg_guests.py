"""The PVH test guests (tests/guests/build/*.elf) booted on the translator.

A minimal run loop lives here (the real machine wiring is the lead's): PT_LOAD
segments copied to p_paddr, the 32-bit PVH entry state, COM1 output collected from
port 0x3f8, LSR reads answered "transmitter empty", the exit port 0xf4 ends the run.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest

from support.guest_models import compute_reference
from support.tcg import TcgVcpu, make_memory, regs, set_protected_flat
from kvmpy.hv import exits

BUILD = Path(__file__).parent / "guests" / "build"
START_INFO = 0x6000
CMDLINE = 0x6800
MEMMAP = 0x6400
RAM = 64 << 20


def guest(name: str) -> Path:
    p = BUILD / f"{name}.elf"
    if not p.exists():
        pytest.skip(f"{p} not built (make -C tests/guests)")
    return p


def load_pvh(mem, path: Path) -> int:
    """Copies PT_LOAD segments; returns the XEN_ELFNOTE_PHYS32_ENTRY address."""
    elf = path.read_bytes()
    assert elf[:4] == b"\x7fELF" and elf[4] == 2, "ELF64 expected"
    e_entry, e_phoff = struct.unpack_from("<QQ", elf, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 54)
    entry = None
    for k in range(e_phnum):
        p_type, _flags, off, _vaddr, paddr, filesz, memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", elf, e_phoff + k * e_phentsize)
        if p_type == 1:
            mem.write(paddr, elf[off:off + filesz])
            mem.write(paddr + filesz, bytes(memsz - filesz))
        elif p_type == 4:
            pos = off
            while pos < off + filesz:
                namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
                name = elf[pos + 12:pos + 12 + namesz]
                desc = pos + 12 + ((namesz + 3) & ~3)
                if name.rstrip(b"\0") == b"Xen" and ntype == 18:
                    entry = struct.unpack_from("<I", elf, desc)[0]
                pos = desc + ((descsz + 3) & ~3)
    return entry if entry is not None else e_entry


def boot(name: str, cmdline: str = "", max_seconds: float = 60.0, shutdown_ok: bool = False):
    """Runs a guest to its exit port write; returns (status, serial text, vcpu stats, seconds)."""
    mem = make_memory(RAM)
    entry = load_pvh(mem, guest(name))
    cmd = cmdline.encode() + b"\0"
    mem.write(CMDLINE, cmd)
    mem.write(MEMMAP, struct.pack("<QQII", 0, 0x9F000, 1, 0) + struct.pack("<QQII", 0x100000, RAM - 0x100000, 1, 0))
    mem.write(START_INFO, struct.pack("<IIIIQQQQII", 0x336EC578, 1, 0, 0, 0, CMDLINE, 0, MEMMAP, 2, 0))
    vcpu = TcgVcpu(mem)
    # The PVH entry state: protected mode, caches on (CR0 PE|ET), no SSE enabled yet.
    set_protected_flat(vcpu, data_selector=0x18, cr0=0x11, cr4=0)
    vcpu.set_regs(regs(rip=entry, rbx=START_INFO, rflags=2))
    out = bytearray()
    status = None
    dlab = False   # LCR bit 7: 0x3f8 is the divisor latch, not the transmitter
    t0 = time.perf_counter()
    try:
        while status is None:
            kind = vcpu.run()
            if kind == exits.EXIT_IO:
                port = vcpu.io_port
                if vcpu.io_write:
                    if port == 0x3FB:
                        dlab = bool(vcpu.io_data[0] & 0x80)
                    elif port == 0x3F8 and not dlab:
                        out += bytes(vcpu.io_data)
                    elif port == 0xF4:
                        status = struct.unpack("<I", bytes(vcpu.io_data[:4]))[0]
                else:
                    # LSR: transmitter empty; everything else reads as 0
                    fill = 0x60 if port == 0x3FD else 0
                    vcpu.io_data[:] = bytes([fill]) * len(vcpu.io_data)
            elif kind == exits.EXIT_MMIO:
                if not vcpu.mmio_write:
                    vcpu.mmio_data[:] = bytes(len(vcpu.mmio_data))
            elif kind == exits.EXIT_INTR:
                continue
            elif kind == exits.EXIT_SHUTDOWN and shutdown_ok:
                status = "shutdown"
            else:
                raise AssertionError(f"unexpected exit {exits.NAMES.get(kind, kind)} "
                                     f"{vcpu.internal_error} at {vcpu.get_regs().rip:#x}\n"
                                     f"serial so far:\n{out.decode(errors='replace')}")
            if time.perf_counter() - t0 > max_seconds:
                raise AssertionError(f"guest did not finish in {max_seconds}s:\n{out.decode(errors='replace')}")
        seconds = time.perf_counter() - t0
        return status, out.decode(errors="replace"), vcpu.stats(), seconds
    finally:
        vcpu.close()
        mem.close()


def test_hello():
    status, text, _stats, _ = boot("hello", "console=ttyS0 answer=42")
    lines = text.splitlines()
    assert "Hello from kvmpy test guest" in lines
    assert "cmdline: console=ttyS0 answer=42" in lines
    assert "memmap: 2 entries" in lines
    assert "cpu vendor: GenuineIntel" in lines
    assert lines[-1] == "guest: done"
    assert status == 0


@pytest.mark.parametrize("cmdline", ["iters=20000", "iters=5000 user=1", "iters=5000 user=1 sys=syscall",
                                     "iters=5000 user=1 sys=int80"])
def test_compute(cmdline):
    iters = int(cmdline.split()[0].split("=")[1])
    status, text, stats, seconds = boot("compute", cmdline)
    crc, h = compute_reference(iters)
    lines = text.splitlines()
    assert f"crc32: 0x{crc:08x}" in lines, text
    assert f"checksum: 0x{h:016x}" in lines, text
    if "user=1" in cmdline:
        assert "mode: user (cpl 3)" in lines
        assert "compute: hello from ring 3" in lines
    assert lines[-1] == "guest: done"
    assert status == 0


def test_fault():
    status, text, _stats, _ = boot("fault")
    lines = text.splitlines()
    assert "fault: all exceptions handled" in lines, text
    assert status == 0, text


def test_exit_code():
    status, text, _stats, _ = boot("exit", "code=7")
    assert "exit code: 7" in text.splitlines()
    assert status == 7


def test_reboot_by_triple_fault():
    status, text, _stats, _ = boot("reboot", "mode=triple", shutdown_ok=True)
    assert "rebooting (triple fault)" in text.splitlines()
    assert status == "shutdown"


@pytest.mark.skipif(os.environ.get("KVMPY_FUZZ") != "1", reason="long run; KVMPY_FUZZ=1")
def test_compute_default_iters():
    status, text, _stats, _ = boot("compute", "", max_seconds=300)
    assert "checksum: 0xf3bdb09f666bb944" in text.splitlines()
    assert status == 0
