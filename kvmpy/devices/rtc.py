"""MC146818 RTC + CMOS NVRAM at 0x70 (index, bit 7 = NMI disable) / 0x71 (data).

Time is the host's UTC clock plus an offset the guest sets by writing the time
registers (hwclock --systohc). Registers are encoded per register B (BCD or
binary, 12 or 24 hour); the century is byte 0x32 (the FADT points there).

UIP is set in the last 244 us of every second, as on the real part, so Linux's
mc146818_get_time() retry loop sees the behaviour it was written for; with SET
in register B the clock is frozen and the guest's writes take effect when SET is
cleared. Register C's flags (UF, PF, AF, IRQF) are computed from elapsed time
when it is read. With an ``irq`` line and a timer wheel, an enabled flag (B's
PIE/AIE/UIE) raises IRQ 8 when it comes due, until the guest reads register C,
as Linux's rtc-cmos expects for alarms (rtcwake) and update interrupts (hwclock).
The periodic rate is capped at 1024 Hz (the part's default; faster rates would
only burn host time).

CMOS bytes follow what QEMU's pc_cmos_init stores for SeaBIOS: memory sizes at
0x15-0x18/0x30-0x31 (KiB), 0x34-0x35 (64 KiB units above 16 MiB),
0x5b-0x5d (64 KiB units above 4 GiB), CPUs-1 at 0x5f, equipment at 0x14.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .bus import PortSlot
from .saved_state import Restorable, StateCheck, checked

log = logging.getLogger(__name__)

INDEX_PORT = 0x70
PORT_COUNT = 2
RTC_IRQ = 8
RTC = PortSlot(base=INDEX_PORT, length=PORT_COUNT, irq=RTC_IRQ)

REG_SECONDS, REG_SECONDS_ALARM = 0x00, 0x01
REG_MINUTES, REG_MINUTES_ALARM = 0x02, 0x03
REG_HOURS, REG_HOURS_ALARM = 0x04, 0x05
REG_DAY_OF_WEEK, REG_DAY_OF_MONTH, REG_MONTH, REG_YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_EQUIPMENT = 0x14
REG_CENTURY = 0x32
TIME_REGS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_DAY_OF_WEEK, REG_DAY_OF_MONTH,
             REG_MONTH, REG_YEAR, REG_CENTURY)

A_UIP = 0x80
A_DV_32K = 0x20  # divider chain: 32.768 kHz time base, running
A_RS_1024HZ = 0x06

B_SET, B_PIE, B_AIE, B_UIE = 0x80, 0x40, 0x20, 0x10
B_SQWE, B_DM_BINARY, B_24H, B_DSE = 0x08, 0x04, 0x02, 0x01

C_IRQF, C_PF, C_AF, C_UF = 0x80, 0x40, 0x20, 0x10
D_VRT = 0x80

UIP_WINDOW = 244e-6
MIN_PERIOD = 1 / 1024
KiB, MiB = 1024, 1024 * 1024


_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def days_in_month(year: int, month: int) -> int:
    """What calendar.monthrange gives as a month's length. The calendar module is
    not imported: it brings datetime and locale, a few percent of a VM's start-up."""
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    return 29 if month == 2 and leap else _DAYS_IN_MONTH[month - 1]


def utc_seconds(year: int, month: int, mday: int, hour: int, minute: int, sec: int) -> int:
    """What calendar.timegm gives for that UTC time (proleptic Gregorian calendar):
    days since 1970-01-01 counted in 400-year eras of years that start in March, so
    that February's leap day is the last day of its year."""
    y = year - (month <= 2)
    era = y // 400
    year_of_era = y - era * 400
    day_of_year = (153 * (month - 3 if month > 2 else month + 9) + 2) // 5 + mday - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    days = era * 146097 + day_of_era - 719468       # 719468: 0000-03-01 to 1970-01-01
    return ((days * 24 + hour) * 60 + minute) * 60 + sec


