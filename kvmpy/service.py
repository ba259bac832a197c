"""``kvmpy service``: start, stop and watch the VMs of a host, one vm.toml each.

The successor of the old rc script: every ``DIR/NAME.toml`` is a machine; with no
NAME given, ``start`` starts every enabled one (``enabled = false`` is the old
``!`` prefix), ``stop`` stops every running one. Each VM runs as its own daemon

    python3 -m kvmpy run --daemonize --pidfile RUNDIR/NAME.pid \\
        --qmp unix:RUNDIR/NAME.qmp --name NAME [--runas USER] DIR/NAME.toml

and is stopped with its halt method, a bounded wait, then QMP ``quit``, then
SIGKILL. The per-VM ``[service]`` table:

    [service]
    halt = "qmp"                 # ACPI power button over QMP (default), or "command"
    halt_command = "ssh vm poweroff"   # implies halt = "command"; run by /bin/sh
    halt_timeout = 30            # seconds to wait for the guest to power off
    runas = "kvm"                # passed as --runas (also accepted at top level)

halt_command runs with KVMPY_NAME, KVMPY_PID and KVMPY_QMP (socket path) set.

The old script's own form works too (the ArchWiki QEMU page's /etc/conf.d/qemu.conf):
a ``DIR/*.conf`` file of shell assignments, each ``qemu_NAME="..."`` a VM given as
QEMU's command line, unchanged (kvmpy.qemu_cli reads it):

    QEMU_MACHINES=(vm1 !vm2)           # optional: the order, '!' = not started
    qemu_vm1="-name vm1 -pidfile /var/run/qemu/vm1.pid -daemonize -nographic -enable-kvm \
      -m 512 -hda /srv/kvm/vm1.img -net nic,macaddr=DE:AD:BE:EF:E0:00 -net tap,ifname=tap0 \
      -serial telnet:localhost:7000,server,nowait,nodelay -vnc :0"
    qemu_vm1_type="system-x86_64"      # optional; the only one there is
    qemu_vm1_haltcmd="ssh root@vm1 poweroff"   # optional: halt_command

or the page's systemd form, one file per VM, ``DIR/qemu.d/NAME`` with ``type=``,
``args="QEMU command line"`` and ``haltcmd=``.

kvmpy adds its own ``-name NAME -pidfile RUNDIR/NAME.pid -daemonize -qmp ...`` after
the line (the last -pidfile wins, as in QEMU, so status and stop find the VM), and
stops the VM as above.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass

from .errors import ConfigError, UserError
from .lifecycle import pid_alive, read_pidfile
from .procfs import process_age_seconds
from .threadname import NamedThread

DEFAULT_CONFIG_DIR = "/etc/kvmpy"
DEFAULT_RUN_DIR = "/run/kvmpy"
DEFAULT_UNIT_DIR = "/etc/systemd/system"
DEFAULT_HALT_TIMEOUT = 30.0
QUIT_TIMEOUT = 5.0          # after QMP quit, before SIGKILL
START_TIMEOUT = 60.0
QMP_TIMEOUT = 3.0
SERVICE_KEYS = {"halt", "halt_command", "halt_timeout", "runas"}
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


@dataclass
class VmEntry:
    name: str
    config: str
    enabled: bool = True
    halt: str = "qmp"
    halt_command: str | None = None
    halt_timeout: float = DEFAULT_HALT_TIMEOUT
    runas: str | None = None
    qemu_args: list[str] | None = None      # a qemu_NAME="..." line of a .conf file

    def pidfile(self, run_dir: str) -> str:
        return os.path.join(run_dir, f"{self.name}.pid")

    def qmp_path(self, run_dir: str) -> str:
        return os.path.join(run_dir, f"{self.name}.qmp")


# ------------------------------------------------------------------ config

def load_entry(path: str) -> VmEntry:
    """Read one machine file; ConfigError names the file and key."""
    name = os.path.splitext(os.path.basename(path))[0]
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"{path}: file name must be NAME.toml with NAME of letters, digits, '.', '_', '-'")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    entry = VmEntry(name=name, config=os.path.abspath(path))
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{path}: key 'enabled': expected true or false, got {enabled!r}")
    entry.enabled = enabled
    svc = data.get("service", {})
    if not isinstance(svc, dict):
        raise ConfigError(f"{path}: key 'service': expected a table ([service])")
    for key in svc:
        if key not in SERVICE_KEYS:
            raise ConfigError(f"{path}: [service] unknown key '{key}' (known: {', '.join(sorted(SERVICE_KEYS))})")
    if "halt_command" in svc:
        cmd = svc["halt_command"]
        if not isinstance(cmd, str) or not cmd.strip():
            raise ConfigError(f"{path}: [service] key 'halt_command': expected a shell command string")
        entry.halt_command = cmd
        entry.halt = "command"
    if "halt" in svc:
        halt = svc["halt"]
        if halt not in ("qmp", "command"):
            raise ConfigError(f"{path}: [service] key 'halt': must be \"qmp\" or \"command\", got {halt!r}")
        if halt == "command" and entry.halt_command is None:
            raise ConfigError(f"{path}: [service] key 'halt': \"command\" needs key 'halt_command'")
        entry.halt = halt
    if "halt_timeout" in svc:
        t = svc["halt_timeout"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 3600:
            raise ConfigError(f"{path}: [service] key 'halt_timeout': expected seconds in (0, 3600], got {t!r}")
        entry.halt_timeout = float(t)
    runas = svc.get("runas", data.get("runas"))
    if runas is not None:
        if not isinstance(runas, str) or not runas:
            raise ConfigError(f"{path}: key 'runas': expected a user name")
        entry.runas = runas
    _check_vm_config(path)
    return entry


def _check_vm_config(path: str) -> None:
    """The VM half of the file, checked by the run command's own parser so a bad
    key is reported before anything starts (not as one failed start among many)."""
    try:
        from .config import load_config
    except ImportError:
        return
    load_config(path)


def select_entries(config_dir: str, names: list[str]) -> list[VmEntry]:
    if not os.path.isdir(config_dir):
        raise ConfigError(f"{config_dir}: no such config directory (--config DIR)")
    toml_paths = sorted(glob.glob(os.path.join(glob.escape(config_dir), "*.toml")))
    qemu_entries = [e for p in sorted(glob.glob(os.path.join(glob.escape(config_dir), "*.conf")))
                    for e in load_qemu_conf(p)]
    qemu_entries += [load_qemu_d_file(p) for p in sorted(glob.glob(os.path.join(glob.escape(config_dir),
                                                                                  "qemu.d", "*")))
                     if os.path.isfile(p)]
    by_name: dict[str, VmEntry | str] = {}
    for path in toml_paths:
        by_name[os.path.splitext(os.path.basename(path))[0]] = path
    for entry in qemu_entries:
        if entry.name in by_name:
            other = by_name[entry.name]
            raise ConfigError(f"{entry.config}: key 'qemu_{entry.name}': VM '{entry.name}' is also defined in "
                              f"{other if isinstance(other, str) else other.config}")
        by_name[entry.name] = entry
    if names:
        chosen = []
        for name in names:
            if not NAME_RE.fullmatch(name):
                raise ConfigError(f"{name}: not a VM name")
            if name not in by_name:
                raise ConfigError(f"{os.path.join(config_dir, name + '.toml')}: no such file, and no "
                                  f"qemu_{name} in {config_dir}/*.conf (VM '{name}')")
            chosen.append(by_name[name])
    else:
        chosen = [*toml_paths, *qemu_entries]
    return [load_entry(c) if isinstance(c, str) else c for c in chosen]


# ------------------------------------------------------------------ qemu.conf
QEMU_KEY_RE = re.compile(r"qemu_([A-Za-z0-9_][A-Za-z0-9_.-]{0,63})")


def read_shell_assignments(path: str) -> list[tuple[str, str | list[str]]]:
    """``KEY="value"`` and ``KEY=(a b)`` lines as a shell reads them (quotes, backslash-
    newline, comments), without running anything: a value that would need expansion
    (``$``, backticks) is refused, naming the key."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1 << 20)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {(e.strerror if isinstance(e, OSError) else None) or e}") from None
    lexer = shlex.shlex(text.replace("\\\n", ""), posix=True, punctuation_chars="()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError as e:
        raise ConfigError(f"{path}: not shell assignments: {e}") from None
    out: list[tuple[str, str | list[str]]] = []
    i = 0
    while i < len(tokens):
        key, eq, value = tokens[i].partition("=")
        i += 1
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
            raise ConfigError(f"{path}: {tokens[i - 1]!r} is not an assignment KEY=\"value\"")
        if value == "" and i < len(tokens) and tokens[i] == "(":
            end = tokens.index(")", i) if ")" in tokens[i:] else -1
            if end < 0:
                raise ConfigError(f"{path}: key '{key}': array without ')'")
            out.append((key, tokens[i + 1:end]))
            i = end + 1
            continue
        if "$" in value or "`" in value:
            raise ConfigError(f"{path}: key '{key}': shell expansion ($, `) is not supported")
        out.append((key, value))
    return out


def load_qemu_conf(path: str) -> list[VmEntry]:
    """The VMs of an ArchWiki-style qemu.conf, in QEMU_MACHINES order (else file order)."""
    lines: dict[str, str] = {}
    extras: dict[tuple[str, str], str] = {}
    machines: list[str] | None = None
    assignments = read_shell_assignments(path)
    keys = {k for k, _ in assignments}
    for key, value in assignments:
        if key == "QEMU_MACHINES":
            machines = value if isinstance(value, list) else value.split()
            continue
        m = QEMU_KEY_RE.fullmatch(key)
        if m is None or isinstance(value, list):
            raise ConfigError(f"{path}: unknown key '{key}' (known: QEMU_MACHINES, qemu_NAME, qemu_NAME_type, "
                              "qemu_NAME_haltcmd)")
        name = m.group(1)
        for suffix in ("_type", "_haltcmd"):
            if name.endswith(suffix) and f"qemu_{name[:-len(suffix)]}" in keys:
                extras[(name[:-len(suffix)], suffix[1:])] = value
                break
        else:
            lines[name] = value
    order = list(lines)
    disabled: set[str] = set()
    if machines is not None:
        order = []
        for item in machines:
            name = item[1:] if item.startswith("!") else item
            if name not in lines:
                raise ConfigError(f"{path}: key 'QEMU_MACHINES': no qemu_{name} line for {item!r}")
            if item.startswith("!"):
                disabled.add(name)
            order.append(name)
        order += [n for n in lines if n not in order]
    return [_qemu_entry(path, name, lines[name], extras.get((name, "type")), extras.get((name, "haltcmd")),
                        name not in disabled, f"{path}: key 'qemu_{name}'") for name in order]


QEMU_D_KEYS = {"type", "args", "haltcmd"}


def load_qemu_d_file(path: str) -> VmEntry:
    """The page's systemd form: DIR/qemu.d/NAME holding type=, args="QEMU command line"
    and haltcmd= (what the qemu@NAME unit reads)."""
    name = os.path.basename(path)
    values: dict[str, str] = {}
    for key, value in read_shell_assignments(path):
        if key not in QEMU_D_KEYS or isinstance(value, list):
            raise ConfigError(f"{path}: unknown key '{key}' (known: {', '.join(sorted(QEMU_D_KEYS))})")
        values[key] = value
    if "args" not in values:
        raise ConfigError(f"{path}: missing key 'args' (the QEMU command line)")
    return _qemu_entry(path, name, values["args"], values.get("type"), values.get("haltcmd"), True,
                       f"{path}: key 'args'")


def _qemu_entry(path: str, name: str, line: str, vm_type: str | None, haltcmd: str | None, enabled: bool,
                where: str) -> VmEntry:
    from .qemu_cli import config_from_qemu_args
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}: VM name {name!r} must be letters, digits, '.', '_', '-'")
    if vm_type is not None and vm_type != "system-x86_64":
        raise ConfigError(f"{where}: kvmpy is system-x86_64 only, got type {vm_type!r}")
    try:
        args = shlex.split(line)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    try:
        config_from_qemu_args(args)
    except UserError as e:
        raise ConfigError(f"{where}: {e}") from None
    entry = VmEntry(name=name, config=os.path.abspath(path), enabled=enabled, qemu_args=args)
    if haltcmd is not None:
        if not haltcmd.strip():
            raise ConfigError(f"{where}: an empty haltcmd")
        entry.halt, entry.halt_command = "command", haltcmd
    return entry


