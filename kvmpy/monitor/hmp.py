"""The human monitor: QEMU's HMP commands, as text in and text out.

``Hmp.execute(line)`` is the whole interpreter; the console's Ctrl-A c, QMP's
``human-monitor-command`` and the socket server (``HmpServer``: one command per
line, "(kvmpy) " prompt, EOF closes, so ``echo system_powerdown | nc -N -U sock``
works) all call it. Output wording follows QEMU where scripts are known to
parse it ("VM status: running", "kvm support: enabled").
"""

from __future__ import annotations

import logging
import shlex
from typing import Callable

from .. import __version__
from ..vcpu.trace import register_dump
from ..events import EventLoop
from ..display.keymap import parse_key_combo
from ..net.announce import AnnounceParameters
from .control import ControlError, DisplayControl, VmControl
from .server import Address, Connection, MonitorServer
from .version import version_line

log = logging.getLogger(__name__)

PROMPT = "(kvmpy) "
BANNER = f"kvmpy {__version__} monitor - type 'help' for more information"
MAX_LINE = 4096


def _kvm(control: VmControl, args: list[str]) -> str:
    info = control.kvm_info()
    if not info.get("present", False):
        return "kvm support: not compiled\n"
    return f"kvm support: {'enabled' if info.get('enabled') else 'disabled'}\n"


def _status(control: VmControl, args: list[str]) -> str:
    status = control.status()
    text = f"VM status: {'running' if status == 'running' else 'paused'}"
    if status not in ("running", "paused"):
        text += f" ({status})"
    return text + "\n"


def _cpus(control: VmControl, args: list[str]) -> str:
    cpus = sorted(control.cpus(), key=lambda c: c.get("cpu-index", 0))
    current = cpus[0].get("cpu-index") if cpus else None
    return "".join(
        f"{'*' if c.get('cpu-index') == current else ' '} CPU #{c.get('cpu-index')}: "
        f"thread_id={c.get('thread-id')}\n" for c in cpus)


def _block(control: VmControl, args: list[str]) -> str:
    wanted = args[0] if args else None
    out = []
    for dev in control.block_devices():
        name = dev.get("device") or dev.get("qdev") or "?"
        if wanted is not None and name != wanted:
            continue
        inserted = dev.get("inserted")
        if not inserted:
            out.append(f"{name}: [not inserted]\n")
        else:
            flags = inserted.get("drv", "?")
            if inserted.get("ro"):
                flags += ", read-only"
            out.append(f"{name}: {inserted.get('file', '?')} ({flags})\n")
            if dev.get("qdev"):
                out.append(f"    Attached to:      {dev['qdev']}\n")
            if dev.get("io-status", "ok") != "ok":
                out.append(f"    I/O status:       {dev['io-status']}\n")
            cache = inserted.get("cache")
            if isinstance(cache, dict):
                mode = "writeback" if cache.get("writeback", True) else "writethrough"
                if cache.get("direct"):
                    mode += ", direct"
                if cache.get("no-flush"):
                    mode += ", ignore flushes"
                out.append(f"    Cache mode:       {mode}\n")
        out.append("\n")
    if wanted is not None and not out:
        return f"Device '{wanted}' not found\n"
    return "".join(out).rstrip("\n") + "\n" if out else ""


def _iothreads(control: VmControl, args: list[str]) -> str:
    return "".join(f"{t['id']}:\n  thread_id={t['thread-id']}\n  poll-max-ns={t['poll-max-ns']}\n"
                   f"  poll-grow={t['poll-grow']}\n  poll-shrink={t['poll-shrink']}\n"
                   f"  aio-max-batch={t['aio-max-batch']}\n" for t in control.iothreads())


