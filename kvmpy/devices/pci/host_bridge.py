"""The i440FX host bridge (00:00.0, 8086:1237) that PC firmware expects.

SeaBIOS recognises QEMU by this bridge with Red Hat's subsystem IDs (1af4:1100),
and uses its PAM registers (0x59-0x5F) to make the BIOS area 0xC0000-0xFFFFF
writable RAM while it runs its POST, then write-protects it again (SeaBIOS
src/fw/shadow.c; QEMU hw/pci-host/i440fx.c, pam.c). The bridge only keeps the
registers; what the protection means for guest memory is the owner's business,
told through ``on_pam(segments)`` after every change.

SMRAM (0x72) keeps its register but stays closed: there is no SMM here, and the
legacy VGA window it would open is not RAM in this machine anyway.
"""

from __future__ import annotations

from typing import Callable

from .device import PciDevice

I440FX_VENDOR = 0x8086
I440FX_DEVICE = 0x1237
QEMU_SUBSYSTEM_VENDOR = 0x1AF4      # what SeaBIOS's qemu_detect() looks for
QEMU_SUBSYSTEM = 0x1100

PAM0 = 0x59
PAM_REGISTERS = 7                   # 0x59-0x5F
SMRAM = 0x72
SMRAM_RESET = 0x02                  # C_BASE_SEG: the compatible SMRAM at 0xA0000, closed
SMRAM_WRITABLE = 0x78               # D_OPEN, D_CLS, D_LCK, G_SMRAME

PAM_READ = 0x1                      # per nibble: reads come from RAM
PAM_WRITE = 0x2                     # per nibble: writes go to RAM


def pam_segments() -> list[tuple[int, int, int, int]]:
    """[(base, size, register, shift)]: the 13 areas the PAM nibbles govern, in
    order: 0xF0000 (64 KiB, PAM0's high nibble), then 0xC0000-0xEFFFF in 16 KiB
    steps, two per register from PAM1."""
    segments = [(0xF0000, 0x10000, PAM0, 4)]
    for i in range(12):
        segments.append((0xC0000 + i * 0x4000, 0x4000, PAM0 + 1 + i // 2, 4 * (i % 2)))
    return segments


PAM_SEGMENTS = pam_segments()


class I440fxHostBridge(PciDevice):
    """00:00.0. ``on_pam`` receives [(base, size, pam_bits)] for every PAM area
    after a guest write to the PAM registers, a reset or a restore."""

    def __init__(self, on_pam: Callable[[list[tuple[int, int, int]]], None] | None = None) -> None:
        super().__init__(I440FX_VENDOR, I440FX_DEVICE, 0x060000, revision=0x02,
                         subsystem_vendor_id=QEMU_SUBSYSTEM_VENDOR, subsystem_id=QEMU_SUBSYSTEM,
                         interrupt_pin=0, name="i440fx")
        self.on_pam = on_pam
        self.wmask[0x3C] = 0        # no interrupt line: nothing to route
        self.wmask[PAM0] = 0xF0     # the low nibble of PAM0 is reserved
        for reg in range(PAM0 + 1, PAM0 + PAM_REGISTERS):
            self.wmask[reg] = 0xFF
        self.config[SMRAM] = SMRAM_RESET
        self.wmask[SMRAM] = SMRAM_WRITABLE

    def pam(self) -> list[tuple[int, int, int]]:
        return [(base, size, (self.config[reg] >> shift) & 0x3) for base, size, reg, shift in PAM_SEGMENTS]

    def config_write(self, offset: int, size: int, value: int) -> None:
        before = bytes(self.config[PAM0:PAM0 + PAM_REGISTERS])
        super().config_write(offset, size, value)
        if bytes(self.config[PAM0:PAM0 + PAM_REGISTERS]) != before:
            self._tell()

    def _tell(self) -> None:
        if self.on_pam is not None:
            self.on_pam(self.pam())

    def reset(self) -> None:
        """Power-on: the BIOS area reads from ROM again, SMRAM closed."""
        self.config[PAM0:PAM0 + PAM_REGISTERS] = bytes(PAM_REGISTERS)
        self.config[SMRAM] = SMRAM_RESET
        self._tell()

    def restore(self, state) -> None:
        super().restore(state)
        self._tell()
