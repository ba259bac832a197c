"""The serial console: connects the guest's UART to stdio, a file, a unix socket or nothing.

Wiring (the machine does this)::

    console = open_console(spec, on_quit=..., on_monitor=...)
    uart = Serial16550(irq=..., out=console.write, on_rx_space=console.rx_space_available)
    console.attach(uart)
    console.start()          # input thread; or poll console.fileno() and call handle_input()
    ...
    console.close()          # also restores the terminal

``write(data)`` is the UART's output callback (called on vCPU threads): it goes
straight to the file descriptor with os.write, looping on partial writes, never
buffered in Python, so nothing is lost when the VMM is killed. Input is pushed to
the UART with ``uart.receive``, which takes only what fits in its FIFO; the rest
stays pending and no more input is read until the guest drains the FIFO
(``rx_space_available``), so typing or pasting never overruns the guest.

stdio uses QEMU's -nographic keys: Ctrl-A x quits, Ctrl-A c asks for the
monitor, Ctrl-A h prints help, Ctrl-A b sends a break, Ctrl-A Ctrl-A sends
Ctrl-A. The terminal is put in raw mode only when stdin is a tty, and restored
on close, at exit and on SIGTERM/SIGHUP.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import select
import signal
import socket
import stat
import termios
import threading
from typing import Callable

from .errors import ConfigError

log = logging.getLogger(__name__)

CTRL_A = 0x01
READ_CHUNK = 4096
UNIX_BACKLOG_LIMIT = 64 * 1024

HELP_TEXT = (
    "\r\nC-a h    print this help\r\n"
    "C-a x    exit emulator\r\n"
    "C-a b    send break (magic sysrq)\r\n"
    "C-a c    switch between console and monitor\r\n"
    "C-a C-a  sends C-a\r\n"
)


def write_all(fd: int, data: bytes | memoryview) -> bool:
    """os.write until everything is out; False if the descriptor is gone."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.EIO, errno.EBADF, errno.ECONNRESET):
                return False
            raise
        view = view[n:]
    return True


# ------------------------------------------------------------- terminal state
_saved_terminals: dict[int, list] = {}
_restore_lock = threading.Lock()
_hooks_installed = False
_previous_handlers: dict[int, object] = {}


def _restore_terminals() -> None:
    with _restore_lock:
        for fd, attrs in list(_saved_terminals.items()):
            try:
                termios.tcsetattr(fd, termios.TCSANOW, attrs)
            except (termios.error, OSError):
                pass
            _saved_terminals.pop(fd, None)


def _on_fatal_signal(signum, frame) -> None:
    _restore_terminals()
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    if previous == signal.SIG_IGN:
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_restore_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_restore_terminals)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            _previous_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, _on_fatal_signal)
        except (ValueError, OSError):
            pass


def make_raw(fd: int) -> None:
    """QEMU's stdio settings: no echo, no line editing, no signals, no flow
    control, 8-bit input; output post-processing kept (\\n still moves to column 0)."""
    attrs = termios.tcgetattr(fd)
    with _restore_lock:
        _saved_terminals.setdefault(fd, [a if not isinstance(a, list) else list(a) for a in attrs])
    _install_restore_hooks()
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
               | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    oflag |= termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN | termios.ISIG)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, ispeed, ospeed, cc])


def restore_terminal(fd: int) -> None:
    with _restore_lock:
        attrs = _saved_terminals.pop(fd, None)
    if attrs is not None:
        try:
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
        except (termios.error, OSError):
            pass


