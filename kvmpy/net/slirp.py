"""User-mode networking: a virtio-net backend over libslirp, QEMU's ``-nic user``.

The guest's NIC does not know it: it gets one end of a SOCK_SEQPACKET socketpair
(``UserNetwork.port``), which carries what a tap carries (a 12-byte virtio-net
header, then the frame, one record per frame), so virtio-net keeps its one data
path. The other end is read here, in C (kvmpy.net._slirp_build), straight into
slirp_input; libslirp's replies are written back the same way. The port offers
the offloads its C side finishes, as a NIC would: checksums the guest leaves to
the device (VIRTIO_NET_F_CSUM) and TCP/IPv4 segmentation (HOST_TSO4), so a guest's
TCP sends one frame per 64 KiB instead of one per 1460 bytes, with no checksum
pass of its own; libslirp's frames are marked DATA_VALID (GUEST_CSUM).

libslirp is not thread-safe: every call into it runs on kvmpy's event loop thread
(or before the loop starts, on the thread building the machine). The loop waits
on two descriptors per NIC: the socketpair end and an epoll set mirroring the
sockets libslirp asked to poll; libslirp's own timer deadline rides on
``call_later`` and is asked only while libslirp has timers running.

The guest's DNS queries to the virtual DNS address (10.0.2.3) are relayed by
kvmpy, not libslirp: libslirp re-reads /etc/resolv.conf for each one, which the
sandbox forbids; kvmpy reads it once at start (``KVMPY_RESOLV_CONF`` names another
file). IPv6 DNS (fec0::3) stays libslirp's and fails under the sandbox.

Bounds on what a guest can make the VMM do: a frame longer than the MTU (plus a
VLAN tag) is dropped; frames in flight either way are bounded by the socketpair's
buffers (a full buffer drops, as a NIC does); a guest opening flows (TCP SYN,
UDP, ICMP echo) beyond ``max_sockets`` host sockets has them dropped until some
close, so it cannot exhaust the process's descriptors; guest errors libslirp
reports are logged at most ``GUEST_ERROR_BURST`` per minute.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
import time
from ipaddress import IPv4Address, IPv6Address

from ..errors import ConfigError
from ..events import EVENT_READ, EventLoop
from .backend import TUN_F_CSUM, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_TSO4, NetBackend
from .options import GuestForward, HostForward, UserNetOptions
from ._slirp_cffi import ffi, lib

log = logging.getLogger(__name__)

# Frames taken from the guest per wake-up before other devices get the loop.
BATCH = 64
# The socketpair's buffers: how many frames may wait for the guest or for libslirp.
FRAME_BUFFER_BYTES = 256 << 10
GUEST_ERROR_BURST = 10
GUEST_ERROR_WINDOW = 60.0
# The guest's DNS (10.0.2.3) is forwarded by kvmpy rather than libslirp: libslirp
# reads /etc/resolv.conf on each query, which the sandbox forbids. Read once at
# start instead (this variable names another file: tests, unusual hosts).
RESOLV_CONF_ENV = "KVMPY_RESOLV_CONF"
DNS_QUERIES_IN_FLIGHT = 64
DNS_TIMEOUT = 10.0


def default_max_sockets() -> int:
    """Half the descriptors the process may open, at most 1024: the rest stay for
    disks, monitors and other NICs, and libslirp's buffers (up to ~128 KiB a TCP
    connection) stay within ~128 MiB."""
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 8192
    return max(16, min(1024, soft // 2))


def _in_addr(addr: IPv4Address | None):
    a = ffi.new("struct in_addr *")
    a.s_addr = int.from_bytes(addr.packed, sys.byteorder) if addr is not None else 0
    return a


def _set_in6(field, addr: IPv6Address) -> None:
    ffi.memmove(field.s6_addr, addr.packed, 16)


class FramePort(NetBackend):
    """What virtio-net sees of a user network: a descriptor carrying vnet header +
    frame per record. It is no tap: it offers the offloads its C side finishes
    (``offloads``), ``set_offload`` takes TUN_F_CSUM only, and every frame passes
    libslirp on the event loop (no native data plane)."""

    # Finished in C before libslirp: the checksum the guest leaves to the device
    # (CSUM), TCP/IPv4 segmentation (HOST_TSO4); and libslirp's checksums are
    # good, which the guest may be told (GUEST_CSUM).
    offloads = 1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4
    allows_native_plane = False

    def __init__(self, fd: int, name: str, on_guest_csum=None) -> None:
        self.fd = fd
        self.name = name
        self._on_guest_csum = on_guest_csum

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.fd,)

    def set_queue_attached(self, index: int, attached: bool) -> bool:
        """One queue, always attached."""
        return index == 0 and attached

    def set_offload(self, flags: int) -> bool:
        if flags & ~TUN_F_CSUM:
            return False
        if self._on_guest_csum is not None:
            self._on_guest_csum(bool(flags & TUN_F_CSUM))
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _SlirpTimer:
    __slots__ = ("id", "cb_opaque", "pending", "handle")

    def __init__(self, timer_id: int, cb_opaque) -> None:
        self.id = timer_id
        self.cb_opaque = cb_opaque
        self.pending = None
        self.handle = None


class UserNetwork:
    """One libslirp instance behind one NIC.

    Arguments: options (kvmpy.net.options.UserNetOptions), the event loop, a name
    for logs and the monitor, and ``max_sockets`` (default: default_max_sockets()).
    ``port`` goes to VirtioNet; ``close()`` after the device's.
    Hostfwd rules that cannot be set up raise ConfigError in QEMU's words.
    """

    def __init__(self, options: UserNetOptions, events: EventLoop, name: str = "net0",
                 max_sockets: int | None = None, runas: str | None = None) -> None:
        self.options = options
        self.events = events
        self.name = name
        self._closed = False
        self._timer = None
        self._slirp_timers: dict[object, _SlirpTimer] = {}
        self._guest_errors: list[float] = []
        self._guest_errors_dropped = 0
        self._guestfwds: list[_GuestForwardLink] = []
        self._dns: _DnsForwarder | None = None
        self._smb = None
        self._runas = runas         # smb=: the user its smbds run as
        self._s = ffi.NULL
        nic, mine = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (nic, mine):
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, FRAME_BUFFER_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, FRAME_BUFFER_BYTES)
        self.port = FramePort(nic.detach(), f"user:{name}", on_guest_csum=self._set_guest_csum)
        self._frame_fd = mine.detach()
        self._handle = ffi.new_handle(self)
        try:
            self._start(options, default_max_sockets() if max_sockets is None else max_sockets)
        except BaseException:
            self.close()
            raise

    def _start(self, o: UserNetOptions, max_sockets: int) -> None:
        cfg = ffi.new("SlirpConfig *")
        keep = []      # C strings libslirp reads while it runs

        def cstr(text: str):
            if not text:
                return ffi.NULL
            buf = ffi.new("char[]", text.encode())
            keep.append(buf)
            return buf
        cfg.version = 4
        cfg.restricted = int(o.restrict)
        cfg.in_enabled = o.ipv4
        cfg.vnetwork = _in_addr(o.net.network_address)[0]
        cfg.vnetmask = _in_addr(o.net.netmask)[0]
        cfg.vhost = _in_addr(o.host)[0]
        cfg.in6_enabled = o.ipv6
        _set_in6(cfg.vprefix_addr6, o.ipv6_net.network_address)
        cfg.vprefix_len = o.ipv6_net.prefixlen
        _set_in6(cfg.vhost6, o.ipv6_host)
        _set_in6(cfg.vnameserver6, o.ipv6_dns)
        cfg.vhostname = cstr(o.hostname)
        cfg.vdomainname = cstr(o.domainname)
        cfg.vdhcp_start = _in_addr(o.dhcpstart)[0]
        cfg.vnameserver = _in_addr(o.dns)[0]
        self._keep = keep
        s = lib.kvmpy_slirp_new(cfg, self._frame_fd, max_sockets, self._handle)
        if s == ffi.NULL:
            raise ConfigError(f"{self.name}: could not start user-mode networking (libslirp refused "
                              f"net={o.net} host={o.host} dhcpstart={o.dhcpstart} dns={o.dns})")
        self._s = s
        for fwd in o.hostfwd:
            self.add_hostfwd(fwd)
        for gfwd in o.guestfwd:
            self._guestfwds.append(_GuestForwardLink(self, gfwd))
        if o.smb:
            self._start_smb(o)
        if o.ipv4 and not o.restrict:
            self._dns = _DnsForwarder(self, o.dns)
            if self._dns.servers:
                s.dns_intercept = int.from_bytes(o.dns.packed, sys.byteorder)
        self.events.subscribe(self._frame_fd, EVENT_READ, self._guest_frames_ready)
        self.events.subscribe(s.epoll_fd, EVENT_READ, self._sockets_ready)
        log.info("%s: user-mode networking on %s (host %s, DNS %s, libslirp %s)", self.name, o.net, o.host,
                 o.dns, ffi.string(lib.slirp_version_string()).decode())

    def _start_smb(self, o: UserNetOptions) -> None:
        """smb=DIR: each guest connection to smbserver:445 reaches a fresh smbd (kvmpy.net.smb)."""
        from .smb import SMB_PORT, SmbServer
        self._smb = SmbServer(o.smb, name=self.name, runas=self._runas)
        path = ffi.new("char[]", self._smb.socket_path.encode())
        if lib.slirp_add_unix(self._s.slirp, path, _in_addr(o.smbserver), SMB_PORT) < 0:
            raise ConfigError(f"{self.name}: smb={o.smb}: conflicting/invalid smbserver address {o.smbserver}")

    # --- the event loop -----------------------------------------------------------------
    def _guest_frames_ready(self, events: int) -> None:
        if self._s == ffi.NULL:
            return
        if lib.kvmpy_slirp_from_guest(self._s, BATCH) < 0:
            self.events.modify(self._frame_fd, 0)     # the NIC's end is gone
        self._rearm()

    def _sockets_ready(self, events: int) -> None:
        if self._s == ffi.NULL:
            return
        lib.kvmpy_slirp_step(self._s)
        self._rearm()

    def _rearm(self) -> None:
        """Ask for a step when libslirp's TCP/IP timers want one; while idle
        (no timer due) nothing wakes the loop."""
        ms = self._s.timeout_ms
        if ms >= lib.KVMPY_SLIRP_IDLE_MS:
            return
        when = time.monotonic() + ms / 1000
        if self._timer is not None and not self._timer.cancelled and self._timer.when <= when + 0.001:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.events.call_later(ms / 1000, self._on_timeout)

    def _on_timeout(self) -> None:
        self._timer = None
        self._sockets_ready(0)

    def step(self) -> None:
        """One round of libslirp's polling and timers (the loop does this by itself)."""
        self._sockets_ready(0)

    def input_frame(self, frame: bytes) -> None:
        """Hand one Ethernet frame to libslirp as if the guest had sent it."""
        def feed():
            lib.kvmpy_slirp_input(self._s, frame, len(frame))
            lib.kvmpy_slirp_step(self._s)
            self._rearm()
        self._on_loop(feed)

    # --- what the monitor may ask, on the loop's thread -----------------------------------
    def _on_loop(self, fn):
        if self.events.running and not self.events.on_loop_thread():
            box = {}

            def run():
                try:
                    box["value"] = fn()
                except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
                    box["error"] = e
            if not self.events.call_and_wait(run, timeout=5.0):
                raise TimeoutError(f"{self.name}: the event loop did not answer")
            if "error" in box:
                raise box["error"]
            return box.get("value")
        return fn()

    def add_hostfwd(self, fwd: HostForward) -> None:
        """ConfigError "could not set up host forwarding rule" when the host refuses
        (the port is taken, the address is not local)."""
        def add():
            rc = lib.slirp_add_hostfwd(self._s.slirp, int(fwd.udp), _in_addr(fwd.host_addr)[0], fwd.host_port,
                                       _in_addr(fwd.guest_addr)[0], fwd.guest_port)
            lib.kvmpy_slirp_step(self._s)
            self._rearm()
            return rc
        if self._on_loop(add) < 0:
            raise ConfigError(f"{self.name}: could not set up host forwarding rule '{fwd.spec}'")

    def remove_hostfwd(self, udp: bool, host_addr: IPv4Address, host_port: int) -> bool:
        def remove():
            rc = lib.slirp_remove_hostfwd(self._s.slirp, int(udp), _in_addr(host_addr)[0], host_port)
            lib.kvmpy_slirp_step(self._s)
            return rc
        return self._on_loop(remove) == 0

    def connection_info(self) -> str:
        """libslirp's table of its sockets, as HMP ``info usernet`` prints it."""
        def info():
            text = lib.slirp_connection_info(self._s.slirp)
            try:
                return ffi.string(text).decode(errors="replace")
            finally:
                lib.free(text)
        return self._on_loop(info)

    def stats(self) -> dict:
        s = self._s
        return {"to_guest": s.to_guest, "to_guest_dropped": s.to_guest_dropped, "from_guest": s.from_guest,
                "from_guest_dropped": s.from_guest_dropped, "flows_refused": s.flows_refused,
                "from_guest_gso": s.from_guest_gso, "csum_completed": s.csum_completed,
                "sockets": s.sockets, "max_sockets": s.max_sockets,
                "guest_errors_dropped": self._guest_errors_dropped}

    def _set_guest_csum(self, on: bool) -> None:
        # A plain int store the loop thread's next frame to the guest reads: set by
        # the driver's feature negotiation, on whichever thread made it.
        if self._s != ffi.NULL:
            lib.kvmpy_slirp_set_guest_csum(self._s, int(on))

    # --- callbacks from libslirp (loop thread) ------------------------------------------
    def _guest_error(self, msg: str) -> None:
        now = time.monotonic()
        self._guest_errors = [t for t in self._guest_errors if now - t < GUEST_ERROR_WINDOW]
        if len(self._guest_errors) >= GUEST_ERROR_BURST:
            self._guest_errors_dropped += 1
            return
        self._guest_errors.append(now)
        log.warning("%s: guest error: %s", self.name, msg)

    def _timer_new(self, timer_id: int, cb_opaque):
        timer = _SlirpTimer(timer_id, cb_opaque)
        timer.handle = ffi.new_handle(timer)
        self._slirp_timers[timer.handle] = timer
        return timer.handle

    def _timer_free(self, timer: _SlirpTimer) -> None:
        if timer.pending is not None:
            timer.pending.cancel()
        self._slirp_timers.pop(timer.handle, None)

    def _timer_mod(self, timer: _SlirpTimer, expire_ms: int) -> None:
        if timer.pending is not None:
            timer.pending.cancel()

        def fire():
            timer.pending = None
            if self._s != ffi.NULL and timer.handle in self._slirp_timers:
                lib.slirp_handle_timer(self._s.slirp, timer.id, timer.cb_opaque)
                self._sockets_ready(0)
        timer.pending = self.events.call_later(max(0.0, expire_ms / 1000 - time.monotonic()), fire)

    # --- life cycle ----------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def stop():
            if self._timer is not None:
                self._timer.cancel()
            for timer in list(self._slirp_timers.values()):
                self._timer_free(timer)
            for link in self._guestfwds:
                link.close()
            if self._dns is not None:
                self._dns.close()
            if self._s != ffi.NULL:
                self.events.unsubscribe(self._s.epoll_fd)
                self.events.unsubscribe(self._frame_fd)
                s, self._s = self._s, ffi.NULL
                lib.kvmpy_slirp_free(s)
            os.close(self._frame_fd)
            if self._smb is not None:
                self._smb.close()
        if self.events.running and not self.events.on_loop_thread():
            self.events.call_and_wait(stop, timeout=5.0)
        else:
            stop()
        self.port.close()

    def __enter__(self) -> "UserNetwork":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _GuestForwardLink:
    """``guestfwd=tcp:SERVER:PORT-tcp:HOST:HOSTPORT``: one host TCP connection, made
    at start (as QEMU's chardev is), joined to the guest's connections to
    SERVER:PORT."""

    def __init__(self, net: UserNetwork, fwd: GuestForward) -> None:
        self.net = net
        self.fwd = fwd
        try:
            self.sock = socket.create_connection((fwd.host, fwd.host_port), timeout=5)
        except OSError as e:
            raise ConfigError(f"{net.name}: guestfwd '{fwd.spec}': cannot connect to {fwd.host}:{fwd.host_port}: "
                              f"{e.strerror or e}") from None
        self.sock.settimeout(1.0)
        self._handle = ffi.new_handle(self)
        self._addr = _in_addr(fwd.server)
        if lib.kvmpy_slirp_add_guestfwd(net._s, self._handle, self._addr, fwd.port) < 0:
            self.sock.close()
            raise ConfigError(f"{net.name}: could not set up guest forwarding rule '{fwd.spec}'")
        self._retry = None
        net.events.subscribe(self.sock.fileno(), EVENT_READ, self._host_readable)

    def to_host(self, data: bytes) -> int:
        # libslirp counts what it hands over as written: a short blocking send (the
        # socket's 1 s timeout) rather than a buffer of our own.
        try:
            self.sock.sendall(data)
        except OSError as e:
            log.warning("%s: guestfwd %s: %s", self.net.name, self.fwd.spec, e)
            return -1
        return len(data)

    def _host_readable(self, events: int) -> None:
        net = self.net
        if net._s == ffi.NULL:
            return
        room = lib.slirp_socket_can_recv(net._s.slirp, self._addr[0], self.fwd.port)
        if room == 0:
            # The guest is not reading (or not connected): look again shortly rather than spin.
            net.events.modify(self.sock.fileno(), 0)
            self._retry = net.events.call_later(0.05, lambda: net.events.modify(self.sock.fileno(), EVENT_READ))
            return
        try:
            data = self.sock.recv(min(room, 65536))
        except (BlockingIOError, socket.timeout):
            return
        except OSError as e:
            data = b""
            log.warning("%s: guestfwd %s: %s", net.name, self.fwd.spec, e)
        if not data:
            net.events.unsubscribe(self.sock.fileno())
            return
        lib.slirp_socket_recv(net._s.slirp, self._addr[0], self.fwd.port, data, len(data))
        lib.kvmpy_slirp_step(net._s)
        net._rearm()

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        self.net.events.unsubscribe(self.sock.fileno())
        self.sock.close()


