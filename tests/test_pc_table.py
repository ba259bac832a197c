"""The PC as a table (kvmpy.pc, kvmpy.builder): every entry placed where it says,
no two ranges overlapping, the ACPI tables agreeing with the table, a plug-in
shaped device answering through the bus, disks and NICs as entries."""

from __future__ import annotations

import dataclasses
import socket
import struct
from types import SimpleNamespace

import pytest

from kvmpy.boot import acpi, layout
from kvmpy.builder import DeviceEntry, PlacedDevice, build_devices, check_table
from kvmpy.config import DiskConfig, NetConfig, VmConfig
from kvmpy.devices import acpi_pm
from kvmpy.devices.bus import Bus, MmioSlot, PortSlot
from kvmpy.devices.context import DeviceContext
from kvmpy.devices.irqchip import SoftIrqChip
from kvmpy.devices.timers import TimerWheel
from kvmpy.devices.pci import PciBus
from kvmpy.devices.platform import SoftPlatform
from kvmpy.errors import ConfigError
from kvmpy.events import EventLoop
from kvmpy.memory import GuestMemory
from kvmpy.pc import ACPI_PM, PC_DEVICES, SERIAL, pc_devices, write_acpi_tables

from test_acpi import walk


class PowerRecorder:
    def __init__(self) -> None:
        self.resets = 0
        self.power_offs: list[int] = []

    def guest_reset(self) -> None:
        self.resets += 1

    def guest_power_off(self, status: int) -> None:
        self.power_offs.append(status)


class Pc:
    """A PC built from a table on a software platform, with the translator's
    interrupt controllers on the buses first (as the TcgAccel puts them)."""

    def __init__(self, entries, cfg: VmConfig | None = None) -> None:
        self.cfg = cfg or VmConfig(memory=32 << 20, firmware="none")
        self.memory = GuestMemory.anonymous(layout.ram_layout(self.cfg.memory))
        self.pio, self.mmio = Bus("pio"), Bus("mmio")
        self.wheel = TimerWheel(threaded=False)
        self.chip = SoftIrqChip(1, cpu_kick=lambda cpu: None, timer_wheel=self.wheel)
        self.chip.register(self.pio, self.mmio, port_b=True)
        self.irqs: list[tuple[int, bool]] = []
        self.platform = SoftPlatform(self.memory, on_irq=lambda gsi, level: self.irqs.append((gsi, level)))
        self.events = EventLoop(name="test-pc")
        self.power = PowerRecorder()
        self.pci = PciBus(self.mmio, self.pio, self.platform, mmio_window=layout.PCI_MMIO_WINDOW,
                          io_window=layout.PCI_IO_WINDOW)
        self.closers: list = []
        ctx = DeviceContext(name="test", platform=self.platform, events=self.events, config=self.cfg,
                            power=self.power, timer_wheel=self.wheel, pci=self.pci)
        try:
            self.devices = build_devices(entries, ctx, self.pio, self.mmio, self.closers.append)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fn in reversed(self.closers):
            fn()
        self.platform.close()
        self.events.close()
        self.wheel.close()


@pytest.fixture
def pc():
    machine = Pc(pc_devices(VmConfig(memory=32 << 20, firmware="none")))
    yield machine
    machine.close()


def entry_named(name: str) -> DeviceEntry:
    return next(e for e in PC_DEVICES if e.name == name)


# --- the table ----------------------------------------------------------------------------

def test_every_entry_is_placed_once_where_the_table_says(pc):
    names = [p.entry.name for p in pc.devices.placed]
    # the IDE controller is on every PC: its legacy ports, then the PIIX3 at 00:01
    assert names == [e.name for e in PC_DEVICES] + ["ide", "piix3"] and len(set(names)) == len(names)
    for placed in pc.devices.placed:
        if placed.entry.bus == "pci":
            assert placed.pci_slot == 1
            continue
        bus = {"pio": pc.pio, "mmio": pc.mmio}[placed.entry.bus]
        for slot in placed.entry.slots:
            for addr in (slot.base, slot.end - 1):
                base, device = bus.find(addr)
                assert base == slot.base
                # the first slot holds the device itself, a later one a window onto it
                assert device is placed.device or device.device is placed.device, placed.entry.name


