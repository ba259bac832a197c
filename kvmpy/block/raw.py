"""Raw images: the file (or block device) is the disk, byte for byte."""

from __future__ import annotations

import os

from ..errors import ImageError
from .driver import (BlockDriver, full_preadv, full_pwritev, punch_hole, total_length,
                     write_zero_bytes, zero_range)


class RawDriver(BlockDriver):
    format = "raw"

    def __init__(self, path: str, read_only: bool = False, fd: int | None = None):
        self.path = path
        self.read_only = read_only
        if fd is None:
            flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
            try:
                fd = os.open(path, flags)
            except OSError as e:
                raise ImageError(f"{path}: cannot open raw image: {e.strerror}") from None
        self.fd = fd
        # lseek(SEEK_END) rather than fstat: it also gives the size of a block device.
        self.size = os.lseek(fd, 0, os.SEEK_END)

    def preadv(self, buffers, offset):
        length = total_length(buffers)
        self._check_range(offset, length)
        return full_preadv(self.fd, buffers, offset)

    def pwritev(self, buffers, offset):
        self._check_writable()
        length = total_length(buffers)
        self._check_range(offset, length)
        return full_pwritev(self.fd, buffers, offset)

    def flush(self):
        if not self.read_only:
            os.fdatasync(self.fd)

    def discard(self, offset, length):
        self._check_writable()
        self._check_range(offset, length)
        # Discard is advisory, but guests (and fstrim tests) expect the range to read
        # back as zeroes afterwards, so without hole punching write real zeroes.
        if not punch_hole(self.fd, offset, length):
            write_zero_bytes(self.fd, offset, length)

    def write_zeroes(self, offset, length, may_unmap=False):
        self._check_writable()
        self._check_range(offset, length)
        zero_range(self.fd, offset, length, may_unmap)

    def truncate(self, new_size: int) -> None:
        self._check_writable()
        os.ftruncate(self.fd, new_size)
        self.size = new_size

    def block_status(self, offset, length):
        """Data vs hole from SEEK_DATA/SEEK_HOLE; holes read as zeroes."""
        end = min(offset + length, self.size)
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError:
            # ENXIO: no data at or after offset, the rest is one hole.
            return False, True, end - offset
        if data > offset:
            return False, True, min(data, end) - offset
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            hole = end
        return True, False, max(1, min(hole, end) - offset)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512
