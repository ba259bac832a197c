"""The kvmpy PC as a table of devices (see kvmpy.builder for what an entry is).

    name              bus  where                        IRQ  device
    serial0           pio  COM1 0x3f8-0x3ff               4  Serial16550 on the console
    i8042             pio  0x60, 0x64                     1  keyboard controller (reset line); with a
                                                        12  display also a PS/2 mouse on the AUX port
    rtc               pio  0x70-0x71                      8  MC146818 RTC + CMOS
    post-code         pio  0x80                              POST codes / io_delay
    dma-page          pio  0x81-0x8f                         sink
    io-delay          pio  0xed                              sink
    debug-exit        pio  0xf4-0xf7                         test exit port
    system-control-a  pio  0x92                              fast A20 / reset
    acpi-pm           pio  0x600-0x63f                    9  ACPI PM1 / timer / GPE0 (SCI)
    pci-config        pio  0xcf8-0xcff                       PCI config #1 + 0xcf9 reset
    virtio-blk<N>     pci  (BARs from the PCI bus)           one per configured disk
    virtio-net<N>     pci  (BARs from the PCI bus)           one per configured NIC
    vga               pci  (BAR0 framebuffer, BAR2 MMIO)     with [display] vga = "std" or a VNC server
    vga-ports         pio  0x1ce-0x1cf, 0x3b0-0x3df          its VBE dispi and VGA registers
    vga-window        mmio 0xa0000-0xbffff                   its legacy memory window (text mode)

Not in the table: what the accelerator models itself (KVM's in-kernel or the
translator's PICs, PIT and port 0x61, IOAPIC, LAPICs). Addresses and IRQs are
the device modules' own constants, which the ACPI tables read too.
"""

from __future__ import annotations

import logging

from .boot import layout
from .boot.acpi import PciRoot, build_acpi_tables
from .builder import DeviceEntry, MachineDevices, PlacedDevice
from .config import DiskConfig, NetConfig, VmConfig
from .devices.acpi_pm import PM_BLOCK, SLP_TYP_S5, AcpiPm
from .devices.context import DeviceContext
from .devices.i8042 import KBD_COMMAND, KBD_DATA, I8042
from .devices.i8042 import AUX_IRQ
from .devices.legacy import (DEBUG_EXIT, DMA_PAGE, IO_DELAY, POST_CODE, SYSTEM_CONTROL_A, DebugExit,
                             FastA20Reset, PortSink, PostCodePort)
from .devices.pci import PciBus, PciConfigIo
from .devices.pci.config_ports import PCI_CONFIG_PORTS, ConfigPortsWithResetControl
from .devices.rtc import RTC, RtcCmos
from .devices.serial import COM1, Serial16550
from .errors import ConfigError
from .memory import GuestMemory
from .plugins import plugin_entry

log = logging.getLogger(__name__)

SERIAL = "serial0"
ACPI_PM = "acpi-pm"


# --- factories ---------------------------------------------------------------------------
def make_com1(ctx: DeviceContext) -> Serial16550:
    console = ctx.console
    queue = ctx.port_write_queue
    base = ctx.slot.base
    uart = Serial16550(irq=ctx.irq_line(ctx.slot.irq),
                       out=console.buffered_write if console is not None else (lambda data: None),
                       on_rx_space=console.rx_space_available if console is not None else None,
                       # Only THR (offset 0) is ever queued: every other register's effect is immediate.
                       tx_batching=(lambda on: queue.set_zone(base, 1, on)) if queue is not None else None)
    if console is not None:
        console.attach(uart)
    return uart


class KeyboardControllerPorts:
    """The i8042 as one device over its two slots: offset 0 is the data port, and the
    command port is as far from it as its slot is (the slots' rule in kvmpy.builder)."""

    def __init__(self, controller: I8042, command_offset: int) -> None:
        self.controller = controller
        self.command_offset = command_offset

    def read(self, offset: int, size: int) -> int:
        port = self.controller.command if offset == self.command_offset else self.controller.data
        return port.read(0, size)

    def write(self, offset: int, size: int, value: int) -> None:
        port = self.controller.command if offset == self.command_offset else self.controller.data
        port.write(0, size, value)

    def reset(self) -> None:
        self.controller.reset()


def make_i8042(ctx: DeviceContext) -> KeyboardControllerPorts:
    data, command = ctx.slots
    # A PS/2 mouse where there is a screen to point at.
    mouse = ctx.config.display.vga != "none"
    controller = I8042(on_reset=ctx.power.guest_reset, irq_kbd=ctx.irq_line(data.irq), aux=mouse,
                       irq_aux=ctx.irq_line(AUX_IRQ) if mouse else None)
    return KeyboardControllerPorts(controller, command.base - data.base)


