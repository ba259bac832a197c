"""Intel 8254 programmable interval timer (ports 0x40-0x43), in software.

Used when the guest runs on the translator. Three channels clocked at
1.193182 MHz; a counter's value and output are *computed* from host
CLOCK_MONOTONIC when read (no thread ticks them). Channel 0's output drives ISA
IRQ0: the next rising edge is scheduled on the machine's shared TimerWheel.
Channel 2's gate and output belong to port 0x61 (``gate2(level)``, ``out2()``).

Supported: modes 0-5 (6 and 7 alias 2 and 3), LSB / MSB / LSB-then-MSB access,
counter latch, read-back (count and status latches), the status byte (OUT, null
count, access mode, mode, BCD), BCD counting, gates (low suspends counting in
modes 0, 2, 3, 4; a rising edge restarts modes 1, 2, 3, 5).

Deliberate simplifications, all invisible to Linux (drivers/clocksource/i8253.c,
arch/x86/kernel/tsc.c): a count written while counting takes effect at once
(the datasheet waits for the end of the period in modes 2 and 3), and IRQ0 is
presented to the edge-triggered interrupt controllers as a pulse at each rising
edge of OUT0 (modes 2-5) or as a level that rises at terminal count (modes 0, 1),
rather than as the exact OUT0 waveform. Periodic IRQ0 edges closer than
MIN_PERIOD_NS apart are spaced out so a guest cannot make the host spin; the
counter keeps the programmed rate.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .saved_state import MAX_RELATIVE_NS, Restorable, StateCheck, checked

log = logging.getLogger(__name__)

PIT_HZ = 1_193_182
MIN_PERIOD_NS = 100_000
NS = 1_000_000_000

RW_LATCH = 0
RW_LSB = 1
RW_MSB = 2
RW_WORD = 3


def _to_bcd(value: int) -> int:
    value %= 10000
    return (value // 1000) << 12 | (value // 100 % 10) << 8 | (value // 10 % 10) << 4 | value % 10


def _from_bcd(value: int) -> int:
    return ((value >> 12) & 0xF) * 1000 + ((value >> 8) & 0xF) * 100 + ((value >> 4) & 0xF) * 10 + (value & 0xF)


@dataclass(frozen=True)
class PitChannelState:
    """One counter (see kvmpy/devices/saved_state.py)."""

    gate: bool
    mode: int
    access: int             # RW_LSB, RW_MSB or RW_WORD
    bcd: bool
    count: int              # the effective reload value
    loaded: bool
    null_count: bool
    ticks_before_run: int   # ticks counted before the current run began
    # how long the current run has lasted (None: not counting)
    running_for_ns: int | None
    write_msb_next: bool
    write_latch: int
    read_msb_next: bool
    latched_count: bytes    # latched count bytes not yet read, in reading order
    latched_status: int | None
    out_at_program: bool

    def validate(self) -> None:
        check = StateCheck(self)
        check.flag("gate", self.gate)
        check.integer("mode", self.mode, 0, 5)
        check.integer("access", self.access, RW_LSB, RW_WORD)
        check.flag("bcd", self.bcd)
        check.integer("count", self.count, 1, 0x10000)
        check.flag("loaded", self.loaded)
        check.flag("null_count", self.null_count)
        check.integer("ticks_before_run", self.ticks_before_run, 0, MAX_RELATIVE_NS)
        check.optional_integer("running_for_ns", self.running_for_ns, 0, MAX_RELATIVE_NS)
        check.flag("write_msb_next", self.write_msb_next)
        check.integer("write_latch", self.write_latch, 0, 0xFF)
        check.flag("read_msb_next", self.read_msb_next)
        check.data("latched_count", self.latched_count, max_length=2)
        check.optional_integer("latched_status", self.latched_status, 0, 0xFF)
        check.flag("out_at_program", self.out_at_program)


@dataclass(frozen=True)
class PitState:
    channels: tuple[PitChannelState, ...]
    irq0_level: bool
    # when channel 0's next IRQ0 edge is due, relative to the state's moment
    irq0_due_in_ns: int | None

    def validate(self) -> None:
        check = StateCheck(self)
        if type(self.channels) is not tuple or len(self.channels) != 3:
            raise check.fail("channels", "expected a tuple of 3 PitChannelState")
        for channel in self.channels:
            checked(channel, PitChannelState)
        check.flag("irq0_level", self.irq0_level)
        check.optional_relative_ns("irq0_due_in_ns", self.irq0_due_in_ns)


class PitChannel:
    def __init__(self, index: int) -> None:
        self.index = index
        self.gate = index != 2          # channels 0 and 1 are hard-wired high on a PC
        self.mode = 0
        self.rw_mode = RW_WORD
        self.bcd = False
        self.count = 0x10000            # effective reload value (0 programs 65536 / 10000)
        self.loaded = False             # a count has been written since the control word
        self.null_count = True
        self.base_ticks = 0             # ticks counted before run_since
        self.run_since: int | None = None
        self.write_msb_next = False
        self.write_latch = 0
        self.read_msb_next = False
        self.latched: list[int] = []    # bytes of a latched count, read in order
        self.status_latched: int | None = None
        self.out_at_program = False     # OUT right after the control word (mode dependent)

    def state(self, now: int) -> PitChannelState:
        return PitChannelState(
            gate=self.gate, mode=self.mode, access=self.rw_mode, bcd=self.bcd, count=self.count,
            loaded=self.loaded, null_count=self.null_count, ticks_before_run=self.base_ticks,
            running_for_ns=None if self.run_since is None else now - self.run_since,
            write_msb_next=self.write_msb_next, write_latch=self.write_latch,
            read_msb_next=self.read_msb_next, latched_count=bytes(self.latched),
            latched_status=self.status_latched, out_at_program=self.out_at_program)

    def restore(self, state: PitChannelState, now: int) -> None:
        """Take over a validated ``state``."""
        self.gate = state.gate
        self.mode = state.mode
        self.rw_mode = state.access
        self.bcd = state.bcd
        self.count = state.count
        self.loaded = state.loaded
        self.null_count = state.null_count
        self.base_ticks = state.ticks_before_run
        self.run_since = None if state.running_for_ns is None else now - state.running_for_ns
        self.write_msb_next = state.write_msb_next
        self.write_latch = state.write_latch
        self.read_msb_next = state.read_msb_next
        self.latched = list(state.latched_count)
        self.status_latched = state.latched_status
        self.out_at_program = state.out_at_program

    def elapsed(self, now: int) -> int:
        if self.run_since is None:
            return self.base_ticks
        return self.base_ticks + max(0, now - self.run_since) * PIT_HZ // NS

    def value(self, now: int) -> int:
        """The counting element, as the guest reads it (before BCD conversion)."""
        if not self.loaded:
            return 0
        d = self.elapsed(now)
        n = self.count
        mode = self.mode
        if mode == 2:
            return n - d % n
        if mode == 3:
            # two sweeps per output period, by twos; an odd count never reads 0 or 1
            return max((n - (2 * d) % n) & 0x1FFFE, 2) if n > 1 else 0
        # modes 0, 1, 4, 5: counting on past terminal count, wrapping
        return (n - d) % (10000 if self.bcd else 0x10000)

    def out(self, now: int) -> bool:
        if not self.loaded:
            return self.out_at_program
        mode = self.mode
        if mode in (2, 3) and not self.gate:
            return True
        d = self.elapsed(now)
        n = self.count
        if mode in (0, 1):
            return d >= n
        if mode == 2:
            return d == 0 or d % n != n - 1
        if mode == 3:
            return d % n < (n + 1) // 2
        # modes 4, 5: one low clock at terminal count
        return d != n

    def next_edge_tick(self, now: int) -> int | None:
        """Elapsed-tick count at which channel 0 raises IRQ0 next, or None."""
        if not self.loaded or self.run_since is None:
            return None
        d = self.elapsed(now)
        n = self.count
        if self.mode in (0, 1, 4, 5):
            edge = n if self.mode in (0, 1) else n + 1
            return edge if d < edge else None
        return (d // n + 1) * n      # modes 2, 3: one edge per period

    def tick_time(self, tick: int) -> int:
        assert self.run_since is not None
        return self.run_since + -(-(tick - self.base_ticks) * NS // PIT_HZ)


class Pit8254(Restorable):
    """The three-channel PIT; ``irq0(level)`` is ISA IRQ0."""

    BASE_PORT = 0x40

    def __init__(self, irq0: Callable[[bool], None] | None = None, timer_wheel=None,
                 clock: Callable[[], int] | None = None,
                 lock: threading.RLock | None = None) -> None:
        self._irq0 = irq0 or (lambda level: None)
        self._lock = lock if lock is not None else threading.RLock()
        if clock is None:
            clock = timer_wheel.clock if timer_wheel is not None else time.monotonic_ns
        self._clock = clock
        self._timer = timer_wheel.timer(self._irq0_edge) if timer_wheel is not None else None
        self._gen = 0
        self._irq0_deadline: int | None = None   # when the armed IRQ0 edge is due
        self._irq_level = False
        self.irq0_edges = 0
        self.channels = [PitChannel(i) for i in range(3)]

    def register(self, pio_bus) -> None:
        pio_bus.register(self.BASE_PORT, 4, self)

    def reset(self) -> None:
        with self._lock:
            self.channels = [PitChannel(i) for i in range(3)]
            self._set_irq0(False)
            self._reschedule()

    # ---- saved state ----

    def state(self) -> PitState:
        with self._lock:
            now = self._clock()
            return PitState(
                channels=tuple(ch.state(now) for ch in self.channels), irq0_level=self._irq_level,
                irq0_due_in_ns=None if self._irq0_deadline is None else self._irq0_deadline - now)

    def restore(self, state: PitState) -> None:
        """Take over ``state`` (StateError and no change if it is malformed)."""
        state = checked(state, PitState)
        with self._lock:
            now = self._clock()
            for ch, saved in zip(self.channels, state.channels):
                ch.restore(saved, now)
            self._gen += 1
            self._irq0_deadline = None
            if self._timer is not None:
                self._timer.cancel()
            if state.irq0_due_in_ns is not None:
                self._arm_irq0(now + state.irq0_due_in_ns)
            self._set_irq0(state.irq0_level)

    # ---- port 0x61 side ----

    def gate2(self, level: bool) -> None:
        with self._lock:
            self._set_gate(self.channels[2], bool(level), self._clock())

    def out2(self) -> bool:
        with self._lock:
            return self.channels[2].out(self._clock())

    def _set_gate(self, ch: PitChannel, level: bool, now: int) -> None:
        if level == ch.gate:
            return
        ch.gate = level
        if not ch.loaded:
            return
        if level:
            if ch.mode in (1, 2, 3, 5):       # rising edge (re)triggers
                ch.base_ticks = 0
                ch.run_since = now
            elif ch.mode in (0, 4):           # counting resumes where it stopped
                ch.run_since = now
        elif ch.mode in (0, 2, 3, 4) and ch.run_since is not None:
            ch.base_ticks = ch.elapsed(now)
            ch.run_since = None
        if ch.index == 0:
            self._reschedule()

    # ---- bus protocol ----

    def read(self, offset: int, size: int) -> int:
        if not isinstance(offset, int) or not 0 <= offset < 3:
            log.debug("pit: read at offset %r (size %r)", offset, size)
            return (1 << (8 * min(max(size, 1), 8))) - 1 if isinstance(size, int) else 0xFF
        if size != 1:
            log.debug("pit: %d-byte read of counter %d, low byte only", size, offset)
        with self._lock:
            return self._read_counter(self.channels[offset], self._clock())

    def write(self, offset: int, size: int, value: int) -> None:
        if not isinstance(offset, int) or not 0 <= offset < 4:
            log.debug("pit: write at offset %r dropped", offset)
            return
        if size != 1:
            log.debug("pit: %d-byte write at offset %d, low byte only", size, offset)
        value = int(value) & 0xFF
        with self._lock:
            now = self._clock()
            if offset == 3:
                self._control(value, now)
            else:
                self._write_counter(self.channels[offset], value, now)

    # ---- internals ----

    def _status(self, ch: PitChannel, now: int) -> int:
        return ((0x80 if ch.out(now) else 0) | (0x40 if ch.null_count else 0) |
                ch.rw_mode << 4 | ch.mode << 1 | (1 if ch.bcd else 0))

    def _latch_count(self, ch: PitChannel, now: int) -> None:
        if ch.latched:
            return                         # a second latch before reading is ignored
        v = ch.value(now)
        if ch.bcd:
            v = _to_bcd(v)
        v &= 0xFFFF
        if ch.rw_mode == RW_LSB:
            ch.latched = [v & 0xFF]
        elif ch.rw_mode == RW_MSB:
            ch.latched = [v >> 8]
        else:
            ch.latched = [v & 0xFF, v >> 8]

    def _control(self, value: int, now: int) -> None:
        sel = value >> 6
        if sel == 3:                       # read-back
            for i in range(3):
                if not value & (2 << i):
                    continue
                ch = self.channels[i]
                if not value & 0x20:
                    self._latch_count(ch, now)
                if not value & 0x10 and ch.status_latched is None:
                    ch.status_latched = self._status(ch, now)
            return
        ch = self.channels[sel]
        rw = (value >> 4) & 3
        if rw == RW_LATCH:
            self._latch_count(ch, now)
            return
        mode = (value >> 1) & 7
        if mode > 5:
            mode -= 4
        ch.rw_mode = rw
        ch.mode = mode
        ch.bcd = bool(value & 1)
        ch.loaded = False
        ch.null_count = True
        ch.run_since = None
        ch.base_ticks = 0
        ch.write_msb_next = False
        ch.read_msb_next = False
        ch.latched = []
        ch.status_latched = None
        ch.out_at_program = mode != 0      # mode 0 drives OUT low; the others high
        if ch.index == 0:
            self._set_irq0(False)
            self._reschedule()

    def _write_counter(self, ch: PitChannel, value: int, now: int) -> None:
        if ch.rw_mode == RW_LSB:
            self._load(ch, value, now)
        elif ch.rw_mode == RW_MSB:
            self._load(ch, value << 8, now)
        elif not ch.write_msb_next:
            ch.write_latch = value
            ch.write_msb_next = True
            if ch.mode == 0 and ch.loaded:
                # mode 0: writing the first byte stops the count
                ch.base_ticks = ch.elapsed(now)
                ch.run_since = None
                if ch.index == 0:
                    self._reschedule()
        else:
            ch.write_msb_next = False
            self._load(ch, ch.write_latch | value << 8, now)

    def _load(self, ch: PitChannel, raw: int, now: int) -> None:
        if ch.bcd:
            raw = _from_bcd(raw)
            count = raw if raw else 10000
        else:
            count = raw if raw else 0x10000
        ch.count = count
        ch.loaded = True
        ch.null_count = False
        ch.base_ticks = 0
        # modes 1 and 5 wait for a gate edge on real parts; channels 0/1 have their
        # gate tied high, so like QEMU they simply start
        ch.run_since = now if (ch.gate or ch.mode in (1, 5)) else None
        if ch.index == 0:
            self._set_irq0(False)
            self._reschedule()

    def _read_counter(self, ch: PitChannel, now: int) -> int:
        if ch.status_latched is not None:
            v, ch.status_latched = ch.status_latched, None
            return v
        if ch.latched:
            return ch.latched.pop(0)
        v = ch.value(now)
        if ch.bcd:
            v = _to_bcd(v)
        v &= 0xFFFF
        if ch.rw_mode == RW_LSB:
            return v & 0xFF
        if ch.rw_mode == RW_MSB:
            return v >> 8
        if ch.read_msb_next:
            ch.read_msb_next = False
            return v >> 8
        ch.read_msb_next = True
        return v & 0xFF

    # ---- IRQ0 ----

    def _set_irq0(self, level: bool) -> None:
        if level != self._irq_level:
            self._irq_level = level
            self._irq0(level)

    def _reschedule(self, not_before: int = 0) -> None:
        self._gen += 1
        if self._timer is None:
            return
        ch = self.channels[0]
        now = self._clock()
        tick = ch.next_edge_tick(now)
        if tick is None:
            self._irq0_deadline = None
            self._timer.cancel()
            return
        self._arm_irq0(max(ch.tick_time(tick), not_before))

    def _arm_irq0(self, deadline: int) -> None:
        if self._timer is not None:
            self._irq0_deadline = deadline
            self._timer.arm(deadline, self._gen)

    def _irq0_edge(self, deadline: int, token=None) -> None:
        with self._lock:
            if token != self._gen:
                return
            self._irq0_deadline = None
            ch = self.channels[0]
            self.irq0_edges += 1
            if ch.mode in (0, 1):
                self._set_irq0(True)       # OUT stays high until reprogrammed
                self._gen += 1
                return
            self._set_irq0(True)
            self._set_irq0(False)
            if ch.mode in (2, 3):
                self._reschedule(not_before=deadline + MIN_PERIOD_NS)
            else:
                self._gen += 1
