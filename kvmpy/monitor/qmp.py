"""QMP server: QEMU's Machine Protocol (docs/interop/qmp-spec.rst) for kvmpy.

Each client gets the greeting, starts in capabilities negotiation mode (only
``qmp_capabilities`` is accepted), then in command mode may run the commands in
COMMANDS and receives every event the machine emits. Replies echo ``id``;
errors use QEMU's classes and wording so existing tooling (qemu.qmp, libvirt-ish
scripts matching ``desc``) behaves.

Input is a stream of JSON objects, normally one per line; objects may also be
concatenated or spread over lines, as QEMU's streaming parser allows. Anything
else gets a GenericError without ``id`` and the parser resynchronises at the
next newline. A message longer than MAX_MESSAGE bytes is rejected the same way.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..events import EventLoop
from ..display.keymap import QKEYCODES
from ..net.announce import AnnounceParameters
from .control import ControlError, DisplayControl, VmControl
from .hmp import Hmp
from .server import Address, Connection, MonitorServer
from .version import version_info

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20
QUIT_FLUSH_TIMEOUT = 2.0


class QmpError(Exception):
    def __init__(self, desc: str, error_class: str = "GenericError"):
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid literal {name}")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)

# Argument schema: name -> (python type, QAPI type name, required).
_ArgSpec = dict[str, tuple[type, str, bool]]


@dataclass
class _Command:
    name: str
    handler: Callable[["QmpServer", dict], Any]
    args: _ArgSpec = field(default_factory=dict)
    quits: bool = False


def _check_arguments(cmd: _Command, arguments: dict) -> None:
    for key in arguments:
        if key not in cmd.args:
            raise QmpError(f"Parameter '{key}' is unexpected")
    for key, (pytype, qapi_type, required) in cmd.args.items():
        if key not in arguments:
            if required:
                raise QmpError(f"Parameter '{key}' is missing")
            continue
        value = arguments[key]
        ok = isinstance(value, pytype) and not (pytype is int and isinstance(value, bool))
        if ok and pytype is list:
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            raise QmpError(f"Invalid parameter type for '{key}', expected: {qapi_type}")


def _timestamp() -> dict:
    now = time.time()
    seconds = int(now)
    return {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)}


class _ClientState:
    def __init__(self) -> None:
        self.negotiated = False       # commands accepted (dispatch thread)
        self.events_enabled = False   # events sent: set once the qmp_capabilities reply is out
        self.buf = bytearray()
        self.skipping = False          # discarding the rest of an oversized line


class QmpServer(MonitorServer):
    """QMP on a unix or TCP socket. ``close()`` stops it and removes the socket."""

    thread_name = "qmp"

    def __init__(self, spec: str | Address, control: VmControl):
        super().__init__(spec)
        self.control = control
        self.hmp = Hmp(control, defer_quit=True)
        self._commands = {c.name: c for c in _COMMANDS}
        control.add_event_listener(self._on_event)

    def close(self, timeout: float = 5.0) -> None:
        self.control.remove_event_listener(self._on_event)
        super().close(timeout)

    # -- events (any thread) --
    def _on_event(self, event: str, data: dict | None) -> None:
        if self._stopping:
            return
        msg: dict[str, Any] = {"event": event, "data": dict(data or {}), "timestamp": _timestamp()}
        try:
            line = json.dumps(msg).encode() + b"\r\n"
        except (TypeError, ValueError):
            log.error("qmp: event %s has data that is not JSON: %r", event, data)
            return
        self.call_soon(lambda: self._broadcast(line))

    def _broadcast(self, line: bytes) -> None:
        for conn in list(self._conns.values()):
            if isinstance(conn.state, _ClientState) and conn.state.events_enabled and not conn.closing:
                conn.write(line)

    # -- protocol (I/O thread) --
    def protocol_connected(self, conn: Connection) -> None:
        conn.state = _ClientState()
        greeting = {"QMP": {"version": version_info(), "capabilities": []}}
        conn.write(json.dumps(greeting).encode() + b"\r\n")

    def protocol_data(self, conn: Connection, data: bytes) -> None:
        st: _ClientState = conn.state
        st.buf += data
        while True:
            if st.skipping:
                nl = st.buf.find(b"\n")
                if nl < 0:
                    st.buf.clear()
                    return
                del st.buf[:nl + 1]
                st.skipping = False
            if not self._parse_one(conn, st):
                break
        if len(st.buf) > MAX_MESSAGE:
            st.buf.clear()
            st.skipping = True
            self._submit_error(conn, f"JSON parse error, message longer than {MAX_MESSAGE} bytes")

    def _parse_one(self, conn: Connection, st: _ClientState) -> bool:
        """Take one JSON value off the front of the buffer. False: need more input."""
        start = 0
        while start < len(st.buf) and st.buf[start] in b" \t\r\n":
            start += 1
        del st.buf[:start]
        if not st.buf:
            return False
        nl = st.buf.find(b"\n")
        # surrogateescape keeps a byte-for-byte mapping, so invalid UTF-8 can be
        # found in what was parsed and the consumed length converted back.
        text = st.buf.decode("utf-8", errors="surrogateescape")
        try:
            value, end = _decoder.raw_decode(text)
        except (json.JSONDecodeError, ValueError, RecursionError) as e:
            pos = e.pos if isinstance(e, json.JSONDecodeError) else 0
            incomplete = isinstance(e, json.JSONDecodeError) and (
                pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"))
            if incomplete or nl < 0:
                # Not yet a whole line: wait (the size bound in protocol_data
                # stops a client from growing this forever).
                return False
            if isinstance(e, RecursionError):
                reason = "too many nested containers"
            elif isinstance(e, json.JSONDecodeError):
                reason = e.msg.lower()
            else:
                reason = str(e)
            del st.buf[:nl + 1]
            self._submit_error(conn, f"JSON parse error, {reason}")
            return True
        if isinstance(value, (int, float)) and end == len(text):
            return False        # a number may continue in the next packet
        parsed = text[:end]
        consumed = len(parsed.encode("utf-8", errors="surrogateescape"))
        del st.buf[:consumed]
        if consumed > MAX_MESSAGE:
            self._submit_error(conn, f"JSON parse error, message longer than {MAX_MESSAGE} bytes")
            return True
        if any("\udc80" <= ch <= "\udcff" for ch in parsed):
            self._submit_error(conn, "JSON parse error, invalid UTF-8 sequence in string")
            return True
        self.submit(lambda: self._execute(conn, value))
        return True

    def _submit_error(self, conn: Connection, desc: str) -> None:
        reply = {"error": {"class": "GenericError", "desc": desc}}
        self.submit(lambda: self._reply(conn, reply))

    # -- dispatch thread --
    def _reply(self, conn: Connection, msg: dict) -> None:
        try:
            line = json.dumps(msg).encode() + b"\r\n"
        except (TypeError, ValueError) as e:
            log.error("qmp: reply is not JSON (%s): %r", e, msg)
            line = json.dumps({"error": {"class": "GenericError",
                                         "desc": "internal error: reply is not JSON"},
                               **({"id": msg["id"]} if "id" in msg else {})}).encode() + b"\r\n"
        conn.post(line)

    def _execute(self, conn: Connection, request: Any) -> None:
        if conn.closed:
            return
        st: _ClientState = conn.state
        has_id = isinstance(request, dict) and "id" in request
        reply: dict[str, Any]
        after: Callable[[], None] | None = None
        after_reply_written = False
        try:
            name, arguments = self._check_request(request)
            cmd = self._commands.get(name)
            if not st.negotiated and name != "qmp_capabilities":
                raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                               "CommandNotFound")
            if cmd is None:
                raise QmpError(f"The command {name} has not been found", "CommandNotFound")
            if name == "qmp_capabilities" and st.negotiated:
                raise QmpError("Capabilities negotiation is already complete, command ignored",
                               "CommandNotFound")
            _check_arguments(cmd, arguments)
            if name == "qmp_capabilities":
                for cap in arguments.get("enable", []):
                    if cap == "oob":
                        raise QmpError("Capability oob not available")
                    raise QmpError(f"Parameter 'enable' does not accept value '{cap}'")
                st.negotiated = True
                result: Any = {}
                after_reply_written = True
            elif cmd.quits:
                result, after = {}, self.control.quit
            else:
                result = cmd.handler(self, arguments)
                if self.hmp.quit_requested:       # human-monitor-command "quit"
                    self.hmp.quit_requested = False
                    after = self.control.quit
            reply = {"return": result}
        except QmpError as e:
            reply = {"error": {"class": e.error_class, "desc": e.desc}}
        except ControlError as e:
            reply = {"error": {"class": "GenericError", "desc": str(e)}}
        except Exception as e:
            log.exception("qmp: command failed")
            reply = {"error": {"class": "GenericError", "desc": f"internal error: {e}"}}
        if has_id:
            reply["id"] = request["id"]
        if after_reply_written and "return" in reply:
            # Leave negotiation on the I/O thread right after the reply is written, so
            # no event can reach the client before its qmp_capabilities reply.
            line = json.dumps(reply).encode() + b"\r\n"

            def write_then_enable_events() -> None:
                conn.write(line)
                st.events_enabled = True
            self.call_soon(write_then_enable_events)
            return
        self._reply(conn, reply)
        if after is not None:
            # The client must see the reply before the process goes away.
            conn.wait_flushed(QUIT_FLUSH_TIMEOUT)
            try:
                after()
            except Exception:
                log.exception("qmp: quit failed")

    @staticmethod
    def _check_request(request: Any) -> tuple[str, dict]:
        if not isinstance(request, dict):
            raise QmpError("QMP input must be a JSON object")
        for key, value in request.items():
            if key == "execute":
                if not isinstance(value, str):
                    raise QmpError("QMP input member 'execute' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise QmpError("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise QmpError(f"QMP input member '{key}' is unexpected")
        if "execute" not in request:
            raise QmpError("QMP input lacks member 'execute'")
        return request["execute"], request.get("arguments", {})


def _query_status(srv: QmpServer, args: dict) -> dict:
    status = srv.control.status()
    return {"status": status, "running": status == "running", "singlestep": False}


def _query_name(srv: QmpServer, args: dict) -> dict:
    return {"name": srv.control.name} if srv.control.name else {}


def _query_commands(srv: QmpServer, args: dict) -> list:
    return [{"name": name} for name in srv._commands]


def _human_monitor_command(srv: QmpServer, args: dict) -> str:
    line = args["command-line"]
    text = srv.hmp.execute(line)
    # QEMU's monitor output ends lines with CRLF, also through this command.
    return text.replace("\n", "\r\n")


def _eject(srv: QmpServer, args: dict) -> dict:
    srv.control.eject(args["device"], args.get("force", False))
    return {}


def _change_medium(srv: QmpServer, args: dict) -> dict:
    srv.control.change_medium(args["device"], args["filename"], args.get("format"))
    return {}


def _void(action: Callable[[VmControl], None]) -> Callable[[QmpServer, dict], dict]:
    def run(srv: QmpServer, args: dict) -> dict:
        action(srv.control)
        return {}
    return run


_INT64 = (-(1 << 63), (1 << 63) - 1)


def _announce_self(srv: QmpServer, args: dict) -> dict:
    """QEMU's announce-self (qapi/net.json AnnounceParameters)."""
    values = {}
    for name in ("initial", "max", "rounds", "step"):
        value = args[name]
        if not _INT64[0] <= value <= _INT64[1]:
            # QEMU's JSON parser makes such a number a double, which is no integer.
            raise QmpError(f"Invalid parameter type for '{name}', expected: integer")
        values[name] = value
    interfaces = args.get("interfaces")
    if interfaces is not None:
        if not isinstance(interfaces, list):
            raise QmpError("Invalid parameter type for 'interfaces', expected: array")
        for i, name in enumerate(interfaces):
            if not isinstance(name, str):
                raise QmpError(f"Invalid parameter type for 'interfaces[{i}]', expected: string")
        interfaces = tuple(interfaces)
    try:
        params = AnnounceParameters(**values, interfaces=interfaces, id=args.get("id", ""))
    except ValueError as e:
        raise QmpError(str(e)) from None
    srv.control.announce_self(params)
    return {}


