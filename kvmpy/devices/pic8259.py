"""The PC's cascaded pair of 8259A programmable interrupt controllers, in software.

Used when the guest runs on the translator (under KVM the in-kernel irqchip has
them). Bus registration (port, length, view):

    0x20   2  pair.master_ports   command / data of the master (IRQ 0-7)
    0xA0   2  pair.slave_ports    command / data of the slave (IRQ 8-15, on master IRQ2)
    0x4D0  2  pair.elcr_ports     edge/level control registers (ELCR1, ELCR2)

Behaviour follows the 8259A datasheet as Linux (arch/x86/kernel/i8259.c) uses it:
ICW1-ICW4, OCW1 (mask), OCW2 (non-specific / specific / rotating EOI, set
priority), OCW3 (IRR/ISR read select, poll, special mask), auto-EOI (with
rotation), special fully nested mode on the master, spurious IRQ7/IRQ15 when an
acknowledge finds nothing left to serve.

Edge/level: a line whose ELCR bit is 0 latches IRR on a rising edge (the bit stays
set after the line drops, until acknowledged); an ELCR-level line follows the line.
The slave's INTR is wired to master IRQ2 as a level input (IRR2 mirrors "the slave
has something to present"), so a second slave interrupt pending after an EOI is not
lost for want of a fresh edge.

Output: ``on_intr(level)`` is called whenever the INTR line changes; the CPU side
(through the LAPIC's LINT0 ExtINT, or directly when the LAPIC is disabled) calls
``acknowledge()`` for the vector (the INTA cycle). Nothing here knows about CPUs.

Threading: every entry point takes ``lock`` (a re-entrant lock shared with the
rest of the irqchip, or a private one); ``on_intr`` is called with it held, so it
must not block.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from .saved_state import Restorable, StateCheck, checked

log = logging.getLogger(__name__)

CASCADE_IRQ = 2
MASTER_ELCR_MASK = 0xF8   # IRQ0, 1, 2 are edge only on a PC
SLAVE_ELCR_MASK = 0xDE    # IRQ8 and IRQ13 are edge only


@dataclass(frozen=True)
class Pic8259State:
    """One 8259A's registers and input levels (see kvmpy/devices/saved_state.py)."""

    line: int
    irr: int
    isr: int
    imr: int
    irq_base: int
    priority_add: int
    read_isr: bool
    poll: bool
    special_mask: bool
    init_state: int
    needs_icw4: bool
    single: bool
    auto_eoi: bool
    rotate_on_auto_eoi: bool
    special_fully_nested: bool
    elcr: int

    def validate(self) -> None:
        check = StateCheck(self)
        for name, value in (("line", self.line), ("irr", self.irr), ("isr", self.isr),
                            ("imr", self.imr), ("elcr", self.elcr)):
            check.integer(name, value, 0, 0xFF)
        check.bits("irq_base", self.irq_base, 0xF8)
        check.integer("priority_add", self.priority_add, 0, 7)
        check.integer("init_state", self.init_state, 0, 3)
        for name, flag in (("read_isr", self.read_isr), ("poll", self.poll),
                           ("special_mask", self.special_mask), ("needs_icw4", self.needs_icw4),
                           ("single", self.single), ("auto_eoi", self.auto_eoi),
                           ("rotate_on_auto_eoi", self.rotate_on_auto_eoi),
                           ("special_fully_nested", self.special_fully_nested)):
            check.flag(name, flag)


@dataclass(frozen=True)
class Pic8259PairState:
    master: Pic8259State
    slave: Pic8259State

    def validate(self) -> None:
        checked(self.master, Pic8259State)
        checked(self.slave, Pic8259State)
        check = StateCheck(self)
        if self.master.elcr & ~MASTER_ELCR_MASK:
            raise check.fail("master.elcr", f"{self.master.elcr:#x}: IRQ 0-2 are edge only")
        if self.slave.elcr & ~SLAVE_ELCR_MASK:
            raise check.fail("slave.elcr", f"{self.slave.elcr:#x}: IRQ 8 and 13 are edge only")


def _size_mask(size: int) -> int:
    return (1 << (8 * min(max(size, 1), 8))) - 1