def make_rtc(ctx: DeviceContext) -> RtcCmos:
    memory = ctx.config.memory
    low = min(memory, layout.PCI_HOLE_START)
    return RtcCmos(low, memory - low, num_cpus=ctx.num_cpus, irq=ctx.irq_line(ctx.slot.irq),
                   timer_wheel=ctx.timer_wheel)


def make_debug_exit(ctx: DeviceContext) -> DebugExit:
    return DebugExit(ctx.power.guest_power_off)


def make_system_control_a(ctx: DeviceContext) -> FastA20Reset:
    return FastA20Reset(ctx.power.guest_reset)


def make_acpi_pm(ctx: DeviceContext) -> AcpiPm:
    def on_sleep(slp_typ: int) -> None:
        if slp_typ != SLP_TYP_S5:
            log.info("guest asked for sleep type %d; only S5 (soft off) is supported", slp_typ)
            return
        ctx.power.guest_power_off(0)
    return AcpiPm(on_sleep=on_sleep, sci=ctx.irq_line(ctx.slot.irq))


def make_pci_config_ports(ctx: DeviceContext) -> ConfigPortsWithResetControl:
    return ConfigPortsWithResetControl(PciConfigIo(ctx.pci), ctx.power.guest_reset)


# --- disks and NICs ----------------------------------------------------------------------
def open_disk_image(ctx: DeviceContext):
    from .block import open_image
    disk: DiskConfig = ctx.options["disk"]
    driver = open_image(disk.path, disk.format, read_only=disk.readonly, guard_probe=True)
    if disk.format is None:
        # QEMU's warning: after the open, so that a refused image is one line.
        if driver.format == "raw":
            log.warning("Image format was not specified for '%s' and probing guessed raw. Automatically "
                        "detecting the format is dangerous for raw images, write operations on block 0 "
                        "will be restricted. Specify the 'raw' format explicitly to remove the "
                        "restrictions.", disk.path)
        else:
            log.warning("Image format was not specified for '%s' and probing guessed %s. Specify the "
                        "format explicitly (format=%s).", disk.path, driver.format, driver.format)
    return driver


def make_virtio_blk(ctx: DeviceContext):
    from .devices.virtio.blk import VirtioBlk
    from .devices.virtio.pci import VirtioPciTransport
    disk: DiskConfig = ctx.options["disk"]
    index = ctx.options["index"]
    return VirtioPciTransport(ctx.platform, ctx.events,
                              VirtioBlk(ctx.backend, serial=disk.serial, read_only=disk.readonly, name=ctx.name,
                                        werror=disk.werror, rerror=disk.rerror, errors=ctx.block_errors,
                                        device=disk_device_name(index), node_name=disk_node_name(index)))


def disk_device_name(index: int) -> str:
    """The disk's name in query-block and BLOCK_IO_ERROR: QEMU's for -drive if=virtio."""
    return f"virtio{index}"


def disk_node_name(index: int) -> str:
    """The image's node name, in QEMU's spelling of a generated one."""
    return f"#block{index}"


def describe_disk(placed: PlacedDevice) -> dict:
    """query-block's entry for a disk."""
    disk: DiskConfig = placed.entry.options["disk"]
    driver = placed.backend
    return {
        "device": disk_device_name(placed.entry.options["index"]),
        "qdev": f"/machine/peripheral-anon/device[{placed.pci_slot}]/virtio-backend",
        "locked": False, "removable": False, "type": "unknown", "tray_open": False,
        "io-status": placed.device.device.io_status,
        "inserted": {"file": disk.path, "node-name": disk_node_name(placed.entry.options["index"]),
                     "drv": driver.format, "ro": bool(driver.read_only or disk.readonly),
                     "encrypted": False, "backing_file_depth": 0, "image": {
                         "filename": disk.path, "format": driver.format, "virtual-size": driver.size}},
    }


def disk_entry(index: int, disk: DiskConfig) -> DeviceEntry:
    return DeviceEntry(f"virtio-blk{index}", "pci", make_virtio_blk, options={"disk": disk, "index": index},
                       backend=open_disk_image, query="block", describe=describe_disk)


def open_tap(ctx: DeviceContext):
    from .tap import TapNetwork
    net: NetConfig = ctx.options["net"]
    return TapNetwork.open(ifname=net.ifname or None, bridge=net.bridge or None, mac=net.mac or None,
                           vm_name=ctx.config.name, index=ctx.options["index"])


def make_virtio_net(ctx: DeviceContext):
    from .devices.virtio.net import VirtioNet
    from .devices.virtio.pci import VirtioPciTransport
    tapnet = ctx.backend
    return VirtioPciTransport(ctx.platform, ctx.events,
                              VirtioNet(tapnet.tap, mac=tapnet.mac, vm_name=ctx.config.name,
                                        index=ctx.options["index"], name=ctx.name))


