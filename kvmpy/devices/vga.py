"""A standard VGA with the Bochs VBE extensions, as QEMU's ``-vga std`` (PCI 1234:1111).

Three faces of one device:
  * PCI function: BAR0 the linear framebuffer (16 MiB, prefetchable, guest memory
    mapped through the Platform's device memory, so drawing causes no exits),
    BAR2 4 KiB of MMIO with QEMU's layout (VGA ports 0x3C0-0x3DF at 0x400, the
    VBE dispi registers at 0x500 as 16-bit registers, index * 2);
  * legacy ports 0x3B0-0x3DF (misc output, sequencer, CRTC, graphics and
    attribute controllers, DAC, input status) and the dispi index/data ports
    0x1CE/0x1CF;
  * the legacy window 0xA0000-0xBFFFF: text mode's characters and attributes,
    mode 13h's pixels, or a 64 KiB bank of the framebuffer in banked VBE modes.

Legacy memory is modelled as linear (chained) bytes, not as four planes: text mode
and mode 13h render; the planar 16-colour modes (12h) do not (they show black).
The CRTC, mono/colour port aliases: both 0x3B4/0x3B5 and 0x3D4/0x3D5 reach the CRTC
whatever the misc output register says, as a guest without a BIOS expects.
Rendering lives in kvmpy.display; this module only holds the state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .bus import MmioSlot, PortSlot
from .pci.device import BAR_MEM32, PciConfigState, PciDevice
from .saved_state import StateCheck, checked

log = logging.getLogger(__name__)

VGA_VENDOR_ID = 0x1234
VGA_DEVICE_ID = 0x1111
VGA_CLASS = 0x030000
VRAM_SIZE = 16 << 20
MMIO_BAR_SIZE = 0x1000
FRAMEBUFFER_BAR = 0
MMIO_BAR = 2
MMIO_VGA_PORTS = 0x400      # ports 0x3C0.. at this offset of BAR2
MMIO_DISPI = 0x500          # dispi register i at 0x500 + 2 * i
MMIO_QEXT = 0x600           # QEMU's extended registers: their size, then the framebuffer byte order
QEXT_SIZE = 8
QEXT_LITTLE_ENDIAN = 0x1E1E1E1E
FRAMEBUFFER_REGION = "vga-framebuffer"

VBE_PORTS = PortSlot(base=0x1CE, length=2)
VGA_PORTS = PortSlot(base=0x3B0, length=0x30)
VGA_WINDOW = MmioSlot(base=0xA0000, length=0x20000)

# Bochs VBE dispi registers
VBE_INDEX_ID, VBE_XRES, VBE_YRES, VBE_BPP, VBE_ENABLE, VBE_BANK = range(6)
VBE_VIRT_WIDTH, VBE_VIRT_HEIGHT, VBE_X_OFFSET, VBE_Y_OFFSET, VBE_VIDEO_MEMORY_64K = range(6, 11)
VBE_REGISTERS = 11
VBE_ID0, VBE_ID5 = 0xB0C0, 0xB0C5
VBE_ENABLED = 0x01
VBE_GETCAPS = 0x02
VBE_8BIT_DAC = 0x20
VBE_LFB_ENABLED = 0x40
VBE_NOCLEARMEM = 0x80
VBE_MAX_XRES = 2560
VBE_MAX_YRES = 1600
VBE_BPPS = (8, 15, 16, 24, 32)
BANK_SIZE = 0x10000

# Register values of BIOS mode 3 (80x25 text): a guest without a BIOS finds the
# screen as a PC's BIOS leaves it.
MODE3_CRTC = bytes([0x5F, 0x4F, 0x50, 0x82, 0x55, 0x81, 0xBF, 0x1F, 0x00, 0x4F, 0x0D, 0x0E, 0x00, 0x00,
                    0x00, 0x00, 0x9C, 0x8E, 0x8F, 0x28, 0x1F, 0x96, 0xB9, 0xA3, 0xFF])
MODE3_SEQ = bytes([0x03, 0x00, 0x03, 0x00, 0x02])
MODE3_GC = bytes([0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x0E, 0x00, 0xFF])
MODE3_ATTR = bytes([0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x14, 0x07, 0x38, 0x39, 0x3A, 0x3B, 0x3C, 0x3D,
                    0x3E, 0x3F, 0x0C, 0x00, 0x0F, 0x08, 0x00])
MODE3_MISC = 0x67


def ega_dac() -> bytes:
    """The DAC as mode 3 sets it: entries 0-63 the EGA colours (6-bit RGB), the rest black."""
    out = bytearray(256 * 3)
    for i in range(64):
        out[3 * i] = 0x2A * ((i >> 2) & 1) + 0x15 * ((i >> 5) & 1)
        out[3 * i + 1] = 0x2A * ((i >> 1) & 1) + 0x15 * ((i >> 4) & 1)
        out[3 * i + 2] = 0x2A * (i & 1) + 0x15 * ((i >> 3) & 1)
    return bytes(out)


@dataclass(frozen=True)
class VgaState:
    """The VGA's registers and legacy memory (kvmpy/devices/saved_state.py); the
    framebuffer's 16 MiB are guest memory and travel with it, not here."""

    pci: PciConfigState
    misc: int
    seq_index: int
    seq: bytes
    crtc_index: int
    crtc: bytes
    gc_index: int
    gc: bytes
    attr_index: int
    attr_flipflop: bool
    attr: bytes
    dac_read_index: int
    dac_write_index: int
    dac_sub: int
    dac_reading: bool
    pel_mask: int
    dac: bytes
    vbe_index: int
    vbe: tuple[int, ...]
    legacy: bytes

    def validate(self) -> None:
        check = StateCheck(self)
        check.data("seq", self.seq, length=len(MODE3_SEQ))
        check.data("crtc", self.crtc, length=len(MODE3_CRTC))
        check.data("gc", self.gc, length=len(MODE3_GC))
        check.data("attr", self.attr, length=len(MODE3_ATTR))
        check.data("dac", self.dac, length=768)
        check.data("legacy", self.legacy, length=VGA_WINDOW.length)
        check.integers("vbe", self.vbe, VBE_REGISTERS, 0, 0xFFFF)
        for name in ("misc", "seq_index", "crtc_index", "gc_index", "attr_index", "dac_read_index",
                     "dac_write_index", "pel_mask", "vbe_index"):
            check.integers(name, (getattr(self, name),), 1, 0, 0xFFFF)
        check.integers("dac_sub", (self.dac_sub,), 1, 0, 2)


