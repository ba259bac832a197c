"""KVM exit-path and boot benchmarks: kvmpy --enable-kvm vs qemu-system-x86_64 -accel kvm
on the same test guests.

    python3 -m bench.kvm

Rows: wall time from process start to the guest's exit for hello.elf (QEMU runs its
firmware first, kvmpy boots the kernel directly: that difference is real), and port
I/O and MMIO exits per second from tests/guests/exitloop.c (to an unclaimed port and
address, and to a claimed port and MMIO register), measured as
N / (time with N exits - time with none) so start-up cost cancels out; and the same
exits' cost as the guest itself measures it (TSC cycles per exit, around its loop
only), which start-up noise cannot touch: under nested KVM kvmpy's start-up takes
seconds and varies by more than the loop's whole cost; and the CPU time the VMM
process spent per exit (user and system, loaded run minus empty run), which other
jobs on a shared host do not inflate as they do wall time and TSC cycles.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUESTS = os.path.join(REPO, "tests", "guests")
N_EXITS = 20000
# One guest run; under the nested L1 the slowest takes about 6 s.
RUN_TIMEOUT = 180


# kvmpy's side of QEMU's -nodefaults: without it kvmpy adds QEMU's default NIC, user-mode
# networking on a virtio-net (libslirp, the net modules' imports), which the QEMU side
# does not have; in the nested L1, where Python starts about 20x slower, that was about
# a tenth of hello.elf's boot row.
NO_DEFAULT_NIC = ("--net", "none")


def linux_argvs(share: str, append: str) -> tuple[list[str], list[str]]:
    """kvmpy's and QEMU's command lines booting the default guest's Linux under KVM
    (the nested L1's boot rows), the guest's files in ``share``/guest"""
    guest = os.path.join(share, "guest")
    kernel, initrd = os.path.join(guest, "vmlinuz"), os.path.join(guest, "initrd.img")
    kvmpy = [sys.executable, "-m", "kvmpy", "run", "--enable-kvm", "--no-reboot", "--serial", "stdio",
             *NO_DEFAULT_NIC, "-m", "512", "--kernel", kernel, "--initrd", initrd, "--append", append]
    qemu = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "512", "-nodefaults", "-display", "none",
            "-serial", "stdio", "-no-reboot", "-kernel", kernel, "-initrd", initrd, "-append", append]
    return kvmpy, qemu


def _kvmpy(kernel: str, append: str, device: str | None = None) -> list[str]:
    return [sys.executable, "-m", "kvmpy", "run", "--enable-kvm", "-m", "128", "--serial", "stdio", *NO_DEFAULT_NIC,
            *(["--device", device] if device else []), "--kernel", kernel, "--append", append]


def _qemu(kernel: str, append: str, device: str | None = None) -> list[str]:
    return ["qemu-system-x86_64", "-accel", "kvm", "-m", "128", "-nodefaults", "-display", "none",
            "-serial", "stdio", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            *(["-device", device] if device else []), "-kernel", kernel, "-append", append]


def _run(argv: list[str], ok_status: int) -> tuple[float, str, float]:
    """Wall time, the guest's console output, and the CPU time (user and system)
    the process used: on a host other jobs share, wall time counts their turns too,
    CPU time only the VMM's own work."""
    env = dict(os.environ, PYTHONPATH=REPO)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
    elapsed = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != ok_status:
        raise RuntimeError(f"{argv[0]} exited {r.returncode}: {r.stderr.decode()[-300:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, r.stdout.decode(errors="replace"), cpu


def _time(argv: list[str], ok_status: int) -> float:
    return _run(argv, ok_status)[0]


_LOOPS = re.compile(r"exitloop: pio (\d+) in (\d+) cycles, mmio (\d+) in (\d+) cycles")


def _loaded(argv: list[str], ok_status: int, mmio: bool, runs: int = 2) -> tuple[float, float | None, float]:
    """Best wall time, fewest guest TSC cycles per exit of the measured loop, least CPU time."""
    best_wall, best_cycles, best_cpu = None, None, None
    for _ in range(runs):
        wall, out, cpu = _run(argv, ok_status)
        best_wall = wall if best_wall is None else min(best_wall, wall)
        best_cpu = cpu if best_cpu is None else min(best_cpu, cpu)
        m = _LOOPS.search(out)
        if m:
            n, cycles = (int(m.group(3)), int(m.group(4))) if mmio else (int(m.group(1)), int(m.group(2)))
            if n:
                best_cycles = cycles / n if best_cycles is None else min(best_cycles, cycles / n)
    return best_wall, best_cycles, best_cpu


def _best(argv: list[str], ok_status: int, runs: int = 3) -> float:
    return min(_time(argv, ok_status) for _ in range(runs))


def _best_wall_and_cpu(argv: list[str], ok_status: int, runs: int = 2) -> tuple[float, float]:
    results = [_run(argv, ok_status) for _ in range(runs)]
    return min(r[0] for r in results), min(r[2] for r in results)


def _cpu_per_exit(delta: float) -> float | None:
    """Microseconds of the VMM's CPU time per exit."""
    return delta / N_EXITS * 1e6 if delta > 0 else None


def _rate(delta: float) -> float | None:
    # Run-to-run noise can exceed the loop's cost when exits are very cheap.
    return N_EXITS / delta if delta > 0.01 else None


def run() -> list[dict]:
    return boot_rows() + exit_rows()


def boot_rows() -> list[dict]:
    subprocess.run(["make", "-s", "-C", GUESTS], check=True)
    hello = os.path.join(GUESTS, "build", "hello.elf")
    have_qemu = shutil.which("qemu-system-x86_64") is not None
    k = _best(_kvmpy(hello, ""), 0)
    q = _best(_qemu(hello, ""), 1) if have_qemu else None
    return [{"name": "boot to guest exit (hello.elf)", "kvmpy": k, "qemu": q, "unit": "s", "better": "lower"}]


# The unclaimed rows measure the exit itself; the claimed ones add a device model's
# dispatch (the UART's scratch register, a plain store in both VMMs; pci-testdev's
# BAR0 with no test selected, a plain load of 0 in both).
EXIT_FAMILIES = (
    ("port I/O exits", "n", "port=0x300", None), ("MMIO exits", "mmio", "port=0x300", None),
    ("claimed port exits (UART scratch 0x3ff)", "n", "port=0x3ff", None),
    ("claimed MMIO exits (pci-testdev BAR0)", "mmio", "testdev=1", "pci-testdev"))


def exit_rows() -> list[dict]:
    """The exit-path rows alone (``python3 -c "import bench.kvm as b; print(b.exit_rows())"``)."""
    rows = [row for index in range(len(EXIT_FAMILIES)) for row in exit_family_rows(index)]
    return rows + console_rows()


def exit_family_rows(index: int) -> list[dict]:
    """One family's three rows: exits/s, guest cycles per exit, VMM CPU per exit."""
    subprocess.run(["make", "-s", "-C", GUESTS], check=True)
    loop = os.path.join(GUESTS, "build", "exitloop.elf")
    have_qemu = shutil.which("qemu-system-x86_64") is not None
    label, arg, base, device = EXIT_FAMILIES[index]
    base = f"n=0 mmio=0 {base}"
    loaded = f"{base} {arg}={N_EXITS}"
    mmio = arg == "mmio"
    k_wall, k_cycles, k_cpu = _loaded(_kvmpy(loop, loaded, device), 0, mmio)
    k_base_wall, k_base_cpu = _best_wall_and_cpu(_kvmpy(loop, base, device), 0)
    k, k_cpu = _rate(k_wall - k_base_wall), _cpu_per_exit(k_cpu - k_base_cpu)
    q = q_cycles = q_cpu = None
    if have_qemu:
        q_wall, q_cycles, q_cpu = _loaded(_qemu(loop, loaded, device), 1, mmio)
        q_base_wall, q_base_cpu = _best_wall_and_cpu(_qemu(loop, base, device), 1)
        q, q_cpu = _rate(q_wall - q_base_wall), _cpu_per_exit(q_cpu - q_base_cpu)
    return [{"name": f"{label} per second (exitloop.elf)", "kvmpy": k, "qemu": q, "unit": "exits/s",
             "better": "higher"},
            {"name": f"{label}: guest TSC cycles per exit (exitloop.elf)", "kvmpy": k_cycles,
             "qemu": q_cycles, "unit": "cycles", "better": "lower"},
            {"name": f"{label}: VMM CPU time per exit (exitloop.elf)", "kvmpy": k_cpu,
             "qemu": q_cpu, "unit": "us", "better": "lower"}]


def console_rows() -> list[dict]:
    subprocess.run(["make", "-s", "-C", GUESTS], check=True)
    loop = os.path.join(GUESTS, "build", "exitloop.elf")
    return [console_row(loop, shutil.which("qemu-system-x86_64") is not None)]


def parts(limit: float = 300.0) -> list:
    """The rows as bench.parts runs them, each family with its own deadline: a guest
    that never exits costs one family ``limit`` seconds, not the run."""
    from bench.parts import Part
    return ([Part("kvm boot (hello.elf)", "bench.kvm", "boot_rows", (), limit)]
            + [Part(f"kvm {family[0]}", "bench.kvm", "exit_family_rows", (index,), limit)
               for index, family in enumerate(EXIT_FAMILIES)]
            + [Part("kvm console", "bench.kvm", "console_rows", (), limit)])


_CONSOLE = re.compile(r"exitloop: console (\d+) in (\d+) cycles")
N_CONSOLE = 5000


def console_row(loop: str, have_qemu: bool, runs: int = 2) -> dict:
    """Console output as Linux's console writes it (LSR polled before each THR write),
    in the guest's TSC cycles per byte: under kvmpy a read the C run loop answers
    from the UART's published LSR and a queued write (KVM's coalesced PIO), Python
    once per ring-full; two exits to the device model under QEMU."""
    def best(argv: list[str], ok_status: int) -> float | None:
        found = []
        for _ in range(runs):
            m = _CONSOLE.search(_run(argv, ok_status)[1])
            if m and int(m.group(1)):
                found.append(int(m.group(2)) / int(m.group(1)))
        return min(found) if found else None
    arg = f"n=0 mmio=0 console={N_CONSOLE}"
    return {"name": "console output, LSR poll + THR per byte: guest TSC cycles per byte (exitloop.elf)",
            "kvmpy": best(_kvmpy(loop, arg), 0), "qemu": best(_qemu(loop, arg), 1) if have_qemu else None,
            "unit": "cycles", "better": "lower"}


if __name__ == "__main__":
    for row in run():
        print(row)
