"""The VMM's seccomp sandbox (kvmpy/sandbox.py): the BPF program against the policy
it was made from, the filter in a real process (what it refuses, what kills), and
real VMs: a running VM is filtered, a plug-in that forks or execs from a device
kills it, while quit, SIGTERM, resets and the clean-up of its files still work.

Every other guest test module runs with the sandbox on too, since it is the default
(test_run_kvm, test_monitor_kvm, test_virtio_kvm, test_lifecycle, ...)."""

from __future__ import annotations

import errno
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, guest_path, run_kvmpy
from kvmpy import sandbox
from kvmpy.config import config_from_dict
from kvmpy.errors import ConfigError

FUZZ = 10 if os.environ.get("KVMPY_FUZZ") else 1
SIGSYS_STATUS = -signal.SIGSYS
UNISTD = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"


def _seccomp_reason() -> str | None:
    return sandbox.unavailable_reason()


SECCOMP_SKIP = _seccomp_reason()


@pytest.fixture
def seccomp_required():
    if SECCOMP_SKIP:
        pytest.skip(f"no seccomp sandbox here: {SECCOMP_SKIP}")


# --------------------------------------------------------------- the program

def run_bpf(prog, nr: int, arch: int = sandbox.AUDIT_ARCH_X86_64, args=(0,) * 6) -> int:
    """Classic BPF as the kernel runs a seccomp program, on one struct seccomp_data."""
    data = struct.pack("<iIQ6Q", nr, arch, 0x401000, *args)
    a, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == 0x20:                    # ld [k]
            a = struct.unpack_from("<I", data, k)[0]
        elif code == 0x54:                  # and #k
            a &= k
        elif code == 0x15:                  # jeq #k
            pc += jt if a == k else jf
        elif code == 0x35:                  # jge #k
            pc += jt if a >= k else jf
        elif code == 0x45:                  # jset #k
            pc += jt if a & k else jf
        elif code == 0x06:                  # ret #k
            return k
        else:
            raise AssertionError(f"opcode {code:#x} the test does not know")


def expected(rules, default: int, nr: int, arch: int, args) -> int:
    """What the policy says, read from the rules directly."""
    if arch != sandbox.AUDIT_ARCH_X86_64 or nr & 0xFFFFFFFF >= sandbox.X32_SYSCALL_BIT:
        return sandbox.SECCOMP_RET_KILL_PROCESS
    by_number = {sandbox.SYSCALLS[name]: rule for name, rule in rules.items()}
    rule = by_number.get(nr)
    if rule is None:
        return default
    if rule.allow:
        return sandbox.SECCOMP_RET_ALLOW
    for alternative in rule.when:
        if all(args[c.index] & c.mask & 0xFFFFFFFF == c.value for c in alternative):
            return sandbox.SECCOMP_RET_ALLOW
    return sandbox.SECCOMP_RET_ERRNO | rule.errno if rule.errno is not None else default


PID = 4242
RULES = sandbox.policy(PID)
KILL = sandbox.SECCOMP_RET_KILL_PROCESS
PROGRAM = sandbox.assemble(RULES, KILL)
AUDIT_PROGRAM = sandbox.assemble(RULES, sandbox.SECCOMP_RET_LOG)
NR = sandbox.SYSCALLS
ALLOW = sandbox.SECCOMP_RET_ALLOW


def test_syscall_numbers_are_x86_64s():
    if not os.path.exists(UNISTD):
        pytest.skip(f"{UNISTD} is missing (Debian: linux-libc-dev)")
    with open(UNISTD) as f:
        header = {m.group(1): int(m.group(2)) for m in re.finditer(r"#define __NR_(\w+) (\d+)", f.read())}
    assert {name: nr for name, nr in sandbox.SYSCALLS.items() if header.get(name) != nr} == {}


