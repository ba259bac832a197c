"""Composing a machine from a table of devices.

Each ``DeviceEntry`` says what the device is called, how it is made (a factory
taking one DeviceContext), on which bus it sits (pio, mmio or pci) and where
(slots: base, length, IRQ). ``build_devices`` makes and places every entry in
table order, as kvmtool's dev_init list and Firecracker's builder do, so the
machine's devices are read off one list rather than out of wiring code. The PC's
own table is kvmpy.pc; a plug-in device is one more entry.

An entry may have several slots (the i8042's two ports with port 0x61 between
them): the device is registered at each, and the offsets it sees continue from
the first slot's base, so it decodes them as one range with holes.

An entry may also have a backend (a disk image, a tap device), opened before the
device and closed after it; and it may answer a monitor query ("block" for
query-block, "net" for info network) with ``describe(placed) -> dict``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, TypeVar

from .devices.bus import AddressSlot, Bus, BusDevice, Closeable, MmioSlot, PortSlot, Resettable
from .devices.context import BackendOpener, DeviceContext, DeviceFactory
from .errors import ConfigError

log = logging.getLogger(__name__)

BUS_KINDS = ("pio", "mmio", "pci")
PORT_SPACE = 1 << 16
ADDRESS_SPACE = 1 << 64
GSI_COUNT = 24      # the IOAPIC's pins, where set_irq_level reaches
QUERY_KINDS = ("", "block", "net")

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class DeviceEntry:
    """One device of a machine, declared.

    name: unique in the table (logs, the monitor, ``MachineDevices.get``).
    bus: "pio" or "mmio" (placed at ``slots``), or "pci" (plugged into PCI bus 0,
        which assigns its BARs; no slots).
    factory: ``factory(ctx) -> device``, a class taking a DeviceContext will do.
    slots: PortSlots for "pio", MmioSlots for "mmio": base, length, IRQ.
    options: handed to the factory as ``ctx.options``.
    backend: ``backend(ctx) -> object`` opened first and handed to the factory as
        ``ctx.backend`` (a disk image, a tap); closed after the device if Closeable.
    query, describe: the monitor query the device answers ("block", "net") and
        ``describe(placed) -> dict``, its entry in that query's reply.
    """

    name: str
    bus: str
    factory: DeviceFactory
    slots: tuple[AddressSlot, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    backend: BackendOpener | None = None
    query: str = ""
    describe: Callable[["PlacedDevice"], dict | list[dict]] | None = None

    def __post_init__(self) -> None:
        if self.bus not in BUS_KINDS:
            raise ConfigError(f"device {self.name!r}: bus {self.bus!r} is not one of {', '.join(BUS_KINDS)}")
        slot_type = {"pio": PortSlot, "mmio": MmioSlot}.get(self.bus)
        if slot_type is None:
            if self.slots:
                raise ConfigError(f"device {self.name!r}: a PCI device gets its addresses from the PCI bus")
        elif not self.slots or not all(isinstance(s, slot_type) for s in self.slots):
            raise ConfigError(f"device {self.name!r}: bus {self.bus!r} needs one or more {slot_type.__name__}s")
        limit = PORT_SPACE if self.bus == "pio" else ADDRESS_SPACE
        for slot in self.slots:
            # A plug-in's place() computes these from user options: check them here, once.
            if not (isinstance(slot.base, int) and isinstance(slot.length, int)
                    and 0 <= slot.base and 0 < slot.length <= limit - slot.base):
                raise ConfigError(f"device {self.name!r}: {slot.base!r}+{slot.length!r} is not a range of the "
                                  f"{self.bus} space (0..{limit - 1:#x})")
            if slot.irq is not None and not (isinstance(slot.irq, int) and 0 <= slot.irq < GSI_COUNT):
                raise ConfigError(f"device {self.name!r}: IRQ {slot.irq!r} is not a GSI (0..{GSI_COUNT - 1})")
        if self.query not in QUERY_KINDS:
            raise ConfigError(f"device {self.name!r}: query {self.query!r} is not one of block, net")
        if bool(self.query) != (self.describe is not None):
            raise ConfigError(f"device {self.name!r}: a query and its describe function go together")

    @property
    def irq(self) -> int | None:
        return next((s.irq for s in self.slots if s.irq is not None), None)


@dataclass(frozen=True)
class PlacedDevice:
    """A table entry's device as built: the model, its backend and where it sits."""

    entry: DeviceEntry
    device: object
    backend: object | None = None
    pci_slot: int | None = None