# ------------------------------------------------------------- processes

def running_pid(entry: VmEntry, run_dir: str) -> int | None:
    """The VM's pid if its pidfile names a live kvmpy process."""
    try:
        pid = read_pidfile(entry.pidfile(run_dir))
    except UserError:
        return None
    if pid is None or not pid_alive(pid) or not _is_kvmpy(pid):
        return None
    return pid


def _is_kvmpy(pid: int) -> bool:
    # A stale pidfile's pid may belong to someone else by now: never signal that.
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"kvmpy" in f.read()
    except OSError:
        return False


def _clean_stale(entry: VmEntry, run_dir: str) -> None:
    for path in (entry.pidfile(run_dir), entry.qmp_path(run_dir)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            pass


def format_uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def _qmp(entry: VmEntry, run_dir: str, command: str, timeout: float = QMP_TIMEOUT):
    """Run one QMP command with the official client; returns its result.
    Raises ConnectionError on any failure, including a VMM that accepts the
    connection but never answers (stopped or wedged) within ``timeout``."""
    import asyncio
    from qemu.qmp import QMPClient

    async def go():
        client = QMPClient(entry.name)
        try:
            await client.connect(entry.qmp_path(run_dir))
            return await client.execute(command)
        finally:
            try:
                await client.disconnect()
            except Exception:
                pass

    try:
        return asyncio.run(asyncio.wait_for(go(), timeout))
    except asyncio.TimeoutError:
        raise ConnectionError(f"no QMP answer within {timeout:g} s") from None
    except Exception as e:
        raise ConnectionError(f"{type(e).__name__}: {e}") from None


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def run_argv(entry: VmEntry, run_dir: str, python: str | None = None) -> list[str]:
    if entry.qemu_args is not None:
        # The service's own options last: QEMU's last -pidfile/-name wins, so status
        # and stop find the VM where they look for it.
        argv = [python or sys.executable, "-m", "kvmpy", "run", *entry.qemu_args,
                "-name", entry.name, "-pidfile", entry.pidfile(run_dir), "-daemonize",
                "-qmp", f"unix:{entry.qmp_path(run_dir)},server,nowait"]
        if entry.runas:
            argv += ["-runas", entry.runas]
        return argv
    argv = [python or sys.executable, "-m", "kvmpy", "run", "--daemonize",
            "--pidfile", entry.pidfile(run_dir),
            "--qmp", f"unix:{entry.qmp_path(run_dir)}",
            "--name", entry.name]
    if entry.runas:
        argv += ["--runas", entry.runas]
    argv.append(entry.config)
    return argv


def _child_env() -> dict:
    # `python3 -m kvmpy` must find this kvmpy even when it is not installed.
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def start_one(entry: VmEntry, run_dir: str) -> tuple[bool, str]:
    pid = running_pid(entry, run_dir)
    if pid:
        return True, f"{entry.name}: already running (pid {pid})"
    _clean_stale(entry, run_dir)
    try:
        r = subprocess.run(run_argv(entry, run_dir), cwd=os.path.dirname(entry.config),
                           env=_child_env(), stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        return False, f"{entry.name}: failed: no answer from kvmpy run within {START_TIMEOUT:.0f} s"
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        why = lines[-1] if lines else f"kvmpy run exited with status {r.returncode}"
        return False, f"{entry.name}: failed (status {r.returncode}): {why}"
    pid = read_pidfile(entry.pidfile(run_dir))
    return True, f"{entry.name}: started (pid {pid if pid else '?'})"


def stop_one(entry: VmEntry, run_dir: str) -> tuple[bool, str]:
    pid = running_pid(entry, run_dir)
    if pid is None:
        _clean_stale(entry, run_dir)
        return True, f"{entry.name}: not running"
    t0 = time.monotonic()
    how = "powerdown" if entry.halt == "qmp" else "halt_command"
    halt_note = ""
    try:
        if entry.halt == "qmp":
            _qmp(entry, run_dir, "system_powerdown")
        else:
            env = dict(os.environ, KVMPY_NAME=entry.name, KVMPY_PID=str(pid),
                       KVMPY_QMP=entry.qmp_path(run_dir))
            r = subprocess.run(["/bin/sh", "-c", entry.halt_command], env=env,
                               stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=entry.halt_timeout)
            if r.returncode != 0:
                halt_note = f", halt_command exited {r.returncode}"
    except subprocess.TimeoutExpired:
        halt_note = ", halt_command timed out"
    except (ConnectionError, OSError) as e:
        halt_note = f", powerdown failed: {e}"
    remaining = max(0.0, entry.halt_timeout - (time.monotonic() - t0))
    if _wait_gone(pid, remaining):
        _clean_stale(entry, run_dir)
        return True, f"{entry.name}: stopped ({how}, {time.monotonic() - t0:.1f} s{halt_note})"
    quit_note = ""
    try:
        _qmp(entry, run_dir, "quit")
    except (ConnectionError, OSError) as e:
        quit_note = f", quit failed: {e}"
    if _wait_gone(pid, 0.5 if quit_note else QUIT_TIMEOUT):
        _clean_stale(entry, run_dir)
        return True, (f"{entry.name}: stopped (quit after {entry.halt_timeout:g} s {how} "
                      f"timeout{halt_note})")
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass
    _wait_gone(pid, 5.0)
    _clean_stale(entry, run_dir)
    return True, (f"{entry.name}: killed (SIGKILL: no exit after {how} and quit"
                  f"{halt_note}{quit_note})")


def status_line(entry: VmEntry, run_dir: str) -> tuple[bool, str]:
    pid = running_pid(entry, run_dir)
    if pid is None:
        state = "stopped" if entry.enabled else "stopped (disabled)"
        return False, f"{entry.name:<16} {'-':>8}  {state:<14} -"
    try:
        state = _qmp(entry, run_dir, "query-status", timeout=2.0)["status"]
    except (ConnectionError, OSError, TypeError, KeyError):
        state = "unknown"
    return True, f"{entry.name:<16} {pid:>8}  {state:<14} {format_uptime(process_age_seconds(pid))}"


# ----------------------------------------------------------- systemd unit

def _systemd_quote(arg: str) -> str:
    # systemd splits like a shell and expands %-specifiers: escape both.
    arg = arg.replace("%", "%%")
    if re.fullmatch(r"[A-Za-z0-9_./:=@+-]+", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_text(entry: VmEntry, config_dir: str, run_dir: str) -> str:
    python = sys.executable
    start = " ".join(_systemd_quote(a) for a in run_argv(entry, run_dir, python))
    stop = " ".join(_systemd_quote(a) for a in [
        python, "-m", "kvmpy", "service", "stop", "--config", os.path.abspath(config_dir),
        "--run-dir", run_dir, entry.name])
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lines = [
        "# Written by `kvmpy service install`; edit the vm.toml, then install again.",
        "[Unit]",
        f"Description=kvmpy virtual machine {entry.name}",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=forking",
        f"PIDFile={_systemd_quote(entry.pidfile(run_dir))}",
        f"WorkingDirectory={_systemd_quote(os.path.dirname(entry.config))}",
        f"Environment={_systemd_quote('PYTHONPATH=' + pkg_root)}",
        f"ExecStartPre=/bin/mkdir -p {_systemd_quote(run_dir)}",
        f"ExecStart={start}",
        f"ExecStop={stop}",
        # ExecStop waits halt_timeout, then QMP quit (5 s), then SIGKILL.
        f"TimeoutStopSec={int(entry.halt_timeout + QUIT_TIMEOUT + 15)}",
        "KillMode=mixed",
        "Restart=no",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def install_one(entry: VmEntry, config_dir: str, run_dir: str, unit_dir: str) -> tuple[bool, str]:
    os.makedirs(unit_dir, exist_ok=True)
    path = os.path.join(unit_dir, f"kvmpy-{entry.name}.service")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(unit_text(entry, config_dir, run_dir))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True, (f"{entry.name}: wrote {path} (then: systemctl daemon-reload && "
                  f"systemctl enable --now kvmpy-{entry.name})")


# --------------------------------------------------------------- commands

def _print(line: str, lock=threading.Lock()) -> None:
    with lock:
        print(line, flush=True)


def _in_parallel(entries: list[VmEntry], fn) -> bool:
    """Run fn on every entry at once (stopping 20 VMs must not take 20 timeouts);
    print each result line as it comes."""
    ok = [True] * len(entries)

    def work(i: int, e: VmEntry) -> None:
        try:
            good, line = fn(e)
        except UserError as err:
            good, line = False, f"{e.name}: failed: {err}"
        except Exception as err:      # one VM's trouble must not hide the others' results
            good, line = False, f"{e.name}: failed: {type(err).__name__}: {err}"
        ok[i] = good
        _print(line)

    threads = [NamedThread(target=work, args=(i, e), name=f"service-{e.name}")
               for i, e in enumerate(entries)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return all(ok)


def _ensure_run_dir(run_dir: str) -> None:
    try:
        os.makedirs(run_dir, mode=0o755, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--run-dir {run_dir}: {e.strerror}") from None


def cmd_start(args) -> int:
    entries = select_entries(args.config, args.names)
    _ensure_run_dir(args.run_dir)
    todo = []
    for e in entries:
        if not e.enabled and not args.names:
            _print(f"{e.name}: skipped (enabled = false)")
        else:
            todo.append(e)
    # Started one after another: each start opens taps and images as root and
    # waits for "running"; failures are easier to read in order.
    ok = True
    for e in todo:
        good, line = start_one(e, args.run_dir)
        ok &= good
        _print(line)
    return 0 if ok else 1


def cmd_stop(args) -> int:
    entries = select_entries(args.config, args.names)
    return 0 if _in_parallel(entries, lambda e: stop_one(e, args.run_dir)) else 1


def cmd_restart(args) -> int:
    status = cmd_stop(args)
    return cmd_start(args) or status


def cmd_status(args) -> int:
    entries = select_entries(args.config, args.names)
    _print(f"{'NAME':<16} {'PID':>8}  {'STATE':<14} UPTIME")
    all_running = True
    for e in entries:
        running, line = status_line(e, args.run_dir)
        all_running &= running
        _print(line)
    return 0 if all_running else 3       # like systemctl/LSB: 3 = not running


def cmd_install(args) -> int:
    if not args.names:
        raise ConfigError("service install: name the VM(s) to install")
    entries = select_entries(args.config, args.names)
    for e in entries:
        _print(install_one(e, args.config, args.run_dir, args.unit_dir)[1])
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("service", help="start/stop the VMs configured in a directory",
                              description="Manage the VMs described by DIR/*.toml.")
    p.add_argument("action", choices=("start", "stop", "restart", "status", "install"))
    p.add_argument("names", nargs="*", metavar="NAME", help="VMs (default: all in --config)")
    p.add_argument("--config", default=DEFAULT_CONFIG_DIR, metavar="DIR",
                   help=f"directory of NAME.toml files (default {DEFAULT_CONFIG_DIR})")
    p.add_argument("--run-dir", default=DEFAULT_RUN_DIR, metavar="DIR",
                   help=f"pidfiles and QMP sockets (default {DEFAULT_RUN_DIR})")
    p.add_argument("--unit-dir", default=DEFAULT_UNIT_DIR, metavar="DIR",
                   help=f"where install writes systemd units (default {DEFAULT_UNIT_DIR})")
    p.set_defaults(func=run_service)


def run_service(args: argparse.Namespace) -> int:
    args.run_dir = os.path.abspath(args.run_dir)
    args.config = os.path.abspath(args.config)
    return {"start": cmd_start, "stop": cmd_stop, "restart": cmd_restart,
            "status": cmd_status, "install": cmd_install}[args.action](args)