class Pic8259:
    """One 8259A: state and the datasheet's register semantics."""

    def __init__(self, name: str, elcr_mask: int, is_master: bool) -> None:
        self.name = name
        self.elcr_mask = elcr_mask
        self.is_master = is_master
        self.elcr = 0
        self.reset()

    def reset(self) -> None:
        """Power-on state; ICW1 also returns here (except ELCR, which is outside the chip)."""
        self.line = 0               # current input levels, for edge detection
        self.irr = 0
        self.isr = 0
        self.imr = 0
        self.irq_base = 0
        self.priority_add = 0       # the IRQ with the lowest priority is priority_add - 1
        self.read_isr = False       # OCW3 RR/RIS: which register a command-port read returns
        self.poll = False
        self.special_mask = False
        self.init_state = 0         # 0 = operational; 1..3 = waiting for ICW2..ICW4
        self.needs_icw4 = False
        self.single = False
        self.auto_eoi = False
        self.rotate_on_auto_eoi = False
        self.special_fully_nested = False

    def state(self) -> Pic8259State:
        return Pic8259State(
            line=self.line, irr=self.irr, isr=self.isr, imr=self.imr, irq_base=self.irq_base,
            priority_add=self.priority_add, read_isr=self.read_isr, poll=self.poll,
            special_mask=self.special_mask, init_state=self.init_state, needs_icw4=self.needs_icw4,
            single=self.single, auto_eoi=self.auto_eoi, rotate_on_auto_eoi=self.rotate_on_auto_eoi,
            special_fully_nested=self.special_fully_nested, elcr=self.elcr)

    def restore(self, state: Pic8259State) -> None:
        """Take over ``state``; the pair re-evaluates INTR (Pic8259Pair.restore)."""
        state = checked(state, Pic8259State)
        if state.elcr & ~self.elcr_mask:
            raise StateCheck(state).fail("elcr", f"{state.elcr:#x} outside {self.elcr_mask:#x}")
        self.line, self.irr, self.isr, self.imr = state.line, state.irr, state.isr, state.imr
        self.irq_base = state.irq_base
        self.priority_add = state.priority_add
        self.read_isr = state.read_isr
        self.poll = state.poll
        self.special_mask = state.special_mask
        self.init_state = state.init_state
        self.needs_icw4 = state.needs_icw4
        self.single = state.single
        self.auto_eoi = state.auto_eoi
        self.rotate_on_auto_eoi = state.rotate_on_auto_eoi
        self.special_fully_nested = state.special_fully_nested
        self.elcr = state.elcr

    # ---- priority resolution ----

    def _priority(self, mask: int) -> int:
        """Priority (0 = highest) of the best IRQ in ``mask``, 8 if none."""
        if not mask & 0xFF:
            return 8
        for p in range(8):
            if mask & (1 << ((p + self.priority_add) & 7)):
                return p
        return 8

    def pending_irq(self) -> int:
        """The IRQ this chip would present on INTR now, or -1."""
        req = self._priority(self.irr & ~self.imr)
        if req == 8:
            return -1
        in_service = self.isr
        if self.special_mask:
            in_service &= ~self.imr
        if self.special_fully_nested and self.is_master:
            # a slave in service must not block higher-priority slave IRQs
            in_service &= ~(1 << CASCADE_IRQ)
        if req < self._priority(in_service):
            return (req + self.priority_add) & 7
        return -1

    def set_line(self, irq: int, level: bool) -> None:
        bit = 1 << irq
        if self.elcr & bit:
            if level:
                self.irr |= bit
                self.line |= bit
            else:
                self.irr &= ~bit
                self.line &= ~bit
        else:
            if level:
                if not self.line & bit:
                    self.irr |= bit
                self.line |= bit
            else:
                self.line &= ~bit

    def intack(self, irq: int) -> None:
        bit = 1 << irq
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= bit
        if not self.elcr & bit:
            self.irr &= ~bit

    # ---- register interface ----

    def write_command(self, value: int) -> None:
        value &= 0xFF
        if value & 0x10:                       # ICW1
            elcr, line = self.elcr, self.line
            self.reset()
            self.elcr, self.line = elcr, line  # the inputs are outside the chip
            self.irr = line & elcr             # level lines still asserted stay requested
            self.init_state = 1
            self.needs_icw4 = bool(value & 0x01)
            self.single = bool(value & 0x02)
            if value & 0x08:
                log.debug("%s: ICW1 LTIM ignored (ELCR decides edge/level)", self.name)
        elif value & 0x08:                     # OCW3
            if value & 0x04:
                self.poll = True
            if value & 0x02:
                self.read_isr = bool(value & 0x01)
            if value & 0x40:
                self.special_mask = bool(value & 0x20)
        else:                                  # OCW2
            cmd = value >> 5
            if cmd in (1, 5):                  # non-specific EOI (5: and rotate)
                p = self._priority(self.isr)
                if p != 8:
                    irq = (p + self.priority_add) & 7
                    self.isr &= ~(1 << irq)
                    if cmd == 5:
                        self.priority_add = (irq + 1) & 7
            elif cmd == 3:                     # specific EOI
                self.isr &= ~(1 << (value & 7))
            elif cmd == 7:                     # rotate on specific EOI
                irq = value & 7
                self.isr &= ~(1 << irq)
                self.priority_add = (irq + 1) & 7
            elif cmd == 6:                     # set priority: IRQ value&7 becomes lowest
                self.priority_add = ((value & 7) + 1) & 7
            elif cmd == 4:
                self.rotate_on_auto_eoi = True
            elif cmd == 0:
                self.rotate_on_auto_eoi = False
            # cmd 2: no operation

    def write_data(self, value: int) -> None:
        value &= 0xFF
        if self.init_state == 0:
            self.imr = value                   # OCW1
        elif self.init_state == 1:             # ICW2
            self.irq_base = value & 0xF8
            if self.single:
                self.init_state = 3 if self.needs_icw4 else 0
            else:
                self.init_state = 2
        elif self.init_state == 2:             # ICW3: cascade wiring is fixed on a PC
            self.init_state = 3 if self.needs_icw4 else 0
        else:                                  # ICW4
            if not value & 0x01:
                log.debug("%s: ICW4 without 8086 mode (%#x): treated as 8086", self.name, value)
            self.auto_eoi = bool(value & 0x02)
            self.special_fully_nested = bool(value & 0x10)
            self.init_state = 0

    def read_data(self) -> int:
        return self.imr

    def read_command_register(self) -> int:
        return self.isr if self.read_isr else self.irr


