"""Inside the nested-KVM L1 (real kvm-amd on QEMU's emulated SVM): `kvmpy info kvm`
sees real KVM, and the test guests print the same under KVM as under the translator,
including what the host's software-nested KVM cannot do (ring-0 int3, SYSCALL and
int $0x80 from ring 3, a triple fault from an empty IDT)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from conftest import ROOT, guest_path, run_kvmpy
from support.nested import l1_only
from test_same_output import serial_lines
from test_tcg_x87_guest import kvmpy_lines as x87_lines
from test_virtio_guest_qemu import Echo, fnv1a, guest_pattern, make_image

pytestmark = l1_only


def test_info_kvm_reports_nested_svm():
    p = run_kvmpy(["info", "kvm", "--json"], timeout=120)
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
    report = json.loads(p.stdout)
    assert "kvm_pvm" not in report["backend"]
    assert report["backend"].startswith("nested SVM"), report["backend"]
    assert report["cpu"]["svm"] and report["usable"], report
    assert report["smoke_test"].startswith("passed"), report["smoke_test"]


def same_on_both(args: list[str]) -> list[str]:
    tcg = serial_lines(["--accel", "tcg", *args])
    kvm = serial_lines(["--enable-kvm", *args])
    assert tcg and tcg[-1] == "guest: done", tcg
    assert kvm == tcg
    return kvm


@pytest.mark.parametrize("guest,append", [
    ("hello", "console=ttyS0 x=1"),
    ("exit", "code=0"),
    ("compute", "iters=20000"),
    # ring 3 entering the kernel the ways kvm_pvm gets wrong
    ("compute", "iters=20000 user=1 sys=syscall"),
    ("compute", "iters=20000 user=1 sys=int80"),
    # every exception, #BP (ring-0 int3) too
    ("fault", ""),
    ("irq", "pit=1"),
])
def test_guest_matches_translator(guest, append):
    lines = same_on_both(["--kernel", guest_path(guest), "--append", append])
    if guest == "fault":
        assert any(line.startswith("fault: #BP ok") for line in lines), lines
        assert not any("skipped" in line for line in lines), lines


@pytest.mark.parametrize("cpus", [2, 4])
def test_smp_guest_matches_translator(cpus):
    lines = same_on_both(["--smp", str(cpus), "--kernel", guest_path("smp")])
    assert f"cpus online: {cpus}" in lines


def test_x87_guest_matches_translator():
    tcg = x87_lines("--accel", "tcg")
    assert tcg[-1] == "guest: done"
    assert x87_lines("--enable-kvm") == tcg


def test_triple_fault_resets_under_both():
    """An empty IDT and ud2: a triple fault, which is a reset; --no-reboot ends the VM with 0."""
    for accel in (["--accel", "tcg"], ["--enable-kvm"]):
        p = run_kvmpy(["run", *accel, "--no-reboot", "--kernel", guest_path("reboot"), "--append", "mode=triple"],
                      timeout=180)
        out = p.stdout.decode()
        assert p.returncode == 0, out + p.stderr.decode()
        assert "rebooting (triple fault)" in out and "reboot failed" not in out


def test_virtio_blk_guest_matches_translator(tmp_path):
    outputs = {}
    for accel in ("tcg", "kvm"):
        img = tmp_path / f"{accel}.raw"
        make_image(img)
        outputs[accel] = serial_lines(["--accel", accel, "--kernel", guest_path("virtio_blk"),
                                       "--append", "sector=2048 bytes=32768",
                                       "--drive", f"file={img},format=raw,serial=kvmpy-serial-7"])
        with open(img, "rb") as f:
            f.seek(2048 * 512)
            assert f.read(32768) == guest_pattern(32768), accel
    assert outputs["kvm"] == outputs["tcg"]
    assert f"virtio-blk: read back checksum {fnv1a(guest_pattern(32768)):#010x}" in outputs["kvm"]
    assert "virtio-blk: pattern ok" in outputs["kvm"]


def test_virtio_net_guest_matches_translator():
    ns = f"kvmpyl1-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["link", "add", "kbr1", "type", "bridge"], ["link", "set", "kbr1", "up"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        echo = Echo(ns, "kbr1")
        outputs = {}
        try:
            for accel in ("tcg", "kvm"):
                r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "kvmpy", "run", "--accel", accel,
                                    "--kernel", guest_path("virtio_net"), "--append", "count=3",
                                    "--net", "tap,ifname=ktap9,bridge=kbr1,mac=52:54:00:12:34:57"],
                                   cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                                   timeout=180, stdin=subprocess.DEVNULL)
                assert r.returncode == 0, r.stdout + r.stderr
                outputs[accel] = r.stdout.replace("\r\n", "\n").splitlines()
        finally:
            echo.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert outputs["kvm"] == outputs["tcg"]
    assert "virtio-net: 3 echoes ok" in outputs["kvm"]
