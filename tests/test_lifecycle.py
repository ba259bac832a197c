"""Pidfile, daemonize, drop_privileges and signal actions, with real processes."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from kvmpy.errors import UserError
from kvmpy.lifecycle import Pidfile, PidfileError, SignalActions, drop_privileges, pid_alive

from test_qmp_statevm import StateVm
from support.polling import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(code: str, *args, timeout=20, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, **kw)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------ pidfile

def test_pidfile_created_with_our_pid_and_removed(tmp_path):
    path = tmp_path / "vm.pid"
    with Pidfile(str(path)) as pf:
        assert path.read_text() == f"{os.getpid()}\n"
        assert pf.pid == os.getpid()
    assert not path.exists()


def test_live_holder_refuses_second_process(tmp_path):
    path = tmp_path / "vm.pid"
    with Pidfile(str(path)):
        r = run_py("""
            import sys
            from kvmpy.lifecycle import Pidfile
            from kvmpy.errors import UserError
            try:
                Pidfile(sys.argv[1]).acquire()
            except UserError as e:
                print(e); sys.exit(2)
        """, str(path))
        assert r.returncode == 2, r.stderr
        assert f"already in use by running process {os.getpid()}" in r.stdout
        assert path.read_text() == f"{os.getpid()}\n"


def test_live_pid_without_lock_refuses(tmp_path):
    path = tmp_path / "vm.pid"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        path.write_text(f"{sleeper.pid}\n")
        with pytest.raises(PidfileError, match=str(sleeper.pid)):
            Pidfile(str(path)).acquire()
        assert path.read_text() == f"{sleeper.pid}\n"
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("content", ["{dead}\n", "garbage", "", "-5\n"])
def test_stale_pidfile_is_replaced(tmp_path, content):
    path = tmp_path / "vm.pid"
    path.write_text(content.format(dead=dead_pid()))
    with Pidfile(str(path)):
        assert path.read_text() == f"{os.getpid()}\n"
    assert not path.exists()


def test_pidfile_removed_at_normal_exit_and_left_by_sigkill(tmp_path):
    path = tmp_path / "vm.pid"
    r = run_py("""
        import sys
        from kvmpy.lifecycle import Pidfile
        Pidfile(sys.argv[1]).acquire()
        print(open(sys.argv[1]).read().strip())
    """, str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().isdigit()
    assert not path.exists()
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from kvmpy.lifecycle import Pidfile
        Pidfile(sys.argv[1]).acquire(); print("ok", flush=True); time.sleep(60)
    """), str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ok\n"
    p.kill()
    p.wait()
    assert path.read_text() == f"{p.pid}\n"       # stale now
    with Pidfile(str(path)):
        assert path.read_text() == f"{os.getpid()}\n"


def test_racing_processes_on_a_stale_pidfile_one_wins(tmp_path):
    path = tmp_path / "vm.pid"
    path.write_text(f"{dead_pid()}\n")
    code = """
        import sys, time
        from kvmpy.lifecycle import Pidfile
        from kvmpy.errors import UserError
        t = float(sys.argv[2])
        while time.time() < t: pass
        try:
            Pidfile(sys.argv[1]).acquire()
        except UserError:
            sys.exit(2)
        print("won", flush=True)
        time.sleep(2)
    """
    start_at = str(time.time() + 1.0)
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(path), start_at],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    results = [(p.wait(timeout=20), p.stdout.read()) for p in procs]
    winners = [r for r in results if r[1] == "won\n"]
    assert len(winners) == 1, results
    assert sorted(rc for rc, _ in results) == [0] + [2] * 5


# ---------------------------------------------------------------- daemonize

