"""8254 PIT: counter arithmetic from the clock, access modes, latches, read-back,
outputs, the port 0x61 channel-2 path Linux calibrates the TSC with, and IRQ0."""

from __future__ import annotations

import logging
import time

from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvmpy.devices.bus import Bus
from kvmpy.devices.irqchip import PitPortB
from kvmpy.devices.timers import TimerWheel
from kvmpy.devices.pit8254 import PIT_HZ, Pit8254

NS = 1_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 5 * NS

    def __call__(self) -> int:
        return self.now

    def advance_ticks(self, ticks: int) -> None:
        self.now += ticks * NS // PIT_HZ + 1     # land just past the tick boundary


class Wired:
    def __init__(self, threaded: bool = False) -> None:
        self.clock = FakeClock() if not threaded else None
        self.wheel = TimerWheel(clock=self.clock, threaded=False) if not threaded else TimerWheel()
        self.irq: list[bool] = []
        self.pit = Pit8254(irq0=self.irq.append, timer_wheel=self.wheel)
        self.bus = Bus("pio")
        self.pit.register(self.bus)
        self.port_b = PitPortB(self.pit)
        self.bus.register(0x61, 1, self.port_b)

    def out(self, port, value):
        self.bus.write(port, 1, value)

    def inb(self, port):
        return self.bus.read(port, 1)

    def program(self, ch, mode, count, rw=3, bcd=False):
        self.out(0x43, ch << 6 | rw << 4 | mode << 1 | int(bcd))
        if rw in (1, 3):
            self.out(0x40 + ch, count & 0xFF)
        if rw in (2, 3):
            self.out(0x40 + ch, (count >> 8) & 0xFF)

    def latch_read(self, ch):
        self.out(0x43, ch << 6)
        lo = self.inb(0x40 + ch)
        return lo | self.inb(0x40 + ch) << 8

    @property
    def rising_edges(self):
        return sum(1 for a, b in zip([False] + self.irq, self.irq) if b and not a)


def test_mode2_counts_down_and_reloads():
    w = Wired()
    w.program(0, 2, 1000)
    assert w.latch_read(0) == 1000
    w.clock.advance_ticks(250)
    assert w.latch_read(0) == 750
    w.clock.advance_ticks(750)
    assert w.latch_read(0) == 1000               # reloaded: N..1
    w.clock.advance_ticks(999)
    assert w.latch_read(0) == 1


def test_mode3_decrements_by_two_and_square_wave():
    w = Wired()
    w.program(2, 3, 1000)
    w.port_b.write(0, 1, 0x01)                   # gate 2 high: starts
    assert w.pit.out2()
    w.clock.advance_ticks(100)
    assert w.latch_read(2) == 800
    w.clock.advance_ticks(450)
    assert not w.pit.out2()                      # second half of the period: low
    w.clock.advance_ticks(450)
    assert w.pit.out2()


def test_linux_pit_calibrate_tsc_channel2_mode0():
    """arch/x86/kernel/tsc.c pit_calibrate_tsc: gate on, speaker off, mode 0, poll bit 5."""
    w = Wired()
    w.out(0x61, (w.inb(0x61) & ~0x02) | 0x01)
    w.out(0x43, 0xB0)                            # channel 2, LSB/MSB, mode 0, binary
    latch = PIT_HZ // (1000 // 50)               # 50 ms
    w.out(0x42, latch & 0xFF)
    w.out(0x42, latch >> 8)
    assert not w.inb(0x61) & 0x20
    w.clock.advance_ticks(latch - 1)
    assert not w.inb(0x61) & 0x20
    w.clock.advance_ticks(1)
    assert w.inb(0x61) & 0x20
    # the elapsed host time matches the programmed 50 ms
    assert abs((w.clock.now - 5 * NS) - 50_000_000) < 10_000


def test_quick_pit_calibrate_reads_live_msb():
    """tsc.c quick_pit_calibrate: mode 0 count 0xFFFF, reads LSB then MSB unlatched."""
    w = Wired()
    w.out(0x61, 0x01)
    w.out(0x43, 0xB0)
    w.out(0x42, 0xFF)
    w.out(0x42, 0xFF)
    msbs = []
    for _ in range(5):
        w.inb(0x42)
        msbs.append(w.inb(0x42))
        w.clock.advance_ticks(256)
    assert msbs == [0xFF, 0xFE, 0xFD, 0xFC, 0xFB]


