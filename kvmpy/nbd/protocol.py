"""The NBD wire format, server side (doc/proto.md of the NBD project).

Only numbers and byte layouts live here: what the server does with them is in
server.py. Every parser takes bytes the peer sent and raises ProtocolError for a
malformed message, so a hostile client is a logged error, never a traceback.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

# ---------------------------------------------------------------- handshake

NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
SERVER_HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
CLIENT_FLAG_FIXED_NEWSTYLE = 1 << 0
CLIENT_FLAG_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR | 1
REP_ERR_POLICY = _REP_ERR | 2
REP_ERR_INVALID = _REP_ERR | 3
REP_ERR_PLATFORM = _REP_ERR | 4
REP_ERR_TLS_REQD = _REP_ERR | 5
REP_ERR_UNKNOWN = _REP_ERR | 6
REP_ERR_SHUTDOWN = _REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
REP_ERR_TOO_BIG = _REP_ERR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# The spec's limit on any string (export name, description, context name).
MAX_STRING = 4096

# ---------------------------------------------------------------- transmission

TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_CACHE = 1 << 10

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_DISC: "disc", CMD_FLUSH: "flush",
             CMD_TRIM: "trim", CMD_CACHE: "cache", CMD_WRITE_ZEROES: "write-zeroes",
             CMD_BLOCK_STATUS: "block-status"}

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# Error numbers on the wire (the spec's, which happen to be Linux's).
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# Host errno -> NBD error; anything else is EIO.
_HOST_ERRNO = {errno.EPERM: EPERM, errno.EACCES: EPERM, errno.EROFS: EPERM, errno.EIO: EIO,
               errno.ENOMEM: ENOMEM, errno.EINVAL: EINVAL, errno.ENOSPC: ENOSPC,
               errno.EDQUOT: ENOSPC, errno.EFBIG: ENOSPC, errno.EOVERFLOW: EOVERFLOW,
               errno.EOPNOTSUPP: ENOTSUP}

META_BASE_ALLOCATION = "base:allocation"
META_ALLOCATION_DEPTH = "qemu:allocation-depth"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# As qemu-nbd: the largest READ/WRITE payload, and what INFO_BLOCK_SIZE says.
MAX_REQUEST = 32 << 20
PREFERRED_BLOCK = 4096
MIN_BLOCK = 1

_HELLO = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_EXPORT_OLD = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_OFFSET = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")
_ERROR = struct.Struct(">IH")
_EXTENT = struct.Struct(">II")


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is dropped."""


class OptionError(Exception):
    """An option the server answers with an error reply and goes on."""

    def __init__(self, reply: int, message: str):
        super().__init__(message)
        self.reply = reply


def host_error_to_nbd(e: BaseException) -> int:
    return _HOST_ERRNO.get(e.errno if isinstance(e, OSError) else None, EIO)


# ---------------------------------------------------------------- packing

def server_hello() -> bytes:
    return _HELLO.pack(NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS)


def option_header(data: bytes) -> tuple[int, int, int]:
    """(magic, option, length) of a client option header."""
    return _OPTION.unpack(data)


OPTION_HEADER_SIZE = _OPTION.size


def option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload


def export_old_style(size: int, flags: int, no_zeroes: bool) -> bytes:
    return _EXPORT_OLD.pack(size, flags) + (b"" if no_zeroes else bytes(124))


def info_export(size: int, flags: int) -> bytes:
    return _INFO_EXPORT.pack(INFO_EXPORT, size, flags)


def info_string(kind: int, text: bytes) -> bytes:
    return struct.pack(">H", kind) + text


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return _INFO_BLOCK_SIZE.pack(INFO_BLOCK_SIZE, minimum, preferred, maximum)


def server_entry(name: bytes, description: bytes = b"") -> bytes:
    return struct.pack(">I", len(name)) + name + description


def meta_context_entry(context_id: int, name: bytes) -> bytes:
    return struct.pack(">I", context_id) + name


def simple_reply(error: int, cookie: int) -> bytes:
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(flags: int, kind: int, cookie: int, length: int) -> bytes:
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length)


def offset_data_header(flags: int, cookie: int, offset: int, data_length: int) -> bytes:
    return chunk_header(flags, REPLY_TYPE_OFFSET_DATA, cookie, 8 + data_length) + _OFFSET.pack(offset)


def offset_hole(flags: int, cookie: int, offset: int, length: int) -> bytes:
    return chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, cookie, _HOLE.size) + _HOLE.pack(offset, length)


def error_chunk(cookie: int, error: int, message: str, offset: int | None = None) -> bytes:
    text = message.encode("utf-8", "replace")[:MAX_STRING]
    body = _ERROR.pack(error, len(text)) + text
    kind = REPLY_TYPE_ERROR
    if offset is not None:
        body += _OFFSET.pack(offset)
        kind = REPLY_TYPE_ERROR_OFFSET
    return chunk_header(REPLY_FLAG_DONE, kind, cookie, len(body)) + body


def done_chunk(cookie: int) -> bytes:
    return chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)


def block_status_chunk(flags: int, cookie: int, context_id: int,
                       extents: list[tuple[int, int]]) -> bytes:
    body = struct.pack(">I", context_id) + b"".join(_EXTENT.pack(n, f) for n, f in extents)
    return chunk_header(flags, REPLY_TYPE_BLOCK_STATUS, cookie, len(body)) + body


# ---------------------------------------------------------------- parsing

class _Reader:
    """Bounded reads from one option's payload; running short is a bad option."""

    def __init__(self, data: bytes, what: str):
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise OptionError(REP_ERR_INVALID, f"{self.what}: option data too short")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def string(self, kind: str) -> bytes:
        n = self.u32()
        if n > MAX_STRING:
            raise OptionError(REP_ERR_TOO_BIG, f"{self.what}: {kind} longer than {MAX_STRING} bytes")
        return self.take(n)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise OptionError(REP_ERR_INVALID, f"{self.what}: {len(self.data) - self.pos} bytes of "
                                               f"trailing option data")


@dataclass(frozen=True)
class InfoRequest:
    """NBD_OPT_INFO / NBD_OPT_GO: an export name and the information kinds asked for."""
    name: bytes
    kinds: tuple[int, ...]


def parse_info_request(data: bytes) -> InfoRequest:
    r = _Reader(data, "NBD_OPT_INFO/GO")
    name = r.string("export name")
    count = r.u16()
    kinds = tuple(r.u16() for _ in range(count))
    r.end()
    return InfoRequest(name, kinds)


@dataclass(frozen=True)
class MetaContextRequest:
    name: bytes
    queries: tuple[bytes, ...]


# A client may ask about many contexts, but each query costs a reply: bounded.
MAX_META_QUERIES = 128


def parse_meta_context_request(data: bytes) -> MetaContextRequest:
    r = _Reader(data, "NBD_OPT_*_META_CONTEXT")
    name = r.string("export name")
    count = r.u32()
    if count > MAX_META_QUERIES:
        raise OptionError(REP_ERR_TOO_BIG, f"more than {MAX_META_QUERIES} meta context queries")
    queries = tuple(r.string("context query") for _ in range(count))
    r.end()
    return MetaContextRequest(name, queries)


@dataclass(frozen=True)
class Request:
    flags: int
    command: int
    cookie: int
    offset: int
    length: int


REQUEST_SIZE = REQUEST.size


def parse_request(data: bytes) -> Request:
    magic, flags, command, cookie, offset, length = REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#010x}")
    return Request(flags, command, cookie, offset, length)
