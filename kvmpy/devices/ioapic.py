"""The I/O APIC (82093AA-style, MMIO at 0xFEC00000), in software.

Used when the guest runs on the translator. Indirect register access through
IOREGSEL (offset 0x00) and IOWIN (offset 0x10); registers: 0x00 ID, 0x01 version
(0x170011: version 0x11, 24 redirection entries), 0x02 arbitration ID, 0x10-0x3F
the 24 redirection entries (low dword at 0x10 + 2n, high at 0x11 + 2n). Version
0x11 has no directed-EOI register: level-triggered interrupts are completed by the
LAPIC's EOI broadcast, ``eoi(vector)``.

Line convention (the same as KVM's in-kernel IOAPIC): ``set_irq(pin, level)``
receives the *asserted* state of the line, True meaning "the device requests an
interrupt". The polarity bit of the redirection entry (bit 13) is stored and read
back but does not invert anything: the platform already speaks in asserted terms,
so an active-low PCI INTx line programmed with polarity=1 works as the guest
expects.

Edge-triggered pins deliver on a rising edge of the asserted state. Level pins
deliver while asserted and unmasked when remote IRR is clear, set remote IRR,
and deliver again after the EOI for their vector if still asserted.

Delivery goes out through ``deliver(dest, logical, mode, vector, level_triggered)``
(the irqchip routes it to the LAPICs: physical/logical destinations, fixed,
lowest priority, NMI, INIT, ExtINT). Threading: entry points take ``lock``
(re-entrant, shared with the irqchip); ``deliver`` is called with it held.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from .saved_state import Restorable, StateCheck, checked

log = logging.getLogger(__name__)

NUM_PINS = 24
IOAPIC_VERSION = 0x11
REG_SELECT = 0x00
REG_WINDOW = 0x10

RTE_VECTOR = 0xFF
RTE_DELIVERY_MODE = 0x700
RTE_DEST_LOGICAL = 1 << 11
RTE_DELIVERY_STATUS = 1 << 12
RTE_POLARITY_LOW = 1 << 13
RTE_REMOTE_IRR = 1 << 14
RTE_LEVEL = 1 << 15
RTE_MASKED = 1 << 16
# guest-writable bits of an entry (delivery status and remote IRR are read-only)
RTE_WRITABLE = 0xFF << 56 | RTE_MASKED | RTE_LEVEL | RTE_POLARITY_LOW | RTE_DEST_LOGICAL | \
    RTE_DELIVERY_MODE | RTE_VECTOR


@dataclass(frozen=True)
class IoApicState:
    """The IOAPIC's registers and input lines (see kvmpy/devices/saved_state.py)."""

    ioapic_id: int
    select: int
    entries: tuple[int, ...]
    asserted: int   # bit n: pin n's line is asserted

    def validate(self) -> None:
        check = StateCheck(self)
        check.integer("ioapic_id", self.ioapic_id, 0, 0xF)
        check.integer("select", self.select, 0, 0xFF)
        check.integers("entries", self.entries, NUM_PINS, 0, (1 << 64) - 1)
        for pin, entry in enumerate(self.entries):
            check.bits(f"entries[{pin}]", entry, RTE_WRITABLE | RTE_REMOTE_IRR)
        check.integer("asserted", self.asserted, 0, (1 << NUM_PINS) - 1)


