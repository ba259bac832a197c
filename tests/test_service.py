"""kvmpy service: config checking, unit files, and stop/status against real processes.

Two kinds of VM processes are used:
  * toy VM daemons: real processes serving real QMP (kvmpy.monitor) over a
    StateVm, with a real pidfile and signal handling; they exercise every halt
    path (guest honours powerdown / ignores it / process hangs) without KVM;
  * real `python3 -m kvmpy run` VMs on KVM with the test guests, end to end;
    skipped with the reason while `kvmpy run` or /dev/kvm cannot run them.
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kvmpy.service import load_entry, run_argv, select_entries, format_uptime
from kvmpy.procfs import process_age_seconds
from kvmpy.errors import ConfigError
from kvmpy.lifecycle import pid_alive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUESTS = os.path.join(ROOT, "tests", "guests", "build")


def kvmpy(*args, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmpy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **kw)


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def dirs(tmp_path):
    conf = tmp_path / "etc"
    run = tmp_path / "run"
    conf.mkdir()
    return conf, run


# ------------------------------------------------------------ config errors

@pytest.mark.parametrize("body,needle", [
    ("kernel = 'x'\n[service\n", "not valid TOML"),
    ("kernel = 'x'\n[service]\nhalt = 'acpi'\n", "key 'halt'"),
    ("kernel = 'x'\n[service]\nhalt_timeout = 'soon'\n", "key 'halt_timeout'"),
    ("kernel = 'x'\n[service]\nhalt_timeout = -1\n", "key 'halt_timeout'"),
    ("kernel = 'x'\n[service]\nhalt = 'command'\n", "key 'halt'"),
    ("kernel = 'x'\n[service]\nhalt_command = ''\n", "key 'halt_command'"),
    ("kernel = 'x'\n[service]\nstop = 'now'\n", "unknown key 'stop'"),
    ("kernel = 'x'\nenabled = 'no'\n", "key 'enabled'"),
    ("kernel = 'x'\nservice = 3\n", "key 'service'"),
])
def test_bad_config_is_one_line_naming_file_and_key(dirs, body, needle):
    conf, run = dirs
    write(conf / "good.toml", "kernel = 'x'\n")
    bad = conf / "bad.toml"
    bad.write_text(body)
    for action in ("start", "stop", "status"):
        r = kvmpy("service", action, "--config", str(conf), "--run-dir", str(run))
        assert r.returncode == 2, (action, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert str(bad) in lines[0] and needle in lines[0]
        assert r.stdout == ""          # nothing was started or stopped


def test_unknown_name_and_missing_dir(dirs):
    conf, run = dirs
    r = kvmpy("service", "start", "nosuch", "--config", str(conf), "--run-dir", str(run))
    assert r.returncode == 2 and "nosuch.toml: no such file" in r.stderr
    r = kvmpy("service", "status", "--config", str(conf / "nope"), "--run-dir", str(run))
    assert r.returncode == 2 and "no such config directory" in r.stderr


def test_service_table_parsing(dirs):
    conf, _ = dirs
    e = load_entry(str(write(conf / "a.toml", """
        kernel = "k"
        enabled = false
        [service]
        halt_command = "ssh a poweroff"
        halt_timeout = 2.5
        runas = "nobody"
    """)))
    assert (e.name, e.enabled, e.halt, e.halt_command, e.halt_timeout, e.runas) == \
        ("a", False, "command", "ssh a poweroff", 2.5, "nobody")
    d = load_entry(str(write(conf / "b.toml", "kernel = 'k'\n")))
    assert (d.halt, d.halt_timeout, d.enabled) == ("qmp", 30.0, True)
    assert [x.name for x in select_entries(str(conf), [])] == ["a", "b"]
    with pytest.raises(ConfigError):
        select_entries(str(conf), ["../etc/a"])


def test_run_argv_is_the_documented_command(dirs):
    conf, run = dirs
    e = load_entry(str(write(conf / "web.toml", "kernel = 'k'\n[service]\nrunas = 'kvm'\n")))
    assert run_argv(e, "/run/kvmpy") == [
        sys.executable, "-m", "kvmpy", "run", "--daemonize", "--pidfile", "/run/kvmpy/web.pid",
        "--qmp", "unix:/run/kvmpy/web.qmp", "--name", "web", "--runas", "kvm", str(conf / "web.toml")]


def test_install_writes_a_systemd_unit(dirs, tmp_path):
    conf, run = dirs
    write(conf / "web 1%.toml".replace(" 1%", "1"), "kernel = 'k'\n[service]\nhalt_timeout = 7\n")
    units = tmp_path / "units"
    r = kvmpy("service", "install", "web1", "--config", str(conf), "--run-dir", str(run),
              "--unit-dir", str(units))
    assert r.returncode == 0, r.stderr
    unit = units / "kvmpy-web1.service"
    assert str(unit) in r.stdout
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.read_string(unit.read_text())
    svc = cp["Service"]
    assert svc["Type"] == "forking"
    assert svc["PIDFile"] == f"{run}/web1.pid"
    start = shlex.split(svc["ExecStart"])
    assert start[1:] == ["-m", "kvmpy", "run", "--daemonize", "--pidfile", f"{run}/web1.pid",
                         "--qmp", f"unix:{run}/web1.qmp", "--name", "web1", str(conf / "web1.toml")]
    stop = shlex.split(svc["ExecStop"])
    assert stop[1:5] == ["-m", "kvmpy", "service", "stop"] and stop[-1] == "web1"
    assert int(svc["TimeoutStopSec"]) > 7
    assert cp["Install"]["WantedBy"] == "multi-user.target"
    analyze = shutil.which("systemd-analyze")
    if analyze:
        v = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
        assert "Invalid" not in v.stderr and "Unknown" not in v.stderr, v.stderr
    r = kvmpy("service", "install", "--config", str(conf), "--unit-dir", str(units))
    assert r.returncode == 2


def test_uptime_of_this_process():
    up = process_age_seconds(os.getpid())
    assert up is not None and 0 <= up < 24 * 3600 * 365
    assert format_uptime(3723) == "01:02:03" and format_uptime(90061) == "1d 01:01:01"
    assert format_uptime(None) == "-"


# ----------------------------------------------------------- toy VM daemons

TOY = r'''
import os, sys, time, signal
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
from test_qmp_statevm import StateVm
from kvmpy.lifecycle import Pidfile, SignalActions, daemonize
from kvmpy.monitor import start_servers
name, run_dir, mode = sys.argv[2], sys.argv[3], sys.argv[4]

def start(notify_running):
    pidfile = Pidfile(f"{run_dir}/{name}.pid")
    vm = StateVm(name=name, handles_acpi=(mode == "acpi"))
    servers = start_servers(vm, [f"unix:{run_dir}/{name}.qmp"], [])
    actions = SignalActions(vm, powerdown_timeout=60).install()
    notify_running()
    while not vm.quit_called.is_set() and vm.status() != "shutdown":
        time.sleep(0.02)
    for s in servers:
        s.close()
    actions.close()
    vm.close()
    pidfile.remove()
    return 0

sys.exit(daemonize(start))
'''


@pytest.fixture
def toy(dirs, tmp_path):
    """Start toy VM daemons named like kvmpy processes (the service checks cmdline)."""
    conf, run = dirs
    run.mkdir(exist_ok=True)
    script = tmp_path / "kvmpy-toyvm.py"
    script.write_text(TOY)
    started = []

    def launch(name, mode, service=""):
        write(conf / f"{name}.toml", f"kernel = 'unused'\n{service}")
        r = subprocess.run([sys.executable, str(script), ROOT, name, str(run), mode],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        pid = int((run / f"{name}.pid").read_text())
        started.append(pid)
        return pid

    yield launch
    for pid in started:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_stop_each_halt_path_reports_one_line(toy, dirs):
    conf, run = dirs
    p_acpi = toy("honours", "acpi")
    p_ignore = toy("ignores", "ignore", "[service]\nhalt_timeout = 1.5\n")
    p_hang = toy("hangs", "ignore", "[service]\nhalt_command = 'kill -STOP $KVMPY_PID'\nhalt_timeout = 1\n")
    p_cmd = toy("bycommand", "ignore", "[service]\nhalt_command = 'kill -INT $KVMPY_PID'\n")
    r = kvmpy("service", "status", "--config", str(conf), "--run-dir", str(run))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines()[1:]}
    assert rows["honours"][1:3] == [str(p_acpi), "running"]
    assert rows["hangs"][1] == str(p_hang)
    t0 = time.monotonic()
    r = kvmpy("service", "stop", "--config", str(conf), "--run-dir", str(run))
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    lines = {ln.split(":")[0]: ln for ln in r.stdout.splitlines()}
    assert len(r.stdout.splitlines()) == 4
    assert lines["honours"].startswith("honours: stopped (powerdown,")
    assert lines["ignores"].startswith("ignores: stopped (quit after 1.5 s powerdown timeout")
    assert lines["bycommand"].startswith("bycommand: stopped (halt_command,")
    assert lines["hangs"].startswith("hangs: killed (SIGKILL")
    assert elapsed < 20          # in parallel, not one timeout after another
    for pid in (p_acpi, p_ignore, p_hang, p_cmd):
        assert not pid_alive(pid)
    assert not list(run.glob("*.pid")) and not list(run.glob("*.qmp"))
    r = kvmpy("service", "status", "--config", str(conf), "--run-dir", str(run))
    assert r.returncode == 3
    assert all(ln.split()[2] == "stopped" for ln in r.stdout.splitlines()[1:])


def test_stale_pidfiles_are_not_trusted(dirs):
    conf, run = dirs
    run.mkdir()
    write(conf / "old.toml", "kernel = 'k'\n")
    write(conf / "other.toml", "kernel = 'k'\n")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run / "old.pid").write_text(f"{dead.pid}\n")
    stranger = subprocess.Popen(["sleep", "30"])        # alive, but not a kvmpy
    try:
        (run / "other.pid").write_text(f"{stranger.pid}\n")
        r = kvmpy("service", "stop", "--config", str(conf), "--run-dir", str(run))
        assert sorted(r.stdout.splitlines()) == ["old: not running", "other: not running"]
        assert stranger.poll() is None
        assert not (run / "old.pid").exists()
    finally:
        stranger.kill()
        stranger.wait()


# ------------------------------------------------- real VMs (kvmpy run, KVM)

@pytest.fixture(scope="module")
def real_vms():
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is missing: service end-to-end needs KVM")
    guest = os.path.join(GUESTS, "irq.elf")
    if not os.path.exists(guest):
        pytest.skip(f"{guest} not built (make -C tests/guests)")
    help_text = kvmpy("run", "--help").stdout
    missing = [o for o in ("--daemonize", "--pidfile", "--qmp", "--name") if o not in help_text]
    if missing:
        pytest.skip(f"`kvmpy run` lacks {', '.join(missing)}")
    probe = kvmpy("run", "--enable-kvm", "--serial", "none", "--kernel",
                  os.path.join(GUESTS, "exit.elf"), timeout=60)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["(no message)"])[-1]
        pytest.skip(f"`kvmpy run` cannot run exit.elf yet: {last}")
    return guest


def test_three_real_vms_start_status_stop(real_vms, dirs):
    conf, run = dirs
    common = f'kernel = "{real_vms}"\naccel = "kvm"\nmemory = "64M"\n'
    write(conf / "alpha.toml", common + 'serial = "file:{}/alpha.log"\n'.format(run)
          + "[service]\nhalt_command = 'kill -INT $KVMPY_PID'\nhalt_timeout = 5\n")
    # irq.elf sits in hlt waiting for serial input: it ignores the power button.
    write(conf / "beta.toml", common + 'serial = "none"\n[service]\nhalt_timeout = 2\n')
    write(conf / "gamma.toml", common + 'serial = "none"\n'
          + "[service]\nhalt_command = 'kill -STOP $KVMPY_PID'\nhalt_timeout = 2\n")
    write(conf / "delta.toml", common + "enabled = false\n")
    try:
        r = kvmpy("service", "start", "--config", str(conf), "--run-dir", str(run))
        assert r.returncode == 0, r.stdout + r.stderr
        out = r.stdout.splitlines()
        assert "delta: skipped (enabled = false)" in out
        for name in ("alpha", "beta", "gamma"):
            assert any(ln.startswith(f"{name}: started (pid ") for ln in out), out
        r = kvmpy("service", "start", "alpha", "--config", str(conf), "--run-dir", str(run))
        assert r.stdout.startswith("alpha: already running")
        time.sleep(1.2)
        r = kvmpy("service", "status", "alpha", "beta", "gamma", "--config", str(conf),
                  "--run-dir", str(run))
        assert r.returncode == 0, r.stdout + r.stderr
        rows = [ln.split() for ln in r.stdout.splitlines()[1:]]
        assert [row[2] for row in rows] == ["running"] * 3
        assert all(row[3] >= "00:00:01" for row in rows)
        deadline = time.monotonic() + 10
        while "irq: ready" not in (run / "alpha.log").read_text(errors="replace"):
            assert time.monotonic() < deadline, "guest never printed 'irq: ready'"
            time.sleep(0.1)
        r = kvmpy("service", "stop", "--config", str(conf), "--run-dir", str(run))
        assert r.returncode == 0, r.stderr
        lines = {ln.split(":")[0]: ln for ln in r.stdout.splitlines()}
        assert lines["alpha"].startswith("alpha: stopped (halt_command,")
        assert lines["beta"].startswith("beta: stopped (quit after 2 s powerdown timeout")
        assert lines["gamma"].startswith("gamma: killed (SIGKILL")
        assert lines["delta"] == "delta: not running"
        assert not list(run.glob("*.pid"))
    finally:
        for pidfile in run.glob("*.pid"):
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (ValueError, OSError):
                pass