@pytest.mark.parametrize("nr, args, verdict", [
    (NR["ioctl"], (5, 0xAE80, 0, 0, 0, 0), ALLOW),                                  # KVM_RUN
    (NR["ioctl"], (5, 0xC008AE67, 0, 0, 0, 0), ALLOW),                              # KVM_IRQ_LINE_STATUS
    (NR["ioctl"], (0, 0x5401, 0, 0, 0, 0), ALLOW),                                  # TCGETS
    (NR["ioctl"], (0, 0x5412, 0, 0, 0, 0), KILL),                                   # TIOCSTI
    (NR["ioctl"], (0, (1 << 32) | 0x5412, 0, 0, 0, 0), KILL),
    (NR["clone"], (0x3D0F00, 0, 0, 0, 0, 0), ALLOW),                                # pthread_create
    (NR["clone"], (0x01200011, 0, 0, 0, 0, 0), KILL),                               # fork()
    (NR["clone"], (0x4111, 0, 0, 0, 0, 0), KILL),                                   # vfork-style spawn
    (NR["clone3"], (0,) * 6, sandbox.SECCOMP_RET_ERRNO | errno.ENOSYS),
    (NR["openat"], (0,) * 6, sandbox.SECCOMP_RET_ERRNO | errno.EACCES),
    (NR["newfstatat"], (3, 0, 0, 0x1000, 0, 0), ALLOW),                             # fstat(3)
    (NR["newfstatat"], (-100 & (2**64 - 1), 0, 0, 0x100, 0, 0), sandbox.SECCOMP_RET_ERRNO | errno.EACCES),
    (NR["tgkill"], (PID, PID + 1, 10, 0, 0, 0), ALLOW),
    (NR["tgkill"], (1, 1, 9, 0, 0, 0), KILL),
    (NR["kill"], (PID, 15, 0, 0, 0, 0), ALLOW),
    (NR["kill"], (0, 9, 0, 0, 0, 0), KILL),                                         # the process group
    (NR["execve"], (0,) * 6, KILL),
    (NR["socket"], (16, 3, 0, 0, 0, 0), KILL),
    (NR["ptrace"], (0,) * 6, KILL),
    (NR["unlink"], (0,) * 6, KILL),
    (NR["read"], (0,) * 6, ALLOW),
    (NR["read"] | sandbox.X32_SYSCALL_BIT, (0,) * 6, KILL),                         # x32's read
    (-1, (0,) * 6, KILL),
])
def test_program_decides_as_the_policy_says(nr, args, verdict):
    assert run_bpf(PROGRAM, nr, args=args) == verdict


def test_other_architectures_are_killed():
    # i386's `int 0x80` reaches the same filter with its own numbers (11 is execve).
    assert run_bpf(PROGRAM, 3, arch=0x40000003) == KILL
    assert run_bpf(PROGRAM, 11, arch=0x40000003) == KILL


@settings(max_examples=300 * FUZZ, deadline=None)
@given(nr=st.one_of(st.sampled_from(sorted(NR.values())), st.integers(-2**31, 2**31 - 1)),
       arch=st.sampled_from([sandbox.AUDIT_ARCH_X86_64, sandbox.AUDIT_ARCH_X86_64, 0x40000003, 0xC00000B7]),
       args=st.lists(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from(
           [0, PID, 0xAE80, 0x5401, 0x5412, 0x1000, 0x10000, 0x400454D0])), min_size=6, max_size=6),
       audit=st.booleans())
def test_program_matches_policy_on_any_call(nr, arch, args, audit):
    default = sandbox.SECCOMP_RET_LOG if audit else KILL
    prog = AUDIT_PROGRAM if audit else PROGRAM
    assert run_bpf(prog, nr, arch, args) == expected(RULES, default, nr, arch, args)


def test_program_fits_the_kernel_and_its_jumps():
    assert len(PROGRAM) <= sandbox.BPF_MAXINSNS
    for i, (code, jt, jf, k) in enumerate(PROGRAM):
        assert 0 <= jt <= 255 and 0 <= jf <= 255
        if code in (0x15, 0x35, 0x45):
            assert i + 1 + max(jt, jf) < len(PROGRAM)
    assert PROGRAM[-1] == (0x06, 0, 0, KILL)


# ------------------------------------------------------- a real filtered process

