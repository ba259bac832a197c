"""Guests run through QEMU's spelling: `kvmpy run -enable-kvm -m 64 -kernel ... -device
isa-debug-exit,...` under KVM and the translator, QEMU's test devices driven by a guest
and compared with qemu-system-x86_64 on the same guest, -S, and the telnet serial console."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from conftest import KVM_SKIP_REASON, ROOT, guest_path, run_kvmpy, tool_required

ACCELS = [pytest.param("-enable-kvm", id="kvm"), pytest.param("tcg", id="tcg")]


def accel_args(accel: str) -> list[str]:
    if accel == "-enable-kvm":
        if KVM_SKIP_REASON:
            pytest.skip(KVM_SKIP_REASON)
        return ["-enable-kvm"]
    return ["-accel", "tcg"]


def guest_report_lines(stdout: bytes) -> list[str]:
    # Under QEMU, SeaBIOS's "Booting from ROM.." precedes the guest's first line on the same line.
    return re.findall(r"(?:pc-testdev|pci-testdev|testdev:|FAIL)[^\r\n]*", stdout.decode(errors="replace"))


QEMU_TEST_DEVICES = ["-device", "isa-debug-exit,iobase=0x501,iosize=2", "-device", "pc-testdev",
                "-device", "pci-testdev"]


@pytest.mark.parametrize("accel", ACCELS)
def test_test_devices_guest_exits_with_qemus_status(accel):
    r = run_kvmpy(["run", *accel_args(accel), "-m", "64", "-kernel", guest_path("qemu_testdev"),
                   "-append", "code=3", *QEMU_TEST_DEVICES], timeout=120)
    lines = guest_report_lines(r.stdout)
    assert r.returncode == (3 << 1) | 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "testdev: 0 failures, exit 3 through port 0x501" in lines
    assert "pci-testdev portio-no-eventfd: offset 131 data 0xfa width 1 count 16" in lines
    assert "pci-testdev mmio-datamatch-eventfd: offset 2050 data 0xfa width 1 count 0" in lines


def test_test_devices_same_as_qemu():
    qemu = tool_required("qemu-system-x86_64")
    if KVM_SKIP_REASON:
        pytest.skip(KVM_SKIP_REASON)
    args = ["-enable-kvm", "-m", "64", "-kernel", guest_path("qemu_testdev"), "-append", "code=1", *QEMU_TEST_DEVICES]
    theirs = subprocess.run([qemu, *args, "-nographic", "-nodefaults", "-serial", "stdio"], capture_output=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    ours = run_kvmpy(["run", *args, "-nographic"], timeout=120)
    assert theirs.returncode == ours.returncode == 3, (theirs, ours)
    assert guest_report_lines(ours.stdout) == guest_report_lines(theirs.stdout)
    assert len(guest_report_lines(ours.stdout)) == 9


@pytest.mark.parametrize("accel", ACCELS)
def test_debug_exit_at_kvmpys_port_with_qemus_status(accel):
    """The test guests' own exit port, declared QEMU's way: status (code << 1) | 1."""
    r = run_kvmpy(["run", *accel_args(accel), "-m", "64", "-kernel", guest_path("exit"), "-append", "code=5",
                   "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-display", "none"], timeout=120)
    assert r.returncode == 11, r
    # without the device, kvmpy's own port passes the value through
    r = run_kvmpy(["run", *accel_args(accel), "-m", "64", "-kernel", guest_path("exit"), "-append", "code=5"])
    assert r.returncode == 5, r


def test_start_paused_until_cont(tmp_path):
    if KVM_SKIP_REASON:
        pytest.skip(KVM_SKIP_REASON)
    sock = str(tmp_path / "qmp.sock")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", "-enable-kvm", "-S", "-m", "64", "-kernel",
                             guest_path("exit"), "-append", "code=9", "-qmp", f"unix:{sock},server,nowait"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        client = socket.socket(socket.AF_UNIX)
        client.connect(sock)
        f = client.makefile("rw")

        def cmd(name):
            f.write(json.dumps({"execute": name}) + "\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "event" not in reply:
                    return reply
        json.loads(f.readline())                       # greeting
        cmd("qmp_capabilities")
        time.sleep(0.5)
        assert proc.poll() is None                     # held: the guest would exit at once
        assert cmd("query-status")["return"]["status"] in ("paused", "prelaunch")
        cmd("cont")
        assert proc.wait(timeout=30) == 9
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_telnet_serial_console_reaches_the_guest():
    if KVM_SKIP_REASON:
        pytest.skip(KVM_SKIP_REASON)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", "-enable-kvm", "-m", "64", "-kernel",
                             guest_path("irq"), "-serial", f"telnet:127.0.0.1:{port},server,nowait,nodelay"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except ConnectionRefusedError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.05)
        got = b""
        while b"irq: ready" not in got:
            chunk = client.recv(4096)
            assert chunk, got
            got += chunk
        assert got.startswith(bytes([255, 251, 1]))     # the telnet greeting first
        client.sendall(b"x")
        while b"got: x" not in got:
            got += client.recv(4096)
        client.sendall(b"q")
        assert proc.wait(timeout=30) == 0
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
