"""Host-side models of what the test guests (tests/guests/*.c) compute, so a test can
check a guest's output on any backend against the value it must print."""

from __future__ import annotations

import zlib

M64 = (1 << 64) - 1
SEED = 0x9E3779B97F4A7C15


def xorshift64(x: int) -> int:
    x ^= (x << 13) & M64
    x ^= x >> 7
    x ^= (x << 17) & M64
    return x


def compute_reference(iters: int) -> tuple[int, int]:
    """(crc32, checksum) that compute.c prints for ``iters`` rounds."""
    x = SEED
    buf = bytearray()
    for _ in range(4096 // 8):
        x = xorshift64(x)
        buf += x.to_bytes(8, "little")
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = 0xEDB88320 ^ (c >> 1) if c & 1 else c >> 1
        table.append(c)
    crc = zlib.crc32(bytes(buf))
    h = crc
    for _ in range(iters):
        x = xorshift64(x)
        h = ((h ^ x) * 0x100000001B3) & M64
        h ^= h >> 29
        h = (h + table[h & 0xFF]) & M64
    return crc, h