DAEMON = """
    import os, sys, time
    from kvmpy.lifecycle import daemonize, Pidfile
    from kvmpy.errors import UserError
    mode, marker = sys.argv[1], sys.argv[2]
    def start():
        if mode == "usererror":
            raise UserError("vm.toml: key 'memory' must be like 512M")
        if mode == "crash":
            raise RuntimeError("boom")
        if mode == "die":
            os._exit(7)
        Pidfile(marker + ".pid").acquire()
        print("starting", flush=True)      # still on the caller's stdout
        return "vm"
    vm = daemonize(start)
    print("detached output", flush=True)    # must not reach the caller
    with open(marker, "w") as f:
        f.write(f"{os.getpid()} {os.getsid(0)} {vm} {os.getcwd()}\\n")
    time.sleep(30)
"""


def test_daemonize_parent_exits_after_child_is_running(tmp_path):
    marker = str(tmp_path / "marker")
    t0 = time.monotonic()
    r = run_py(DAEMON, "ok", marker)     # capture_output: returns only if stdio is released
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 10
    assert r.stdout == "starting\n"
    assert wait_for(lambda: os.path.exists(marker) and open(marker).read().endswith("\n"))
    pid, sid, vm, cwd = open(marker).read().split()
    pid = int(pid)
    try:
        assert pid_alive(pid)
        assert int(sid) == pid          # its own session
        assert vm == "vm" and cwd == "/"
        assert open(marker + ".pid").read() == f"{pid}\n"
    finally:
        os.kill(pid, signal.SIGINT)      # KeyboardInterrupt: a normal exit, atexit runs
    assert wait_for(lambda: not pid_alive(pid))
    assert not os.path.exists(marker + ".pid")


@pytest.mark.parametrize("mode,status,message", [
    ("usererror", 2, "kvmpy: vm.toml: key 'memory' must be like 512M"),
    ("crash", 1, "kvmpy: startup failed: RuntimeError: boom"),
    ("die", 7, "kvmpy: VM process exited during startup (status 7)"),
])
def test_daemonize_reports_startup_failure(tmp_path, mode, status, message):
    r = run_py(DAEMON, mode, str(tmp_path / "marker"))
    assert r.returncode == status
    assert message in r.stderr.splitlines()
    assert not (tmp_path / "marker").exists()


def test_daemonize_with_notify_running_callback(tmp_path):
    """The run command's shape: start(notify_running) runs the whole VM."""
    marker = tmp_path / "m"
    r = run_py("""
        import os, sys, time
        from kvmpy.lifecycle import daemonize
        def start(notify_running):
            notify_running()
            print("after notify: detached", flush=True)
            open(sys.argv[1], "w").write(str(os.getpid()))
            time.sleep(0.5)
            return 5
        status = daemonize(start)
        open(sys.argv[1] + ".status", "w").write(str(status))
    """, str(marker))
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert wait_for(lambda: os.path.exists(str(marker) + ".status"))
    assert open(str(marker) + ".status").read() == "5"
    r = run_py("""
        from kvmpy.lifecycle import daemonize
        daemonize(lambda notify_running: 3)     # ended before it ever ran
    """)
    assert r.returncode == 3 and "VM stopped during startup (status 3)" in r.stderr


def test_daemonize_refuses_with_threads_running():
    r = run_py("""
        import threading, time
        from kvmpy.lifecycle import daemonize
        threading.Thread(target=time.sleep, args=(2,), daemon=True).start()
        try:
            daemonize(lambda: None)
        except RuntimeError as e:
            print(e)
    """)
    assert "threads running" in r.stdout


# ---------------------------------------------------------- drop privileges

TEST_USER_PREFIX = "kvmpytest"


