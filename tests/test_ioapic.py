"""IOAPIC: registers, edge/level delivery, remote IRR and EOI, masking, hostile input."""

from __future__ import annotations

import logging

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvmpy.devices.bus import Bus
from kvmpy.devices.ioapic import NUM_PINS, RTE_REMOTE_IRR, IoApic

BASE = 0xFEC00000


class Wired:
    def __init__(self) -> None:
        self.messages: list[tuple] = []
        self.ioapic = IoApic(deliver=lambda *m: self.messages.append(m))
        self.bus = Bus("mmio")
        self.ioapic.register(self.bus)

    def reg_write(self, index: int, value: int) -> None:
        self.bus.write(BASE, 4, index)
        self.bus.write(BASE + 0x10, 4, value)

    def reg_read(self, index: int) -> int:
        self.bus.write(BASE, 4, index)
        return self.bus.read(BASE + 0x10, 4)

    def program(self, pin: int, vector: int, *, level=False, masked=False, logical=False,
                dest=0, mode=0, active_low=False) -> None:
        low = vector | mode << 8 | (logical << 11) | (active_low << 13) | (level << 15) | (masked << 16)
        self.reg_write(0x11 + 2 * pin, dest << 24)
        self.reg_write(0x10 + 2 * pin, low)


def test_id_version_arbitration():
    w = Wired()
    assert w.reg_read(0x01) == 0x00170011           # version 0x11, 23 = max entry
    assert w.reg_read(0x00) == 0
    w.reg_write(0x00, 0x0A000000)
    assert w.reg_read(0x00) == 0x0A000000
    assert w.reg_read(0x02) == 0x0A000000
    w.reg_write(0x01, 0)                             # read-only
    assert w.reg_read(0x01) == 0x00170011
    for pin in range(NUM_PINS):
        assert w.reg_read(0x10 + 2 * pin) == 0x10000  # masked at reset
    assert w.bus.read(BASE, 4) == 0x10 + 2 * 23     # IOREGSEL reads back


def test_linux_timer_through_pin2_edge():
    """check_timer: IRQ0 via the override to pin 2, edge, fixed, physical dest 0."""
    w = Wired()
    w.program(2, 0x30, masked=True)
    w.ioapic.set_irq(2, True)
    w.ioapic.set_irq(2, False)
    assert w.messages == []                          # masked: edge lost
    w.program(2, 0x30)
    assert w.messages == []                          # unmasking an edge pin sends nothing
    for _ in range(3):
        w.ioapic.set_irq(2, True)
        w.ioapic.set_irq(2, True)                    # no second edge while held
        w.ioapic.set_irq(2, False)
    assert w.messages == [(0, False, 0, 0x30, False)] * 3


def test_level_remote_irr_and_eoi():
    w = Wired()
    w.program(11, 0x41, level=True, active_low=True, dest=1)
    w.ioapic.set_irq(11, True)
    assert w.messages == [(1, False, 0, 0x41, True)]
    assert w.reg_read(0x10 + 22) & RTE_REMOTE_IRR
    w.ioapic.set_irq(11, True)
    assert len(w.messages) == 1                      # remote IRR blocks re-delivery
    w.ioapic.eoi(0x42)
    assert len(w.messages) == 1                      # EOI of another vector
    w.ioapic.eoi(0x41)                               # still asserted: delivered again
    assert len(w.messages) == 2
    w.ioapic.set_irq(11, False)
    w.ioapic.eoi(0x41)
    assert len(w.messages) == 2
    assert not w.reg_read(0x10 + 22) & RTE_REMOTE_IRR
    # polarity is stored, and the line's asserted state is what counts
    assert w.reg_read(0x10 + 22) & (1 << 13)


def test_level_unmask_while_asserted_delivers():
    w = Wired()
    w.program(5, 0x50, level=True, masked=True)
    w.ioapic.set_irq(5, True)
    assert w.messages == []
    w.program(5, 0x50, level=True)
    assert w.messages == [(0, False, 0, 0x50, True)]


def test_read_only_bits_and_logical_nmi_extint():
    w = Wired()
    w.reg_write(0x10, 0xFFFFFFFF)
    low = w.reg_read(0x10)
    assert not low & (1 << 12) and not low & (1 << 14)
    w.reg_write(0x11, 0xFFFFFFFF)
    assert w.reg_read(0x11) == 0xFF000000
    w.program(3, 0x00, mode=4, logical=True, dest=0x03)        # NMI
    w.program(4, 0x00, mode=7)                                  # ExtINT
    w.ioapic.set_irq(3, True)
    w.ioapic.set_irq(4, True)
    assert w.messages == [(0x03, True, 4, 0, False), (0, False, 7, 0, False)]


def test_hostile_accesses(caplog):
    caplog.set_level(logging.DEBUG)
    w = Wired()
    w.bus.write(BASE, 1, 0x10)                       # byte write of IOREGSEL is fine
    assert w.bus.read(BASE, 1) == 0x10
    for off in (0x4, 0x14, 0x20, 0x40, 0xFFF):
        for size in (1, 2, 3, 4, 8):
            w.bus.write(BASE + off, size, 0xFFFFFFFFFFFFFFFF)
            v = w.ioapic.read(off, size)
            assert 0 <= v < 1 << (8 * min(size, 8))
    w.reg_write(0x99, 1)
    assert w.reg_read(0x99) == 0
    w.ioapic.set_irq(24, True)
    w.ioapic.set_irq(-1, True)
    w.ioapic.write(0x10, 4, -1)


class IoApicMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.w = Wired()

    @rule(index=st.integers(0, 0x40), value=st.integers(0, 0xFFFFFFFF))
    def reg_write(self, index, value):
        self.w.reg_write(index, value)

    @rule(off=st.integers(0, 0x30), size=st.sampled_from([1, 2, 4, 8]), value=st.integers(0, 2**64 - 1))
    def raw_write(self, off, size, value):
        self.w.ioapic.write(off, size, value)

    @rule(index=st.integers(0, 0x40))
    def reg_read(self, index):
        assert 0 <= self.w.reg_read(index) <= 0xFFFFFFFF

    @rule(pin=st.integers(0, NUM_PINS - 1), level=st.booleans())
    def line(self, pin, level):
        before = len(self.w.messages)
        entry = self.w.ioapic.entries[pin]
        self.w.ioapic.set_irq(pin, level)
        if entry & (1 << 16) or not level:
            assert len(self.w.messages) == before

    @rule(vector=st.integers(0, 255))
    def eoi(self, vector):
        self.w.ioapic.eoi(vector)

    @invariant()
    def consistent(self):
        for e in self.w.ioapic.entries:
            assert 0 <= e < 1 << 64
            assert not e & (1 << 12)
            assert (e >> 17) & ((1 << 39) - 1) == 0      # reserved bits stay zero
            if not e & (1 << 15):
                assert not e & RTE_REMOTE_IRR


TestIoApicMachine = IoApicMachine.TestCase
TestIoApicMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])
