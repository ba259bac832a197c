"""Socket plumbing shared by the QMP and human monitor servers.

The listening socket and every client are subscribers of the process's event
loop (kvmpy.events; a server given none makes a loop of its own); one dispatch
worker per server runs monitor commands in arrival order. The split matters: a
command such as ``stop`` waits for every vCPU to leave KVM_RUN, which the loop
must never do, and while it waits the loop keeps reading, writing and
broadcasting events. Nothing a vCPU thread calls (event callbacks) does more
than queue a call on the loop.

Client sockets are non-blocking; each has bounded input (the protocol decides
what a message is) and bounded output (a client that stops reading while events
pile up is dropped, not buffered forever).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError
from ..events import EVENT_READ, EVENT_WRITE, EventLoop, Worker
from ..unixsock import listen_unix

log = logging.getLogger(__name__)

MAX_PENDING_OUTPUT = 16 << 20


@dataclass(frozen=True)
class Address:
    """A parsed monitor address: ``unix:/path`` or ``tcp:HOST:PORT``/``telnet:HOST:PORT``."""

    kind: str            # "unix" | "tcp"
    path: str = ""
    host: str = ""
    port: int = 0
    telnet: bool = False

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'telnet' if self.telnet else 'tcp'}:{host}:{self.port}"


def parse_address(spec: str, *, option: str = "monitor") -> Address:
    """Parse a QEMU-style chardev address. Trailing QEMU options such as
    ``,server,nowait`` / ``,server=on,wait=off`` are accepted and ignored: this
    side is always the listening server and never waits for a client.

    An empty TCP host means 127.0.0.1, not every interface: a monitor grants full
    control of the VM, so exposing it beyond loopback must be spelled out.
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"{option}: empty address (expected unix:/path or tcp:HOST:PORT)")
    head, _, opts = spec.partition(",")
    for opt in filter(None, opts.split(",")):
        key = opt.partition("=")[0]
        if key not in ("server", "nowait", "wait", "nodelay", "telnet"):
            raise ConfigError(f"{option}: unknown address option {opt!r} in {spec!r}")
    kind, sep, rest = head.partition(":")
    if not sep:
        raise ConfigError(f"{option}: {spec!r} is not unix:/path or tcp:HOST:PORT")
    if kind == "unix":
        if not rest:
            raise ConfigError(f"{option}: {spec!r} has no socket path")
        if "\0" in rest or len(os.fsencode(rest)) > 107:
            raise ConfigError(f"{option}: socket path {rest!r} is too long (107 bytes at most)")
        return Address("unix", path=rest)
    if kind in ("tcp", "telnet"):
        if rest.startswith("["):
            host, bracket, port_s = rest[1:].partition("]")
            if not bracket or not port_s.startswith(":"):
                raise ConfigError(f"{option}: {spec!r} has a malformed [IPv6] host")
            port_s = port_s[1:]
        else:
            host, colon, port_s = rest.rpartition(":")
            if not colon:
                raise ConfigError(f"{option}: {spec!r} has no port (tcp:HOST:PORT)")
        try:
            port = int(port_s, 10)
        except ValueError:
            raise ConfigError(f"{option}: port {port_s!r} in {spec!r} is not a number") from None
        if not 0 <= port <= 65535:
            raise ConfigError(f"{option}: port {port} in {spec!r} is out of range")
        telnet = kind == "telnet" or "telnet" in opts.split(",")
        return Address("tcp", host=host or "127.0.0.1", port=port, telnet=telnet)
    raise ConfigError(f"{option}: unknown address type {kind!r} in {spec!r} (use unix: or tcp:)")


def _listen(addr: Address) -> socket.socket:
    if addr.kind == "unix":
        _remove_stale_unix_socket(addr.path)
        # Connecting needs write permission on the socket file, and a monitor is full
        # control of the VM: the file is 0600 before it can be connected to.
        try:
            sock = listen_unix(addr.path, 16, mode=0o600)
        except OSError as e:
            raise ConfigError(f"monitor: cannot bind {addr}: {e.strerror}") from None
    else:
        try:
            infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise ConfigError(f"monitor: cannot resolve {addr.host!r}: {e.strerror}") from None
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as e:
            sock.close()
            raise ConfigError(f"monitor: cannot bind {addr}: {e.strerror}") from None
        if not _is_loopback(sockaddr[0]):
            log.warning("monitor on %s listens beyond loopback: anyone who can reach it "
                        "controls the VM", addr)
        sock.listen(16)
    sock.setblocking(False)
    return sock


