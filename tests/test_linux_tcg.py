"""A real Debian cloud kernel boots on kvmpy's translator to the busybox init, runs
commands, writes a file to its virtio disk and powers off; the host reads the file."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from conftest import KVM_SKIP_REASON, run_kvmpy, tool_required

BOOT_TIMEOUT = 900


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    from kvmpy import guestbuild
    if not all(map(__import__("shutil").which, ("apt-get", "dpkg-deb"))):
        pytest.skip("not a Debian host: no apt-get/dpkg-deb to build the guest")
    out = tmp_path_factory.mktemp("guest")
    return guestbuild.build(out_dir=str(out), disk_size="64M")


def boot(guest, accel: list[str], commands: str) -> tuple[subprocess.CompletedProcess, float]:
    t = time.monotonic()
    p = run_kvmpy(["run", *accel, "-m", "512", "--kernel", guest.kernel, "--initrd", guest.initrd,
                   "--no-reboot", "--drive", f"file={guest.disk},format=raw",
                   "--append", f'console=ttyS0 panic=-1 kvmpy.run="{commands}"'], timeout=BOOT_TIMEOUT)
    return p, time.monotonic() - t


def check_run(guest, p, marker: str) -> str:
    out = p.stdout.decode(errors="replace").replace("\r\n", "\n")
    assert p.returncode == 0, out[-3000:] + p.stderr.decode()[-2000:]
    assert f"kvmpy guest: init {guest.release}" in out, out[-3000:]
    assert re.search(rf"^{re.escape(guest.release)}$", out, re.M), "uname -r did not print the release"
    assert "kvmpy guest: run exit 0" in out, out[-3000:]
    debugfs = tool_required("debugfs")
    r = subprocess.run([debugfs, "-R", "cat /f", guest.disk], capture_output=True, text=True)
    assert r.stdout.strip() == marker, r.stderr
    return out


def test_linux_boots_on_the_translator(guest):
    marker = f"written-by-tcg-{os.getpid()}"
    p, seconds = boot(guest, ["--accel", "tcg"],
                      f"uname -r; grep -c ^processor /proc/cpuinfo; echo {marker} > /mnt/f; sync")
    out = check_run(guest, p, marker)
    assert re.search(r"^1$", out, re.M)          # one processor in /proc/cpuinfo
    print(f"translator: boot to poweroff in {seconds:.1f} s")


def test_linux_boots_under_kvm(guest):
    if KVM_SKIP_REASON:
        pytest.skip(KVM_SKIP_REASON)
    from kvmpy.kvm_probe import probe_kvm
    if "kvm_pvm" in probe_kvm()["backend"]:
        pytest.skip("software-nested KVM (kvm_pvm) cannot run an unmodified Linux kernel "
                    "(emulation failures on int3/xrstor/cmpxchg16b); the translator test covers Linux here")
    marker = f"written-by-kvm-{os.getpid()}"
    p, seconds = boot(guest, ["--enable-kvm"], f"uname -r; echo {marker} > /mnt/f; sync")
    check_run(guest, p, marker)