def _network(control: VmControl, args: list[str]) -> str:
    out = []
    for i, nic in enumerate(control.network_devices()):
        parts = [f"index={i}", f"type={nic.get('type', '?')}"]
        if nic.get("ifname"):
            parts.append(f"ifname={nic['ifname']}")
        if nic.get("bridge"):
            parts.append(f"br={nic['bridge']}")
        if nic.get("net"):
            parts.append(f"net={nic['net']},restrict={'on' if nic.get('restrict') else 'off'}")
        out.append(f"{nic.get('name', f'net{i}')}: {','.join(parts)}\n")
        if nic.get("mac"):
            out.append(f" \\ {nic.get('name', f'net{i}')}: model=virtio-net-pci,macaddr={nic['mac']}\n")
    return "".join(out)


def _user_networks(control: VmControl) -> list[tuple[str, object]]:
    """(netdev name, kvmpy.net.slirp.UserNetwork) for each user-mode NIC."""
    return [(nic.get("name", ""), nic["usernet"]) for nic in control.network_devices() if "usernet" in nic]


def _usernet(control: VmControl, args: list[str]) -> str:
    return "".join(f"Hub -1 ({name}):\n{usernet.connection_info()}" for name, usernet in _user_networks(control))


def _pick_user_network(control: VmControl, args: list[str], command: str):
    """QEMU's ``[netdev_id] rule``: the NIC may be left out when there is one."""
    nets = _user_networks(control)
    if len(args) == 2:
        found = [u for name, u in nets if name == args[0]]
        if not found:
            return None, f"{command}: unknown netdev '{args[0]}' (user networks: " \
                         f"{', '.join(n for n, _ in nets) or 'none'})\n"
        return found[0], None
    if len(args) != 1:
        return None, f"{command}: expected [netdev_id] rule\n"
    if not nets:
        return None, f"{command}: no user-mode network (use --net user)\n"
    if len(nets) > 1:
        return None, f"{command}: several user networks: name one ({', '.join(n for n, _ in nets)})\n"
    return nets[0][1], None


def _name(control: VmControl, args: list[str]) -> str:
    return f"{control.name}\n" if control.name else ""


def _version(control: VmControl, args: list[str]) -> str:
    return version_line()


def _registers(control: VmControl, args: list[str]) -> str:
    # QEMU's layout, which the internal-error dump prints too: a script parses one format.
    return "".join(f"CPU#{cpu}\n{register_dump(regs, sregs)}\n"
                   for cpu, (regs, sregs) in enumerate(control.vcpu_registers()))


def _vnc(control: VmControl, args: list[str]) -> str:
    info = control.vnc_info() if isinstance(control, DisplayControl) else {"enabled": False}
    if not info.get("enabled"):
        return "Server: none\n"
    out = f"Server: {info['host']}:{info['service']} ({info['family']})\n    Auth: {info['auth']}\n"
    clients = info.get("clients", [])
    out += "".join(f"Client: {c['host']}{':' + c['service'] if c['service'] else ''} ({c['family']})\n"
                   for c in clients) if clients else "Client: none\n"
    return out


# name -> (handler, max args, args synopsis, help)
INFO_COMMANDS: dict[str, tuple[Callable[[VmControl, list[str]], str], int, str, str]] = {
    "block": (_block, 1, "[device]", "show info of one block device or all block devices"),
    "cpus": (_cpus, 0, "", "show infos for each CPU"),
    "iothreads": (_iothreads, 0, "", "show the iothreads"),
    "kvm": (_kvm, 0, "", "show KVM information"),
    "name": (_name, 0, "", "show the current VM name"),
    "registers": (_registers, 0, "", "show the cpu registers"),
    "network": (_network, 0, "", "show the network state"),
    "status": (_status, 0, "", "show the current VM status (running|paused)"),
    "usernet": (_usernet, 0, "", "show user network stack connection states"),
    "version": (_version, 0, "", "show the version of kvmpy"),
    "vnc": (_vnc, 0, "", "show the vnc server status"),
}


