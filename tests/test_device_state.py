"""Saved device state: every stateful platform device hands out ``state()`` and
takes it back with ``restore(state)`` on a freshly built instance.

For each device, Hypothesis drives an original with random register traffic, host
input and time on a fake clock, then checks that
  (a) a fresh instance restored from ``state()`` hands out an equal state and
      drives its interrupt lines the same;
  (b) the original and the restored device answer a further random sequence
      identically: read values, IRQ line changes, output bytes, timer firings;
  (c) malformed states are refused with StateError and leave the device as it
      was, and a state with any one field replaced by a stray value is either
      refused or leaves a device that still takes any traffic without failing.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.devices.acpi_pm import SLP_EN, AcpiPm
from kvmpy.devices.bus import Bus
from kvmpy.devices.i8042 import COMMAND_PORT, DATA_PORT, MAX_SAVED_QUEUE, I8042
from kvmpy.devices.ioapic import NUM_PINS, IoApic
from kvmpy.devices.timers import TimerWheel
from kvmpy.devices.lapic import (APIC_BASE_ENABLE, APIC_DEFAULT_BASE, REG_EOI, REG_ESR, REG_ICR_HI,
                                 REG_ICR_LO, REG_ID, REG_LDR, REG_DFR, REG_LVT_ERROR, REG_LVT_LINT0,
                                 REG_LVT_LINT1, REG_LVT_TIMER, REG_PPR, REG_SVR, REG_TIMER_CCR,
                                 REG_TIMER_DCR, REG_TIMER_ICR, REG_TPR, Lapic)
from kvmpy.devices.pci import BAR_IO, BAR_MEM32, BAR_MEM64, MsixCapability, PciBus, PciDevice
from kvmpy.devices.pci.bus import PciConfigIo
from kvmpy.devices.pic8259 import Pic8259Pair
from kvmpy.devices.pit8254 import Pit8254
from kvmpy.devices.rtc import REG_A, REG_B, RtcCmos
from kvmpy.devices.saved_state import Stateful, StateError
from kvmpy.devices.serial import Serial16550
from test_pic import Wired as PicOnBus
from test_serial import BYTES, REGS

NS = 1_000_000_000
GiB = 1 << 30

# About a hundred sequences per device: the whole file takes some 15 s on a
# loaded 2-core machine.
ROUND_TRIPS = settings(max_examples=100, deadline=None,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZED_STATES = settings(max_examples=50, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow])


class FakeClock:
    def __init__(self) -> None:
        self.now = 7 * NS

    def __call__(self) -> int:
        return self.now


class Rig:
    """One device with recording callbacks. ``events`` is everything the device did
    through them; ``lines()`` the levels it drives now; ``apply(op)`` one access,
    returning what the guest or host would see."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.wheel = TimerWheel(clock=clock, threaded=False)
        self.events: list = []

    def level_recorder(self, name: str) -> Callable[[bool], None]:
        return lambda level: self.events.append((name, bool(level)))

    def level(self, name: str) -> bool:
        last = [event[-1] for event in self.events if event[0] == name]
        return bool(last and last[-1])

    device: Stateful

    def lines(self) -> tuple:
        raise NotImplementedError

    def apply(self, op: tuple) -> object:
        raise NotImplementedError

    def state(self):
        return self.device.state()

    def restore(self, state) -> None:
        self.device.restore(state)


ADVANCE = "advance"


def run(rigs: list[Rig], ops: list[tuple]) -> list:
    """Apply ``ops`` to every rig (they share one clock); one result list per rig."""
    results: list[list] = [[] for _ in rigs]
    for op in ops:
        if op[0] == ADVANCE:
            rigs[0].clock.now += op[1]
            for i, rig in enumerate(rigs):
                results[i].append(("fired", rig.wheel.run_due()))
        else:
            for i, rig in enumerate(rigs):
                results[i].append(rig.apply(op))
    return results


def check_round_trip(make: Callable[[FakeClock], Rig], before: list[tuple], after: list[tuple]) -> None:
    clock = FakeClock()
    original = make(clock)
    run([original], before)
    saved = original.state()
    restored = make(clock)
    restored.restore(saved)
    assert restored.state() == saved                                   # (a)
    assert restored.lines() == original.lines()
    original.events.clear()
    restored.events.clear()
    for op in after:                                                   # (b)
        a, b = run([original, restored], [op])
        assert a == b, op
        assert original.events == restored.events, op
    assert restored.state() == original.state()


def check_refused(make: Callable[[FakeClock], Rig], before: list[tuple], bad_states: list) -> None:
    clock = FakeClock()
    rig = make(clock)
    run([rig], before)
    good = rig.state()
    for bad in bad_states:
        with pytest.raises(StateError):
            rig.restore(bad)
        assert rig.state() == good, bad


def replace_field(state, path: tuple, value):
    """``state`` with the field at ``path`` (names, or indexes into tuples) set to ``value``."""
    head, rest = path[0], path[1:]
    if isinstance(head, int):
        items = list(state)
        items[head] = replace_field(items[head], rest, value) if rest else value
        return tuple(items)
    inner = getattr(state, head)
    return dataclasses.replace(state, **{head: replace_field(inner, rest, value) if rest else value})


def field_paths(state, prefix: tuple = ()) -> list[tuple]:
    paths = []
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        paths.append(prefix + (f.name,))
        if dataclasses.is_dataclass(value):
            paths += field_paths(value, prefix + (f.name,))
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                paths += field_paths(item, prefix + (f.name, i))
    return paths


