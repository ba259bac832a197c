"""Reading text back off a screen picture: each 8x16 cell matched against the glyphs
of the font the VGA renders with (exact matches only: this reads kvmpy's own text
mode, not arbitrary pictures)."""

from __future__ import annotations

from kvmpy.devices.vgafont import VgaFont, default_font


def screen_lines(pixels: bytes, width: int, height: int, font: VgaFont | None = None) -> list[str]:
    """The text rows of a 32-bit (B, G, R, 0) picture of an 80-column text-mode
    screen (8- or 9-dot cells: the 9th is not looked at); a cell whose glyph is not
    printable ASCII reads as '?'."""
    cell_width = width // 80
    font = font or default_font()
    glyphs: dict[bytes, str] = {}
    for code in range(0x7E, 0x1F, -1):          # lower codes win when two glyphs look alike
        glyphs[font.glyph(code)] = chr(code)
    glyphs[bytes(16)] = " "
    lines = []
    for row in range(height // 16):
        text = []
        for col in range(80):
            cell = []
            for line in range(16):
                o = ((row * 16 + line) * width + col * cell_width) * 4
                cell.append([pixels[o + 4 * x:o + 4 * x + 3] for x in range(8)])
            colours: dict[bytes, int] = {}
            for line in cell:
                for px in line:
                    colours[bytes(px)] = colours.get(bytes(px), 0) + 1
            background = max(colours, key=colours.get)
            bitmap = bytes(sum(0x80 >> x for x, px in enumerate(line) if bytes(px) != background) for line in cell)
            text.append(glyphs.get(bitmap, "?"))
        lines.append("".join(text).rstrip())
    return lines
