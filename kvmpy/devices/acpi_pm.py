"""ACPI fixed hardware: PM1a event/control blocks, the PM timer and GPE0.

One port-I/O device of ``PM_IO_LENGTH`` bytes at ``pm_base`` (0x600 by
default, where QEMU's ICH9 puts it). Offsets inside the block are shared with
the FADT built by kvmpy.boot.acpi:

    +0x00  PM1a_EVT  PM1_STS (2, write 1 to clear) + PM1_EN (2)
    +0x04  PM1a_CNT  SCI_EN, SLP_TYP (bits 12:10), SLP_EN (bit 13, write only)
    +0x08  PM_TMR    3.579545 MHz free-running counter (24 or 32 bit)
    +0x20  GPE0      GPE0_STS (4, write 1 to clear) + GPE0_EN (4)

The machine starts in ACPI mode (SCI_EN set, FADT SMI_CMD = 0: there is no SMM
to hand over from). The SCI is level triggered: ``sci(level)`` is called when
the line changes, level = SCI_EN and any enabled status bit set.

Writing SLP_EN calls ``on_sleep(slp_typ)``; the DSDT's \\_S5 package carries
SLP_TYP_S5, so ``slp_typ == SLP_TYP_S5`` means power off.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .bus import PortSlot
from .saved_state import MAX_RELATIVE_NS, Restorable, StateCheck, checked

log = logging.getLogger(__name__)

PM_BASE_DEFAULT = 0x600
PM_IO_LENGTH = 0x40
SCI_IRQ = 9
# Where QEMU's ICH9 has it; the FADT points here and names SCI_IRQ.
PM_BLOCK = PortSlot(base=PM_BASE_DEFAULT, length=PM_IO_LENGTH, irq=SCI_IRQ)

PM1_EVT_OFFSET = 0x00
PM1_EVT_LENGTH = 4
PM1_CNT_OFFSET = 0x04
PM1_CNT_LENGTH = 2
PM_TMR_OFFSET = 0x08
PM_TMR_LENGTH = 4
GPE0_OFFSET = 0x20
GPE0_LENGTH = 8  # status half + enable half

PM_TIMER_HZ = 3_579_545

# PM1 status / enable bits
TMR_STS = 1 << 0
BM_STS = 1 << 4
GBL_STS = 1 << 5
PWRBTN_STS = 1 << 8
SLPBTN_STS = 1 << 9
RTC_STS = 1 << 10
WAK_STS = 1 << 15
PM1_STS_MASK = TMR_STS | BM_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS | WAK_STS
PM1_EN_MASK = TMR_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS

# PM1 control bits
SCI_EN = 1 << 0
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13
PM1_CNT_RW = SCI_EN | (1 << 1) | (1 << 2) | SLP_TYP_MASK

# What the DSDT's \_S5 package says; any value 0..7 works as long as both agree.
SLP_TYP_S5 = 5


@dataclass(frozen=True)
class PmTimerClock:
    """PM_TMR as a pure function of time.monotonic_ns: ``ticks = (now - origin_ns) *
    PM_TIMER_HZ // 10**9``, its low ``bits`` bits read. What the translator needs to
    answer the timer's reads without an exit (the model stays the source of truth:
    it publishes a new clock when a restore moves the origin)."""

    origin_ns: int
    bits: int


@dataclass(frozen=True)
class AcpiPmState:
    """The PM registers and timer (see kvmpy/devices/saved_state.py)."""

    pm1_status: int
    pm1_enable: int
    pm1_control: int
    gpe0_status: int
    gpe0_enable: int
    timer_bits: int
    # how long the PM timer has been counting: it goes on from there after a restore
    timer_running_for_ns: int
    # the timer's top bit as last seen (TMR_STS is raised when it toggles)
    timer_carry_epoch: int
    # the SCI as driven, not recomputed: a TMR_STS a read latches only reaches
    # the line at the next register write or event
    sci_level: bool

    def validate(self) -> None:
        check = StateCheck(self)
        check.bits("pm1_status", self.pm1_status, PM1_STS_MASK)
        check.bits("pm1_enable", self.pm1_enable, PM1_EN_MASK)
        check.bits("pm1_control", self.pm1_control, PM1_CNT_RW)
        check.integer("gpe0_status", self.gpe0_status, 0, 0xFFFFFFFF)
        check.integer("gpe0_enable", self.gpe0_enable, 0, 0xFFFFFFFF)
        if check.integer("timer_bits", self.timer_bits, 24, 32) not in (24, 32):
            raise check.fail("timer_bits", f"{self.timer_bits!r} is not 24 or 32")
        check.integer("timer_running_for_ns", self.timer_running_for_ns, 0, MAX_RELATIVE_NS)
        check.integer("timer_carry_epoch", self.timer_carry_epoch, 0, MAX_RELATIVE_NS)
        check.flag("sci_level", self.sci_level)


class AcpiPm(Restorable):
    def __init__(self, on_sleep: Callable[[int], None],
                 sci: Callable[[bool], None] | None = None,
                 timer_32bit: bool = True,
                 clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._on_sleep = on_sleep
        self._sci = sci or (lambda level: None)
        self._clock_ns = clock_ns
        self.timer_bits = 32 if timer_32bit else 24
        self._lock = threading.Lock()
        self._t0 = clock_ns()
        self._sci_level = False
        self.pm1_sts = 0
        self.pm1_en = 0
        self.pm1_cnt = SCI_EN
        self.gpe_sts = 0
        self.gpe_en = 0
        self._timer_epoch = 0
        # Called with the new timer_clock when a restore moves the counter's origin:
        # an accelerator answering PM_TMR reads itself must follow (kvmpy.machine).
        self.timer_clock_changed: list[Callable[[PmTimerClock | None], None]] = []

    # ------------------------------------------------------------ saved state
    def state(self) -> AcpiPmState:
        with self._lock:
            return AcpiPmState(
                pm1_status=self.pm1_sts, pm1_enable=self.pm1_en, pm1_control=self.pm1_cnt,
                gpe0_status=self.gpe_sts, gpe0_enable=self.gpe_en, timer_bits=self.timer_bits,
                timer_running_for_ns=self._clock_ns() - self._t0,
                timer_carry_epoch=self._timer_epoch, sci_level=self._sci_level)

    def restore(self, state: AcpiPmState) -> None:
        """Take over ``state`` (StateError and no change if it is malformed)."""
        state = checked(state, AcpiPmState)
        if state.timer_bits != self.timer_bits:
            # the FADT told the guest this machine's width
            raise StateCheck(state).fail("timer_bits", f"{state.timer_bits}, but this PM timer has "
                                         f"{self.timer_bits} bits")
        with self._lock:
            self.pm1_sts = state.pm1_status
            self.pm1_en = state.pm1_enable
            self.pm1_cnt = state.pm1_control
            self.gpe_sts = state.gpe0_status
            self.gpe_en = state.gpe0_enable
            self._t0 = self._clock_ns() - state.timer_running_for_ns
            self._timer_epoch = state.timer_carry_epoch
            if state.sci_level != self._sci_level:
                self._sci_level = state.sci_level
                self._sci(state.sci_level)
        clock = self.timer_clock
        for listener in self.timer_clock_changed:
            listener(clock)

    # ------------------------------------------------------------ timer
    def _ticks(self, now_ns: int) -> int:
        return (now_ns - self._t0) * PM_TIMER_HZ // 1_000_000_000

    def timer_value(self, now_ns: int | None = None) -> int:
        """The counter at ``now_ns`` (this device's clock; now if not given)."""
        if now_ns is None:
            now_ns = self._clock_ns()
        return self._ticks(now_ns) & ((1 << self.timer_bits) - 1)

    @property
    def timer_clock(self) -> PmTimerClock | None:
        """The counter as a pure function of time.monotonic_ns, for an accelerator that
        answers PM_TMR reads itself; None when this model keeps another clock (tests)."""
        if self._clock_ns is not time.monotonic_ns:
            return None
        with self._lock:
            return PmTimerClock(origin_ns=self._t0, bits=self.timer_bits)

    def _note_timer_carry(self, now_ns: int) -> None:
        # TMR_STS is set whenever the counter's top bit toggles
        epoch = self._ticks(now_ns) >> (self.timer_bits - 1)
        if epoch != self._timer_epoch:
            self._timer_epoch = epoch
            self.pm1_sts |= TMR_STS

    # ------------------------------------------------------------ SCI
    def _update_sci(self) -> None:
        level = bool(self.pm1_cnt & SCI_EN) and bool(
            (self.pm1_sts & self.pm1_en & PM1_EN_MASK) or (self.gpe_sts & self.gpe_en))
        if level != self._sci_level:
            self._sci_level = level
            self._sci(level)

    def press_power_button(self) -> None:
        """The host asked for an ACPI shutdown (the guest's OS decides what to do)."""
        with self._lock:
            self.pm1_sts |= PWRBTN_STS
            self._update_sci()

    def raise_gpe(self, bit: int) -> None:
        """Set GPE0 status bit ``bit`` (e.g. for hotplug notifications)."""
        with self._lock:
            self.gpe_sts |= 1 << (bit & 31)
            self._update_sci()

    @property
    def sci_level(self) -> bool:
        return self._sci_level

    # ------------------------------------------------------------ registers
    def _read_reg(self, offset: int, now_ns: int) -> tuple[int, int]:
        """(value of the register containing ``offset`` at ``now_ns``, its start offset)."""
        if PM1_EVT_OFFSET <= offset < PM1_EVT_OFFSET + 2:
            self._note_timer_carry(now_ns)
            return self.pm1_sts, PM1_EVT_OFFSET
        if PM1_EVT_OFFSET + 2 <= offset < PM1_EVT_OFFSET + 4:
            return self.pm1_en, PM1_EVT_OFFSET + 2
        if PM1_CNT_OFFSET <= offset < PM1_CNT_OFFSET + PM1_CNT_LENGTH:
            return self.pm1_cnt & ~SLP_EN, PM1_CNT_OFFSET
        if PM_TMR_OFFSET <= offset < PM_TMR_OFFSET + PM_TMR_LENGTH:
            return self.timer_value(now_ns), PM_TMR_OFFSET
        if GPE0_OFFSET <= offset < GPE0_OFFSET + 4:
            return self.gpe_sts, GPE0_OFFSET
        if GPE0_OFFSET + 4 <= offset < GPE0_OFFSET + 8:
            return self.gpe_en, GPE0_OFFSET + 4
        return 0, offset

    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4):
            log.debug("acpi-pm: %d-byte read at %#x", size, offset)
            size = max(1, min(size, 4))
        with self._lock:
            # Assembled byte by byte so unaligned or straddling reads are exact, all
            # bytes at one instant: a clock read per byte let a carry between two bytes
            # make the counter jump 256 ticks ahead and then back (Linux's acpi_pm
            # monotonicity check saw it and refused the PM timer).
            now = self._clock_ns()
            value = 0
            for i in range(size):
                reg, start = self._read_reg(offset + i, now)
                value |= ((reg >> (8 * (offset + i - start))) & 0xFF) << (8 * i)
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4):
            log.debug("acpi-pm: %d-byte write at %#x ignored", size, offset)
            return
        value &= (1 << (8 * size)) - 1
        with self._lock:
            for i in range(size):
                self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)
            self._update_sci()

    def _write_byte(self, offset: int, byte: int) -> None:
        if PM1_EVT_OFFSET <= offset < PM1_EVT_OFFSET + 2:
            shift = 8 * (offset - PM1_EVT_OFFSET)
            self.pm1_sts &= ~((byte << shift) & PM1_STS_MASK)
        elif PM1_EVT_OFFSET + 2 <= offset < PM1_EVT_OFFSET + 4:
            shift = 8 * (offset - PM1_EVT_OFFSET - 2)
            self.pm1_en = ((self.pm1_en & ~(0xFF << shift)) | (byte << shift)) & PM1_EN_MASK
        elif PM1_CNT_OFFSET <= offset < PM1_CNT_OFFSET + PM1_CNT_LENGTH:
            shift = 8 * (offset - PM1_CNT_OFFSET)
            full = (self.pm1_cnt & ~(0xFF << shift)) | (byte << shift)
            self.pm1_cnt = full & PM1_CNT_RW
            if full & SLP_EN:
                slp_typ = (full & SLP_TYP_MASK) >> SLP_TYP_SHIFT
                log.info("acpi-pm: guest entered sleep type %d", slp_typ)
                self._on_sleep(slp_typ)
        elif GPE0_OFFSET <= offset < GPE0_OFFSET + 4:
            shift = 8 * (offset - GPE0_OFFSET)
            self.gpe_sts &= ~(byte << shift)
        elif GPE0_OFFSET + 4 <= offset < GPE0_OFFSET + 8:
            shift = 8 * (offset - GPE0_OFFSET - 4)
            self.gpe_en = (self.gpe_en & ~(0xFF << shift)) | (byte << shift)
        # PM timer and the gaps are read only / reserved
