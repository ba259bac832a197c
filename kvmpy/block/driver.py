"""The block-driver interface every disk image format implements.

A device model (virtio-blk) sees only this: scatter/gather reads and writes at a
byte offset of the virtual disk, flush, discard and write-zeroes. Bounds are the
caller's job (it knows the request); a driver still refuses an access past the
virtual size with ImageError rather than silently growing or reading garbage.
"""

from __future__ import annotations

import ctypes
import errno
import os

from ..errors import ImageError
from . import direct

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_ZERO_CHUNK = bytes(1 << 20)

_libc = None


def _fallocate_fn():
    global _libc
    if _libc is None:
        # The libc this process already runs on: ctypes.util.find_library would run
        # ldconfig in a child process, which a sandboxed VM (kvmpy.sandbox) may not.
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        _libc.fallocate.restype = ctypes.c_int
    return _libc.fallocate


def fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) with flags. False when the file system cannot do this mode."""
    if length <= 0:
        return True
    if mode == 0:        # the plain mode is in the standard library; the flags need libc's call
        try:
            os.posix_fallocate(fd, offset, length)
            return True
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise
    rc = _fallocate_fn()(fd, mode, offset, length)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def write_zero_bytes(fd: int, offset: int, length: int) -> None:
    """Plain zero writes: the portable fallback when hole punching is unavailable."""
    while length > 0:
        n = min(length, len(_ZERO_CHUNK))
        written = direct.pwrite(fd, memoryview(_ZERO_CHUNK)[:n], offset)
        if written <= 0:
            raise OSError(errno.EIO, "short write")
        offset += written
        length -= written


def punch_hole(fd: int, offset: int, length: int) -> bool:
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def zero_range(fd: int, offset: int, length: int, may_unmap: bool) -> None:
    """Make [offset, offset+length) read as zeroes, cheaply where the fs allows."""
    if length <= 0:
        return
    if may_unmap and punch_hole(fd, offset, length):
        return
    if fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
        return
    write_zero_bytes(fd, offset, length)


def create_image_file(path: str) -> int:
    """A new, empty image file at ``path``, open for writing.

    An old image there is truncated only once this process holds the writer's
    locks on it: recreating an image a VM or QEMU still uses would pull the disk
    from under it (qemu-img create refuses that too)."""
    from .locking import WRITER, lock_image
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ImageError(f"{path}: cannot create image: {e.strerror}") from None
    try:
        lock_image(fd, path, WRITER)
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _bytes_view(b) -> memoryview:
    v = memoryview(b)
    return v if (v.format == "B" and v.ndim == 1) else v.cast("B")


def _byte_views(buffers: list) -> list[memoryview]:
    # Empty views are dropped: a call that moves 0 bytes would read as EOF or a failed write.
    return [v for v in map(_bytes_view, buffers) if len(v)]


def full_preadv(fd: int, buffers: list, offset: int, zero_fill_eof: bool = True) -> int:
    """preadv until every buffer is full; a short read at end of file reads zeroes.

    Image files may legitimately end before the last sector they describe (a raw
    file truncated sparse, a qcow2 whose tail cluster was never written), so EOF
    inside the request is zeroes, not an error.
    """
    views = _byte_views(buffers)
    alignment = direct.alignment_of(fd)
    if alignment is not None:
        return direct.preadv(fd, views, offset, alignment, zero_fill_eof) if views else 0
    return direct.read_all(fd, views, offset, zero_fill_eof)


def full_pwritev(fd: int, buffers: list, offset: int) -> int:
    views = _byte_views(buffers)
    alignment = direct.alignment_of(fd)
    if alignment is not None:
        return direct.pwritev(fd, views, offset, alignment) if views else 0
    direct.write_all(fd, views, offset)
    return sum(len(v) for v in views)


def total_length(buffers: list) -> int:
    return sum(memoryview(b).nbytes for b in buffers)


class BlockDriver:
    """One open disk image. Subclasses: RawDriver, Qcow2Driver."""

    path: str
    format: str
    size: int
    read_only: bool
    backing: "BlockDriver | None" = None     # the image reads fall through to (qcow2), else None
    # The image file's descriptor, -1 once closed or where the image has no one file
    # (the native data plane serves a disk only through it).
    fd: int = -1
    # The cache mode the file was opened with (direct.CacheMode); None for a driver
    # with no file of its own to open (the tests' disks in memory).
    cache: "direct.CacheMode | None" = None
    # True where stored data may lie over holes of the file (a static vdi, a
    # metadata-preallocated qcow2): block status then asks the file, as QEMU's
    # BDRV_BLOCK_RECURSE does.
    holes_are_zero: bool = False
    # True on a raw image whose format was probed: writes may not give block 0 the
    # magic of another format (RawDriver; kvmpy.block.formats says why).
    restrict_block0: bool = False

    def preadv(self, buffers: list, offset: int) -> int:
        raise NotImplementedError

    def pwritev(self, buffers: list, offset: int) -> int:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def discard(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # Convenience for tools (img convert, tests); the device path uses preadv.
    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        self.preadv([memoryview(buf)], offset)
        return bytes(buf)

    def pwrite(self, data, offset: int) -> int:
        return self.pwritev([memoryview(data)], offset)

    def format_specific(self) -> dict | None:
        """qemu-img info's "Format specific information" of this image; None where
        the format has none to show."""
        return None

    def block_status(self, offset: int, length: int):
        """(is_data, is_zero, run_length) for the run starting at offset.

        is_data False means the range reads as zeroes without storage in this
        image (hole/zero cluster) or comes from a backing file (see subclasses).
        """
        return True, False, length

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageError(
                f"{self.path}: access [{offset}, {offset + length}) outside the virtual size {self.size}")

    def _check_writable(self) -> None:
        if self.read_only:
            raise ImageError(f"{self.path}: image is opened read-only")
