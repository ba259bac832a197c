"""Human monitor: the interpreter and its socket server, against StateVm."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.monitor.hmp import BANNER, MAX_LINE, PROMPT, Hmp, start_hmp_server

from test_qmp_statevm import StateVm


@pytest.fixture
def vm():
    machine = StateVm(name="web1")
    yield machine
    machine.close()


@pytest.fixture
def hmp(vm):
    return Hmp(vm)


def test_info_status_follows_the_vm(hmp, vm):
    assert hmp.execute("info status") == "VM status: running\n"
    assert hmp.execute("stop") == ""
    assert hmp.execute("info status") == "VM status: paused\n"
    assert not vm.progress()
    assert hmp.execute("c") == ""
    assert vm.progress()
    vm.quit()
    assert hmp.execute("info status") == "VM status: paused (shutdown)\n"


def test_info_kvm_enabled_and_disabled():
    on, off = StateVm(kvm=True), StateVm(kvm=False)
    try:
        assert Hmp(on).execute("info kvm") == "kvm support: enabled\n"
        assert Hmp(off).execute("info kvm") == "kvm support: disabled\n"
    finally:
        on.close()
        off.close()


def test_info_cpus_block_network_name(hmp, vm):
    cpus = hmp.execute("info cpus").splitlines()
    tids = [c["thread-id"] for c in vm.cpus()]
    assert cpus == [f"* CPU #0: thread_id={tids[0]}", f"  CPU #1: thread_id={tids[1]}"]
    block = hmp.execute("info block")
    assert block.startswith("virtio0: /var/lib/kvmpy/disk.img (raw)\n")
    assert "Attached to:" in block and "Cache mode:       writeback" in block
    assert hmp.execute("info block nope") == "Device 'nope' not found\n"
    net = hmp.execute("info network")
    assert "net0: index=0,type=tap,ifname=tap-toy0,br=br0" in net
    assert "macaddr=52:54:00:12:34:56" in net
    assert hmp.execute("info name") == "web1\n"
    assert hmp.execute("info version").endswith(")\n")


def test_reset_powerdown_quit_and_events(vm):
    events = []
    vm.add_event_listener(lambda e, d: events.append(e))
    h = Hmp(vm)
    assert h.execute("system_reset") == ""
    assert h.execute("system_powerdown") == ""
    deadline = time.monotonic() + 5
    while vm.status() != "shutdown":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert events[:3] == ["RESET", "POWERDOWN", "SHUTDOWN"]
    assert h.execute("quit") == ""
    assert vm.quit_called.is_set()


def test_errors_and_help(hmp):
    assert hmp.execute("frobnicate") == "unknown command: 'frobnicate'\n"
    assert hmp.execute("info frob") == "unknown command: 'info frob'\n"
    assert hmp.execute("stop now") == "stop: extraneous characters at the end of line\n"
    assert hmp.execute("   ") == ""
    help_text = hmp.execute("help")
    for cmd in ("cont|c", "stop|s", "quit|q", "system_reset", "system_powerdown", "info", "help|?"):
        assert cmd in help_text
    assert "info status" in hmp.execute("info")
    assert hmp.execute("help stop") == "stop|s  -- stop emulation\n"


def test_deferred_quit(vm):
    h = Hmp(vm, defer_quit=True)
    assert h.execute("q") == ""
    assert h.quit_requested and not vm.quit_called.is_set()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_execute_never_raises(line):
    vm = _shared_vm()
    out = Hmp(vm, defer_quit=True).execute(line)
    assert isinstance(out, str)
    assert out == "" or out.endswith("\n")
    if vm.status() == "paused":
        vm.resume()


_VM = []


def _shared_vm():
    if not _VM:
        _VM.append(StateVm(name="fuzz", ncpus=1, handles_acpi=False))
    return _VM[0]


def teardown_module():
    for v in _VM:
        v.close()


# --- the socket server ---

@pytest.fixture
def server(vm, tmp_path):
    srv = start_hmp_server(f"unix:{tmp_path}/hmp.sock", vm)
    yield srv
    srv.close()


def _read_until(sock, marker: bytes, timeout=5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_banner_prompt_and_commands(server, vm):
    s = socket.socket(socket.AF_UNIX)
    s.connect(server.address.path)
    hello = _read_until(s, PROMPT.encode())
    assert hello == (BANNER + "\r\n" + PROMPT).encode()
    s.sendall(b"info status\n")
    assert _read_until(s, PROMPT.encode()) == b"VM status: running\r\n" + PROMPT.encode()
    s.sendall(b"stop\r\ninfo status\n")
    out = _read_until(s, b"paused\r\n" + PROMPT.encode())
    assert out == PROMPT.encode() + b"VM status: paused\r\n" + PROMPT.encode()
    s.sendall(b"x" * (MAX_LINE + 100) + b"\ninfo name\n")
    out = _read_until(s, b"web1\r\n" + PROMPT.encode())
    assert b"line too long" in out
    s.shutdown(socket.SHUT_WR)
    rest = _read_until(s, b"never")
    assert rest == b""          # EOF closes
    s.close()


@pytest.mark.skipif(shutil.which("nc") is None, reason="nc (netcat-openbsd) is not installed")
def test_echo_powerdown_into_nc(server, vm):
    events = []
    vm.add_event_listener(lambda e, d: events.append(e))
    vm.handles_acpi = False
    out = subprocess.run(f"echo system_powerdown | nc -N -U {server.address.path}", shell=True,
                         capture_output=True, timeout=10)
    assert out.returncode == 0
    assert out.stdout == (BANNER + "\r\n" + PROMPT + PROMPT).encode()
    assert "POWERDOWN" in events
    # The exact line from the docs, with an nc that does not half-close: the
    # command still runs; nc is told to give up a moment after its input ends.
    events.clear()
    subprocess.run(f"echo system_powerdown | nc -q 1 -U {server.address.path}", shell=True,
                   capture_output=True, timeout=10)
    assert "POWERDOWN" in events


def test_telnet_tcp_strips_negotiation(vm):
    srv = start_hmp_server("telnet:127.0.0.1:0", vm)
    try:
        s = socket.create_connection((srv.address.host, srv.address.port), timeout=5)
        _read_until(s, PROMPT.encode())
        # IAC DO SUPPRESS-GO-AHEAD, IAC WILL TERMINAL-TYPE, then a CRLF line.
        s.sendall(b"\xff\xfd\x03\xff\xfb\x18info kvm\r\n")
        assert _read_until(s, PROMPT.encode()) == b"kvm support: enabled\r\n" + PROMPT.encode()
        s.close()
    finally:
        srv.close()


def test_quit_over_the_socket(server, vm):
    s = socket.socket(socket.AF_UNIX)
    s.connect(server.address.path)
    _read_until(s, PROMPT.encode())
    s.sendall(b"quit\n")
    assert vm.quit_called.wait(5)
    s.close()
