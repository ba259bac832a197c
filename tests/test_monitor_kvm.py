"""QMP and the human monitor against a real `kvmpy run --enable-kvm`, driven by the
official qemu.qmp client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, guest_path
from support.qmp_client import connect_when_up

pytestmark = pytest.mark.usefixtures("kvm_required")


def start_vm(tmp_path, guest: str, *extra: str):
    qmp = tmp_path / "vm.qmp"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", "--enable-kvm", "--name", "qmptest",
                             "--kernel", guest_path(guest), "--qmp", f"unix:{qmp}", *extra],
                            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        return proc, connect_when_up(proc, qmp, timeout=30)
    except BaseException:
        proc.kill()
        raise


def close_client(qmp) -> None:
    # After `quit` the server closes the socket, as QEMU's does; the client may then
    # report EOF while disconnecting, which is not a failure of the VM.
    try:
        qmp.close()
    except (EOFError, ConnectionError):
        pass


def wait_event(qmp, name: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in qmp.get_events(wait=max(0.1, deadline - time.monotonic())):
            if e["event"] == name:
                return e
    raise AssertionError(f"no {name} event within {timeout} s")


def read_until(proc, needle: bytes, timeout: float = 30) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out and time.monotonic() < deadline:
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        out += chunk
    return out


def test_qmp_session_on_a_running_vm(tmp_path):
    proc, qmp = start_vm(tmp_path, "irq")
    try:
        _qmp_session(proc, qmp)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        raise AssertionError("VM stderr: " + proc.stderr.read().decode()[-3000:])
    finally:
        close_client(qmp)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _qmp_session(proc, qmp):
    if True:
        assert b"irq: ready" in read_until(proc, b"irq: ready")
        assert qmp.cmd("query-status")["status"] == "running"
        assert qmp.cmd("query-kvm") == {"enabled": True, "present": True}
        assert qmp.cmd("query-name") == {"name": "qmptest"}
        cpus = qmp.cmd("query-cpus-fast")
        assert [c["cpu-index"] for c in cpus] == [0]
        qmp.cmd("stop")
        assert qmp.cmd("query-status")["status"] == "paused"
        wait_event(qmp, "STOP")
        # While paused, typed input is buffered by the UART but not echoed.
        proc.stdin.write(b"z")
        proc.stdin.flush()
        time.sleep(0.3)
        qmp.cmd("cont")
        assert qmp.cmd("query-status")["status"] == "running"
        assert b"got: z" in read_until(proc, b"got: z")
        hmp = qmp.cmd("human-monitor-command", **{"command-line": "info kvm"})
        assert "kvm support: enabled" in hmp
        qmp.cmd("system_reset")
        assert b"irq: ready" in read_until(proc, b"irq: ready")   # the guest booted again
        assert wait_event(qmp, "RESET")["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
        qmp.cmd("quit")
        assert proc.wait(20) == 0


def test_system_powerdown_powers_off_a_guest_that_handles_the_button(tmp_path):
    proc, qmp = start_vm(tmp_path, "acpi_power")
    try:
        assert b"waiting for power button" in read_until(proc, b"waiting for power button")
        qmp.cmd("system_powerdown")
        wait_event(qmp, "POWERDOWN")
        rest = proc.stdout.read()
        assert proc.wait(30) == 0
        assert b"acpi: power button pressed" in rest
        assert b"still running after S5" not in rest
    finally:
        close_client(qmp)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_hmp_socket_with_netcat_style_client(tmp_path):
    hmp_path = tmp_path / "vm.hmp"
    proc, qmp = start_vm(tmp_path, "acpi_power", "--monitor", f"unix:{hmp_path}")
    try:
        read_until(proc, b"waiting for power button")
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(hmp_path))
            s.sendall(b"info status\ninfo registers\nsystem_powerdown\n")
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        assert b"VM status: running" in reply
        # The guest waits in `hlt` with interrupts on, in 64-bit kernel mode.
        assert b"CPU#0" in reply and b"RIP=" in reply and b"CPL=0" in reply
        assert b"EFER=0000000000000d00" in reply or b"EFER=0000000000000500" in reply
        assert proc.wait(30) == 0
    finally:
        close_client(qmp)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_powers_down_the_guest(tmp_path):
    proc, qmp = start_vm(tmp_path, "acpi_power")
    try:
        read_until(proc, b"waiting for power button")
        proc.terminate()
        assert proc.wait(30) == 0
        assert b"power button pressed" in proc.stdout.read()
    finally:
        close_client(qmp)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
