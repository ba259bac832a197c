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
    fw-cfg            pio  0x510-0x51b                       QEMU's fw_cfg (firmware boot only)
    ide               pio  0x1f0-0x1f7, 0x3f6              14  IDE primary channel (compatibility mode)
                           0x170-0x177, 0x376              15  IDE secondary channel
    piix3             pci  00:01.0 ISA bridge, 00:01.1 IDE (BAR4: bus-master DMA); the ide entry's controller
    virtio-fs<N>      pci  (BARs from the PCI bus)           one per [[share]] / --share
    virtio-blk<N>     pci  (BARs from the PCI bus)           one per configured virtio disk
    virtio-net<N>     pci  (BARs from the PCI bus)           one per configured NIC
    vga               pci  (BAR0 framebuffer, BAR2 MMIO)     with [display] vga = "std" or a VNC server
    vga-ports         pio  0x1ce-0x1cf, 0x3b0-0x3df          its VBE dispi and VGA registers
    vga-window        mmio 0xa0000-0xbffff                   its legacy memory window (text mode)

Not in the table: what the accelerator models itself (KVM's in-kernel or the
translator's PICs, PIT and port 0x61, IOAPIC, LAPICs). Addresses and IRQs are
the device modules' own constants, which the ACPI tables read too.
"""

from __future__ import annotations

import dataclasses
import logging

from .boot import layout
from .boot.acpi import RSDP_FILE, TABLES_FILE, PciRoot, build_acpi_tables, build_loader_tables
from .boot.firmware import BootDevice, firmware_kind, virtio_blk_boot_path, virtio_net_boot_path
from .builder import DeviceEntry, MachineDevices, PlacedDevice
from .config import DiskConfig, NetConfig, ShareConfig, VmConfig
from .devices.acpi_pm import PM_BLOCK, SLP_TYP_S5, AcpiPm
from .devices.context import DeviceContext
from .devices.fw_cfg import FW_CFG_PORTS, FwCfg
from .devices.i8042 import KBD_COMMAND, KBD_DATA, I8042
from .devices.i8042 import AUX_IRQ
from .devices.legacy import (DEBUG_EXIT, DMA_PAGE, IO_DELAY, POST_CODE, SYSTEM_CONTROL_A, DebugExit,
                             FastA20Reset, PortSink, PostCodePort)
from .devices.pci import PciBus, PciConfigIo
from .devices.pci.config_ports import PCI_CONFIG_PORTS, ConfigPortsWithResetControl
from .devices.rtc import RTC, RtcCmos
from .devices.serial import COM1, LSR, Serial16550
from .errors import ConfigError
from .memory import GuestMemory
from .plugins import plugin_entry as load_plugin_entry

log = logging.getLogger(__name__)

SERIAL = "serial0"
ACPI_PM = "acpi-pm"
FW_CFG = "fw-cfg"


# --- factories ---------------------------------------------------------------------------
def make_com1(ctx: DeviceContext) -> Serial16550:
    console = ctx.console
    queue = ctx.port_write_queue
    reads = ctx.published_port_reads
    base = ctx.slot.base
    uart = Serial16550(irq=ctx.irq_line(ctx.slot.irq),
                       out=console.buffered_write if console is not None else (lambda data: None),
                       on_rx_space=console.rx_space_available if console is not None else None,
                       # Only THR (offset 0) is ever queued: every other register's effect is immediate.
                       tx_batching=(lambda on: queue.set_zone(base, 1, on)) if queue is not None else None,
                       # A console polls LSR before every byte it writes: one exit per byte
                       # that never reaches Python where the accelerator answers it.
                       publish_lsr=reads.publisher(base + LSR) if reads is not None else None)
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
    rtc = RtcCmos(low, memory - low, num_cpus=ctx.num_cpus, irq=ctx.irq_line(ctx.slot.irq),
                  timer_wheel=ctx.timer_wheel)
    # Index writes (port 0x70) may be queued, as QEMU queues them (its RTC's
    # coalesced_io region): reads of 0x70 answer 0xFF whatever was written, the index
    # matters only to the data port 0x71, every access to which leaves the guest, and
    # the vCPU loop hands queued writes over before it serves any exit. The NMI-mask
    # bit written with it is kept in the state and acted on nowhere. A CMOS read is
    # then one exit instead of two.
    queue = ctx.port_write_queue
    if queue is not None:
        queue.set_zone(ctx.slot.base, 1, True)
    return rtc


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
    return open_configured_image(ctx.options["disk"])


def open_configured_image(disk: DiskConfig):
    from .block import open_image
    driver = open_image(disk.path, disk.format, read_only=disk.readonly, guard_probe=True, cache=disk.cache)
    if disk.format is None:
        # QEMU's warning: after the open, so that a refused image is one line.
        if driver.format == "raw":
            log.warning("Image format was not specified for '%s' and probing guessed raw. Automatically "
                        "detecting the format is dangerous for raw images, write operations on block 0 "
                        "will be restricted. Specify the 'raw' format explicitly to remove the "
                        "restrictions.", disk.path)
        elif driver.read_only and driver.format not in ("raw", "qcow2"):
            log.warning("'%s' is a %s image, which kvmpy reads read-only; convert it to write it: "
                        "qemu-img convert -O qcow2 %s out.qcow2", disk.path, driver.format, disk.path)
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
                                        device=disk_device_name(index), node_name=disk_node_name(index),
                                        dataplane=disk.dataplane, num_queues=disk.queues,
                                        iothread=disk.iothread, write_cache=disk_write_cache(disk)))


def disk_write_cache(disk: DiskConfig) -> bool:
    """Whether the guest is offered a write cache by the disk's cache= mode."""
    from .block.direct import cache_mode
    return cache_mode(disk.cache).write_cache


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
                         "filename": disk.path, "format": driver.format, "virtual-size": driver.size},
                     "cache": disk_cache_info(disk, placed.device.device)},
    }


