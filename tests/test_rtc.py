"""CMOS RTC: time encodings, UIP, SET-based setting, register C, NVRAM sizes."""

import calendar
import time

from hypothesis import given, settings, strategies as st

from kvmpy.devices.rtc import RtcCmos, days_in_month, utc_seconds

GiB, MiB = 1 << 30, 1 << 20
T0 = calendar.timegm((2024, 2, 29, 13, 45, 30, 0, 0, 0)) + 0.25  # a Thursday


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t


def rd(rtc, idx):
    rtc.write(0, 1, idx)
    return rtc.read(1, 1)


def wr(rtc, idx, v):
    rtc.write(0, 1, idx)
    rtc.write(1, 1, v)


def linux_get_time(rtc):
    """mc146818_get_time(): wait out UIP, read, check UIP and seconds again."""
    for _ in range(1000):
        if rd(rtc, 0x0A) & 0x80:
            continue
        sec = rd(rtc, 0)
        vals = [rd(rtc, i) for i in (2, 4, 7, 8, 9)]
        century = rd(rtc, 0x32)
        ctrl = rd(rtc, 0x0B)
        if rd(rtc, 0x0A) & 0x80 or rd(rtc, 0) != sec:
            continue
        return [sec] + vals + [century, ctrl]
    raise AssertionError("UIP never cleared")


def test_bcd_24h_default_and_century():
    rtc = RtcCmos(1 * GiB, clock=Clock())
    sec, mn, hr, mday, mon, yy, cc, ctrl = linux_get_time(rtc)
    assert ctrl & 0x06 == 0x02  # BCD, 24 hour
    assert (sec, mn, hr, mday, mon, yy, cc) == (0x30, 0x45, 0x13, 0x29, 0x02, 0x24, 0x20)
    assert rd(rtc, 6) == 5  # Thursday, Sunday = 1
    assert rd(rtc, 0x0D) == 0x80


def test_binary_and_12h_modes():
    rtc = RtcCmos(1 * GiB, clock=Clock())
    wr(rtc, 0x0B, 0x04)  # binary, 12 hour
    assert rd(rtc, 4) == 0x80 | 1  # 1 PM
    assert rd(rtc, 0) == 30 and rd(rtc, 9) == 24 and rd(rtc, 0x32) == 20
    wr(rtc, 0x0B, 0x00)  # BCD, 12 hour
    assert rd(rtc, 4) == 0x81


def test_uip_window_and_linux_loop_terminates():
    clk = Clock(T0 - 0.25 + 0.9999)  # inside the last 244 us
    rtc = RtcCmos(1 * GiB, clock=clk)
    assert rd(rtc, 0x0A) & 0x80
    clk.t += 0.001
    assert not rd(rtc, 0x0A) & 0x80
    # with the real clock the loop ends too
    assert linux_get_time(RtcCmos(1 * GiB))[7] == 0x02


def test_guest_sets_time_with_set_bit():
    clk = Clock()
    rtc = RtcCmos(1 * GiB, clock=clk)
    wr(rtc, 0x0B, 0x82)
    clk.t += 5  # frozen while SET
    assert rd(rtc, 0) == 0x30
    for idx, v in ((0, 0x00), (2, 0x00), (4, 0x08), (7, 0x01), (8, 0x01), (9, 0x30), (0x32, 0x20)):
        wr(rtc, idx, v)
    wr(rtc, 0x0B, 0x02)
    want = calendar.timegm((2030, 1, 1, 8, 0, 0, 0, 0, 0))
    assert int(rtc.guest_time()) == want
    clk.t += 61
    assert rd(rtc, 2) == 0x01 and rd(rtc, 0) == 0x01
    # an impossible date leaves the clock alone instead of raising
    wr(rtc, 0x0B, 0x82)
    wr(rtc, 8, 0x13)
    wr(rtc, 0x0B, 0x02)
    assert rd(rtc, 8) == 0x01


def test_register_c_flags_clear_on_read():
    clk = Clock()
    rtc = RtcCmos(1 * GiB, clock=clk)
    assert rd(rtc, 0x0C) == 0
    wr(rtc, 0x0B, 0x02 | 0x10)  # UIE
    clk.t += 1.0
    c = rd(rtc, 0x0C)
    assert c & 0x10 and c & 0x80 and c & 0x40  # UF, IRQF, PF (1024 Hz by default)
    assert rd(rtc, 0x0C) == 0
    # alarm at hh:mm:35 with don't-care hours
    wr(rtc, 0x01, 0x35)
    wr(rtc, 0x03, 0x45)
    wr(rtc, 0x05, 0xC0)
    wr(rtc, 0x0B, 0x02 | 0x20)
    clk.t += 6
    c = rd(rtc, 0x0C)
    assert c & 0x20 and c & 0x80


def test_cmos_memory_sizes_like_qemu():
    rtc = RtcCmos(3 * GiB, ram_above_4g=5 * GiB, num_cpus=4, clock=Clock())
    word = lambda lo: rd(rtc, lo) | rd(rtc, lo + 1) << 8
    assert word(0x15) == 640
    assert word(0x17) == 0xFFFF and word(0x30) == 0xFFFF
    assert word(0x34) == (3 * GiB - 16 * MiB) // 65536
    assert rd(rtc, 0x5B) | rd(rtc, 0x5C) << 8 | rd(rtc, 0x5D) << 16 == 5 * GiB // 65536
    assert rd(rtc, 0x5F) == 3
    assert rd(rtc, 0x14) & 0x02
    small = RtcCmos(8 * MiB, clock=Clock())
    assert rd(small, 0x17) | rd(small, 0x18) << 8 == 7 * 1024
    assert rd(small, 0x34) == 0
    wr(rtc, 0x40, 0x5A)
    assert rd(rtc, 0x40) == 0x5A


