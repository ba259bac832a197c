"""VMDK sparse extents, read-only: monolithicSparse and streamOptimized (the form
cloud images ship in), one file with an embedded descriptor and no parent.

The layout (VMware's "Virtual Disk Format 1.1", and QEMU's block/vmdk.c): a 512-byte
little-endian header, a grain directory of 32-bit sector offsets of grain tables,
grain tables of 32-bit sector offsets of grains. streamOptimized images write the
header again in a footer (the leading one says "grain directory at end") and store
each grain deflated behind a 12-byte marker (lba, size).
"""

from __future__ import annotations

import array
import re
import struct
import sys
import zlib
from collections import OrderedDict

from ..errors import ImageError
from .grains import COMPRESSED, DATA, UNALLOC, ZERO, GrainDriver

SECTOR = 512
MAGIC = b"KDMV"
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
GD_AT_END = 0xFFFFFFFFFFFFFFFF
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
FLAG_ZERO_GRAIN = 1 << 2        # a grain table entry of 1 means "reads as zeroes"
COMPRESSION_DEFLATE = 1
MARKER_END_OF_STREAM = 0
MARKER_FOOTER = 3
MAX_CAPACITY = 1 << 52          # bytes; far past any real disk, keeps the tables bounded
MAX_GRAIN_SECTORS = 1 << 17     # 64 MiB grains (QEMU: 0x20000 sectors)
MAX_GT_ENTRIES = 1 << 16
SUPPORTED = ("monolithicSparse", "streamOptimized")
GT_CACHE_TABLES = 256


def _u32_array(raw: bytes) -> array.array:
    a = array.array("I", raw)
    if sys.byteorder != "little":
        a.byteswap()
    return a