def disk_cache_info(disk: DiskConfig, blk) -> dict:
    """query-block's "cache" of a virtio disk: its mode, with the write cache the guest may have switched."""
    from .block.direct import cache_mode
    mode = cache_mode(disk.cache)
    return {"writeback": bool(blk.write_cache), "direct": mode.direct, "no-flush": mode.flush_ignored}


def virtio_blk_boot(placed: PlacedDevice) -> BootDevice:
    return BootDevice("disk", virtio_blk_boot_path(placed.pci_slot))


def virtio_net_boot(placed: PlacedDevice) -> BootDevice:
    return BootDevice("net", virtio_net_boot_path(placed.pci_slot))


def disk_entry(index: int, disk: DiskConfig) -> DeviceEntry:
    return DeviceEntry(f"virtio-blk{index}", "pci", make_virtio_blk,
                       options={"disk": disk, "index": index, "boot": virtio_blk_boot},
                       backend=open_disk_image, query="block", describe=describe_disk)


def open_tap(ctx: DeviceContext):
    from .tap import TapNetwork
    net: NetConfig = ctx.options["net"]
    tapnet = TapNetwork.open(ifname=net.ifname or None, bridge=net.bridge or None, mac=net.mac or None,
                             vm_name=ctx.config.name, index=ctx.options["index"], queues=net.queues)
    try:
        tapnet.vhost = open_vhost(ctx, tapnet.tap.fds)
    except BaseException:
        tapnet.close()
        raise
    return tapnet


def open_vhost(ctx: DeviceContext, tap_fds) -> list | None:
    """The NIC's vhost-net devices (before the sandbox: they are device nodes), one
    per tap queue, as ``vhost=`` says; "on" where /dev/vhost-net does not open is
    the user's error."""
    from .devices.virtio.vhost import VhostUnavailable, open_vhost_nets
    from .errors import UserError
    net: NetConfig = ctx.options["net"]
    name = f"net{ctx.options['index']}"
    try:
        return open_vhost_nets(tap_fds, net.vhost, name)
    except VhostUnavailable as e:
        raise UserError(f"{name}: vhost=on, but {e.strerror} (load the vhost_net module, or use vhost=off)") \
            from None


