"""Screendumps as QEMU writes them: binary PPM (P6) and 8-bit RGB PNG.

PNG is built here from zlib and the chunk CRCs (no imaging library in the product).
The file is written under a temporary name and renamed, so a reader never sees
half a picture.
"""

from __future__ import annotations

import os
import struct
import zlib

from .render import Surface

FORMATS = ("ppm", "png")


def ppm_bytes(surface: Surface) -> bytes:
    return b"P6\n%d %d\n255\n" % (surface.width, surface.height) + surface.rgb()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bytes(surface: Surface) -> bytes:
    rgb = surface.rgb()
    stride = surface.width * 3
    # Filter type 0 (None) on every row: simple, and zlib does the rest.
    raw = b"".join(b"\x00" + rgb[y * stride:(y + 1) * stride] for y in range(surface.height))
    header = struct.pack(">IIBBBBB", surface.width, surface.height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6))
            + _chunk(b"IEND", b""))


def write_screendump(surface: Surface, filename: str, fmt: str = "ppm") -> None:
    """Write ``surface`` to ``filename``; OSError as the host gives it, ValueError for a bad format."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    data = png_bytes(surface) if fmt == "png" else ppm_bytes(surface)
    directory = os.path.dirname(os.path.abspath(filename))
    tmp = os.path.join(directory, f".{os.path.basename(filename)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, filename)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_ppm(data: bytes) -> Surface:
    """A P6 file back into a surface (the tests' reader, and a format check)."""
    parts = data.split(maxsplit=4)
    if len(parts) < 5 or parts[0] != b"P6" or parts[3] != b"255":
        raise ValueError("not a binary 8-bit PPM")
    width, height = int(parts[1]), int(parts[2])
    rgb = parts[4]
    if len(rgb) != width * height * 3:
        raise ValueError("PPM pixel data has the wrong length")
    out = bytearray(width * height * 4)
    out[2::4], out[1::4], out[0::4] = rgb[0::3], rgb[1::3], rgb[2::3]
    return Surface(width, height, out)
