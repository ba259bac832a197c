"""The serial console: connects the guest's UART to stdio, a file, a unix socket or nothing.

Wiring (runcmd and the machine do this)::

    console = open_console(spec, on_quit=..., on_monitor=..., events=loop)
    uart = Serial16550(irq=..., out=console.buffered_write, on_rx_space=console.rx_space_available)
    console.attach(uart)
    console.start()          # input served on the loop; or poll console.fileno() and call handle_input()
    ...
    console.close()          # also restores the terminal

The console's descriptors are subscribers of the process's event loop
(kvmpy.events; a console given none makes a loop of its own when first needed).

``write(data)`` goes straight to the file descriptor with os.write, looping on
partial writes. The UART's output callback (called on vCPU threads) is
``buffered_write(data)``: a guest's console emits one byte per THR write, and one
os.write per byte (each waking the reader) cost more than the port exit itself, so
bytes are gathered for at most OUTPUT_DELAY seconds (or OUTPUT_LIMIT bytes) and
written together by a timer on the loop, which never waits for the descriptor (a
terminal or pipe is reopened non-blocking for that). ``flush_output()`` writes them
at once; ``close()``, interpreter exit and a SIGTERM/SIGHUP that ends the process
flush first, so only a SIGKILL (or a crash of the interpreter) can lose output: the
last OUTPUT_DELAY seconds of it (plus, under KVM, what is still in the coalesced
write ring, kvmpy/kvm/coalesced.py). Input is pushed to
the UART with ``uart.receive``, which takes only what fits in its FIFO; the rest
stays pending and no more input is read until the guest drains the FIFO
(``rx_space_available``), so typing or pasting never overruns the guest.

stdio uses QEMU's -nographic keys: Ctrl-A x quits, Ctrl-A c switches between
the guest and the human monitor, Ctrl-A h prints help, Ctrl-A b sends a break,
Ctrl-A Ctrl-A sends Ctrl-A. The terminal is put in raw mode only when stdin is a
tty, and restored on close, at exit and on SIGTERM/SIGHUP.

The monitor side follows QEMU's mux chardev (chardev/char-mux.c): the escapes
work in both modes; while the monitor has the focus, typed bytes go to a line
editor with the "(qemu) " prompt and each line to the HMP interpreter that
``on_monitor()`` returns, run on a worker thread (a command may wait for the
vCPUs; the loop must not); guest output keeps reaching the terminal (the mux
writes every frontend's output whatever the focus), and guest input typed
before the switch stays queued for the guest.
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
import weakref
from typing import Callable, Protocol

from .errors import ConfigError
from .events import EVENT_READ, EVENT_WRITE, EventLoop, TimerHandle, Worker
from .monitor.control import VmControl
from .unixsock import listen_unix

log = logging.getLogger(__name__)

CTRL_A = 0x01
READ_CHUNK = 4096
UNIX_BACKLOG_LIMIT = 64 * 1024
# Guest output is gathered this long (seconds) or up to this many bytes before
# one write: short enough to be invisible when typing, long enough that a burst
# (a boot log) goes out in a few writes instead of one per byte.
OUTPUT_DELAY = 0.01
OUTPUT_LIMIT = 4096
# Input held back by a full guest FIFO is offered again this often (seconds) even
# if the UART never says it has room.
INPUT_RETRY = 0.1

HELP_TEXT = (
    "\r\nC-a h    print this help\r\n"
    "C-a x    exit emulator\r\n"
    "C-a b    send break (magic sysrq)\r\n"
    "C-a c    switch between console and monitor\r\n"
    "C-a C-a  sends C-a\r\n"
)
MONITOR_PROMPT = "(qemu) "


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


def write_some(fd: int, data: bytes) -> int | None:
    """One write without waiting (``fd`` non-blocking): the bytes taken, 0 when
    none fit now, None when the descriptor is gone."""
    try:
        return os.write(fd, data)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError as e:
        if e.errno in (errno.EPIPE, errno.EIO, errno.EBADF, errno.ECONNRESET):
            return None
        raise


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


# Consoles with buffered guest output, flushed at interpreter exit and on a fatal signal.
_live_consoles: "weakref.WeakSet[Console]" = weakref.WeakSet()


def _flush_live_consoles() -> None:
    for con in list(_live_consoles):
        try:
            con.flush_output(blocking=False)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def _on_fatal_signal(signum, frame) -> None:
    _flush_live_consoles()
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
    atexit.register(_flush_live_consoles)   # atexit runs it first
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
class ConsoleUart(Protocol):
    """What the console needs of the UART it feeds."""

    def receive(self, data: bytes) -> int:
        """Take what fits of ``data``; returns how many bytes were taken."""

    def send_break(self) -> None:
        """A break condition on the line (C-a b)."""


class Console:
    """Base class: the UART side (attach, back-pressure), buffered output and input
    served on an event loop (``events``, the process's; without one, a loop of the
    console's own, made when first needed)."""

    kind = "console"

    def __init__(self, events: EventLoop | None = None) -> None:
        self._uart: ConsoleUart | None = None
        self._pending = bytearray()
        self._pending_lock = threading.Lock()
        self._closed = False
        self._started = False
        self._events = events
        self._own_events = False
        self._events_lock = threading.Lock()
        self._input_fd: int | None = None      # subscribed for input (loop thread)
        self._retry: TimerHandle | None = None  # held-back input offered again (loop thread)
        self._out_buf = bytearray()
        self._out_buf_lock = threading.Lock()
        self._flush_scheduled = False          # a flush of _out_buf is due on the loop
        self._flush_lock = threading.Lock()    # one writer at a time: chunks stay in order
        _live_consoles.add(self)
        _install_restore_hooks()      # the exit and SIGTERM flush (set up from the main thread)

    def _loop(self) -> EventLoop:
        with self._events_lock:
            if self._events is None:
                self._events = EventLoop(name=f"console-{self.kind}")
                self._own_events = True
                self._events.start()
            return self._events

    # -- UART side
    def attach(self, uart: ConsoleUart) -> None:
        self._uart = uart

    def rx_space_available(self) -> None:
        """The UART's on_rx_space callback: runs on a vCPU thread, only signals."""
        if self._started:
            self._loop().call_soon(self._update_input)

    def write(self, data: bytes) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _write_some(self, data: bytes) -> int:
        """Write what the descriptor takes now without waiting; returns how many
        bytes are done with (written, or dropped for good)."""
        self.write(data)
        return len(data)

    # -- buffered output (the UART's callback)
    def buffered_write(self, data: bytes) -> None:
        """Queue guest output; written within OUTPUT_DELAY seconds, or now when
        OUTPUT_LIMIT bytes are waiting."""
        schedule = False
        with self._out_buf_lock:
            self._out_buf += data
            now = self._closed or len(self._out_buf) >= OUTPUT_LIMIT
            if not now and not self._flush_scheduled:
                self._flush_scheduled = schedule = True
        if schedule:
            loop = self._loop()
            if loop.closed:
                now = True
            else:
                loop.call_later(OUTPUT_DELAY, self._flush_from_loop)
        if now:
            self.flush_output()

    def _flush_from_loop(self) -> None:
        # Without waiting, on the loop's thread: a terminal that takes nothing now
        # (a paused pipe reader) is tried again every OUTPUT_DELAY; meanwhile the
        # buffer fills up to OUTPUT_LIMIT and the vCPU then waits in flush_output.
        if not self._flush_lock.acquire(blocking=False):
            self._loop().call_later(OUTPUT_DELAY, self._flush_from_loop)
            return
        try:
            with self._out_buf_lock:
                data = bytes(self._out_buf)
                self._out_buf.clear()
            try:
                done = self._write_some(data) if data else 0
            except OSError as e:
                log.warning("console: writing guest output failed: %s; %d bytes dropped", e, len(data))
                done = len(data)
            with self._out_buf_lock:
                if done < len(data):
                    self._out_buf[0:0] = data[done:]
                if not self._out_buf:
                    self._flush_scheduled = False
                    return
        finally:
            self._flush_lock.release()
        self._loop().call_later(OUTPUT_DELAY, self._flush_from_loop)

    def flush_output(self, blocking: bool = True) -> None:
        """Write what buffered_write queued, now. ``blocking=False`` (signal
        handlers, exit hooks) skips when another flush holds the lock."""
        if not self._flush_lock.acquire(blocking):
            return
        try:
            with self._out_buf_lock:
                data = bytes(self._out_buf)
                self._out_buf.clear()
            if data:
                self.write(data)
        finally:
            self._flush_lock.release()

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
        """Serve input on the event loop."""
        if self._started or self._closed or not self._has_input():
            return
        self._started = True
        self._loop().call_soon(self._start_input)

    def _has_input(self) -> bool:
        return self.fileno() is not None

    def _start_input(self) -> None:
        fd = self.fileno()
        if fd is not None and not self._closed:
            self._input_fd = fd
            self._loop().subscribe(fd, EVENT_READ, self._input_ready)

    def _input_ready(self, ready: int) -> None:
        try:
            self.handle_input()
        except Exception:  # noqa: BLE001 - logged; the guest goes on without input
            log.exception("console: input handling failed")
            self._stop_input()
            return
        self._update_input()

    def _input_held(self) -> bool:
        """Offer held-back input again; True while reading more must wait."""
        return bool(self._pending) and not self.flush_pending() and self._guest_has_focus()

    def _update_input(self) -> None:
        """On the loop's thread: read input only while the guest can take it."""
        if self._closed or self._input_fd is None:
            return
        if self.fileno() is None:           # end of input
            self._stop_input()
            return
        held = self._input_held()
        self._loop().modify(self._input_fd, 0 if held or self._input_paused() else EVENT_READ)
        self._retry_while(held)

    def _retry_while(self, held: bool) -> None:
        # The UART says when its FIFO has room (rx_space_available); this is the
        # safety net for a FIFO emptied without saying so (a reset).
        if held and self._retry is None:
            self._retry = self._loop().call_later(INPUT_RETRY, self._retry_held_input)

    def _retry_held_input(self) -> None:
        self._retry = None
        self._update_input()

    def _input_paused(self) -> bool:
        """True while input must wait for something other than the guest (a
        monitor command)."""
        return False

    def _stop_input(self) -> None:
        if self._input_fd is not None:
            self._loop().unsubscribe(self._input_fd)
            self._input_fd = None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _guest_has_focus(self) -> bool:
        """False while input goes elsewhere (the monitor): then a full guest FIFO
        must not stop reading, or the user could not type commands or escapes."""
        return True

    def close(self) -> None:
        if self._closed:
            return
        self.flush_output()
        with self._out_buf_lock:
            self._closed = True
        self.flush_output()       # what a vCPU queued meanwhile
        _live_consoles.discard(self)
        events = self._events
        if events is not None:
            # On the loop's thread, so no input handling is half done when close returns.
            events.call_and_wait(self._stop_input, timeout=2.0)
            if self._own_events:
                events.close()


class NullConsole(Console):
    kind = "none"

    def write(self, data: bytes) -> None:
        pass

    def buffered_write(self, data: bytes) -> None:
        pass


class FileConsole(Console):
    """Output appended to a file (truncated when opened, as QEMU does); no input."""

    kind = "file"

    def __init__(self, path: str, events: EventLoop | None = None) -> None:
        super().__init__(events)
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            super().close()
            raise ConfigError(f"serial = \"file:{path}\": {e.strerror}") from None
        # Our own open file: a FIFO named here then cannot keep the loop waiting
        # (a regular file never does).
        os.set_blocking(self._fd, False)
        self._broken = False

    def write(self, data: bytes) -> None:
        if not self._broken and not write_all(self._fd, data):
            self._gone()

    def _write_some(self, data: bytes) -> int:
        if self._broken:
            return len(data)
        n = write_some(self._fd, data)
        if n is None:
            self._gone()
            return len(data)
        return n

    def _gone(self) -> None:
        self._broken = True
        log.warning("console: writing %s failed; further output dropped", self.path)

    def close(self) -> None:
        super().close()
        try:
            os.close(self._fd)
        except OSError:
            pass


class LineEditor:
    """The part of QEMU's readline (util/readline.c) a terminal user needs at the
    monitor prompt: echo, backspace, Ctrl-D/U/W/K, Ctrl-E, cursor keys, Home/End and
    history. ``feed(byte)`` returns (bytes to echo, the finished line or None).

    Only printable ASCII goes into the line (HMP commands are ASCII); the echo
    uses backspaces and spaces only, so it is right on any terminal and on a pipe.
    """

    MAX_LINE = 4095          # QEMU's READLINE_CMD_BUF_SIZE - 1
    HISTORY = 64

    def __init__(self) -> None:
        self.history: list[str] = []
        self._after_cr = False
        self._esc = b""          # an escape sequence being collected
        self.reset()

    def reset(self) -> None:
        self.buf = bytearray()
        self.pos = 0
        self._hist = len(self.history)
        self._esc = b""

    def feed(self, b: int) -> tuple[bytes, str | None]:
        after_cr, self._after_cr = self._after_cr, b == 0x0D
        if self._esc:
            return self._escape(b), None
        if b in (0x0D, 0x0A):
            if b == 0x0A and after_cr:
                return b"", None     # CR LF from a pipe or a telnet-ish terminal: one line
            line = self.buf.decode("ascii")
            if line.strip() and (not self.history or self.history[-1] != line):
                self.history = (self.history + [line])[-self.HISTORY:]
            self.reset()
            return b"\r\n", line
        if b == 0x1B:
            self._esc = b"\x1b"
            return b"", None
        if b in (0x08, 0x7F):
            return self._delete(self.pos - 1, self.pos), None
        if 0x20 <= b < 0x7F:
            return self._insert(bytes([b])), None
        return {
            0x01: self._home, 0x02: self._left, 0x04: lambda: self._delete(self.pos, self.pos + 1),
            0x05: self._end, 0x06: self._right, 0x0B: lambda: self._delete(self.pos, len(self.buf)),
            0x0E: lambda: self._recall(+1), 0x10: lambda: self._recall(-1),
            0x15: lambda: self._delete(0, self.pos), 0x17: self._delete_word,
        }.get(b, lambda: b"")(), None

    # -- editing; each returns what the terminal needs to show the new state
    def _insert(self, text: bytes) -> bytes:
        text = text[:self.MAX_LINE - len(self.buf)]
        tail = bytes(self.buf[self.pos:])
        self.buf[self.pos:self.pos] = text
        self.pos += len(text)
        return text + tail + b"\b" * len(tail)

    def _delete(self, start: int, end: int) -> bytes:
        start, end = max(start, 0), min(end, len(self.buf))
        if start >= end:
            return b""
        moved = b"\b" * (self.pos - start)
        del self.buf[start:end]
        self.pos = start
        tail = bytes(self.buf[start:])
        gone = end - start
        return moved + tail + b" " * gone + b"\b" * (len(tail) + gone)

    def _delete_word(self) -> bytes:
        start = self.pos
        while start > 0 and self.buf[start - 1] == 0x20:
            start -= 1
        while start > 0 and self.buf[start - 1] != 0x20:
            start -= 1
        return self._delete(start, self.pos)

    def _home(self) -> bytes:
        moved, self.pos = b"\b" * self.pos, 0
        return moved

    def _end(self) -> bytes:
        rest, self.pos = bytes(self.buf[self.pos:]), len(self.buf)
        return rest

    def _left(self) -> bytes:
        if self.pos == 0:
            return b""
        self.pos -= 1
        return b"\b"

    def _right(self) -> bytes:
        if self.pos >= len(self.buf):
            return b""
        self.pos += 1
        return self.buf[self.pos - 1:self.pos]

    def _recall(self, step: int) -> bytes:
        index = self._hist + step
        if not 0 <= index <= len(self.history):
            return b""
        self._hist = index
        line = self.history[index].encode() if index < len(self.history) else b""
        erase = self._home() + b" " * len(self.buf) + b"\b" * len(self.buf)
        self.buf = bytearray()
        return erase + self._insert(line)

    def _escape(self, b: int) -> bytes:
        self._esc += bytes([b])
        seq = self._esc
        if len(seq) == 2:
            if b in (0x5B, 0x4F):        # ESC [ (CSI) or ESC O (SS3): more to come
                return b""
            self._esc = b""              # ESC and one byte (Alt-key): nothing QEMU does
            return b""
        if 0x30 <= b <= 0x3F and len(seq) < 16:
            return b""                   # parameter bytes
        self._esc = b""
        action = {b"A": lambda: self._recall(-1), b"B": lambda: self._recall(+1),
                  b"C": self._right, b"D": self._left, b"H": self._home, b"F": self._end,
                  b"1~": self._home, b"7~": self._home, b"4~": self._end, b"8~": self._end,
                  b"3~": lambda: self._delete(self.pos, self.pos + 1)}.get(seq[2:])
        return action() if action is not None else b""


class MonitorInterpreter(Protocol):
    """What ``on_monitor()`` returns: the human monitor (monitor/hmp.py's Hmp with
    ``defer_quit``, whose ``quit`` only sets ``quit_requested``)."""

    quit_requested: bool
    control: VmControl

    def execute(self, line: str) -> str: ...


class StdioConsole(Console):
    kind = "stdio"

    def __init__(self, on_quit: Callable[[], None],
                 on_monitor: Callable[[], MonitorInterpreter | None] | None = None,
                 in_fd: int = 0, out_fd: int = 1, events: EventLoop | None = None) -> None:
        """``on_monitor()`` is called at each switch to the monitor and returns the
        HMP interpreter, or None when there is none."""
        super().__init__(events)
        self.on_quit = on_quit
        self.on_monitor = on_monitor
        self.in_fd = in_fd
        self.out_fd = out_fd
        self._write_fd, self._own_write_fd = _nonblocking_writer(out_fd)
        self._got_escape = False
        self._eof = False
        self._broken = False
        self._out_lock = threading.Lock()
        self._monitor: MonitorInterpreter | None = None   # while the monitor has the focus
        self._monitor_opened = False
        self._editor = LineEditor()
        # Monitor commands may wait for the vCPUs (stop, info registers): they run on
        # this worker, never on the loop; keys typed meanwhile wait in _held_keys.
        self._commands = Worker(f"console-{self.kind}-monitor")
        self._command_running = False
        self._held_keys = b""
        self.is_tty = os.isatty(in_fd)
        if self.is_tty:
            make_raw(in_fd)

    def write(self, data: bytes) -> None:
        if self._broken:
            return
        with self._out_lock:
            if not write_all(self._write_fd, data):
                self._broken = True

    def _write_some(self, data: bytes) -> int:
        if self._broken:
            return len(data)
        if not self._out_lock.acquire(blocking=False):
            return 0            # another writer waits for the terminal: not the loop too
        try:
            n = write_some(self._write_fd, data)
        finally:
            self._out_lock.release()
        if n is None:
            self._broken = True
            return len(data)
        return n

    def _message(self, text: str) -> None:
        self.flush_output()     # after the guest output it follows
        self.write(text.encode())

    def fileno(self) -> int | None:
        return None if self._eof or self._closed else self.in_fd

    def _guest_has_focus(self) -> bool:
        return self._monitor is None

    def _input_paused(self) -> bool:
        return self._command_running

    def handle_input(self) -> None:
        if self._pending and not self.flush_pending() and self._monitor is None:
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
        """Apply the C-a escapes and feed the monitor; returns the bytes meant for the guest.

        A monitor line handed to the worker holds the keys after it until the
        command is done (they may switch focus, quit or be the next command)."""
        if self._command_running:
            self._held_keys += data
            return b""
        out = bytearray()
        for i, b in enumerate(data):
            if self._got_escape:
                self._got_escape = False
                if b == CTRL_A:
                    if self._monitor is not None:
                        if self._monitor_key(b):
                            self._held_keys = bytes(data[i + 1:])
                            break
                    else:
                        out.append(CTRL_A)
                elif b in (ord("x"), ord("X")):
                    self._flush_to_guest(out)
                    self._message("kvmpy: terminated\r\n")
                    self.on_quit()
                elif b in (ord("c"), ord("C")):
                    self._flush_to_guest(out)
                    self._switch_focus()
                elif b in (ord("h"), ord("H"), ord("?")):
                    self._message(HELP_TEXT)
                elif b in (ord("b"), ord("B")):
                    # QEMU sends the break to the frontend with the focus: the monitor ignores it
                    if self._monitor is None:
                        self._flush_to_guest(out)
                        if self._uart is not None:
                            self._uart.send_break()
                # anything else after C-a is dropped, as in QEMU
            elif b == CTRL_A:
                self._got_escape = True
            elif self._monitor is not None:
                if self._monitor_key(b):
                    self._held_keys = bytes(data[i + 1:])
                    break
            else:
                out.append(b)
        return bytes(out)

    def _switch_focus(self) -> None:
        if self._monitor is not None:
            self._monitor = None
            self._message("\r\n")      # QEMU's monitor ends its line on MUX_OUT
            return
        monitor = self.on_monitor() if self.on_monitor is not None else None
        if monitor is None:
            self._message("\r\nmonitor not available\r\n")
            return
        self._monitor = monitor
        self._editor.reset()            # as QEMU's readline_restart: a half-typed line is dropped
        text = MONITOR_PROMPT
        if not self._monitor_opened:
            from .monitor.hmp import BANNER
            self._monitor_opened = True
            text = BANNER + "\r\n" + text
        self._message(text)

    def _monitor_key(self, b: int) -> bool:
        """Feed one key to the line editor; True when it ended a line that went to
        the worker (the keys after it must wait)."""
        echo, line = self._editor.feed(b)
        if echo:
            self.flush_output()
            self.write(echo)
        if line is None:
            return False
        monitor = self._monitor
        if not self._started:           # no loop serves us: the caller's thread may wait
            self._run_command(monitor, line)
            return False
        self._command_running = True
        self._commands.submit(lambda: self._run_command_then_resume(monitor, line))
        return True

    def _run_command(self, monitor: MonitorInterpreter, line: str) -> None:
        out = monitor.execute(line)
        if out:
            self._message(out.replace("\n", "\r\n"))
        if monitor.quit_requested:
            # deferred so the output above is out before the VM goes away
            monitor.quit_requested = False
            monitor.control.quit()
            return
        if self._monitor is monitor:
            self._message(MONITOR_PROMPT)

    def _run_command_then_resume(self, monitor: MonitorInterpreter, line: str) -> None:
        try:
            self._run_command(monitor, line)
        finally:
            self._loop().call_soon(self._command_done)

    def _command_done(self) -> None:
        self._command_running = False
        keys, self._held_keys = self._held_keys, b""
        if keys:
            to_guest = self.process_keys(keys)
            if to_guest:
                self._push(to_guest)
        self._update_input()

    def _flush_to_guest(self, out: bytearray) -> None:
        # keep ordering: bytes typed before an escape reach the UART first
        if out:
            self._push(bytes(out))
            out.clear()

    def close(self) -> None:
        super().close()
        self._commands.close()
        if self._own_write_fd:
            os.close(self._write_fd)
        if self.is_tty:
            restore_terminal(self.in_fd)


class SocketConsole(Console):
    """A listening socket; one client at a time gets output and sends input (QEMU's
    ``server`` chardevs). The subclasses make the listener.

    Output with no client connected (or that a slow client has not taken yet)
    is kept up to ``backlog_limit`` bytes, oldest dropped first, and delivered
    when a client connects, so a late ``socat`` still sees the boot log tail.
    """

    kind = "socket"

    def __init__(self, listener: socket.socket, label: str, backlog_limit: int = UNIX_BACKLOG_LIMIT,
                 events: EventLoop | None = None) -> None:
        super().__init__(events)
        self.label = label
        self.backlog_limit = backlog_limit
        self._backlog = bytearray()
        self._dropped = 0
        self._lock = threading.Lock()
        self._client: socket.socket | None = None
        self._client_fd = -1
        self._listener = listener
        self._listener.setblocking(False)

    def _on_connect(self, conn: socket.socket) -> None:
        """A new client, before it gets the backlog."""

    def _filter_input(self, data: bytes) -> bytes:
        """What of the client's bytes is the guest's input."""
        return data

    @property
    def connected(self) -> bool:
        return self._client is not None

    def write(self, data: bytes) -> None:
        """Never waits: what the client does not take now goes to the backlog."""
        wants_writable = False
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
                wants_writable = self._client is not None and not self._backlog
                self._backlog += data
                excess = len(self._backlog) - self.backlog_limit
                if excess > 0:
                    del self._backlog[:excess]
                    self._dropped += excess
        if wants_writable and self._started:
            self._loop().call_soon(self._update_input)   # the loop sends the rest when writable

    def _drop_client_locked(self) -> None:
        if self._client is None:
            return
        fd = self._client.detach()
        self._client = None
        self._client_fd = -1
        if self._started:
            self._loop().unsubscribe(fd, close=True)    # closed once the loop has forgotten it
        else:
            os.close(fd)

    def fileno(self) -> int | None:
        return None  # several descriptors: use start()

    def _has_input(self) -> bool:
        return True

    def _start_input(self) -> None:
        if not self._closed:
            self._loop().subscribe(self._listener.fileno(), EVENT_READ, lambda ready: self._accept())

    def _update_input(self) -> None:
        """On the loop's thread: read the client only while the guest can take its
        input; wait for it to be writable while output is backlogged."""
        if self._closed:
            return
        held = self._input_held()
        with self._lock:
            client, fd = self._client, self._client_fd
            if client is None:
                return
            events = (0 if held else EVENT_READ) | (EVENT_WRITE if self._backlog else 0)
        self._loop().modify(fd, events)
        self._retry_while(held)

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, OSError):
            return
        with self._lock:
            if self._client is not None:
                log.info("console: %s already has a client; refusing another", self.label)
                conn.close()
                return
            conn.setblocking(False)
            self._on_connect(conn)
            self._client, self._client_fd = conn, conn.fileno()
            if self._dropped:
                log.info("console: %d bytes of output dropped before a client connected",
                         self._dropped)
                self._dropped = 0
        self._loop().subscribe(conn.fileno(), EVENT_READ,
                               lambda ready: self._client_ready(conn, ready))
        self._send_backlog()
        self._update_input()

    def _client_ready(self, client: socket.socket, ready: int) -> None:
        if self._client is not client:
            return
        if ready & EVENT_WRITE:
            self._send_backlog()
        if ready & EVENT_READ:
            self._read_client(client)
        self._update_input()

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
        data = self._filter_input(data)
        if data:
            self._push(data)

    def _stop_input(self) -> None:
        super()._stop_input()
        with self._lock:
            self._drop_client_locked()
        if self._started:
            self._loop().unsubscribe(self._listener.fileno())

    def close(self) -> None:
        super().close()
        with self._lock:
            self._drop_client_locked()
        self._listener.close()


