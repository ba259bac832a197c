"""VirtualBox VDI images, read-only: dynamic and static (fixed), version 1.1.

The layout (VirtualBox's VDICore.h, and QEMU's block/vdi.c): a little-endian header
with the signature 0xbeda107f at 0x40, a block map of 32-bit block indices at
offset_bmap, the blocks themselves from offset_data on. A map entry of 0xffffffff
is a block never written, 0xfffffffe one discarded; both read as zeroes.
"""

from __future__ import annotations

import array
import struct
import sys

from ..errors import ImageError
from .grains import DATA, ZERO, GrainDriver

SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
TYPE_DYNAMIC, TYPE_STATIC = 1, 2
UNALLOCATED = 0xFFFFFFFF
DISCARDED = 0xFFFFFFFE
SECTOR = 512
MAX_BLOCKS = 0x3FFFFFFF          # QEMU's VDI_BLOCKS_IN_IMAGE_MAX
MAX_BLOCK_SIZE = 64 << 20


class VdiDriver(GrainDriver):
    format = "vdi"

    def _open(self) -> None:
        path = self.path
        h = self._pread_exact(0x190, 0, "header")
        signature, version, _hsize, itype = struct.unpack_from("<IIII", h, 0x40)
        if signature != SIGNATURE:
            raise ImageError(f"{path}: not a vdi image (no signature)")
        if version != VERSION_1_1:
            raise ImageError(f"{path}: vdi version {version >> 16}.{version & 0xFFFF} unsupported (1.1)")
        if itype not in (TYPE_DYNAMIC, TYPE_STATIC):
            raise ImageError(f"{path}: vdi image type {itype} unsupported (dynamic, static)")
        off_bmap, off_data = struct.unpack_from("<II", h, 0x154)
        sector_size, = struct.unpack_from("<I", h, 0x168)
        disk_size, block_size, block_extra, blocks, _allocated = struct.unpack_from("<QIIII", h, 0x170)
        if sector_size != SECTOR:
            raise ImageError(f"{path}: vdi sector size {sector_size} unsupported (512)")
        if block_extra:
            raise ImageError(f"{path}: vdi block_extra {block_extra} unsupported (0)")
        if not block_size or block_size % SECTOR or block_size & (block_size - 1) or block_size > MAX_BLOCK_SIZE:
            raise ImageError(f"{path}: vdi block size {block_size} invalid")
        if blocks > MAX_BLOCKS or disk_size > blocks * block_size:
            raise ImageError(f"{path}: vdi disk size {disk_size} does not fit {blocks} blocks of {block_size}")
        if off_bmap % SECTOR or off_data % SECTOR:
            raise ImageError(f"{path}: vdi block map or data offset not sector aligned")
        bmap = array.array("I", self._pread_exact(blocks * 4, off_bmap, "block map"))
        if sys.byteorder != "little":
            bmap.byteswap()
        self.bmap = bmap
        self.size = disk_size
        self.grain_size = block_size
        self.data_offset = off_data
        # A static image is preallocated, mostly as holes of the file: its blocks'
        # block status looks at the file, as QEMU's BDRV_BLOCK_RECURSE does.
        self.holes_are_zero = itype == TYPE_STATIC

    def _lookup(self, gi: int):
        if gi >= len(self.bmap):
            raise ImageError(f"{self.path}: block {gi} beyond the block map")
        e = self.bmap[gi]
        if e in (UNALLOCATED, DISCARDED):
            # vdi has no backing file: a block never written is this image's zeroes
            # ("present" in qemu-img map), not a hole to look through.
            return ZERO, 0
        if e >= len(self.bmap):
            raise ImageError(f"{self.path}: block map entry {gi} names block {e}, beyond the image")
        host = self.data_offset + e * self.grain_size
        if host >= self.file_size:
            raise ImageError(f"{self.path}: block {gi} at offset {host} lies outside the file")
        return DATA, host