# The guest can only set years 1900-9999 (century byte 19..99); a saved guest time
# is held to about that span, a day's margin either side.
EARLIEST_GUEST_TIME = utc_seconds(1900, 1, 1, 0, 0, 0) - 86400
LATEST_GUEST_TIME = utc_seconds(9999, 12, 31, 23, 59, 59) + 86400


@dataclass(frozen=True)
class RtcState:
    """The RTC's clock, registers and CMOS (see kvmpy/devices/saved_state.py).

    The guest's time is the host's wall clock plus ``guest_offset_s``: the RTC is
    battery-backed, so after a restore it shows the current time in the guest's
    timezone and setting, not the moment the state was taken. ``flags_since`` (when
    register C was last read) is a guest time for the same reason.
    """

    guest_offset_s: float
    index: int
    nmi_disabled: bool
    cmos: bytes
    # the time registers (TIME_REGS order) while register B's SET bit holds the clock
    frozen_time: tuple[int, ...] | None
    flags_since: float
    irq_level: bool
    # when the IRQ 8 timer fires next, relative to the timer wheel's clock
    timer_due_in_ns: int | None

    def validate(self) -> None:
        check = StateCheck(self)
        span = LATEST_GUEST_TIME - EARLIEST_GUEST_TIME
        check.seconds("guest_offset_s", self.guest_offset_s, -span, span)
        check.integer("index", self.index, 0, 0x7F)
        check.flag("nmi_disabled", self.nmi_disabled)
        check.data("cmos", self.cmos, length=128)
        if self.cmos[REG_A] & A_UIP:
            raise check.fail("cmos", "register A has UIP stored (it is computed)")
        if self.frozen_time is not None:
            check.integers("frozen_time", self.frozen_time, len(TIME_REGS), 0, 0xFF)
        if (self.frozen_time is not None) != bool(self.cmos[REG_B] & B_SET):
            raise check.fail("frozen_time", "present exactly when register B has SET")
        check.seconds("flags_since", self.flags_since, EARLIEST_GUEST_TIME, LATEST_GUEST_TIME)
        check.flag("irq_level", self.irq_level)
        check.optional_relative_ns("timer_due_in_ns", self.timer_due_in_ns)


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def _from_bcd(v: int) -> int | None:
    hi, lo = v >> 4, v & 0x0F
    if hi > 9 or lo > 9:
        return None
    return hi * 10 + lo