class UnixSocketConsole(SocketConsole):
    """``unix:PATH``: the listening socket is a file, born 0600 and removed at close."""

    kind = "unix"

    def __init__(self, path: str, backlog_limit: int = UNIX_BACKLOG_LIMIT,
                 events: EventLoop | None = None) -> None:
        self.path = path
        try:
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode):
                os.unlink(path)  # a stale socket from an earlier run
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ConfigError(f"serial = \"unix:{path}\": {e.strerror}") from None
        # The console is the guest's keyboard: whoever may connect may type into the
        # guest. 0600 before it can be connected to, as the monitors' sockets are.
        try:
            listener = listen_unix(path, 1, mode=0o600)
        except OSError as e:
            raise ConfigError(f"serial = \"unix:{path}\": {e.strerror}") from None
        st = os.lstat(path)
        # Which file is ours, for a cleanup helper that removes it after we are gone.
        self.socket_identity = (st.st_dev, st.st_ino)
        super().__init__(listener, path, backlog_limit, events)

    def close(self) -> None:
        super().close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass


# Telnet (RFC 854): what a telnet client is told on connect, as QEMU's telnet chardev
# tells it: the server echoes and suppresses go-ahead (character mode), no linemode.
IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
TELNET_ECHO, TELNET_SGA, TELNET_LINEMODE = 1, 3, 34
TELNET_GREETING = bytes([IAC, WILL, TELNET_ECHO, IAC, WILL, TELNET_SGA, IAC, DO, TELNET_SGA,
                         IAC, DONT, TELNET_LINEMODE])