def describe_nic(placed: PlacedDevice) -> dict:
    """info network's line for a NIC."""
    tapnet = placed.backend
    return {"name": f"net{placed.entry.options['index']}", "type": "tap", "ifname": tapnet.tap.name,
            "mac": ":".join(f"{b:02x}" for b in tapnet.mac), "bridge": tapnet.bridge or ""}


def nic_entry(index: int, net: NetConfig) -> DeviceEntry:
    return DeviceEntry(f"virtio-net{index}", "pci", make_virtio_net, options={"net": net, "index": index},
                       backend=open_tap, query="net", describe=describe_nic)


# --- the display ------------------------------------------------------------------------
VGA = "vga"


def make_vga(ctx: DeviceContext):
    from .devices.vga import Vga
    vga = Vga(ctx.platform, name=ctx.name)
    ctx.options["shared"]["vga"] = vga
    return vga


def make_vga_ports(ctx: DeviceContext):
    from .devices.vga import VgaPorts
    return VgaPorts(ctx.options["shared"]["vga"])


def make_vga_window(ctx: DeviceContext):
    from .devices.vga import VgaWindow
    return VgaWindow(ctx.options["shared"]["vga"])


def vga_entries(cfg: VmConfig) -> list[DeviceEntry]:
    """The PCI VGA and, as entries of their own, its legacy ports and memory window
    (one Vga behind all three: the PCI entry makes it, the others find it in
    ``shared``, so the PCI entry comes first)."""
    if cfg.display.vga == "none":
        return []
    from .devices.vga import VBE_PORTS, VGA_PORTS, VGA_WINDOW
    shared: dict = {}
    return [DeviceEntry(VGA, "pci", make_vga, options={"shared": shared}),
            DeviceEntry("vga-ports", "pio", make_vga_ports, (VBE_PORTS, VGA_PORTS), options={"shared": shared}),
            DeviceEntry("vga-window", "mmio", make_vga_window, (VGA_WINDOW,), options={"shared": shared})]


# --- the table ---------------------------------------------------------------------------
PC_DEVICES: tuple[DeviceEntry, ...] = (
    DeviceEntry(SERIAL, "pio", make_com1, (COM1,)),
    DeviceEntry("i8042", "pio", make_i8042, (KBD_DATA, KBD_COMMAND)),
    DeviceEntry("rtc", "pio", make_rtc, (RTC,)),
    DeviceEntry("post-code", "pio", lambda ctx: PostCodePort(), (POST_CODE,)),
    DeviceEntry("dma-page", "pio", lambda ctx: PortSink("dma-page"), (DMA_PAGE,)),
    DeviceEntry("io-delay", "pio", lambda ctx: PortSink("io-delay-0xed"), (IO_DELAY,)),
    DeviceEntry("debug-exit", "pio", make_debug_exit, (DEBUG_EXIT,)),
    DeviceEntry("system-control-a", "pio", make_system_control_a, (SYSTEM_CONTROL_A,)),
    DeviceEntry(ACPI_PM, "pio", make_acpi_pm, (PM_BLOCK,)),
    DeviceEntry("pci-config", "pio", make_pci_config_ports, (PCI_CONFIG_PORTS,)),
)


def pc_devices(cfg: VmConfig) -> list[DeviceEntry]:
    """The PC's fixed devices, a virtio-blk per disk, a virtio-net per NIC, then the
    user's plug-in devices ([[device]], --device; kvmpy.plugins)."""
    for disk in cfg.disks:
        if disk.interface != "virtio":
            raise ConfigError(f"{cfg.source}: disk {disk.path}: interface {disk.interface!r} is not "
                              "available yet (only virtio)")
    return [*PC_DEVICES,
            *(disk_entry(i, disk) for i, disk in enumerate(cfg.disks)),
            *(nic_entry(i, net) for i, net in enumerate(cfg.nets)),
            *vga_entries(cfg),
            *(plugin_entry(dev, i) for i, dev in enumerate(cfg.devices))]


def write_acpi_tables(devices: MachineDevices, pci: PciBus, memory: GuestMemory, num_cpus: int) -> int:
    """The ACPI tables describing these devices, at layout.ACPI_BASE; returns the RSDP's address.
    The MADT announces ``num_cpus``: the vCPUs that exist (the translator may run fewer than asked)."""
    pm = devices.entry(ACPI_PM)
    mmio = pci.windows()["mmio"]
    root = PciRoot(mem32=((mmio.base, mmio.end),), prt=tuple(pci.intx_routes()))
    return build_acpi_tables(memory, layout.ACPI_BASE, num_cpus=num_cpus,
                             pm_base=pm.slots[0].base, sci_irq=pm.irq, pci_root=root,
                             mouse=any(p.entry.name == VGA for p in devices.placed))