def read_nameservers(path: str) -> list[str]:
    """The IPv4 nameservers of a resolv.conf, in order ([] if it cannot be read)."""
    servers = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    try:
                        servers.append(str(IPv4Address(words[1].split("%")[0])))
                    except ValueError:
                        continue
    except OSError as e:
        log.warning("cannot read %s (%s): the guest's DNS server answers nothing", path, e.strerror)
    return servers


class _DnsForwarder:
    """The guest's queries to the virtual DNS address, relayed as UDP to the host's
    first nameserver (libslirp's choice too), one socket per query, and the answer
    written back as a datagram from the virtual address. Queries in flight are
    bounded; an unanswered one is forgotten after DNS_TIMEOUT."""

    def __init__(self, net: UserNetwork, address: IPv4Address) -> None:
        self.net = net
        self.address = address
        self.servers = read_nameservers(os.environ.get(RESOLV_CONF_ENV) or "/etc/resolv.conf")
        self.pending: dict[int, tuple[socket.socket, bytes, bytes, int, object]] = {}
        self.dropped = 0

    def query(self, frame: bytes) -> None:
        if len(self.pending) >= DNS_QUERIES_IN_FLIGHT:
            self.dropped += 1
            return
        ihl = (frame[14] & 15) * 4
        udp = 14 + ihl
        guest_mac, guest_ip = frame[6:12], frame[14 + 12:14 + 16]
        sport, _, length = struct.unpack_from("!HHH", frame, udp)
        payload = frame[udp + 8:udp + max(8, min(length, len(frame) - udp))]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect((self.servers[0], 53))
            sock.send(payload)
        except OSError as e:
            sock.close()
            log.debug("%s: DNS query not sent: %s", self.net.name, e)
            return
        fd = sock.fileno()
        timer = self.net.events.call_later(DNS_TIMEOUT, lambda: self._forget(fd))
        self.pending[fd] = (sock, guest_mac, guest_ip, sport, timer)
        self.net.events.subscribe(fd, EVENT_READ, lambda events: self._answer(fd))

    def _answer(self, fd: int) -> None:
        entry = self.pending.get(fd)
        if entry is None:
            return
        sock, guest_mac, guest_ip, sport, _ = entry
        try:
            answer = sock.recv(65535)
        except OSError:
            answer = b""
        self._forget(fd)
        if not answer or len(answer) > lib.KVMPY_MAX_FRAME - 14 - 28:
            return
        src = self.address.packed
        udp = struct.pack("!HHHH", 53, sport, 8 + len(answer), 0) + answer
        csum = _checksum(src + guest_ip + struct.pack("!BBH", 0, 17, len(udp)) + udp) or 0xFFFF
        udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, src, guest_ip)
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        frame = guest_mac + b"\x52\x55" + src + b"\x08\x00" + ip + udp
        if self.net._s != ffi.NULL:
            lib.kvmpy_slirp_send_to_guest(self.net._s, frame, len(frame))

    def _forget(self, fd: int) -> None:
        entry = self.pending.pop(fd, None)
        if entry is not None:
            sock, _, _, _, timer = entry
            timer.cancel()
            self.net.events.unsubscribe(fd)
            sock.close()

    def close(self) -> None:
        for fd in list(self.pending):
            self._forget(fd)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@ffi.def_extern()
def kvmpy_slirp_dns_query(frame, length, handle):
    net = ffi.from_handle(handle)
    if net._dns is not None:
        net._dns.query(bytes(ffi.buffer(frame, length)))


@ffi.def_extern()
def kvmpy_slirp_guest_error(msg, handle):
    ffi.from_handle(handle)._guest_error(ffi.string(msg).decode(errors="replace"))


@ffi.def_extern()
def kvmpy_slirp_timer_new(timer_id, cb_opaque, handle):
    return ffi.from_handle(handle)._timer_new(timer_id, cb_opaque)


@ffi.def_extern()
def kvmpy_slirp_timer_free(timer, handle):
    ffi.from_handle(handle)._timer_free(ffi.from_handle(timer))


@ffi.def_extern()
def kvmpy_slirp_timer_mod(timer, expire_ms, handle):
    ffi.from_handle(handle)._timer_mod(ffi.from_handle(timer), expire_ms)


@ffi.def_extern(error=-1)
def kvmpy_slirp_guestfwd_write(buf, length, fwd_handle):
    return ffi.from_handle(fwd_handle).to_host(bytes(ffi.buffer(buf, length)))
