"""The standard VGA: the model's registers, the pictures it renders, screendumps, and
the test guest (tests/guests/vga.c) drawing text and a VBE mode under KVM and the
translator, its screendumps compared pixel for pixel with pictures computed here."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import KVM_SKIP_REASON, ROOT, guest_path
from kvmpy.devices.vga import (VBE_BPP, VBE_ENABLE, VBE_XRES, VBE_YRES, VRAM_SIZE, Vga, VgaPorts, VgaState,
                               VgaWindow)
from kvmpy.devices.vgafont import box_font, default_font, font_from_psf, load_font
from kvmpy.display.render import Renderer, Surface
from kvmpy.display.screendump import png_bytes, ppm_bytes, read_ppm, write_screendump

FUZZ = int(os.environ.get("KVMPY_FUZZ", "0") or 0)
EXAMPLES = 200 * (10 if FUZZ else 1)

# The 16 text colours of a PC's mode 3 (CGA's), as 8-bit RGB: what the default
# attribute palette and DAC must show.
CGA = [(0, 0, 0), (0, 0, 0xAA), (0, 0xAA, 0), (0, 0xAA, 0xAA), (0xAA, 0, 0), (0xAA, 0, 0xAA), (0xAA, 0x55, 0),
       (0xAA, 0xAA, 0xAA), (0x55, 0x55, 0x55), (0x55, 0x55, 0xFF), (0x55, 0xFF, 0x55), (0x55, 0xFF, 0xFF),
       (0xFF, 0x55, 0x55), (0xFF, 0x55, 0xFF), (0xFF, 0xFF, 0x55), (0xFF, 0xFF, 0xFF)]


def ports(vga):
    p = VgaPorts(vga)
    return lambda port, value: p.write(port - 0x1CE, 1, value), lambda port: p.read(port - 0x1CE, 1)


def dispi(vga, index, value=None):
    p = VgaPorts(vga)
    p.write(0, 2, index)
    if value is not None:
        p.write(1, 2, value)
    return p.read(1, 2)


# --- expected pictures, computed from the rules, not from the renderer ------------------------
def expected_text(cells, cursor=None, cursor_lines=(14, 15), font=None, dots=9, blink=True) -> Surface:
    """80x25 text in ``dots``-wide cells (mode 3: 9, 720x400 as QEMU shows it):
    ``cells`` [(char, attribute)] from the start; blink on (attribute bit 7 picks
    blinking, not a bright background), blinking text shown steady; the 9th dot
    repeats the 8th for 0xB0-0xDF (line graphics, on in mode 3) and the cursor."""
    font = font or default_font()
    width = 80 * dots
    surface = Surface.blank(width, 400)
    for i, (char, attr) in enumerate(cells):
        fg, bg = CGA[attr & 0x0F], CGA[(attr >> 4) & (0x07 if blink else 0x0F)]
        col, row = i % 80, i // 80
        glyph = font.glyph(char)
        for line in range(16):
            is_cursor = cursor == i and cursor_lines[0] <= line <= cursor_lines[1]
            bits = 0xFF if is_cursor else glyph[line]
            for x in range(dots):
                if x < 8:
                    on = bits & (0x80 >> x)
                else:
                    on = (is_cursor or 0xB0 <= char <= 0xDF) and bits & 1
                r, g, b = fg if on else bg
                o = ((row * 16 + line) * width + col * dots + x) * 4
                surface.data[o:o + 4] = bytes((b, g, r, 0))
    return surface


def guest_text_cells():
    return [(0x20 + i % 95, (i * 13) & 0xFF) for i in range(80 * 25)]


def guest_vbe_pixel(x, y):
    return x & 0xFF, y & 0xFF, (x + y) & 0xFF


def expected_vbe() -> Surface:
    surface = Surface.blank(640, 480)
    for y in range(480):
        for x in range(640):
            r, g, b = guest_vbe_pixel(x, y)
            o = (y * 640 + x) * 4
            surface.data[o:o + 3] = bytes((b, g, r))
    return surface


def decode_png(data: bytes) -> Surface:
    """Our own reading of an 8-bit RGB PNG (filter 0 rows only, as kvmpy writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert (depth, colour) == (8, 2)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * 3 + 1
    out = bytearray(width * height * 4)
    for y in range(height):
        row = raw[y * stride:(y + 1) * stride]
        assert row[0] == 0
        out[(y * width) * 4:(y + 1) * width * 4:4] = row[3::3]
        out[(y * width) * 4 + 1:(y + 1) * width * 4:4] = row[2::3]
        out[(y * width) * 4 + 2:(y + 1) * width * 4:4] = row[1::3]
    return Surface(width, height, out)


def first_difference(got: Surface, want: Surface) -> str:
    if (got.width, got.height) != (want.width, want.height):
        return f"size {got.width}x{got.height}, expected {want.width}x{want.height}"
    for y in range(want.height):
        for x in range(want.width):
            if got.pixel(x, y) != want.pixel(x, y):
                return f"pixel ({x}, {y}) is {got.pixel(x, y)}, expected {want.pixel(x, y)}"
    return ""


# --- the model ------------------------------------------------------------------------------
def test_pci_identity_and_bars():
    vga = Vga()
    try:
        assert vga.config_read(0, 4) == 0x11111234
        assert vga.config_read(0x08, 4) >> 8 == 0x030000
        vga.config_write(0x10, 4, 0xFFFFFFFF)
        assert vga.config_read(0x10, 4) == (~(VRAM_SIZE - 1) & 0xFFFFFFFF) | 0x8   # prefetchable mem32
        vga.config_write(0x18, 4, 0xFFFFFFFF)
        assert vga.config_read(0x18, 4) == 0xFFFFF000
    finally:
        vga.close()


def test_text_mode_renders_font_colours_and_cursor():
    vga = Vga()
    try:
        window = VgaWindow(vga)
        cells = [(ord(c), a) for c, a in zip("Hello, VGA! \x01\xdb", (0x07, 0x1F, 0x4E, 0x70, 0x8A, 0x0C) * 3)]
        for i, (char, attr) in enumerate(cells):
            window.write(0x18000 + 2 * i, 2, char | attr << 8)
        write, _ = ports(vga)
        write(0x3D4, 0x0E); write(0x3D5, 0)
        write(0x3D4, 0x0F); write(0x3D5, 3)
        got = Renderer(vga).render()
        want = expected_text(cells + [(0, 0)] * (2000 - len(cells)), cursor=3, cursor_lines=(0x0D, 0x0E))
        assert first_difference(got, want) == ""
        # the cursor off (CR0A bit 5): the glyph again
        write(0x3D4, 0x0A); write(0x3D5, 0x20)
        want = expected_text(cells + [(0, 0)] * (2000 - len(cells)))
        assert first_difference(Renderer(vga).render(), want) == ""
        # 8-dot cells (sequencer clocking mode bit 0): 640 wide
        write(0x3C4, 0x01); write(0x3C5, 0x01)
        want = expected_text(cells + [(0, 0)] * (2000 - len(cells)), dots=8)
        assert first_difference(Renderer(vga).render(), want) == ""
    finally:
        vga.close()


def test_dac_and_attribute_registers():
    vga = Vga()
    try:
        write, read = ports(vga)
        write(0x3C8, 5)
        for v in (0x3F, 0x00, 0x15, 0x01, 0x02, 0x03):
            write(0x3C9, v)
        write(0x3C7, 5)
        assert [read(0x3C9) for _ in range(6)] == [0x3F, 0x00, 0x15, 0x01, 0x02, 0x03]
        assert read(0x3C8) == 7
        # reading 0x3DA resets the flip-flop: the next 0x3C0 write is an index
        write(0x3C0, 0x01)
        read(0x3DA)
        write(0x3C0, 0x02); write(0x3C0, 0x3F)
        assert vga.attr[2] == 0x3F and vga.attr[1] == 0x01
        # text colour 2 now shows DAC entry 0x3F: white
        VgaWindow(vga).write(0x18000, 2, 0xDB | 0x02 << 8)
        assert Renderer(vga).render().pixel(0, 4) == (0xFF, 0xFF, 0xFF)
    finally:
        vga.close()


def test_dispi_registers_as_bochs_documents():
    vga = Vga()
    try:
        assert dispi(vga, 0, 0xB0C0) == 0xB0C0
        assert dispi(vga, 0, 0x1234) == 0xB0C0          # unknown IDs ignored
        dispi(vga, 0, 0xB0C5)
        dispi(vga, VBE_ENABLE, 0x02)                     # GETCAPS: maxima
        assert dispi(vga, VBE_XRES) >= 1920 and dispi(vga, VBE_BPP) == 32
        dispi(vga, VBE_ENABLE, 0)
        assert dispi(vga, VBE_XRES, 641) == 640          # not a multiple of 8: refused
        assert dispi(vga, VBE_BPP, 12) == 32
        assert dispi(vga, 0x0A) == VRAM_SIZE >> 16
        dispi(vga, VBE_XRES, 800); dispi(vga, VBE_YRES, 600); dispi(vga, VBE_BPP, 16)
        vga.vram[:16] = b"\xff" * 16
        dispi(vga, VBE_ENABLE, 0x41)
        assert bytes(vga.vram[:16]) == bytes(16)          # enabling clears, without NOCLEARMEM
        assert dispi(vga, VBE_XRES, 1024) == 800          # fixed while enabled
        assert (Renderer(vga).render().width, Renderer(vga).render().height) == (800, 600)
        # banked access through the legacy window
        dispi(vga, 5, 2)
        VgaWindow(vga).write(0x10, 4, 0xDEADBEEF)
        assert bytes(vga.vram[0x20010:0x20014]) == b"\xef\xbe\xad\xde"
    finally:
        vga.close()


def test_mmio_bar_mirrors_ports_and_dispi():
    vga = Vga()
    try:
        vga.bar_write(2, 0x500, 2, 0xB0C4)
        assert vga.bar_read(2, 0x500, 2) == 0xB0C4
        vga.bar_write(2, 0x400 + 0x14, 2, 0x0E | 0x12 << 8)   # 0x3D4/0x3D5: CRTC 0x0E = 0x12
        assert vga.crtc[0x0E] == 0x12
        assert vga.bar_read(2, 0x400 + 0x0C, 1) == vga.misc     # 0x3CC
        assert vga.bar_read(2, 0xF00, 4) == 0xFFFFFFFF
        assert vga.bar_read(2, 0x600, 4) == 8 and vga.bar_read(2, 0x604, 4) == 0x1E1E1E1E
    finally:
        vga.close()


@pytest.mark.parametrize("bpp", [8, 15, 16, 24, 32])
def test_vbe_depths_render_each_pixel(bpp):
    vga = Vga()
    try:
        width, height = 64, 8
        dispi(vga, VBE_XRES, width); dispi(vga, VBE_YRES, height); dispi(vga, VBE_BPP, bpp)
        dispi(vga, VBE_ENABLE, 0x41)
        size = (bpp + 7) // 8
        want = []
        for i in range(width * height):
            raw = (i * 2654435761) & ((1 << (8 * size)) - 1)
            vga.vram[i * size:(i + 1) * size] = raw.to_bytes(size, "little")
            if bpp == 32 or bpp == 24:
                want.append(((raw >> 16) & 0xFF, (raw >> 8) & 0xFF, raw & 0xFF))
            elif bpp == 16:
                r, g, b = raw >> 11, (raw >> 5) & 0x3F, raw & 0x1F
                want.append(((r << 3) | (r >> 2), (g << 2) | (g >> 4), (b << 3) | (b >> 2)))
            elif bpp == 15:
                r, g, b = (raw >> 10) & 0x1F, (raw >> 5) & 0x1F, raw & 0x1F
                want.append(tuple((c << 3) | (c >> 2) for c in (r, g, b)))
            else:
                dac = vga.dac[raw * 3:raw * 3 + 3]
                want.append(tuple(((c & 0x3F) << 2) | ((c & 0x3F) >> 4) for c in dac))
        got = Renderer(vga).render()
        assert [got.pixel(i % width, i // width) for i in range(width * height)] == want
    finally:
        vga.close()


def test_mode_13h_renders_chained_256_colours():
    vga = Vga()
    try:
        write, _ = ports(vga)
        write(0x3CE, 0x06); write(0x3CF, 0x05)     # graphics, A0000 64K
        write(0x3C4, 0x04); write(0x3C5, 0x0E)     # chain-4
        write(0x3C8, 0x80)
        for v in (0x3F, 0x20, 0x01):
            write(0x3C9, v)
        window = VgaWindow(vga)
        window.write(0, 1, 0x80)
        window.write(320 * 199 + 319, 1, 0x80)
        surface = Renderer(vga).render()
        assert (surface.width, surface.height) == (320, 200)
        assert surface.pixel(0, 0) == surface.pixel(319, 199) == (0xFF, 0x82, 0x04)
        assert surface.pixel(1, 0) == (0, 0, 0)
        write(0x3C4, 0x04); write(0x3C5, 0x06)     # planar (mode 12h style): not modelled, blank
        assert not any(Renderer(vga).render().data)
    finally:
        vga.close()


def test_screendump_ppm_and_png_hold_the_same_picture(tmp_path):
    surface = Surface.blank(13, 7)
    for i in range(13 * 7):
        surface.data[i * 4:i * 4 + 3] = bytes((i, 255 - i, (i * 7) & 0xFF))
    write_screendump(surface, str(tmp_path / "a.ppm"), "ppm")
    write_screendump(surface, str(tmp_path / "a.png"), "png")
    assert read_ppm((tmp_path / "a.ppm").read_bytes()).data == surface.data
    assert decode_png((tmp_path / "a.png").read_bytes()).data == surface.data
    assert (tmp_path / "a.ppm").read_bytes() == ppm_bytes(surface)
    assert png_bytes(surface).startswith(b"\x89PNG")
    with pytest.raises(ValueError):
        write_screendump(surface, str(tmp_path / "a.gif"), "gif")


def test_png_reads_with_a_real_decoder(tmp_path):
    """Pillow, where installed (a test tool only), reads kvmpy's PNG as the same pixels."""
    Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed")
    surface = Surface.blank(5, 3)
    surface.data[0:3] = b"\x10\x20\x30"
    write_screendump(surface, str(tmp_path / "p.png"), "png")
    image = Image.open(tmp_path / "p.png").convert("RGB")
    assert image.size == (5, 3) and image.getpixel((0, 0)) == (0x30, 0x20, 0x10)


def test_font_from_a_psf2_file_and_the_fallback():
    glyphs = bytes(range(256)) * 16
    header = struct.pack("<IIIIIIII", 0x864AB572, 0, 32, 0, 256, 16, 16, 8)
    font = font_from_psf(header + glyphs, "test")
    assert font.glyph(1) == glyphs[16:32]
    assert box_font().glyph(ord("A")) != bytes(16) and box_font().glyph(0x20) == bytes(16)
    assert load_font("/nonexistent/font.psf").source in (default_font().source, "built-in boxes")


def test_state_round_trip():
    vga = Vga()
    other = Vga()
    try:
        write, _ = ports(vga)
        write(0x3D4, 0x0E); write(0x3D5, 0x07)
        dispi(vga, VBE_XRES, 320)
        VgaWindow(vga).write(0x18000, 2, 0x1F41)
        state = vga.state()
        assert isinstance(state, VgaState)
        other.restore(state)
        assert other.state() == state
        with pytest.raises(Exception):
            other.restore(VgaState(**{**state.__dict__, "crtc": b"\0"}))
    finally:
        vga.close()
        other.close()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["port", "dispi", "window", "mmio"]), st.integers(0, 0x3F),
                          st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF)), max_size=60))