STRAY_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 300), st.integers(-(2 ** 70), 2 ** 70),
    st.sampled_from([0xFF, 0xFFFF, 0x10000, 0xFFFFFFFF, 1 << 32, 1 << 63, (1 << 256) - 1]),
    st.floats(allow_nan=True, allow_infinity=True), st.binary(max_size=300),
    st.sampled_from([b"", bytes(32), bytes(128), bytes(256), "text", (), (0,) * 6, (0,) * 24]),
    st.tuples(st.integers(0, 300)), st.lists(st.integers(0, 3), max_size=3))


def check_stray_field(make: Callable[[FakeClock], Rig], before: list[tuple], data, after_ops) -> None:
    """One field replaced by anything: refused cleanly, or the device keeps working."""
    clock = FakeClock()
    rig = make(clock)
    run([rig], before)
    good = rig.state()
    path = data.draw(st.sampled_from(field_paths(good)), label="field")
    value = data.draw(STRAY_VALUES, label="value")
    try:
        rig.restore(replace_field(good, path, value))
    except StateError:
        assert rig.state() == good
        return
    run([rig], data.draw(after_ops, label="after"))
    rig.restore(rig.state())          # what it hands out afterwards is a valid state too


def advance(max_ns: int) -> st.SearchStrategy:
    # Hypothesis favours small integers: name a few long steps outright
    return st.tuples(st.just(ADVANCE), st.integers(0, max_ns) | st.sampled_from([max_ns // 3, max_ns]))


def starting_with(first: st.SearchStrategy, op: st.SearchStrategy) -> st.SearchStrategy:
    """Sequences of ``op`` after ``first`` (a clock advance: a timer restored at the
    wrong time shows before any access re-arms it)."""
    return st.builds(lambda head, rest: [head, *rest], first, st.lists(op, max_size=30))


# ----------------------------------------------------------------------- UART

class SerialRig(Rig):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.device = Serial16550(self.level_recorder("irq"), lambda data: self.events.append(("out", data)),
                                  on_rx_space=lambda: self.events.append(("rx_space",)),
                                  tx_batching=self.level_recorder("batching"))

    def lines(self) -> tuple:
        return self.device.interrupt_line(), self.level("batching")

    def apply(self, op: tuple) -> object:
        kind = op[0]
        if kind == "read":
            return self.device.read(op[1], 1)
        if kind == "write":
            return self.device.write(op[1], 1, op[2])
        if kind == "receive":
            return self.device.receive(op[1])
        self.device.send_break()
        return None


SERIAL_OP = st.one_of(
    st.tuples(st.just("read"), REGS), st.tuples(st.just("write"), REGS, BYTES),
    st.tuples(st.just("write"), st.just(2), st.sampled_from([0x01, 0x07, 0xC1, 0x81, 0x00])),
    st.tuples(st.just("receive"), st.binary(max_size=20)), st.tuples(st.just("break")))
SERIAL_OPS = st.lists(SERIAL_OP, max_size=40)


@ROUND_TRIPS
@given(before=st.lists(SERIAL_OP, min_size=5, max_size=40), after=SERIAL_OPS)
def test_serial_round_trip(before, after):
    check_round_trip(SerialRig, before, after)


def test_serial_malformed_states():
    rig = SerialRig(FakeClock())
    run([rig], [("write", 2, 0x01), ("receive", b"abc")])
    good = rig.state()
    r = dataclasses.replace
    check_refused(SerialRig, [("write", 2, 0x01), ("receive", b"abc")], [
        None, rig.device, PicOnBus().pic.state(), r(good, ier=0x10), r(good, ier=-1), r(good, ier=True),
        r(good, lcr=0x100), r(good, mcr=0x20), r(good, fcr_trigger_bits=0x20), r(good, rx=b"x" * 17),
        r(good, rx="abc"), r(good, rx=bytearray(b"abc")), r(good, fifo_enabled=False),
        r(good, lsr_errors=0x01), r(good, msr_deltas=0x10), r(good, last_rbr=None), r(good, rx_wanted=1),
        r(good, thr_pending="yes")])


@FUZZED_STATES
@given(before=SERIAL_OPS, data=st.data())
def test_serial_stray_field(before, data):
    check_stray_field(SerialRig, before, data, SERIAL_OPS)


# ----------------------------------------------------------------------- i8042

class I8042Rig(Rig):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.device = I8042(lambda: self.events.append(("reset",)), self.level_recorder("irq"))

    def lines(self) -> tuple:
        return (self.level("irq"),)

    def apply(self, op: tuple) -> object:
        kind = op[0]
        port = self.device.command if op[1] == COMMAND_PORT else self.device.data
        if kind == "read":
            return port.read(0, 1)
        if kind == "write":
            return port.write(0, 1, op[2])
        return self.device.inject_scancodes(op[2])


I8042_OP = st.one_of(
    st.tuples(st.just("read"), st.sampled_from([DATA_PORT, COMMAND_PORT])),
    st.tuples(st.just("write"), st.sampled_from([DATA_PORT, COMMAND_PORT]), BYTES),
    st.tuples(st.just("write"), st.just(COMMAND_PORT),
              st.sampled_from([0x20, 0x60, 0xA7, 0xA8, 0xA9, 0xAA, 0xAD, 0xAE, 0xD0, 0xD1, 0xD2, 0xD4])),
    st.tuples(st.just("write"), st.just(DATA_PORT),
              st.sampled_from([0xED, 0xF0, 0xF2, 0xF4, 0xF5, 0xFF, 0x00, 0x01, 0x03])),
    st.tuples(st.just("inject"), st.just(0), st.binary(max_size=6)))
I8042_OPS = st.lists(I8042_OP, max_size=40)


@ROUND_TRIPS
@given(before=st.lists(I8042_OP, min_size=5, max_size=40), after=I8042_OPS)
def test_i8042_round_trip(before, after):
    check_round_trip(I8042Rig, before, after)


def test_i8042_malformed_states():
    good = I8042Rig(FakeClock()).state()
    r = dataclasses.replace
    check_refused(I8042Rig, [], [
        r(good, ram=bytes(31)), r(good, output_buffer=0x100), r(good, output_is_aux=True),
        r(good, pending_command=0x20), r(good, keyboard_pending_command=0xFF), r(good, scancode_set=4),
        r(good, output_port=0x01), r(good, keyboard_queue=bytes(MAX_SAVED_QUEUE + 1)),
        r(good, status=0x01), r(good, ctr=None), r(good, keyboard_scanning=0)])


@FUZZED_STATES
@given(before=I8042_OPS, data=st.data())
def test_i8042_stray_field(before, data):
    check_stray_field(I8042Rig, before, data, I8042_OPS)


# ----------------------------------------------------------------------- RTC

WALL_CLOCK_AT_ZERO = 1_700_000_000.25


class RtcRig(Rig):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.device = RtcCmos(1 * GiB, num_cpus=2, clock=lambda: WALL_CLOCK_AT_ZERO + clock.now / NS,
                              irq=self.level_recorder("irq"), timer_wheel=self.wheel)

    def lines(self) -> tuple:
        return (self.level("irq"),)

    def apply(self, op: tuple) -> object:
        if op[0] == "read":
            return self.device.read(1, 1)
        if op[0] == "select":
            return self.device.write(0, 1, op[1])
        if op[0] == "program":
            self.device.write(0, 1, op[1])
        return self.device.write(1, 1, op[-1])


RTC_OP = st.one_of(
    st.tuples(st.just("select"), st.one_of(st.integers(0, 0xFF), st.sampled_from([0x0A, 0x0B, 0x0C, 0x00]))),
    st.tuples(st.just("read")), st.tuples(st.just("write"), BYTES),
    st.tuples(st.just("write"), st.sampled_from([0x12, 0x16, 0x26, 0x42, 0x52, 0x72, 0x80, 0x82])),
    # interrupt enables in B, the periodic rate in A, an alarm
    st.tuples(st.just("program"), st.just(REG_B),
              st.sampled_from([0x12, 0x22, 0x42, 0x72, 0x16, 0x82, 0x02])),
    st.tuples(st.just("program"), st.just(REG_A), st.integers(0x20, 0x2F)),
    st.tuples(st.just("program"), st.sampled_from([0x01, 0x03, 0x05]),
              st.sampled_from([0xC0, 0x00, 0x30, 0x59])),
    advance(3 * NS // 2))
RTC_OPS = st.lists(RTC_OP, max_size=30)


@ROUND_TRIPS
@given(before=st.lists(RTC_OP, min_size=5, max_size=40), after=starting_with(advance(3 * NS // 2), RTC_OP))
def test_rtc_round_trip(before, after):
    check_round_trip(RtcRig, before, after)


def test_rtc_timer_resumes_on_a_later_clock():
    """A state taken with the update interrupt armed fires on the new clock at the
    same distance, and the guest's time goes on from the host's wall clock."""
    clock = FakeClock()
    rig = RtcRig(clock)
    run([rig], [("select", REG_B), ("write", 0x12), ("select", 0x0C), ("read",)])
    saved = rig.state()
    assert saved.timer_due_in_ns is not None and 0 < saved.timer_due_in_ns <= NS
    clock.now += 3600 * NS
    later = RtcRig(clock)
    later.restore(saved)
    clock.now += saved.timer_due_in_ns - 1
    later.wheel.run_due()
    assert not later.level("irq")
    clock.now += 2
    later.wheel.run_due()
    assert later.level("irq")
    assert later.device.guest_time() == pytest.approx(rig.device.guest_time(), abs=1e-6)


def test_rtc_malformed_states():
    rig = RtcRig(FakeClock())
    good = rig.state()
    set_bit = bytearray(good.cmos)
    set_bit[REG_B] |= 0x80
    uip = bytearray(good.cmos)
    uip[REG_A] |= 0x80
    r = dataclasses.replace
    check_refused(RtcRig, [], [
        r(good, guest_offset_s=float("nan")), r(good, guest_offset_s=float("inf")),
        r(good, guest_offset_s=1e13), r(good, guest_offset_s=-5e9), r(good, guest_offset_s="0"),
        r(good, guest_offset_s=10 ** 400), r(good, index=0x80), r(good, cmos=bytes(127)),
        r(good, cmos=bytes(uip)), r(good, cmos=bytes(set_bit)), r(good, frozen_time=(0,) * 8),
        r(good, cmos=bytes(set_bit), frozen_time=(0,) * 7),
        r(good, cmos=bytes(set_bit), frozen_time=(0,) * 7 + (0x100,)),
        r(good, flags_since=float("nan")), r(good, timer_due_in_ns=1 << 63), r(good, irq_level=0)])


@FUZZED_STATES
@given(before=RTC_OPS, data=st.data())
def test_rtc_stray_field(before, data):
    check_stray_field(RtcRig, before, data, RTC_OPS)


# ----------------------------------------------------------------------- ACPI PM

class AcpiPmRig(Rig):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        # 24 bits: the counter's top bit toggles every 2.3 s, within a test's reach
        self.device = AcpiPm(lambda slp_typ: self.events.append(("sleep", slp_typ)),
                             self.level_recorder("sci"), timer_32bit=False, clock_ns=clock)

    def lines(self) -> tuple:
        return (self.device.sci_level,)

    def apply(self, op: tuple) -> object:
        kind = op[0]
        if kind == "read":
            return self.device.read(op[1], op[2])
        if kind == "write":
            return self.device.write(op[1], op[2], op[3])
        if kind == "button":
            return self.device.press_power_button()
        return self.device.raise_gpe(op[1])


ACPI_OFFSETS = st.one_of(st.integers(0, 0x40), st.sampled_from([0, 2, 4, 8, 0x20, 0x24]))
ACPI_OP = st.one_of(
    st.tuples(st.just("read"), ACPI_OFFSETS, st.sampled_from([1, 2, 4])),
    st.tuples(st.just("write"), ACPI_OFFSETS, st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("write"), st.sampled_from([2, 0x24]), st.just(4), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("read"), st.just(0), st.just(2)),         # PM1_STS, where TMR_STS shows
    st.tuples(st.just("button")), st.tuples(st.just("gpe"), st.integers(0, 40)),
    advance(10 * NS))
ACPI_OPS = st.lists(ACPI_OP, max_size=30)


@ROUND_TRIPS
@given(before=st.lists(ACPI_OP, min_size=5, max_size=40), after=starting_with(advance(10 * NS), ACPI_OP))
def test_acpi_pm_round_trip(before, after):
    check_round_trip(AcpiPmRig, before, after)


def test_acpi_pm_malformed_states():
    good = AcpiPmRig(FakeClock()).state()
    r = dataclasses.replace
    check_refused(AcpiPmRig, [], [
        r(good, pm1_status=1 << 1), r(good, pm1_enable=1 << 15), r(good, pm1_control=SLP_EN),
        r(good, gpe0_status=1 << 32), r(good, gpe0_enable=-1), r(good, timer_bits=16),
        r(good, timer_bits=32), r(good, timer_bits=24.0), r(good, timer_running_for_ns=-1),
        r(good, timer_carry_epoch=-1)])


@FUZZED_STATES
@given(before=ACPI_OPS, data=st.data())
def test_acpi_pm_stray_field(before, data):
    check_stray_field(AcpiPmRig, before, data, ACPI_OPS)


# ----------------------------------------------------------------------- 8259 pair

class PicRig(Rig):
    """The pair on a port bus as tests/test_pic.py wires it (with Linux's init sequence)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.wired = PicOnBus()
        self.device = self.wired.pic

    def _collect_intr(self) -> None:
        self.events += [("intr", level) for level in self.wired.intr_changes]
        self.wired.intr_changes.clear()

    def lines(self) -> tuple:
        return (self.device.intr,)

    def restore(self, state) -> None:
        self.device.restore(state)
        self._collect_intr()

    def apply(self, op: tuple) -> object:
        kind = op[0]
        if kind == "write":
            result = self.wired.out(op[1], op[2])
        elif kind == "read":
            result = self.wired.inb(op[1])
        elif kind == "init":
            result = self.wired.linux_init(auto_eoi=op[1])
        elif kind == "init_words":
            _, port, icw1, *words = op
            self.wired.out(port, icw1)
            for word in words:
                result = self.wired.out(port + 1, word)
        elif kind == "irq":
            result = self.device.set_irq(op[1], op[2])
        else:
            result = self.device.acknowledge()
        self._collect_intr()
        return result


PIC_PORTS = st.sampled_from([0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1])
PIC_OP = st.one_of(
    st.tuples(st.just("write"), PIC_PORTS, st.integers(0, 255)),
    # OCW2 (EOIs, rotations, set priority) and OCW3 (read ISR/IRR, poll, special mask)
    st.tuples(st.just("write"), st.sampled_from([0x20, 0xA0]),
              st.sampled_from([0x20, 0x60, 0x62, 0xA0, 0xE1, 0xC5, 0x80, 0x00,
                               0x0B, 0x0A, 0x0C, 0x68, 0x48])),
    st.tuples(st.just("read"), PIC_PORTS), st.tuples(st.just("init"), st.booleans()),
    # ICW1 (with or without ICW4, single or cascaded), then enough data writes for any ICW
    st.tuples(st.just("init_words"), st.sampled_from([0x20, 0xA0]), st.integers(0x10, 0x1F),
              st.integers(0, 255), st.integers(0, 255), st.sampled_from([0x01, 0x03, 0x11, 0x13, 0x00])),
    st.tuples(st.just("irq"), st.integers(0, 15), st.booleans()), st.tuples(st.just("ack")))
PIC_OPS = st.lists(PIC_OP, max_size=40)


@ROUND_TRIPS
@given(before=st.lists(PIC_OP, min_size=5, max_size=40), after=PIC_OPS)
def test_pic_round_trip(before, after):
    check_round_trip(PicRig, before, after)


def test_pic_malformed_states():
    good = PicRig(FakeClock()).state()
    r = dataclasses.replace
    check_refused(PicRig, [("init", False)], [
        r(good, master=r(good.master, irr=0x100)), r(good, master=r(good.master, irq_base=0x31)),
        r(good, slave=r(good.slave, priority_add=8)), r(good, slave=r(good.slave, init_state=4)),
        r(good, master=r(good.master, elcr=0x01)), r(good, slave=r(good.slave, elcr=0x01)),
        r(good, master=r(good.master, read_isr=1)), r(good, master=None), r(good, slave=good)])


@FUZZED_STATES
@given(before=PIC_OPS, data=st.data())
def test_pic_stray_field(before, data):
    check_stray_field(PicRig, before, data, PIC_OPS)


# ----------------------------------------------------------------------- IOAPIC

class IoApicRig(Rig):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.device = IoApic(deliver=lambda *message: self.events.append(("deliver",) + message))

    def lines(self) -> tuple:
        return ()

    def apply(self, op: tuple) -> object:
        kind, d = op[0], self.device
        if kind == "reg_write":
            d.write(0, 4, op[1])
            return d.write(0x10, 4, op[2])
        if kind == "reg_read":
            d.write(0, 4, op[1])
            return d.read(0x10, 4)
        if kind == "mmio_read":
            return d.read(op[1], op[2])
        if kind == "mmio_write":
            return d.write(op[1], op[2], op[3])
        if kind == "irq":
            return d.set_irq(op[1], op[2])
        return d.eoi(op[1])


IOAPIC_OP = st.one_of(
    st.tuples(st.just("reg_write"), st.integers(0, 0x40), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("reg_write"), st.integers(0x10, 0x17),
              st.builds(lambda v, bits: v | bits, st.integers(0x20, 0x2F),
                        st.sampled_from([0, 1 << 15, 1 << 16, 1 << 15 | 1 << 16, 4 << 8]))),
    st.tuples(st.just("reg_read"), st.integers(0, 0x40)),
    st.tuples(st.just("mmio_read"), st.integers(0, 0x30), st.sampled_from([1, 2, 4, 8])),
    st.tuples(st.just("mmio_write"), st.integers(0, 0x30), st.sampled_from([1, 2, 4, 8]),
              st.integers(0, 2 ** 64 - 1)),
    st.tuples(st.just("irq"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("eoi"), st.integers(0x20, 0x2F)))
IOAPIC_OPS = st.lists(IOAPIC_OP, max_size=40)


@ROUND_TRIPS
@given(before=st.lists(IOAPIC_OP, min_size=5, max_size=40), after=IOAPIC_OPS)
def test_ioapic_round_trip(before, after):
    check_round_trip(IoApicRig, before, after)


def test_ioapic_malformed_states():
    good = IoApicRig(FakeClock()).state()
    r = dataclasses.replace
    check_refused(IoApicRig, [], [
        r(good, ioapic_id=16), r(good, select=0x100), r(good, entries=good.entries[:-1]),
        r(good, entries=list(good.entries)), r(good, entries=(1 << 12,) + good.entries[1:]),
        r(good, entries=(1 << 64,) + good.entries[1:]), r(good, asserted=1 << NUM_PINS)])


@FUZZED_STATES
@given(before=IOAPIC_OPS, data=st.data())
def test_ioapic_stray_field(before, data):
    check_stray_field(IoApicRig, before, data, IOAPIC_OPS)


# ----------------------------------------------------------------------- LAPIC

class LapicRig(Rig):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        ev = self.events
        self.device = Lapic(
            0, notify=lambda: ev.append(("kick",)),
            send_ipi=lambda src, *message: ev.append(("ipi",) + message),
            eoi_broadcast=lambda vector: ev.append(("eoi", vector)),
            pic_ack=lambda: ev.append(("inta",)) or 0x30,
            on_init=lambda cpu: ev.append(("init", cpu)),
            on_sipi=lambda cpu, vector: ev.append(("sipi", cpu, vector)),
            timer_wheel=self.wheel, clock=clock)

    def lines(self) -> tuple:
        return (self.device.has_pending(),)

    def restore(self, state) -> None:
        self.device.restore(state)
        # the vCPU only looks for interrupts when kicked
        assert ("kick",) in self.events or not self.device.has_pending()

    def apply(self, op: tuple) -> object:
        kind, la = op[0], self.device
        if kind == "write":
            return la.write(op[1], 4, op[2])
        if kind == "read":
            return la.read(op[1], 4)
        if kind == "deliver":
            return la.deliver(*op[1:])
        if kind == "lint0":
            return la.set_lint0(op[1])
        if kind == "lint1":
            return la.set_lint1(op[1])
        if kind == "ack":
            return la.intr_ack()
        if kind == "nmi":
            return la.take_nmi()
        if kind == "apic_base":
            return la.set_apic_base(op[1])
        return la.set_cr8(op[1])


LAPIC_REGS = st.sampled_from([REG_ID, REG_TPR, REG_PPR, REG_EOI, REG_LDR, REG_DFR, REG_SVR, REG_ESR,
                              REG_ICR_LO, REG_ICR_HI, REG_LVT_TIMER, REG_LVT_LINT0, REG_LVT_LINT1,
                              REG_LVT_ERROR, REG_TIMER_ICR, REG_TIMER_CCR, REG_TIMER_DCR, 0x100, 0x200,
                              0x210, 0x180, 0x3F0])
LAPIC_OP = st.one_of(
    st.tuples(st.just("write"), LAPIC_REGS, st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("write"), st.just(REG_SVR), st.sampled_from([0x1FF, 0x0FF, 0x13F])),
    st.tuples(st.just("write"), st.just(REG_LVT_TIMER),
              st.builds(lambda v, periodic: v | periodic, st.integers(0x20, 0xFF),
                        st.sampled_from([0, 1 << 17]))),
    st.tuples(st.just("write"), st.just(REG_TIMER_ICR),
              st.integers(0, 5_000_000) | st.sampled_from([999, 200_000])),
    st.tuples(st.just("write"), st.just(REG_TIMER_DCR), st.integers(0, 0xF)),
    st.tuples(st.just("read"), LAPIC_REGS),
    st.tuples(st.just("deliver"), st.integers(0, 7), st.integers(0, 255), st.booleans(), st.booleans()),
    st.tuples(st.just("lint0"), st.booleans()), st.tuples(st.just("lint1"), st.booleans()),
    st.tuples(st.just("ack")), st.tuples(st.just("nmi")),
    st.tuples(st.just("apic_base"), st.sampled_from([APIC_DEFAULT_BASE | APIC_BASE_ENABLE, APIC_DEFAULT_BASE,
                                                      0xFEF00000 | APIC_BASE_ENABLE])),
    st.tuples(st.just("cr8"), st.integers(0, 15)),
    advance(3_000_000))
LAPIC_OPS = st.lists(LAPIC_OP, max_size=40)


@ROUND_TRIPS
@given(before=st.lists(LAPIC_OP, min_size=5, max_size=40), after=starting_with(advance(3_000_000), LAPIC_OP))
def test_lapic_round_trip(before, after):
    check_round_trip(LapicRig, before, after)


def test_lapic_timer_resumes_on_a_later_clock():
    clock = FakeClock()
    rig = LapicRig(clock)
    run([rig], [("write", REG_SVR, 0x1FF), ("write", REG_LVT_TIMER, 0x40 | 1 << 17),
                ("write", REG_TIMER_DCR, 0xB), ("write", REG_TIMER_ICR, 1_000_000), (ADVANCE, 400_000)])
    saved = rig.state()
    assert saved.timer_due_in_ns == 600_000 and saved.timer_started_ns_ago == 400_000
    clock.now += 10 * NS
    later = LapicRig(clock)
    later.restore(saved)
    assert later.device.current_count() == 600_000
    clock.now += 600_000
    assert later.wheel.run_due() == 1 and later.device.intr_ack() == 0x40


def test_lapic_malformed_states():
    good = LapicRig(FakeClock()).state()
    r = dataclasses.replace
    check_refused(LapicRig, [], [
        r(good, apic_base=0xFEF00000 | good.apic_base & 0xFFF), r(good, apic_base=good.apic_base & ~(1 << 8)),
        r(good, irr=1), r(good, isr=1 << 256), r(good, svr=0x200), r(good, dfr=0), r(good, lvt=good.lvt[:5]),
        r(good, lvt=(0x700,) + good.lvt[1:]), r(good, timer_running=True, timer_initial=0),
        r(good, timer_due_in_ns=5), r(good, timer_divide_config=0x4), r(good, icr_lo=1 << 12),
        r(good, esr=1), r(good, tpr=0x100), r(good, timer_started_ns_ago=1 << 63),
        r(good, wait_for_sipi=None)])


@FUZZED_STATES
@given(before=LAPIC_OPS, data=st.data())
def test_lapic_stray_field(before, data):
    check_stray_field(LapicRig, before, data, LAPIC_OPS)


# ----------------------------------------------------------------------- PIT

class PitRig(Rig):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.device = Pit8254(irq0=self.level_recorder("irq0"), timer_wheel=self.wheel)

    def lines(self) -> tuple:
        return (self.level("irq0"),)

    def apply(self, op: tuple) -> object:
        kind, pit = op[0], self.device
        if kind == "write":
            return pit.write(op[1], 1, op[2])
        if kind == "read":
            return pit.read(op[1], 1)
        if kind == "program":
            _, ch, mode, count = op
            pit.write(3, 1, ch << 6 | 3 << 4 | mode << 1)
            pit.write(ch, 1, count & 0xFF)
            return pit.write(ch, 1, count >> 8)
        if kind == "gate2":
            return pit.gate2(op[1])
        return pit.out2()


PIT_OP = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 3), BYTES),
    st.tuples(st.just("read"), st.integers(0, 2)),
    st.tuples(st.just("program"), st.integers(0, 2), st.integers(0, 5),
              st.one_of(st.integers(2, 3000), st.integers(0, 0xFFFF))),
    st.tuples(st.just("gate2"), st.booleans()), st.tuples(st.just("out2")),
    advance(5_000_000))
PIT_OPS = st.lists(PIT_OP, max_size=30)


@ROUND_TRIPS
@given(before=st.lists(PIT_OP, min_size=5, max_size=40), after=starting_with(advance(5_000_000), PIT_OP))
def test_pit_round_trip(before, after):
    check_round_trip(PitRig, before, after)


def test_pit_malformed_states():
    rig = PitRig(FakeClock())
    run([rig], [("program", 0, 2, 1000)])
    good = rig.state()
    ch0 = good.channels[0]
    r = dataclasses.replace
    check_refused(PitRig, [("program", 0, 2, 1000)], [
        r(good, channels=good.channels[:2]), r(good, channels=list(good.channels)),
        r(good, channels=(r(ch0, count=0),) + good.channels[1:]),
        r(good, channels=(r(ch0, mode=6),) + good.channels[1:]),
        r(good, channels=(r(ch0, access=0),) + good.channels[1:]),
        r(good, channels=(r(ch0, latched_count=b"abc"),) + good.channels[1:]),
        r(good, channels=(r(ch0, running_for_ns=-5),) + good.channels[1:]),
        r(good, channels=(r(ch0, latched_status=0x100),) + good.channels[1:]),
        r(good, channels=(good,) + good.channels[1:]), r(good, irq0_due_in_ns="1"),
        r(good, irq0_level=None)])


@FUZZED_STATES
@given(before=PIT_OPS, data=st.data())
def test_pit_stray_field(before, data):
    check_stray_field(PitRig, before, data, PIT_OPS)


# ----------------------------------------------------------------------- PCI function with MSI-X

MSIX_VECTORS = 5
MSIX_BAR = 2


class RecordingPlatform:
    """INTx levels and MSI eventfds, each eventfd's aim recorded."""

    def __init__(self, events: list) -> None:
        self.events = events
        self.aims: dict[int, tuple[int, int]] = {}

    def set_irq_level(self, gsi: int, level: bool) -> None:
        self.events.append(("gsi", gsi, level))

    def msi_eventfd(self, address: int, data: int) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.aims[fd] = (address, data)
        return fd

    def update_msi_eventfd(self, fd: int, address: int, data: int) -> None:
        self.aims[fd] = (address, data)

    def release_msi_eventfd(self, fd: int) -> None:
        del self.aims[fd]
        os.close(fd)


class MsixFunction(PciDevice):
    def __init__(self, platform: RecordingPlatform) -> None:
        super().__init__(0x1AF4, 0x1234, 0xFF0000, name="msix-function")
        self.add_bar(0, 0x1000, BAR_MEM32)
        self.add_bar(1, 0x40, BAR_IO)
        self.add_bar(MSIX_BAR, 0x4000, BAR_MEM64, prefetchable=True)
        self.msix = MsixCapability(self, platform, MSIX_VECTORS, MSIX_BAR, 0, 0x2000)


class PciRig(Rig):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.platform = RecordingPlatform(self.events)
        self.mmio, self.pio = Bus("mmio"), Bus("pio")
        self.bus = PciBus(self.mmio, self.pio, self.platform, mmio64_window=(1 << 36, (1 << 37) - 1))
        self.device = MsixFunction(self.platform)
        self.slot = self.bus.add(self.device)
        self.config_io = PciConfigIo(self.bus)

    def state(self):
        return self.device.state(), self.device.msix.state(), self.config_io.state()

    def restore(self, state) -> None:
        config, msix, config_io = state
        self.device.restore(config)
        self.device.msix.restore(msix)
        self.config_io.restore(config_io)

    def close(self) -> None:
        self.device.msix.close()

    def lines(self) -> tuple:
        mapped = tuple(self.bus.mapping(self.device, i) for i in sorted(self.device.bars))
        return mapped, self.level("gsi")

    def _fired(self) -> None:
        for vector, fd in enumerate(self.device.msix.fds):
            if fd is None:
                continue
            try:
                count = os.eventfd_read(fd)
            except BlockingIOError:
                continue
            self.events.append(("msi", vector, self.platform.aims[fd], count))

    def apply(self, op: tuple) -> object:
        kind = op[0]
        if kind == "config_address":
            result = self.config_io.write(0, 4, 0x80000000 | self.slot << 11 | op[1])
        elif kind == "config_data_write":
            result = self.config_io.write(4 + op[1], op[2], op[3])
        elif kind == "config_data_read":
            result = self.config_io.read(4 + op[1], op[2])
        elif kind == "config_write":
            result = self.device.config_write(op[1], op[2], op[3])
        elif kind == "config_read":
            result = self.device.config_read(op[1], op[2])
        elif kind == "msix_vector":
            _, vector, data, masked = op
            self.device.config_write(MSIX_CONTROL, 2, 0x8000)
            self.device.msix.write(16 * vector, 4, 0xFEE00000)
            self.device.msix.write(16 * vector + 8, 4, data)
            result = self.device.msix.write(16 * vector + 12, 4, masked)
        elif kind == "table_write":
            result = self.device.msix.write(op[1], op[2], op[3])
        elif kind == "table_read":
            result = self.device.msix.read(op[1], op[2])
        elif kind == "notify":
            result = self.device.msix.notify(op[1])
        else:
            result = self.bus.set_intx(self.device, op[1])
        self._fired()
        return result


def _msix_control_offset() -> int:
    return MsixFunction(RecordingPlatform([])).msix.cap_offset + 2


MSIX_CONTROL = _msix_control_offset()
PCI_OP = st.one_of(
    st.tuples(st.just("config_write"), st.integers(0, 0x100), st.sampled_from([1, 2, 4]),
              st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("config_write"), st.just(4), st.just(2), st.integers(0, 0x7FF)),
    st.tuples(st.just("config_write"), st.sampled_from([0x10, 0x14, 0x18, 0x1C]), st.just(4),
              st.sampled_from([0xFFFFFFFF, 0xC0001000, 0xC0002000, 0xC004, 0x10, 0])),
    st.tuples(st.just("config_write"), st.just(MSIX_CONTROL), st.just(2),
              st.sampled_from([0x8000, 0xC000, 0x4000, 0])),
    st.tuples(st.just("config_read"), st.integers(0, 0x100), st.sampled_from([1, 2, 4])),
    st.tuples(st.just("config_address"), st.integers(0, 0x3F).map(lambda r: r * 4)),
    st.tuples(st.just("config_data_write"), st.integers(0, 3), st.sampled_from([1, 2, 4]),
              st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("config_data_read"), st.integers(0, 3), st.sampled_from([1, 2, 4])),
    st.tuples(st.just("table_write"), st.integers(0, MSIX_VECTORS * 4 - 1).map(lambda d: d * 4),
              st.just(4), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("table_write"), st.integers(0, MSIX_VECTORS - 1).map(lambda v: v * 16 + 12),
              st.just(4), st.integers(0, 1)),
    st.tuples(st.just("table_read"), st.one_of(st.integers(0, MSIX_VECTORS * 4 - 1).map(lambda d: d * 4),
                                               st.just(0x2000)), st.just(4)),
    st.tuples(st.just("notify"), st.integers(-1, MSIX_VECTORS)),
    st.tuples(st.just("msix_vector"), st.integers(0, MSIX_VECTORS - 1), st.integers(0x20, 0xFF),
              st.integers(0, 1)),
    st.tuples(st.just("intx"), st.booleans()))
PCI_OPS = st.lists(PCI_OP, max_size=40)


def check_pci(check: Callable, *args) -> None:
    rigs: list[PciRig] = []

    def make(clock: FakeClock) -> PciRig:
        rigs.append(PciRig(clock))
        return rigs[-1]

    try:
        check(make, *args)
    finally:
        for rig in rigs:
            rig.close()


@ROUND_TRIPS
@given(before=st.lists(PCI_OP, min_size=5, max_size=40), after=PCI_OPS)
def test_pci_function_round_trip(before, after):
    check_pci(check_round_trip, before, after)


def test_pci_restore_maps_bars_and_drives_intx():
    check_pci(_check_pci_restore_maps_bars_and_drives_intx)


def _check_pci_restore_maps_bars_and_drives_intx(make):
    clock = FakeClock()
    rig = make(clock)
    run([rig], [("config_write", 0x10, 4, 0xC0010000), ("config_write", 4, 2, 0x7),
                ("config_write", MSIX_CONTROL, 2, 0x8000), ("table_write", 16, 4, 0xFEE00000),
                ("table_write", 24, 4, 0x41), ("table_write", 28, 4, 0), ("intx", True)])
    saved = rig.state()
    restored = make(clock)
    restored.restore(saved)
    assert restored.bus.mapping(restored.device, 0) == 0xC0010000
    assert restored.mmio.find(0xC0010000) is not None
    assert ("gsi", restored.device.intx_gsi, True) in restored.events
    restored.events.clear()
    restored.apply(("notify", 1))
    assert restored.events == [("msi", 1, (0xFEE00000, 0x41), 1)]


def test_pci_malformed_states():
    check_pci(_check_pci_malformed_states)


def _check_pci_malformed_states(make):
    rig = make(FakeClock())
    config, msix, config_io = rig.state()

    def patched(offset: int, value: int):
        raw = bytearray(config.config)
        raw[offset] = value
        return dataclasses.replace(config, config=bytes(raw))

    r = dataclasses.replace
    bad = [r(config, config=config.config[:-1]), r(config, config=bytearray(config.config)),
           r(config, decoded_bars=(3,)), r(config, decoded_bars=(2, 0)), r(config, decoded_bars=2),
           r(config, decoded_bars=(0, 0)),
           patched(0x00, 0x00),                    # vendor ID
           patched(0x10, config.config[0x10] | 1),  # BAR0 kind
           patched(0x11, 0x08),                    # BAR0 size bits below 4 KiB
           patched(0x34, 0x80),                    # capability pointer
           ]
    for state in bad:
        with pytest.raises(StateError):
            rig.device.restore(state)
    for state in (r(msix, table=msix.table[:-1]), r(msix, pending_bits=bytes(16)),
                  r(msix, pending_bits=(1 << MSIX_VECTORS).to_bytes(8, "little")), r(msix, table=None)):
        with pytest.raises(StateError):
            rig.device.msix.restore(state)
    for state in (r(config_io, address=1), r(config_io, address=-1), config):
        with pytest.raises(StateError):
            rig.config_io.restore(state)
    assert rig.state() == (config, msix, config_io)


# ----------------------------------------------------------------------- the same shape everywhere

@pytest.mark.parametrize("make", [SerialRig, I8042Rig, RtcRig, AcpiPmRig, PicRig, IoApicRig, LapicRig,
                                  PitRig])
def test_states_are_plain_frozen_values(make):
    state = make(FakeClock()).state()

    def plain(value) -> bool:
        if dataclasses.is_dataclass(value):
            return all(plain(getattr(value, f.name)) for f in dataclasses.fields(value))
        if isinstance(value, tuple):
            return all(plain(v) for v in value)
        return value is None or type(value) in (int, bool, bytes, float)

    assert dataclasses.is_dataclass(state) and plain(state)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(state, dataclasses.fields(state)[0].name, 0)
    assert hash(state) == hash(dataclasses.replace(state))


def test_from_state_is_construct_then_restore():
    """``Cls.from_state(state, *constructor args)`` (saved_state.Restorable) gives the
    device of a restore: every stateful device has it."""
    from kvmpy.devices.saved_state import Restorable
    rig = SerialRig(FakeClock())
    for op in [("write", 3, 0x83), ("write", 0, 0x0C), ("write", 3, 0x03), ("write", 1, 0x05),
               ("receive", b"abc"), ("write", 7, 0x5A)]:
        rig.apply(op)
    state = rig.device.state()
    again = Serial16550.from_state(state, lambda level: None, lambda data: None)
    assert again.state() == state
    for cls in (Serial16550, I8042, RtcCmos, AcpiPm, Pic8259Pair, IoApic, Lapic, Pit8254, PciDevice,
                MsixCapability, PciConfigIo):
        assert issubclass(cls, Restorable), cls
