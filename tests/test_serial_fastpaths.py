"""The 16550A's per-register fast paths: what the vCPU loop calls through
``Bus.accessor`` (``register_accessors``) must be the UART a driver sees through
``read``/``write``: the same reference model as test_serial.py, driven through the
bus's per-address accessors, and the semantics the lock-free paths could break
(THRE/TEMT for a polling driver, IIR around a burst of THR writes, output order
across locked and unlocked writes, loopback, FIFO trigger levels, host input
racing the guest's reads)."""

from __future__ import annotations

import os
import sys
import threading

from hypothesis import given, settings, strategies as st

from kvmpy.devices.bus import Bus
from kvmpy.devices.serial import COM1, Serial16550
from test_serial import UartMachine, Wire

EXAMPLES = 1500 if os.environ.get("KVMPY_FUZZ") else 150

LSR_IDLE = 0x60                  # THRE | TEMT, nothing received, nothing latched


class BusPorts:
    """The UART as the vCPU loop reaches it: per port, the accessor the bus resolved."""

    def __init__(self, uart: Serial16550) -> None:
        self.bus = Bus("pio")
        self.bus.register(COM1.base, COM1.length, uart)
        self.uart = uart

    def _acc(self, offset: int):
        port = COM1.base + (offset & 7)
        acc = self.bus.accessors.get(port) or self.bus.accessor(port)
        assert acc is not None and acc[2] == offset & 7
        return acc

    def read(self, offset: int, size: int) -> int:
        read, _, off = self._acc(offset)
        return read(off, size)

    def write(self, offset: int, size: int, value: int) -> None:
        _, write, off = self._acc(offset)
        write(off, size, value)

    def __getattr__(self, name):          # host side and introspection: the UART itself
        return getattr(self.uart, name)


def make_on_bus():
    w = Wire()
    return BusPorts(Serial16550(w.irq, w.write, on_rx_space=w.space, publish_lsr=w.publish)), w


class UartThroughAccessors(UartMachine):
    """test_serial's reference model, every guest access through the bus's accessors."""

    def make(self):
        return make_on_bus()


UartThroughAccessors.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=40, deadline=None)
TestUartThroughAccessors = UartThroughAccessors.TestCase


def test_each_register_has_its_own_pair_and_the_bus_hands_it_out():
    u = Serial16550(lambda level: None, lambda data: None)
    bus = Bus("pio")
    bus.register(COM1.base, COM1.length, u)
    pairs = {bus.accessor(COM1.base + reg)[:2] for reg in range(8)}
    assert len(pairs) == 8
    for reg in range(8):
        read, write, offset = bus.accessor(COM1.base + reg)
        assert offset == reg and (read, write) == u.register_accessors(reg)


def test_a_polling_driver_sees_thre_and_temt_before_and_after_every_byte():
    """Linux's console (IER 0): LSR, then THR, per byte; the transmitter is never busy."""
    u, w = make_on_bus()
    u.write(3, 1, 0x03)                  # 8N1
    u.write(4, 1, 0x0B)                  # DTR RTS OUT2
    text = b"kvmpy console line\r\n"
    for b in text:
        assert u.read(5, 1) == LSR_IDLE
        u.write(0, 1, b)
        assert u.read(5, 1) == LSR_IDLE
    assert bytes(w.out) == text
    assert not w.levels                  # IER 0: the line never moved


def test_iir_reports_thre_again_after_a_burst_of_sixteen():
    """The tty's interrupt-driven transmit: IIR says THRE, the handler writes up to 16
    bytes, reads IIR again and finds THRE due once more; the line follows."""
    u, w = make_on_bus()
    u.write(4, 1, 0x08)                  # OUT2
    u.write(2, 1, 0x07)                  # FIFO on, both cleared
    u.write(1, 1, 0x02)                  # THRI
    assert w.line
    sent = bytearray()
    for burst in range(3):
        assert u.read(2, 1) == 0xC2      # THRE, FIFO enabled
        assert not w.line                # reading IIR took THRE
        assert u.read(2, 1) == 0xC1      # and nothing else is pending
        chunk = bytes(range(burst * 16, burst * 16 + 16))
        for b in chunk:
            u.write(0, 1, b)
        sent += chunk
        assert w.line                    # the first byte made THRE due again
        assert u.read(5, 1) == LSR_IDLE
    assert bytes(w.out) == bytes(sent)
    u.write(1, 1, 0x00)
    assert not w.line