def _is_loopback(host: str) -> bool:
    import ipaddress
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


def _remove_stale_unix_socket(path: str) -> None:
    """A socket file left by a VM that died is removed; one with a live listener,
    or a path that is not a socket at all, is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"monitor: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError as e:
        raise ConfigError(f"monitor: {path}: {e.strerror}") from None
    finally:
        probe.close()
    raise ConfigError(f"monitor: {path} is in use by another process")


class Connection:
    """One client. Its methods are called on the loop's thread only, except
    ``post``, ``post_close`` and ``wait_flushed``, which any thread may call."""

    def __init__(self, server: "MonitorServer", sock: socket.socket, peer: str):
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.closed = False
        self.closing = False         # close once the output is written
        self.eof = False             # the client will send nothing more
        self.state: object = None    # protocol-owned per-connection state
        self._out = bytearray()
        self._flushed_waiters: list[threading.Event] = []

    # -- any thread --
    def post(self, data: bytes) -> None:
        self.server.call_soon(lambda: self.write(data))

    def post_close(self) -> None:
        """Close after everything posted so far has been written."""
        self.server.call_soon(self.close_when_flushed)

    def wait_flushed(self, timeout: float) -> bool:
        """From a thread other than the loop's: wait until everything posted so far is written."""
        done = threading.Event()
        if self.server._stopping:
            return True

        def arm() -> None:
            if self.closed or not self._out:
                done.set()
            else:
                self._flushed_waiters.append(done)
        self.server.call_soon(arm)
        return done.wait(timeout)

    # -- loop thread --
    def write(self, data: bytes) -> None:
        if self.closed:
            return
        self._out += data
        if len(self._out) > MAX_PENDING_OUTPUT:
            log.warning("monitor client %s is not reading; dropping it", self.peer)
            self.close()
            return
        self._flush()

    def close_when_flushed(self) -> None:
        if self.closed:
            return
        self.closing = True
        if not self._out:
            self.close()

    def _flush(self) -> None:
        while self._out and not self.closed:
            try:
                n = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.debug("monitor client %s: send: %s", self.peer, e)
                self.close()
                return
            del self._out[:n]
        if self.closed:
            return
        if not self._out:
            for ev in self._flushed_waiters:
                ev.set()
            self._flushed_waiters.clear()
            if self.closing:
                self.close()
                return
        self.server._update_interest(self)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for ev in self._flushed_waiters:
            ev.set()
        self._flushed_waiters.clear()
        self.server._forget(self)
        try:
            self.sock.close()
        except OSError:
            pass
        try:
            self.server.protocol_closed(self)
        except Exception:
            log.exception("monitor: error while closing client %s", self.peer)

    def wants_write(self) -> bool:
        return bool(self._out)