class Hmp:
    """The interpreter. Not thread-safe by itself: callers run one command at a time
    per Hmp (each server has its own dispatch thread)."""

    # name -> (aliases, args synopsis, help)
    COMMANDS = {
        "announce_self": ((), "[interfaces] [id]",
                          "trigger GARP/RARP announcements (interfaces: net0,net1,...; id: replaces the "
                          "announcement of that id still running)"),
        "change": ((), "device filename [format] | vnc password PASSWORD",
                   "change a removable medium, or the VNC password"),
        "cont": (("c",), "", "resume emulation"),
        "eject": ((), "[-f] device", "eject a removable medium (use -f to force it)"),
        "help": (("?",), "[cmd]", "show the help"),
        "hostfwd_add": ((), "[netdev_id] [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport",
                        "redirect TCP or UDP connections from host to guest (requires --net user)"),
        "hostfwd_remove": ((), "[netdev_id] [tcp|udp]:[hostaddr]:hostport",
                           "remove host-to-guest TCP or UDP redirection"),
        "info": ((), "[subcommand]", "show various information about the system state"),
        "quit": (("q",), "", "quit the emulator"),
        "screendump": ((), "[-f format] filename", "save screen from current console to a PPM or PNG file"),
        "sendkey": ((), "keys [hold_ms]", "send keys to the VM (e.g. 'sendkey ctrl-alt-f1')"),
        "stop": (("s",), "", "stop emulation"),
        "system_powerdown": ((), "", "send system power down event"),
        "system_reset": ((), "", "reset the system"),
    }

    def __init__(self, control: VmControl, *, defer_quit: bool = False):
        """defer_quit: ``quit`` only sets ``quit_requested`` so the caller can
        deliver the output first and then call ``control.quit()`` itself."""
        self.control = control
        self.defer_quit = defer_quit
        self.quit_requested = False
        self._handlers: dict[str, Callable[[list[str]], str]] = {
            "announce_self": self._cmd_announce_self,
            "change": self._cmd_change, "eject": self._cmd_eject,
            "cont": self._cmd_cont, "help": self._cmd_help, "info": self._cmd_info, "quit": self._cmd_quit,
            "hostfwd_add": self._cmd_hostfwd_add, "hostfwd_remove": self._cmd_hostfwd_remove,
            "stop": self._cmd_stop, "system_powerdown": self._cmd_system_powerdown,
            "system_reset": self._cmd_system_reset, "screendump": self._cmd_screendump,
            "sendkey": self._cmd_sendkey,
        }
        assert self._handlers.keys() == self.COMMANDS.keys()
        self._alias = {}
        for name, (aliases, _, _) in self.COMMANDS.items():
            self._alias[name] = name
            for a in aliases:
                self._alias[a] = name

    def execute(self, line: str) -> str:
        """Run one command line; return its output ("" or lines ending in "\\n")."""
        try:
            words = shlex.split(line, comments=False)
        except ValueError as e:
            return f"{line.strip()}: {e}\n"
        if not words:
            return ""
        name = self._alias.get(words[0])
        if name is None:
            return f"unknown command: '{words[0]}'\n"
        args = words[1:]
        try:
            return self._handlers[name](args)
        except ControlError as e:
            return f"Error: {e}\n"
        except Exception as e:
            log.exception("hmp: command %r failed", line)
            return f"Error: internal error: {e}\n"

    def _no_args(self, name: str, args: list[str]) -> str | None:
        if args:
            return f"{name}: extraneous characters at the end of line\n"
        return None

    def _simple(self, name: str, args: list[str], action: Callable[[], None]) -> str:
        err = self._no_args(name, args)
        if err:
            return err
        action()
        return ""

    def _cmd_announce_self(self, args):
        # QEMU's: the timing of the migration parameters (their defaults here).
        if len(args) > 2:
            return "announce_self: extraneous characters at the end of line\n"
        interfaces = tuple(name for name in args[0].split(",") if name) if args else None
        self.control.announce_self(AnnounceParameters(interfaces=interfaces or None,
                                                      id=args[1] if len(args) == 2 else ""))
        return ""

    def _cmd_eject(self, args):
        force = bool(args) and args[0] == "-f"
        rest = args[1:] if force else args
        if len(rest) != 1:
            return "eject: usage: eject [-f] device\n"
        self.control.eject(rest[0], force)
        return ""

    def _cmd_change(self, args):
        if args[:2] == ["vnc", "password"]:
            return self._change_vnc_password(args)
        if not 2 <= len(args) <= 3:
            return "change: usage: change device filename [format]\n"
        self.control.change_medium(args[0], args[1], args[2] if len(args) == 3 else None)
        return ""

    def _cmd_cont(self, args):
        return self._simple("cont", args, self.control.resume)

    def _cmd_stop(self, args):
        return self._simple("stop", args, self.control.pause)

    def _cmd_system_reset(self, args):
        return self._simple("system_reset", args, self.control.reset)

    def _cmd_system_powerdown(self, args):
        return self._simple("system_powerdown", args, self.control.powerdown)

    def _cmd_quit(self, args):
        err = self._no_args("quit", args)
        if err:
            return err
        if self.defer_quit:
            self.quit_requested = True
        else:
            self.control.quit()
        return ""

    def _cmd_hostfwd_add(self, args):
        from ..errors import ConfigError
        from ..net.options import parse_hostfwd
        usernet, err = _pick_user_network(self.control, args, "hostfwd_add")
        if err:
            return err
        try:
            rule = parse_hostfwd(args[-1], "hostfwd_add")
        except ConfigError as e:
            return f"{e}\n"
        try:
            usernet.add_hostfwd(rule)
        except ConfigError:
            return f"could not set up host forwarding rule '{args[-1]}'\n"
        return ""

    def _cmd_hostfwd_remove(self, args):
        from ipaddress import IPv4Address
        usernet, err = _pick_user_network(self.control, args, "hostfwd_remove")
        if err:
            return err
        spec = args[-1]
        proto, sep, rest = spec.partition(":")
        addr, colon, port = rest.rpartition(":")
        try:
            if not sep or not colon or proto not in ("", "tcp", "udp") or not port.isdigit():
                raise ValueError
            host_addr = IPv4Address(addr or "0.0.0.0")
            host_port = int(port)
        except ValueError:
            return "invalid format\n"
        if not usernet.remove_hostfwd(proto == "udp", host_addr, host_port):
            return f"host forwarding rule for {spec} not found\n"
        return f"host forwarding rule for {spec} removed\n"

    def _cmd_info(self, args):
        if not args:
            return self._info_help()
        entry = INFO_COMMANDS.get(args[0])
        if entry is None:
            return f"unknown command: 'info {args[0]}'\n"
        handler, max_args, _, _ = entry
        if len(args) - 1 > max_args:
            return f"info {args[0]}: extraneous characters at the end of line\n"
        return handler(self.control, args[1:])

    def _info_help(self) -> str:
        return "".join(f"info {name} {syn} -- {text}\n".replace("  ", " ")
                       for name, (_, _, syn, text) in INFO_COMMANDS.items())

    def _cmd_help(self, args):
        if args:
            if args[0] == "info":
                return self._info_help()
            name = self._alias.get(args[0])
            if name is None:
                return f"unknown command: '{args[0]}'\n"
            return self._help_line(name)
        return "".join(self._help_line(name) for name in self.COMMANDS)

    def _help_line(self, name: str) -> str:
        aliases, syn, text = self.COMMANDS[name]
        return f"{'|'.join((name, *aliases))} {syn} -- {text}\n"

    def _display(self) -> DisplayControl:
        if not isinstance(self.control, DisplayControl):
            raise ControlError("There is no QemuConsole I can screendump from.")
        return self.control

    def _cmd_screendump(self, args):
        fmt = "ppm"
        if len(args) >= 2 and args[0] == "-f":
            fmt, args = args[1], args[2:]
        if fmt not in ("ppm", "png"):
            return f"screendump: format '{fmt}' is not ppm or png\n"
        if len(args) != 1:
            return "screendump: expected one file name\n"
        self._display().screendump(args[0], fmt)
        return ""

    def _cmd_sendkey(self, args):
        if not 1 <= len(args) <= 2:
            return "sendkey: expected keys [hold_ms]\n"
        try:
            keys = parse_key_combo(args[0])
            hold = int(args[1]) if len(args) == 2 else 100
        except ValueError as e:
            return f"{e}\n"
        if not 0 <= hold <= 10000:
            return "sendkey: hold_ms must be 0..10000\n"
        self._display().send_keys(keys, hold)
        return ""

    def _change_vnc_password(self, args):
        if len(args) != 3:
            return "change: usage: change vnc password PASSWORD\n"
        self._display().set_vnc_password(args[2])
        return ""

