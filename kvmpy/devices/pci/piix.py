"""The PIIX3 at 00:01: function 0 the PCI-to-ISA bridge, function 1 the IDE controller,
function 3 the PIIX4-style power-management function.

What firmware and OSes look for on an i440FX PC (QEMU's "pc" machine):

  * 00:01.0, 8086:7000, class 06.01.00, multi-function: the bridge. Of its
    registers SeaBIOS and Linux program the PIRQ route control (0x60-0x63):
    PIRQA-D to an ISA IRQ, bit 7 off. kvmpy's own ACPI _PRT sends PCI INTx
    straight to IOAPIC pins 16-19 (kvmpy.devices.pci.bus); like QEMU's piix3, a
    PIRQ that is routed also drives its ISA IRQ, so a guest on the 8259 (or a
    firmware's own link devices) sees the same interrupt at the IRQ it chose.
  * 00:01.1, 8086:7010, class 01.01.80: IDE in compatibility mode (the legacy
    ports 0x1F0/0x3F6 IRQ 14 and 0x170/0x376 IRQ 15, decoded always, as QEMU
    does) with the bus-master DMA registers in BAR4 (16 I/O ports). The IDE
    timing registers come up with both channels' decode enabled (0x41/0x43 bit
    7), as SeaBIOS leaves them: Linux's ata_piix skips a channel that is off, and
    with a direct kernel boot there is no firmware to turn them on.

  * 00:01.3, 8086:7113, class 06.80.00: the PIIX4 power-management function
    (QEMU's "PIIX4_PM"). Firmware finds the ACPI PM block (the PM timer at +8)
    through it: PMBA (0x40, I/O base | 1) and PMREGMISC (0x80) bit 0, I/O space
    enabled. OVMF on an i440FX reads the timer's port from PMBA and programs one
    only when PMREGMISC is off; SeaBIOS always writes 0x601. kvmpy's PM block sits
    at a fixed port (the FADT's, kvmpy.devices.acpi_pm.PM_BLOCK), so the function
    comes up decoding it there, as if the firmware had set it, and both registers
    read back where the block is whatever is written: a register that moved
    without the block would send the firmware's timer reads into empty ports.
    DEVACTB's APMC enable (0x5B bit 1) reads set, as on QEMU without SMM, so
    SeaBIOS does not try to relocate an SMM handler that does not exist.

OpenFirmware device paths for fw_cfg's ``bootorder`` (SeaBIOS src/boot.c reads
them): ``ide_boot_path(position)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..acpi_pm import PM_BASE_DEFAULT
from ..ide import BMDMA_SIZE, IdeController, IdeControllerState
from ..saved_state import StateCheck, StateError, checked
from .device import BAR_IO, CMD_BUS_MASTER, PciConfigState, PciDevice

PIIX3_SLOT = 1
IDE_FUNCTION = 1
PIRQ_ROUTE = 0x60           # PIRQRC[A-D]: 0x60-0x63
PIRQ_DISABLED = 0x80
IDE_BMDMA_BAR = 4
IDETIM = 0x40               # primary 0x40-0x41, secondary 0x42-0x43
IDETIM_DECODE_ENABLE = 0x8000
PM_FUNCTION = 3
PMBA = 0x40
PMBA_IO_SPACE = 0x01        # bit 0 of an I/O base register: "this is I/O space"
DEVACTB = 0x58
DEVACTB_APMC_EN = 0x02      # of DEVACTB's top byte (0x5B): bit 25
PMREGMISC = 0x80
PMREGMISC_PMIOSE = 0x01
SMBHSTBASE = 0x90

# The bridge's power-on register values (Intel 290550, QEMU's piix3_reset).
_BRIDGE_DEFAULTS = {0x4C: 0x4D, 0x4E: 0x03, 0x60: 0x80, 0x61: 0x80, 0x62: 0x80, 0x63: 0x80, 0x69: 0x02,
                    0x70: 0x80, 0x76: 0x0C, 0x77: 0x0C, 0x78: 0x02, 0xA0: 0x08, 0xA8: 0x0F}
# IRQs a PIRQ may not be routed to (PIIX3 datasheet: 0-2, 8 and 13 are reserved).
_RESERVED_IRQS = frozenset({0, 1, 2, 8, 13})


def ide_boot_path(position: int) -> str:
    """The OpenFirmware path of the IDE device at ``position`` (0 primary master ..
    3 secondary slave) as QEMU writes it into fw_cfg ``bootorder`` and SeaBIOS
    matches it: /pci@i0cf8/ide@1,1/drive@CHANNEL/disk@UNIT."""
    if not 0 <= position <= 3:
        raise ValueError(f"IDE position {position} is not 0-3")
    return f"/pci@i0cf8/ide@{PIIX3_SLOT:x},{IDE_FUNCTION:x}/drive@{position // 2:x}/disk@{position % 2:x}"


class PiixIde(PciDevice):
    """00:01.1: the controller's PCI face."""

    def __init__(self, controller: IdeController) -> None:
        super().__init__(0x8086, 0x7010, 0x010180, interrupt_pin=0, name="piix3-ide")
        self.controller = controller
        self.add_bar(IDE_BMDMA_BAR, BMDMA_SIZE, BAR_IO)
        for reg in range(IDETIM, 0x48):       # IDETIM, SIDETIM, UDMA control/timing
            self.wmask[reg] = 0xFF
        self.power_on_timing()

    def power_on_timing(self) -> None:
        for channel in (0, 1):
            self._set16(IDETIM + 2 * channel, IDETIM_DECODE_ENABLE)

    def bus_master_enabled(self) -> bool:
        return bool(self.command & CMD_BUS_MASTER)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return self.controller.read_bmdma(offset, size)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        self.controller.write_bmdma(offset, size, value)