# --- the display (DisplayControl) ------------------------------------------------------
def _display(srv: QmpServer) -> DisplayControl:
    if not isinstance(srv.control, DisplayControl):
        raise QmpError("There is no QemuConsole I can screendump from.")
    return srv.control


def _screendump(srv: QmpServer, args: dict) -> dict:
    fmt = args.get("format", "ppm")
    if fmt not in ("ppm", "png"):
        raise QmpError(f"Parameter 'format' does not accept value '{fmt}'")
    if args.get("head", 0) != 0:
        raise QmpError(f"Head '{args['head']}' is not available on this console")
    _display(srv).screendump(args["filename"], fmt)
    return {}


def _send_key(srv: QmpServer, args: dict) -> dict:
    keys = args["keys"]
    if not isinstance(keys, list) or not keys:
        raise QmpError("Invalid parameter type for 'keys', expected: array")
    numbers = []
    for key in keys:
        kind = key.get("type") if isinstance(key, dict) else None
        data = key.get("data") if isinstance(key, dict) else None
        if kind == "qcode" and isinstance(data, str) and data in QKEYCODES:
            numbers.append(QKEYCODES[data])
        elif kind == "number" and isinstance(data, int) and 0 < data < 0x100:
            numbers.append(data)
        else:
            raise QmpError(f"Invalid parameter 'keys': {json.dumps(key)} is not a KeyValue")
    hold = args.get("hold-time", 100)
    if not 0 <= hold <= 10000:
        raise QmpError("Parameter 'hold-time' expects a value of 0..10000")
    _display(srv).send_keys(numbers, hold)
    return {}


