"""Read-only drivers for formats that map the disk in fixed-size grains (vmdk's
sparse extents, vdi's blocks): the shared read path, block status and refusals.

A subclass gives ``grain_size`` and ``_lookup(gi) -> (kind, host_offset)`` with kind
from qcow2_format (DATA: stored at host_offset; COMPRESSED: ``_inflate(gi, host)``
gives the grain; ZERO/UNALLOC: reads as zeroes), validating every table entry it
returns against the file: the image is input, and hostile.
"""

from __future__ import annotations

import os

from ..errors import ImageError
from . import direct
from .driver import BlockDriver, full_preadv, total_length
from .locking import lock_image, mode_for
from .qcow2 import _Cursor, _zero_fill
from .qcow2_format import COMPRESSED, DATA, UNALLOC, ZERO


class GrainDriver(BlockDriver):
    grain_size: int

    def __init__(self, path: str, read_only: bool = True, force_share: bool = False, cache: str | None = None):
        self.path = path
        self.read_only = True
        # Read-only, so of QEMU's cache= only O_DIRECT matters here (none, directsync):
        # the image's reads bypass the host page cache, as under QEMU.
        self.cache = direct.cache_mode(cache)
        if not read_only:
            raise ImageError(f"{path}: kvmpy reads {self.format} images read-only; use readonly=on, "
                             f"or convert it: qemu-img convert -O qcow2 {path} out.qcow2")
        self.fd = direct.open_image_file(path, os.O_RDONLY | os.O_CLOEXEC, self.cache, f"{self.format} image")
        try:
            if self.cache.direct:
                direct.register(self.fd)
            if not force_share:
                lock_image(self.fd, path, mode_for(True))
            self.file_size = os.fstat(self.fd).st_size
            self._open()
        except BaseException:
            self.close()
            raise
        self.inflated = (None, b"")

    def _open(self) -> None:
        raise NotImplementedError

    def _lookup(self, gi: int):
        raise NotImplementedError

    def _inflate(self, gi: int, host: int) -> bytes:
        raise ImageError(f"{self.path}: grain {gi} is compressed, which this format does not allow")

    def _pread_exact(self, length: int, offset: int, what: str) -> bytes:
        if offset < 0 or offset + length > self.file_size:
            raise ImageError(f"{self.path}: {what} at offset {offset} lies outside the file")
        data = direct.pread(self.fd, length, offset)
        if len(data) != length:
            raise ImageError(f"{self.path}: {what} at offset {offset} is truncated")
        return data

    def _check_host(self, gi: int, host: int, length: int) -> None:
        if host + length > self.file_size:
            raise ImageError(f"{self.path}: grain {gi} at offset {host} lies outside the file")

    def host_mapping(self, offset: int, length: int):
        """(kind, host offset of ``offset``, run): runs of like grains, data runs
        only while contiguous in the file (one preadv each)."""
        length = min(length, self.size - offset)
        gs = self.grain_size
        gi = offset // gs
        kind, host = self._lookup(gi)
        within = offset % gs
        run = min(gs - within, length)
        if kind == COMPRESSED:
            return kind, host, run
        start = host + within if kind == DATA else 0
        nxt = host + gs
        while run < length:
            gi += 1
            if kind == UNALLOC:
                # A whole missing table is one step, not one per grain: a hostile
                # header can describe petabytes of them.
                skip = self._unallocated_span(gi)
                if skip:
                    run = min(run + skip * gs, length)
                    gi += skip - 1
                    continue
            k2, h2 = self._lookup(gi)
            if k2 != kind or (kind == DATA and h2 != nxt):
                break
            nxt += gs
            run = min(run + gs, length)
        return kind, start, run

    def _unallocated_span(self, gi: int) -> int:
        """How many grains from gi on are known unallocated without looking at each
        (a missing grain table), or 0."""
        return 0

    def preadv(self, buffers, offset):
        cur = _Cursor(buffers)
        self._check_range(offset, cur.length)
        pos = 0
        while pos < cur.length:
            kind, host, run = self.host_mapping(offset + pos, cur.length - pos)
            views = cur.slices(pos, run)
            if kind == DATA:
                self._check_host((offset + pos) // self.grain_size, host, run)
                full_preadv(self.fd, views, host)
            elif kind == COMPRESSED:
                gi = (offset + pos) // self.grain_size
                if self.inflated[0] != gi:
                    self.inflated = (gi, self._inflate(gi, host))
                a = (offset + pos) % self.grain_size
                src = memoryview(self.inflated[1])[a:a + run]
                p = 0
                for v in views:
                    v[:] = src[p:p + len(v)]
                    p += len(v)
            else:
                _zero_fill(views)
            pos += run
        return cur.length

    def block_status(self, offset, length):
        kind, _host, run = self.host_mapping(offset, length)
        if kind in (DATA, COMPRESSED):
            return True, False, run
        return False, True, run

    def pwritev(self, buffers, offset):
        self._check_writable()
        return total_length(buffers)

    def flush(self):
        pass

    def discard(self, offset, length):
        self._check_writable()

    def write_zeroes(self, offset, length, may_unmap=False):
        self._check_writable()

    def close(self):
        if self.fd >= 0:
            direct.forget(self.fd)
            os.close(self.fd)
            self.fd = -1

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512


__all__ = ["GrainDriver", "COMPRESSED", "DATA", "UNALLOC", "ZERO"]