def test_nmi_bit_and_index_port():
    rtc = RtcCmos(1 * GiB, clock=Clock())
    rtc.write(0, 1, 0x80 | 0x0D)
    assert rtc.nmi_disabled and rtc.read(1, 1) == 0x80
    assert rtc.read(0, 1) == 0xFF


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(-2, 4), st.sampled_from([1, 2, 4]),
                          st.integers(0, 2**32 - 1), st.floats(0, 100000)), max_size=50))
def test_hostile_traffic_never_raises(ops):
    clk = Clock()
    rtc = RtcCmos(1 * GiB, clock=clk)
    for is_write, off, size, value, dt in ops:
        clk.t += dt
        if is_write:
            rtc.write(off, size, value)
        else:
            assert 0 <= rtc.read(off, size) <= 0xFF


# ------------------------------------------------------------------------- IRQ 8

class Linked:
    """One fake time for the RTC (seconds) and the timer wheel (nanoseconds)."""

    def __init__(self):
        from kvmpy.devices.timers import TimerWheel
        self.t = T0
        self.wheel = TimerWheel(clock=lambda: int(self.t * 1e9), threaded=False)
        self.levels = []
        self.rtc = RtcCmos(1 * GiB, clock=lambda: self.t, irq=self.levels.append, timer_wheel=self.wheel)

    def advance(self, seconds, step=0.01):
        end = self.t + seconds
        while self.t < end:
            self.t = min(end, self.t + step)
            self.wheel.run_due()

    @property
    def line(self):
        return bool(self.levels) and self.levels[-1]


@given(st.integers(1, 9999), st.integers(1, 12), st.integers(1, 31), st.integers(0, 23), st.integers(0, 59),
       st.integers(0, 59))
def test_date_arithmetic_agrees_with_the_calendar_module(year, month, mday, hour, minute, sec):
    """The RTC's own month lengths and UTC seconds (it does not import calendar)
    against calendar's, over every year a guest or a saved state can name."""
    assert days_in_month(year, month) == calendar.monthrange(year, month)[1]
    mday = min(mday, days_in_month(year, month))
    assert utc_seconds(year, month, mday, hour, minute, sec) == \
        calendar.timegm((year, month, mday, hour, minute, sec, 0, 0, 0))


def test_date_arithmetic_at_the_edges():
    """Leap rules and era boundaries, kept as examples whatever hypothesis draws."""
    for year, month in ((1900, 2), (2000, 2), (2024, 2), (2100, 2), (1600, 2), (2023, 2), (9999, 12), (1, 1)):
        assert days_in_month(year, month) == calendar.monthrange(year, month)[1]
    for when in ((1970, 1, 1, 0, 0, 0), (1969, 12, 31, 23, 59, 59), (2000, 2, 29, 12, 0, 0), (2000, 3, 1, 0, 0, 0),
                 (1600, 2, 29, 0, 0, 0), (1, 1, 1, 0, 0, 0), (9999, 12, 31, 23, 59, 59), (2038, 1, 19, 3, 14, 8)):
        assert utc_seconds(*when) == calendar.timegm(when + (0, 0, 0)), when


def test_update_interrupt_each_second_until_register_c_is_read():
    m = Linked()
    rd(m.rtc, 0x0C)
    assert m.wheel.next_deadline() is None          # nothing enabled: no timer at all
    wr(m.rtc, 0x0B, 0x02 | 0x10)                    # 24h, UIE
    m.advance(0.8)                                  # T0 is .25 past a second: update at .0
    assert m.line
    assert rd(m.rtc, 0x0C) & 0x90 == 0x90           # IRQF | UF (PF runs freely too)
    assert not m.line
    m.advance(0.5)
    assert not m.line                               # next update one second after the last
    m.advance(0.6)
    assert m.line and m.levels.count(True) == 2
    m.advance(3)
    assert m.levels.count(True) == 2                # held until C is read, not re-raised


def test_alarm_interrupt_only_at_the_matching_second():
    m = Linked()
    sec = rd(m.rtc, 0x00)
    alarm = (sec >> 4) * 10 + (sec & 0xF) + 3
    wr(m.rtc, 0x01, ((alarm // 10) << 4) | (alarm % 10))   # seconds alarm (BCD)
    wr(m.rtc, 0x03, 0xC0)                                   # any minute
    wr(m.rtc, 0x05, 0xC0)                                   # any hour
    rd(m.rtc, 0x0C)
    wr(m.rtc, 0x0B, 0x02 | 0x20)                            # AIE only
    m.advance(2.6)
    assert not m.line
    m.advance(0.3)
    assert m.line
    assert rd(m.rtc, 0x0C) & 0xA0 == 0xA0                   # IRQF | AF


def test_periodic_interrupt_rate_and_reset():
    m = Linked()
    wr(m.rtc, 0x0A, 0x26)                                   # 1024 Hz
    rd(m.rtc, 0x0C)
    wr(m.rtc, 0x0B, 0x02 | 0x40)                            # PIE
    m.advance(1 / 2048, step=1 / 2048)                      # sample between ticks, not on them
    rd(m.rtc, 0x0C)
    raised = 0
    for _ in range(100):
        m.advance(1 / 1024, step=1 / 4096)
        if m.line:
            raised += 1
            assert rd(m.rtc, 0x0C) & 0xC0 == 0xC0           # IRQF | PF
    assert 90 <= raised <= 100
    m.advance(0.01)
    assert m.line
    m.rtc.reset()
    assert not m.line and rd(m.rtc, 0x0B) & 0x70 == 0
    assert m.wheel.next_deadline() is None