def test_no_two_ranges_overlap():
    check_table(pc_devices(VmConfig(disks=[DiskConfig("a.img")], nets=[NetConfig()])))
    ranges = sorted((s.base, s.end, e.name) for e in PC_DEVICES if e.bus == "pio" for s in e.slots)
    for (_, end, name), (base, _, other) in zip(ranges, ranges[1:]):
        assert end <= base, f"{name} overlaps {other}"
    # The accelerator's own ports (PICs, PIT, port 0x61) are not claimed by the table
    # either: Pc registers the translator's interrupt controllers first, and the bus
    # would refuse an overlap. A table that overlaps itself is refused before any device exists.
    clash = DeviceEntry("clash", "pio", lambda ctx: None, (PortSlot(base=0x3FC, length=8),))
    with pytest.raises(ConfigError, match="overlaps 'serial0'"):
        check_table([*PC_DEVICES, clash])
    with pytest.raises(ConfigError, match="used twice"):
        check_table([*PC_DEVICES, dataclasses.replace(clash, name=SERIAL, slots=(PortSlot(0x500, 1),))])


def test_entries_are_checked_when_declared():
    with pytest.raises(ConfigError, match="bus 'isa'"):
        DeviceEntry("x", "isa", lambda ctx: None, (PortSlot(0x500, 1),))
    with pytest.raises(ConfigError, match="PortSlot"):
        DeviceEntry("x", "pio", lambda ctx: None, (MmioSlot(0xD0000000, 0x1000),))
    with pytest.raises(ConfigError, match="PCI bus"):
        DeviceEntry("x", "pci", lambda ctx: None, (PortSlot(0x500, 1),))
    with pytest.raises(ConfigError, match="describe"):
        DeviceEntry("x", "pci", lambda ctx: None, query="block")


def test_devices_reach_the_machine_through_the_context(pc):
    pc.pio.write(0xF4, 1, 7)                                  # debug-exit
    pc.pio.write(0xCF9, 1, 0x06)                              # PIIX reset control
    pc.pio.write(0x92, 1, 0x01)                               # fast reset
    pc.pio.write(0x64, 1, 0xFE)                               # i8042 pulse reset line
    pm = entry_named(ACPI_PM).slots[0].base
    pc.pio.write(pm + acpi_pm.PM1_CNT_OFFSET, 2, (acpi_pm.SLP_TYP_S5 << 10) | acpi_pm.SLP_EN)
    assert pc.power.power_offs == [7, 0] and pc.power.resets == 3
    # PCI config mechanism #1 behind the same ports: the host bridge's vendor id
    pc.pio.write(0xCF8, 4, 0x80000000)
    assert pc.pio.read(0xCFC, 2) == 0x1B36
    # the UART raises the IRQ of its slot
    com1 = entry_named(SERIAL).slots[0]
    pc.pio.write(com1.base + 4, 1, 0x08)                      # MCR: OUT2 gates the IRQ line
    pc.pio.write(com1.base + 1, 1, 0x02)                      # IER: THR empty
    assert (com1.irq, True) in pc.irqs


def test_reset_reaches_every_resettable_device(pc):
    com1 = entry_named(SERIAL).slots[0]
    pc.pio.write(com1.base + 7, 1, 0x5A)                      # scratch register
    pc.pio.write(0x70, 1, 0x10)                               # RTC index
    pc.devices.reset()
    assert pc.pio.read(com1.base + 7, 1) == 0
    assert {type(d).__name__ for d in pc.devices.resettable} == {"Serial16550", "KeyboardControllerPorts",
                                                                "RtcCmos", "IdeLegacyPorts", "Piix3"}


# --- ACPI ---------------------------------------------------------------------------------

