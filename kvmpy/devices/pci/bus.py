"""PCI bus 0: device numbers, BAR placement and decoding, INTx routing, config access.

There is no firmware, so PciBus plays its part: it assigns every BAR an address
in the machine's PCI windows before the guest runs (the guest may move them; it
finds the windows in ACPI _CRS). Whenever the guest changes a BAR or the command
register, the bus re-registers that BAR's range on the machine's MMIO/PIO Bus
(only while decoding is enabled and only inside the windows) and tells the device
so it can re-aim its doorbells. A BAR that would overlap something is left
unmapped with a logged warning rather than shadowing another device.

Config space is reached through mechanism #1 (PciConfigIo at 0xCF8, 8 ports)
and optionally ECAM (PciEcam, an MMIO range described by the ACPI MCFG).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from dataclasses import dataclass

from ..bus import Bus, BusError
from ..saved_state import Restorable, StateCheck, checked
from .device import CMD_INTX_DISABLE, CMD_IO, CMD_MEMORY, HEADER_TYPE, INTERRUPT_LINE, PciDevice

log = logging.getLogger(__name__)

MAX_SLOTS = 32
MAX_FUNCTIONS = 8
HEADER_TYPE_MULTI_FUNCTION = 0x80
ECAM_BUS_SIZE = 1 << 20  # one bus: 32 devices x 8 functions x 4 KiB


@dataclass(frozen=True)
class Window:
    """An address window the host bridge forwards to PCI (base and inclusive end)."""

    base: int
    end: int  # inclusive, as ACPI _CRS writes it

    @property
    def size(self) -> int:
        return self.end - self.base + 1

    def contains(self, addr: int, size: int) -> bool:
        return self.base <= addr and addr + size - 1 <= self.end


class PciHostBridge(PciDevice):
    """Device 0: the host bridge (class 06.00.00), no BARs and no interrupt."""

    def __init__(self) -> None:
        # Red Hat's generic PCIe host bridge ID: guests bind no special driver to it.
        super().__init__(0x1B36, 0x0008, 0x060000, interrupt_pin=0, name="host-bridge")
        self.wmask[INTERRUPT_LINE] = 0


class PciBus:
    """Bus 0 of a single PCI segment.

    Arguments:
      mmio_bus, pio_bus: the machine's Bus objects, where BARs are registered.
      platform: for INTx (``set_irq_level``); passed on to devices for MSI-X.
      mmio_window: (base, end inclusive) of the 32-bit PCI hole, e.g.
        (0xC0000000, 0xFEBFFFFF); BARs are placed and decoded only inside it.
      io_window: (base, end inclusive) for I/O BARs, e.g. (0xC000, 0xFFFF).
      mmio64_window: optional (base, end) above 4 GiB for large 64-bit BARs.
      intx_gsis: the four GSIs that INTA..INTD of slot 0 use; other slots are
        swizzled (slot + pin - 1) % 4 like a standard bridge. Describe the result
        in ACPI _PRT with ``intx_routes()``.
      ecam_base: if given, ``ecam()`` returns an MMIO device for an MCFG.
      host_bridge: device 0 (firmware wants the i440FX); a generic bridge otherwise.
    """

    def __init__(self, mmio_bus: Bus, pio_bus: Bus, platform,
                 mmio_window: tuple[int, int] = (0xC0000000, 0xFEBFFFFF),
                 io_window: tuple[int, int] = (0xC000, 0xFFFF),
                 mmio64_window: tuple[int, int] | None = None,
                 intx_gsis: tuple[int, int, int, int] = (16, 17, 18, 19),
                 ecam_base: int | None = None, host_bridge: PciDevice | None = None) -> None:
        self.mmio_bus = mmio_bus
        self.pio_bus = pio_bus
        self.platform = platform
        self.mmio_window = Window(*mmio_window)
        self.io_window = Window(*io_window)
        self.mmio64_window = Window(*mmio64_window) if mmio64_window else None
        self.intx_gsis = tuple(intx_gsis)
        self.ecam_base = ecam_base
        self.devices: dict[int, PciDevice] = {}     # slot -> its function 0
        # (slot, function) -> every function, 0 included: config cycles route by both
        self.functions: dict[tuple[int, int], PciDevice] = {}
        self._mapped: dict[tuple[int, int, int], tuple[int, bool]] = {}  # (slot, fn, bar) -> (addr, pio)
        self._next_mmio = self.mmio_window.base
        self._next_mmio64 = self.mmio64_window.base if self.mmio64_window else None
        self._next_io = self.io_window.base
        self._intx_levels: dict[tuple[int, int], bool] = {}  # (slot, fn) -> device line level
        self._irq_lock = threading.Lock()
        # The chipset function that also routes PIRQA-D to ISA IRQs (the PIIX3), if any.
        self.pirq_router = None
        self.add(host_bridge if host_bridge is not None else PciHostBridge(), slot=0)

    # topology --------------------------------------------------------------

    def add(self, dev: PciDevice, slot: int | None = None) -> int:
        """Plug ``dev`` in (at its ``preferred_slot``, else the next free slot, unless
        given) with the functions it brings along (``dev.other_functions``) and assign
        their BARs; returns the slot."""
        if slot is None:
            slot = dev.preferred_slot
        if slot is None:
            slot = next((s for s in range(MAX_SLOTS) if s not in self.devices), None)
            if slot is None:
                raise ValueError("PCI bus 0 is full (32 devices)")
        if slot in self.devices or not 0 <= slot < MAX_SLOTS:
            raise ValueError(f"PCI slot {slot} is taken or invalid")
        others = dict(dev.other_functions)
        if not all(1 <= fn < MAX_FUNCTIONS for fn in others):
            raise ValueError(f"{dev.name}: functions must be 1..{MAX_FUNCTIONS - 1}, got {sorted(others)}")
        self.devices[slot] = dev
        if dev.routes_pirqs:
            self.pirq_router = dev
        if others:
            # Guests scan functions 1-7 only when function 0 says it has them.
            dev.config[HEADER_TYPE] |= HEADER_TYPE_MULTI_FUNCTION
        for fn, function in ((0, dev), *sorted(others.items())):
            self._attach(function, slot, fn)
        return slot

    def _attach(self, dev: PciDevice, slot: int, fn: int) -> None:
        self.functions[(slot, fn)] = dev
        dev.pci_bus = self
        dev.slot = slot
        dev.function = fn
        pin = dev.config[0x3D]
        if pin:
            dev.intx_gsi = self.intx_gsis[(slot + pin - 1) % 4]
            dev.config[INTERRUPT_LINE] = dev.intx_gsi & 0xFF
        # Largest first keeps natural alignment without holes.
        for bar in sorted(dev.bars.values(), key=lambda b: -b.size):
            dev.set_bar_address(bar.index, self._allocate(bar))

    def _allocate(self, bar) -> int:
        if bar.is_io:
            addr = (self._next_io + bar.size - 1) & ~(bar.size - 1)
            if not self.io_window.contains(addr, bar.size):
                raise ValueError(f"I/O window {self.io_window} exhausted")
            self._next_io = addr + bar.size
            return addr
        addr = (self._next_mmio + bar.size - 1) & ~(bar.size - 1)
        if self.mmio_window.contains(addr, bar.size):
            self._next_mmio = addr + bar.size
            return addr
        if bar.kind == "mem64" and self.mmio64_window is not None:
            addr = (self._next_mmio64 + bar.size - 1) & ~(bar.size - 1)
            if self.mmio64_window.contains(addr, bar.size):
                self._next_mmio64 = addr + bar.size
                return addr
        raise ValueError("PCI MMIO window exhausted")

    def windows(self) -> dict:
        """The resource windows for ACPI _CRS: {'mmio': Window, 'io': Window, 'mmio64': Window|None}."""
        return {"mmio": self.mmio_window, "io": self.io_window, "mmio64": self.mmio64_window}

    def intx_routes(self) -> list[tuple[int, int, int]]:
        """(slot, pin 0=INTA..3=INTD, gsi) for every slot, for ACPI _PRT (level, active high)."""
        return [(s, p, self.intx_gsis[(s + p) % 4]) for s in range(MAX_SLOTS) for p in range(4)]

    def ecam(self) -> "PciEcam":
        if self.ecam_base is None:
            raise ValueError("PciBus was built without ecam_base")
        return PciEcam(self)

    # config space ------------------------------------------------------------

    def config_read(self, bus: int, slot: int, fn: int, offset: int, size: int) -> int:
        dev = self.functions.get((slot, fn)) if bus == 0 else None
        if dev is None:
            return (1 << (8 * size)) - 1
        return dev.config_read(offset, size)

    def config_write(self, bus: int, slot: int, fn: int, offset: int, size: int, value: int) -> None:
        dev = self.functions.get((slot, fn)) if bus == 0 else None
        if dev is not None:
            dev.config_write(offset, size, value)

    # BAR decoding ------------------------------------------------------------

    def device_mapping_changed(self, dev: PciDevice, decodable: Collection[int] | None = None) -> None:
        """Called by a device after its command register or a BAR changed; when it
        restores a saved state, only the ``decodable`` BARs may be mapped (the others
        lost a clash with a BAR mapped before them)."""
        cmd = dev.command
        for bar in dev.bars.values():
            key = (dev.slot, dev.function, bar.index)
            enabled = cmd & (CMD_IO if bar.is_io else CMD_MEMORY)
            if decodable is not None and bar.index not in decodable:
                enabled = 0
            want = dev.bar_address(bar.index) if enabled else None
            if want is not None and not self._acceptable(bar, want):
                self._log_refusal(dev, bar, want)
                want = None
            have = self._mapped.get(key)
            if (have[0] if have else None) == want:
                continue
            target = self.pio_bus if bar.is_io else self.mmio_bus
            if have is not None:
                target.unregister(have[0])
                del self._mapped[key]
            if want is not None:
                try:
                    target.register(want, bar.size, dev.bar_device(bar.index))
                except BusError as e:
                    log.warning("%s: BAR%d at %#x not mapped: %s", dev.name, bar.index, want, e)
                    want = None
                else:
                    self._mapped[key] = (want, bar.is_io)
            dev.bar_moved(bar.index, have[0] if have else None, want)

    def _acceptable(self, bar, addr: int) -> bool:
        if addr == 0 or addr % bar.size:
            return False
        if bar.is_io:
            return self.io_window.contains(addr, bar.size)
        if self.mmio_window.contains(addr, bar.size):
            return True
        return self.mmio64_window is not None and self.mmio64_window.contains(addr, bar.size)

    def _log_refusal(self, dev, bar, addr) -> None:
        # All ones minus the size bits is a BAR being sized with decoding on: expected, quiet.
        sizing = addr | (bar.size - 1) in (0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFC | 3)
        (log.debug if sizing or addr == 0 else log.warning)(
            "%s: BAR%d at %#x (size %#x) is outside the PCI windows; not decoded",
            dev.name, bar.index, addr, bar.size)

    def mapping(self, dev: PciDevice, index: int) -> int | None:
        """Where BAR ``index`` of ``dev`` is decoded now, or None."""
        m = self._mapped.get((dev.slot, dev.function, index))
        return m[0] if m else None

    # INTx ------------------------------------------------------------------

    def set_intx(self, dev: PciDevice, level: bool) -> None:
        """Drive ``dev``'s INTx pin; lines are shared, so a GSI is the OR of its devices."""
        if dev.intx_gsi is None:
            return
        with self._irq_lock:
            self._intx_levels[(dev.slot, dev.function)] = level
            dev.set_interrupt_status(level)
            self._update_gsi(dev.intx_gsi)

    def refresh_intx(self, dev: PciDevice) -> None:
        if dev.intx_gsi is not None:
            with self._irq_lock:
                self._update_gsi(dev.intx_gsi)

    def _gsi_level(self, gsi: int) -> bool:
        return any(self._intx_levels.get(at) and not d.command & CMD_INTX_DISABLE
                   for at, d in self.functions.items() if d.intx_gsi == gsi)

    def _update_gsi(self, gsi: int) -> None:
        self.platform.set_irq_level(gsi, self._gsi_level(gsi))
        if self.pirq_router is not None:
            self._route_pirqs()

    def refresh_pirqs(self) -> None:
        """The PIRQ routing changed (the router's registers): drive the ISA IRQs anew."""
        if self.pirq_router is not None:
            with self._irq_lock:
                self._route_pirqs()

    def _route_pirqs(self) -> None:
        # PIRQ n is the line that reaches GSI intx_gsis[n] (the same swizzle as _PRT)
        self.pirq_router.route_intx([self._gsi_level(gsi) for gsi in self.intx_gsis])


