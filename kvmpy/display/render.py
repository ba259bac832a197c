"""The VGA's picture as a surface: 32-bit pixels, bytes B, G, R, 0 (0x00RRGGBB little-endian).

That layout is RFB's most common true-colour format and a cheap step from PPM/PNG's
RGB. Text mode is drawn from the legacy window with the console font (cursor
included, blinking shown as steady: a screendump is deterministic); VBE modes from
the framebuffer at 8 (DAC palette), 15, 16, 24 and 32 bits per pixel; mode 13h
(320x200, 256 colours, chain-4) from the legacy window. Every value read from the
device is bounded here: a guest cannot make the renderer read past video memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..devices.vga import (VBE_BPP, VBE_XRES, VBE_YRES, VRAM_SIZE, Vga)
from ..devices.vgafont import GLYPH_WIDTH, VgaFont, default_font

BLANK_SIZE = (640, 480)


@dataclass
class Surface:
    width: int
    height: int
    data: bytearray = field(repr=False)    # width * height * 4 bytes: B, G, R, 0

    @classmethod
    def blank(cls, width: int, height: int) -> "Surface":
        return cls(width, height, bytearray(width * height * 4))

    def rgb(self) -> bytes:
        """Packed 24-bit R, G, B (PPM's and PNG's order)."""
        out = bytearray(self.width * self.height * 3)
        out[0::3] = self.data[2::4]
        out[1::3] = self.data[1::4]
        out[2::3] = self.data[0::4]
        return bytes(out)

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        o = (y * self.width + x) * 4
        return self.data[o + 2], self.data[o + 1], self.data[o]


def _palette_tables(rgb: bytes, mask: int = 0xFF) -> tuple[bytes, bytes, bytes]:
    """Translation tables index -> B, G, R."""
    idx = [i & mask for i in range(256)]
    return (bytes(rgb[3 * i + 2] for i in idx), bytes(rgb[3 * i + 1] for i in idx), bytes(rgb[3 * i] for i in idx))


def _indexed(pixels: bytes, rgb: bytes, mask: int = 0xFF) -> bytearray:
    blue, green, red = _palette_tables(rgb, mask)
    out = bytearray(len(pixels) * 4)
    out[0::4] = pixels.translate(blue)
    out[1::4] = pixels.translate(green)
    out[2::4] = pixels.translate(red)
    return out


_EXPAND5 = bytes((v << 3) | (v >> 2) for v in range(32))
_EXPAND6 = bytes((v << 2) | (v >> 4) for v in range(64))


def _hicolor(pixels: bytes, bits: int) -> bytearray:
    """15- or 16-bit pixels: the low byte's and the high byte's share of each channel,
    combined by tables (no per-pixel Python)."""
    low, high = pixels[0::2], pixels[1::2]
    out = bytearray(len(low) * 4)
    blue = bytes(v & 0x1F for v in range(256))
    out[0::4] = low.translate(blue).translate(_EXPAND5 + bytes(224))
    if bits == 16:
        red = bytes(v >> 3 for v in range(256))
        out[2::4] = high.translate(red).translate(_EXPAND5 + bytes(224))
        g_low = low.translate(bytes(v >> 5 for v in range(256)))
        g_high = high.translate(bytes((v & 7) << 3 for v in range(256)))
        green_bits = bytes(a | b for a, b in zip(g_low, g_high))
        out[1::4] = green_bits.translate(_EXPAND6 + bytes(192))
    else:
        red = bytes((v >> 2) & 0x1F for v in range(256))
        out[2::4] = high.translate(red).translate(_EXPAND5 + bytes(224))
        g_low = low.translate(bytes(v >> 5 for v in range(256)))
        g_high = high.translate(bytes((v & 3) << 3 for v in range(256)))
        green_bits = bytes(a | b for a, b in zip(g_low, g_high))
        out[1::4] = green_bits.translate(_EXPAND5 + bytes(224))
    return out


def render_vbe(vga: Vga) -> Surface:
    width, height, bpp = vga.vbe[VBE_XRES], vga.vbe[VBE_YRES], vga.vbe[VBE_BPP]
    bytes_pp = (bpp + 7) // 8
    line = vga.vbe_line_offset()
    start = vga.vbe_start()
    row_bytes = width * bytes_pp
    if width == 0 or height == 0 or start + line * (height - 1) + row_bytes > VRAM_SIZE:
        return Surface.blank(*BLANK_SIZE)
    vram = vga.vram
    if line == row_bytes:
        pixels = bytes(vram[start:start + row_bytes * height])
    else:
        pixels = b"".join(vram[start + y * line:start + y * line + row_bytes] for y in range(height))
    if bytes_pp == 4:
        data = bytearray(pixels)
        data[3::4] = bytes(width * height)
    elif bytes_pp == 3:
        data = bytearray(width * height * 4)
        data[0::4], data[1::4], data[2::4] = pixels[0::3], pixels[1::3], pixels[2::3]
    elif bytes_pp == 2:
        data = _hicolor(pixels, 16 if bpp == 16 else 15)
    else:
        data = _indexed(pixels, vga.dac_rgb(), vga.pel_mask)
    return Surface(width, height, data)


def render_mode13(vga: Vga) -> Surface:
    return Surface(320, 200, _indexed(bytes(vga.legacy[:320 * 200]), vga.dac_rgb(), vga.pel_mask))


class TextRenderer:
    """Text mode, with a cache of rendered glyph rows (few distinct ones on a screen)."""

    def __init__(self, font: VgaFont | None = None) -> None:
        self.font = font or default_font()
        self._rows: dict[tuple[int, bytes, bytes], bytes] = {}

    def _row(self, bits: int, fg: bytes, bg: bytes, ninth: bool | None) -> bytes:
        """One scan line of a cell: 8 dots, and a 9th (``ninth`` not None) that repeats
        the 8th for line-graphics characters (``ninth`` True) or shows the background."""
        key = (bits, fg, bg, ninth)
        row = self._rows.get(key)
        if row is None:
            if len(self._rows) > 65536:
                self._rows.clear()
            row = b"".join(fg if bits & (0x80 >> i) else bg for i in range(GLYPH_WIDTH))
            if ninth is not None:
                row += fg if ninth and bits & 1 else bg
            self._rows[key] = row
        return row

    def render(self, vga: Vga) -> Surface:
        columns, rows, char_height = vga.text_geometry()
        char_height = min(char_height, 16)
        # 9-dot cells unless the sequencer's clocking mode asks for 8 (mode 3 has 9:
        # 720x400, as QEMU shows it); the 9th dot repeats the 8th for 0xB0-0xDF when
        # the attribute controller enables line graphics (QEMU's range).
        cell_width = GLYPH_WIDTH if vga.seq[1] & 0x01 else GLYPH_WIDTH + 1
        line_graphics = bool(vga.attr[0x10] & 0x04)
        width, height = columns * cell_width, rows * char_height
        data = bytearray(width * height * 4)
        rgb = vga.dac_rgb()
        palette = vga.attr
        blink = bool(palette[0x10] & 0x08)
        colours = []
        for index in range(16):
            dac = palette[index] & 0x3F
            colours.append(bytes((rgb[3 * dac + 2], rgb[3 * dac + 1], rgb[3 * dac], 0)))
        start = vga.text_start()
        legacy = vga.legacy
        stride = width * 4
        cursor = vga.cursor()
        glyphs = self.font.glyphs
        for cell in range(columns * rows):
            offset = start + 2 * cell
            if offset + 1 >= len(legacy):
                break
            code, attribute = legacy[offset], legacy[offset + 1]
            fg = colours[attribute & 0x0F]
            bg = colours[(attribute >> 4) & (0x07 if blink else 0x0F)]
            x, y = cell % columns, cell // columns
            base = y * char_height * stride + x * cell_width * 4
            glyph = glyphs[code * 16:code * 16 + 16]
            ninth = None if cell_width == GLYPH_WIDTH else (line_graphics and 0xB0 <= code <= 0xDF)
            for line in range(char_height):
                bits = glyph[line]
                cursor_line = cursor is not None and cursor[0] == cell and cursor[1] <= line <= cursor[2]
                if cursor_line:
                    bits = 0xFF
                o = base + line * stride
                data[o:o + cell_width * 4] = self._row(bits, fg, bg, True if cursor_line and ninth is not None
                                                       else ninth)
        return Surface(width, height, data)


class Renderer:
    """The VGA's current picture, whatever its mode."""

    def __init__(self, vga: Vga, font: VgaFont | None = None) -> None:
        self.vga = vga
        self.text = TextRenderer(font)

    def render(self) -> Surface:
        vga = self.vga
        if vga.vbe_enabled:
            return render_vbe(vga)
        if vga.graphics_mode:
            if vga.chain4:
                return render_mode13(vga)
            return Surface.blank(*BLANK_SIZE)    # planar 16-colour modes are not modelled
        return self.text.render(vga)