def test_hostile_register_sequences_never_raise_and_render_in_bounds(ops):
    vga = Vga()
    try:
        p, window = VgaPorts(vga), VgaWindow(vga)
        for kind, where, size, value in ops:
            if kind == "port":
                p.write(0x3B0 - 0x1CE + where % 0x30, size, value)
                p.read(0x3B0 - 0x1CE + (where * 7) % 0x30, size)
            elif kind == "dispi":
                p.write(0, 2, where % 12)
                p.write(1, 2, value & 0xFFFF)
            elif kind == "window":
                window.write((value >> 8) % 0x20000, size, value)
                window.read(0x1FFFF, size)
            else:
                vga.bar_write(2, 0x400 + where * 9, size, value)
                vga.bar_read(2, 0x4F0 + where, size)
        surface = Renderer(vga, box_font()).render()
        assert len(surface.data) == surface.width * surface.height * 4
        assert 0 < surface.width <= 2560 and 0 < surface.height <= 1600
    finally:
        vga.close()


# --- the guest ------------------------------------------------------------------------------
class GuestVm:
    """``kvmpy run`` of tests/guests/vga.c with a QMP socket (the test's own client:
    line JSON is all this needs)."""

    def __init__(self, tmp_path, accel: str, phase: str, *extra: str):
        self.qmp_path = str(tmp_path / "qmp.sock")
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvmpy", "run", "--accel", accel, "--kernel", guest_path("vga"),
             "--append", f"phase={phase}", "--vga", "std", "--qmp", f"unix:{self.qmp_path}", *extra],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.output = b""

    def wait_for(self, needle: bytes, timeout: float = 120) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.output:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {needle!r} from the guest: {self.output!r} "
                                     f"{self.proc.stderr.read().decode() if self.proc.poll() is not None else ''}")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                time.sleep(0.05)
            self.output += chunk
        return self.output

    def qmp(self, *commands: dict) -> list:
        deadline = time.monotonic() + 30
        while not os.path.exists(self.qmp_path):
            assert time.monotonic() < deadline, "no QMP socket"
            time.sleep(0.05)
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(self.qmp_path)
        f = sock.makefile("rw")
        f.readline()
        replies = []
        for command in ({"execute": "qmp_capabilities"}, *commands):
            f.write(json.dumps(command) + "\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "event" not in reply:
                    break
            replies.append(reply)
        sock.close()
        return replies[1:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


ACCELS = [pytest.param("kvm", marks=pytest.mark.skipif(KVM_SKIP_REASON is not None, reason=str(KVM_SKIP_REASON))),
          "tcg"]


@pytest.mark.parametrize("accel", ACCELS)
def test_guest_text_mode_screendump(tmp_path, accel):
    vm = GuestVm(tmp_path, accel, "text", "--sandbox", "off")
    try:
        vm.wait_for(b"vga: text ready")
        ppm, png = tmp_path / "text.ppm", tmp_path / "text.png"
        replies = vm.qmp({"execute": "screendump", "arguments": {"filename": str(ppm)}},
                         {"execute": "screendump", "arguments": {"filename": str(png), "format": "png"}},
                         {"execute": "human-monitor-command",
                          "arguments": {"command-line": f"screendump {tmp_path / 'hmp.ppm'}"}})
        assert replies[:2] == [{"return": {}}, {"return": {}}], replies
        want = expected_text(guest_text_cells(), cursor=5 * 80 + 10)
        assert first_difference(read_ppm(ppm.read_bytes()), want) == ""
        assert first_difference(decode_png(png.read_bytes()), want) == ""
        assert (tmp_path / "hmp.ppm").read_bytes() == ppm.read_bytes()
    finally:
        vm.close()


@pytest.mark.parametrize("accel", ACCELS)
def test_guest_vbe_mode_screendump(tmp_path, accel):
    vm = GuestVm(tmp_path, accel, "vbe", "--sandbox", "off")
    try:
        out = vm.wait_for(b"vga: vbe ready")
        assert b"id b0c5 mmio-id b0c5" in out
        ppm = tmp_path / "vbe.ppm"
        assert vm.qmp({"execute": "screendump", "arguments": {"filename": str(ppm)}}) == [{"return": {}}]
        assert first_difference(read_ppm(ppm.read_bytes()), expected_vbe()) == ""
        bad = vm.qmp({"execute": "screendump", "arguments": {"filename": str(tmp_path / "x"), "format": "gif"}},
                     {"execute": "screendump", "arguments": {"filename": "/nonexistent/dir/x.ppm"}})
        assert all("error" in r for r in bad), bad
    finally:
        vm.close()


def test_screendump_without_a_display_says_so(tmp_path):
    vm = GuestVm(tmp_path, "tcg", "kbd", "--vga", "none", "--sandbox", "off")
    try:
        vm.wait_for(b"kbd: listening")
        reply = vm.qmp({"execute": "screendump", "arguments": {"filename": str(tmp_path / "x.ppm")}})[0]
        assert reply["error"]["desc"] == "There is no QemuConsole I can screendump from."
    finally:
        vm.close()


# --- device memory: the framebuffer as guest memory with a dirty log ---------------------------
# mov ax,0x2000; mov ds,ax; mov byte [0x1000],0x5a; out 0xf4,al (real mode: writes 0x21000)
WRITE_0x21000 = bytes([0xB8, 0x00, 0x20, 0x8E, 0xD8, 0xC6, 0x06, 0x00, 0x10, 0x5A, 0xE6, 0xF4])


def _real_mode_start(vcpu, memory, code):
    memory.write(0x1000, code)
    s = vcpu.get_sregs()
    s.cs.base, s.cs.selector = 0, 0
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    r.rip, r.rflags = 0x1000, 2
    vcpu.set_regs(r)


@pytest.mark.skipif(KVM_SKIP_REASON is not None, reason=str(KVM_SKIP_REASON))
def test_kvm_device_memory_is_mapped_and_its_dirty_log_names_the_written_page():
    import mmap
    from kvmpy.hv import exits
    from kvmpy.hv.kvm._kvm_cffi import ffi
    from kvmpy.hv.kvm.api import Kvm
    from kvmpy.hv.kvm.platform import KvmPlatform
    from kvmpy.memory import GuestMemory
    kvm = Kvm()
    vm = kvm.create_vm()
    memory = GuestMemory.anonymous([(0, 0x10000)])
    backing = mmap.mmap(-1, 0x4000)
    view = memoryview(backing)
    try:
        vm.set_tss_addr(0xFFFBD000)
        vm.create_irqchip()
        vm.set_user_memory_region(0, 0, 0x10000, int(ffi.cast("uintptr_t", ffi.from_buffer(memory.regions[0].view))))
        platform = KvmPlatform(vm, memory)
        vcpu = vm.create_vcpu(0)
        platform.map_device_memory("fb", 0x20000, view)
        _real_mode_start(vcpu, memory, WRITE_0x21000)
        assert vcpu.run() == exits.EXIT_IO and vcpu.io_port == 0xF4
        assert view[0x1000] == 0x5A                      # the write went to the device's memory
        assert platform.dirty_device_pages("fb")[0] == 0b0010   # page 1 of 4, and only it
        assert not any(platform.dirty_device_pages("fb"))       # read and cleared
        platform.unmap_device_memory("fb")
        assert platform.dirty_device_pages("fb") is None
        _real_mode_start(vcpu, memory, WRITE_0x21000)
        assert vcpu.run() == exits.EXIT_MMIO and vcpu.mmio_addr == 0x21000   # an exit again
        platform.close()
    finally:
        vm.close()
        view.release()
        backing.close()
        memory.close()
        kvm.close()


def test_translator_maps_device_memory_at_its_next_run():
    pytest.importorskip("kvmpy._tcg", reason="the translator is not built")
    import mmap
    from kvmpy.devices.platform import SoftPlatform
    from kvmpy.hv import exits
    from kvmpy.hv.tcg.vcpu import TcgVcpu
    from kvmpy.memory import GuestMemory
    memory = GuestMemory.anonymous([(0, 0x10000)])
    backing = mmap.mmap(-1, 0x4000)
    view = memoryview(backing)
    vcpu = TcgVcpu(memory)
    try:
        platform = SoftPlatform(memory)
        platform.map_device_memory("fb", 0x20000, view)
        assert platform.dirty_device_pages("fb") is None        # the caller compares contents
        _real_mode_start(vcpu, memory, WRITE_0x21000)
        assert vcpu.run() == exits.EXIT_IO
        assert view[0x1000] == 0x5A
        platform.unmap_device_memory("fb")
        _real_mode_start(vcpu, memory, WRITE_0x21000)
        assert vcpu.run() == exits.EXIT_MMIO and vcpu.mmio_addr == 0x21000
        with pytest.raises(ValueError):
            platform.map_device_memory("fb", 0x8000, view)       # over RAM
    finally:
        vcpu.close()
        view.release()
        backing.close()
        memory.close()


# --- QEMU as the oracle: the same guest on QEMU's -vga std --------------------------------------
def qemu_screendump(tmp_path, phase: str, ready: bytes) -> Surface:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed (Debian package qemu-system-x86)")
    qmp = str(tmp_path / "qemu.qmp")
    proc = subprocess.Popen([qemu, "-accel", "tcg", "-machine", "pc", "-m", "128", "-nodefaults", "-display", "none",
                             "-vga", "std", "-serial", "stdio", "-no-reboot", "-qmp", f"unix:{qmp},server=on,wait=off",
                             "-kernel", guest_path("vga"), "-append", f"phase={phase}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = b""
        deadline = time.monotonic() + 120
        while ready not in out:
            assert time.monotonic() < deadline and proc.poll() is None, out + proc.stderr.read()
            out += os.read(proc.stdout.fileno(), 4096)
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(qmp)
        f = sock.makefile("rw")
        f.readline()
        dump = tmp_path / "qemu.ppm"
        for command in ({"execute": "qmp_capabilities"},
                        {"execute": "screendump", "arguments": {"filename": str(dump)}}):
            f.write(json.dumps(command) + "\n")
            f.flush()
            while "event" in (reply := json.loads(f.readline())):
                pass
            assert "return" in reply, reply
        sock.close()
        return read_ppm(dump.read_bytes())
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_qemu_draws_the_vbe_guest_as_we_expect(tmp_path):
    """QEMU's stdvga shows the guest's VBE mode exactly as expected_vbe says (and
    test_guest_vbe_mode_screendump holds kvmpy to the same picture)."""
    assert first_difference(qemu_screendump(tmp_path, "vbe", b"vga: vbe ready"), expected_vbe()) == ""


def test_qemu_shows_the_text_guest_in_the_same_cells_and_colours(tmp_path):
    """QEMU's font is not ours, so cell by cell: the same 720x400 geometry, the same
    two colours (foreground where the glyph has dots, background) in every cell.
    QEMU widens the DAC's 6 bits as (v << 2) | (v & 1) * 3 (0x15 -> 0x57), kvmpy as
    v * 255 / 63 (0x15 -> 0x55, CGA's values): equal up to 3 per channel. And QEMU
    reads attribute bit 7 as a bright background even with blinking enabled (the
    attribute controller's mode bit 3, on in mode 3), where kvmpy, as a VGA,
    takes it for blinking: compared with that reading here."""
    theirs = qemu_screendump(tmp_path, "text", b"vga: text ready")
    ours = expected_text(guest_text_cells(), cursor=5 * 80 + 10, blink=False)
    assert (theirs.width, theirs.height) == (ours.width, ours.height) == (720, 400)

    def widened(rgb):
        return tuple(((c >> 2) << 2) | ((c >> 2) & 1) * 3 for c in rgb)
    for cell in range(80 * 25):
        x0, y0 = (cell % 80) * 9, (cell // 80) * 16
        colours = [{theirs.pixel(x0 + x, y0 + y) for x in range(9) for y in range(16)},
                   {widened(ours.pixel(x0 + x, y0 + y)) for x in range(9) for y in range(16)}]
        assert colours[0] == colours[1], f"cell {cell}: QEMU {colours[0]}, expected {colours[1]}"
