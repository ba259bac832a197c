"""Boot the test guests (tests/guests/) under real QEMU TCG.

This proves the guests themselves right, independently of kvmpy: whatever kvmpy's
KVM path or C translator prints for a guest can be compared with what QEMU printed.
QEMU's isa-debug-exit turns the guest's exit code N into process status 2N+1; a
reset or triple fault with -no-reboot ends QEMU with status 0.
"""

import os
import re
import select
import shutil
import struct
import subprocess
import time

import pytest

from support.guest_models import compute_reference

GUESTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guests")
BUILD_DIR = os.path.join(GUESTS_DIR, "build")
QEMU = shutil.which("qemu-system-x86_64")
TIMEOUT = 60  # seconds per boot; a guest normally finishes well under one



def discover_guests():
    """Every guest the Makefile builds: a NAME.c with a line starting "int guest_main"."""
    names = []
    for entry in sorted(os.listdir(GUESTS_DIR)):
        if entry.endswith(".c"):
            with open(os.path.join(GUESTS_DIR, entry)) as f:
                if re.search(r"^int\s+guest_main\b", f.read(), re.M):
                    names.append(entry[:-2])
    return names


ALL_GUESTS = discover_guests()


@pytest.fixture(scope="module")
def guests():
    if not shutil.which("make") or not shutil.which("gcc"):
        pytest.skip("make and gcc are needed to build tests/guests")
    result = subprocess.run(["make", "-s", "-C", GUESTS_DIR], capture_output=True, text=True)
    assert result.returncode == 0, f"make -C tests/guests failed:\n{result.stdout}{result.stderr}"
    return BUILD_DIR


@pytest.fixture(scope="module")
def qemu(guests):
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 not installed (Debian package qemu-system-x86)")
    return guests


class Run:
    def __init__(self, status, output):
        self.status = status
        self.output = output.replace("\r\n", "\n")     # the guests end lines with "\r\n"
        self.lines = self.output.split("\n")

    def expect_exit(self, code):
        assert self.status == code * 2 + 1, f"status {self.status}, want guest exit {code}\n{self.output}"

    def expect_line(self, line):
        assert line in self.lines, f"no line {line!r} in:\n{self.output}"

    def last_line(self):
        return [line for line in self.lines if line][-1]


def qemu_command(name, append="", smp=1, machine="q35"):
    # -nodefaults keeps SeaBIOS, option ROM banners and the monitor off the serial stream.
    return [
        QEMU, "-accel", "tcg", "-machine", machine, "-m", "128", "-smp", str(smp),
        "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
        "-kernel", os.path.join(BUILD_DIR, f"{name}.elf"), "-append", append,
    ]