class _LaterSlot:
    """A device's second (third...) slot: offsets continue from its first slot's base."""

    def __init__(self, device: BusDevice, delta: int) -> None:
        self.device = device
        self.delta = delta

    def read(self, offset: int, size: int) -> int:
        return self.device.read(self.delta + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.device.write(self.delta + offset, size, value)

    def __repr__(self) -> str:
        return f"{self.device!r}+{self.delta:#x}"


class MachineDevices:
    """The devices of a built machine, in table order."""

    def __init__(self, placed: list[PlacedDevice]) -> None:
        self.placed = placed
        self._by_name = {p.entry.name: p for p in placed}
        # Checked once here, so a reset is a plain loop over what declared one.
        self.resettable: list[Resettable] = [p.device for p in placed if isinstance(p.device, Resettable)]

    def entry(self, name: str) -> DeviceEntry:
        return self._by_name[name].entry

    def get(self, name: str, kind: type[T]) -> T:
        """The device called ``name``, which must be a ``kind``."""
        device = self._by_name[name].device
        if not isinstance(device, kind):
            raise TypeError(f"device {name!r} is a {type(device).__name__}, not a {kind.__name__}")
        return device

    def reset(self) -> None:
        for device in self.resettable:
            device.reset()

    def query(self, kind: str) -> list[dict]:
        """What the entries answering monitor query ``kind`` ("block", "net") report; an
        entry with several (the IDE controller's drives) describes them as a list."""
        rows: list[dict] = []
        for p in self.placed:
            if p.entry.query == kind and p.entry.describe is not None:
                row = p.entry.describe(p)
                rows.extend(row if isinstance(row, list) else [row])
        return rows


def check_table(entries: Iterable[DeviceEntry]) -> None:
    """Refuse a table with a name twice or two overlapping ranges on one bus."""
    names: set[str] = set()
    taken: list[tuple[str, AddressSlot, str]] = []
    for entry in entries:
        if entry.name in names:
            raise ConfigError(f"device name {entry.name!r} is used twice")
        names.add(entry.name)
        for slot in entry.slots:
            for bus, other, owner in taken:
                if bus == entry.bus and slot.overlaps(other):
                    raise ConfigError(f"device {entry.name!r} at {slot} overlaps {owner!r} at {other}")
            taken.append((entry.bus, slot, entry.name))


def build_devices(entries: Iterable[DeviceEntry], ctx: DeviceContext, pio_bus: Bus, mmio_bus: Bus,
                  on_close: Callable[[Callable[[], None]], None]) -> MachineDevices:
    """Make and place every entry, in order. ``ctx`` is the machine-wide context;
    each factory gets a copy with its entry's name, options, slots and backend.
    ``on_close`` is given the close of every Closeable backend and device as soon as
    it exists, so a failure halfway leaves nothing open once the caller closes."""
    entries = list(entries)
    check_table(entries)
    buses = {"pio": pio_bus, "mmio": mmio_bus}
    placed = []
    for entry in entries:
        entry_ctx = replace(ctx, name=entry.name, options=entry.options, slots=entry.slots, backend=None)
        backend = None
        if entry.backend is not None:
            backend = entry.backend(entry_ctx)
            if isinstance(backend, Closeable):
                on_close(backend.close)
            entry_ctx = replace(entry_ctx, backend=backend)
        device = entry.factory(entry_ctx)
        if isinstance(device, Closeable):
            on_close(device.close)
        pci_slot = None
        if entry.bus == "pci":
            pci_slot = ctx.pci.add(device)
        else:
            bus = buses[entry.bus]
            first = entry.slots[0]
            bus.register(first.base, first.length, device)
            for slot in entry.slots[1:]:
                bus.register(slot.base, slot.length, _LaterSlot(device, slot.base - first.base))
        log.debug("%s: %s %s", entry.name, entry.bus,
                  ", ".join(map(str, entry.slots)) if entry.slots else f"slot {pci_slot}")
        placed.append(PlacedDevice(entry, device, backend, pci_slot))
    return MachineDevices(placed)