class _LineState:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.skipping = False


def _strip_telnet(data: bytes) -> bytes:
    """Drop telnet IAC command sequences (option negotiation from telnet clients)."""
    if b"\xff" not in data:
        return data
    out = bytearray()
    i = 0
    while i < len(data):
        b = data[i]
        if b != 0xFF:
            out.append(b)
            i += 1
            continue
        cmd = data[i + 1] if i + 1 < len(data) else None
        if cmd == 0xFF:                      # escaped 0xff data byte
            out.append(0xFF)
            i += 2
        elif cmd is not None and 251 <= cmd <= 254:   # WILL/WONT/DO/DONT option
            i += 3
        elif cmd == 250:                     # subnegotiation up to IAC SE
            end = data.find(b"\xff\xf0", i + 2)
            i = len(data) if end < 0 else end + 2
        else:
            i += 2
    return bytes(out)


class HmpServer(MonitorServer):
    """The human monitor on ``unix:/path``, ``tcp:HOST:PORT`` or ``telnet:HOST:PORT``."""

    thread_name = "hmp"

    def __init__(self, spec: str | Address, control: VmControl):
        super().__init__(spec)
        self.control = control
        self.hmp = Hmp(control, defer_quit=True)

    def protocol_connected(self, conn: Connection) -> None:
        conn.state = _LineState()
        conn.write((BANNER + "\r\n" + PROMPT).encode())

    def protocol_data(self, conn: Connection, data: bytes) -> None:
        st: _LineState = conn.state
        if self.address.telnet:
            data = _strip_telnet(data)
        st.buf += data
        while True:
            nl = st.buf.find(b"\n")
            if nl < 0:
                break
            raw = bytes(st.buf[:nl])
            del st.buf[:nl + 1]
            if st.skipping:
                st.skipping = False
                continue
            if len(raw) > MAX_LINE:
                self.submit(lambda: self._emit(conn, f"line too long (limit {MAX_LINE} bytes)\n"))
                continue
            line = raw.replace(b"\r", b"").replace(b"\0", b"").decode("utf-8", errors="replace")
            self.submit(lambda line=line: self._run(conn, line))
        if len(st.buf) > MAX_LINE:
            st.buf.clear()
            st.skipping = True
            self.submit(lambda: self._emit(conn, f"line too long (limit {MAX_LINE} bytes)\n"))

    def protocol_eof(self, conn: Connection) -> None:
        # Behind the commands already queued, so their output goes out first.
        self.submit(conn.post_close)

    def _emit(self, conn: Connection, text: str) -> None:
        conn.post((text.replace("\n", "\r\n") + PROMPT).encode())

    def _run(self, conn: Connection, line: str) -> None:
        if conn.closed:
            return
        out = self.hmp.execute(line)
        if self.hmp.quit_requested:
            self.hmp.quit_requested = False
            if out:
                conn.post(out.replace("\n", "\r\n").encode())
            conn.wait_flushed(2.0)
            self.control.quit()
            return
        self._emit(conn, out)


def start_hmp_server(spec: str | Address, control: VmControl, events: EventLoop | None = None) -> HmpServer:
    """Listen on ``spec`` and serve the human monitor for ``control``."""
    return HmpServer(spec, control).start(events)