def _query_vnc(srv: QmpServer, args: dict) -> dict:
    if not isinstance(srv.control, DisplayControl):
        return {"enabled": False}
    return srv.control.vnc_info()


_COMMANDS = [
    _Command("screendump", _screendump, {"filename": (str, "string", True), "device": (str, "string", False),
                                         "head": (int, "int", False), "format": (str, "ImageFormat", False)}),
    _Command("send-key", _send_key, {"keys": (object, "array of KeyValue", True), "hold-time": (int, "int", False)}),
    _Command("query-vnc", _query_vnc),
    _Command("change-vnc-password", lambda srv, a: _display(srv).set_vnc_password(a["password"]) or {},
             {"password": (str, "string", True)}),
    _Command("qmp_capabilities", lambda srv, a: {}, {"enable": (list, "array of QMPCapability", False)}),
    _Command("query-status", _query_status),
    _Command("query-kvm", lambda srv, a: dict(srv.control.kvm_info())),
    _Command("query-version", lambda srv, a: version_info()),
    _Command("query-name", _query_name),
    _Command("query-cpus-fast", lambda srv, a: list(srv.control.cpus())),
    _Command("query-block", lambda srv, a: list(srv.control.block_devices())),
    _Command("query-iothreads", lambda srv, a: list(srv.control.iothreads())),
    _Command("query-commands", _query_commands),
    _Command("announce-self", _announce_self,
             {"initial": (int, "integer", True), "max": (int, "integer", True), "rounds": (int, "integer", True),
              "step": (int, "integer", True), "interfaces": (object, "array", False), "id": (str, "string", False)}),
    _Command("eject", _eject, {"device": (str, "string", True), "force": (bool, "boolean", False)}),
    _Command("blockdev-change-medium", _change_medium,
             {"device": (str, "string", True), "filename": (str, "string", True), "format": (str, "string", False)}),
    _Command("stop", _void(lambda control: control.pause())),
    _Command("cont", _void(lambda control: control.resume())),
    _Command("system_reset", _void(lambda control: control.reset())),
    _Command("system_powerdown", _void(lambda control: control.powerdown())),
    _Command("quit", lambda srv, a: {}, quits=True),
    _Command("human-monitor-command", _human_monitor_command,
             {"command-line": (str, "string", True), "cpu-index": (int, "int", False)}),
]

COMMANDS = tuple(c.name for c in _COMMANDS)


def start_qmp_server(spec: str | Address, control: VmControl, events: EventLoop | None = None) -> QmpServer:
    """Listen on ``spec`` (``unix:/path`` or ``tcp:HOST:PORT``) and serve QMP for
    ``control`` from background threads. Raises ConfigError for a bad or busy
    address. The caller closes it (``server.close()``) when the VM stops."""
    return QmpServer(spec, control).start(events)