def filtered(body: str, before: str = "", env: dict | None = None,
             timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``before``, install the sandbox, then run ``body``, in a fresh Python."""
    code = (f"import os, sys, threading\n{textwrap.dedent(before)}\n"
            f"from kvmpy import sandbox\nsandbox.install()\n{textwrap.dedent(body)}")
    e = dict(os.environ, PYTHONPATH=ROOT)
    e.pop(sandbox.AUDIT_ENV, None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", code], env=e, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_filtered_process_runs_threads_and_refuses_opens(seccomp_required):
    p = filtered("""
        out = []
        t = threading.Thread(target=lambda: out.append(os.getpid()))
        t.start(); t.join()
        try:
            open("/etc/hostname").read()
            print("opened")
        except PermissionError:
            print("open refused")
        r, w = os.pipe2(os.O_CLOEXEC)
        os.write(w, b"x")
        print(os.read(r, 1), os.fstat(r).st_mode & 0o170000 == 0o010000, out == [os.getpid()])
    """)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "open refused\nb'x' True True\n"


@pytest.mark.parametrize("before, call", [
    ("", "os.execv('/bin/true', ['true'])"),
    ("", "os.fork()"),
    ("import subprocess", "subprocess.run(['/bin/true'])"),
    ("import socket", "socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)"),
    ("", "os.kill(1, 0)"),
    ("", "os.unlink('/nonexistent-kvmpy-sandbox-test')"),
    ("import ctypes", "ctypes.CDLL(None).syscall(0x40000000 | 39)"),        # x32's getpid
    ("import fcntl, pty\nm, s = pty.openpty()", "fcntl.ioctl(m, 0x5412, b'x')"),   # TIOCSTI
])
def test_forbidden_call_kills_the_process(seccomp_required, before, call):
    p = filtered(f"print('before', flush=True)\n{call}\nprint('after')\n", before=before)
    assert p.returncode == SIGSYS_STATUS, (p.returncode, p.stdout, p.stderr)
    assert p.stdout == "before\n"


def test_audit_mode_logs_instead_of_killing(seccomp_required):
    p = filtered("""
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    """, env={sandbox.AUDIT_ENV: "1"})
    assert p.returncode == 0, p.stderr
    assert p.stdout == "7\n"


def test_status_of_every_thread_shows_filter_and_no_new_privs(seccomp_required):
    code = ("import os, sys, threading\nfrom kvmpy import sandbox\n"
            "ev = threading.Event()\nt = threading.Thread(target=ev.wait, daemon=True)\nt.start()\n"
            "sandbox.install()\nprint(threading.get_native_id(), t.native_id, flush=True)\n"
            "sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        main_tid, other_tid = proc.stdout.readline().split()
        for tid in (main_tid, other_tid):    # TSYNC: the thread started before has it too
            status = sandbox.status(f"{proc.pid}/task/{tid}")
            assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1", (tid, status)
    finally:
        proc.stdin.close()
        proc.wait(10)
    assert proc.returncode == 0


# ----------------------------------------------------------------- config

def test_config_key_and_option():
    assert config_from_dict({"sandbox": False}, "vm.toml").sandbox is False
    assert config_from_dict({}, "vm.toml").sandbox is None
    with pytest.raises(ConfigError, match="vm.toml: key 'sandbox': expected true or false"):
        config_from_dict({"sandbox": "yes"}, "vm.toml")
    p = run_kvmpy(["run", "--kernel", "tests/guests/build/hello.elf", "--sandbox", "maybe"])
    assert p.returncode == 2
    assert p.stderr.decode() == "kvmpy: --sandbox maybe: expected on or off, got 'maybe'\n"


# ------------------------------------------------------------------ real VMs

PLUGIN = '''
import os
from kvmpy.devices.bus import PortSlot


class Forbidden:
    """On the guest's first write to its port, makes the call named by ``do``:
    from the vCPU thread (``where=vcpu``) or from the event loop's thread, which
    was running before the filter went on (``where=loop``)."""
    bus = "pio"

    @classmethod
    def place(cls, options):
        return (PortSlot(base=0xE9, length=1),)

    def __init__(self, ctx):
        self.ctx = ctx
        self.do = ctx.options["do"]
        self.marker = ctx.options["marker"]
        self.done = False

    def read(self, offset, size):
        return 0xE9

    def write(self, offset, size, value):
        if self.done:
            return
        self.done = True
        if self.ctx.options.get("where", "vcpu") == "loop":
            self.ctx.events.call_soon(self.forbidden)
        else:
            self.forbidden()

    def forbidden(self):
        if self.do == "exec":
            os.execv("/bin/sh", ["sh", "-c", "echo exec > " + self.marker])
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        os.write(1, f"forked {status}\\n".encode())     # the VM's stdout: opening is refused
'''


def _plugin(tmp_path):
    path = tmp_path / "forbidden.py"
    path.write_text(PLUGIN)
    return path


def _wait_for(path, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _start(tmp_path, guest, *extra, env=None, **kw):
    e = dict(os.environ, PYTHONPATH=ROOT)
    e.pop(sandbox.AUDIT_ENV, None)
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "kvmpy", "run", "--enable-kvm", "--kernel", guest_path(guest),
                             "--pidfile", str(tmp_path / "vm.pid"), "--qmp", f"unix:{tmp_path / 'vm.qmp'}",
                             *extra], cwd=ROOT, env=e, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def _qmp(tmp_path, *commands):
    from qemu.qmp.legacy import QEMUMonitorProtocol
    client = QEMUMonitorProtocol(str(tmp_path / "vm.qmp"))
    deadline = time.monotonic() + 30
    while True:
        try:
            client.connect()
            break
        except Exception:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    replies = []
    try:
        for c in commands:
            replies.append(client.cmd(c))
    finally:
        try:
            client.close()
        except (EOFError, ConnectionError):
            pass
    return replies


def _left(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name in ("vm.pid", "vm.qmp"))


def _running_status(proc, tmp_path):
    """({thread id: its /proc status}, the vCPU threads' ids) once the guest runs."""
    _wait_for(tmp_path / "vm.qmp", proc)
    deadline = time.monotonic() + 30
    while True:     # the monitors listen before the vCPUs start ("prelaunch")
        status, cpus = _qmp(tmp_path, "query-status", "query-cpus-fast")
        if status["status"] == "running":
            break
        assert status["status"] == "prelaunch" and time.monotonic() < deadline, status
        time.sleep(0.05)
    vcpus = {str(c["thread-id"]) for c in cpus}
    return {t: sandbox.status(f"{proc.pid}/task/{t}") for t in os.listdir(f"/proc/{proc.pid}/task")}, vcpus


@pytest.mark.usefixtures("kvm_required", "seccomp_required")
def test_running_vm_is_sandboxed_by_default_and_quits_cleanly(tmp_path):
    proc = _start(tmp_path, "acpi_power")
    try:
        threads, vcpus = _running_status(proc, tmp_path)
        # The main thread, the event loop's (both there before the filter went on)
        # and the vCPU threads (started after) are all filtered.
        assert str(proc.pid) in threads and vcpus and vcpus < set(threads), (threads, vcpus)
        assert len(threads) >= 2 + len(vcpus)
        for tid, status in threads.items():
            assert (status["Seccomp"], status["NoNewPrivs"]) == ("2", "1"), (tid, status)
        _qmp(tmp_path, "quit")
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err
    assert _left(tmp_path) == []


@pytest.mark.usefixtures("kvm_required", "seccomp_required")
def test_sigterm_powers_down_a_sandboxed_vm_and_its_files_go(tmp_path):
    proc = _start(tmp_path, "acpi_power", "--sandbox", "on")
    try:
        threads, _ = _running_status(proc, tmp_path)
        assert threads[str(proc.pid)]["Seccomp"] == "2"
        out = b""
        deadline = time.monotonic() + 30
        while b"waiting for power button" not in out and time.monotonic() < deadline:
            out += os.read(proc.stdout.fileno(), 4096) or b"(eof)"
        proc.terminate()
        rest, err = proc.communicate(timeout=30)
        out += rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert b"power button pressed" in out
    assert _left(tmp_path) == []


@pytest.mark.usefixtures("kvm_required")
def test_sandbox_off_leaves_the_process_unfiltered(tmp_path):
    proc = _start(tmp_path, "acpi_power", "--sandbox", "off")
    try:
        threads, _ = _running_status(proc, tmp_path)
        assert {status["Seccomp"] for status in threads.values()} == {"0"}
        _qmp(tmp_path, "quit")
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0


@pytest.mark.usefixtures("kvm_required", "seccomp_required")
@pytest.mark.parametrize("do, where", [("exec", "vcpu"), ("fork", "vcpu"), ("exec", "loop")])
def test_plugin_making_a_forbidden_call_kills_the_vm(tmp_path, do, where):
    marker = tmp_path / "marker"
    plugin = _plugin(tmp_path)
    proc = _start(tmp_path, "debugcon", "--device", f"{plugin}:Forbidden,do={do},where={where},marker={marker}")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == SIGSYS_STATUS, (proc.returncode, out, err)
    assert not marker.exists() and b"forked" not in out
    # The cleanup helper, forked before the filter, saw the VM process die.
    deadline = time.monotonic() + 10
    while _left(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _left(tmp_path) == []


@pytest.mark.usefixtures("kvm_required")
@pytest.mark.parametrize("how", ["--sandbox off", "audit"])
def test_the_same_calls_succeed_without_the_sandbox_or_in_audit_mode(tmp_path, how):
    plugin = _plugin(tmp_path)
    extra = ["--sandbox", "off"] if how == "--sandbox off" else []
    env = {sandbox.AUDIT_ENV: "1"} if how == "audit" else {}
    if how == "audit" and SECCOMP_SKIP:
        pytest.skip(f"no seccomp sandbox here: {SECCOMP_SKIP}")
    proc = _start(tmp_path, "debugcon", *extra, "--device",
                  f"{plugin}:Forbidden,do=fork,marker={tmp_path / 'marker'}", env=env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert b"forked 7\n" in out
    if how == "audit":
        return      # an exec'd program would inherit the filter, refused opens and all
    marker = tmp_path / "marker"
    proc = _start(tmp_path, "debugcon", *extra, "--device",
                  f"{plugin}:Forbidden,do=exec,marker={marker}", env=env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()      # /bin/sh took the process over and wrote the marker
    assert marker.read_text() == "exec\n"


@pytest.mark.usefixtures("kvm_required", "seccomp_required")
def test_sandboxed_vm_resets_from_the_kernel_it_holds_open(tmp_path):
    """A reset loads the kernel again: through the file opened before the filter."""
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", "--enable-kvm", "--sandbox", "on",
                             "--kernel", guest_path("reboot")], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while seen.count(b"rebooting") < 3 and time.monotonic() < deadline:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
    finally:
        proc.kill()
        err = proc.communicate(timeout=30)[1]
    assert seen.count(b"rebooting") >= 3, (seen, err)
    assert b"reboot failed" not in seen


OUTER_FILTER = """
import os, sys
from kvmpy import sandbox
# An outer sandbox that forbids installing filters, as some container runtimes do.
import ctypes
prog = sandbox.assemble({"seccomp": sandbox.Rule(errno=1)}, sandbox.SECCOMP_RET_ALLOW)
filters = (sandbox._SockFilter * len(prog))(*[sandbox._SockFilter(*i) for i in prog])
fprog = sandbox._SockFprog(len(prog), ctypes.cast(filters, ctypes.POINTER(sandbox._SockFilter)))
sandbox._prctl(sandbox.PR_SET_NO_NEW_PRIVS, 1)
sandbox._seccomp(sandbox.SECCOMP_SET_MODE_FILTER, 0, ctypes.byref(fprog))
os.execv(sys.executable, [sys.executable, "-m", "kvmpy", *sys.argv[1:]])
"""


@pytest.mark.usefixtures("kvm_required", "seccomp_required")
@pytest.mark.parametrize("option, status", [(["--sandbox", "on"], 1), ([], 0)])
def test_host_that_forbids_the_filter(tmp_path, option, status):
    """Asked for: one line and status 1 (a host fault). By default: runs without."""
    p = subprocess.run([sys.executable, "-c", OUTER_FILTER, "run", "--enable-kvm", *option,
                        "--kernel", guest_path("hello")], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == status, p.stderr.decode()
    if status:
        assert p.stderr.decode().splitlines() == [
            "kvmpy: <command line>: sandbox (--sandbox on or key 'sandbox'): seccomp() is refused here "
            "(Operation not permitted; inside another sandbox?)"]
        assert p.stdout == b""
    else:
        assert b"guest: done" in p.stdout


@pytest.mark.usefixtures("kvm_required", "seccomp_required")
def test_translator_vm_with_two_vcpus_is_sandboxed(tmp_path):
    p = run_kvmpy(["run", "--accel", "tcg", "--sandbox", "on", "--smp", "2", "--kernel", guest_path("smp")],
                  timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    assert b"Traceback" not in p.stderr


@pytest.mark.usefixtures("kvm_required", "seccomp_required")
def test_bridge_a_sandboxed_vm_created_is_taken_down_after_it(netns):
    """A sandboxed VM may not open a netlink socket: the cleanup helper, forked
    before the filter, deletes the bridge kvmpy made once the VM is gone."""
    r = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "kvmpy", "run", "--enable-kvm",
                        "--sandbox", "on", "--kernel", guest_path("hello"), "--net", "tap,ifname=ktapS,bridge=kbrS"],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "guest: done" in r.stdout
    links = subprocess.run(["ip", "-n", netns, "-o", "link"], capture_output=True, text=True).stdout
    assert "ktapS" not in links and "kbrS" not in links, links


@pytest.mark.usefixtures("kvm_required", "seccomp_required", "root_required")
def test_runas_vm_is_sandboxed_too_and_leaves_nothing(tmp_path):
    import pwd
    proc = _start(tmp_path, "acpi_power", "--runas", "nobody", "--sandbox", "on")
    try:
        threads, _ = _running_status(proc, tmp_path)
        assert pwd.getpwuid(os.stat(f"/proc/{proc.pid}").st_uid).pw_name == "nobody"
        assert {(s["Seccomp"], s["NoNewPrivs"]) for s in threads.values()} == {("2", "1")}
        _qmp(tmp_path, "quit")
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert _left(tmp_path) == []