class IoApic(Restorable):
    BASE = 0xFEC00000
    MMIO_SIZE = 0x1000

    def __init__(self, deliver: Callable[[int, bool, int, int, bool], None] | None = None,
                 lock: threading.RLock | None = None, ioapic_id: int = 0) -> None:
        self._deliver = deliver or (lambda dest, logical, mode, vector, level: None)
        self._lock = lock if lock is not None else threading.RLock()
        self._initial_id = ioapic_id & 0xF
        self.delivered = [0] * NUM_PINS
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.id = self._initial_id
            self.select = 0
            self.entries = [RTE_MASKED] * NUM_PINS
            self.asserted = 0          # bitmap of asserted lines
            self.delivered = [0] * NUM_PINS

    def register(self, mmio_bus) -> None:
        mmio_bus.register(self.BASE, self.MMIO_SIZE, self)

    def state(self) -> IoApicState:
        with self._lock:
            return IoApicState(ioapic_id=self.id, select=self.select, entries=tuple(self.entries),
                               asserted=self.asserted)

    def restore(self, state: IoApicState) -> None:
        """Take over ``state`` (StateError and no change if it is malformed). Nothing is
        delivered: a level pin still waiting for its EOI has remote IRR in the state."""
        state = checked(state, IoApicState)
        with self._lock:
            self.id = state.ioapic_id
            self.select = state.select
            self.entries = list(state.entries)
            self.asserted = state.asserted

    # ---- lines ----

    def set_irq(self, pin: int, level: bool) -> None:
        if not isinstance(pin, int) or not 0 <= pin < NUM_PINS:
            log.debug("ioapic: set_irq on pin %r ignored", pin)
            return
        with self._lock:
            bit = 1 << pin
            was = bool(self.asserted & bit)
            level = bool(level)
            if level:
                self.asserted |= bit
            else:
                self.asserted &= ~bit
            entry = self.entries[pin]
            if entry & RTE_LEVEL:
                if level:
                    self._service(pin)
            elif level and not was:
                self._service(pin)

    def _service(self, pin: int) -> None:
        """Send the pin's interrupt message if its state allows it."""
        entry = self.entries[pin]
        if entry & RTE_MASKED:
            return
        level = bool(entry & RTE_LEVEL)
        if level:
            if entry & RTE_REMOTE_IRR or not self.asserted >> pin & 1:
                return
            mode = (entry >> 8) & 7
            if mode in (0, 1):          # only fixed / lowest-priority messages get an EOI
                self.entries[pin] = entry | RTE_REMOTE_IRR
        self.delivered[pin] += 1
        self._deliver((entry >> 56) & 0xFF, bool(entry & RTE_DEST_LOGICAL), (entry >> 8) & 7,
                      entry & RTE_VECTOR, level)

    def eoi(self, vector: int) -> None:
        """The LAPICs' EOI broadcast for a level-triggered ``vector``."""
        with self._lock:
            vector &= 0xFF
            for pin in range(NUM_PINS):
                entry = self.entries[pin]
                if entry & RTE_VECTOR != vector or not entry & RTE_REMOTE_IRR:
                    continue
                self.entries[pin] = entry & ~RTE_REMOTE_IRR
                if entry & RTE_LEVEL:
                    self._service(pin)

    # ---- registers ----

    def _read_register(self, index: int) -> int:
        if index == 0x00:
            return self.id << 24
        if index == 0x01:
            return (NUM_PINS - 1) << 16 | IOAPIC_VERSION
        if index == 0x02:
            return self.id << 24
        if 0x10 <= index < 0x10 + 2 * NUM_PINS:
            entry = self.entries[(index - 0x10) >> 1]
            return (entry >> 32 if index & 1 else entry) & 0xFFFFFFFF
        log.debug("ioapic: read of unimplemented register %#x", index)
        return 0

    def _write_register(self, index: int, value: int) -> None:
        if index == 0x00:
            self.id = (value >> 24) & 0xF
            return
        if index in (0x01, 0x02):
            log.debug("ioapic: write to read-only register %#x", index)
            return
        if not 0x10 <= index < 0x10 + 2 * NUM_PINS:
            log.debug("ioapic: write to unimplemented register %#x", index)
            return
        pin = (index - 0x10) >> 1
        old = self.entries[pin]
        if index & 1:
            new = (old & 0xFFFFFFFF) | (value << 32)
        else:
            new = (old & ~0xFFFFFFFF) | value
        new = (new & RTE_WRITABLE) | (old & RTE_REMOTE_IRR)
        if not new & RTE_LEVEL:
            new &= ~RTE_REMOTE_IRR      # remote IRR has no meaning for an edge pin
        self.entries[pin] = new
        # a level line that is still asserted fires once it is unmasked / made level
        if new & RTE_LEVEL and not new & RTE_MASKED and self.asserted >> pin & 1:
            self._service(pin)

    def read(self, offset: int, size: int) -> int:
        mask = (1 << (8 * min(max(size, 1), 8))) - 1 if isinstance(size, int) else 0xFFFFFFFF
        if not isinstance(offset, int) or not 0 <= offset < self.MMIO_SIZE or size not in (1, 2, 4, 8):
            log.debug("ioapic: bad read offset=%r size=%r", offset, size)
            return mask
        with self._lock:
            if offset & ~3 == REG_SELECT:
                value = self.select
            elif offset & ~3 == REG_WINDOW:
                value = self._read_register(self.select)
            else:
                log.debug("ioapic: read at unimplemented offset %#x", offset)
                return 0
            return (value >> (8 * (offset & 3))) & mask & 0xFFFFFFFF

    def write(self, offset: int, size: int, value: int) -> None:
        if not isinstance(offset, int) or size not in (1, 2, 4, 8):
            log.debug("ioapic: bad write offset=%r size=%r", offset, size)
            return
        value = int(value) & ((1 << (8 * size)) - 1) & 0xFFFFFFFF
        with self._lock:
            if offset == REG_SELECT:
                self.select = value & 0xFF
            elif offset == REG_WINDOW and size == 4:
                self._write_register(self.select, value)
            else:
                log.debug("ioapic: write offset=%#x size=%d dropped", offset, size)

    def entry(self, pin: int) -> int:
        with self._lock:
            return self.entries[pin]