def test_output_order_holds_across_locked_and_unlocked_thr_writes():
    """THR writes alternate between the lock-free path (THRE already due) and the
    locked one (THRE taken by an IIR read, loopback toggled): every byte meant for
    the host arrives once, in order, and no loopback byte leaks out."""
    u, w = make_on_bus()
    u.write(4, 1, 0x08)
    u.write(1, 1, 0x02)
    expected = bytearray()
    for i in range(200):
        if i % 7 == 0:
            u.read(2, 1)                 # takes THRE: the next write is the locked path
        if i % 11 == 0:
            u.write(4, 1, 0x18)          # loopback: this byte goes to the RX FIFO
            u.write(0, 1, i)
            assert u.read(5, 1) & 0x01
            assert u.read(0, 1) == i
            u.write(4, 1, 0x08)
            continue
        u.write(0, 1, i)
        expected.append(i)
    assert bytes(w.out) == bytes(expected)


def test_loopback_keeps_bytes_from_the_host_even_with_thre_due():
    u, w = make_on_bus()
    u.write(2, 1, 0x01)
    u.write(4, 1, 0x10)
    assert u.thr_pending                 # the case the lock-free THR path serves outside loopback
    for b in b"echo":
        u.write(0, 1, b)
    assert bytes(w.out) == b""
    assert bytes(u.read(0, 1) for _ in range(4)) == b"echo"
    assert u.read(5, 1) == LSR_IDLE


def test_fifo_trigger_levels_decide_between_data_and_timeout():
    for fcr, level in ((0x01, 1), (0x41, 4), (0x81, 8), (0xC1, 14)):
        u, w = make_on_bus()
        u.write(4, 1, 0x08)
        u.write(2, 1, fcr | 0x02)
        u.write(1, 1, 0x01)
        for n in range(1, 17):
            assert u.receive(b"x") == 1
            iid = u.read(2, 1) & 0x0F
            assert iid == (0x04 if n >= level else 0x0C), (fcr, n, iid)
            assert w.line
            assert u.read(5, 1) == LSR_IDLE | 0x01
        assert u.receive(b"y") == 0
        for _ in range(16):
            u.read(0, 1)
        assert u.read(2, 1) & 0x0F == 0x01 and not w.line


def test_ier_and_mcr_writes_of_the_same_value_change_nothing_and_new_ones_do():
    u, w = make_on_bus()
    u.write(4, 1, 0x08)
    u.write(1, 1, 0x02)
    assert w.line
    assert u.read(2, 1) & 0x0F == 0x02
    u.write(1, 1, 0x02)                  # THRI already on: THRE is not raised again
    assert not w.line and u.read(2, 1) & 0x0F == 0x01
    u.write(1, 1, 0x00)
    u.write(1, 1, 0x02)                  # off and on: raised again, as the THRE test wants
    assert w.line
    u.write(4, 1, 0x08)                  # same MCR: no modem-status delta
    assert u.read(6, 1) == 0xB0
    u.write(4, 1, 0x18)
    assert u.read(6, 1) & 0x0F           # loopback changed the lines: deltas latched


def test_dlab_routes_offsets_zero_and_one_to_the_divisor():
    u, w = make_on_bus()
    u.write(1, 1, 0x05)
    u.write(3, 1, 0x83)
    u.write(0, 1, 0x01)
    u.write(1, 1, 0x00)
    assert (u.read(0, 1), u.read(1, 1)) == (0x01, 0x00)
    u.write(3, 1, 0x03)
    assert u.read(1, 1) == 0x05
    assert bytes(w.out) == b""
    assert (u.state().dll, u.state().dlm) == (0x01, 0x00)


def test_host_input_racing_the_guests_lock_free_reads_loses_nothing():
    """The console's thread pushes input (and breaks) while the vCPU polls LSR and
    reads RBR through the fast paths: every byte arrives once, in order, BI is seen,
    and the interrupt line ends as the state says."""
    u, w = make_on_bus()
    u.write(4, 1, 0x08)
    u.write(2, 1, 0x01)
    u.write(1, 1, 0x05)                  # RX data and line status interrupts
    data = bytes(i % 251 + 1 for i in range(4000))    # no NULs: a NUL is a break here
    breaks = 50
    done = threading.Event()
    # Threads switch every few microseconds instead of every 5 ms: many more
    # interleavings of the two sides, and no 5 ms wait whenever the FIFO is full.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)

    def host():
        sent = 0
        every = len(data) // breaks
        next_break = every
        while sent < len(data):
            sent += u.receive(data[sent:sent + 5])
            if sent >= next_break and u.rx_space() > 0:
                u.send_break()
                next_break += every
        done.set()

    t = threading.Thread(target=host)
    t.start()
    got = bytearray()
    breaks_seen = 0
    try:
        while not (done.is_set() and not u.read(5, 1) & 0x01):
            lsr = u.read(5, 1)
            if lsr & 0x10:
                breaks_seen += 1
            if lsr & 0x01:
                b = u.read(0, 1)
                if b:
                    got.append(b)
        t.join()
    finally:
        sys.setswitchinterval(interval)
    assert bytes(got) == data
    assert breaks_seen >= 1
    assert u.read(5, 1) == LSR_IDLE
    assert not u.interrupt_line() and not w.line