class Vga(PciDevice):
    """The device; ``platform`` maps the framebuffer (None: BAR0 is served by exits,
    as in unit tests)."""

    def __init__(self, platform=None, name: str = "vga") -> None:
        super().__init__(VGA_VENDOR_ID, VGA_DEVICE_ID, VGA_CLASS, revision=2,
                         subsystem_vendor_id=0x1AF4, subsystem_id=0x1100, interrupt_pin=0, name=name)
        self.add_bar(FRAMEBUFFER_BAR, VRAM_SIZE, BAR_MEM32, prefetchable=True)
        self.add_bar(MMIO_BAR, MMIO_BAR_SIZE, BAR_MEM32)
        import mmap
        # Shared anonymous memory, as guest RAM is: the guest writes it through a
        # memory slot, the display reads it.
        self._vram_map = mmap.mmap(-1, VRAM_SIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self.vram = memoryview(self._vram_map)
        self.platform = platform
        self.framebuffer_gpa: int | None = None
        self.generation = 0     # bumped by every register write that changes the picture
        self._power_on()

    def _power_on(self) -> None:
        self.misc = MODE3_MISC
        self.seq_index = 0
        self.seq = bytearray(MODE3_SEQ)
        self.crtc_index = 0
        self.crtc = bytearray(MODE3_CRTC)
        self.gc_index = 0
        self.gc = bytearray(MODE3_GC)
        self.attr_index = 0
        self.attr_flipflop = False
        self.attr = bytearray(MODE3_ATTR)
        self.dac_read_index = 0
        self.dac_write_index = 0
        self.dac_sub = 0
        self.dac_reading = False
        self.pel_mask = 0xFF
        self.dac = bytearray(ega_dac())
        self.vbe_index = 0
        self.vbe = [VBE_ID5, 640, 480, 32, 0, 0, 640, 480, 0, 0, VRAM_SIZE >> 16]
        self.legacy = bytearray(VGA_WINDOW.length)
        self._retrace = 0
        self.generation += 1

    def reset(self) -> None:
        # The framebuffer keeps its contents, as video RAM does across a reset.
        self._power_on()

    def close(self) -> None:
        if self.platform is not None and self.framebuffer_gpa is not None:
            self.platform.unmap_device_memory(FRAMEBUFFER_REGION)
            self.framebuffer_gpa = None
        try:
            self.vram.release()
            self._vram_map.close()
        except BufferError:
            # A translator vCPU still holds the framebuffer as RAM until the
            # accelerator closes (after the devices); the mapping goes with it.
            pass

    # --- the mode, as the renderer reads it ---------------------------------------------
    @property
    def vbe_enabled(self) -> bool:
        return bool(self.vbe[VBE_ENABLE] & VBE_ENABLED)

    def vbe_bytes_per_pixel(self) -> int:
        return (self.vbe[VBE_BPP] + 7) // 8

    def vbe_line_offset(self) -> int:
        return self.vbe[VBE_VIRT_WIDTH] * self.vbe_bytes_per_pixel()

    def vbe_start(self) -> int:
        return self.vbe[VBE_Y_OFFSET] * self.vbe_line_offset() + self.vbe[VBE_X_OFFSET] * self.vbe_bytes_per_pixel()

    @property
    def graphics_mode(self) -> bool:
        """The graphics controller's alphanumeric-disable bit (GR6 bit 0)."""
        return bool(self.gc[6] & 1)

    @property
    def chain4(self) -> bool:
        return bool(self.seq[4] & 0x08)

    def text_geometry(self) -> tuple[int, int, int]:
        """(columns, rows, character height) from the CRTC."""
        columns = self.crtc[1] + 1
        vde = self.crtc[0x12] | ((self.crtc[7] & 0x02) << 7) | ((self.crtc[7] & 0x40) << 3)
        char_height = (self.crtc[9] & 0x1F) + 1
        rows = (vde + 1) // char_height
        return max(1, min(columns, 132)), max(1, min(rows, 60)), char_height

    def text_start(self) -> int:
        """Offset of the first character in the legacy window (CRTC start address, in cells)."""
        return 0x18000 + 2 * ((self.crtc[0x0C] << 8) | self.crtc[0x0D])

    def cursor(self) -> tuple[int, int, int] | None:
        """(cell index from the start address, first scan line, last scan line), or None when off."""
        if self.crtc[0x0A] & 0x20:
            return None
        location = (self.crtc[0x0E] << 8) | self.crtc[0x0F]
        start = (self.crtc[0x0C] << 8) | self.crtc[0x0D]
        return location - start, self.crtc[0x0A] & 0x1F, self.crtc[0x0B] & 0x1F

    def dac_rgb(self) -> bytes:
        """The DAC as 8-bit RGB triples."""
        if self.vbe[VBE_ENABLE] & VBE_8BIT_DAC:
            return bytes(self.dac)
        return bytes(((v & 0x3F) << 2) | ((v & 0x3F) >> 4) for v in self.dac)

    # --- legacy ports (offset from 0x3B0) ----------------------------------------------
    def port_read(self, port: int) -> int:
        if port in (0x3B4, 0x3D4):
            return self.crtc_index
        if port in (0x3B5, 0x3D5):
            return self.crtc[self.crtc_index] if self.crtc_index < len(self.crtc) else 0xFF
        if port in (0x3BA, 0x3DA):
            self.attr_flipflop = False
            # Display enable and vertical retrace toggle, so polling loops end.
            self._retrace ^= 0x09
            return self._retrace
        if port == 0x3C0:
            return self.attr_index
        if port == 0x3C1:
            return self.attr[self.attr_index & 0x1F] if (self.attr_index & 0x1F) < len(self.attr) else 0
        if port == 0x3C2:
            return 0x10     # input status 0: switch sense
        if port == 0x3C4:
            return self.seq_index
        if port == 0x3C5:
            return self.seq[self.seq_index] if self.seq_index < len(self.seq) else 0xFF
        if port == 0x3C6:
            return self.pel_mask
        if port == 0x3C7:
            return 0x03 if self.dac_reading else 0x00
        if port == 0x3C8:
            return self.dac_write_index
        if port == 0x3C9:
            value = self.dac[self.dac_read_index * 3 + self.dac_sub]
            self.dac_sub += 1
            if self.dac_sub == 3:
                self.dac_sub = 0
                self.dac_read_index = (self.dac_read_index + 1) & 0xFF
            return value
        if port == 0x3CC:
            return self.misc
        if port == 0x3CE:
            return self.gc_index
        if port == 0x3CF:
            return self.gc[self.gc_index] if self.gc_index < len(self.gc) else 0xFF
        return 0xFF

    def port_write(self, port: int, value: int) -> None:
        value &= 0xFF
        self.generation += 1
        if port in (0x3B4, 0x3D4):
            self.crtc_index = value & 0x3F
        elif port in (0x3B5, 0x3D5):
            if self.crtc_index < len(self.crtc):
                if self.crtc_index <= 7 and self.crtc[0x11] & 0x80 and self.crtc_index != 7:
                    return      # CR0-CR6 write-protected (CR11 bit 7)
                self.crtc[self.crtc_index] = value
        elif port == 0x3C0:
            if not self.attr_flipflop:
                self.attr_index = value & 0x3F
            elif (self.attr_index & 0x1F) < len(self.attr):
                self.attr[self.attr_index & 0x1F] = value
            self.attr_flipflop = not self.attr_flipflop
        elif port == 0x3C2:
            self.misc = value
        elif port == 0x3C4:
            self.seq_index = value & 0x07
        elif port == 0x3C5:
            if self.seq_index < len(self.seq):
                self.seq[self.seq_index] = value
        elif port == 0x3C6:
            self.pel_mask = value
        elif port == 0x3C7:
            self.dac_read_index, self.dac_sub, self.dac_reading = value, 0, True
        elif port == 0x3C8:
            self.dac_write_index, self.dac_sub, self.dac_reading = value, 0, False
        elif port == 0x3C9:
            self.dac[self.dac_write_index * 3 + self.dac_sub] = value
            self.dac_sub += 1
            if self.dac_sub == 3:
                self.dac_sub = 0
                self.dac_write_index = (self.dac_write_index + 1) & 0xFF
        elif port == 0x3CE:
            self.gc_index = value & 0x0F
        elif port == 0x3CF:
            if self.gc_index < len(self.gc):
                self.gc[self.gc_index] = value

    # --- Bochs VBE dispi ----------------------------------------------------------------
    def vbe_read(self, index: int) -> int:
        if index >= VBE_REGISTERS:
            return 0
        if self.vbe[VBE_ENABLE] & VBE_GETCAPS and index in (VBE_XRES, VBE_YRES, VBE_BPP):
            return {VBE_XRES: VBE_MAX_XRES, VBE_YRES: VBE_MAX_YRES, VBE_BPP: 32}[index]
        if index == VBE_VIDEO_MEMORY_64K:
            return VRAM_SIZE >> 16
        return self.vbe[index]

    def vbe_write(self, index: int, value: int) -> None:
        value &= 0xFFFF
        self.generation += 1
        vbe = self.vbe
        if index == VBE_INDEX_ID:
            if VBE_ID0 <= value <= VBE_ID5:
                vbe[0] = value
        elif index in (VBE_XRES, VBE_YRES, VBE_BPP):
            if vbe[VBE_ENABLE] & VBE_ENABLED:
                return      # as QEMU: the mode is fixed while enabled
            if index == VBE_XRES and (value > VBE_MAX_XRES or value & 7 or value == 0):
                log.info("%s: VBE xres %d refused", self.name, value)
            elif index == VBE_YRES and (value > VBE_MAX_YRES or value == 0):
                log.info("%s: VBE yres %d refused", self.name, value)
            elif index == VBE_BPP and (value or 8) not in VBE_BPPS:
                log.info("%s: VBE bpp %d refused", self.name, value)
            else:
                vbe[index] = (value or 8) if index == VBE_BPP else value
        elif index == VBE_BANK:
            vbe[VBE_BANK] = value % (VRAM_SIZE // BANK_SIZE)
        elif index == VBE_ENABLE:
            self._vbe_enable(value)
        elif index == VBE_VIRT_WIDTH:
            if vbe[VBE_XRES] <= value and value * self.vbe_bytes_per_pixel() * vbe[VBE_YRES] <= VRAM_SIZE:
                vbe[VBE_VIRT_WIDTH] = value
                vbe[VBE_VIRT_HEIGHT] = min(0xFFFF, VRAM_SIZE // self.vbe_line_offset())
        elif index in (VBE_X_OFFSET, VBE_Y_OFFSET):
            old = vbe[index]
            vbe[index] = value
            end = self.vbe_start() + self.vbe_line_offset() * (vbe[VBE_YRES] - 1) \
                + vbe[VBE_XRES] * self.vbe_bytes_per_pixel()
            if end > VRAM_SIZE:
                vbe[index] = old
                log.info("%s: VBE offset %d would show past video memory", self.name, value)

    def _vbe_enable(self, value: int) -> None:
        vbe = self.vbe
        if value & VBE_ENABLED and not vbe[VBE_ENABLE] & VBE_ENABLED:
            size = vbe[VBE_XRES] * vbe[VBE_YRES] * self.vbe_bytes_per_pixel()
            if size > VRAM_SIZE:
                log.warning("%s: VBE mode %dx%dx%d needs more than %d MiB; not enabled", self.name,
                            vbe[VBE_XRES], vbe[VBE_YRES], vbe[VBE_BPP], VRAM_SIZE >> 20)
                return
            vbe[VBE_VIRT_WIDTH], vbe[VBE_VIRT_HEIGHT] = vbe[VBE_XRES], vbe[VBE_YRES]
            vbe[VBE_X_OFFSET] = vbe[VBE_Y_OFFSET] = 0
            vbe[VBE_BANK] = 0
            if not value & VBE_NOCLEARMEM:
                self.vram[:size] = bytes(size)
            # As the VGA BIOS would: graphics mode, chain-4, so legacy reads agree.
            self.gc[6] = (self.gc[6] & ~0x0C) | 0x05
            self.seq[4] |= 0x08
        elif not value & VBE_ENABLED:
            vbe[VBE_BANK] = 0
        vbe[VBE_ENABLE] = value & (VBE_ENABLED | VBE_GETCAPS | VBE_8BIT_DAC | VBE_LFB_ENABLED | VBE_NOCLEARMEM)

    # --- the legacy window ------------------------------------------------------------
    def window_read(self, offset: int, size: int) -> int:
        buffer, base = self._window_target(offset, size)
        if buffer is None:
            return (1 << (8 * size)) - 1
        return int.from_bytes(buffer[base:base + size], "little")

    def window_write(self, offset: int, size: int, value: int) -> None:
        buffer, base = self._window_target(offset, size)
        if buffer is not None:
            buffer[base:base + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _window_target(self, offset: int, size: int):
        if size not in (1, 2, 4, 8) or not 0 <= offset <= VGA_WINDOW.length - size:
            return None, 0
        if self.vbe_enabled:
            if offset + size > BANK_SIZE:
                return None, 0
            return self.vram, self.vbe[VBE_BANK] * BANK_SIZE + offset
        return self.legacy, offset

    # --- PCI BARs ---------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        if index == FRAMEBUFFER_BAR and 0 <= offset <= VRAM_SIZE - size:
            return int.from_bytes(self.vram[offset:offset + size], "little")
        if index == MMIO_BAR:
            return self._mmio_read(offset, size)
        return (1 << (8 * size)) - 1

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index == FRAMEBUFFER_BAR and 0 <= offset <= VRAM_SIZE - size and size in (1, 2, 4, 8):
            self.vram[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        elif index == MMIO_BAR:
            self._mmio_write(offset, size, value)

    def _mmio_read(self, offset: int, size: int) -> int:
        if MMIO_VGA_PORTS <= offset < MMIO_VGA_PORTS + 0x20 and size in (1, 2):
            port = 0x3C0 + offset - MMIO_VGA_PORTS
            value = self.port_read(port)
            return value | (self.port_read(port + 1) << 8) if size == 2 else value
        if MMIO_DISPI <= offset < MMIO_DISPI + 2 * VBE_REGISTERS and size == 2 and not offset & 1:
            return self.vbe_read((offset - MMIO_DISPI) // 2)
        if offset == MMIO_QEXT and size == 4:
            return QEXT_SIZE
        if offset == MMIO_QEXT + 4 and size == 4:
            return QEXT_LITTLE_ENDIAN    # bochs-drm asks for little endian; big is not offered
        return (1 << (8 * size)) - 1

    def _mmio_write(self, offset: int, size: int, value: int) -> None:
        if MMIO_VGA_PORTS <= offset < MMIO_VGA_PORTS + 0x20 and size in (1, 2):
            port = 0x3C0 + offset - MMIO_VGA_PORTS
            self.port_write(port, value)
            if size == 2:
                self.port_write(port + 1, value >> 8)
        elif MMIO_DISPI <= offset < MMIO_DISPI + 2 * VBE_REGISTERS and size == 2 and not offset & 1:
            self.vbe_write((offset - MMIO_DISPI) // 2, value)
        else:
            log.debug("%s: MMIO write %#x size %d ignored", self.name, offset, size)

    def bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        if index != FRAMEBUFFER_BAR or self.platform is None:
            return
        if new is None:
            self.platform.unmap_device_memory(FRAMEBUFFER_REGION)
        else:
            self.platform.map_device_memory(FRAMEBUFFER_REGION, new, self.vram)
        self.framebuffer_gpa = new

    def dirty_framebuffer_pages(self) -> bytes | None:
        """Pages of the framebuffer written since the last call (see Platform.dirty_device_pages)."""
        if self.platform is None or self.framebuffer_gpa is None:
            return None
        return self.platform.dirty_device_pages(FRAMEBUFFER_REGION)

    # --- saved state ------------------------------------------------------------------
    def state(self) -> VgaState:
        return VgaState(super().state(), self.misc, self.seq_index, bytes(self.seq), self.crtc_index,
                        bytes(self.crtc), self.gc_index, bytes(self.gc), self.attr_index, self.attr_flipflop,
                        bytes(self.attr), self.dac_read_index, self.dac_write_index, self.dac_sub,
                        self.dac_reading, self.pel_mask, bytes(self.dac), self.vbe_index, tuple(self.vbe),
                        bytes(self.legacy))

    def restore(self, state: VgaState) -> None:
        state = checked(state, VgaState)
        super().restore(state.pci)
        self.misc, self.seq_index, self.seq = state.misc, state.seq_index, bytearray(state.seq)
        self.crtc_index, self.crtc = state.crtc_index, bytearray(state.crtc)
        self.gc_index, self.gc = state.gc_index, bytearray(state.gc)
        self.attr_index, self.attr_flipflop, self.attr = state.attr_index, state.attr_flipflop, bytearray(state.attr)
        self.dac_read_index, self.dac_write_index = state.dac_read_index, state.dac_write_index
        self.dac_sub, self.dac_reading, self.pel_mask = state.dac_sub, state.dac_reading, state.pel_mask
        self.dac = bytearray(state.dac)
        self.vbe_index, self.vbe = state.vbe_index, list(state.vbe)
        self.legacy = bytearray(state.legacy)
        self.generation += 1


class VgaPorts:
    """The legacy ports as one bus device over two slots: 0x1CE-0x1CF (dispi index,
    data) first, then 0x3B0-0x3DF (offsets continue from 0x1CE: kvmpy.builder)."""

    def __init__(self, vga: Vga) -> None:
        self.vga = vga

    def read(self, offset: int, size: int) -> int:
        port = VBE_PORTS.base + offset
        if port == VBE_PORTS.base:
            return self.vga.vbe_index if size == 2 else self.vga.vbe_index & 0xFF
        if port == VBE_PORTS.base + 1 and size == 2:
            return self.vga.vbe_read(self.vga.vbe_index)
        if VGA_PORTS.base <= port < VGA_PORTS.end:
            value = 0
            for i in range(min(size, VGA_PORTS.end - port)):
                value |= self.vga.port_read(port + i) << (8 * i)
            return value
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        port = VBE_PORTS.base + offset
        if port == VBE_PORTS.base:
            self.vga.vbe_index = value & 0xFFFF
        elif port == VBE_PORTS.base + 1:
            self.vga.vbe_write(self.vga.vbe_index, value)
        elif VGA_PORTS.base <= port < VGA_PORTS.end:
            # A 16-bit write is index then data (``out dx, ax`` to 0x3C4/0x3CE/0x3D4).
            for i in range(min(size, VGA_PORTS.end - port)):
                self.vga.port_write(port + i, (value >> (8 * i)) & 0xFF)


class VgaWindow:
    """0xA0000-0xBFFFF as a bus device."""

    def __init__(self, vga: Vga) -> None:
        self.vga = vga

    def read(self, offset: int, size: int) -> int:
        return self.vga.window_read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.vga.window_write(offset, size, value)
