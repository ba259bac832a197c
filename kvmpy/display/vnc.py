"""A VNC (RFB 3.3/3.7/3.8) server on the machine's event loop.

Addresses in QEMU's ``-vnc`` spelling: ``:N`` (TCP port 5900+N on every address,
as QEMU; a warning says it is beyond loopback), ``HOST:N``, ``unix:PATH``, each
optionally ``,password=on`` (VNC authentication with the password QMP
``change-vnc-password`` / HMP ``change vnc password`` sets; none set refuses every
viewer, as QEMU does).

Everything runs on the event loop with non-blocking sockets. Each viewer has an
output buffer: while it holds more than ``BACKLOG_SKIP`` bytes the viewer gets
no new frames (it skips them and gets the latest picture once it has caught up),
and a viewer whose buffer passes ``BACKLOG_DROP`` is disconnected. A viewer
never blocks the VM or another viewer. A malformed message closes that viewer's
connection with one log line.

Encodings sent: Raw, ZRLE (tiles raw or solid, one zlib stream per viewer) and
the DesktopSize pseudo-encoding when the guest changes mode. CopyRect is accepted
in SetEncodings but never chosen (the VGA gives no move hints). Keys go through
the layout (kvmpy.display.keymap) to the i8042; the pointer to the PS/2 mouse.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import socket
import stat
import struct
import zlib
from dataclasses import dataclass

from ..errors import ConfigError
from ..events import EVENT_READ, EVENT_WRITE
from ..unixsock import listen_unix
from .des import vnc_auth_response
from .keymap import MODIFIER_KEYSYMS, Keymap
from .render import Surface

log = logging.getLogger(__name__)

VNC_BASE_PORT = 5900
FRAME_INTERVAL = 0.03          # seconds between looks at the screen while viewers wait (QEMU: 30 ms)
BACKLOG_SKIP = 1 << 20
BACKLOG_DROP = 64 << 20
MAX_CLIENT_BUFFER = 1 << 20    # unparsed input a viewer may leave (a ClientCutText's length is its to choose)
MAX_CLIENTS = 16

ENC_RAW = 0
ENC_COPYRECT = 1
ENC_ZRLE = 16
ENC_DESKTOP_SIZE = -223
SEC_NONE = 1
SEC_VNC = 2
ZRLE_TILE = 64

VERSIONS = {b"RFB 003.003\n": 3, b"RFB 003.007\n": 7, b"RFB 003.008\n": 8, b"RFB 003.889\n": 3}


@dataclass(frozen=True)
class VncAddress:
    kind: str              # "tcp" or "unix"
    host: str
    port: int
    path: str
    password: bool
    websocket: int | None = None    # TCP port of RFB over WebSocket (and the browser page), same host

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"{self.host or '0.0.0.0'}:{self.port}"


def parse_vnc_spec(spec: str, where: str) -> VncAddress | None:
    """``:N``, ``HOST:N``, ``unix:PATH``, ``none``, with ``,password=on|off``; None for "none"."""
    head, *options = spec.split(",")
    password = False
    websocket = None
    for option in options:
        key, _, value = option.partition("=")
        if key == "password" and value in ("on", "off", ""):
            password = value != "off"
        elif key == "websocket":
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise ConfigError(f"{where}: websocket must be a TCP port number, got {value!r}")
            websocket = int(value)
        else:
            raise ConfigError(f"{where}: unknown option {option!r} (known: password=on|off)")
    if head == "none":
        return None
    if head.startswith("unix:"):
        path = head[5:]
        if not path:
            raise ConfigError(f"{where}: unix: needs a path")
        return VncAddress("unix", "", 0, os.path.abspath(path), password, websocket)
    host, sep, display = head.rpartition(":")
    if not sep or not display.isdigit() or int(display) > 65535 - VNC_BASE_PORT:
        raise ConfigError(f"{where}: expected :N, HOST:N or unix:PATH (N a display number), got {spec!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return VncAddress("tcp", host, VNC_BASE_PORT + int(display), "", password, websocket)


@dataclass
class PixelFormat:
    bits_per_pixel: int = 32
    depth: int = 24
    big_endian: bool = False
    true_colour: bool = True
    red_max: int = 255
    green_max: int = 255
    blue_max: int = 255
    red_shift: int = 16
    green_shift: int = 8
    blue_shift: int = 0

    STRUCT = struct.Struct(">BBBBHHHBBB3x")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.bits_per_pixel, self.depth, self.big_endian, self.true_colour,
                                self.red_max, self.green_max, self.blue_max,
                                self.red_shift, self.green_shift, self.blue_shift)

    @classmethod
    def unpack(cls, data: bytes) -> "PixelFormat":
        bpp, depth, be, tc, rmax, gmax, bmax, rs, gs, bs = cls.STRUCT.unpack(data)
        return cls(bpp, depth, bool(be), bool(tc), rmax, gmax, bmax, rs, gs, bs)

    def problem(self) -> str | None:
        if self.bits_per_pixel not in (8, 16, 32):
            return f"{self.bits_per_pixel} bits per pixel"
        if not self.true_colour:
            return "a colour map (only true colour is served)"
        for name in ("red", "green", "blue"):
            top = getattr(self, f"{name}_max")
            shift = getattr(self, f"{name}_shift")
            if top == 0 or top & (top + 1) or top.bit_length() + shift > self.bits_per_pixel:
                return f"{name} max {top} shift {shift}"
        return None

    @property
    def bytes_per_pixel(self) -> int:
        return self.bits_per_pixel // 8

    def compact(self) -> bool:
        """ZRLE's CPIXEL: 3 bytes where a 32-bit pixel's colours fit in its low or high 3 bytes."""
        if self.bits_per_pixel != 32 or self.depth > 24:
            return False
        top = max(m.bit_length() + s for m, s in ((self.red_max, self.red_shift),
                                                 (self.green_max, self.green_shift),
                                                 (self.blue_max, self.blue_shift)))
        bottom = min(s for s in (self.red_shift, self.green_shift, self.blue_shift))
        return top <= 24 or bottom >= 8

    def cpixel_low(self) -> bool:
        top = max(m.bit_length() + s for m, s in ((self.red_max, self.red_shift),
                                                 (self.green_max, self.green_shift),
                                                 (self.blue_max, self.blue_shift)))
        return top <= 24

    def convert(self, bgrx: bytes) -> bytes:
        """Surface pixels (B, G, R, 0) into this format, with byte-wide table lookups
        and whole-array ORs (no per-pixel Python)."""
        if (self.bits_per_pixel, self.red_max, self.green_max, self.blue_max,
                self.red_shift, self.green_shift, self.blue_shift) == (32, 255, 255, 255, 16, 8, 0):
            if not self.big_endian:
                return bgrx
        count = len(bgrx) // 4
        channels = (bgrx[2::4], bgrx[1::4], bgrx[0::4])
        nbytes = self.bytes_per_pixel
        out = bytearray(count * nbytes)
        for byte_index in range(nbytes):
            shift_in_pixel = 8 * (nbytes - 1 - byte_index if self.big_endian else byte_index)
            combined = 0
            for values, top, shift in zip(channels, (self.red_max, self.green_max, self.blue_max),
                                          (self.red_shift, self.green_shift, self.blue_shift)):
                table = bytes((((v * top + 127) // 255) << shift >> shift_in_pixel) & 0xFF for v in range(256))
                if any(table):
                    combined |= int.from_bytes(values.translate(table), "little")
            out[byte_index::nbytes] = combined.to_bytes(count, "little")
        return bytes(out)


class VncServer:
    def __init__(self, address: VncAddress, display, events, keymap: Keymap | None = None,
                 name: str = "kvmpy") -> None:
        self.address = address
        self.display = display
        self.events = events
        self.keymap = keymap
        self.name = name
        self.password: str | None = None
        self.clients: list[VncClient] = []
        self._timer = None
        self._closed = False
        self.socket_identity: tuple[int, int] | None = None
        if address.kind == "unix":
            if os.path.exists(address.path) and not os.path.isdir(address.path):
                if stat.S_ISSOCK(os.lstat(address.path).st_mode):
                    os.unlink(address.path)
            # Whoever connects sees the screen and types: 0600 before anyone can.
            sock = listen_unix(address.path, 8, mode=0o600)
            st = os.lstat(address.path)
            self.socket_identity = (st.st_dev, st.st_ino)
        else:
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address.host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), address.port))
            except OSError:
                sock.close()
                raise
            if not address.host or address.host not in ("127.0.0.1", "localhost", "::1"):
                log.warning("VNC server on %s listens beyond loopback: anyone who can reach it sees the screen "
                            "and types on the keyboard%s", address,
                            "" if address.password else " (no password)")
            sock.listen(8)
        sock.setblocking(False)
        self.sock = sock
        self.web_files: dict[str, bytes] = {}
        self.ws_sock: socket.socket | None = None
        if address.websocket is not None:
            host = address.host if address.kind == "tcp" else "127.0.0.1"
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            ws = socket.socket(family, socket.SOCK_STREAM)
            ws.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                ws.bind((host or "0.0.0.0", address.websocket))
            except OSError:
                ws.close()
                sock.close()
                raise
            ws.listen(8)
            ws.setblocking(False)
            self.ws_sock = ws
            # Read now: once the VM runs (and its sandbox with it) no file opens.
            self.web_files = load_web_files()
            events.subscribe(ws.fileno(), EVENT_READ, lambda ready: self._accept(ready, websocket=True))
        events.subscribe(sock.fileno(), EVENT_READ, self._accept)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1] if self.address.kind == "tcp" else 0

    def info(self) -> dict:
        """query-vnc's reply."""
        enabled = {"enabled": True, "auth": "vnc" if self.address.password else "none",
                   "clients": [c.info() for c in self.clients if c.state not in ("http", "closing-http")]}
        if self.address.kind == "tcp":
            host = self.sock.getsockname()[0]
            enabled.update(host=host, service=str(self.port),
                           family="ipv6" if ":" in host else "ipv4")
        else:
            enabled.update(host=self.address.path, service=self.address.path, family="unix")
        return enabled

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for client in list(self.clients):
            client.close("server closing")
        self.events.unsubscribe(self.sock.fileno())
        self.sock.close()
        if self.ws_sock is not None:
            self.events.unsubscribe(self.ws_sock.fileno())
            self.ws_sock.close()
        if self.address.kind == "unix":
            # Only our own socket file (a successor may have bound the path). Under
            # the sandbox the lookup is refused and the cleanup helper removes it.
            try:
                st = os.lstat(self.address.path)
                if (st.st_dev, st.st_ino) == self.socket_identity:
                    os.unlink(self.address.path)
            except OSError as e:
                log.debug("VNC: not removing %s: %s", self.address.path, e)

    def _accept(self, ready: int, websocket: bool = False) -> None:
        listener = self.ws_sock if websocket else self.sock
        while True:
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("VNC: accept failed: %s", e)
                return
            if len(self.clients) >= MAX_CLIENTS:
                conn.close()
                log.warning("VNC: more than %d viewers; one refused", MAX_CLIENTS)
                continue
            conn.setblocking(False)
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer_name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
            client = (WebSocketVncClient if websocket else VncClient)(self, conn, peer_name)
            self.clients.append(client)
            client.start()

    def forget(self, client: "VncClient") -> None:
        if client in self.clients:
            self.clients.remove(client)

    def want_frames(self) -> None:
        """Some viewer waits for an update: look at the screen on the next tick."""
        if self._timer is None and not self._closed:
            self._timer = self.events.call_later(FRAME_INTERVAL, self._tick)

    def _tick(self) -> None:
        self._timer = None
        waiting = [c for c in self.clients if c.update_wanted]
        if not waiting:
            return
        try:
            surface, _ = self.display.refresh()
        except Exception:   # noqa: BLE001 - a render bug must not stop the loop or the viewers
            log.exception("VNC: rendering the screen failed")
            return
        for client in waiting:
            client.send_update(surface)
        if any(c.update_wanted for c in self.clients):
            self.want_frames()


