"""A small RFB (VNC) viewer for the tests: handshake (None or VNC auth), a pixel
format of the test's choosing, Raw and ZRLE decoding (every ZRLE subencoding a
server may send), DesktopSize, key and pointer events. Blocking sockets with
timeouts: a server that stops answering fails the test instead of hanging it.

Written from the RFB specification (RFC 6143 and the community extensions for
ZRLE's palette and RLE tiles), independently of kvmpy.display.vnc.
"""

from __future__ import annotations

import socket
import struct
import zlib


class RfbError(Exception):
    pass


class RfbClient:
    def __init__(self, address, password: str | None = None, timeout: float = 20.0,
                 encodings: tuple[int, ...] = (16, 0, -223), version: bytes = b"RFB 003.008\n") -> None:
        if hasattr(address, "sendall"):
            self.sock = address              # connected already (a WebSocketStream)
        else:
            family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        self.zlib = zlib.decompressobj()
        server_version = self._recv(12)
        if not server_version.startswith(b"RFB 003."):
            raise RfbError(f"not an RFB server: {server_version!r}")
        self.sock.sendall(version)
        if version == b"RFB 003.003\n":
            (security,) = struct.unpack(">I", self._recv(4))
        else:
            count = self._recv(1)[0]
            if count == 0:
                raise RfbError(self._reason())
            types = self._recv(count)
            security = 2 if 2 in types else 1
            self.sock.sendall(bytes([security]))
        if security == 2:
            from kvmpy.display.des import vnc_auth_response
            challenge = self._recv(16)
            self.sock.sendall(vnc_auth_response(password or "", challenge))
        if security == 2 or version == b"RFB 003.008\n":
            (result,) = struct.unpack(">I", self._recv(4))
            if result != 0:
                raise RfbError(self._reason() if version == b"RFB 003.008\n" else "authentication failed")
        self.sock.sendall(b"\x01")
        self.width, self.height = struct.unpack(">HH", self._recv(4))
        self.server_format = self._recv(16)
        (name_length,) = struct.unpack(">I", self._recv(4))
        self.name = self._recv(name_length).decode()
        self.set_pixel_format()
        self.sock.sendall(struct.pack(">BxH", 2, len(encodings)) + b"".join(struct.pack(">i", e) for e in encodings))
        self.pixels = bytearray(self.width * self.height * 4)
        self.resized = 0

    def _reason(self) -> str:
        (length,) = struct.unpack(">I", self._recv(4))
        return self._recv(length).decode(errors="replace")

    def _recv(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise RfbError("connection closed")
            data += chunk
        return bytes(data)

    def set_pixel_format(self, bpp: int = 32, depth: int = 24, big_endian: bool = False,
                         maxes=(255, 255, 255), shifts=(16, 8, 0)) -> None:
        """The format every pixel arrives in; ``pixels`` always holds 32-bit values
        0x00RRGGBB (scaled back to 8 bits a channel), little-endian."""
        self.format = (bpp, big_endian, maxes, shifts)
        self.sock.sendall(struct.pack(">B3xBBBBHHHBBB3x", 0, bpp, depth, big_endian, 1, *maxes, *shifts))

    # --- updates --------------------------------------------------------------------
    def request(self, incremental: bool = False) -> None:
        self.sock.sendall(struct.pack(">BBHHHH", 3, incremental, 0, 0, self.width, self.height))

    def update(self, incremental: bool = False) -> int:
        """Request and read one FramebufferUpdate; returns its number of rectangles."""
        self.request(incremental)
        return self.read_update()

    def read_update(self) -> int:
        while True:
            kind = self._recv(1)[0]
            if kind == 0:
                break
            if kind == 2:          # Bell
                continue
            if kind == 3:          # ServerCutText
                self._recv(3)
                (length,) = struct.unpack(">I", self._recv(4))
                self._recv(length)
                continue
            raise RfbError(f"unexpected server message {kind}")
        self._recv(1)
        (count,) = struct.unpack(">H", self._recv(2))
        for _ in range(count):
            x, y, w, h, encoding = struct.unpack(">HHHHi", self._recv(12))
            if encoding == -223:
                self.width, self.height = w, h
                self.pixels = bytearray(w * h * 4)
                self.resized += 1
            elif encoding == 0:
                self._put(x, y, w, h, self._recv(w * h * self.format[0] // 8), self.format[0] // 8)
            elif encoding == 16:
                self._zrle(x, y, w, h)
            else:
                raise RfbError(f"encoding {encoding} was not asked for")
        return count

    def _to_rgb(self, data: bytes, size: int) -> list[int]:
        bpp, big_endian, maxes, shifts = self.format
        out = []
        for i in range(0, len(data), size):
            value = int.from_bytes(data[i:i + size], "big" if big_endian else "little")
            rgb = 0
            for top, shift, place in zip(maxes, shifts, (16, 8, 0)):
                channel = (value >> shift) & top
                rgb |= (channel * 255 // top) << place
            out.append(rgb)
        return out

    def _put(self, x: int, y: int, w: int, h: int, data: bytes, size: int) -> None:
        values = self._to_rgb(data, size)
        for row in range(h):
            for col in range(w):
                o = ((y + row) * self.width + x + col) * 4
                self.pixels[o:o + 4] = values[row * w + col].to_bytes(4, "little")

    def _zrle(self, x: int, y: int, w: int, h: int) -> None:
        (length,) = struct.unpack(">I", self._recv(4))
        data = self.zlib.decompress(self._recv(length))
        bpp, big_endian, maxes, shifts = self.format
        top = max(m.bit_length() + s for m, s in zip(maxes, shifts))
        if bpp == 32 and top <= 24:
            cpixel, pad = 3, (b"\0" if not big_endian else b"")
        elif bpp == 32 and min(shifts) >= 8:
            cpixel, pad = 3, None
        else:
            cpixel, pad = bpp // 8, None
        pos = 0

        def pixel_bytes(raw: bytes) -> bytes:
            if cpixel == 3:
                if pad is not None:          # colour in the low 3 bytes
                    return raw + b"\0" if not big_endian else b"\0" + raw
                return b"\0" + raw if not big_endian else raw + b"\0"
            return raw

        size = bpp // 8
        for ty in range(y, y + h, 64):
            for tx in range(x, x + w, 64):
                tw, th = min(64, x + w - tx), min(64, y + h - ty)
                sub = data[pos]
                pos += 1
                if sub == 0:
                    raw = b"".join(pixel_bytes(data[pos + i * cpixel:pos + (i + 1) * cpixel]) for i in range(tw * th))
                    pos += tw * th * cpixel
                elif sub == 1:
                    raw = pixel_bytes(data[pos:pos + cpixel]) * (tw * th)
                    pos += cpixel
                elif 2 <= sub <= 16:
                    palette = [pixel_bytes(data[pos + i * cpixel:pos + (i + 1) * cpixel]) for i in range(sub)]
                    pos += sub * cpixel
                    bits = 1 if sub == 2 else 2 if sub <= 4 else 4
                    raw = b""
                    for _ in range(th):
                        row, acc, have = [], 0, 0
                        for _ in range(tw):
                            if have == 0:
                                acc, have = data[pos], 8
                                pos += 1
                            have -= bits
                            row.append(palette[(acc >> have) & ((1 << bits) - 1)])
                        raw += b"".join(row)
                else:
                    raise RfbError(f"ZRLE subencoding {sub} not decoded by this test client")
                self._put(tx, ty, tw, th, raw, size)
        if pos != len(data):
            raise RfbError(f"ZRLE rectangle has {len(data) - pos} bytes left over")

    # --- input ----------------------------------------------------------------------
    def key(self, keysym: int, down: bool) -> None:
        self.sock.sendall(struct.pack(">BBxxI", 4, down, keysym))

    def tap(self, keysym: int) -> None:
        self.key(keysym, True)
        self.key(keysym, False)

    def pointer(self, x: int, y: int, buttons: int = 0) -> None:
        self.sock.sendall(struct.pack(">BBHH", 5, buttons, x, y))

    def rgb_at(self, x: int, y: int) -> tuple[int, int, int]:
        o = (y * self.width + x) * 4
        return self.pixels[o + 2], self.pixels[o + 1], self.pixels[o]

    def close(self) -> None:
        self.sock.close()


class WebSocketStream:
    """A client WebSocket (RFC 6455) that looks like a blocking socket to RfbClient:
    the upgrade handshake, masked binary frames out, frames unwrapped in."""

    def __init__(self, host: str, port: int, path: str = "/websockify", timeout: float = 20.0) -> None:
        import base64
        import hashlib
        import os
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           "Sec-WebSocket-Protocol: binary\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise RfbError("closed during the WebSocket handshake")
            head += chunk
        lines = head.decode("latin-1").split("\r\n")
        if not lines[0].startswith("HTTP/1.1 101"):
            raise RfbError(f"no WebSocket upgrade: {lines[0]}")
        want = base64.b64encode(hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:]) if k}
        if headers.get("sec-websocket-accept") != want:
            raise RfbError("wrong Sec-WebSocket-Accept")
        self.protocol = headers.get("sec-websocket-protocol")
        self.pending = bytearray()

    def sendall(self, data: bytes, opcode: int = 2) -> None:
        import os
        mask = os.urandom(4)
        n = len(data)
        header = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
                                  if n < 65536 else bytes([0x80 | 127]) + n.to_bytes(8, "big"))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise RfbError("connection closed")
            data += chunk
        return data

    def recv(self, n: int) -> bytes:
        while not self.pending:
            b0, b1 = self._exact(2)
            if b1 & 0x80:
                raise RfbError("a masked frame from the server")
            length = b1 & 0x7F
            if length == 126:
                length = int.from_bytes(self._exact(2), "big")
            elif length == 127:
                length = int.from_bytes(self._exact(8), "big")
            payload = self._exact(length)
            if b0 & 0x0F in (0, 1, 2):
                self.pending += payload
            elif b0 & 0x0F == 8:
                return b""
        out = bytes(self.pending[:n])
        del self.pending[:n]
        return out

    def close(self) -> None:
        self.sock.close()