def open_nic_backend(ctx: DeviceContext):
    """A NIC's backend: a tap (kvmpy.tap) or user-mode networking (kvmpy.net.slirp)."""
    net: NetConfig = ctx.options["net"]
    if net.type == "user":
        try:
            from .net.slirp import UserNetwork
        except ImportError as e:
            raise ConfigError(f"net{ctx.options['index']} (user): user-mode networking is not available here "
                              f"({e}); kvmpy needs libslirp (Debian libslirp-dev) when it is built") from None
        return UserNetwork(net.user, ctx.events, name=f"net{ctx.options['index']}", runas=ctx.config.runas)
    return open_tap(ctx)


def make_virtio_net(ctx: DeviceContext):
    from .devices.virtio.net import VirtioNet
    from .devices.virtio.pci import VirtioPciTransport
    net: NetConfig = ctx.options["net"]
    if net.type == "user":
        from .tap import parse_mac
        port, mac = ctx.backend.port, parse_mac(net.mac) if net.mac else None
    else:
        port, mac = ctx.backend.tap, ctx.backend.mac
    return VirtioPciTransport(ctx.platform, ctx.events,
                              VirtioNet(port, mac=mac, vm_name=ctx.config.name,
                                        index=ctx.options["index"], name=ctx.name, dataplane=net.dataplane,
                                        queue_pairs=1 if net.type == "user" else net.queues,
                                        vhost=None if net.type == "user" else ctx.backend.vhost))


def describe_nic(placed: PlacedDevice) -> dict:
    """info network's line for a NIC; a user network's entry carries its backend
    as "usernet" for the monitor's info usernet and hostfwd_add/remove."""
    if placed.entry.options["net"].type == "user":
        return {"name": f"net{placed.entry.options['index']}", "type": "user",
                "net": str(placed.backend.options.net), "restrict": placed.backend.options.restrict,
                "mac": ":".join(f"{b:02x}" for b in placed.device.device.mac), "usernet": placed.backend}
    tapnet = placed.backend
    return {"name": f"net{placed.entry.options['index']}", "type": "tap", "ifname": tapnet.tap.name,
            "mac": ":".join(f"{b:02x}" for b in tapnet.mac), "bridge": tapnet.bridge or ""}


def nic_entry(index: int, net: NetConfig) -> DeviceEntry:
    return DeviceEntry(f"virtio-net{index}", "pci", make_virtio_net, options={"net": net, "index": index, "boot": virtio_net_boot},
                       backend=open_nic_backend, query="net", describe=describe_nic)


def open_share(ctx: DeviceContext):
    """A share's FUSE server: the directory opened now, before the sandbox."""
    from .devices.virtio.fuse_server import FuseServer
    share: ShareConfig = ctx.options["share"]
    try:
        return FuseServer(share.path, readonly=share.readonly, name=ctx.name)
    except OSError as e:
        raise ConfigError(f"share {share.tag!r}: {share.path}: {e.strerror}") from None


def make_virtio_fs(ctx: DeviceContext):
    from .devices.virtio.fs import VirtioFs
    from .devices.virtio.pci import VirtioPciTransport
    return VirtioPciTransport(ctx.platform, ctx.events, VirtioFs(ctx.backend, ctx.options["share"].tag,
                                                                 name=ctx.name, events=ctx.events))


def share_entry(index: int, share: ShareConfig) -> DeviceEntry:
    return DeviceEntry(f"virtio-fs{index}", "pci", make_virtio_fs, options={"share": share, "index": index},
                       backend=open_share)


# --- the IDE controller (PIIX3) --------------------------------------------------------
def ide_positions(disks: list[DiskConfig]) -> dict[int, DiskConfig]:
    """Where each IDE disk and CD-ROM sits, 0 primary master .. 3 secondary slave: its
    index if given (QEMU's -hda=0 .. -hdd=3, -cdrom=2), else the first free position."""
    ide = [d for d in disks if d.interface == "ide"]
    placed = {d.index: d for d in ide if d.index is not None}
    for disk in ide:
        if disk.index is None:
            free = next((p for p in range(4) if p not in placed), None)
            if free is None:
                raise ConfigError(f"disk {disk.path}: no free IDE position (at most 4 devices)")
            placed[free] = disk
    return dict(sorted(placed.items()))