class Recorder:
    """Output as one byte string however it was cut, and every line change."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.levels: list[bool] = []

    def irq(self, level: bool) -> None:
        self.levels.append(level)

    def write(self, data: bytes) -> None:
        self.out += data


GUEST_OPS = st.lists(st.tuples(st.sampled_from(["r", "w"]), st.integers(0, 7), st.integers(0, 255)), max_size=30)


@settings(max_examples=EXAMPLES, deadline=None)
@given(thre_taken=st.booleans(), before=GUEST_OPS, host=st.binary(max_size=20),
       offset=st.one_of(st.just(0), st.integers(0, 7)), burst=st.binary(min_size=0, max_size=40), after=GUEST_OPS)
def test_a_burst_is_the_same_as_its_writes_one_by_one(thre_taken, before, host, offset, burst, after):
    """What the coalesced ring's drain hands over at once (Bus.write_burst) leaves the
    UART, its output and its interrupt line exactly as the single writes would."""
    ends = []
    for as_burst in (False, True):
        rec = Recorder()
        u = Serial16550(rec.irq, rec.write)
        bus = Bus("pio")
        bus.register(COM1.base, COM1.length, u)
        u.receive(host)
        if thre_taken:                   # the tty's handler: THRI on, THRE read from IIR
            u.write(4, 1, 0x08)
            u.write(1, 1, 0x02)
            u.read(2, 1)
        for kind, reg, value in before:
            if kind == "r":
                u.read(reg, 1)
            else:
                u.write(reg, 1, value)
        if as_burst:
            bus.write_burst(COM1.base + offset, burst)
        else:
            for value in burst:
                bus.write(COM1.base + offset, 1, value)
        mid = (u.state(), bytes(rec.out), list(rec.levels))
        reads = [u.read(reg, 1) if kind == "r" else u.write(reg, 1, value) for kind, reg, value in after]
        ends.append((mid, reads, u.state(), bytes(rec.out), rec.levels))
    assert ends[0] == ends[1]


def test_a_burst_to_an_unclaimed_port_or_a_device_without_bursts():
    writes = []

    class Plain:
        def read(self, offset, size):
            return 0

        def write(self, offset, size, value):
            writes.append((offset, size, value))

    bus = Bus("pio")
    bus.register(0x70, 2, Plain())
    bus.write_burst(0x70, b"\x01\x02\x8f")
    bus.write_burst(0x300, b"\x01\x02")          # nobody there: dropped, as single writes are
    assert writes == [(0, 1, 1), (0, 1, 2), (0, 1, 0x8F)]


def test_a_thre_another_vcpu_takes_mid_write_is_due_again_after_the_byte():
    """An unlocked multi-vCPU guest: vCPU A writes THR on the lock-free path (THRE was
    due), and vCPU B reads IIR, taking THRE, between A's check and A's byte. After the
    byte THR is empty again, so THRE must be due and its interrupt raised, as the
    locked path would leave it; else a driver waiting for THRE waits for good."""
    w = Wire()
    uart = Serial16550(w.irq, lambda data: (w.write(data), race()), on_rx_space=w.space)
    ports = BusPorts(uart)
    raced = []

    def race():
        if not raced:
            raced.append(ports.read(2, 1))          # vCPU B: IIR, which takes THRE

    ports.write(4, 1, 0x08)                          # MCR: OUT2, which gates the PC's IRQ line
    ports.write(1, 1, 0x02)                          # IER: THRI; THRE due at once
    assert uart.thr_pending and w.line
    ports.write(0, 1, ord("x"))                      # vCPU A, B's IIR read in the middle
    assert raced == [0x02]                           # B saw THRE, and took it
    assert bytes(w.out) == b"x"
    assert uart.thr_pending and w.line, "THRE due again after A's byte, its interrupt raised"
    assert ports.read(2, 1) == 0x02
