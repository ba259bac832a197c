"""The 8x16 font that renders VGA text mode, read at run time from a console font.

kvmpy ships no font of its own: the VGA character generator's glyphs (code page
437) are taken from a PSF console font found on the host, by default Debian's
``console-setup-linux`` fonts (/usr/share/consolefonts, GPL-2; not copied into
kvmpy), looked up through the font's Unicode table so each CP437 code gets the
glyph of the character it stands for. Without such a font the text still renders,
as hollow boxes for every printable character, and one warning says what to install.
"""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

GLYPH_HEIGHT = 16
GLYPH_WIDTH = 8
FONT_DIRS = ("/usr/share/consolefonts", "/usr/share/kbd/consolefonts")
# Preferred first: the VGA-shaped glyphs with the widest coverage of CP437.
FONT_NAMES = ("Uni2-VGA16.psf.gz", "Lat15-VGA16.psf.gz", "default8x16.psf.gz", "Uni2-Fixed16.psf.gz")
FONT_ENV = "KVMPY_VGA_FONT"

PSF1_MAGIC = b"\x36\x04"
PSF1_MODE512 = 0x01
PSF1_MODEHASTAB = 0x02
PSF2_MAGIC = b"\x72\xb5\x4a\x86"
PSF2_HAS_UNICODE_TABLE = 0x01


class FontError(ValueError):
    pass


@dataclass(frozen=True)
class VgaFont:
    glyphs: bytes        # 256 glyphs of 16 rows, one byte per row, MSB = leftmost pixel
    source: str          # the file it came from, or "built-in boxes"

    def glyph(self, code: int) -> bytes:
        start = (code & 0xFF) * GLYPH_HEIGHT
        return self.glyphs[start:start + GLYPH_HEIGHT]


def _psf_glyphs(data: bytes) -> tuple[list[bytes], dict[int, int]]:
    """The glyphs of a PSF1/PSF2 font with 8-pixel-wide, 16-row cells, and its
    Unicode table as {code point: glyph index}."""
    unicode_map: dict[int, int] = {}
    if data[:2] == PSF1_MAGIC:
        mode, height = data[2], data[3]
        count = 512 if mode & PSF1_MODE512 else 256
        if height != GLYPH_HEIGHT:
            raise FontError(f"glyphs are {height} rows, not {GLYPH_HEIGHT}")
        end = 4 + count * height
        glyphs = [data[4 + i * height:4 + (i + 1) * height] for i in range(count)]
        if mode & PSF1_MODEHASTAB:
            index, pos, in_sequence = 0, end, False
            while index < count and pos + 2 <= len(data):
                value = int.from_bytes(data[pos:pos + 2], "little")
                pos += 2
                if value == 0xFFFF:
                    index, in_sequence = index + 1, False
                elif value == 0xFFFE:
                    in_sequence = True       # combining sequences: not single characters
                elif not in_sequence:
                    unicode_map.setdefault(value, index)
        return glyphs, unicode_map
    if data[:4] == PSF2_MAGIC:
        header = [int.from_bytes(data[o:o + 4], "little") for o in range(4, 32, 4)]
        _version, header_size, flags, count, charsize, height, width = header
        if height != GLYPH_HEIGHT or width != GLYPH_WIDTH or charsize != GLYPH_HEIGHT:
            raise FontError(f"glyphs are {width}x{height}, not {GLYPH_WIDTH}x{GLYPH_HEIGHT}")
        end = header_size + count * charsize
        glyphs = [data[header_size + i * charsize:header_size + (i + 1) * charsize] for i in range(count)]
        if flags & PSF2_HAS_UNICODE_TABLE:
            for index, entry in enumerate(data[end:].split(b"\xff")[:count]):
                single = entry.split(b"\xfe")[0]
                for ch in single.decode("utf-8", "replace"):
                    unicode_map.setdefault(ord(ch), index)
        return glyphs, unicode_map
    raise FontError("not a PSF font")


def font_from_psf(data: bytes, source: str) -> VgaFont:
    glyphs, unicode_map = _psf_glyphs(data)
    if len(glyphs) < 256 or any(len(g) != GLYPH_HEIGHT for g in glyphs[:256]):
        raise FontError("truncated font")
    cells = []
    for code in range(256):
        if not unicode_map:
            cells.append(glyphs[code])
            continue
        char = "\0" if code == 0 else bytes([code]).decode("cp437")
        index = unicode_map.get(ord(char), unicode_map.get(ord("?"), 0))
        cells.append(glyphs[index] if code else bytes(GLYPH_HEIGHT))
    return VgaFont(b"".join(cells), source)


def box_font() -> VgaFont:
    """A hollow box for every printable code, blank for NUL and space: readable as
    'there is text here' when no console font is installed."""
    box = bytes([0, 0, 0x7E] + [0x42] * 9 + [0x7E, 0, 0, 0])
    blank = bytes(GLYPH_HEIGHT)
    return VgaFont(b"".join(blank if code in (0, 0x20, 0xFF) else box for code in range(256)),
                   "built-in boxes")


def load_font(path: str | None = None) -> VgaFont:
    """The font from ``path``, $KVMPY_VGA_FONT, or the first of FONT_NAMES in FONT_DIRS."""
    candidates = [path] if path else []
    if os.environ.get(FONT_ENV):
        candidates.append(os.environ[FONT_ENV])
    candidates += [os.path.join(d, n) for n in FONT_NAMES for d in FONT_DIRS]
    for candidate in candidates:
        try:
            with open(candidate, "rb") as f:
                raw = f.read(1 << 20)
            data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
            return font_from_psf(data, candidate)
        except FileNotFoundError:
            continue
        except (OSError, FontError, EOFError, gzip.BadGzipFile) as e:
            log.warning("VGA font %s not usable: %s", candidate, e)
    log.warning("no 8x16 console font found (Debian: apt-get install console-setup-linux); "
                "VGA text renders as boxes")
    return box_font()


_default: VgaFont | None = None


def default_font() -> VgaFont:
    global _default
    if _default is None:
        _default = load_font()
    return _default