class RtcCmos(Restorable):
    def __init__(self, ram_below_4g: int, ram_above_4g: int = 0, num_cpus: int = 1,
                 clock: Callable[[], float] = time.time,
                 irq: Callable[[bool], None] | None = None, timer_wheel=None) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._irq = irq
        self._irq_level = False
        self._wheel = timer_wheel if irq is not None else None
        self._timer = self._wheel.timer(self._timer_fired) if self._wheel is not None else None
        self._timer_deadline: int | None = None   # on the wheel's clock, while armed
        self._timer_generation = 0                # tells a stale expiry from the armed one
        self.offset = 0.0  # guest time - host time, seconds
        self.index = 0
        self.nmi_disabled = False
        self.cmos = bytearray(128)
        self.cmos[REG_A] = A_DV_32K | A_RS_1024HZ
        self.cmos[REG_B] = B_24H
        self.frozen: dict[int, int] | None = None  # time registers while SET is on
        self._c_since = self._now()
        self._fill_cmos(ram_below_4g, ram_above_4g, num_cpus)

    # ---------------------------------------------------------- NVRAM
    def _fill_cmos(self, below: int, above: int, num_cpus: int) -> None:
        c = self.cmos
        c[REG_EQUIPMENT] = 0x02  # math coprocessor present, EGA/VGA, no floppy
        base = min(below // KiB, 640)
        c[0x15], c[0x16] = base & 0xFF, base >> 8
        ext = min(max(below - MiB, 0) // KiB, 0xFFFF)
        c[0x17], c[0x18] = ext & 0xFF, ext >> 8
        c[0x30], c[0x31] = ext & 0xFF, ext >> 8
        high = min(max(below - 16 * MiB, 0) // (64 * KiB), 0xFFFF)
        c[0x34], c[0x35] = high & 0xFF, high >> 8
        above64k = min(max(above, 0) // (64 * KiB), 0xFFFFFF)
        c[0x5B], c[0x5C], c[0x5D] = above64k & 0xFF, (above64k >> 8) & 0xFF, above64k >> 16
        c[0x5F] = max(0, min(num_cpus - 1, 0xFF))
        self._update_checksum()

    def _update_checksum(self) -> None:
        s = sum(self.cmos[0x10:0x2E])
        self.cmos[0x2E], self.cmos[0x2F] = s >> 8, s & 0xFF

    # ---------------------------------------------------------- clock
    def _now(self) -> float:
        return self._clock() + self.offset

    @property
    def binary(self) -> bool:
        return bool(self.cmos[REG_B] & B_DM_BINARY)

    def _enc(self, v: int) -> int:
        return v if self.binary else _bcd(v)

    def _dec(self, v: int) -> int | None:
        return v if self.binary else _from_bcd(v)

    def _enc_hour(self, hour: int) -> int:
        if self.cmos[REG_B] & B_24H:
            return self._enc(hour)
        h12 = hour % 12 or 12
        return self._enc(h12) | (0x80 if hour >= 12 else 0)

    def _dec_hour(self, v: int) -> int | None:
        if self.cmos[REG_B] & B_24H:
            return self._dec(v)
        h = self._dec(v & 0x7F)
        if h is None or not 1 <= h <= 12:
            return None
        return (h % 12) + (12 if v & 0x80 else 0)

    def _time_registers(self, t: float) -> dict[int, int]:
        tm = time.gmtime(math.floor(t))
        return {
            REG_SECONDS: self._enc(tm.tm_sec % 60),
            REG_MINUTES: self._enc(tm.tm_min),
            REG_HOURS: self._enc_hour(tm.tm_hour),
            REG_DAY_OF_WEEK: self._enc((tm.tm_wday + 1) % 7 + 1),
            REG_DAY_OF_MONTH: self._enc(tm.tm_mday),
            REG_MONTH: self._enc(tm.tm_mon),
            REG_YEAR: self._enc(tm.tm_year % 100),
            REG_CENTURY: self._enc(tm.tm_year // 100),
        }

    def _decode_time(self, regs: dict[int, int]) -> int | None:
        sec, minute = self._dec(regs[REG_SECONDS]), self._dec(regs[REG_MINUTES])
        hour = self._dec_hour(regs[REG_HOURS])
        mday, mon = self._dec(regs[REG_DAY_OF_MONTH]), self._dec(regs[REG_MONTH])
        yy, cc = self._dec(regs[REG_YEAR]), self._dec(regs[REG_CENTURY])
        if None in (sec, minute, hour, mday, mon, yy):
            return None
        if cc is None or not 19 <= cc <= 99:
            cc = 20 if yy < 70 else 19
        year = cc * 100 + yy
        if not (sec < 60 and minute < 60 and hour < 24 and 1 <= mon <= 12
                and 1 <= mday <= days_in_month(year, mon)):
            return None
        return utc_seconds(year, mon, mday, hour, minute, sec)

    def _set_time_from(self, regs: dict[int, int]) -> None:
        epoch = self._decode_time(regs)
        if epoch is None:
            log.debug("rtc: guest wrote an invalid time %s, clock unchanged",
                      {hex(k): hex(v) for k, v in regs.items()})
            return
        # keep the phase of the second so UIP and update flags stay regular
        frac = self._now() % 1.0
        self.offset = epoch + frac - self._clock()

    # ---------------------------------------------------------- flags
    def _periodic_period(self) -> float | None:
        rs = self.cmos[REG_A] & 0x0F
        if rs == 0:
            return None
        if rs < 3:
            rs += 7  # RS 1/2 alias 256/128 Hz with a 32.768 kHz base
        return (1 << (rs - 1)) / 32768.0

    def _alarm_matches(self, second: int) -> bool:
        regs = self._time_registers(second)
        for alarm, reg in ((REG_SECONDS_ALARM, REG_SECONDS), (REG_MINUTES_ALARM, REG_MINUTES),
                           (REG_HOURS_ALARM, REG_HOURS)):
            a = self.cmos[alarm]
            if a & 0xC0 == 0xC0:
                continue  # "don't care"
            if a != regs[reg]:
                return False
        return True

    def _reg_c(self, now: float, since: float | None = None) -> int:
        if self.frozen is not None:
            return 0
        last = self._c_since if since is None else since
        flags = 0
        if math.floor(now) > math.floor(last):
            flags |= C_UF
            first = math.floor(last) + 1
            for s in range(first, min(math.floor(now), first + 86400) + 1):
                if self._alarm_matches(s):
                    flags |= C_AF
                    break
        period = self._periodic_period()
        if period is not None and math.floor(now / period) > math.floor(last / period):
            flags |= C_PF
        b = self.cmos[REG_B]
        if (flags & C_PF and b & B_PIE) or (flags & C_AF and b & B_AIE) or (flags & C_UF and b & B_UIE):
            flags |= C_IRQF
        return flags

    # ---------------------------------------------------------- registers
    def _read_reg(self, idx: int) -> int:
        if idx in TIME_REGS:
            if self.frozen is not None:
                return self.frozen[idx]
            return self._time_registers(self._now())[idx]
        if idx == REG_A:
            a = self.cmos[REG_A] & 0x7F
            if (self.frozen is None and a & 0x70 == A_DV_32K
                    and self._now() % 1.0 >= 1.0 - UIP_WINDOW):
                a |= A_UIP
            return a
        if idx == REG_C:
            now = self._now()
            v = self._reg_c(now)
            self._c_since = now
            if self._irq_level:
                self._set_irq(False)        # reading C acknowledges the interrupt
            self._rearm()
            return v
        if idx == REG_D:
            return D_VRT
        return self.cmos[idx]

    def _write_reg(self, idx: int, value: int) -> None:
        if idx in TIME_REGS:
            if self.frozen is not None:
                self.frozen[idx] = value
            else:
                regs = self._time_registers(self._now())
                regs[idx] = value
                self._set_time_from(regs)
            return
        if idx == REG_A:
            self.cmos[REG_A] = value & 0x7F
            self._rearm()
        elif idx == REG_B:
            old = self.cmos[REG_B]
            if value & B_SET:
                value &= ~B_UIE  # the data sheet: SET clears UIE
                if self.frozen is None:
                    self.frozen = self._time_registers(self._now())
            self.cmos[REG_B] = value
            if old & B_SET and not value & B_SET and self.frozen is not None:
                frozen, self.frozen = self.frozen, None
                self._set_time_from(frozen)
            elif (old ^ value) & (B_DM_BINARY | B_24H) and self.frozen is not None:
                # re-encode the frozen registers in the new format
                epoch = self._decode_time_with(old, self.frozen)
                if epoch is not None:
                    self.frozen = self._time_registers(epoch)
            self._rearm()
        elif idx in (REG_C, REG_D):
            log.debug("rtc: write %#x to read-only register %#x ignored", value, idx)
        else:
            self.cmos[idx] = value

    def _decode_time_with(self, b: int, regs: dict[int, int]) -> int | None:
        saved = self.cmos[REG_B]
        self.cmos[REG_B] = b
        try:
            return self._decode_time(regs)
        finally:
            self.cmos[REG_B] = saved

    # ---------------------------------------------------------- IRQ 8
    def _set_irq(self, level: bool) -> None:
        self._irq_level = level
        if self._irq is not None:
            self._irq(level)

    def _rearm(self) -> None:
        """Arm the timer for the next flag an enable bit in B asks to interrupt for."""
        if self._timer is None:
            return
        b = self.cmos[REG_B]
        if self._irq_level or self.frozen is not None or not b & (B_PIE | B_AIE | B_UIE):
            self._cancel_timer()
            return
        now = self._now()
        due = []
        if b & (B_AIE | B_UIE):
            due.append(math.floor(now) + 1.0)          # updates (and alarm matches) each second
        period = self._periodic_period()
        if b & B_PIE and period is not None:
            period = max(period, MIN_PERIOD)
            due.append((math.floor(now / period) + 1) * period)
        if not due:
            self._cancel_timer()
            return
        delay = max(0.0, min(due) - now)
        self._arm_timer(self._wheel.clock() + int(delay * 1e9) + 1000)

    def _arm_timer(self, deadline: int) -> None:
        if self._timer is None:
            return
        self._timer_generation += 1
        self._timer_deadline = deadline
        self._timer.arm(deadline, self._timer_generation)

    def _cancel_timer(self) -> None:
        if self._timer is None:
            return
        self._timer_generation += 1
        self._timer_deadline = None
        self._timer.cancel()

    def _timer_fired(self, _deadline: int, generation) -> None:
        with self._lock:
            if generation == self._timer_generation:
                self._timer_deadline = None
            if self._irq_level:
                return
            now = self._now()
            # only the last few seconds: a long-unread register C must not make every
            # tick rescan a day of alarm matches
            if self._reg_c(now, since=max(self._c_since, now - 5.0)) & C_IRQF:
                self._set_irq(True)
            else:
                self._rearm()      # an update with no alarm match: wait for the next one

    def reset(self) -> None:
        with self._lock:
            self.cmos[REG_B] &= ~(B_PIE | B_AIE | B_UIE | B_SQWE)   # RESET clears them
            self._c_since = self._now()
            if self._irq_level:
                self._set_irq(False)
            self._cancel_timer()

    def close(self) -> None:
        self._cancel_timer()

    # ---------------------------------------------------------- saved state
    def state(self) -> RtcState:
        with self._lock:
            due = None
            if self._timer_deadline is not None and self._wheel is not None:
                due = self._timer_deadline - self._wheel.clock()
            return RtcState(
                guest_offset_s=self.offset, index=self.index, nmi_disabled=self.nmi_disabled,
                cmos=bytes(self.cmos),
                frozen_time=None if self.frozen is None else tuple(self.frozen[r] for r in TIME_REGS),
                flags_since=self._c_since, irq_level=self._irq_level, timer_due_in_ns=due)

    def restore(self, state: RtcState) -> None:
        """Take over ``state`` (StateError and no change if it is malformed)."""
        state = checked(state, RtcState)
        guest_now = self._clock() + state.guest_offset_s
        if not EARLIEST_GUEST_TIME <= guest_now <= LATEST_GUEST_TIME:
            raise StateCheck(state).fail("guest_offset_s", f"puts the guest's clock at {guest_now:.0f}, "
                                         "outside the years 1900-9999")
        with self._lock:
            self.offset = state.guest_offset_s
            self.index = state.index
            self.nmi_disabled = state.nmi_disabled
            self.cmos[:] = state.cmos
            self.frozen = None if state.frozen_time is None else dict(zip(TIME_REGS, state.frozen_time))
            self._c_since = state.flags_since
            self._cancel_timer()
            if state.timer_due_in_ns is not None and self._wheel is not None:
                self._arm_timer(self._wheel.clock() + state.timer_due_in_ns)
            if state.irq_level != self._irq_level:
                self._set_irq(state.irq_level)

    # ---------------------------------------------------------- bus entry
    def read(self, offset: int, size: int) -> int:
        if size != 1:
            log.debug("rtc: %d-byte read at offset %d, answering the low byte", size, offset)
        if offset != 1:
            return 0xFF  # the index port is write-only
        with self._lock:
            return self._read_reg(self.index)

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 1:
            log.debug("rtc: %d-byte write at offset %d, using the low byte", size, offset)
        value &= 0xFF
        with self._lock:
            if offset == 0:
                self.index = value & 0x7F
                self.nmi_disabled = bool(value & 0x80)
            elif offset == 1:
                self._write_reg(self.index, value)

    # ---------------------------------------------------------- host side
    def guest_time(self) -> float:
        """The guest's RTC time as a Unix timestamp (for the monitor / tests)."""
        with self._lock:
            return self._now()