def boot(name, append="", smp=1, machine="q35", send=None):
    """Boots a guest and returns its Run.  send: list of (wait_for_text, bytes_to_write)."""
    proc = subprocess.Popen(qemu_command(name, append, smp, machine), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    output = b""
    try:
        for wait_for, data in send or []:
            while wait_for.encode() not in output:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([proc.stdout], [], [], remaining)[0]:
                    raise subprocess.TimeoutExpired(proc.args, TIMEOUT)
                chunk = proc.stdout.read1(4096)
                if not chunk:
                    pytest.fail(f"{name}: QEMU ended before printing {wait_for!r}:\n{output.decode()}")
                output += chunk
            proc.stdin.write(data)
            proc.stdin.flush()
        rest, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, err = proc.communicate()
        pytest.fail(f"{name}: no exit within {TIMEOUT}s; output:\n{(output + rest).decode(errors='replace')}")
    output += rest
    if err.strip():
        print(f"qemu stderr: {err.decode(errors='replace')}")
    return Run(proc.returncode, output.decode(errors="replace"))


# ---- ELF contract that kvmpy's PVH loader relies on (no QEMU needed)

def read_elf(path):
    data = open(path, "rb").read()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not ELF64"
    (e_machine,) = struct.unpack_from("<H", data, 18)
    e_phoff, = struct.unpack_from("<Q", data, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    phdrs = []
    for i in range(e_phnum):
        phdrs.append(struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * e_phentsize))
    return data, e_machine, phdrs


@pytest.mark.parametrize("name", ALL_GUESTS)
def test_elf_is_pvh_kernel_at_1mib(guests, name):
    data, machine, phdrs = read_elf(os.path.join(guests, f"{name}.elf"))
    assert machine == 62  # EM_X86_64
    loads = [p for p in phdrs if p[0] == 1]
    assert len(loads) == 1
    _, _, offset, vaddr, paddr, filesz, memsz, _ = loads[0]
    assert paddr == 0x100000 and vaddr == paddr and memsz >= filesz
    assert paddr + memsz <= 16 << 20, "keep guests small: they must boot in 16 MiB of RAM"
    notes = [p for p in phdrs if p[0] == 4]
    assert len(notes) == 1 and notes[0][7] == 4
    off, size = notes[0][2], notes[0][5]
    namesz, descsz, ntype = struct.unpack_from("<III", data, off)
    assert (namesz, descsz, ntype) == (4, 8, 18)
    assert data[off + 12:off + 16] == b"Xen\0"
    (entry,) = struct.unpack_from("<Q", data, off + 16)
    assert paddr <= entry < paddr + filesz
    assert size == 24


@pytest.mark.parametrize("name", ALL_GUESTS)
def test_elf_has_no_simd_or_x87(guests, name):
    """The translator's first version runs general-register code only."""
    if not shutil.which("objdump"):
        pytest.skip("objdump (binutils) not installed")
    with open(os.path.join(GUESTS_DIR, "Makefile")) as f:
        if re.search(rf"^\$\(BUILD\)/{name}\.o:\s*GUEST_SIMD", f.read(), re.M):
            pytest.skip(f"{name} opts into SIMD in tests/guests/Makefile")
    listing = subprocess.run(["objdump", "-d", os.path.join(guests, f"{name}.elf")],
                             capture_output=True, text=True, check=True).stdout
    bad = [line for line in listing.splitlines() if re.search(r"%(xmm|ymm|zmm|st|mm)\d*\b", line)]
    assert not bad, "\n".join(bad[:10])


# ---- boots

@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_hello(qemu, machine):
    run = boot("hello", append="console=ttyS0 foo=bar", machine=machine)
    run.expect_exit(0)
    assert run.lines[0] == "Hello from kvmpy test guest"
    run.expect_line("cmdline: console=ttyS0 foo=bar")
    ram = 0
    entries = [re.fullmatch(r"memmap: \[mem 0x([0-9a-f]{16})-0x([0-9a-f]{16})\] (\w+)", line)
               for line in run.lines if line.startswith("memmap: [")]
    assert entries and all(entries)
    count = re.search(r"^memmap: (\d+) entries$", run.output, re.M)
    assert count and int(count.group(1)) == len(entries)
    for m in entries:
        if m.group(3) == "ram":
            ram += int(m.group(2), 16) - int(m.group(1), 16) + 1
    total = re.search(r"^total ram: (\d+) KiB \((\d+) MiB\)", run.output, re.M)
    assert total and int(total.group(1)) == ram >> 10
    assert 120 << 20 <= ram <= 128 << 20
    assert re.search(r"^cpu vendor: \S.{11}$", run.output, re.M)
    assert run.last_line() == "guest: done"


@pytest.mark.parametrize("append,code", [("", 0), ("code=1", 1), ("code=5", 5), ("code=0x2a", 42),
                                         ("code=3 code=4", 4)])
def test_exit_code(qemu, append, code):
    run = boot("exit", append=append)
    run.expect_exit(code)
    run.expect_line(f"exit code: {code}")
    assert run.last_line() == ("guest: done" if code == 0 else f"guest: exit {code}")


@pytest.mark.parametrize("iters,user,sys", [
    (None, 0, None), (None, 1, None), (7, 0, None), (0, 1, None), (54321, 0, None),
    (7, 1, "ud2"), (7, 1, "syscall"), (1000, 1, "int80"),
])
def test_compute_matches_host_reference(qemu, iters, user, sys):
    append = f"user={user}" + (f" iters={iters}" if iters is not None else "") + (f" sys={sys}" if sys else "")
    run = boot("compute", append=append)
    run.expect_exit(0)
    crc, checksum = compute_reference(100000 if iters is None else iters)
    run.expect_line(f"crc32: 0x{crc:08x}")
    run.expect_line(f"iters: {100000 if iters is None else iters}")
    run.expect_line(f"checksum: 0x{checksum:016x}")
    if user:
        run.expect_line("mode: user (cpl 3)")
        run.expect_line(f"user entry: {sys or 'ud2'}")
        run.expect_line("compute: hello from ring 3")
    else:
        run.expect_line("mode: kernel (cpl 0)")
    assert run.last_line() == "guest: done"


def test_compute_rejects_unknown_entry(qemu):
    run = boot("compute", append="user=1 sys=sysenter")
    run.expect_exit(1)
    run.expect_line("compute: unknown sys=sysenter (want ud2, syscall or int80)")


def test_fault_handlers_recover(qemu):
    run = boot("fault")
    run.expect_exit(0)
    for name in ["#DE", "#UD", "#PF", "#PF(write)", "#GP", "#BP"]:
        assert any(line.startswith(f"fault: {name} ok ") for line in run.lines), run.output
    assert re.search(r"^fault: #PF ok vector=14 error=0x0 rip=0x[0-9a-f]+ cr2=0x100001234$", run.output, re.M)
    assert re.search(r"^fault: #PF\(write\) ok vector=14 error=0x2 rip=0x[0-9a-f]+ cr2=0x10000123c$",
                     run.output, re.M)
    run.expect_line("fault: all exceptions handled")
    assert run.last_line() == "guest: done"


def test_fault_skip_list(qemu):
    run = boot("fault", append="skip=gp,bp")
    run.expect_exit(0)
    run.expect_line("fault: #GP skipped")
    run.expect_line("fault: #BP skipped")
    assert any(line.startswith("fault: #DE ok ") for line in run.lines)
    assert not any(line.startswith(("fault: #GP ok", "fault: #BP ok")) for line in run.lines)


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_smp_brings_up_every_cpu(qemu, cpus):
    run = boot("smp", smp=cpus)
    run.expect_exit(0)
    run.expect_line(f"madt: {cpus} cpus")
    online = sorted(int(m) for m in re.findall(r"^cpu (\d+) online$", run.output, re.M))
    assert online == list(range(cpus))
    run.expect_line(f"cpus online: {cpus}")
    assert run.last_line() == "guest: done"


def test_irq_echoes_serial_input(qemu):
    run = boot("irq", send=[("irq: ready", b"ab\x01Z\nq")])
    run.expect_exit(0)
    got = [line for line in run.lines if line.startswith("got: ")]
    assert got == ["got: a", "got: b", "got: 0x01", "got: Z", "got: 0x0a", "got: q"]
    assert re.search(r"^irq: [1-6] uart interrupts$", run.output, re.M)
    assert run.last_line() == "guest: done"


def test_irq_pit_ticks(qemu):
    run = boot("irq", append="pit=1")
    run.expect_exit(0)
    run.expect_line("irq: pit on ioapic pin 2 vector 0x41")
    run.expect_line("pit ticks: 10")
    assert run.last_line() == "guest: done"


@pytest.mark.parametrize("append,banner", [("", "rebooting"), ("mode=triple", "rebooting (triple fault)")])
def test_reboot_resets_machine(qemu, append, banner):
    run = boot("reboot", append=append)
    assert run.status == 0, f"status {run.status}, want 0 (reset with -no-reboot)\n{run.output}"
    run.expect_line(banner)
    assert "reboot failed" not in run.output


def test_reboot_rejects_unknown_mode(qemu):
    run = boot("reboot", append="mode=bogus")
    run.expect_exit(1)
    run.expect_line("reboot: unknown mode=bogus (want i8042 or triple)")
