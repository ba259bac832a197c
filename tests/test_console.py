"""Console backends on real descriptors: a pty for raw mode and keys, a real
unix socket, a real file; the real 16550 model for back-pressure."""

import os
import select
import signal
import socket
import subprocess
import sys
import termios
import textwrap
import threading
import time

import pytest

from kvmpy.console import (FileConsole, LineEditor, NullConsole, StdioConsole, UnixSocketConsole,
                           open_console)
from kvmpy.devices.serial import Serial16550
from kvmpy.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def read_available(fd, timeout=2.0, want=None):
    out = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r, _, _ = select.select([fd], [], [], 0.05)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            out += chunk
            if want is not None and want in out:
                break
        elif want is None and out:
            break
    return out


class Recorder:
    def __init__(self):
        self.quits = 0
        self.monitors = 0

    def quit(self):
        self.quits += 1

    def monitor(self):
        self.monitors += 1


@pytest.fixture
def pty_pair():
    master, slave = os.openpty()
    yield master, slave
    for fd in (master, slave):
        try:
            os.close(fd)
        except OSError:
            pass


def make_uart(console):
    uart = Serial16550(lambda level: None, console.write, on_rx_space=console.rx_space_available)
    uart.write(2, 1, 0x01)  # FIFO on
    console.attach(uart)
    return uart


def drain_uart(uart):
    out = bytearray()
    while uart.read(5, 1) & 1:
        out.append(uart.read(0, 1))
    return bytes(out)


def drain_uart_until(uart, want: bytes, timeout: float = 5.0) -> bytes:
    """Drain until `want`'s length arrived: the console thread may be slow on a loaded host."""
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < len(want) and time.monotonic() < deadline:
        got += drain_uart(uart)
        time.sleep(0.005)
    time.sleep(0.02)
    return got + drain_uart(uart)   # and nothing more than that


def test_raw_mode_and_restore(pty_pair):
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    con = StdioConsole(lambda: None, None, in_fd=slave, out_fd=slave)
    raw = termios.tcgetattr(slave)
    assert not raw[3] & (termios.ECHO | termios.ICANON | termios.ISIG)
    assert not raw[0] & (termios.ICRNL | termios.IXON)
    assert raw[1] & termios.OPOST
    con.close()
    assert termios.tcgetattr(slave) == before


def test_keys_and_output(pty_pair):
    master, slave = pty_pair
    rec = Recorder()
    con = StdioConsole(rec.quit, rec.monitor, in_fd=slave, out_fd=slave)
    uart = make_uart(con)
    con.start()
    try:
        # guest output reaches the terminal unbuffered
        for b in b"login: ":
            uart.write(0, 1, b)
        assert read_available(master, want=b"login: ") == b"login: "
        # Ctrl-C reaches the guest as a byte (no SIGINT), C-a C-a sends one C-a
        os.write(master, b"ab\x03\x01\x01c")
        assert drain_uart_until(uart, b"ab\x03\x01c") == b"ab\x03\x01c"
        os.write(master, b"\x01h")
        assert b"C-a x" in read_available(master, want=b"C-a C-a")
        os.write(master, b"\x01c")
        assert wait_for(lambda: rec.monitors == 1)
        uart.write(1, 1, 0x04)
        os.write(master, b"\x01b")
        assert wait_for(lambda: uart.read(5, 1) & 0x10)
        assert drain_uart(uart) == b"\x00"
        os.write(master, b"\x01z")  # unknown escape: dropped
        os.write(master, b"\x01x")
        assert wait_for(lambda: rec.quits == 1)
        assert drain_uart(uart) == b""
    finally:
        con.close()


def test_monitor_not_available_message(pty_pair):
    master, slave = pty_pair
    con = StdioConsole(lambda: None, None, in_fd=slave, out_fd=slave)
    try:
        con.process_keys(b"\x01c")
        assert b"monitor not available" in read_available(master, want=b"available")
    finally:
        con.close()


def test_back_pressure_keeps_every_byte(pty_pair):
    master, slave = pty_pair
    con = StdioConsole(lambda: None, None, in_fd=slave, out_fd=slave)
    uart = make_uart(con)
    con.start()
    payload = bytes((i % 200) + 32 for i in range(3000))
    got = bytearray()
    try:
        os.write(master, payload)
        end = time.monotonic() + 10
        while len(got) < len(payload) and time.monotonic() < end:
            # the guest reads slowly; the FIFO fills and the console must hold back
            time.sleep(0.001)
            got += drain_uart(uart)
        assert bytes(got) == payload
        assert uart.read(5, 1) & 0x02 == 0  # never an overrun
    finally:
        con.close()


