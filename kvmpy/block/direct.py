"""Cache modes (QEMU's ``cache=``) and I/O on image files opened with O_DIRECT.

QEMU's five modes are three switches: whether the image bypasses the host page
cache (O_DIRECT), whether every write is durable when it completes (O_DSYNC:
the guest is offered no write cache), and whether flushes are ignored:

    writeback     page cache, write cache with flush          (the default)
    none          O_DIRECT,   write cache with flush
    directsync    O_DIRECT + O_DSYNC, no write cache
    writethrough  page cache + O_DSYNC, no write cache
    unsafe        page cache, write cache whose flushes do nothing

O_DIRECT wants the file offset, the length and the memory of every transfer
aligned (to the logical block size of the device under the file, or what statx's
STATX_DIOALIGN says). The drivers keep doing plain preads and pwrites of any
size (qcow2's 8-byte L1 entries, a guest's oddly placed buffers); the functions
here serve them on an O_DIRECT descriptor through an aligned bounce buffer, with
a read-modify-write of the blocks a write covers only in part. Descriptors are
registered with their alignment when a driver opens them (``register``) and
forgotten when it closes them; everything else goes straight to the system call.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import threading
from dataclasses import dataclass

from ..errors import ImageError

CACHE_MODES = ("writeback", "none", "directsync", "writethrough", "unsafe")
DEFAULT_CACHE = "writeback"


@dataclass(frozen=True)
class CacheMode:
    name: str
    direct: bool          # O_DIRECT: the host page cache is bypassed
    dsync: bool           # O_DSYNC: a completed write is durable
    write_cache: bool     # the guest is told of a volatile write cache it must flush
    flush_ignored: bool   # unsafe: a guest's flush returns at once

    @property
    def open_flags(self) -> int:
        return (os.O_DIRECT if self.direct else 0) | (os.O_DSYNC if self.dsync else 0)


_MODES = {
    "writeback": CacheMode("writeback", direct=False, dsync=False, write_cache=True, flush_ignored=False),
    "none": CacheMode("none", direct=True, dsync=False, write_cache=True, flush_ignored=False),
    "directsync": CacheMode("directsync", direct=True, dsync=True, write_cache=False, flush_ignored=False),
    "writethrough": CacheMode("writethrough", direct=False, dsync=True, write_cache=False, flush_ignored=False),
    "unsafe": CacheMode("unsafe", direct=False, dsync=False, write_cache=True, flush_ignored=True),
}


def cache_mode(name: str | None) -> CacheMode:
    """The mode called ``name`` (None: writeback); ValueError for another name."""
    try:
        return _MODES[name or DEFAULT_CACHE]
    except KeyError:
        raise ValueError(f"cache mode {name!r}: one of {', '.join(CACHE_MODES)}") from None


def open_image_file(path: str, flags: int, mode: CacheMode, what: str = "image") -> int:
    """os.open with the mode's flags; a file system that refuses O_DIRECT is QEMU's
    one-line error naming the file."""
    try:
        return os.open(path, flags | mode.open_flags)
    except OSError as e:
        if e.errno == errno.EINVAL and mode.direct:
            raise ImageError(f"Could not open '{path}': filesystem does not support O_DIRECT "
                             f"(cache={mode.name})") from None
        raise ImageError(f"{path}: cannot open {what}: {e.strerror}") from None


# ---- alignment ------------------------------------------------------------------------

_STATX_DIOALIGN = 0x2000
_AT_EMPTY_PATH = 0x1000
_STATX_SIZE = 256
_STATX_MASK = 0             # offsets in struct statx (linux/stat.h)
_STATX_DIO_MEM_ALIGN = 152
_STATX_DIO_OFFSET_ALIGN = 156
_BLKSSZGET = 0x1268
# Safe for every device with a logical block size up to a page, which is all
# of them that Linux mounts a file system on.
FALLBACK_ALIGNMENT = 4096

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Alignment:
    memory: int           # buffer addresses
    offset: int           # file offsets and lengths


def _statx_alignment(fd: int) -> Alignment | None:
    statx = getattr(_libc, "statx", None)
    if statx is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if statx(fd, b"", _AT_EMPTY_PATH, _STATX_DIOALIGN, buf) != 0:
        return None
    mask, = struct.unpack_from("<I", buf, _STATX_MASK)
    mem, off = struct.unpack_from("<II", buf, _STATX_DIO_MEM_ALIGN)
    if not mask & _STATX_DIOALIGN or not mem or not off:
        return None         # the file system did not say (or says it cannot do O_DIRECT)
    return Alignment(memory=mem, offset=off)


def _logical_block_size(fd: int) -> int | None:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        try:
            return struct.unpack("<i", fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4))[0]
        except OSError:
            return None
    base = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for path in (f"{base}/queue/logical_block_size", f"{base}/../queue/logical_block_size"):
        try:
            with open(path) as f:
                return int(f.read())
        except (OSError, ValueError):
            continue
    return None


def dio_alignment(fd: int) -> Alignment:
    """What O_DIRECT transfers on ``fd`` must be aligned to: statx's answer, else the
    logical block size of the device under it, else a page."""
    found = _statx_alignment(fd)
    if found is not None:
        return found
    block = _logical_block_size(fd) or FALLBACK_ALIGNMENT
    return Alignment(memory=block, offset=block)


# ---- the registry of O_DIRECT descriptors -----------------------------------------------

_direct_fds: dict[int, Alignment] = {}
_registry_lock = threading.Lock()


def register(fd: int) -> Alignment:
    """``fd`` was opened with O_DIRECT by a driver that will ``forget`` it before closing."""
    alignment = dio_alignment(fd)
    with _registry_lock:
        _direct_fds[fd] = alignment
    return alignment


def forget(fd: int) -> None:
    with _registry_lock:
        _direct_fds.pop(fd, None)


def alignment_of(fd: int) -> Alignment | None:
    """None for a descriptor that goes through the page cache."""
    return _direct_fds.get(fd)


# ---- aligned transfers ----------------------------------------------------------------

def aligned_buffer(nbytes: int, align: int) -> memoryview:
    """A writable view of ``nbytes`` starting at a multiple of ``align``."""
    raw = bytearray(nbytes + align)
    pad = (-_address(memoryview(raw))) % align
    return memoryview(raw)[pad:pad + nbytes]


def _address(view: memoryview) -> int | None:
    """The buffer's address, or None for a read-only one (which is always bounced)."""
    if view.readonly:
        return None
    holder = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(holder)
    finally:
        del holder


