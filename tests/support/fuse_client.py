"""A FUSE client speaking to kvmpy's FuseServer in bytes, as Linux's virtiofs driver would."""

from __future__ import annotations

import itertools
import struct

from kvmpy.devices.virtio import fuse_server as F


class FuseError(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


class FuseClient:
    def __init__(self, server: F.FuseServer) -> None:
        self.server = server
        self._unique = itertools.count(1)

    def raw(self, opcode: int, nodeid: int, body: bytes = b"", length: int | None = None) -> bytes:
        unique = next(self._unique)
        total = F.IN_HEADER.size + len(body)
        req = F.IN_HEADER.pack(total if length is None else length, opcode, unique, nodeid, 0, 0, 1, 0, 0) + body
        return self.server.handle(req)

    def call(self, opcode: int, nodeid: int, body: bytes = b"") -> bytes:
        reply = self.raw(opcode, nodeid, body)
        length, error, _ = F.OUT_HEADER.unpack_from(reply)
        assert length == len(reply)
        if error:
            raise FuseError(-error)
        return reply[F.OUT_HEADER.size:]

    def init(self, minor: int = 37, flags: int = F.SUPPORTED_INIT_FLAGS) -> bytes:
        return self.call(F.INIT, 0, F.INIT_IN.pack(7, minor, 1 << 17, flags) + bytes(48))

    @staticmethod
    def entry(payload: bytes) -> tuple[int, tuple]:
        nodeid = F.ENTRY_OUT.unpack_from(payload)[0]
        return nodeid, F.ATTR.unpack_from(payload, F.ENTRY_OUT.size)

    def lookup(self, parent: int, name: bytes) -> tuple[int, tuple]:
        return self.entry(self.call(F.LOOKUP, parent, name + b"\0"))

    def getattr(self, node: int) -> tuple:
        return F.ATTR.unpack_from(self.call(F.GETATTR, node, F.GETATTR_IN.pack(0, 0, 0)), F.ATTR_OUT.size)

    def create(self, parent: int, name: bytes, flags: int = 0o2 | 0o100, mode: int = 0o644) -> tuple[int, int]:
        payload = self.call(F.CREATE, parent, F.CREATE_IN.pack(flags, mode, 0o022, 0) + name + b"\0")
        node, _ = self.entry(payload)
        return node, F.OPEN_OUT.unpack_from(payload, F.ENTRY_OUT.size + F.ATTR.size)[0]

    def open(self, node: int, flags: int = 0) -> int:
        return F.OPEN_OUT.unpack_from(self.call(F.OPEN, node, F.OPEN_IN.pack(flags, 0)))[0]

    def opendir(self, node: int) -> int:
        return F.OPEN_OUT.unpack_from(self.call(F.OPENDIR, node, F.OPEN_IN.pack(0, 0)))[0]

    def read(self, node: int, fh: int, offset: int, size: int) -> bytes:
        return self.call(F.READ, node, F.READ_IN.pack(fh, offset, size, 0, 0, 0, 0))

    def write(self, node: int, fh: int, offset: int, data: bytes) -> int:
        return F.WRITE_OUT.unpack(self.call(F.WRITE, node, F.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0)
                                            + data))[0]

    def release(self, node: int, fh: int, opcode: int = F.RELEASE) -> None:
        self.call(opcode, node, F.RELEASE_IN.pack(fh, 0, 0, 0))

    def readdir(self, node: int, fh: int, offset: int = 0, size: int = 4096) -> list[tuple[bytes, int, int]]:
        payload = self.call(F.READDIR, node, F.READ_IN.pack(fh, offset, size, 0, 0, 0, 0))
        out, pos = [], 0
        while pos < len(payload):
            ino, off, namelen, typ = F.DIRENT.unpack_from(payload, pos)
            name = payload[pos + F.DIRENT.size:pos + F.DIRENT.size + namelen]
            out.append((name, off, typ))
            pos += (F.DIRENT.size + namelen + 7) & ~7
        return out

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755) -> int:
        return self.entry(self.call(F.MKDIR, parent, F.MKDIR_IN.pack(mode, 0o022) + name + b"\0"))[0]

    def symlink(self, parent: int, name: bytes, target: bytes) -> int:
        return self.entry(self.call(F.SYMLINK, parent, name + b"\0" + target + b"\0"))[0]

    def link(self, source: int, parent: int, name: bytes) -> int:
        return self.entry(self.call(F.LINK, parent, F.LINK_IN.pack(source) + name + b"\0"))[0]

    def rename(self, parent: int, old: bytes, newparent: int, new: bytes, flags: int | None = None) -> None:
        if flags is None:
            self.call(F.RENAME, parent, F.RENAME_IN.pack(newparent) + old + b"\0" + new + b"\0")
        else:
            self.call(F.RENAME2, parent, F.RENAME2_IN.pack(newparent, flags, 0) + old + b"\0" + new + b"\0")

    def setattr(self, node: int, valid: int, size: int = 0, mode: int = 0, uid: int = 0, gid: int = 0,
                atime: int = 0, mtime: int = 0, fh: int = 0) -> tuple:
        body = F.SETATTR_IN.pack(valid, 0, fh, size, 0, atime, mtime, 0, 0, 0, 0, mode, 0, uid, gid, 0)
        return F.ATTR.unpack_from(self.call(F.SETATTR, node, body), F.ATTR_OUT.size)

    def forget(self, node: int, count: int) -> bytes:
        return self.raw(F.FORGET, node, F.FORGET_IN.pack(count))

    def batch_forget(self, pairs: list[tuple[int, int]]) -> bytes:
        body = F.BATCH_FORGET_IN.pack(len(pairs), 0) + b"".join(F.FORGET_ONE.pack(n, c) for n, c in pairs)
        return self.raw(F.BATCH_FORGET, 0, body)


def errno_of(reply: bytes) -> int:
    return -struct.unpack_from("<i", reply, 4)[0]