def test_handle_input_api_without_thread(pty_pair):
    master, slave = pty_pair
    con = StdioConsole(lambda: None, None, in_fd=slave, out_fd=slave)
    uart = make_uart(con)
    try:
        os.write(master, b"x" * 40)
        assert select.select([con.fileno()], [], [], 2)[0]
        time.sleep(0.05)
        con.handle_input()
        assert con.has_pending_input()
        assert len(drain_uart(uart)) == 16  # reading made space: flush again
        assert con.flush_pending() is False
        while con.has_pending_input():
            drain_uart(uart)
            con.flush_pending()
        assert not con.has_pending_input()
    finally:
        con.close()


def test_not_a_tty_leaves_termios_alone():
    r, w = os.pipe()
    con = StdioConsole(lambda: None, None, in_fd=r, out_fd=w)
    uart = make_uart(con)
    con.start()
    try:
        assert not con.is_tty
        os.write(w, b"hi")
        assert drain_uart_until(uart, b"hi") == b"hi"
    finally:
        con.close()
        os.close(r)
        os.close(w)


def test_terminal_restored_when_killed(pty_pair):
    """A real process in raw mode on the pty gets SIGTERM: the pty is cooked again."""
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys, time
            from kvmpy.console import StdioConsole
            con = StdioConsole(lambda: None)
            con.start()
            sys.stderr.write("raw\\n"); sys.stderr.flush()
            time.sleep(30)
        """)],
        stdin=slave, stdout=slave, stderr=subprocess.PIPE, cwd=REPO, start_new_session=True)
    try:
        assert child.stderr.readline() == b"raw\n"
        assert termios.tcgetattr(slave)[3] & termios.ECHO == 0
        child.send_signal(signal.SIGTERM)
        assert child.wait(10) == -signal.SIGTERM
        assert termios.tcgetattr(slave) == before
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_terminal_restored_at_exit(pty_pair):
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    child = subprocess.run(
        [sys.executable, "-c", "from kvmpy.console import StdioConsole; StdioConsole(lambda: None)"],
        stdin=slave, stdout=slave, cwd=REPO, timeout=30)
    assert child.returncode == 0
    assert termios.tcgetattr(slave) == before


def test_file_backend(tmp_path):
    path = tmp_path / "serial.log"
    path.write_bytes(b"old contents")
    con = open_console(f"file:{path}", lambda: None)
    assert isinstance(con, FileConsole) and con.fileno() is None
    uart = make_uart(con)
    for b in b"boot ok\r\n":
        uart.write(0, 1, b)
    # visible at once, without close: nothing is buffered in the VMM
    assert path.read_bytes() == b"boot ok\r\n"
    con.close()
    with pytest.raises(ConfigError, match="nonexistent"):
        open_console(f"file:{tmp_path}/nonexistent/x", lambda: None)


def test_buffered_output_arrives_promptly_and_whole(tmp_path):
    """The UART's callback (buffered_write): a burst goes out in a few writes, a
    lone byte within the flush delay without close, the rest at close."""
    path = tmp_path / "serial.log"
    con = open_console(f"file:{path}", lambda: None)
    writes = []
    real = con.write
    con.write = lambda data: (writes.append(len(data)), real(data))
    uart = Serial16550(irq=lambda level: None, out=con.buffered_write)
    burst = bytes(range(32, 127)) * 100          # 9500 bytes, one THR write each
    for b in burst:
        uart.write(0, 1, b)
    assert wait_for(lambda: path.read_bytes() == burst)
    assert len(writes) < 10
    uart.write(0, 1, ord("!"))
    assert wait_for(lambda: path.read_bytes() == burst + b"!", timeout=1.0)
    for b in b"tail":
        uart.write(0, 1, b)
    con.close()
    assert path.read_bytes() == burst + b"!tail"


def test_buffered_output_flushed_on_sigterm(tmp_path):
    """A process ended by SIGTERM (no handler of kvmpy's own) still writes what
    the guest sent just before."""
    path = tmp_path / "serial.log"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time, kvmpy.console as c
            c.OUTPUT_DELAY = 60.0
            con = c.open_console("file:{path}", lambda: None)
            con.buffered_write(b"last words")
            sys.stdout.write("queued\\n"); sys.stdout.flush()
            time.sleep(30)
        """)], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert child.stdout.readline() == b"queued\n"
        assert path.read_bytes() == b""
        child.send_signal(signal.SIGTERM)
        assert child.wait(10) == -signal.SIGTERM
        assert path.read_bytes() == b"last words"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_unix_socket_backend(tmp_path):
    path = str(tmp_path / "console.sock")
    con = open_console(f"unix:{path},server,nowait", lambda: None)
    assert isinstance(con, UnixSocketConsole)
    uart = make_uart(con)
    con.start()
    try:
        for b in b"early":  # no client yet: kept for the first one
            uart.write(0, 1, b)
        c1 = socket.socket(socket.AF_UNIX)
        c1.connect(path)
        c1.settimeout(5)
        assert wait_for(lambda: con.connected)
        got = b""
        while len(got) < 5:
            got += c1.recv(100)
        assert got == b"early"
        # a second client is refused while the first is connected
        c2 = socket.socket(socket.AF_UNIX)
        c2.connect(path)
        c2.settimeout(5)
        assert c2.recv(10) == b""
        c2.close()
        for b in b"late":
            uart.write(0, 1, b)
        assert c1.recv(100) == b"late"
        c1.sendall(b"x" * 50)  # more than the FIFO: back-pressure
        got = bytearray()
        assert wait_for(lambda: uart.read(5, 1) & 1)
        end = time.monotonic() + 5
        while len(got) < 50 and time.monotonic() < end:
            got += drain_uart(uart)
            time.sleep(0.005)
        assert bytes(got) == b"x" * 50
        c1.close()
        assert wait_for(lambda: not con.connected)
        # a new client can connect after the first left
        c3 = socket.socket(socket.AF_UNIX)
        c3.connect(path)
        assert wait_for(lambda: con.connected)
        c3.close()
    finally:
        con.close()
    assert not os.path.exists(path)