@pytest.fixture(scope="module")
def unprivileged_user():
    """A system user of this fixture's own: a shared fixed name let another test run
    on the machine (a second checkout, a second worker) delete it and make it again
    under another uid while this one used it."""
    if os.geteuid() != 0:
        pytest.skip("drop_privileges tests need root (to create and become a test user)")
    name = f"{TEST_USER_PREFIX}-{uuid.uuid4().hex[:8]}"
    r = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"useradd failed: {r.stderr.strip()}")
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def test_drop_privileges_to_a_real_user(unprivileged_user, tmp_path):
    secret = tmp_path / "root-only"
    secret.write_text("x")
    os.chmod(secret, 0o600)
    os.chmod(tmp_path, 0o755)
    r = run_py("""
        import os, sys
        from kvmpy.lifecycle import drop_privileges
        drop_privileges(sys.argv[1])
        print(os.getresuid(), os.getresgid(), os.getgroups())
        for attempt in (lambda: os.setuid(0), lambda: os.seteuid(0), lambda: os.setgid(0),
                        lambda: os.setgroups([0])):
            try:
                attempt()
                print("REGAINED"); sys.exit(1)
            except PermissionError:
                pass
        try:
            open(sys.argv[2]).read()
            print("READ SECRET"); sys.exit(1)
        except PermissionError:
            print("denied")
    """, unprivileged_user.pw_name, str(secret))
    u, g = unprivileged_user.pw_uid, unprivileged_user.pw_gid
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[0].startswith(f"({u}, {u}, {u}) ({g}, {g}, {g})")
    assert "0" not in r.stdout.splitlines()[0].split(")")[-1]    # no root group
    assert r.stdout.splitlines()[-1] == "denied"


def test_drop_privileges_applies_to_threads_started_before(unprivileged_user):
    r = run_py("""
        import os, sys, threading
        from kvmpy.lifecycle import drop_privileges
        seen = []
        go, done = threading.Event(), threading.Event()
        def vcpu():
            go.wait(); seen.append(os.getresuid()); done.set()
        threading.Thread(target=vcpu).start()
        drop_privileges(sys.argv[1])
        go.set(); done.wait()
        print(seen[0])
    """, unprivileged_user.pw_name)
    u = unprivileged_user.pw_uid
    assert r.stdout.strip() == f"({u}, {u}, {u})", r.stderr


def test_drop_privileges_bad_users():
    with pytest.raises(UserError, match="no such user"):
        drop_privileges("no-such-user-kvmpy")
    if os.geteuid() == 0:
        # Refused before anything changes: this test process stays root.
        with pytest.raises(UserError, match="root"):
            drop_privileges("root")
        assert os.getuid() == 0


# ------------------------------------------------------------------ signals

@pytest.fixture
def vm():
    machine = StateVm(handles_acpi=False)
    yield machine
    machine.close()


def test_sigterm_powers_down_then_quits_after_timeout(vm):
    events = []
    vm.add_event_listener(lambda e, d: events.append(e))
    handler_before = signal.getsignal(signal.SIGTERM)
    with SignalActions(vm, powerdown_timeout=0.5) as actions:
        t0 = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: "POWERDOWN" in events)
        assert not vm.quit_called.is_set()
        assert vm.quit_called.wait(5)
        assert time.monotonic() - t0 >= 0.45
        assert actions.quit_reason == "powerdown-timeout"
    assert signal.getsignal(signal.SIGTERM) is handler_before   # restored, whatever it was
    assert not [t for t in threading.enumerate() if t.name == "kvmpy-signals"]


def test_sigterm_the_kernel_gives_another_thread_still_powers_down(vm):
    # A VM's SIGTERM may land on a vCPU thread while the main thread sleeps in a wait
    # no signal interrupts; a Python-level handler would wait for that thread.
    powered = threading.Event()
    vm.add_event_listener(lambda e, d: e == "POWERDOWN" and powered.set())
    def vcpu_thread():
        time.sleep(0.3)         # the main thread is in powered.wait by now
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
    with SignalActions(vm, powerdown_timeout=30):
        other = threading.Thread(target=vcpu_thread)
        other.start()
        assert powered.wait(5)      # blocked in a lock: only the loop can have acted
        other.join()


def test_other_signals_on_the_wakeup_fd_do_nothing(vm):
    previous = signal.signal(signal.SIGUSR2, lambda *_: None)
    try:
        with SignalActions(vm, powerdown_timeout=30):
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.3)
            assert vm.calls == [] and not vm.quit_called.is_set()
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_second_sigterm_quits_at_once(vm):
    with SignalActions(vm, powerdown_timeout=30) as actions:
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: "powerdown" in vm.calls)
        os.kill(os.getpid(), signal.SIGTERM)
        assert vm.quit_called.wait(5)
        assert actions.quit_reason == "sigterm-again"