def ide_device_name(position: int, disk: DiskConfig) -> str:
    """QEMU's name for an IDE drive in query-block and BLOCK_IO_ERROR: ide0-hd0, ide1-cd0."""
    return f"ide{position // 2}-{'cd' if disk.media == 'cdrom' else 'hd'}{position % 2}"


def ide_node_name(position: int) -> str:
    return f"#ide{position}"


class IdeImages:
    """The open images of the IDE drives, by position; closed together."""

    def __init__(self, drivers: dict) -> None:
        self.drivers = drivers

    def close(self) -> None:
        for driver in self.drivers.values():
            driver.close()


def open_ide_images(ctx: DeviceContext) -> IdeImages:
    drivers: dict = {}
    try:
        for position, disk in ctx.options["drives"].items():
            drivers[position] = open_configured_image(disk)
    except BaseException:
        IdeImages(drivers).close()
        raise
    return IdeImages(drivers)


class BlockErrorsOnLoop:
    """A device that does its I/O on a vCPU thread reports errors through this:
    BlockErrors are to be called on the event loop thread."""

    def __init__(self, errors, events) -> None:
        self.errors, self.events = errors, events

    def io_error(self, device: str, node_name: str, operation: str, action: str, nospace: bool,
                 reason: str, retry=None) -> None:
        self.events.call_soon(lambda: self.errors.io_error(device, node_name, operation, action, nospace,
                                                           reason, retry=retry))


def make_ide(ctx: DeviceContext):
    """The IDE controller with its drives, at its legacy ports; the PIIX3 entry after
    it puts the same controller on PCI (``options["shared"]`` carries it across)."""
    from .devices.ide import IdeController, IdeDrive, IdeLegacyPorts
    images: IdeImages = ctx.backend
    drives = {}
    for position, disk in ctx.options["drives"].items():
        drives[position] = IdeDrive(images.drivers[position], media=disk.media, read_only=disk.readonly,
                                    serial=disk.serial or f"QM0000{position + 1}", werror=disk.werror,
                                    rerror=disk.rerror, device=ide_device_name(position, disk),
                                    node_name=ide_node_name(position))
    errors = BlockErrorsOnLoop(ctx.block_errors, ctx.events) if ctx.block_errors is not None else None
    primary, _, secondary, _ = ctx.slots
    controller = IdeController(ctx.memory, (ctx.irq_line(primary.irq), ctx.irq_line(secondary.irq)),
                               drives, errors=errors, name=ctx.name)
    ctx.options["shared"]["controller"] = controller
    return IdeLegacyPorts(controller)


def make_piix3(ctx: DeviceContext):
    from .devices.pci.piix import Piix3
    return Piix3(ctx.options["shared"]["controller"], set_isa_irq=ctx.platform.set_irq_level)


def describe_ide(placed: PlacedDevice) -> list[dict]:
    """query-block's entries for the IDE drives."""
    from .devices.pci.piix import ide_boot_path
    rows = []
    controller = placed.device.controller
    for position, disk in placed.entry.options["drives"].items():
        driver = placed.backend.drivers.get(position)
        drive = controller.drive(position)
        cdrom = disk.media == "cdrom"
        row = {"device": ide_device_name(position, disk), "qdev": ide_boot_path(position),
               "locked": bool(cdrom and drive.atapi.locked), "removable": cdrom, "type": "unknown",
               "tray_open": bool(cdrom and (driver is None or drive.atapi.tray_open)),
               "io-status": drive.io_status}
        if driver is not None:
            row["inserted"] = {"file": disk.path, "node-name": ide_node_name(position), "drv": driver.format,
                               "ro": bool(driver.read_only or disk.readonly), "encrypted": False,
                               "backing_file_depth": 0, "image": {
                                   "filename": disk.path, "format": driver.format, "virtual-size": driver.size}}
        rows.append(row)
    return rows