def test_acpi_tables_agree_with_the_table(pc):
    rsdp = write_acpi_tables(pc.devices, pc.pci, pc.memory, num_cpus=1)
    tables = walk(pc.memory, rsdp)
    fadt = tables[b"FACP"][1]
    pm = entry_named(ACPI_PM)
    sci, = struct.unpack_from("<H", fadt, 46)
    evt, _, cnt, _, _, tmr = struct.unpack_from("<6I", fadt, 56)
    assert sci == pm.irq
    assert evt == pm.slots[0].base + acpi_pm.PM1_EVT_OFFSET and tmr == pm.slots[0].base + acpi_pm.PM_TMR_OFFSET
    reset_port, reset_value = struct.unpack_from("<QB", fadt, 120)
    config_ports = entry_named("pci-config").slots[0]
    assert config_ports.base <= reset_port < config_ports.end
    pc.pio.write(reset_port, 1, reset_value)
    assert pc.power.resets == 1
    madt = tables[b"APIC"][1]
    assert struct.pack("<BBBBIH", 2, 10, 0, pm.irq, pm.irq, 0x000D) in madt   # SCI: level, high
    dsdt = tables[b"DSDT"][1]
    com1 = entry_named(SERIAL)
    assert acpi.res_template(acpi.res_io(com1.slots[0].base, com1.slots[0].length), acpi.res_irq(com1.irq)) in dsdt
    rtc = entry_named("rtc").slots[0]
    assert acpi.res_template(acpi.res_io(rtc.base, rtc.length)) in dsdt
    data, command = entry_named("i8042").slots
    assert acpi.res_template(acpi.res_io(data.base, 1), acpi.res_io(command.base, 1), acpi.res_irq(data.irq)) in dsdt


# --- plug-ins -----------------------------------------------------------------------------

class ScratchPorts:
    """What a plug-in port device looks like: a class taking the context, nothing
    of kvmpy's internals, its options from the table."""

    def __init__(self, ctx: DeviceContext) -> None:
        self.value = ctx.options["value"]
        self.initial = self.value
        self.raise_irq = ctx.irq_line(ctx.slot.irq)
        self.closed = False

    def read(self, offset: int, size: int) -> int:
        return (self.value + offset) & 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        self.value = value & 0xFF
        self.raise_irq(True)

    def reset(self) -> None:
        self.value = self.initial

    def close(self) -> None:
        self.closed = True


def test_a_plugin_shaped_device_answers_through_the_bus():
    plugin = DeviceEntry("scratch", "pio", ScratchPorts, (PortSlot(base=0x510, length=2, irq=5),),
                         options={"value": 0x5A})
    pc = Pc([*pc_devices(VmConfig(memory=32 << 20, firmware="none")), plugin])
    try:
        dev = pc.devices.get("scratch", ScratchPorts)
        assert pc.pio.read(0x510, 1) == 0x5A and pc.pio.read(0x511, 1) == 0x5B
        pc.pio.write(0x510, 1, 0x33)
        assert pc.pio.read(0x510, 1) == 0x33 and (5, True) in pc.irqs
        pc.devices.reset()
        assert pc.pio.read(0x510, 1) == 0x5A
    finally:
        pc.close()
    assert dev.closed


def test_a_device_over_several_slots_sees_one_range():
    class Echo:
        def __init__(self, ctx):
            pass

        def read(self, offset, size):
            return offset

        def write(self, offset, size, value):
            pass

    entry = DeviceEntry("echo", "pio", Echo, (PortSlot(0x520, 2), PortSlot(0x530, 1)))
    pc = Pc([entry])
    try:
        assert [pc.pio.read(p, 1) for p in (0x520, 0x521, 0x530)] == [0, 1, 0x10]
        assert pc.pio.read(0x52F, 1) == 0xFF                 # the hole stays unclaimed
    finally:
        pc.close()


# --- disks and NICs -----------------------------------------------------------------------