def test_sigint_quits(vm):
    old = signal.getsignal(signal.SIGINT)
    with SignalActions(vm) as actions:
        os.kill(os.getpid(), signal.SIGINT)
        assert vm.quit_called.wait(5)
        assert actions.quit_reason == "sigint"
        assert "powerdown" not in vm.calls
    assert signal.getsignal(signal.SIGINT) is old


def test_guest_that_honours_powerdown_is_not_quit_if_closed_in_time():
    machine = StateVm(handles_acpi=True)
    try:
        actions = SignalActions(machine, powerdown_timeout=1.0).install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: machine.status() == "shutdown")
        actions.close()          # the run command does this when the VM stops
        time.sleep(1.2)
        assert not machine.quit_called.is_set()
    finally:
        machine.close()


# --- files a --runas VM leaves behind (issue 15 item 5) -------------------------------------

def _kvmpy_run(args, **kw):
    from conftest import ROOT
    return subprocess.Popen([sys.executable, "-m", "kvmpy", "run", "--accel", "tcg", *args], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _runas_files(tmp_path):
    # tmp_path is root's and 0700: once the VM is nobody it may not unlink anything there.
    return tmp_path / "vm.pid", tmp_path / "qmp.sock", tmp_path / "hmp.sock"


@pytest.mark.guest
def test_runas_vm_removes_pidfile_and_monitor_sockets_at_exit(root_required, tmp_path):
    from conftest import guest_path
    pid, qmp, hmp = _runas_files(tmp_path)
    p = _kvmpy_run(["--runas", "nobody", "--pidfile", str(pid), "--qmp", f"unix:{qmp}",
                    "--monitor", f"unix:{hmp}", "--kernel", guest_path("exit"), "--append", "code=5"])
    out, err = p.communicate(timeout=60)
    assert p.returncode == 5, err.decode()
    assert b"Traceback" not in err
    assert [f for f in (pid, qmp, hmp) if f.exists()] == []


@pytest.mark.guest
def test_runas_vm_killed_still_leaves_nothing_and_sockets_are_0600(root_required, tmp_path):
    """SIGKILL gives the VM process no chance: the root helper sees its pipe close."""
    import stat
    from conftest import guest_path
    pid, qmp, hmp = _runas_files(tmp_path)
    p = _kvmpy_run(["--runas", "nobody", "--pidfile", str(pid), "--qmp", f"unix:{qmp}",
                    "--monitor", f"unix:{hmp}", "--kernel", guest_path("exitloop"),
                    "--append", "n=1000000000"])
    try:
        deadline = time.monotonic() + 30
        while not (pid.exists() and qmp.exists() and hmp.exists()) and time.monotonic() < deadline:
            assert p.poll() is None, p.stderr.read().decode()
            time.sleep(0.05)
        for sock in (qmp, hmp):
            assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
        time.sleep(0.3)     # past drop_privileges
        assert pwd.getpwuid(os.stat(f"/proc/{p.pid}").st_uid).pw_name == "nobody"
    finally:
        p.kill()
        p.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while any(f.exists() for f in (pid, qmp, hmp)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [f for f in (pid, qmp, hmp) if f.exists()] == []


@pytest.mark.guest
@pytest.mark.parametrize("host, warned", [("0.0.0.0", True), ("127.0.0.1", False)])
def test_monitor_beyond_loopback_warns(host, warned, tmp_path):
    from conftest import guest_path
    p = _kvmpy_run(["--qmp", f"tcp:{host}:0", "--monitor", f"unix:{tmp_path / 'h'}",
                    "--kernel", guest_path("exit"), "--append", "code=0"])
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err.decode()
    lines = [line for line in err.decode().splitlines() if "controls the VM" in line]
    assert len(lines) == (1 if warned else 0), err.decode()
    if warned:
        assert f"tcp:{host}:" in lines[0] and "anyone who can reach it" in lines[0]