def _views_aligned(views: list[memoryview], alignment: Alignment) -> bool:
    for v in views:
        if len(v) % alignment.offset:
            return False
        address = _address(v)
        if address is None or address % alignment.memory:
            return False
    return True


def _read_span(fd: int, buf: memoryview, offset: int) -> int:
    """preadv of the aligned ``buf`` at ``offset`` until full or end of file; returns
    the bytes read (the rest of buf is zeroed)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            buf[done:] = bytes(len(buf) - done)
            break
        done += n
    return done


def consume(views: list[memoryview], n: int) -> None:
    """Drops the first n bytes of ``views``: what a short preadv/pwritev did move."""
    while views and n >= len(views[0]):
        n -= len(views[0])
        views.pop(0)
    if n and views:
        views[0] = views[0][n:]


def read_all(fd: int, views: list[memoryview], offset: int, zero_fill_eof: bool = True,
             alignment: Alignment | None = None) -> int:
    """preadv until every view (non-empty) is full; end of file reads zeroes, or is
    EIO without ``zero_fill_eof``. With ``alignment`` (an O_DIRECT fd, views aligned):
    a read ending short of a block boundary (end of file) leaves the rest to the
    bounce path."""
    total = sum(len(v) for v in views)
    pending = list(views)
    done = 0
    while pending:
        n = os.preadv(fd, pending, offset + done)
        if n == 0:
            if not zero_fill_eof:
                raise OSError(errno.EIO, "unexpected end of file")
            for v in pending:
                v[:] = bytes(len(v))
            return total
        done += n
        consume(pending, n)
        if alignment is not None and pending and not _views_aligned(pending[:1], alignment):
            preadv(fd, pending, offset + done, alignment, zero_fill_eof)
            return total
    return total


def write_all(fd: int, views: list[memoryview], offset: int) -> None:
    """pwritev until every view (non-empty) is written; a write that moves nothing is EIO."""
    pending = list(views)
    done = 0
    while pending:
        n = os.pwritev(fd, pending, offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n
        consume(pending, n)


def preadv(fd: int, views: list[memoryview], offset: int, alignment: Alignment, zero_fill_eof: bool = True) -> int:
    """Fill ``views`` (non-empty byte views) from ``offset`` of an O_DIRECT ``fd``."""
    total = sum(len(v) for v in views)
    if not offset % alignment.offset and _views_aligned(views, alignment):
        return read_all(fd, views, offset, zero_fill_eof, alignment)
    start = offset - offset % alignment.offset
    end = -(-(offset + total) // alignment.offset) * alignment.offset
    bounce = aligned_buffer(end - start, alignment.memory)
    got = _read_span(fd, bounce, start)
    if not zero_fill_eof and got < offset + total - start:
        raise OSError(errno.EIO, "unexpected end of file")
    pos = offset - start
    for v in views:
        v[:] = bounce[pos:pos + len(v)]
        pos += len(v)
    return total


def pwritev(fd: int, views: list[memoryview], offset: int, alignment: Alignment) -> int:
    """Write ``views`` (non-empty byte views) at ``offset`` of an O_DIRECT ``fd``; the
    blocks a write covers only in part are read first (the caller serialises writes
    to one block: the drivers' requests are whole sectors, qcow2 holds its lock)."""
    total = sum(len(v) for v in views)
    if not offset % alignment.offset and _views_aligned(views, alignment):
        write_all(fd, views, offset)
        return total
    start = offset - offset % alignment.offset
    end = -(-(offset + total) // alignment.offset) * alignment.offset
    bounce = aligned_buffer(end - start, alignment.memory)
    file_size = None
    if start != offset or end != offset + total:
        file_size = os.fstat(fd).st_size
        block = alignment.offset
        _read_span(fd, bounce[:block], start)
        if end - block > start:
            _read_span(fd, bounce[len(bounce) - block:], end - block)
    pos = offset - start
    for v in views:
        bounce[pos:pos + len(v)] = v
        pos += len(v)
    write_all(fd, [bounce], start)
    if file_size is not None and end > file_size and offset + total < end:
        # The block's padding must not grow the file (a raw image's size is the disk's).
        os.ftruncate(fd, max(file_size, offset + total))
    return total


def pread(fd: int, length: int, offset: int) -> bytes:
    """os.pread for any descriptor a driver holds (short at end of file, as os.pread)."""
    alignment = _direct_fds.get(fd)
    if alignment is None:
        return os.pread(fd, length, offset)
    if length <= 0:
        return b""
    start = offset - offset % alignment.offset
    end = -(-(offset + length) // alignment.offset) * alignment.offset
    bounce = aligned_buffer(end - start, alignment.memory)
    got = _read_span(fd, bounce, start)
    available = max(0, min(length, got - (offset - start)))
    return bytes(bounce[offset - start:offset - start + available])


def pwrite(fd: int, data, offset: int) -> int:
    """os.pwrite for any descriptor a driver holds; writes all of ``data``."""
    alignment = _direct_fds.get(fd)
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
    if alignment is None:
        return os.pwrite(fd, view, offset)
    if not len(view):
        return 0
    return pwritev(fd, [view], offset, alignment)