class MonitorServer:
    """Listening socket + loop subscribers + a dispatch worker. Subclasses implement
    ``protocol_connected``, ``protocol_data``, ``protocol_eof``, ``protocol_closed``."""

    thread_name = "monitor"

    def __init__(self, spec: str | Address):
        self.address = spec if isinstance(spec, Address) else parse_address(spec)
        self._listener = _listen(self.address)
        self._socket_identity = None
        if self.address.kind == "unix":
            st = os.lstat(self.address.path)
            self._socket_identity = (st.st_dev, st.st_ino)
        if self.address.kind == "tcp":
            # Report the real port when 0 asked the kernel to pick one.
            host, port = self._listener.getsockname()[:2]
            self.address = Address("tcp", host=host, port=port, telnet=self.address.telnet)
        self._events: EventLoop | None = None
        self._own_events = False
        self._dispatch = Worker(f"{self.thread_name}-dispatch")
        self._conns: dict[int, Connection] = {}
        self._stopping = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._torn_down = False

    def start(self, events: EventLoop | None = None) -> "MonitorServer":
        """Serve on ``events`` (the process's loop), or on a loop of its own."""
        if events is None:
            events = EventLoop(name=f"{self.thread_name}-io")
            self._own_events = True
        self._events = events
        events.subscribe(self._listener.fileno(), EVENT_READ, lambda ready: self._accept())
        events.start()
        return self

    # -- any thread --
    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run fn on the loop's thread. Safe from any thread, vCPU threads included;
        dropped once the server is closing."""
        if self._stopping or self._events is None:
            return

        def guarded() -> None:
            if not self._torn_down:
                fn()
        self._events.call_soon(guarded)

    def submit(self, job: Callable[[], None]) -> None:
        """Run job on the dispatch worker, after every job submitted before it."""
        if not self._stopping:
            self._dispatch.submit(job)

    def client_count(self) -> int:
        return len(self._conns)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the dispatch worker, drop every client, remove the unix socket file.
        Safe to call twice, from the dispatch worker itself (``quit``) and from the loop."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._stopping = True
        self._dispatch.close(timeout)
        events = self._events
        if events is None:
            self._teardown()
            return
        if not events.call_and_wait(self._teardown, timeout):
            log.warning("monitor %s: the event loop did not answer within %.0f s; "
                        "clients are dropped when it does", self.address, timeout)
        if self._own_events:
            events.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- protocol hooks (loop thread) --
    def protocol_connected(self, conn: Connection) -> None:
        raise NotImplementedError

    def protocol_data(self, conn: Connection, data: bytes) -> None:
        raise NotImplementedError

    def protocol_eof(self, conn: Connection) -> None:
        conn.post_close()

    def protocol_closed(self, conn: Connection) -> None:
        pass

    # -- internals (loop thread) --
    def _accept(self) -> None:
        while not self._stopping:
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # EMFILE and friends: refuse this one, keep serving the others.
                log.warning("monitor %s: accept: %s", self.address, e)
                return
            sock.setblocking(False)
            conn = Connection(self, sock, str(peer) or "unix-client")
            self._conns[conn.fd] = conn
            self._events.subscribe(conn.fd, EVENT_READ, lambda ready, conn=conn: self._ready(conn, ready))
            try:
                self.protocol_connected(conn)
            except Exception:
                log.exception("monitor %s: error greeting client", self.address)
                conn.close()

    def _ready(self, conn: Connection, ready: int) -> None:
        if ready & EVENT_WRITE:
            conn._flush()
        if ready & EVENT_READ and not conn.closed:
            self._read(conn)

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno not in (errno.ECONNRESET, errno.EPIPE):
                log.debug("monitor client %s: recv: %s", conn.peer, e)
            conn.close()
            return
        if not data:
            # Half-closed: stop reading; commands already received still run
            # and their output is still written (`echo cmd | nc -N -U sock`).
            conn.eof = True
            self._update_interest(conn)
            self.protocol_eof(conn)
            return
        try:
            self.protocol_data(conn, data)
        except Exception:
            log.exception("monitor %s: error handling input from %s", self.address, conn.peer)
            conn.close()

    def _update_interest(self, conn: Connection) -> None:
        if conn.closed:
            return
        events = 0 if conn.eof else EVENT_READ
        if conn.wants_write():
            events |= EVENT_WRITE
        self._events.modify(conn.fd, events)

    def _forget(self, conn: Connection) -> None:
        if self._events is not None:
            self._events.unsubscribe(conn.fd)
        if self._conns.get(conn.fd) is conn:
            del self._conns[conn.fd]

    def _teardown(self) -> None:
        with self._close_lock:
            if self._torn_down:
                return
            self._torn_down = True
        for conn in list(self._conns.values()):
            conn.close()
        if self._events is not None:
            self._events.unsubscribe(self._listener.fileno())
        self._listener.close()
        if self.address.kind == "unix":
            # Only our own socket file: a successor may already have bound the path.
            try:
                st = os.lstat(self.address.path)
                if (st.st_dev, st.st_ino) == self._socket_identity:
                    os.unlink(self.address.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.debug("monitor: cannot remove %s: %s", self.address.path, e)