def test_unix_backlog_is_bounded(tmp_path):
    con = UnixSocketConsole(str(tmp_path / "s"), backlog_limit=100)
    try:
        con.write(b"a" * 80)
        con.write(b"b" * 80)
        assert len(con._backlog) == 100 and con._backlog.endswith(b"b" * 80)
    finally:
        con.close()


def test_none_and_bad_specs(tmp_path):
    con = open_console("none", lambda: None)
    assert isinstance(con, NullConsole)
    con.write(b"dropped")
    con.start()
    con.close()
    for bad in ("", "tty", "file:", "unix:", "unix:/tmp/x,client", "tcp:1234", "STDIO"):
        with pytest.raises(ConfigError) as e:
            open_console(bad, lambda: None)
        assert repr(bad) in str(e.value)
    # a regular file where the socket should go is not removed
    p = tmp_path / "taken"
    p.write_text("mine")
    with pytest.raises(ConfigError, match="taken"):
        open_console(f"unix:{p}", lambda: None)
    assert p.read_text() == "mine"


# --------------------------------------------------------------- Ctrl-A c: the monitor
def edit(editor: LineEditor, keys: bytes) -> tuple[bytes, list[str]]:
    echo, lines = b"", []
    for b in keys:
        shown, line = editor.feed(b)
        echo += shown
        if line is not None:
            lines.append(line)
    return echo, lines


def test_line_editor_keys():
    ed = LineEditor()
    assert edit(ed, b"info statuz\x7fs\r") == (b"info statuz\b \bs\r\n", ["info status"])
    # CR LF is one line; a lone LF ends one too
    assert edit(ed, b"stop\r\ncont\n")[1] == ["stop", "cont"]
    # cursor keys: insert in the middle, the tail is redrawn and the cursor put back
    echo, lines = edit(ed, b"ifo\x1b[D\x1b[Dn\r")
    assert lines == ["info"] and echo.startswith(b"ifo\b\bnfo\b\b")
    # Ctrl-W drops a word, Ctrl-U the line before the cursor, Ctrl-K the rest
    assert edit(ed, b"info kvm\x17status\r")[1] == ["info status"]
    assert edit(ed, b"garbage\x15help\r")[1] == ["help"]
    assert edit(ed, b"quitx\x1b[D\x0b\r")[1] == ["quit"]
    # history: up recalls, down returns to an empty line; non-printables never enter
    assert edit(ed, b"\x1b[A\x1b[A\r")[1] == ["help"]
    assert edit(ed, b"\x1b[A\x1b[B\x03\x00\xff\r")[1] == [""]
    assert ed.history[-3:] == ["help", "quit", "help"]     # empty lines are not kept
    assert edit(ed, b"x" * 5000 + b"\r")[1] == ["x" * LineEditor.MAX_LINE]


