"""Address-range buses for port I/O and MMIO exits, and what a bus device is.

A bus device (``BusDevice``) is any object with ``read(offset, size) -> int`` and
``write(offset, size, value)``; offsets are relative to the range the device
was registered at. Devices never see the vCPU or KVM. Unclaimed reads return
all ones (as on real hardware: a floating bus) and unclaimed writes are dropped.

A device may also be ``Resettable`` (system reset puts it back to power-on
state) and ``Closeable`` (it holds host resources: timers, files, threads).
Both are optional: the machine checks them once, when it places the device.

Where a device sits is declared once, in its own module, as a ``PortSlot`` or
``MmioSlot`` (base, length, IRQ); the machine's device table and the ACPI
tables both read that constant.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

log = logging.getLogger(__name__)

FOUND_KEPT = 4096       # claimed addresses whose device Bus.find remembers


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> int:
        """``size`` bytes (1, 2, 4 or 8) at ``offset`` in the device's range. A value
        the guest must not see (bad offset or size) is answered as all ones."""

    def write(self, offset: int, size: int, value: int) -> None:
        """Guest input: a bad offset, size or value is logged and ignored, never raised."""


@runtime_checkable
class RegisterAccessors(Protocol):
    """Optional, for a device whose registers each have their own read and write."""

    def register_accessors(self, offset: int) -> tuple[Callable[[int, int], int], Callable[[int, int, int], None]]:
        """The ``(read, write)`` pair that serves ``offset``, called as the device's own
        ``read``/``write`` are (with the offset); they must behave exactly as those do
        at that offset, for every size and value, whatever state the device is in."""


@runtime_checkable
class BurstWriter(Protocol):
    """Optional, for a device that takes a run of byte writes to one register at once."""

    def write_burst(self, offset: int, data: bytes) -> None:
        """Exactly what ``len(data)`` one-byte writes of ``data`` at ``offset``, in
        order, would do."""


@runtime_checkable
class Resettable(Protocol):
    def reset(self) -> None:
        """Back to the power-on state (system_reset, a guest reset)."""


@runtime_checkable
class Closeable(Protocol):
    def close(self) -> None:
        """Release host resources; called once, when the machine closes."""


@dataclass(frozen=True)
class AddressSlot:
    """Where a device answers: ``length`` bytes from ``base``, and the ISA IRQ
    (GSI) it raises, if any."""

    base: int
    length: int
    irq: int | None = None

    @property
    def end(self) -> int:
        """One past the last address."""
        return self.base + self.length

    def overlaps(self, other: "AddressSlot") -> bool:
        return self.base < other.end and other.base < self.end

    def __str__(self) -> str:
        irq = f" IRQ {self.irq}" if self.irq is not None else ""
        return f"{self.base:#x}-{self.end - 1:#x}{irq}"


class PortSlot(AddressSlot):
    """A range of I/O ports."""


class MmioSlot(AddressSlot):
    """A range of guest physical addresses decoded as MMIO."""


# A claimed address as the vCPU loop calls it: the device's read and write, and
# the address's offset in the device's range.
Accessor = tuple[Callable[[int, int], int], Callable[[int, int, int], None], int]


class BusError(Exception):
    pass


class BusListener(Protocol):
    """Told of every change to a bus's map (an accelerator that answers unclaimed
    accesses without asking the bus keeps its own copy of the map current)."""

    def bus_changed(self, bus: "Bus") -> None:
        """After a range was registered or unregistered, on the thread that did it
        (a vCPU moving a BAR, the machine placing its devices), before that thread
        goes on: a vCPU re-entering the guest after a BAR write already finds the
        new map."""


class Bus:
    def __init__(self, name: str) -> None:
        self.name = name
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, BusDevice]] = []  # (base, end, device), sorted
        self._unclaimed_logged: set[int] = set()
        self._listeners: list[BusListener] = []
        # find()'s answers for claimed addresses, dropped whenever the map changes:
        # a guest goes back to the same few registers, and a dict beats bisecting.
        self._found: dict[int, tuple[int, BusDevice]] = {}
        # The same per address as the device's own methods and the offset to give
        # them, for the vCPU loop's fast path (``accessor``); replaced, never
        # emptied, on a change, so the loop reads the attribute once per access.
        self.accessors: dict[int, Accessor] = {}

    def add_listener(self, listener: BusListener) -> None:
        """Subscribe ``listener``; it is told once at once, so it starts from the map as it is."""
        self._listeners.append(listener)
        listener.bus_changed(self)

    def remove_listener(self, listener: BusListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def claimed_ranges(self) -> list[tuple[int, int]]:
        """(base, end) of every registered range, sorted by base; end is exclusive."""
        return [(base, end) for base, end, _ in self._entries]

    def _changed(self) -> None:
        self._found = {}
        self.accessors = {}
        for listener in list(self._listeners):
            listener.bus_changed(self)

    def register(self, base: int, length: int, device: BusDevice) -> None:
        end = base + length
        if length <= 0:
            raise BusError(f"{self.name}: empty range at {base:#x}")
        for b, e, d in self._entries:
            if base < e and b < end:
                raise BusError(f"{self.name}: {base:#x}-{end - 1:#x} overlaps {b:#x}-{e - 1:#x} ({d!r})")
        self._entries.append((base, end, device))
        self._entries.sort(key=lambda t: t[0])
        self._starts = [t[0] for t in self._entries]
        self._changed()

    def unregister(self, base: int) -> None:
        self._entries = [t for t in self._entries if t[0] != base]
        self._starts = [t[0] for t in self._entries]
        self._changed()

    def find(self, addr: int) -> tuple[int, BusDevice] | None:
        found = self._found
        hit = found.get(addr)
        if hit is not None:
            return hit
        i = bisect_right(self._starts, addr) - 1
        if i >= 0:
            base, end, dev = self._entries[i]
            if addr < end:
                # Bounded: a guest sweeping a large MMIO range must not grow it for good.
                if len(found) < FOUND_KEPT:
                    found[addr] = (base, dev)
                return base, dev
        return None

    def accessor(self, addr: int) -> Accessor | None:
        """``(read, write, offset)`` of the device claiming ``addr``, kept in
        ``accessors``; None where no device does."""
        # Taken before the lookup: should the map change meanwhile, the answer goes
        # to the dict being dropped, never into its successor.
        accessors = self.accessors
        hit = self.find(addr)
        if hit is None:
            return None
        base, dev = hit
        offset = addr - base
        # A device with a method per register hands the loop that register's own
        # pair, saving its dispatch on every access (RegisterAccessors).
        if isinstance(dev, RegisterAccessors):
            read, write = dev.register_accessors(offset)
            acc = (read, write, offset)
        else:
            acc = (dev.read, dev.write, offset)
        if len(accessors) < FOUND_KEPT:
            accessors[addr] = acc
        return acc

    # read and write go through the same per-address accessors as the vCPU loop's
    # fast path: the general path, the translator's exits and the coalesced ring's
    # drain then cost one dict lookup and the register's own method too.
    def read(self, addr: int, size: int) -> int:
        acc = self.accessors.get(addr) or self.accessor(addr)
        if acc is None:
            self._note_unclaimed(addr, "read")
            return (1 << (8 * size)) - 1
        return acc[0](acc[2], size)

    def write(self, addr: int, size: int, value: int) -> None:
        acc = self.accessors.get(addr) or self.accessor(addr)
        if acc is None:
            self._note_unclaimed(addr, "write")
            return
        acc[1](acc[2], size, value)

    def write_burst(self, addr: int, data: bytes) -> None:
        """``len(data)`` byte writes to ``addr``, in order: at once where the device
        takes bursts (``write_burst(offset, data)``, e.g. the UART's THR), else one by one."""
        hit = self.find(addr)
        if hit is None:
            self._note_unclaimed(addr, "write")
            return
        base, dev = hit
        if isinstance(dev, BurstWriter):
            dev.write_burst(addr - base, data)
            return
        for value in data:
            dev.write(addr - base, 1, value)

    def _note_unclaimed(self, addr: int, what: str) -> None:
        if addr not in self._unclaimed_logged and len(self._unclaimed_logged) < 256:
            self._unclaimed_logged.add(addr)
            log.debug("%s: unclaimed %s at %#x", self.name, what, addr)