class VmdkDriver(GrainDriver):
    format = "vmdk"

    def _open(self) -> None:
        path = self.path
        head = self._pread_exact(min(SECTOR, self.file_size), 0, "header").ljust(SECTOR, b"\0")
        h = _HEADER.unpack_from(head)
        if h[0] != MAGIC:
            # A descriptor file (monolithicFlat, twoGbMaxExtent...) or the old COWD format.
            m = re.search(rb'createType\s*=\s*"?([A-Za-z0-9]+)', head)
            kind = f"vmdk image of type {m.group(1).decode()}" if m else "vmdk image without a sparse header"
            raise ImageError(f"{path}: a {kind}; kvmpy reads monolithicSparse and streamOptimized "
                             f"(convert it with: qemu-img convert -O qcow2 {path} out.qcow2)")
        if h[9] == GD_AT_END:
            # streamOptimized: the real header is in the footer, 1 KiB before the end.
            if self.file_size < 3 * SECTOR:
                raise ImageError(f"{path}: vmdk footer missing (file too short)")
            marker = self._pread_exact(SECTOR, self.file_size - 3 * SECTOR, "footer marker")
            eos = self._pread_exact(SECTOR, self.file_size - SECTOR, "end-of-stream marker")
            _v, msize, mtype = struct.unpack_from("<QII", marker)
            if msize or mtype != MARKER_FOOTER or struct.unpack_from("<QII", eos) != (0, 0, MARKER_END_OF_STREAM):
                raise ImageError(f"{path}: vmdk grain directory is 'at end' but the footer is missing")
            foot = self._pread_exact(SECTOR, self.file_size - 2 * SECTOR, "footer")
            h = _HEADER.unpack_from(foot)
            if h[0] != MAGIC:
                raise ImageError(f"{path}: vmdk footer has no KDMV magic")
        (_magic, version, flags, capacity, grain, desc_off, desc_size, gtes, _rgd, gd, _overhead,
         _unclean, _eol, algo) = h
        if version not in (1, 2, 3):
            raise ImageError(f"{path}: vmdk version {version} unsupported")
        if not grain or grain & (grain - 1) or grain > MAX_GRAIN_SECTORS:
            raise ImageError(f"{path}: vmdk grain size {grain} sectors invalid")
        if capacity * SECTOR > MAX_CAPACITY:
            raise ImageError(f"{path}: vmdk capacity {capacity} sectors too large")
        if not 1 <= gtes <= MAX_GT_ENTRIES:
            raise ImageError(f"{path}: vmdk grain table entries {gtes} invalid")
        if flags & FLAG_COMPRESSED and (algo != COMPRESSION_DEFLATE or not flags & FLAG_MARKERS):
            raise ImageError(f"{path}: vmdk compression without grain markers or with algorithm {algo} "
                             f"unsupported (streamOptimized uses deflate and markers)")
        self._descriptor_checks(desc_off, desc_size)
        self.flags = flags
        self.size = capacity * SECTOR
        self.grain_size = grain * SECTOR
        self.gt_entries = gtes
        n_gd = -(-capacity // (grain * gtes))
        if gd == GD_AT_END or gd * SECTOR + n_gd * 4 > self.file_size:
            raise ImageError(f"{path}: vmdk grain directory at sector {gd} lies outside the file")
        self.gd = _u32_array(self._pread_exact(n_gd * 4, gd * SECTOR, "grain directory"))
        self.gt_cache = OrderedDict()

    def format_specific(self) -> dict:
        """qemu-img info's "Format specific information" for this image."""
        extent = {"virtual-size": self.size, "filename": self.path, "cluster-size": self.grain_size, "format": ""}
        if self.flags & FLAG_COMPRESSED:
            extent = {"compressed": True, **extent}
        data = {"cid": self.cid, "parent-cid": 0xFFFFFFFF, "create-type": self.create_type, "extents": [extent]}
        if self.cid is None:
            del data["cid"]
        return data

    def _descriptor_checks(self, desc_off: int, desc_size: int) -> None:
        """The embedded descriptor: one extent, this file, no parent image."""
        self.cid = None
        self.create_type = "monolithicSparse"
        if not desc_off or not desc_size:
            return      # a sparse extent without a descriptor: the header says it all
        if desc_size > 2048:
            raise ImageError(f"{self.path}: vmdk descriptor of {desc_size} sectors is too large")
        text = self._pread_exact(desc_size * SECTOR, desc_off * SECTOR, "descriptor")
        text = text.split(b"\0", 1)[0].decode("utf-8", "replace")
        m = re.search(r'^\s*createType\s*=\s*"?([A-Za-z0-9]+)"?', text, re.M)
        ctype = m.group(1) if m else "monolithicSparse"
        if ctype not in SUPPORTED:
            raise ImageError(f"{self.path}: a vmdk image of type {ctype}; kvmpy reads monolithicSparse and "
                             f"streamOptimized (convert it with: qemu-img convert -O qcow2 {self.path} out.qcow2)")
        m = re.search(r'^\s*CID\s*=\s*([0-9a-fA-F]{1,8})\s*$', text, re.M)
        self.cid = int(m.group(1), 16) if m else None
        m = re.search(r'^\s*parentCID\s*=\s*([0-9a-fA-F]+)', text, re.M)
        if m and m.group(1).lower() != "ffffffff":
            raise ImageError(f"{self.path}: a vmdk delta image with a parent; kvmpy reads standalone vmdk "
                             f"(convert it with: qemu-img convert -O qcow2 {self.path} out.qcow2)")
        self.create_type = ctype

    def _grain_table(self, gdi: int) -> array.array | None:
        off = self.gd[gdi]
        if not off:
            return None
        t = self.gt_cache.get(off)
        if t is not None:
            self.gt_cache.move_to_end(off)
            return t
        t = _u32_array(self._pread_exact(self.gt_entries * 4, off * SECTOR, f"grain table {gdi}"))
        self.gt_cache[off] = t
        if len(self.gt_cache) > GT_CACHE_TABLES:
            self.gt_cache.popitem(last=False)
        return t

    def _unallocated_span(self, gi: int) -> int:
        gdi, i = divmod(gi, self.gt_entries)
        if gdi < len(self.gd) and not self.gd[gdi]:
            return self.gt_entries - i
        return 0

    def _lookup(self, gi: int):
        gdi, i = divmod(gi, self.gt_entries)
        if gdi >= len(self.gd):
            raise ImageError(f"{self.path}: grain {gi} beyond the grain directory")
        t = self._grain_table(gdi)
        if t is None:
            return UNALLOC, 0
        e = t[i]
        if e == 0:
            return UNALLOC, 0
        if e == 1 and self.flags & FLAG_ZERO_GRAIN:
            return ZERO, 0
        host = e * SECTOR
        if host >= self.file_size:
            raise ImageError(f"{self.path}: grain {gi} at sector {e} lies outside the file")
        return (COMPRESSED if self.flags & FLAG_COMPRESSED else DATA), host

    def _inflate(self, gi: int, host: int) -> bytes:
        if host + 12 > self.file_size:
            raise ImageError(f"{self.path}: compressed grain {gi} lies outside the file")
        marker = self._pread_exact(12, host, f"grain {gi} marker")
        _lba, size = struct.unpack("<QI", marker)
        if size > self.grain_size * 2 + 1024 or host + 12 + size > self.file_size:
            raise ImageError(f"{self.path}: compressed grain {gi} has an invalid size {size}")
        raw = self._pread_exact(size, host + 12, f"grain {gi}")
        try:
            d = zlib.decompressobj()
            data = d.decompress(raw, self.grain_size)
        except zlib.error as e:
            raise ImageError(f"{self.path}: compressed grain {gi} is corrupt: {e}") from None
        if len(data) < self.grain_size:
            # The last grain of a disk whose size is no multiple of the grain size.
            data += bytes(self.grain_size - len(data))
        return data