class MediaError(Exception):
    """A monitor's eject/change the drives cannot do (QEMU's message)."""


class RemovableMedia:
    """The monitor's eject and change (blockdev-change-medium) on the IDE CD-ROMs,
    by QEMU's device names ("ide1-cd0")."""

    def __init__(self, devices: MachineDevices) -> None:
        placed = next(p for p in devices.placed if p.entry.name == "ide")
        self.controller = placed.device.controller
        self.images: IdeImages = placed.backend
        self.disks: dict[int, DiskConfig] = placed.entry.options["drives"]

    def _cdrom(self, device: str) -> int:
        for position, disk in self.disks.items():
            if ide_device_name(position, disk) == device:
                if disk.media != "cdrom":
                    raise MediaError(f"Device '{device}' is not removable")
                return position
        raise MediaError(f"Device '{device}' not found")

    def eject(self, device: str, force: bool = False) -> None:
        position = self._cdrom(device)
        drive = self.controller.drive(position)
        if drive.atapi.locked and not force:
            raise MediaError(f"Device '{device}' is locked and force was not specified, "
                             "wait for tray to open and try again")
        self._swap(position, None)

    def change(self, device: str, filename: str, format: str | None = None) -> None:
        from .block import open_image
        from .errors import ImageError
        position = self._cdrom(device)
        if format not in (None, "raw", "qcow2"):
            raise MediaError(f"Unknown driver '{format}'")
        try:
            driver = open_image(filename, format, read_only=True)
        except (ImageError, OSError) as e:
            raise MediaError(f"Could not open '{filename}': {e}") from None
        self._swap(position, driver)
        self.disks[position] = dataclasses.replace(self.disks[position], path=filename, format=driver.format)

    def _swap(self, position: int, driver) -> None:
        old = self.controller.change_medium(position, driver)
        if driver is None:
            self.images.drivers.pop(position, None)
        else:
            self.images.drivers[position] = driver
        if old is not None:
            old.close()


def ide_boot(placed: PlacedDevice) -> list[BootDevice]:
    from .devices.pci.piix import ide_boot_path
    return [BootDevice("cdrom" if disk.media == "cdrom" else "disk", ide_boot_path(position))
            for position, disk in placed.entry.options["drives"].items()]


def ide_entries(cfg: VmConfig) -> list[DeviceEntry]:
    """The IDE controller (its legacy ports, with the drives) and the PIIX3 that puts
    it on PCI; there on every PC, with or without drives, as on QEMU's."""
    from .devices.ide import LEGACY_SLOTS
    shared: dict = {}
    return [DeviceEntry("ide", "pio", make_ide, LEGACY_SLOTS,
                        options={"drives": ide_positions(cfg.disks), "shared": shared, "boot": ide_boot},
                        backend=open_ide_images, query="block", describe=describe_ide),
            DeviceEntry("piix3", "pci", make_piix3, options={"shared": shared})]


def make_fw_cfg(ctx: DeviceContext) -> FwCfg:
    # Filled by the machine at boot (kvmpy.boot.firmware.fill_fw_cfg): the items
    # describe devices placed after this one.
    return FwCfg(ctx.platform.memory)


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

# What a firmware boot adds (the i440FX host bridge is the PCI bus's device 0). Only
# then: a direct boot keeps 0x510-0x51B free, as it always was, for plug-ins.
FIRMWARE_DEVICES: tuple[DeviceEntry, ...] = (
    DeviceEntry(FW_CFG, "pio", make_fw_cfg, (FW_CFG_PORTS,)),
)


# QEMU's test devices (-device isa-debug-exit, pc-testdev, pci-testdev: kvmpy.qemu_cli)
QEMU_DEBUG_EXIT_TYPE = "kvmpy.devices.testdev:IsaDebugExit"
PCI_TESTDEV_TYPE = "pci-testdev"