CONFIG_ADDRESS_BITS = 0x80FFFFFC


@dataclass(frozen=True)
class PciConfigIoState:
    """The 0xCF8/0xCFC configuration mechanism's saved state."""

    address: int    # the 0xCF8 latch

    def validate(self) -> None:
        StateCheck(self).bits("address", self.address, CONFIG_ADDRESS_BITS)


class PciConfigIo(Restorable):
    """Configuration mechanism #1: register at PIO 0xCF8, length 8.

    0xCF8 holds the 32-bit address (enable bit 31, bus, device, function,
    register); 0xCFC-0xCFF is the data window into that register.
    """

    def __init__(self, pci: PciBus) -> None:
        self.pci = pci
        self.address = 0

    def state(self) -> PciConfigIoState:
        return PciConfigIoState(address=self.address)

    def restore(self, state: PciConfigIoState) -> None:
        self.address = checked(state, PciConfigIoState).address

    def _target(self, offset: int):
        a = self.address
        if not a & 0x80000000:
            return None
        return (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7, (a & 0xFC) + (offset - 4)

    def read(self, offset: int, size: int) -> int:
        if offset < 4:
            if offset == 0 and size == 4:
                return self.address
            return (1 << (8 * size)) - 1
        t = self._target(offset)
        if t is None or offset + size > 8:
            return (1 << (8 * size)) - 1
        return self.pci.config_read(*t, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            # Only dword writes latch the address; byte writes to 0xCF9 are the
            # reset-control register on real chipsets, not ours.
            if offset == 0 and size == 4:
                self.address = value & CONFIG_ADDRESS_BITS
            return
        t = self._target(offset)
        if t is not None and offset + size <= 8:
            self.pci.config_write(*t, size, value)


class PciEcam:
    """PCI Express enhanced configuration access: MMIO at ``pci.ecam_base``, ``size`` bytes."""

    size = ECAM_BUS_SIZE

    def __init__(self, pci: PciBus) -> None:
        self.pci = pci
        self.base = pci.ecam_base

    def mcfg(self) -> tuple[int, int, int, int]:
        """(base, segment, start bus, end bus) for the ACPI MCFG entry."""
        return self.base, 0, 0, 0

    def _decode(self, offset: int):
        return (offset >> 20) & 0xFF, (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF

    def read(self, offset: int, size: int) -> int:
        bus, slot, fn, reg = self._decode(offset)
        if size not in (1, 2, 4) or reg % size:
            return (1 << (8 * size)) - 1
        return self.pci.config_read(bus, slot, fn, reg, size)

    def write(self, offset: int, size: int, value: int) -> None:
        bus, slot, fn, reg = self._decode(offset)
        if size in (1, 2, 4) and not reg % size:
            self.pci.config_write(bus, slot, fn, reg, size, value)