class _PortView:
    """A two-port window onto the pair (so each range registers on the bus alone)."""

    def __init__(self, pair: "Pic8259Pair", which: str) -> None:
        self._pair = pair
        self._which = which

    def read(self, offset: int, size: int) -> int:
        return self._pair.port_read(self._which, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._pair.port_write(self._which, offset, size, value)

    def __repr__(self) -> str:
        return f"Pic8259Pair.{self._which}"


class Pic8259Pair(Restorable):
    """Master + slave 8259A as wired on a PC, plus the ELCR ports."""

    MASTER_PORT = 0x20
    SLAVE_PORT = 0xA0
    ELCR_PORT = 0x4D0

    def __init__(self, on_intr: Callable[[bool], None] | None = None,
                 lock: threading.RLock | None = None) -> None:
        self._on_intr = on_intr or (lambda level: None)
        self._lock = lock if lock is not None else threading.RLock()
        self.master = Pic8259("pic-master", MASTER_ELCR_MASK, is_master=True)
        self.slave = Pic8259("pic-slave", SLAVE_ELCR_MASK, is_master=False)
        self.intr = False
        self.master_ports = _PortView(self, "master")
        self.slave_ports = _PortView(self, "slave")
        self.elcr_ports = _PortView(self, "elcr")

    def register(self, pio_bus) -> None:
        pio_bus.register(self.MASTER_PORT, 2, self.master_ports)
        pio_bus.register(self.SLAVE_PORT, 2, self.slave_ports)
        pio_bus.register(self.ELCR_PORT, 2, self.elcr_ports)

    def reset(self) -> None:
        with self._lock:
            for chip in (self.master, self.slave):
                chip.reset()
                chip.elcr = 0
            self._update()

    # ---- lines in, INTR out ----

    def set_irq(self, irq: int, level: bool) -> None:
        """Drive ISA IRQ ``irq`` (0-15). IRQ2 is the cascade and cannot be driven."""
        if not isinstance(irq, int) or not 0 <= irq < 16 or irq == CASCADE_IRQ:
            log.debug("pic: set_irq(%r) ignored", irq)
            return
        with self._lock:
            if irq < 8:
                self.master.set_line(irq, bool(level))
            else:
                self.slave.set_line(irq - 8, bool(level))
            self._update()

    def _update(self) -> None:
        # the cascade input is a level mirror of the slave's INTR
        cascade = 1 << CASCADE_IRQ
        if self.slave.pending_irq() >= 0:
            self.master.irr |= cascade
        else:
            self.master.irr &= ~cascade
        intr = self.master.pending_irq() >= 0
        if intr != self.intr:
            self.intr = intr
            self._on_intr(intr)

    def acknowledge(self) -> int:
        """The INTA cycle: the vector the CPU gets now (spurious IRQ7/15 if nothing)."""
        with self._lock:
            return self._acknowledge_locked()

    def _acknowledge_locked(self) -> int:
        irq = self.master.pending_irq()
        if irq < 0:
            vector = self.master.irq_base + 7          # spurious IRQ7: no ISR bit
        elif irq == CASCADE_IRQ:
            self.master.intack(irq)
            sirq = self.slave.pending_irq()
            if sirq >= 0:
                self.slave.intack(sirq)
                vector = self.slave.irq_base + sirq
            else:
                vector = self.slave.irq_base + 7       # spurious IRQ15
        else:
            self.master.intack(irq)
            vector = self.master.irq_base + irq
        self._update()
        return vector

    def _poll(self, chip: Pic8259) -> int:
        """OCW3 poll: the read is the acknowledge; bit 7 says whether there was one."""
        chip.poll = False
        if chip is self.master:
            irq = self.master.pending_irq()
            if irq < 0:
                return 0
            self._acknowledge_locked()
            return 0x80 | irq
        irq = self.slave.pending_irq()
        if irq < 0:
            return 0
        self.slave.intack(irq)
        self._update()
        return 0x80 | irq

    # ---- ports ----

    def port_read(self, which: str, offset: int, size: int) -> int:
        if offset not in (0, 1) or size != 1:
            log.debug("pic %s: %d-byte read at offset %r", which, size, offset)
            if offset not in (0, 1):
                return _size_mask(size)
        with self._lock:
            if which == "elcr":
                value = self.master.elcr if offset == 0 else self.slave.elcr
            else:
                chip = self.master if which == "master" else self.slave
                if chip.poll:
                    value = self._poll(chip)
                elif offset == 0:
                    value = chip.read_command_register()
                else:
                    value = chip.read_data()
        return value & 0xFF

    def port_write(self, which: str, offset: int, size: int, value: int) -> None:
        if offset not in (0, 1):
            log.debug("pic %s: write at offset %r dropped", which, offset)
            return
        if size != 1:
            log.debug("pic %s: %d-byte write, using the low byte", which, size)
        value = int(value) & 0xFF
        with self._lock:
            if which == "elcr":
                chip = self.master if offset == 0 else self.slave
                chip.elcr = value & chip.elcr_mask
                # a line switched to level keeps IRR in step with its current level
                chip.irr = (chip.irr & ~chip.elcr) | (chip.line & chip.elcr)
            else:
                chip = self.master if which == "master" else self.slave
                if offset == 0:
                    chip.write_command(value)
                else:
                    chip.write_data(value)
            self._update()

    # ---- saved state ----

    def state(self) -> Pic8259PairState:
        with self._lock:
            return Pic8259PairState(master=self.master.state(), slave=self.slave.state())

    def restore(self, state: Pic8259PairState) -> None:
        """Take over ``state`` (StateError and no change if it is malformed)."""
        state = checked(state, Pic8259PairState)
        with self._lock:
            self.master.restore(state.master)
            self.slave.restore(state.slave)
            self._update()