def _read_until(fd: int, buf: bytearray, want: bytes, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while want not in buf and time.monotonic() < end:
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:      # EIO: the child closed the pty
                break
            if not chunk:
                break
            buf += chunk
    return want in buf


@pytest.mark.guest
@pytest.mark.parametrize("with_monitor_server", [False, True], ids=["no-monitor", "with-monitor"])
def test_ctrl_a_c_switches_a_real_run_to_the_monitor_and_back(tmp_path, with_monitor_server):
    """`kvmpy run examples/default.toml` (the echo guest) on a pty, as a user at a terminal:
    Ctrl-A c gives the (qemu) prompt whose lines reach HMP, not the guest; guest output
    still shows; Ctrl-A c returns to the guest; quit in the monitor ends the process."""
    args = [sys.executable, "-m", "kvmpy", "run", os.path.join(REPO, "examples", "default.toml")]
    if with_monitor_server:
        args += ["--monitor", f"unix:{tmp_path}/hmp.sock"]
    master, slave = os.openpty()
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=subprocess.PIPE, cwd=REPO, env=env,
                            start_new_session=True)
    os.close(slave)
    out = bytearray()
    try:
        assert _read_until(master, out, b"irq: ready"), bytes(out) + proc.stderr.read1()
        os.write(master, b"\x01c")
        assert _read_until(master, out, b"monitor - type 'help' for more information\r"), bytes(out)
        assert _read_until(master, out, b"(qemu) "), bytes(out)
        mark = len(out)
        os.write(master, b"info statuz\x7fs\r")       # typed with a backspace, echoed
        assert _read_until(master, out, b"VM status: running"), bytes(out)
        assert b"info statuz\b \bs" in out[mark:]
        assert _read_until(master, out, b"VM status: running\r\r\n(qemu) "), bytes(out)
        os.write(master, b"stop\rinfo status\r")
        assert _read_until(master, out, b"VM status: paused"), bytes(out)
        os.write(master, b"cont\rhelp\r")
        assert _read_until(master, out, b"system_powerdown"), bytes(out)
        assert b"got: " not in out, "monitor input reached the guest"
        # back to the guest: it gets the next line
        os.write(master, b"\x01c")
        time.sleep(0.2)
        os.write(master, b"ab\r")
        assert _read_until(master, out, b"got: b"), bytes(out)
        assert b"got: a" in out and b"got: i" not in out
        # guest output keeps coming while the monitor has the focus (QEMU's mux)
        mark = len(out)
        os.write(master, b"xy\x01c")
        assert _read_until(master, out, b"got: y"), bytes(out)
        assert b"(qemu) " in out[mark:], bytes(out)
        assert out.count(b"for more information") == 1, "the banner is shown once"
        os.write(master, b"quit\r")
        assert proc.wait(30) == 0, proc.stderr.read()
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


@pytest.mark.parametrize("how", ["quit", "sigkill"])
def test_unix_console_socket_is_private_and_removed(tmp_path, how):
    """Whoever connects to the console types into the guest: the socket is 0600,
    and it is gone after the VM, even one killed by SIGKILL (the cleanup helper
    removes it: a sandboxed VM may not unlink)."""
    import stat as stat_mod
    from conftest import ROOT, guest_path
    path = tmp_path / "console.sock"
    qmp = tmp_path / "qmp.sock"
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", "--accel", "tcg", "-m", "64M",
                             "--kernel", guest_path("irq"), "--serial", f"unix:{path}", "--qmp", f"unix:{qmp}"],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (path.exists() and qmp.exists()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            time.sleep(0.02)
        assert stat_mod.S_IMODE(os.lstat(path).st_mode) == 0o600
        from qemu.qmp.legacy import QEMUMonitorProtocol
        client = QEMUMonitorProtocol(str(qmp))
        client.connect()
        # Running: set-up is over, the cleanup helper is there (it starts before the vCPUs).
        while client.cmd("query-status")["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        if how == "sigkill":
            proc.send_signal(signal.SIGKILL)
        else:
            try:
                client.cmd("quit")
            except (EOFError, ConnectionError):
                pass            # the VM may close the monitor before its reply is read
        proc.wait(10)
        deadline = time.monotonic() + 5
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
