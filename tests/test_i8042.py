"""i8042: the probe Linux's i8042/atkbd drivers run, reboot, hostile traffic."""

from hypothesis import given, settings, strategies as st

from kvmpy.devices.bus import Bus
from kvmpy.devices.i8042 import I8042

OBF, AUXDATA = 0x01, 0x20


class Rig:
    def __init__(self, keyboard=True):
        self.resets = 0
        self.levels = []
        self.kbc = I8042(self.reset, self.irq, keyboard=keyboard)
        self.bus = Bus("pio")
        self.kbc.register(self.bus)

    def reset(self):
        self.resets += 1

    def irq(self, level):
        assert not self.levels or self.levels[-1] != level
        self.levels.append(level)

    def status(self):
        return self.bus.read(0x64, 1)

    def command(self, cmd, params=(), replies=0):
        """__i8042_command: never waits, since the model answers at once."""
        assert not self.status() & 0x02
        self.bus.write(0x64, 1, cmd)
        for p in params:
            self.bus.write(0x60, 1, p)
        out = []
        for _ in range(replies):
            st_ = self.status()
            if not st_ & OBF:
                return None  # would be a 0.5 s timeout in Linux
            if cmd == 0xD3 and not st_ & AUXDATA:
                return "auxerr"
            out.append(self.bus.read(0x60, 1))
        return out

    def kbd(self, byte):
        self.bus.write(0x60, 1, byte)
        out = []
        while self.status() & OBF:
            out.append(self.bus.read(0x60, 1))
        return out


def test_linux_probe_sequence():
    r = Rig()
    # i8042_flush: nothing pending
    assert not r.status() & OBF
    assert r.command(0xAA, replies=1) == [0x55]
    ctr = r.command(0x20, replies=1)[0]
    assert ctr == r.command(0x20, replies=1)[0]
    assert ctr & 0x40  # translation on, as firmware leaves it
    # disable keyboard, interrupts off, write back and verify
    ctr = (ctr | 0x10) & ~0x03
    r.command(0x60, [ctr])
    assert r.command(0x20, replies=1) == [ctr]
    # i8042_check_aux: loopback must fail fast, the AUX test must report an error
    assert r.command(0xD3, [0x5A], replies=1) == "auxerr"
    r.bus.read(0x60, 1)
    res = r.command(0xA9, replies=1)[0]
    assert res and res not in (0xFA, 0xFF)
    # keyboard interface test
    assert r.command(0xAB, replies=1) == [0]
    # enable keyboard port with interrupts
    r.command(0x60, [(ctr & ~0x10) | 0x01])
    # controller replies raised IRQ 1 too (CTR.KBDINT) and reading dropped it
    assert r.levels == [] or r.levels[-1] is False
    # atkbd probe: GETID with interrupts; the line rises with each reply byte
    r.bus.write(0x60, 1, 0xF2)
    assert r.levels[-1] is True
    got = []
    while r.status() & OBF:
        got.append(r.bus.read(0x60, 1))
    assert got == [0xFA, 0xAB, 0x41]
    assert r.levels[-1] is False
    assert r.kbd(0xFF) == [0xFA, 0xAA]
    assert r.kbd(0xED) == [0xFA] and r.kbd(0x00) == [0xFA]
    assert r.kbd(0xF0) == [0xFA] and r.kbd(0x00) == [0xFA, 0x41]
    assert r.kbd(0xF4) == [0xFA]
    assert r.kbd(0x01) == [0xFE]
    assert r.resets == 0


def test_reboot_pulses_reset():
    r = Rig()
    r.bus.write(0x64, 1, 0xFE)
    assert r.resets == 1
    r.bus.write(0x64, 1, 0xFF)  # pulse nothing
    assert r.resets == 1


def test_no_keyboard_is_silent():
    r = Rig(keyboard=False)
    assert r.kbd(0xFF) == []


def test_scancode_injection_waits_while_disabled():
    r = Rig()
    r.command(0xAD)
    r.kbc.inject_scancodes(b"\x1e\x9e")
    assert not r.status() & OBF
    r.command(0xAE)
    assert [r.bus.read(0x60, 1), r.bus.read(0x60, 1)] == [0x1E, 0x9E]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([0x60, 0x64]),
                          st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1)), max_size=60))
def test_hostile_traffic(ops):
    r = Rig()
    r.reset = lambda: None
    for is_write, port, size, value in ops:
        if is_write:
            r.bus.write(port, size, value)
        else:
            assert 0 <= r.bus.read(port, size) <= 0xFF
        kbc = r.kbc
        expected = kbc.outbuf is not None and not kbc.out_aux and bool(kbc.ctr & 1)
        assert bool(r.levels and r.levels[-1]) == expected
        assert len(kbc.queue) < 10 * (len(ops) + 1)


def test_each_byte_after_a_read_is_a_new_interrupt_edge():
    """GETID answers three bytes: the line drops at each read of the data port and
    rises again for the next byte, so an edge-triggered IOAPIC input (Linux's ISA
    IRQ 1) interrupts for every byte, as atkbd's probe needs."""
    r = Rig()
    r.bus.write(0x60, 1, 0xF2)
    assert r.levels == [True]
    got = [r.bus.read(0x60, 1) for _ in range(3)]
    assert got == [0xFA, 0xAB, 0x41]
    assert r.levels == [True, False, True, False, True, False]


def test_mouse_on_the_aux_port():
    levels = []
    kbc = I8042(lambda: None, None, aux=True, irq_aux=levels.append)
    bus = Bus("pio")
    kbc.register(bus)
    assert (bus.write(0x64, 1, 0xA9), bus.read(0x60, 1))[1] == 0x00       # AUX interface test passes
    bus.write(0x64, 1, 0x60)
    bus.write(0x60, 1, 0x47)                                             # AUX interrupts on
    answers = []
    for command in (0xFF, 0xF3, 200, 0xF3, 100, 0xF3, 80, 0xF2, 0xF4):
        bus.write(0x64, 1, 0xD4)
        bus.write(0x60, 1, command)
        while bus.read(0x64, 1) & OBF:
            assert bus.read(0x64, 1) & AUXDATA
            answers.append(bus.read(0x60, 1))
    # reset: ACK, self-test passed, ID 0; three rates: the IntelliMouse ID 3
    assert answers == [0xFA, 0xAA, 0x00, 0xFA, 0xFA, 0xFA, 0xFA, 0xFA, 0xFA, 0xFA, 0x03, 0xFA]
    kbc.mouse_event(300, -2, 1, 0b001)          # more than one packet can carry
    packets = []
    while bus.read(0x64, 1) & OBF:
        packets.append(bus.read(0x60, 1))
    assert packets == [0x29, 255, 0xFE, 0x01, 0x09, 45, 0, 0]   # y sign (0x20) in the first
    assert levels and levels[-1] is False
