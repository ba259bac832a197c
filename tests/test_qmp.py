"""QMP server driven by the official qemu.qmp client against StateVm."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qemu.qmp import QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu.qmp.qmp_client import ExecuteError

from kvmpy.errors import ConfigError
from kvmpy.monitor.qmp import COMMANDS, MAX_MESSAGE, start_qmp_server
from kvmpy.monitor.server import parse_address

from test_qmp_statevm import StateVm


@pytest.fixture
def vm():
    machine = StateVm(name="guest1")
    yield machine
    machine.close()


@pytest.fixture
def server(vm, tmp_path):
    srv = start_qmp_server(f"unix:{tmp_path}/qmp.sock", vm)
    yield srv
    srv.close()


class Raw:
    """A byte-level client for input no real client would send."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.f = self.sock.makefile("rb")
        self.greeting = json.loads(self.f.readline())

    def send(self, data: bytes):
        self.sock.sendall(data)

    def recv(self):
        line = self.f.readline()
        assert line, "server closed the connection"
        return json.loads(line)

    def cmd(self, obj):
        self.send(json.dumps(obj).encode() + b"\n")
        return self.recv()

    def close(self):
        self.f.close()
        self.sock.close()


def test_greeting_and_negotiation(server):
    q = QEMUMonitorProtocol(server.address.path)
    greeting = q.connect()          # the official client negotiates
    assert greeting["QMP"]["capabilities"] == []
    raw = Raw(server.address.path)
    assert raw.greeting["QMP"]["capabilities"] == []
    version = raw.greeting["QMP"]["version"]
    assert set(version["qemu"]) == {"major", "minor", "micro"}
    assert version["package"].startswith("kvmpy ")
    r = raw.cmd({"execute": "query-status", "id": 1})
    assert r == {"error": {"class": "CommandNotFound",
                           "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
                 "id": 1}
    assert raw.cmd({"execute": "qmp_capabilities"}) == {"return": {}}
    r = raw.cmd({"execute": "qmp_capabilities", "id": "again"})
    assert r["error"]["class"] == "CommandNotFound"
    assert r["error"]["desc"] == "Capabilities negotiation is already complete, command ignored"
    assert r["id"] == "again"
    raw.close()
    q.close()


def test_queries_through_legacy_client(server, vm):
    with QEMUMonitorProtocol(server.address.path) as q:
        q.connect()
        assert q.cmd("query-status") == {"status": "running", "running": True, "singlestep": False}
        assert q.cmd("query-kvm") == {"enabled": True, "present": True}
        assert q.cmd("query-name") == {"name": "guest1"}
        version = q.cmd("query-version")
        assert version["package"].startswith("kvmpy ")
        cpus = q.cmd("query-cpus-fast")
        assert [c["cpu-index"] for c in cpus] == [0, 1]
        assert all(c["thread-id"] != os.getpid() and c["target"] == "x86_64" for c in cpus)
        block = q.cmd("query-block")
        assert block[0]["device"] == "virtio0" and block[0]["inserted"]["drv"] == "raw"
        names = {c["name"] for c in q.cmd("query-commands")}
        assert names == set(COMMANDS)
        assert {"qmp_capabilities", "query-status", "human-monitor-command", "quit"} <= names


def test_stop_and_cont_really_park_the_vcpus(server, vm):
    with QEMUMonitorProtocol(server.address.path) as q:
        q.connect()
        assert vm.progress()
        assert q.cmd("stop") == {}
        assert q.cmd("query-status")["status"] == "paused"
        assert not vm.progress()
        assert q.cmd("cont") == {}
        assert q.cmd("query-status") == {"status": "running", "running": True, "singlestep": False}
        assert vm.progress()
        events = [e["event"] for e in q.get_events(wait=1.0)]
        assert events[:2] == ["STOP", "RESUME"]


def test_errors_use_qemu_classes_and_wording(server):
    with QEMUMonitorProtocol(server.address.path) as q:
        q.connect()
        r = q.cmd_obj({"execute": "foo", "id": "i7"})
        assert r == {"error": {"class": "CommandNotFound", "desc": "The command foo has not been found"},
                     "id": "i7"}
        r = q.cmd_obj({"execute": "query-status", "arguments": {"x": 1}, "id": "i8"})
        assert r["error"] == {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}
        r = q.cmd_obj({"execute": "human-monitor-command", "id": "i9"})
        assert r["error"] == {"class": "GenericError", "desc": "Parameter 'command-line' is missing"}
        r = q.cmd_obj({"execute": "human-monitor-command", "arguments": {"command-line": 5}, "id": "i10"})
        assert r["error"] == {"class": "GenericError",
                              "desc": "Invalid parameter type for 'command-line', expected: string"}
        r = q.cmd_obj({"execute": "query-status", "bogus": 1, "id": "i11"})
        assert r["error"]["desc"] == "QMP input member 'bogus' is unexpected"
        r = q.cmd_obj({"execute": "query-status", "arguments": [], "id": "i12"})
        assert r["error"]["desc"] == "QMP input member 'arguments' must be an object"
        r = q.cmd_obj({"arguments": {}, "id": "i13"})
        assert r["error"]["desc"] == "QMP input lacks member 'execute'"
        # The session survives all of that.
        assert q.cmd("query-status")["running"] is True


def test_resume_after_shutdown_is_a_generic_error(server, vm):
    with QEMUMonitorProtocol(server.address.path) as q:
        q.connect()
        vm.handles_acpi = True
        q.cmd("system_powerdown")
        deadline = time.monotonic() + 5
        while q.cmd("query-status")["status"] != "shutdown":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = q.cmd_obj({"execute": "cont", "id": "c"})
        assert r["error"] == {"class": "GenericError", "desc": "Resetting the Virtual Machine is required"}


@pytest.mark.parametrize("ident", ["abc", 42, {"nested": [1, 2]}, None, 1.5])
def test_id_is_echoed_verbatim(server, ident):
    raw = Raw(server.address.path)
    assert raw.cmd({"execute": "qmp_capabilities", "id": ident}) == {"return": {}, "id": ident}
    assert raw.cmd({"execute": "query-name", "id": ident}) == {"return": {"name": "guest1"}, "id": ident}
    raw.close()


def test_events_reach_every_negotiated_client_with_timestamps(server, vm):
    async def scenario_with_listeners():
        from qemu.qmp import EventListener
        clients, lsn = [], []
        for i in range(3):
            c = QMPClient(f"c{i}")
            await c.connect(server.address.path)
            li = EventListener()
            c.register_listener(li)
            clients.append(c)
            lsn.append(li)
        raw = Raw(server.address.path)
        await clients[0].execute("stop")
        await clients[1].execute("system_powerdown")
        await clients[2].execute("cont")
        got = []
        for li in lsn:
            events = []
            while len(events) < 3:
                events.append(await asyncio.wait_for(li.get(), 5))
            got.append(events)
        raw.sock.settimeout(0.3)
        with pytest.raises((socket.timeout, TimeoutError)):
            raw.f.readline()
        raw.close()
        for c, li in zip(clients, lsn):
            c.remove_listener(li)
            await c.disconnect()
        return got

    vm.handles_acpi = False
    got = asyncio.run(scenario_with_listeners())
    before = time.time()
    for events in got:
        assert [e["event"] for e in events] == ["STOP", "POWERDOWN", "RESUME"]
        for e in events:
            ts = e["timestamp"]
            assert 0 <= ts["microseconds"] < 1_000_000
            assert before - 30 < ts["seconds"] <= before + 1
            assert e["data"] == {}


def test_qmpclient_execute_error_and_hmp_passthrough(server, vm):
    async def scenario():
        c = QMPClient("hmp")
        await c.connect(server.address.path)
        with pytest.raises(ExecuteError) as ei:
            await c.execute("no-such-thing")
        assert ei.value.error_class == "CommandNotFound"
        out = await c.execute("human-monitor-command", {"command-line": "info status"})
        assert out == "VM status: running\r\n"
        out = await c.execute("human-monitor-command", {"command-line": "stop"})
        assert out == ""
        out = await c.execute("human-monitor-command", {"command-line": "info status"})
        assert out == "VM status: paused\r\n"
        out = await c.execute("human-monitor-command", {"command-line": "info kvm"})
        assert out == "kvm support: enabled\r\n"
        await c.disconnect()

    asyncio.run(scenario())
    assert vm.status() == "paused"


def test_powerdown_then_guest_shutdown_events(server, vm):
    with QEMUMonitorProtocol(server.address.path) as q:
        q.connect()
        assert q.cmd("system_powerdown") == {}
        ev = q.pull_event(wait=5)
        assert ev["event"] == "POWERDOWN"
        ev = q.pull_event(wait=5)
        assert ev["event"] == "SHUTDOWN" and ev["data"] == {"guest": True, "reason": "guest-shutdown"}
        assert q.cmd("query-status")["status"] == "shutdown"
        assert q.cmd("system_reset") == {}
        assert q.pull_event(wait=5)["event"] == "RESET"
        assert q.cmd("query-status")["status"] == "running"


def test_quit_replies_before_the_vm_goes(server, vm):
    q = QEMUMonitorProtocol(server.address.path)
    q.connect()
    assert q.cmd("quit") == {}
    assert vm.quit_called.wait(5)
    q.close()


def test_hmp_quit_through_qmp_replies_then_quits(server, vm):
    with QEMUMonitorProtocol(server.address.path) as q:
        q.connect()
        assert q.cmd("human-monitor-command", **{"command-line": "quit"}) == ""
        assert vm.quit_called.wait(5)


def test_garbage_and_huge_lines_do_not_hurt_the_server(server, vm):
    raw = Raw(server.address.path)
    assert raw.cmd({"execute": "qmp_capabilities"}) == {"return": {}}
    raw.send(b"this is not json\n")
    r = raw.recv()
    assert r["error"]["class"] == "GenericError" and r["error"]["desc"].startswith("JSON parse error")
    assert "id" not in r
    raw.send(b"[1, 2]\n")
    assert raw.recv()["error"]["desc"] == "QMP input must be a JSON object"
    raw.send(b'{"execute": "query-name", "id": "\xff\xfe"}\n')
    assert raw.recv()["error"]["desc"].startswith("JSON parse error")
    raw.send(b"[" * 100000 + b"\n")
    assert raw.recv()["error"]["desc"].startswith("JSON parse error")
    # A line longer than the bound: one error, then the rest of it is skipped.
    raw.send(b'{"execute": "' + b"x" * (MAX_MESSAGE + 10) + b'"}\n')
    r = raw.recv()
    assert "longer than" in r["error"]["desc"]
    # Two objects on one line and one object split across packets still work.
    raw.send(b'{"execute": "query-name", "id": 1}{"execute": "query-kvm", "id": 2}\n')
    assert raw.recv() == {"return": {"name": "guest1"}, "id": 1}
    assert raw.recv()["id"] == 2
    raw.send(b'{"execute": "query-st')
    time.sleep(0.05)
    raw.send(b'atus", "id": 3}\n')
    assert raw.recv()["id"] == 3
    raw.close()
    with QEMUMonitorProtocol(server.address.path) as q:
        q.connect()
        assert q.cmd("query-status")["running"] is True


def test_client_vanishing_mid_command(server, vm):
    for _ in range(5):
        raw = Raw(server.address.path)
        raw.send(b'{"execute":"qmp_capabilities"}\n{"execute":"stop"}\n{"execute":"cont"}\n'
                 b'{"execute":"query-block"}\n')
        raw.sock.shutdown(socket.SHUT_RDWR)
        raw.close()
    with QEMUMonitorProtocol(server.address.path) as q:
        q.connect()
        # Like QEMU, requests still queued when their client goes are dropped,
        # so the VM may be left paused; it must still answer and obey.
        assert q.cmd("query-status")["status"] in ("running", "paused")
        q.cmd("cont")
        assert q.cmd("query-status")["status"] == "running"
        assert vm.progress()
    deadline = time.monotonic() + 2
    while server.client_count() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.client_count() == 0


def test_non_reading_client_never_blocks_vcpus_or_others(server, vm):
    stuck = Raw(server.address.path)
    stuck.cmd({"execute": "qmp_capabilities"})
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with QEMUMonitorProtocol(server.address.path) as q:
        q.connect()
        # Flood events; the stuck client's buffers fill, the rest carries on.
        t0 = time.monotonic()
        for _ in range(200):
            q.cmd("system_reset")
        assert time.monotonic() - t0 < 10
        assert vm.progress()
        assert q.cmd("query-status")["running"] is True
    stuck.close()


def test_tcp_listener_on_loopback(vm):
    srv = start_qmp_server("tcp:127.0.0.1:0", vm)
    try:
        assert srv.address.port > 0
        with QEMUMonitorProtocol((srv.address.host, srv.address.port)) as q:
            q.connect()
            assert q.cmd("query-name") == {"name": "guest1"}
    finally:
        srv.close()


def test_close_stops_threads_and_removes_socket(vm, tmp_path):
    path = f"{tmp_path}/q.sock"
    srv = start_qmp_server(f"unix:{path}", vm)
    q = QEMUMonitorProtocol(path)
    q.connect()
    srv.close()
    assert not os.path.exists(path)
    assert not [t for t in threading.enumerate() if t.name.startswith("qmp-")]
    # Events after close are dropped, not raised into the vCPU thread.
    vm.reset()
    q.close()


def test_busy_and_stale_socket_paths(vm, tmp_path):
    path = f"{tmp_path}/q.sock"
    srv = start_qmp_server(f"unix:{path}", vm)
    try:
        with pytest.raises(ConfigError, match="in use"):
            start_qmp_server(f"unix:{path}", vm)
    finally:
        srv.close()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()              # leaves a socket file nobody listens on
    srv = start_qmp_server(f"unix:{path}", vm)
    srv.close()
    open(path, "w").close()
    with pytest.raises(ConfigError, match="not a socket"):
        start_qmp_server(f"unix:{path}", vm)


@pytest.mark.parametrize("spec,kind", [
    ("unix:/run/x.sock", "unix"), ("unix:/run/x.sock,server,nowait", "unix"),
    ("tcp:127.0.0.1:4444", "tcp"), ("tcp::4444", "tcp"), ("tcp:[::1]:4444", "tcp"),
    ("telnet:127.0.0.1:4445,server=on,wait=off", "tcp")])
def test_parse_address_accepts(spec, kind):
    assert parse_address(spec).kind == kind


@pytest.mark.parametrize("spec", ["", "unix:", "tcp:1.2.3.4", "tcp:h:99999", "tcp:h:x", "udp:h:1",
                                  "stdio", "unix:/x,bogus"])
def test_parse_address_rejects(spec):
    with pytest.raises(ConfigError):
        parse_address(spec)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_parse_address_never_crashes(spec):
    try:
        addr = parse_address(spec)
    except ConfigError as e:
        assert "\n" not in str(e).strip() or "\n" in spec
    else:
        assert addr.kind in ("unix", "tcp")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"\n", b"{", b"}", b'"', b"\xff", b'{"execute": "stop"}', b'{"execute":"cont"}\n',
                     b'{"execute": "qmp_capabilities"}\n', b"[[[[", b"NaN\n", b"1e999\n"])),
    max_size=12))
def test_fuzzed_input_never_breaks_the_server(server, vm, chunks):
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(2)
    raw.connect(server.address.path)
    try:
        for c in chunks:
            raw.sendall(c)
    except OSError:
        pass
    raw.close()
    with QEMUMonitorProtocol(server.address.path) as q:
        q.connect()
        if q.cmd("query-status")["status"] == "paused":
            q.cmd("cont")
        assert q.cmd("query-name") == {"name": "guest1"}


def test_no_event_reaches_a_client_before_its_capabilities_reply(server, vm):
    """Events stream while clients negotiate: the first message after the greeting
    must always be the qmp_capabilities reply (QEMU sends no events before it)."""
    import threading as _threading
    stop = _threading.Event()

    def emitter():
        while not stop.is_set():
            vm._emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})

    t = _threading.Thread(target=emitter, daemon=True)
    t.start()
    try:
        for _ in range(30):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(server.address.path)
                f = s.makefile("rb")
                assert b"QMP" in f.readline()
                s.sendall(b'{"execute": "qmp_capabilities", "id": 1}\n')
                assert json.loads(f.readline()) == {"return": {}, "id": 1}
    finally:
        stop.set()
        t.join()
