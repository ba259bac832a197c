"""Small legacy ports: the debug exit port, port A/B, sinks, registration map."""

import pytest

from kvmpy.devices.bus import Bus
from kvmpy.devices.legacy import (DebugExit, FastA20Reset, PortSink, PostCodePort,
                                  SystemControlB, register_legacy_ports)


def test_debug_exit_reports_value_per_size():
    got = []
    d = DebugExit(got.append)
    d.write(0, 4, 0x1_0000_0003)
    d.write(0, 1, 0x1FF)
    d.write(0, 2, 0x12345)
    d.write(1, 1, 7)  # not the port's start: ignored
    d.write(0, 8, 1)  # no 8-byte port I/O exists
    assert got == [3, 0xFF, 0x2345]


def test_register_map_and_floating_com2():
    bus = Bus("pio")
    exits, resets = [], []
    devs = register_legacy_ports(bus, exits.append, lambda: resets.append(1))
    bus.write(0xF4, 4, 42)
    assert exits == [42]
    bus.write(0x80, 1, 0x12)
    assert devs["post"].last_code == 0x12
    for port in (0x87, 0x8F, 0xED):
        bus.write(port, 1, 0)
        assert bus.read(port, 1) == 0xFF
    # COM2..COM4 absent: a floating bus, so Linux finds no UART there
    assert bus.read(0x2F8 + 5, 1) == 0xFF
    # 0x61 belongs to KVM's in-kernel PIT unless asked for
    assert bus.find(0x61) is None
    bus.write(0x92, 1, 0x03)
    assert resets == [1]
    with pytest.raises(Exception):
        register_legacy_ports(bus, exits.append, lambda: None)


def test_port_b_out2_ends_wait_loops():
    now = [0.0]
    b = SystemControlB(clock=lambda: now[0])
    b.write(0, 1, 0x01)
    assert not b.read(0, 1) & 0x20
    # the refresh bit toggles from read to read
    assert (b.read(0, 1) ^ b.read(0, 1)) & 0x10
    now[0] = 0.06
    assert b.read(0, 1) & 0x20
    b.write(0, 1, 0x00)
    assert not b.read(0, 1) & 0x20
    # a PIT model, when present, decides OUT2
    level = [True]
    b2 = SystemControlB(pit_out2=lambda: level[0])
    assert b2.read(0, 1) & 0x20
    b2.write(0, 1, 0x03)
    assert b2.speaker_on and b2.read(0, 1) & 0x0F == 0x03


def test_port_a_reset_edge_only():
    n = []
    a = FastA20Reset(lambda: n.append(1))
    a.write(0, 1, 0x00)
    assert a.read(0, 1) & 0x02  # A20 always enabled
    a.write(0, 1, 0x01)
    a.write(0, 1, 0x01)
    assert n == [1]


def test_sinks_take_any_size():
    for dev in (PortSink("x"), PostCodePort(), DebugExit(lambda v: None), SystemControlB(),
                FastA20Reset(lambda: None)):
        for size in (1, 2, 4, 8, 0, 3):
            dev.write(0, size, -1 if size == 3 else 2**64 - 1)
            assert dev.read(0, size) >= 0