def test_gate_low_suspends_mode0():
    w = Wired()
    w.out(0x61, 0x01)
    w.program(2, 0, 1000)
    w.clock.advance_ticks(100)
    w.out(0x61, 0x00)
    frozen = w.latch_read(2)
    w.clock.advance_ticks(5000)
    assert w.latch_read(2) == frozen == 900
    w.out(0x61, 0x01)
    w.clock.advance_ticks(100)
    assert w.latch_read(2) == 800


def test_readback_status_and_latches():
    w = Wired()
    w.out(0x43, 0x34)                            # ch0 LSB/MSB mode 2
    w.out(0x43, 0xE2)                            # read-back status of ch0 (count not latched)
    assert w.inb(0x40) == 0x40 | 0x30 | 0x04 | 0x80  # null count, rw 3, mode 2, OUT high
    w.out(0x40, 0x00)
    w.out(0x40, 0x10)                            # 0x1000
    w.clock.advance_ticks(0x100)
    w.out(0x43, 0xC2)                            # latch count + status of ch0
    w.clock.advance_ticks(0x300)                 # the latch holds the old values
    status = w.inb(0x40)
    assert status & 0x40 == 0 and status & 0x0E == 0x04
    assert w.inb(0x40) | w.inb(0x40) << 8 == 0x0F00
    # a second latch before the first is read is ignored
    w.out(0x43, 0x00)
    w.clock.advance_ticks(0x10)
    w.out(0x43, 0x00)
    first = w.inb(0x40) | w.inb(0x40) << 8
    assert first == 0x1000 - 0x400


def test_lsb_only_msb_only_and_bcd():
    w = Wired()
    w.program(1, 2, 0x80, rw=1)
    w.clock.advance_ticks(0x10)
    assert w.inb(0x41) == 0x70
    w.program(1, 2, 0x1000, rw=2)
    assert w.inb(0x41) == 0x10
    w.program(1, 2, 0x1234, bcd=True)            # BCD 1234
    w.clock.advance_ticks(34)
    assert w.latch_read(1) == 0x1200
    w.program(1, 0, 0, bcd=True)                 # 0 means 10000 in BCD
    w.clock.advance_ticks(1)
    assert w.latch_read(1) == 0x9999


def test_mode0_irq0_single_edge_and_mode4_pulse():
    w = Wired()
    w.program(0, 0, 1193)                        # ~1 ms
    assert w.wheel.run_due() == 0
    w.clock.advance_ticks(1193)
    assert w.wheel.run_due() == 1
    assert w.irq == [True]
    w.clock.advance_ticks(100000)
    assert w.wheel.run_due() == 0
    # Linux's oneshot clockevent: mode 4 (0x38), one interrupt per programmed count
    w.out(0x43, 0x38)
    assert w.irq[-1] is False
    w.out(0x40, 100)
    w.out(0x40, 0)
    w.clock.advance_ticks(101)
    assert w.wheel.run_due() == 1
    w.clock.advance_ticks(100000)
    assert w.wheel.run_due() == 0
    assert w.rising_edges == 2