# ------------------------------------------------------------------ consoles
class Console:
    """Base class: the UART side (attach, back-pressure) and the input thread."""

    def __init__(self) -> None:
        self._uart = None
        self._pending = bytearray()
        self._pending_lock = threading.Lock()
        self._space = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)  # a vCPU signalling must never block

    # -- UART side
    def attach(self, uart) -> None:
        """``uart`` needs ``receive(bytes) -> int`` (and ``send_break()`` for C-a b)."""
        self._uart = uart

    def rx_space_available(self) -> None:
        """The UART's on_rx_space callback: runs on a vCPU thread, only signals."""
        self._space.set()
        self._wake()

    def write(self, data: bytes) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def has_pending_input(self) -> bool:
        return bool(self._pending)

    def _push(self, data: bytes) -> None:
        with self._pending_lock:
            self._pending += data
        self.flush_pending()

    def flush_pending(self) -> bool:
        """Offer held-back input to the UART again; True when nothing is left."""
        with self._pending_lock:
            if self._pending and self._uart is not None:
                self._space.clear()
                n = self._uart.receive(bytes(self._pending))
                del self._pending[:n]
            return not self._pending

    # -- input
    def fileno(self) -> int | None:
        """The descriptor to poll for input (None: no input)."""
        return None

    def handle_input(self) -> None:
        """Read what is available on fileno() and push it to the UART.

        While input is held back by a full FIFO nothing more is read: poll
        fileno() only when ``has_pending_input()`` is False, and call
        ``flush_pending()`` after ``rx_space_available``.
        """

    def start(self) -> None:
        if self._thread is None and self._has_input():
            self._thread = threading.Thread(target=self._input_loop, name=f"console-{self.kind}",
                                            daemon=True)
            self._thread.start()

    def _has_input(self) -> bool:
        return self.fileno() is not None

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except (BlockingIOError, OSError):
            pass

    def _input_loop(self) -> None:
        while not self._closed:
            if self._pending:
                if not self.flush_pending():
                    self._space.wait(0.1)
                    continue
            fds = self._poll_fds()
            if not fds:
                return
            try:
                ready, _, _ = select.select(fds + [self._wake_r], [], [], 1.0)
            except (OSError, ValueError):
                if self._closed:
                    return
                raise
            if self._wake_r in ready:
                self._drain_wake()
            if self._closed:
                return
            if any(fd != self._wake_r for fd in ready):
                try:
                    self.handle_input()
                except Exception:  # the thread must not die silently with a live guest
                    log.exception("console: input handling failed")
                    return

    def _poll_fds(self) -> list[int]:
        fd = self.fileno()
        return [] if fd is None else [fd]

    kind = "console"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._space.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


class NullConsole(Console):
    kind = "none"

    def write(self, data: bytes) -> None:
        pass


class FileConsole(Console):
    """Output appended to a file (truncated when opened, as QEMU does); no input."""

    kind = "file"

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            super().close()
            raise ConfigError(f"serial = \"file:{path}\": {e.strerror}") from None
        self._broken = False

    def write(self, data: bytes) -> None:
        if not self._broken and not write_all(self._fd, data):
            self._broken = True
            log.warning("console: writing %s failed; further output dropped", self.path)

    def close(self) -> None:
        super().close()
        try:
            os.close(self._fd)
        except OSError:
            pass


