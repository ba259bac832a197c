"""Ports 0xCF8-0xCFF: PCI configuration mechanism #1 with the PIIX reset control
register at 0xCF9 inside it (the FADT's RESET_REG points there)."""

from __future__ import annotations

from typing import Callable

from ..bus import BusDevice, PortSlot

PCI_CONFIG_PORTS = PortSlot(base=0xCF8, length=8)
RESET_CONTROL_PORT = 0xCF9
RESET_CONTROL_OFFSET = RESET_CONTROL_PORT - PCI_CONFIG_PORTS.base
RESET_CPU = 0x04
SYSTEM_RESET = 0x02
# What the FADT tells the OS to write for a reset: a full (system) CPU reset.
RESET_VALUE = SYSTEM_RESET | RESET_CPU


class ConfigPortsWithResetControl:
    """The config mechanism's ports, except a byte access to 0xCF9, which is the
    reset control register: writing RESET_CPU resets the machine."""

    def __init__(self, config_io: BusDevice, on_reset: Callable[[], None]) -> None:
        self.config_io = config_io
        self.on_reset = on_reset
        self._reset_control = 0

    def read(self, offset: int, size: int) -> int:
        if offset == RESET_CONTROL_OFFSET and size == 1:
            return self._reset_control
        return self.config_io.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == RESET_CONTROL_OFFSET and size == 1:
            self._reset_control = value & 0x0E
            if value & RESET_CPU:
                self.on_reset()
            return
        self.config_io.write(offset, size, value)
