"""Monitor commands and the vCPUs in one order: stop, cont, system_reset and quit from
any number of QMP clients, pipelined and interleaved, leave the VM running, paused or
gone, never dead by an internal error; and `quit` ends the process within 2 s.

The VM runs a real guest (tests/guests/irq.c) under the translator and under KVM."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import KVM_SKIP_REASON, ROOT, guest_path

ACCELS = ["tcg", pytest.param("kvm", marks=pytest.mark.skipif(bool(KVM_SKIP_REASON),
                                                               reason=KVM_SKIP_REASON or ""))]
QUIT_DEADLINE = 2.0
FUZZ = os.environ.get("KVMPY_FUZZ") == "1"


class Vm:
    def __init__(self, tmp_path, accel: str) -> None:
        self.sock_path = str(tmp_path / f"qmp-{time.monotonic_ns()}")
        accel_args = ["--enable-kvm"] if accel == "kvm" else ["--accel", "tcg"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvmpy", "run", *accel_args, "-m", "64M", "--kernel", guest_path("irq"),
             "--qmp", f"unix:{self.sock_path}"],
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"VM did not start: {self.proc.stderr.read().decode()}")
            time.sleep(0.02)

    def client(self) -> "Client":
        deadline = time.monotonic() + 10
        while True:
            try:
                return Client(self.sock_path)
            except (ConnectionRefusedError, FileNotFoundError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def quit_and_check(self, client: "Client") -> str:
        """`quit`: the process must be gone within QUIT_DEADLINE, with status 0."""
        t = time.monotonic()
        client.send("quit")
        try:
            status = self.proc.wait(QUIT_DEADLINE + 1)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the VM did not exit within {QUIT_DEADLINE + 1} s of quit")
        took = time.monotonic() - t
        err = self.proc.stderr.read().decode(errors="replace")
        assert took <= QUIT_DEADLINE, f"quit took {took:.2f} s"
        assert status == 0, f"exit status {status}: {err[-2000:]}"
        assert "internal error" not in err.lower() and "Traceback" not in err, err[-2000:]
        return err


class Client:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.sock.settimeout(20)
        self.buf = b""
        greeting = self.read()
        assert "QMP" in greeting
        self.send("qmp_capabilities")
        assert "return" in self.read_reply()

    def send(self, *commands: str) -> None:
        """Pipelined: every command written at once, replies read later."""
        self.sock.sendall(b"".join(json.dumps({"execute": c}).encode() + b"\n" for c in commands))

    def read(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("monitor closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def read_reply(self) -> dict:
        while True:
            msg = self.read()
            if "event" not in msg:
                return msg

    def status(self) -> str:
        self.send("query-status")
        return self.read_reply()["return"]["status"]

    def close(self) -> None:
        self.sock.close()


def run_clients(vm: Vm, scripts: list[list[str]]) -> list[Client]:
    """Each script from its own client, all at once, each pipelined; every command answered."""
    clients = [vm.client() for _ in scripts]
    errors: list[BaseException] = []

    def play(client: Client, script: list[str]) -> None:
        try:
            client.send(*script)
            for _ in script:
                reply = client.read_reply()
                assert "return" in reply, reply
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=play, args=(c, s)) for c, s in zip(clients, scripts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return clients


@pytest.mark.parametrize("accel", ACCELS)
def test_pipelined_reset_stop_cont(tmp_path, accel):
    """The issue's reproducer: system_reset, stop, cont pipelined on one connection."""
    for _ in range(3):
        vm = Vm(tmp_path, accel)
        try:
            (client,) = run_clients(vm, [["system_reset", "stop", "cont"]])
            assert client.status() in ("running", "prelaunch")
            vm.quit_and_check(client)
        finally:
            vm.kill()


@pytest.mark.parametrize("accel", ACCELS)
def test_resets_against_stop_cont_from_two_clients(tmp_path, accel):
    """One client: system_reset x50; another: stop/cont x50, at the same time."""
    vm = Vm(tmp_path, accel)
    try:
        a, b = run_clients(vm, [["system_reset"] * 50, ["stop", "cont"] * 50])
        time.sleep(0.3)               # the guest runs on after the last reset
        assert a.status() in ("running", "prelaunch")
        assert vm.proc.poll() is None
        vm.quit_and_check(b)
    finally:
        vm.kill()


@pytest.mark.parametrize("accel", ACCELS)
def test_quit_right_after_resets(tmp_path, accel):
    """quit queued behind many resets still ends the VM at once."""
    vm = Vm(tmp_path, accel)
    try:
        client = vm.client()
        client.send(*(["system_reset"] * 30))
        vm.quit_and_check(client)
    finally:
        vm.kill()


COMMANDS = st.sampled_from(["stop", "cont", "system_reset", "query-status"])


@pytest.mark.parametrize("accel", ACCELS)
@settings(max_examples=25 if FUZZ else 4, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(scripts=st.lists(st.lists(COMMANDS, min_size=1, max_size=12), min_size=2, max_size=2))
@example(scripts=[["stop"], ["stop"]])        # both before the vCPUs started: the VM starts paused
def test_any_interleaving_from_two_clients(tmp_path, accel, scripts):
    vm = Vm(tmp_path, accel)
    try:
        a, b = run_clients(vm, scripts)
        # Whatever happened, the VM is running or paused (or, when every command came
        # before the vCPUs started, about to start), and answers.
        assert a.status() in ("running", "paused", "prelaunch")
        assert vm.proc.poll() is None
        b.send("cont")
        assert "return" in b.read_reply()
        deadline = time.monotonic() + 10
        while (status := a.status()) != "running" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert status == "running"
        vm.quit_and_check(a)
    finally:
        vm.kill()