class StdioConsole(Console):
    kind = "stdio"

    def __init__(self, on_quit: Callable[[], None], on_monitor: Callable[[], None] | None = None,
                 in_fd: int = 0, out_fd: int = 1) -> None:
        super().__init__()
        self.on_quit = on_quit
        self.on_monitor = on_monitor
        self.in_fd = in_fd
        self.out_fd = out_fd
        self._got_escape = False
        self._eof = False
        self._broken = False
        self._out_lock = threading.Lock()
        self.is_tty = os.isatty(in_fd)
        if self.is_tty:
            make_raw(in_fd)

    def write(self, data: bytes) -> None:
        if self._broken:
            return
        with self._out_lock:
            if not write_all(self.out_fd, data):
                self._broken = True

    def _message(self, text: str) -> None:
        self.write(text.encode())

    def fileno(self) -> int | None:
        return None if self._eof or self._closed else self.in_fd

    def handle_input(self) -> None:
        if self._pending and not self.flush_pending():
            return
        try:
            data = os.read(self.in_fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.EIO:
                log.warning("console: reading stdin failed: %s", e)
            data = b""
        if not data:
            self._eof = True  # keep the guest running; it just gets no more input
            return
        to_guest = self.process_keys(data)
        if to_guest:
            self._push(to_guest)

    def process_keys(self, data: bytes) -> bytes:
        """Apply the C-a escapes; returns the bytes meant for the guest."""
        out = bytearray()
        for b in data:
            if self._got_escape:
                self._got_escape = False
                if b == CTRL_A:
                    out.append(CTRL_A)
                elif b in (ord("x"), ord("X")):
                    self._flush_to_guest(out)
                    self._message("kvmpy: terminated\r\n")
                    self.on_quit()
                elif b in (ord("c"), ord("C")):
                    self._flush_to_guest(out)
                    if self.on_monitor is None:
                        self._message("\r\nmonitor not available\r\n")
                    else:
                        self.on_monitor()
                elif b in (ord("h"), ord("H"), ord("?")):
                    self._message(HELP_TEXT)
                elif b in (ord("b"), ord("B")):
                    self._flush_to_guest(out)
                    send_break = getattr(self._uart, "send_break", None)
                    if send_break is not None:
                        send_break()
                # anything else after C-a is dropped, as in QEMU
            elif b == CTRL_A:
                self._got_escape = True
            else:
                out.append(b)
        return bytes(out)

    def _flush_to_guest(self, out: bytearray) -> None:
        # keep ordering: bytes typed before an escape reach the UART first
        if out:
            self._push(bytes(out))
            out.clear()

    def close(self) -> None:
        super().close()
        if self.is_tty:
            restore_terminal(self.in_fd)


class UnixSocketConsole(Console):
    """A listening unix socket; one client at a time gets output and sends input.

    Output with no client connected (or that a slow client has not taken yet)
    is kept up to ``backlog_limit`` bytes, oldest dropped first, and delivered
    when a client connects, so a late ``socat`` still sees the boot log tail.
    """

    kind = "unix"

    def __init__(self, path: str, backlog_limit: int = UNIX_BACKLOG_LIMIT) -> None:
        super().__init__()
        self.path = path
        self.backlog_limit = backlog_limit
        self._backlog = bytearray()
        self._dropped = 0
        self._lock = threading.Lock()
        self._client: socket.socket | None = None
        try:
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode):
                os.unlink(path)  # a stale socket from an earlier run
        except FileNotFoundError:
            pass
        except OSError as e:
            super().close()
            raise ConfigError(f"serial = \"unix:{path}\": {e.strerror}") from None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(path)
            self._listener.listen(1)
        except OSError as e:
            self._listener.close()
            super().close()
            raise ConfigError(f"serial = \"unix:{path}\": {e.strerror}") from None
        self._listener.setblocking(False)

    @property
    def connected(self) -> bool:
        return self._client is not None

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._client is not None and not self._backlog:
                try:
                    n = self._client.send(data)
                except BlockingIOError:
                    n = 0
                except OSError:
                    self._drop_client_locked()
                    n = 0
                data = data[n:]
            if data:
                self._backlog += data
                excess = len(self._backlog) - self.backlog_limit
                if excess > 0:
                    del self._backlog[:excess]
                    self._dropped += excess
                if self._client is not None:
                    self._wake()  # the input thread sends the rest when writable

    def _drop_client_locked(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except OSError:
                pass
            self._client = None

    def _has_input(self) -> bool:
        return True

    def fileno(self) -> int | None:
        return None  # several descriptors: use start()

    def _input_loop(self) -> None:
        while not self._closed:
            client = self._client
            rfds = [self._listener, self._wake_r]
            if client is not None and not self._pending:
                rfds.append(client)
            wfds = [client] if client is not None and self._backlog else []
            timeout = 0.1 if self._pending else 1.0
            try:
                ready_r, ready_w, _ = select.select(rfds, wfds, [], timeout)
            except (OSError, ValueError):
                if self._closed:
                    return
                continue
            if self._closed:
                return
            if self._wake_r in ready_r:
                self._drain_wake()
            if self._pending:
                self.flush_pending()
            if self._listener in ready_r:
                self._accept()
            if client is not None and client in ready_w:
                self._send_backlog()
            if client is not None and client in ready_r:
                self._read_client(client)

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, OSError):
            return
        with self._lock:
            if self._client is not None:
                log.info("console: %s already has a client; refusing another", self.path)
                conn.close()
                return
            conn.setblocking(False)
            self._client = conn
            if self._dropped:
                log.info("console: %d bytes of output dropped before a client connected",
                         self._dropped)
                self._dropped = 0
        self._send_backlog()

    def _send_backlog(self) -> None:
        with self._lock:
            if self._client is None or not self._backlog:
                return
            try:
                n = self._client.send(self._backlog)
            except BlockingIOError:
                return
            except OSError:
                self._drop_client_locked()
                return
            del self._backlog[:n]

    def _read_client(self, client: socket.socket) -> None:
        try:
            data = client.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            with self._lock:
                if self._client is client:
                    self._drop_client_locked()
            return
        self._push(data)

    def close(self) -> None:
        super().close()
        with self._lock:
            self._drop_client_locked()
        self._listener.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass


def open_console(spec: str, on_quit: Callable[[], None],
                 on_monitor: Callable[[], None] | None = None) -> Console:
    """``stdio``, ``file:PATH``, ``unix:PATH[,server][,nowait]`` or ``none``."""
    if not isinstance(spec, str):
        raise ConfigError(f"serial = {spec!r}: expected a string")
    if spec == "stdio":
        return StdioConsole(on_quit, on_monitor)
    if spec == "none":
        return NullConsole()
    if spec.startswith("file:") and len(spec) > 5:
        return FileConsole(spec[5:])
    if spec.startswith("unix:"):
        path, *options = spec[5:].split(",")
        bad = [o for o in options if o not in ("server", "server=on", "nowait", "wait=off")]
        if path and not bad:
            return UnixSocketConsole(path)
        if bad:
            raise ConfigError(f"serial = {spec!r}: unsupported option {bad[0]!r} "
                              "(kvmpy listens as a server: unix:PATH[,server][,nowait])")
    raise ConfigError(f"serial = {spec!r}: expected \"stdio\", \"file:PATH\", "
                      "\"unix:PATH[,server]\" or \"none\"")