class TelnetInput:
    """Strips telnet commands from a client's byte stream, across reads: IAC IAC is
    a 0xff data byte, option negotiation and subnegotiation are dropped, and a CR
    followed by NUL (a telnet client's bare Enter) is the CR alone."""

    def __init__(self) -> None:
        self._state = "data"

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        state = self._state
        for b in data:
            if state == "data":
                if b == IAC:
                    state = "iac"
                else:
                    out.append(b)
                    if b == 0x0D:
                        state = "cr"
            elif state == "cr":
                state = "data"
                if b == IAC:
                    state = "iac"
                elif b != 0:
                    out.append(b)
                    if b == 0x0D:
                        state = "cr"
            elif state == "iac":
                if b == IAC:
                    out.append(IAC)
                    state = "data"
                elif b in (WILL, WONT, DO, DONT):
                    state = "option"
                elif b == SB:
                    state = "sb"
                else:
                    state = "data"
            elif state == "option":
                state = "data"
            elif state == "sb":
                if b == IAC:
                    state = "sb-iac"
            elif state == "sb-iac":
                state = "data" if b == SE else "sb"
        self._state = state
        return bytes(out)


class TcpConsole(SocketConsole):
    """``tcp:HOST:PORT`` / ``telnet:HOST:PORT`` (QEMU's ``-serial telnet:...,server,nowait``):
    a listening TCP socket, the guest's console to whoever connects; the guest runs
    without a client (nowait). An empty host is 127.0.0.1: the console is the guest's
    keyboard, so listening beyond loopback must be spelt out."""

    kind = "tcp"

    def __init__(self, host: str, port: int, telnet: bool = False, nodelay: bool = False,
                 backlog_limit: int = UNIX_BACKLOG_LIMIT, events: EventLoop | None = None) -> None:
        self.telnet = telnet
        self.nodelay = nodelay
        spec = f"{'telnet' if telnet else 'tcp'}:{host}:{port}"
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(host or "127.0.0.1", port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
        except (socket.gaierror, UnicodeError) as e:
            raise ConfigError(f"serial = \"{spec}\": cannot resolve {host!r}: {e}") from None
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(sockaddr)
            listener.listen(1)
        except OSError as e:
            listener.close()
            raise ConfigError(f"serial = \"{spec}\": cannot listen: {e.strerror}") from None
        self.address = listener.getsockname()[:2]      # the port the kernel chose for port 0
        if not ipaddress_is_loopback(self.address[0]):
            log.warning("serial console on %s listens beyond loopback: anyone who can reach it types "
                        "into the guest", spec)
        self._telnet_input = TelnetInput()
        super().__init__(listener, spec, backlog_limit, events)

    def _on_connect(self, conn: socket.socket) -> None:
        if self.nodelay:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._telnet_input = TelnetInput()
        if self.telnet:
            try:
                conn.send(TELNET_GREETING)
            except OSError:
                pass        # a client gone at once is noticed at its first read

    def _filter_input(self, data: bytes) -> bytes:
        return self._telnet_input.feed(data) if self.telnet else data


def ipaddress_is_loopback(host: str) -> bool:
    import ipaddress
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _nonblocking_writer(fd: int) -> tuple[int, bool]:
    """A descriptor writing where ``fd`` does that never makes the writer wait:
    (fd, whether we opened it). A terminal or a pipe is opened again as our own,
    non-blocking, open file: setting O_NONBLOCK on an inherited stdout would
    change it for the shell and everyone else sharing it. A regular file or a
    device never keeps a writer waiting for long, and is written as it is."""
    try:
        if os.isatty(fd):
            path = os.ttyname(fd)
        elif stat.S_ISFIFO(os.fstat(fd).st_mode):
            path = f"/proc/self/fd/{fd}"
        else:
            return fd, False
        return os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC), True
    except OSError as e:
        log.debug("console: fd %d cannot be reopened non-blocking (%s); writing it as it is", fd, e)
        return fd, False


