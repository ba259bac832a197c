"""8259A pair: Linux's init sequence, priorities, EOIs, cascade, ELCR, hostile input."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvmpy.devices.bus import Bus
from kvmpy.devices.pic8259 import Pic8259Pair


class Wired:
    """A PIC pair on a real port bus, with its INTR line recorded."""

    def __init__(self) -> None:
        self.intr_changes: list[bool] = []
        self.pic = Pic8259Pair(on_intr=self.intr_changes.append)
        self.bus = Bus("pio")
        self.pic.register(self.bus)

    def out(self, port: int, value: int) -> None:
        self.bus.write(port, 1, value)

    def inb(self, port: int) -> int:
        return self.bus.read(port, 1)

    def linux_init(self, auto_eoi: bool = False) -> None:
        """arch/x86/kernel/i8259.c init_8259A (vectors 0x30/0x38, cascade on IRQ2)."""
        self.out(0x21, 0xFF)
        self.out(0xA1, 0xFF)
        self.out(0x20, 0x11)                 # ICW1: edge, cascade, ICW4 needed
        self.out(0x21, 0x30)                 # ICW2: IRQ0-7 -> 0x30-0x37
        self.out(0x21, 1 << 2)               # ICW3: slave on IR2
        self.out(0x21, 0x03 if auto_eoi else 0x01)
        self.out(0xA0, 0x11)
        self.out(0xA1, 0x38)
        self.out(0xA1, 0x02)                 # ICW3: slave id 2
        self.out(0xA1, 0x01)                 # slave never auto-EOI in Linux
        self.out(0x21, 0xFB)                 # everything masked but the cascade
        self.out(0xA1, 0xFF)

    def enable(self, irq: int) -> None:
        port = 0x21 if irq < 8 else 0xA1
        self.out(port, self.inb(port) & ~(1 << (irq & 7)))

    def mask_and_ack(self, irq: int) -> None:
        """i8259.c mask_and_ack_8259A: mask, then specific EOIs (slave first)."""
        if irq & 8:
            self.out(0xA1, self.inb(0xA1) | 1 << (irq & 7))
            self.out(0xA0, 0x60 + (irq & 7))
            self.out(0x20, 0x60 + 2)
        else:
            self.out(0x21, self.inb(0x21) | 1 << irq)
            self.out(0x20, 0x60 + irq)

    def isr(self, port: int) -> int:
        self.out(port, 0x0B)
        v = self.inb(port)
        self.out(port, 0x0A)
        return v


def test_linux_probe_and_init():
    w = Wired()
    # probe_8259A: the mask register must read back what was written
    w.out(0xA1, 0xFF)
    w.out(0x21, 0xFB)
    assert w.inb(0x21) == 0xFB
    w.linux_init()
    assert w.pic.master.irq_base == 0x30 and w.pic.slave.irq_base == 0x38
    assert w.inb(0x21) == 0xFB and w.inb(0xA1) == 0xFF
    assert not w.pic.intr


def test_irq_ack_eoi_cycle():
    w = Wired()
    w.linux_init()
    w.enable(1)
    w.pic.set_irq(1, True)
    assert w.pic.intr and w.intr_changes[-1] is True
    w.out(0x20, 0x0A)                        # OCW3: read IRR
    assert w.inb(0x20) & 0x02
    assert w.pic.acknowledge() == 0x31
    assert not w.pic.intr
    assert w.isr(0x20) == 0x02
    w.pic.set_irq(1, False)
    w.mask_and_ack(1)
    assert w.isr(0x20) == 0
    assert w.inb(0x21) & 0x02                # masked by mask_and_ack


def test_priority_and_nesting():
    w = Wired()
    w.linux_init()
    w.out(0x21, 0x00)
    w.pic.set_irq(5, True)
    w.pic.set_irq(3, True)
    assert w.pic.acknowledge() == 0x33       # lower IRQ number wins
    assert not w.pic.intr                    # IRQ5 waits behind IRQ3 in service
    w.out(0x20, 0x20)                        # non-specific EOI clears IRQ3
    assert w.pic.intr
    assert w.pic.acknowledge() == 0x35
    w.pic.set_irq(1, False)
    w.pic.set_irq(1, True)                   # a higher priority IRQ nests over IRQ5
    assert w.pic.intr
    assert w.pic.acknowledge() == 0x31
    assert w.isr(0x20) == (1 << 1) | (1 << 5)
    w.out(0x20, 0x20)                        # non-specific EOI: highest priority first
    assert w.isr(0x20) == 1 << 5


def test_cascade_slave_irq():
    w = Wired()
    w.linux_init()
    w.enable(12)
    w.enable(14)
    w.pic.set_irq(14, True)
    w.pic.set_irq(12, True)
    assert w.pic.intr
    assert w.pic.acknowledge() == 0x38 + 4
    assert w.isr(0x20) == 0x04 and w.isr(0xA0) == 0x10
    assert not w.pic.intr                    # master IR2 in service blocks the slave
    w.mask_and_ack(12)
    # IRQ14 was still pending on the slave: it must come through without a new edge
    assert w.pic.intr
    assert w.pic.acknowledge() == 0x38 + 6


def test_spurious_irq7_and_irq15():
    w = Wired()
    w.linux_init()
    w.enable(4)
    w.pic.set_irq(4, True)
    w.out(0x21, 0xFF)                        # masked between INTR and INTA
    assert w.pic.acknowledge() == 0x37
    assert w.isr(0x20) == 0                  # Linux's spurious check: ISR7 clear
    w.linux_init()
    w.enable(10)
    w.pic.set_irq(10, True)
    w.out(0xA1, 0xFF)
    # the master already latched IR2 only if the slave still presented something
    assert w.pic.acknowledge() == 0x37
    w.out(0xA1, 0xFB)
    w.out(0xA1, 0xFF & ~(1 << 2))
    assert w.pic.acknowledge() == 0x3A
    assert w.isr(0xA0) == 0x04


def test_auto_eoi_sets_no_isr():
    w = Wired()
    w.linux_init(auto_eoi=True)
    w.enable(0)
    w.pic.set_irq(0, True)
    assert w.pic.acknowledge() == 0x30
    assert w.isr(0x20) == 0
    w.pic.set_irq(0, False)
    w.pic.set_irq(0, True)
    assert w.pic.acknowledge() == 0x30       # no EOI needed


def test_edge_needs_new_edge_level_follows_line():
    w = Wired()
    w.linux_init()
    w.out(0x21, 0x00)
    w.out(0xA1, 0x00)
    w.pic.set_irq(3, True)
    assert w.pic.acknowledge() == 0x33
    w.out(0x20, 0x63)
    assert not w.pic.intr                    # edge: line still high, no new request
    # ELCR: IRQ9 level (ACPI SCI), bits of IRQ0/1/2/8/13 are not writable
    w.out(0x4D0, 0xFF)
    w.out(0x4D1, 0xFF)
    assert w.inb(0x4D0) == 0xF8 and w.inb(0x4D1) == 0xDE
    assert w.pic.intr                        # IRQ3's line is still high, and now level
    w.pic.set_irq(3, False)
    assert not w.pic.intr
    w.out(0x4D0, 0x00)
    w.pic.set_irq(9, True)
    assert w.pic.acknowledge() == 0x39
    w.out(0xA0, 0x61)
    w.out(0x20, 0x62)
    assert w.pic.intr                        # still asserted: requested again
    w.pic.set_irq(9, False)
    assert not w.pic.intr                    # level dropped: request withdrawn


def test_rotation_and_set_priority():
    w = Wired()
    w.linux_init()
    w.out(0x21, 0x00)
    w.out(0x20, 0xC0 | 4)                    # OCW2 set priority: IRQ4 lowest, IRQ5 highest
    w.pic.set_irq(3, True)
    w.pic.set_irq(6, True)
    assert w.pic.acknowledge() == 0x36
    w.out(0x20, 0xA0)                        # rotate on non-specific EOI: IRQ6 lowest
    assert w.pic.acknowledge() == 0x33


def test_poll_mode():
    w = Wired()
    w.linux_init()
    w.out(0x21, 0x00)
    w.out(0x20, 0x0C)                        # OCW3 poll
    assert w.inb(0x20) == 0x00               # nothing pending
    w.pic.set_irq(5, True)
    w.out(0x20, 0x0C)
    assert w.inb(0x20) == 0x85
    assert w.isr(0x20) == 0x20


def test_special_mask_mode():
    w = Wired()
    w.linux_init()
    w.out(0x21, 0x00)
    w.pic.set_irq(2 + 1, True)
    assert w.pic.acknowledge() == 0x33
    w.pic.set_irq(6, True)
    assert not w.pic.intr
    w.out(0x21, 0x08)                        # mask IRQ3 (in service)
    w.out(0x20, 0x68)                        # OCW3: set special mask
    assert w.pic.intr                        # lower priority IRQ6 now allowed
    assert w.pic.acknowledge() == 0x36


@pytest.mark.parametrize("port", [0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1])
def test_odd_sizes_do_not_raise(port, caplog):
    w = Wired()
    caplog.set_level(logging.DEBUG)
    for size in (2, 4, 8):
        w.bus.write(port, size, 0xFFFFFFFF)
        assert 0 <= w.bus.read(port, size) < 1 << (8 * size)
    w.pic.port_write("master", 7, 1, 0x11)
    assert w.pic.port_read("slave", -1, 1) == 0xFF
    w.pic.set_irq(2, True)
    w.pic.set_irq(99, True)


class PicMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.w = Wired()

    @rule(port=st.sampled_from([0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1]), value=st.integers(0, 255))
    def write(self, port, value):
        self.w.out(port, value)

    @rule(port=st.sampled_from([0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1]))
    def read(self, port):
        assert 0 <= self.w.inb(port) <= 0xFF

    @rule()
    def init(self):
        self.w.linux_init()

    @rule(irq=st.integers(0, 15), level=st.booleans())
    def line(self, irq, level):
        self.w.pic.set_irq(irq, level)

    @rule()
    def ack(self):
        pic = self.w.pic
        m = pic.master
        irq = m.pending_irq()
        isr_before = m.isr
        vector = pic.acknowledge()
        if irq < 0:
            assert vector == m.irq_base + 7
            assert m.isr == isr_before
        elif irq != 2:
            assert vector == m.irq_base + irq
            if not m.auto_eoi:
                assert m.isr == isr_before | 1 << irq
        else:
            assert pic.slave.irq_base <= vector <= pic.slave.irq_base + 7

    @invariant()
    def consistent(self):
        pic = self.w.pic
        assert pic.intr == (pic.master.pending_irq() >= 0)
        for chip in (pic.master, pic.slave):
            assert 0 <= chip.irr <= 0xFF and 0 <= chip.isr <= 0xFF and 0 <= chip.imr <= 0xFF
            assert chip.elcr & ~chip.elcr_mask == 0
        # the cascade input mirrors the slave's output
        assert bool(pic.master.irr & 4) == (pic.slave.pending_irq() >= 0)
        # what INTR presents is the highest-priority unmasked request
        irq = pic.master.pending_irq()
        if irq >= 0:
            req = pic.master.irr & ~pic.master.imr
            assert req >> irq & 1
            order = [(p + pic.master.priority_add) & 7 for p in range(8)]
            assert next(i for i in order if req >> i & 1) == irq


TestPicMachine = PicMachine.TestCase
TestPicMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])
