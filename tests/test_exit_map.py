"""The map the KVM run loop answers from (kvmpy_exit_map in _kvm_cffi) against the bus
it mirrors: after any sequence of registrations and removals, an address is claimed in
C exactly when Bus.find finds a device there. Also Bus.find's remembered answers and the
listener interface. No /dev/kvm needed: only the cffi module."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.devices.bus import Bus, BusError

kvm_cffi = pytest.importorskip("kvmpy.hv.kvm._kvm_cffi", reason="the KVM cffi module is not built")
ffi, lib = kvm_cffi.ffi, kvm_cffi.lib

EXAMPLES = 400 if os.environ.get("KVMPY_FUZZ") else 60


class Device:
    def read(self, offset: int, size: int) -> int:
        return offset

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class MirroredMap:
    """A BusListener copying the bus into a C map, as KvmAccel.bus_changed does."""

    def __init__(self, pio: bool) -> None:
        self.pio = pio
        self.map = ffi.gc(lib.kvmpy_exit_map_new(), lib.kvmpy_exit_map_free)
        self.changes = 0

    def bus_changed(self, bus: Bus) -> None:
        self.changes += 1
        ranges = bus.claimed_ranges()
        flat = ffi.new("__u64[]", [v for r in ranges for v in r] or [0])
        assert lib.kvmpy_exit_map_set(self.map, int(self.pio), flat, len(ranges)) == 0

    def claimed(self, addr: int) -> bool:
        return bool(lib.kvmpy_exit_map_claimed(self.map, int(self.pio), addr))


def _ops(limit: int):
    register = st.tuples(st.just("register"), st.integers(0, limit - 1), st.integers(1, 64))
    unregister = st.tuples(st.just("unregister"), st.integers(0, limit - 1), st.just(0))
    return st.lists(st.one_of(register, register, unregister), max_size=30)


def _check(bus: Bus, mirror: MirroredMap, ops, probes) -> None:
    bus.add_listener(mirror)
    for op, base, length in ops:
        if op == "register":
            try:
                bus.register(base, length, Device())
            except BusError:
                pass
        else:
            bus.unregister(base)
        for addr in probes:
            # find() twice: the second answer may come from what it remembers.
            assert (bus.find(addr) is not None) == mirror.claimed(addr) == (bus.find(addr) is not None)
            hit = bus.find(addr)
            if hit is not None:
                base_found, _ = hit
                assert any(b == base_found and b <= addr < e for b, e in bus.claimed_ranges())
            # The vCPU loop's accessor: the same device, its own methods, the offset in its range.
            for _ in range(2):
                acc = bus.accessors.get(addr) or bus.accessor(addr)
                if hit is None:
                    assert acc is None and addr not in bus.accessors
                else:
                    base_found, dev = hit
                    assert acc == (dev.read, dev.write, addr - base_found)


@settings(max_examples=EXAMPLES, deadline=None)
@given(_ops(0x10000), st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=20))
def test_port_map_follows_the_bus(ops, probes):
    _check(Bus("pio"), MirroredMap(pio=True), ops, probes)


@settings(max_examples=EXAMPLES, deadline=None)
@given(_ops(0x400), st.lists(st.integers(0, 0x440), min_size=1, max_size=20), st.integers(0, 1 << 40))
def test_mmio_map_follows_the_bus(ops, probes, offset):
    shifted = [(op, offset + base, length) for op, base, length in ops]
    _check(Bus("mmio"), MirroredMap(pio=False), shifted, [offset + p for p in probes])


def test_ports_past_64k_are_never_claimed():
    mirror = MirroredMap(pio=True)
    bus = Bus("pio")
    bus.add_listener(mirror)
    bus.register(0xFFF0, 0x20, Device())        # runs past the last port
    assert mirror.claimed(0xFFFF) and not mirror.claimed(0x10000) and not mirror.claimed(0xFFEF)


def test_listeners_hear_every_change_and_none_after_removal():
    mirror = MirroredMap(pio=False)
    bus = Bus("mmio")
    bus.register(0x1000, 0x100, Device())
    bus.add_listener(mirror)                     # told at once: starts from the map as it is
    assert mirror.changes == 1 and mirror.claimed(0x10FF) and not mirror.claimed(0x1100)
    bus.register(0x2000, 0x10, Device())
    bus.unregister(0x1000)
    assert mirror.changes == 3 and not mirror.claimed(0x1000) and mirror.claimed(0x200F)
    bus.remove_listener(mirror)
    bus.register(0x3000, 0x10, Device())
    assert mirror.changes == 3 and not mirror.claimed(0x3000)


def test_find_forgets_a_moved_device():
    bus = Bus("mmio")
    first, second = Device(), Device()
    bus.register(0x1000, 0x100, first)
    assert bus.find(0x1010) == (0x1000, first)
    bus.unregister(0x1000)
    assert bus.find(0x1010) is None
    bus.register(0x1008, 0x100, second)
    assert bus.find(0x1010) == (0x1008, second)
