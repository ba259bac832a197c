"""PCI bus 0: config mechanism #1, ECAM, BAR sizing/relocation, capabilities, MSI-X, INTx."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.block.driver import BlockDriver
from kvmpy.devices.pci import BAR_IO, BAR_MEM32, PciDevice
from kvmpy.devices.pci.bus import PciEcam
from kvmpy.devices.virtio.blk import VirtioBlk
from kvmpy.devices.virtio.pci import BAR0_SIZE, NOTIFY_OFFSET
from support.virtio_driver import SoftMachine


class RawDisk(BlockDriver):
    """The smallest BlockDriver: PCI tests never do I/O."""
    size = 1 << 20
    read_only = True


class Scratch(PciDevice):
    def __init__(self):
        super().__init__(0x1234, 0x5678, 0xFF0000, name="scratch")
        self.add_bar(0, 0x1000, BAR_MEM32)
        self.add_bar(1, 0x20, BAR_IO)
        self.writes = []

    def bar_read(self, index, offset, size):
        return 0xA0 + index

    def bar_write(self, index, offset, size, value):
        self.writes.append((index, offset, size, value))


@pytest.fixture
def m():
    machine = SoftMachine()
    yield machine
    machine.close()


def test_host_bridge_and_empty_slots(m):
    assert m.cfg_read(0, 0) == 0x0008_1B36
    assert m.cfg_read(0, 0x08) >> 8 == 0x060000
    assert m.cfg_read(5, 0) == 0xFFFFFFFF
    # function 1 and bus 1 do not exist
    m.pio_write(0xCF8, 4, 0x80000000 | 1 << 8)
    assert m.pio_read(0xCFC, 4) == 0xFFFFFFFF
    m.pio_write(0xCF8, 4, 0x80010000)
    assert m.pio_read(0xCFC, 4) == 0xFFFFFFFF
    # the address register reads back; the enable bit gates data accesses
    m.pio_write(0xCF8, 4, 0x00000000)
    assert m.pio_read(0xCF8, 4) == 0 and m.pio_read(0xCFC, 4) == 0xFFFFFFFF
    # byte and word reads through the data window at 0xCFC+n
    m.pio_write(0xCF8, 4, 0x80000000)
    assert m.pio_read(0xCFE, 2) == 0x0008 and m.pio_read(0xCFD, 1) == 0x1B


def test_bar_sizing_and_readonly_fields(m):
    dev = Scratch()
    slot = m.pci.add(dev)
    m.cfg_write(slot, 0x10, 4, 0xFFFFFFFF)
    assert m.cfg_read(slot, 0x10) == 0xFFFFF000
    m.cfg_write(slot, 0x14, 4, 0xFFFFFFFF)
    assert m.cfg_read(slot, 0x14) == 0xFFFFFFE1
    m.cfg_write(slot, 0x00, 4, 0)
    assert m.cfg_read(slot, 0x00) == 0x5678_1234
    m.cfg_write(slot, 0x3C, 1, 0x42)
    assert m.cfg_read(slot, 0x3C, 1) == 0x42
    # status error bits are write-1-to-clear and start clear; cap-list bit is read-only
    m.cfg_write(slot, 0x06, 2, 0xFFFF)
    assert m.cfg_read(slot, 0x06, 2) == 0


def test_virtio_64bit_bar_sizing(m):
    dev = m.virtio_pci(VirtioBlk(RawDisk()))
    slot = m.pci.add(dev)
    m.cfg_write(slot, 0x10, 4, 0xFFFFFFFF)
    m.cfg_write(slot, 0x14, 4, 0xFFFFFFFF)
    assert m.cfg_read(slot, 0x10) == (~(BAR0_SIZE - 1) & 0xFFFFFFF0) | 0x4
    assert m.cfg_read(slot, 0x14) == 0xFFFFFFFF
    dev.close()


def test_bar_decode_relocation_and_refusals(m, caplog):
    dev = Scratch()
    slot = m.pci.add(dev)
    bar0 = m.cfg_read(slot, 0x10) & ~0xF
    io = m.cfg_read(slot, 0x14) & ~0x3
    assert 0xC0000000 <= bar0 < 0xFEC00000 and 0xC000 <= io <= 0xFFFF
    assert m.mmio_read(bar0, 4) == 0xFFFFFFFF  # decoding is off until the guest enables it
    m.cfg_write(slot, 0x04, 2, 0x3)
    assert m.mmio_read(bar0, 4) == 0xA0 and m.pio_read(io, 1) == 0xA1
    # move BAR0: the old address floats, the new one decodes
    m.cfg_write(slot, 0x10, 4, 0xD0000000)
    assert m.mmio_read(bar0, 4) == 0xFFFFFFFF and m.mmio_read(0xD0000000, 4) == 0xA0
    m.mmio_write(0xD0000010, 4, 7)
    assert dev.writes[-1] == (0, 0x10, 4, 7)
    # outside the window: not decoded at all
    with caplog.at_level(logging.WARNING):
        m.cfg_write(slot, 0x10, 4, 0x10000000)
    assert m.mmio_read(0x10000000, 4) == 0xFFFFFFFF
    assert "outside the PCI windows" in caplog.text
    # a second device on top of the first: refused and logged, the first keeps working
    m.cfg_write(slot, 0x10, 4, 0xD0000000)
    other = Scratch()
    s2 = m.pci.add(other)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        m.cfg_write(s2, 0x10, 4, 0xD0000000)
        m.cfg_write(s2, 0x04, 2, 0x2)
    assert "not mapped" in caplog.text
    assert m.mmio_read(0xD0000000, 4) == 0xA0
    other.bar_read = lambda i, o, s: 0xBB
    assert m.mmio_read(0xD0000000, 4) == 0xA0
    # memory decoding off unmaps
    m.cfg_write(slot, 0x04, 2, 0x1)
    assert m.mmio_read(0xD0000000, 4) == 0xFFFFFFFF and m.pio_read(io, 1) == 0xA1


def test_doorbells_follow_the_bar(m):
    dev = m.virtio_pci(VirtioBlk(RawDisk()))
    slot = m.pci.add(dev)
    assert not m.platform._doorbells
    m.cfg_write(slot, 0x04, 2, 0x6)
    base = m.cfg_read(slot, 0x10) & ~0xF
    addrs = {a for a, *_ in m.platform._doorbells.values()}
    assert addrs == {base + NOTIFY_OFFSET}
    m.cfg_write(slot, 0x10, 4, 0xE0000000)
    assert {a for a, *_ in m.platform._doorbells.values()} == {0xE0000000 + NOTIFY_OFFSET}
    m.cfg_write(slot, 0x04, 2, 0x0)
    assert not m.platform._doorbells
    dev.close()


def test_capability_list_and_ecam(m):
    dev = m.virtio_pci(VirtioBlk(RawDisk()))
    slot = m.pci.add(dev)
    assert m.cfg_read(slot, 0x06, 2) & 0x10
    ptr, ids = m.cfg_read(slot, 0x34, 1), []
    while ptr:
        assert ptr % 4 == 0 and 0x40 <= ptr < 0x100 and len(ids) < 16
        ids.append(m.cfg_read(slot, ptr, 1))
        ptr = m.cfg_read(slot, ptr + 1, 1)
    assert ids.count(0x09) == 4 and ids.count(0x11) == 1
    m.pci.ecam_base = 0xB0000000
    ecam = m.pci.ecam()
    assert isinstance(ecam, PciEcam) and ecam.mcfg() == (0xB0000000, 0, 0, 0)
    for reg in range(0, 0x100, 4):
        assert ecam.read(slot << 15 | reg, 4) == m.cfg_read(slot, reg)
    assert ecam.read(slot << 15 | 0x100, 4) == 0          # empty extended space
    assert ecam.read(31 << 15, 4) == 0xFFFFFFFF
    dev.close()


def test_msix_mask_pending_and_retarget(m):
    dev = m.virtio_pci(VirtioBlk(RawDisk()))
    slot = m.pci.add(dev)
    m.cfg_write(slot, 0x04, 2, 0x6)
    cap = dev.msix.cap_offset
    table = m.cfg_read(slot, 0x18) & ~0xF  # BAR2
    m.mmio_write(table, 4, 0xFEE00000)
    m.mmio_write(table + 8, 4, 0x41)
    m.cfg_write(slot, cap + 2, 2, 0x8000)
    # masked at reset: the message is latched in the PBA, not sent
    assert dev.msix.notify(0)
    pba = table + 0x800
    assert m.mmio_read(pba, 8) & 1 and not m.msis
    m.mmio_write(table + 12, 4, 0)  # unmask -> delivered, pending cleared
    assert m.wait_msi(1) and m.msis[0] == (0xFEE00000, 0x41)
    assert m.mmio_read(pba, 8) == 0
    # function mask
    m.cfg_write(slot, cap + 2, 2, 0xC000)
    dev.msix.notify(0)
    assert m.mmio_read(pba, 8) & 1
    m.cfg_write(slot, cap + 2, 2, 0x8000)
    assert m.wait_msi(2)
    # retarget the vector: the eventfd follows the table entry
    m.mmio_write(table + 8, 4, 0x55)
    dev.msix.notify(0)
    assert m.wait_msi(3) and m.msis[2] == (0xFEE00000, 0x55)
    # invalid vectors and odd accesses are harmless
    assert not dev.msix.notify(999)
    m.mmio_write(table + 1, 2, 0xFFFF)
    m.mmio_write(pba, 4, 0xFFFFFFFF)
    assert m.mmio_read(pba, 4) == 0
    dev.close()


def test_intx_shared_line_and_disable(m):
    a, b = Scratch(), Scratch()
    sa, sb = m.pci.add(a), m.pci.add(b, slot=m.pci.add(Scratch()) + 4)
    assert m.cfg_read(sa, 0x3C, 1) == a.intx_gsi
    # force both onto one GSI to check the wired-OR
    b.intx_gsi = a.intx_gsi
    g = a.intx_gsi
    m.pci.set_intx(a, True)
    m.pci.set_intx(b, True)
    m.pci.set_intx(a, False)
    assert m.platform.irq_levels[g] is True
    assert m.cfg_read(sb, 0x06, 2) & 0x8
    m.cfg_write(sb, 0x04, 2, 0x400)  # INTx disable masks the line
    assert m.platform.irq_levels[g] is False
    m.cfg_write(sb, 0x04, 2, 0)
    assert m.platform.irq_levels[g] is True
    routes = m.pci.intx_routes()
    assert (sa, 0, a.intx_gsi) in routes


def test_only_a_function_that_routes_pirqs_is_handed_their_levels(m):
    """PciDevice.routes_pirqs False and its no-op route_intx: a plain function is not
    the bus's PIRQ router and its INTx reaches the GSI alone; one that declares it
    (the PIIX3's way) gets the PIRQ lines' levels as they change."""
    plain = Scratch()
    m.pci.add(plain)
    assert not plain.routes_pirqs and m.pci.pirq_router is None
    plain.route_intx([True, False, False, False])       # the base's no-op: nothing happens

    class Router(Scratch):
        routes_pirqs = True

        def __init__(self):
            super().__init__()
            self.levels = []

        def route_intx(self, pirq_levels):
            self.levels.append(list(pirq_levels))

    router = Router()
    m.pci.add(router)
    assert m.pci.pirq_router is router
    m.pci.set_intx(plain, True)
    pirq = m.pci.intx_gsis.index(plain.intx_gsi)
    assert router.levels[-1][pirq] is True and m.platform.irq_levels[plain.intx_gsi] is True
    m.pci.set_intx(plain, False)
    assert router.levels[-1] == [False] * 4


@settings(max_examples=300, deadline=None)
@given(writes=st.lists(st.tuples(st.integers(-4, 0x1100), st.sampled_from([1, 2, 4, 3, 8]),
                                 st.integers(0, 2**32 - 1)), max_size=40))
def test_random_config_writes_keep_identity(writes):
    m = SoftMachine(ram_size=1 << 20)
    dev = m.virtio_pci(VirtioBlk(RawDisk()))
    slot = m.pci.add(dev)
    ecam_dev = PciEcam.__new__(PciEcam)
    ecam_dev.pci = m.pci
    try:
        for off, size, value in writes:
            dev.config_write(off, size, value)
            ecam_dev.write(slot << 15 | (off & 0xFFF), size, value)
            dev.config_read(off, size)
        assert m.cfg_read(slot, 0) == 0x1042_1AF4
        assert m.cfg_read(slot, 0x08) == 0x01000001
        assert m.cfg_read(slot, 0x10) & 0xF == 0x4 and m.cfg_read(slot, 0x18) & 0xF == 0
        assert m.cfg_read(slot, 0x34, 1) == 0x40
        # decoded ranges always lie inside the windows
        for (s, fn, bar), (addr, pio) in m.pci._mapped.items():
            win = m.pci.io_window if pio else m.pci.mmio_window
            assert win.contains(addr, dev.bars[bar].size)
    finally:
        dev.close()
        m.close()
