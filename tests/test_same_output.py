"""The same guests give the same serial output under KVM, under the translator and
(for the compute guest) under QEMU's TCG."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import KVM_SKIP_REASON, guest_path, run_kvmpy

# Lines that legitimately differ between CPUs: the vendor string and timings.
VOLATILE = re.compile(r"^(cpu vendor:|tsc cycles:|irq: \d+ tsc cycles)")


def serial_lines(args: list[str]) -> list[str]:
    p = run_kvmpy(["run", *args], timeout=180)
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
    return [line for line in p.stdout.decode().replace("\r\n", "\n").splitlines() if not VOLATILE.match(line)]


@pytest.fixture(scope="module")
def translator():
    try:
        import kvmpy._tcg  # noqa: F401
    except ImportError as e:
        pytest.fail(f"the translator extension is not built: {e}")


@pytest.mark.parametrize("guest,append", [
    ("hello", "console=ttyS0 x=1"),
    ("exit", "code=0"),
    ("compute", "iters=20000"),
    # #DE #UD #PF #GP with error codes, RIP and CR2 (#BP skipped: kvm_pvm cannot emulate
    # a ring-0 int3; the translator's #BP is checked in test_tcg_guests.py)
    ("fault", "skip=bp"),
])
def test_translator_matches_kvm(translator, guest, append):
    tcg = serial_lines(["--accel", "tcg", "--kernel", guest_path(guest), "--append", append])
    assert tcg and tcg[-1] == "guest: done"
    if KVM_SKIP_REASON:
        pytest.skip(f"KVM side: {KVM_SKIP_REASON}")
    kvm = serial_lines(["--enable-kvm", "--kernel", guest_path(guest), "--append", append])
    assert tcg == kvm


@pytest.mark.parametrize("cpus", [2, 4])
def test_smp_guest_matches_kvm(translator, cpus):
    """INIT-SIPI-SIPI from the BSP's LAPIC starts every AP in the MADT, one after the
    other (so the lines come in a fixed order), each vCPU in its own thread."""
    args = ["--smp", str(cpus), "--kernel", guest_path("smp")]
    tcg = serial_lines(["--accel", "tcg", *args])
    assert tcg and tcg[-1] == "guest: done"
    assert f"cpus online: {cpus}" in tcg
    assert [line for line in tcg if re.fullmatch(r"cpu \d+ online", line)] == \
        [f"cpu {i} online" for i in range(cpus)]
    if KVM_SKIP_REASON:
        pytest.skip(f"KVM side: {KVM_SKIP_REASON}")
    kvm = serial_lines(["--enable-kvm", *args])
    assert tcg == kvm


def test_compute_checksum_equals_qemu_tcg(translator):
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        pytest.skip("qemu-system-x86_64 is not installed")
    ours = [line for line in serial_lines(["--kernel", guest_path("compute"), "--append", "iters=50000"])
            if line.startswith(("checksum:", "crc32:", "iters:"))]
    r = subprocess.run([qemu, "-accel", "tcg", "-m", "128", "-nodefaults", "-display", "none", "-serial", "stdio",
                        "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                        "-kernel", guest_path("compute"), "-append", "iters=50000"],
                       capture_output=True, text=True, timeout=120)
    theirs = [line for line in r.stdout.replace("\r\n", "\n").splitlines()
              if line.startswith(("checksum:", "crc32:", "iters:"))]
    assert r.returncode == 1, r.stderr
    assert len(ours) == 3 and ours == theirs