class VncClient:
    def __init__(self, server: VncServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.state = "version"
        self.version = 8
        self.challenge = b""
        self.format = PixelFormat()
        self.encodings: list[int] = [ENC_RAW]
        self.update_wanted = False
        self.update_incremental = False
        self.sent: Surface | None = None     # what the viewer has
        self.width = 0
        self.height = 0
        self.zlib = None
        self.keys_down: dict[int, int] = {}     # keysym -> key number pressed for it
        self.modifiers: set[str] = set()
        self.closed = False
        self.peer = peer

    def info(self) -> dict:
        """query-vnc's VncClientInfo."""
        host, sep, service = self.peer.rpartition(":")
        if not sep:
            return {"host": self.server.address.path, "service": "", "family": "unix",
                    "websocket": isinstance(self, WebSocketVncClient)}
        return {"host": host, "service": service, "family": "ipv6" if ":" in host else "ipv4",
                "websocket": isinstance(self, WebSocketVncClient)}

    def start(self) -> None:
        self.server.events.subscribe(self.fd, EVENT_READ, self._ready)
        self._send(b"RFB 003.008\n")

    def close(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        log.info("VNC: viewer %s disconnected: %s", self.peer, why)
        for keysym, number in list(self.keys_down.items()):
            self.server.display.press_key(number, False)     # no key stays stuck in the guest
        self.keys_down.clear()
        self.server.forget(self)
        self.server.events.unsubscribe(self.fd)
        self.sock.close()

    # --- output ---------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        if self.closed:
            return
        self.outbuf += self._frame(data)
        if len(self.outbuf) > BACKLOG_DROP:
            self.close("its output backlog passed the limit (a stalled viewer)")
            return
        self._flush()

    def _flush(self) -> None:
        while self.outbuf and not self.closed:
            try:
                sent = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.close(f"send: {e.strerror}")
                return
            del self.outbuf[:sent]
        if not self.closed:
            self.server.events.modify(self.fd, EVENT_READ | (EVENT_WRITE if self.outbuf else 0))

    def _ready(self, ready: int) -> None:
        if ready & EVENT_WRITE:
            self._flush()
            if self.update_wanted and len(self.outbuf) < BACKLOG_SKIP:
                self.server.want_frames()
        if ready & EVENT_READ and not self.closed:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.close(f"recv: {e.strerror}")
                return
            if not data:
                self.close("end of stream")
                return
            try:
                self._received(data)
                while not self.closed and self._parse_one():
                    pass
            except ProtocolError as e:
                self.close(f"protocol error: {e}")
                return
            if len(self.inbuf) > MAX_CLIENT_BUFFER:
                self.close("too much unparsed input")

    def _received(self, data: bytes) -> None:
        """Bytes from the socket into ``inbuf`` (a WebSocket viewer unwraps frames here)."""
        self.inbuf += data

    def _frame(self, data: bytes) -> bytes:
        """RFB bytes as they go on the wire (a WebSocket viewer wraps them in frames)."""
        return data

    # --- input ----------------------------------------------------------------------
    def _parse_one(self) -> bool:
        """Consume one complete message from ``inbuf``; False when more bytes are needed."""
        buf = self.inbuf
        if self.state == "version":
            if len(buf) < 12:
                return False
            version = VERSIONS.get(bytes(buf[:12]))
            if version is None:
                raise ProtocolError(f"unknown version {bytes(buf[:12])!r}")
            del buf[:12]
            self.version = version
            security = SEC_VNC if self.server.address.password else SEC_NONE
            if version == 3:
                self._send(struct.pack(">I", security))
                self._after_security_choice(security)
            else:
                self._send(bytes([1, security]))
                self.state = "security"
            return True
        if self.state == "security":
            if len(buf) < 1:
                return False
            chosen = buf[0]
            del buf[:1]
            expected = SEC_VNC if self.server.address.password else SEC_NONE
            if chosen != expected:
                self._fail(f"security type {chosen} was not offered")
                return False
            self._after_security_choice(chosen)
            return True
        if self.state == "auth":
            if len(buf) < 16:
                return False
            response = bytes(buf[:16])
            del buf[:16]
            password = self.server.password
            if password is None or vnc_auth_response(password, self.challenge) != response:
                self._fail("authentication failed")
                return False
            self._send(struct.pack(">I", 0))
            self.state = "init"
            return True
        if self.state == "init":
            if len(buf) < 1:
                return False
            del buf[:1]        # shared flag: every viewer shares the one screen
            surface, _ = self.server.display.refresh()
            self.width, self.height = surface.width, surface.height
            name = self.server.name.encode("utf-8", "replace")[:255]
            self._send(struct.pack(">HH", self.width, self.height) + self.format.pack()
                       + struct.pack(">I", len(name)) + name)
            self.state = "normal"
            return True
        if self.state == "failed":
            del buf[:]
            return False
        return self._message()

    def _after_security_choice(self, security: int) -> None:
        if security == SEC_VNC:
            self.challenge = os.urandom(16)
            self._send(self.challenge)
            self.state = "auth"
        else:
            if self.version == 8:
                self._send(struct.pack(">I", 0))
            self.state = "init"

    def _fail(self, reason: str) -> None:
        if self.version >= 8:
            text = reason.encode()
            self._send(struct.pack(">I", 1) + struct.pack(">I", len(text)) + text)
        else:
            self._send(struct.pack(">I", 1))
        self.state = "failed"
        log.info("VNC: viewer %s refused: %s", self.peer, reason)
        self.server.events.call_later(0.1, lambda: self.close(reason))

    def _message(self) -> bool:
        buf = self.inbuf
        if not buf:
            return False
        kind = buf[0]
        if kind == 0:                                  # SetPixelFormat
            if len(buf) < 20:
                return False
            fmt = PixelFormat.unpack(bytes(buf[4:20]))
            del buf[:20]
            problem = fmt.problem()
            if problem is not None:
                raise ProtocolError(f"pixel format not served: {problem}")
            self.format = fmt
            self.zlib = None
            self.sent = None
            return True
        if kind == 2:                                  # SetEncodings
            if len(buf) < 4:
                return False
            count = struct.unpack_from(">H", buf, 2)[0]
            if len(buf) < 4 + 4 * count:
                return False
            self.encodings = list(struct.unpack_from(f">{count}i", buf, 4))
            del buf[:4 + 4 * count]
            return True
        if kind == 3:                                  # FramebufferUpdateRequest
            if len(buf) < 10:
                return False
            incremental = buf[1]
            del buf[:10]                               # the rectangle: the whole screen is sent
            if not incremental:
                self.sent = None
            self.update_wanted = True
            self.update_incremental = bool(incremental)
            self.server.want_frames()
            return True
        if kind == 4:                                  # KeyEvent
            if len(buf) < 8:
                return False
            down, keysym = buf[1], struct.unpack_from(">I", buf, 4)[0]
            del buf[:8]
            self._key(bool(down), keysym)
            return True
        if kind == 5:                                  # PointerEvent
            if len(buf) < 6:
                return False
            mask, x, y = buf[1], *struct.unpack_from(">HH", buf, 2)
            del buf[:6]
            wheel = -1 if mask & 0x08 else 1 if mask & 0x10 else 0
            self.server.display.pointer(min(x, max(0, self.width - 1)), min(y, max(0, self.height - 1)),
                                        mask & 7, wheel)
            return True
        if kind == 6:                                  # ClientCutText: ignored
            if len(buf) < 8:
                return False
            length = struct.unpack_from(">I", buf, 4)[0]
            if length > MAX_CLIENT_BUFFER:
                raise ProtocolError(f"cut text of {length} bytes")
            if len(buf) < 8 + length:
                return False
            del buf[:8 + length]
            return True
        raise ProtocolError(f"unknown message type {kind}")

    def _key(self, down: bool, keysym: int) -> None:
        modifier = MODIFIER_KEYSYMS.get(keysym)
        if modifier is not None:
            held = "altgr" if modifier == "altgr_r" else modifier
            (self.modifiers.add if down else self.modifiers.discard)(held)
        if not down:
            number = self.keys_down.pop(keysym, None)
            if number is not None:
                self.server.display.press_key(number, False)
            return
        keymap = self.server.keymap
        number = keymap.key_for(keysym, "shift" in self.modifiers, "altgr" in self.modifiers) if keymap else None
        if number is None:
            log.debug("VNC: keysym %#x is not on layout %s", keysym, keymap.name if keymap else "-")
            return
        self.keys_down[keysym] = number
        self.server.display.press_key(number, True)

    # --- updates --------------------------------------------------------------------
    def send_update(self, surface: Surface) -> None:
        if self.closed or self.state != "normal" or len(self.outbuf) >= BACKLOG_SKIP:
            return          # a slow viewer skips this frame; it gets the newest one later
        rects: list[bytes] = []
        if (surface.width, surface.height) != (self.width, self.height):
            if ENC_DESKTOP_SIZE in self.encodings:
                self.width, self.height = surface.width, surface.height
                rects.append(struct.pack(">HHHHi", 0, 0, self.width, self.height, ENC_DESKTOP_SIZE))
            self.sent = None
        bands = self._changed_bands(surface)
        if not bands and not rects:
            return          # nothing new: the request stays pending until something changes
        width = min(self.width, surface.width)
        for top, bottom in bands:
            bottom = min(bottom, self.height)
            if top >= bottom or width == 0:
                continue
            rects.append(self._encode(surface, top, bottom, width))
        self.update_wanted = False
        self._send(struct.pack(">BxH", 0, len(rects)) + b"".join(rects))
        self.sent = Surface(surface.width, surface.height, bytearray(surface.data))

    def _changed_bands(self, surface: Surface) -> list[tuple[int, int]]:
        """Row ranges [top, bottom) that differ from what the viewer has (all, the first time)."""
        if self.sent is None or (self.sent.width, self.sent.height) != (surface.width, surface.height):
            return [(0, surface.height)]
        stride = surface.width * 4
        old, new = self.sent.data, surface.data
        bands: list[tuple[int, int]] = []
        for y in range(surface.height):
            if old[y * stride:(y + 1) * stride] != new[y * stride:(y + 1) * stride]:
                if bands and bands[-1][1] == y:
                    bands[-1] = (bands[-1][0], y + 1)
                else:
                    bands.append((y, y + 1))
        return bands

    def _encode(self, surface: Surface, top: int, bottom: int, width: int) -> bytes:
        stride = surface.width * 4
        rows = [surface.data[y * stride:y * stride + width * 4] for y in range(top, bottom)]
        header = struct.pack(">HHHH", 0, top, width, bottom - top)
        if ENC_ZRLE in self.encodings:
            return header + struct.pack(">i", ENC_ZRLE) + self._zrle(rows, width)
        return header + struct.pack(">i", ENC_RAW) + self.format.convert(b"".join(rows))

    def _zrle(self, rows: list[bytes], width: int) -> bytes:
        if self.zlib is None:
            self.zlib = zlib.compressobj(6)
        compact = self.format.compact()
        low = self.format.cpixel_low()
        height = len(rows)
        out = bytearray()
        for ty in range(0, height, ZRLE_TILE):
            for tx in range(0, width, ZRLE_TILE):
                tile = b"".join(row[tx * 4:min(width, tx + ZRLE_TILE) * 4] for row in rows[ty:ty + ZRLE_TILE])
                pixels = self.format.convert(tile)
                if compact:
                    pixels = _cpixels(pixels, low, self.format.big_endian)
                size = len(pixels) // (len(tile) // 4)
                if pixels[:size] * (len(tile) // 4) == pixels:
                    out += b"\x01" + pixels[:size]          # solid tile
                else:
                    out += b"\x00" + pixels                  # raw tile
        data = self.zlib.compress(bytes(out)) + self.zlib.flush(zlib.Z_SYNC_FLUSH)
        return struct.pack(">I", len(data)) + data


def _cpixels(pixels: bytes, low: bool, big_endian: bool) -> bytes:
    """32-bit pixels to ZRLE's 3-byte CPIXELs: the 3 bytes holding the colour, in
    the pixel's byte order."""
    # Which bytes of each 4 hold the low 24 bits depends on the pixel's byte order.
    keep = (0, 1, 2) if low != big_endian else (1, 2, 3)
    out = bytearray(len(pixels) // 4 * 3)
    for i, k in enumerate(keep):
        out[i::3] = pixels[k::4]
    return bytes(out)


class ProtocolError(Exception):
    pass


# --- RFB over WebSocket (RFC 6455), and the browser page ----------------------------------
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HTTP_REQUEST = 8192
WEB_DIRS = (os.path.join(os.path.dirname(os.path.abspath(__file__)), "novnc"), "/usr/share/novnc")
MAX_WEB_FILES = 32 << 20
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css",
                 ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon", ".json": "application/json",
                 ".woff": "font/woff", ".woff2": "font/woff2", ".ttf": "font/ttf", ".mp3": "audio/mpeg",
                 ".oga": "audio/ogg"}


def websocket_accept(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("latin-1") + WS_GUID).digest()).decode()


CONSOLE_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "console.html")


def load_web_files(directories=WEB_DIRS) -> dict[str, bytes]:
    """The browser console by URL path: kvmpy's page (``/``) and noVNC's ``core/`` and
    ``vendor/`` from the first directory that has ``core/rfb.js`` (the copy ``make
    novnc`` vendors into kvmpy/display/novnc, else Debian's novnc package). Read
    whole at start; without noVNC the page is missing and ``/`` says so."""
    for directory in directories:
        if not os.path.isfile(os.path.join(directory, "core", "rfb.js")):
            continue
        files: dict[str, bytes] = {}
        total = 0
        for top in ("core", "vendor"):
            for root, dirs, names in os.walk(os.path.join(directory, top), followlinks=False):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for name in names:
                    if os.path.splitext(name)[1] not in CONTENT_TYPES:
                        continue
                    path = os.path.join(root, name)
                    try:
                        with open(path, "rb") as f:
                            data = f.read(MAX_WEB_FILES)
                    except OSError:
                        continue
                    total += len(data)
                    if total > MAX_WEB_FILES:
                        log.warning("VNC: %s holds more than %d MiB of noVNC; not served", directory,
                                    MAX_WEB_FILES >> 20)
                        return {}
                    files["/" + os.path.relpath(path, directory).replace(os.sep, "/")] = data
        with open(CONSOLE_PAGE, "rb") as f:
            files["/"] = files["/console.html"] = f.read()
        return files
    return {}


class WebSocketVncClient(VncClient):
    """A viewer in a browser: an HTTP request first, either the WebSocket upgrade
    (then RFB in binary frames) or a GET for the noVNC page's files."""

    def __init__(self, server: VncServer, sock: socket.socket, peer: str) -> None:
        super().__init__(server, sock, peer)
        self.state = "http"
        self.raw = bytearray()

    def start(self) -> None:
        self.server.events.subscribe(self.fd, EVENT_READ, self._ready)

    def _frame(self, data: bytes) -> bytes:
        if self.state in ("http", "closing-http"):
            return data
        length = len(data)
        if length < 126:
            header = bytes([0x82, length])
        elif length < 65536:
            header = bytes([0x82, 126]) + struct.pack(">H", length)
        else:
            header = bytes([0x82, 127]) + struct.pack(">Q", length)
        return header + data

    def _received(self, data: bytes) -> None:
        if self.state == "closing-http":
            return      # the one request is answered: more input is never parsed, so it is not kept
        self.raw += data
        if self.state == "http":
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                if len(self.raw) > MAX_HTTP_REQUEST:
                    raise ProtocolError("HTTP request too long")
                return
            request = bytes(self.raw[:end]).decode("latin-1")
            del self.raw[:end + 4]
            self._http(request)
            if self.state in ("http", "closing-http"):
                return
        if self.state == "closing-http":
            return
        self._frames()

    def _http(self, request: str) -> None:
        lines = request.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[0] != "GET":
            self._respond("405 Method Not Allowed", b"only GET\n", "text/plain")
            return
        headers = {}
        for line in lines[1:]:
            key, sep, value = line.partition(":")
            if sep:
                headers[key.strip().lower()] = value.strip()
        if "websocket" in headers.get("upgrade", "").lower():
            key = headers.get("sec-websocket-key", "")
            if not key:
                self._respond("400 Bad Request", b"no Sec-WebSocket-Key\n", "text/plain")
                return
            accept = websocket_accept(key)
            protocols = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
            reply = ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Accept: {accept}\r\n")
            if "binary" in protocols:
                reply += "Sec-WebSocket-Protocol: binary\r\n"
            self._send((reply + "\r\n").encode())
            self.state = "version"
            self._send(b"RFB 003.008\n")
            return
        path = parts[1].split("?", 1)[0]
        if not self.server.web_files:
            self._respond("404 Not Found", b"the browser console needs noVNC: make novnc (or Debian's novnc)\n",
                          "text/plain")
            return
        data = self.server.web_files.get(path)
        if data is None:
            self._respond("404 Not Found", b"not found\n", "text/plain")
            return
        kind = "text/html; charset=utf-8" if path == "/" else \
            CONTENT_TYPES.get(os.path.splitext(path)[1], "application/octet-stream")
        self._respond("200 OK", data, kind)

    def _respond(self, status: str, body: bytes, content_type: str, extra: str = "") -> None:
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n{extra}\r\n").encode()
        self.state = "closing-http"
        self._send(head + body)
        self._close_when_sent()

    def _close_when_sent(self) -> None:
        if self.closed:
            return
        if self.outbuf:
            self.server.events.call_later(0.05, self._close_when_sent)
        else:
            self.close("page served")

    def _frames(self) -> None:
        raw = self.raw
        while len(raw) >= 2:
            opcode, masked, length = raw[0] & 0x0F, raw[1] & 0x80, raw[1] & 0x7F
            pos = 2
            if length == 126:
                if len(raw) < 4:
                    return
                length, pos = struct.unpack_from(">H", raw, 2)[0], 4
            elif length == 127:
                if len(raw) < 10:
                    return
                length, pos = struct.unpack_from(">Q", raw, 2)[0], 10
            if not masked:
                raise ProtocolError("an unmasked frame from a WebSocket client")
            if length > MAX_CLIENT_BUFFER:
                raise ProtocolError(f"a WebSocket frame of {length} bytes")
            if len(raw) < pos + 4 + length:
                return
            mask = (bytes(raw[pos:pos + 4]) * (length // 4 + 1))[:length]
            payload = (int.from_bytes(raw[pos + 4:pos + 4 + length], "big")
                       ^ int.from_bytes(mask, "big")).to_bytes(length, "big")
            del raw[:pos + 4 + length]
            if opcode in (0, 2):
                self.inbuf += payload
            elif opcode == 8:
                self.outbuf += b"\x88\x00"
                self._flush()
                raise ProtocolError("the viewer closed the WebSocket")
            elif opcode == 9:
                self.outbuf += bytes([0x8A, len(payload)]) + payload if len(payload) < 126 else b""
                self._flush()
            elif opcode != 10:
                raise ProtocolError(f"WebSocket opcode {opcode}")