def test_mode2_irq0_periodic_fake_clock():
    w = Wired()
    w.program(0, 2, PIT_HZ // 100)               # Linux's periodic clockevent at HZ=100
    for _ in range(10):
        w.clock.now += 10_000_000
        w.wheel.run_due()
    assert w.rising_edges == 10


def test_mode2_100hz_real_time():
    w = Wired(threaded=True)
    try:
        t0 = time.monotonic()
        w.program(0, 2, (PIT_HZ + 50) // 100)
        time.sleep(0.1)
        # A loaded host may starve the timer thread for a while: wait (up to 2 s) for the
        # edges the first 0.1 s should have given, and judge the rate by the clock.
        while w.rising_edges < 6 and time.monotonic() - t0 < 2:
            time.sleep(0.01)
        edges = w.rising_edges
        elapsed = time.monotonic() - t0
        w.out(0x43, 0x30)                        # pit_shutdown: mode 0...
        w.out(0x40, 0)
        w.out(0x40, 0)
        assert 6 <= edges <= elapsed * 100 + 4, (edges, elapsed)
    finally:
        w.wheel.close()


def test_tiny_period_is_rate_limited():
    w = Wired()
    w.program(0, 2, 2)                           # 1.7 us period
    w.clock.now += 10_000_000
    for _ in range(1000):
        if not w.wheel.run_due():
            break
    assert w.rising_edges <= 2                   # host did not spin through 6000 edges
    total = 0
    for _ in range(20):
        w.clock.now += 100_000
        total += w.wheel.run_due()
    assert total <= 21


def test_hostile_input(caplog):
    caplog.set_level(logging.DEBUG)
    w = Wired()
    for off in (-1, 0, 1, 2, 3, 4, 100):
        for size in (1, 2, 4, 8):
            w.pit.write(off, size, 2**64 + 7)
            w.pit.read(off, size)
    for v in range(256):
        w.out(0x43, v)
        w.out(0x40, v)
        w.out(0x42, v)
        w.inb(0x40)


@settings(max_examples=150, deadline=None)
@given(count=st.integers(2, 0xFFFF), mode=st.sampled_from([0, 2, 3, 4]),
       steps=st.lists(st.integers(0, 30_000_000), min_size=1, max_size=12))
def test_counter_decreases_within_a_period(count, mode, steps):
    w = Wired()
    w.program(0, mode, count)
    # the counter sweeps once per period in mode 2, twice (by twos) in mode 3
    sweeps = {2: 1, 3: 2}.get(mode)
    start = w.clock.now
    prev = w.pit.channels[0].value(w.clock.now)
    for dt in steps:
        w.clock.now += dt
        cur = w.latch_read(0)
        ticks = (w.clock.now - start) * PIT_HZ // NS
        ticks_prev = (w.clock.now - dt - start) * PIT_HZ // NS
        assert 0 <= cur <= 0xFFFF
        if sweeps:
            if sweeps * ticks // count == sweeps * ticks_prev // count:
                assert cur <= prev
            assert 1 <= cur <= count
            if mode == 3:
                assert cur % 2 == 0
        elif ticks < count:
            assert cur <= prev and cur == count - ticks
        prev = cur


class PitMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.w = Wired()

    @rule(value=st.integers(0, 255))
    def control(self, value):
        self.w.out(0x43, value)

    @rule(ch=st.integers(0, 2), value=st.integers(0, 255))
    def write_counter(self, ch, value):
        self.w.out(0x40 + ch, value)

    @rule(ch=st.integers(0, 2))
    def read_counter(self, ch):
        assert 0 <= self.w.inb(0x40 + ch) <= 0xFF

    @rule(ch=st.integers(0, 2))
    def readback_consistent(self, ch):
        c = self.w.pit.channels[ch]
        if c.latched or c.status_latched is not None or c.read_msb_next:
            return
        self.w.out(0x43, 0xC0 | 2 << ch)         # latch status and count
        status = self.w.inb(0x40 + ch)
        assert (status >> 1) & 7 == c.mode and (status >> 4) & 3 == c.rw_mode
        assert bool(status & 0x80) == c.out(self.w.clock.now)
        expect = c.value(self.w.clock.now)
        if c.bcd:
            expect = int(f"{expect % 10000:04d}", 16)
        self.w.clock.now += 12345                # the latch must not move
        if c.rw_mode == 1:
            assert self.w.inb(0x40 + ch) == expect & 0xFF
        elif c.rw_mode == 2:
            assert self.w.inb(0x40 + ch) == (expect >> 8) & 0xFF
        elif c.rw_mode == 3:
            assert self.w.inb(0x40 + ch) | self.w.inb(0x40 + ch) << 8 == expect & 0xFFFF

    @rule(level=st.booleans())
    def gate(self, level):
        self.w.out(0x61, int(level))

    @rule(dt=st.integers(0, 50_000_000))
    def time_passes(self, dt):
        self.w.clock.now += dt
        self.w.wheel.run_due()

    @invariant()
    def sane(self):
        for c in self.w.pit.channels:
            assert 0 <= c.mode <= 5 and 1 <= c.count <= 0x10000


TestPitMachine = PitMachine.TestCase
TestPitMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])