def open_console(spec: str, on_quit: Callable[[], None],
                 on_monitor: Callable[[], MonitorInterpreter | None] | None = None,
                 events: EventLoop | None = None) -> Console:
    """``stdio``, ``file:PATH``, ``unix:PATH[,server][,nowait]``,
    ``tcp:HOST:PORT[,server,nowait,nodelay]``, ``telnet:HOST:PORT[,...]`` or ``none``;
    served on ``events`` (the process's loop) when given."""
    if not isinstance(spec, str):
        raise ConfigError(f"serial = {spec!r}: expected a string")
    if spec == "stdio":
        return StdioConsole(on_quit, on_monitor, events=events)
    if spec == "none":
        return NullConsole(events)
    if spec.startswith("file:") and len(spec) > 5:
        return FileConsole(spec[5:], events)
    if spec.startswith("unix:"):
        path, *options = spec[5:].split(",")
        bad = [o for o in options if o not in ("server", "server=on", "nowait", "wait=off")]
        if path and not bad:
            return UnixSocketConsole(path, events=events)
        if bad:
            raise ConfigError(f"serial = {spec!r}: unsupported option {bad[0]!r} "
                              "(kvmpy listens as a server: unix:PATH[,server][,nowait])")
    if spec.startswith(("tcp:", "telnet:")):
        return _open_tcp_console(spec, events)
    raise ConfigError(f"serial = {spec!r}: expected \"stdio\", \"file:PATH\", "
                      "\"unix:PATH[,server]\", \"tcp:HOST:PORT[,server,nowait]\", "
                      "\"telnet:HOST:PORT[,server,nowait]\" or \"none\"")


def _open_tcp_console(spec: str, events: EventLoop | None) -> TcpConsole:
    head, *options = spec.split(",")
    kind, _, address = head.partition(":")
    allowed = ("server", "server=on", "nowait", "wait=off", "nodelay", "nodelay=on", "telnet", "telnet=on")
    bad = [o for o in options if o not in allowed]
    if bad:
        raise ConfigError(f"serial = {spec!r}: unsupported option {bad[0]!r} (kvmpy listens and does not "
                          "wait for a client: server,nowait[,nodelay])")
    if address.startswith("["):
        host, bracket, port_text = address[1:].partition("]")
        port_text = port_text[1:] if bracket and port_text.startswith(":") else ""
    else:
        host, colon, port_text = address.rpartition(":")
        port_text = port_text if colon else ""      # QEMU's tcp::PORT, never tcp:PORT
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"serial = {spec!r}: expected {kind}:HOST:PORT with a port number 0-65535")
    telnet = kind == "telnet" or any(o.startswith("telnet") for o in options)
    nodelay = any(o.startswith("nodelay") for o in options)
    return TcpConsole(host, int(port_text), telnet=telnet, nodelay=nodelay, events=events)