def test_disks_and_nics_become_entries(tmp_path):
    cfg = VmConfig(disks=[DiskConfig(str(tmp_path / "a.img"), format="raw"),
                          DiskConfig(str(tmp_path / "b.img"), format="raw", readonly=True, serial="B")],
                   nets=[NetConfig(bridge="br0")], firmware="none")
    entries = pc_devices(cfg)
    extra = entries[len(PC_DEVICES) + 2:]      # after the IDE controller's two entries
    assert [(e.name, e.bus, e.query) for e in entries[len(PC_DEVICES):][:2]] == [
        ("ide", "pio", "block"), ("piix3", "pci", "")]
    assert [(e.name, e.bus, e.query) for e in extra] == [
        ("virtio-blk0", "pci", "block"), ("virtio-blk1", "pci", "block"), ("virtio-net0", "pci", "net")]
    assert extra[1].options["disk"] is cfg.disks[1] and extra[2].options["net"] is cfg.nets[0]


def test_block_and_network_info_come_from_the_entries(tmp_path):
    for name in ("a.img", "b.img"):
        (tmp_path / name).write_bytes(bytes(1 << 20))
    cfg = VmConfig(memory=32 << 20,
                   disks=[DiskConfig(str(tmp_path / "a.img"), format="raw"),
                          DiskConfig(str(tmp_path / "b.img"), format="raw", readonly=True)],
                   nets=[NetConfig()])
    host_end, guest_end = socket.socketpair()
    fake_tap = SimpleNamespace(tap=SimpleNamespace(name="tap-test0", fd=host_end.fileno(),
                                                   set_offload=lambda flags: True),
                               mac=bytes.fromhex("525400123456"), bridge="br0", vhost=None)
    # A tap needs root: the NIC's entry gets a stand-in backend, the rest is as built.
    entries = [dataclasses.replace(e, backend=lambda ctx: fake_tap) if e.query == "net" else e
               for e in pc_devices(cfg)]
    pc = Pc(entries, cfg)
    try:
        blocks = pc.devices.query("block")
        assert [b["device"] for b in blocks] == ["virtio0", "virtio1"]
        slots = [p.pci_slot for p in pc.devices.placed if p.entry.bus == "pci"]
        assert slots == [1, 2, 3, 4]      # the PIIX3 first, at 00:01
        assert blocks[0]["qdev"] == "/machine/peripheral-anon/device[2]/virtio-backend"
        assert blocks[1]["inserted"]["ro"] is True and blocks[0]["inserted"]["ro"] is False
        assert blocks[0]["inserted"]["image"]["virtual-size"] == 1 << 20
        assert pc.devices.query("net") == [{"name": "net0", "type": "tap", "ifname": "tap-test0",
                                            "mac": "52:54:00:12:34:56", "bridge": "br0"}]
    finally:
        pc.close()
        host_end.close()
        guest_end.close()


def test_the_machine_is_built_from_the_table_and_is_a_vm_control(tmp_path):
    from conftest import guest_path
    from kvmpy.machine import Machine
    from kvmpy.monitor.control import VmControl
    (tmp_path / "a.img").write_bytes(bytes(1 << 20))
    cfg = VmConfig(kernel=guest_path("hello"), memory=32 << 20,
                   disks=[DiskConfig(str(tmp_path / "a.img"), format="raw")])
    m = Machine(cfg, accel="tcg")
    try:
        assert isinstance(m, VmControl)
        assert [p.entry.name for p in m.devices.placed] == [e.name for e in pc_devices(cfg)]
        assert [b["inserted"]["file"] for b in m.block_devices()] == [str(tmp_path / "a.img")]
        assert m.network_devices() == []
    finally:
        m.close()


def test_describe_is_the_monitor_shape():
    entry = pc_devices(VmConfig(nets=[NetConfig()]))[-1]
    tapnet = SimpleNamespace(tap=SimpleNamespace(name="tap7"), mac=bytes(range(6)), bridge=None)
    assert entry.describe(PlacedDevice(entry, device=None, backend=tapnet, pci_slot=4)) == {
        "name": "net0", "type": "tap", "ifname": "tap7", "mac": "00:01:02:03:04:05", "bridge": ""}


def test_a_firmware_boot_adds_fw_cfg():
    from kvmpy.pc import FW_CFG
    names = [e.name for e in pc_devices(VmConfig(memory=32 << 20, firmware="bios"))]
    assert names == [e.name for e in PC_DEVICES] + [FW_CFG, "ide", "piix3"]
