"""The qcow2 on-disk format: field masks, feature bits, extension magics and QEMU's
limits, shared by the driver (qcow2.py), the checker (check.py) and the image tools."""

from __future__ import annotations

import array
import sys

MAGIC = b"QFI\xfb"

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED = 0x3F000000000001FE
RT_RESERVED = 0x1FF
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
KNOWN_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION
COMPAT_LAZY_REFCOUNTS = 1 << 0

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# QEMU's implementation limits; an image past them is refused as QEMU would.
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023
MAX_CLUSTER_BITS = 21
MIN_CLUSTER_BITS = 9
MAX_CHAIN_DEPTH = 64

# Cluster kinds returned by the mapper.
UNALLOC, ZERO, DATA, COMPRESSED = range(4)

_NATIVE_LITTLE = sys.byteorder == "little"


def be_array(raw: bytes) -> array.array:
    """A table of big-endian 64-bit entries (L1, L2, refcount table) as native integers."""
    a = array.array("Q")
    a.frombytes(raw)
    if _NATIVE_LITTLE:
        a.byteswap()
    return a


def to_be(table: array.array) -> bytes:
    """The inverse of be_array: native integers back to the on-disk big-endian form."""
    b = array.array("Q", table)
    if _NATIVE_LITTLE:
        b.byteswap()
    return b.tobytes()