class PiixPm(PciDevice):
    """00:01.3: the power-management function, pointing at the ACPI PM block at
    ``pm_base``. The rest of its space (SMBus base, device activity and resource
    registers) is plain storage: nothing behind it."""

    def __init__(self, pm_base: int = PM_BASE_DEFAULT) -> None:
        # QEMU gives the function INTA for the SCI; kvmpy's SCI is ISA IRQ 9 from the
        # PM block itself (the FADT says so), so no PCI interrupt here.
        super().__init__(0x8086, 0x7113, 0x068000, revision=0x03, interrupt_pin=0, name="piix4-pm")
        self.pm_base = pm_base
        for reg in range(0x40, 0x100):
            self.wmask[reg] = 0xFF
        for reg in (*range(PMBA, PMBA + 4), PMREGMISC):
            self.wmask[reg] = 0
        self._power_on_registers()

    def _power_on_registers(self) -> None:
        for reg in range(0x40, 0x100):
            self.config[reg] = 0
        self.config[PMBA:PMBA + 4] = (self.pm_base | PMBA_IO_SPACE).to_bytes(4, "little")
        self.config[PMREGMISC] = PMREGMISC_PMIOSE
        self.config[DEVACTB + 3] = DEVACTB_APMC_EN

    def reset(self) -> None:
        self._power_on_registers()


@dataclass(frozen=True)
class Piix3State:
    bridge: PciConfigState
    ide: PciConfigState
    controller: IdeControllerState
    pm: PciConfigState | None = None        # None: a state saved before the PM function existed

    def validate(self) -> None:
        check = StateCheck(self)
        for name in ("bridge", "ide"):
            if type(getattr(self, name)) is not PciConfigState:
                raise check.fail(name, "expected a PciConfigState")
            getattr(self, name).validate()
        if self.pm is not None:
            if type(self.pm) is not PciConfigState:
                raise check.fail("pm", "expected a PciConfigState")
            self.pm.validate()
        checked(self.controller, IdeControllerState)


class Piix3(PciDevice):
    """00:01.0, the ISA bridge, carrying the IDE function along (``other_functions``).

    controller: the IdeController behind function 1 (its drives, IRQs, memory).
    set_isa_irq: ``set_isa_irq(irq, level)`` for PIRQ routing; None leaves the
      PIRQ registers as plain storage.
    """

    preferred_slot = PIIX3_SLOT
    routes_pirqs = True

    def __init__(self, controller: IdeController,
                 set_isa_irq: Callable[[int, bool], None] | None = None) -> None:
        super().__init__(0x8086, 0x7000, 0x060100, interrupt_pin=0, name="piix3")
        self.controller = controller
        self.ide = PiixIde(controller)
        controller.bus_master = self.ide.bus_master_enabled
        self.pm = PiixPm()
        self.other_functions = {IDE_FUNCTION: self.ide, PM_FUNCTION: self.pm}
        for reg in range(0x40, 0x100):
            self.wmask[reg] = 0xFF
        self.set_isa_irq = set_isa_irq
        self._isa_levels: dict[int, bool] = {}
        self._power_on_registers()

    def _power_on_registers(self) -> None:
        for reg in range(0x40, 0x100):
            self.config[reg] = _BRIDGE_DEFAULTS.get(reg, 0)

    def pirq_irq(self, pirq: int) -> int | None:
        """The ISA IRQ PIRQ ``pirq`` (0=A..3=D) is routed to, or None."""
        route = self.config[PIRQ_ROUTE + pirq]
        irq = route & 0x0F
        if route & PIRQ_DISABLED or irq in _RESERVED_IRQS:
            return None
        return irq

    def route_intx(self, pirq_levels: list[bool]) -> None:
        """Drive the ISA IRQs from the four PIRQ lines' levels (the bus calls this
        whenever a line or the routing changes); several PIRQs on one IRQ are ORed."""
        if self.set_isa_irq is None:
            return
        wanted: dict[int, bool] = {}
        for pirq, level in enumerate(pirq_levels):
            irq = self.pirq_irq(pirq)
            if irq is not None:
                wanted[irq] = wanted.get(irq, False) or level
        for irq in set(wanted) | set(self._isa_levels):
            level = wanted.get(irq, False)
            if self._isa_levels.get(irq, False) != level:
                self.set_isa_irq(irq, level)
            if irq in wanted:
                self._isa_levels[irq] = level
            else:
                self._isa_levels.pop(irq, None)

    def config_write(self, offset: int, size: int, value: int) -> None:
        super().config_write(offset, size, value)
        if offset < PIRQ_ROUTE + 4 and PIRQ_ROUTE < offset + size and self.pci_bus is not None:
            self.pci_bus.refresh_pirqs()

    def reset(self) -> None:
        # (the controller's own reset comes with its ports: IdeLegacyPorts)
        self._power_on_registers()
        self.ide.power_on_timing()
        self.pm.reset()
        if self.pci_bus is not None:
            self.pci_bus.refresh_pirqs()

    def state(self) -> Piix3State:
        return Piix3State(bridge=PciDevice.state(self), ide=self.ide.state(), controller=self.controller.state(),
                          pm=self.pm.state())

    def restore(self, state: Piix3State) -> None:
        state = checked(state, Piix3State)
        before = self.state()
        try:
            self._restore_parts(state)
        except StateError:
            self._restore_parts(before)     # a part refused: none of it is taken
            raise

    def _restore_parts(self, state: Piix3State) -> None:
        PciDevice.restore(self, state.bridge)
        self.ide.restore(state.ide)
        if state.pm is not None:
            self.pm.restore(state.pm)
        else:
            self.pm.reset()
        self.controller.restore(state.controller)
        if self.pci_bus is not None:
            self.pci_bus.refresh_pirqs()
