"""Test scaffolding for `kvmpy nbd`: start the real command, and a raw-socket NBD
client for the hostile cases no real client would send."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 2, 3, 5, 6, 7, 8
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = (1 << 31) | 1, (1 << 31) | 2, (1 << 31) | 3
REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = (1 << 31) | 6, (1 << 31) | 9
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)
EPERM, EIO, EINVAL, ENOSPC = 1, 5, 22, 28


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tcp_listening(port: int) -> bool:
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if fields[1].endswith(want) and fields[3] == "0A":
                        return True
        except OSError:
            pass
    return False


class NbdServerProcess:
    """`python3 -m kvmpy nbd ...` in the background; knows when it listens without
    connecting (a probe would be a client, and end a non-persistent server)."""

    def __init__(self, args: list[str], *, port: int | None = None, socket_path: str | None = None,
                 cwd: str | None = None, listen_args: list[str] | None = None):
        self.port = port
        self.socket_path = socket_path
        listen = ["-k", socket_path] if socket_path else ["-b", "127.0.0.1", "-p", str(port)]
        if listen_args is not None:      # the test names the address itself
            listen = listen_args + ([] if socket_path else ["-p", str(port)])
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "-v", "nbd", *listen, *args],
                                     cwd=cwd or ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not self.listening():
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise RuntimeError(f"kvmpy nbd exited {self.proc.returncode}: {err.decode()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("kvmpy nbd did not listen within 20 s")
            time.sleep(0.05)

    @property
    def uri(self) -> str:
        if self.socket_path:
            return f"nbd+unix:///?socket={self.socket_path}"
        return f"nbd://127.0.0.1:{self.port}"

    def listening(self) -> bool:
        if self.socket_path:
            return os.path.exists(self.socket_path)
        return _tcp_listening(self.port)

    def connect(self, timeout: float = 10.0) -> socket.socket:
        if self.socket_path:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(self.socket_path)
        else:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return s

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise
        return self.proc.returncode, err.decode(errors="replace")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.stop()


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def closed_by_server(s: socket.socket, timeout: float = 10.0) -> bool:
    """True once the server closes (reading whatever it still sends), False on timeout.
    Our end is closed either way."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
        return True
    except socket.timeout:
        return False
    except OSError:
        return True
    finally:
        s.close()


def greet(s: socket.socket) -> None:
    magic, opt, flags = struct.unpack(">QQH", recv_exact(s, 18))
    assert (magic, opt) == (NBDMAGIC, IHAVEOPT) and flags & 1
    s.sendall(struct.pack(">I", 3))     # fixed newstyle, no zeroes


def send_option(s: socket.socket, option: int, data: bytes = b"") -> None:
    s.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)


def option_reply(s: socket.socket) -> tuple[int, int, bytes]:
    magic, option, reply, length = struct.unpack(">QIII", recv_exact(s, 20))
    assert magic == OPTION_REPLY_MAGIC
    return option, reply, recv_exact(s, length)


class OptionRefused(Exception):
    def __init__(self, reply: int, message: bytes):
        super().__init__(f"option refused: {reply:#x} {message!r}")
        self.reply = reply


def go(s: socket.socket, name: bytes = b"", structured: bool = True, allocation: bool = False) -> tuple[int, int]:
    """Greet, negotiate, enter transmission: (size, transmission flags)."""
    greet(s)
    if structured:
        send_option(s, OPT_STRUCTURED_REPLY)
        assert option_reply(s)[1] == REP_ACK
    if allocation:
        q = b"base:allocation"
        send_option(s, OPT_SET_META_CONTEXT,
                    struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(q)) + q)
        replies = []
        while True:
            _, rep, data = option_reply(s)
            if rep == REP_ACK:
                break
            replies.append((rep, data))
        assert replies and replies[0][0] == REP_META_CONTEXT
    send_option(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    size = flags = None
    while True:
        _, rep, data = option_reply(s)
        if rep == REP_ACK:
            return size, flags
        if rep & (1 << 31):
            raise OptionRefused(rep, data)
        assert rep == REP_INFO, hex(rep)
        if struct.unpack(">H", data[:2])[0] == 0:
            _, size, flags = struct.unpack(">HQH", data)


def request(s: socket.socket, cmd: int, offset: int, length: int, cookie: int = 1, flags: int = 0,
            data: bytes = b"") -> None:
    s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data)


def reply(s: socket.socket, read_length: int = 0) -> tuple[int, bytes, list]:
    """(error, data, chunks) of one reply, simple or all of a structured one."""
    magic = struct.unpack(">I", recv_exact(s, 4))[0]
    if magic == SIMPLE_REPLY_MAGIC:
        error, _cookie = struct.unpack(">IQ", recv_exact(s, 12))
        return error, (recv_exact(s, read_length) if not error and read_length else b""), []
    assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
    chunks = []
    error = 0
    while True:
        flags, kind, _cookie, length = struct.unpack(">HHQI", recv_exact(s, 16))
        body = recv_exact(s, length)
        chunks.append((kind, body))
        if kind & 0x8000:
            error = struct.unpack(">I", body[:4])[0]
        if flags & 1:
            return error, b"", chunks
        magic = struct.unpack(">I", recv_exact(s, 4))[0]
        assert magic == STRUCTURED_REPLY_MAGIC


def assemble_read(offset: int, length: int, chunks: list) -> bytes:
    """The bytes a structured READ reply describes (data and hole chunks)."""
    out = bytearray(length)
    covered = 0
    for kind, body in chunks:
        if kind == 1:
            at = struct.unpack(">Q", body[:8])[0] - offset
            out[at:at + len(body) - 8] = body[8:]
            covered += len(body) - 8
        elif kind == 2:
            covered += struct.unpack(">QI", body)[1]
    assert covered == length, (covered, length)
    return bytes(out)


def admitted(srv: NbdServerProcess, patience: float = 15.0, **go_args) -> socket.socket:
    """A connection in transmission, retried while the server says its --shared
    slots are full (hostile clients it just dropped may still hold them)."""
    deadline = time.monotonic() + patience
    while True:
        s = srv.connect()
        try:
            go(s, **go_args)
            return s
        except OptionRefused as e:
            s.close()
            if e.reply != REP_ERR_POLICY or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