def make_pci_testdev(ctx: DeviceContext):
    from .devices.testdev import PciTestdev
    return PciTestdev(name=ctx.name)


def fixed_devices(cfg: VmConfig) -> tuple[DeviceEntry, ...]:
    """PC_DEVICES, but for kvmpy's own exit port where QEMU's isa-debug-exit takes its
    place, wherever that sits: a guest written for QEMU finds nothing else at 0xf4."""
    if any(dev.type == QEMU_DEBUG_EXIT_TYPE for dev in cfg.devices):
        return tuple(e for e in PC_DEVICES if e.name != "debug-exit")
    return PC_DEVICES


def plugin_entry(dev, index: int) -> DeviceEntry:
    """A [[device]]/--device/-device: pci-testdev is kvmpy's own PCI device (a plug-in
    cannot be a plain PCI function), the rest kvmpy.plugins' plug-ins."""
    if dev.type == PCI_TESTDEV_TYPE:
        return DeviceEntry(dev.options.get("id") or f"pci-testdev{index}", "pci", make_pci_testdev)
    return load_plugin_entry(dev, index)


def pc_devices(cfg: VmConfig) -> list[DeviceEntry]:
    """The PC's fixed devices, the PIIX3 with the IDE disks and CD-ROMs, a virtio-blk per
    virtio disk, a virtio-net per NIC, then the user's plug-in devices ([[device]],
    --device; kvmpy.plugins)."""
    virtio_disks = [disk for disk in cfg.disks if disk.interface == "virtio"]
    return [*fixed_devices(cfg),
            *(FIRMWARE_DEVICES if firmware_kind(cfg) != "none" else ()),
            *ide_entries(cfg),
            *(disk_entry(i, disk) for i, disk in enumerate(virtio_disks)),
            *(share_entry(i, share) for i, share in enumerate(cfg.shares)),
            *(nic_entry(i, net) for i, net in enumerate(cfg.nets)),
            *vga_entries(cfg),
            *(plugin_entry(dev, i) for i, dev in enumerate(cfg.devices))]


def pci_root_of(pci: PciBus) -> PciRoot:
    """The root bridge as ACPI _CRS describes it: the very windows the bus decodes."""
    windows = pci.windows()
    mmio, mmio64 = windows["mmio"], windows["mmio64"]
    return PciRoot(mem32=((mmio.base, mmio.end),),
                   mem64=((mmio64.base, mmio64.end),) if mmio64 is not None else (),
                   prt=tuple(pci.intx_routes()))


def write_acpi_tables(devices: MachineDevices, pci: PciBus, memory: GuestMemory, num_cpus: int) -> int:
    """The ACPI tables describing these devices, at layout.ACPI_BASE; returns the RSDP's address.
    The MADT announces ``num_cpus``: the vCPUs that exist (the translator may run fewer than asked)."""
    pm = devices.entry(ACPI_PM)
    root = pci_root_of(pci)
    return build_acpi_tables(memory, layout.ACPI_BASE, num_cpus=num_cpus,
                             pm_base=pm.slots[0].base, sci_irq=pm.irq, pci_root=root,
                             mouse=has_mouse(devices))


def acpi_loader_files(devices: MachineDevices, pci: PciBus, num_cpus: int) -> dict[str, bytes]:
    """The same tables as write_acpi_tables, as fw_cfg files for the firmware's
    table loader (etc/table-loader, etc/acpi/tables, etc/acpi/rsdp)."""
    pm = devices.entry(ACPI_PM)
    root = pci_root_of(pci)
    t = build_loader_tables(num_cpus=num_cpus, pm_base=pm.slots[0].base, sci_irq=pm.irq, pci_root=root,
                            mouse=has_mouse(devices))
    return {"etc/table-loader": t.loader, TABLES_FILE: t.tables, RSDP_FILE: t.rsdp}


def has_mouse(devices: MachineDevices) -> bool:
    """A display brings a PS/2 mouse on the i8042's AUX port, which ACPI must announce."""
    return any(p.entry.name == VGA for p in devices.placed)
