"""Raw images: the file (or block device) is the disk, byte for byte."""

from __future__ import annotations

import os

from ..errors import ImageError
from . import direct
from .driver import (BlockDriver, full_preadv, full_pwritev, punch_hole, total_length,
                     write_zero_bytes, zero_range)
from .formats import CLOOP_MAGIC, PROBE_SPAN, probe_head
from .locking import lock_image, mode_for


# What QEMU's probes recognise at offset 0 (qcow/qcow2, QED, VMDK sparse and
# descriptor, VHD, VHDX, LUKS, Parallels, Bochs, cloop). A guest that writes one of
# these into block 0 of a raw disk opened by probing would have the image open as
# that format next time, its header (backing file!) under the guest's control.
# The guard itself asks formats.probe_head, which also knows the subtler probes
# (a vmdk descriptor's "version=" line, vdi's signature at 0x40).
FOREIGN_MAGICS = (b"QFI\xfb", b"QED\x00", b"KDMV", b"COWD", b"# Disk DescriptorFile", b"conectix", b"vhdxfile",
                  b"LUKS\xba\xbe", b"WithoutFreeSpace", b"WithouFreSpacExt", b"Bochs Virtual HD Image",
                  CLOOP_MAGIC)
_MAGIC_SPAN = PROBE_SPAN
# Writes starting below this offset may change how a probed image probes: a native
# data plane leaves them to the driver's check.
RAW_GUARDED_BYTES = _MAGIC_SPAN


class RawDriver(BlockDriver):
    format = "raw"

    def __init__(self, path: str, read_only: bool = False, fd: int | None = None,
                 restrict_block0: bool = False, force_share: bool = False, cache: str | None = None):
        self.path = path
        self.cache = direct.cache_mode(cache)
        self.read_only = read_only
        # Set when the format was probed (QEMU's rule): block 0 may be written,
        # but not so that the image would probe as another format afterwards.
        self.restrict_block0 = restrict_block0
        if fd is None:
            flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
            fd = direct.open_image_file(path, flags, self.cache, "raw image")
            try:
                if self.cache.direct:
                    direct.register(fd)
                if not force_share:
                    lock_image(fd, path, mode_for(read_only))
            except BaseException:
                direct.forget(fd)
                os.close(fd)
                raise
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
        if self.restrict_block0 and offset < _MAGIC_SPAN and length:
            # What is written is the copy that was checked: the buffers are guest RAM,
            # which another vCPU may change between the check and the write.
            buffers = self._check_block0(buffers, offset, length)
        return full_pwritev(self.fd, buffers, offset)

    def _check_block0(self, buffers, offset, length) -> list:
        """Refuse a write that would make the image probe as another format; else the
        buffers to write, their guarded head replaced by the bytes that were checked."""
        head = bytearray(direct.pread(self.fd, _MAGIC_SPAN, 0).ljust(_MAGIC_SPAN, b"\0"))
        n = min(length, _MAGIC_SPAN - offset)
        new = bytearray(n)
        rest = []
        pos = 0
        for b in buffers:
            v = memoryview(b).cast("B")
            take = max(0, min(len(v), n - pos))
            new[pos:pos + take] = v[:take]
            pos += take
            if take < len(v):
                rest.append(v[take:])
        head[offset:offset + n] = new
        if probe_head(bytes(head)) is not None:
            raise ImageError(f"{self.path}: write to block 0 refused: the image was probed as raw "
                             f"and would then probe as another format; give format=raw to allow it")
        return [bytes(new), *rest]

    def flush(self):
        if not self.read_only and not self.cache.flush_ignored:
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
            direct.forget(self.fd)
            os.close(self.fd)
            self.fd = -1

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512
