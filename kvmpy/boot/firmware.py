"""Booting through PC firmware (SeaBIOS, as QEMU does without -kernel) instead of
loading the kernel ourselves.

What a PC gives its BIOS, and what this module sets up in guest memory:

- the firmware image as ROM just below 4 GiB (bios-256k.bin at 0xFFFC0000), where
  the reset vector 0xFFFFFFF0 lies;
- the legacy BIOS area 0xC0000-0xFFFFF as shadow RAM in the 13 pieces the
  i440FX's PAM registers govern, each write-protected until the firmware opens it
  through PAM, the top 128 KiB starting as a copy of the image's last 128 KiB (the
  "isa-bios" alias QEMU maps there); 0xA0000-0xBFFFF stays unmapped (the VGA
  window: reads give 0xFF);
- RAM below 640 KiB and from 1 MiB up, as the e820 map in fw_cfg says;
- fw_cfg items (kvmpy.devices.fw_cfg): RAM size, CPUs, e820, boot order, serial
  console, ACPI tables through the table loader, SMBIOS.

A system reset brings the image state back: the shadow copy, PAM closed.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterable

from ..errors import ConfigError
from ..memory import GuestMemory
from . import layout

log = logging.getLogger(__name__)

SEABIOS_IMAGES = ("/usr/share/seabios/bios-256k.bin", "/usr/share/qemu/bios-256k.bin")
# The combined image (code and a variable store in one), as QEMU's -bios takes it:
# mapped read-only, OVMF keeps its variables in RAM.
OVMF_IMAGES = ("/usr/share/ovmf/OVMF.fd", "/usr/share/qemu/OVMF.fd")
LINUXBOOT_ROMS = ("/usr/share/qemu/linuxboot_dma.bin", "/usr/share/qemu/genroms/linuxboot_dma.bin",
                  "/usr/share/seabios/linuxboot_dma.bin")

VGA_WINDOW = (0xA0000, 0x20000)
OPTION_ROM_AREA = 0xC0000
ISA_BIOS_AREA = 0xE0000            # the image's last 128 KiB also appears here
ISA_BIOS_SIZE = 0x20000
BIOS_AREA_END = 0x100000
LOW_RAM_END = 0xA0000              # conventional memory: 640 KiB
MAX_IMAGE = 16 << 20               # the top 16 MiB below 4 GiB is the flash window

PAM_WRITE = 0x2                    # kvmpy.devices.pci.host_bridge's write-enable bit

E820_RAM = 1
E820_RESERVED = 2


def firmware_kind(cfg) -> str:
    """"none" (kvmpy loads the kernel), "bios" or "uefi". A kernel without a
    firmware key keeps the fast direct boot; no kernel means SeaBIOS, as in QEMU."""
    if cfg.firmware is not None:
        return cfg.firmware
    return "none" if cfg.kernel else "bios"


def firmware_ram_layout(mem_size: int) -> list[tuple[int, int]]:
    """RAM regions with the BIOS area left out: [0, 640K) and [1M, ...), split at
    the PCI hole like layout.ram_layout."""
    if mem_size <= BIOS_AREA_END:
        raise ConfigError(f"memory {mem_size >> 10}K: firmware boot needs more than 1M of RAM")
    regions = [(0, LOW_RAM_END)]
    low_end = min(mem_size, layout.PCI_HOLE_START)
    regions.append((BIOS_AREA_END, low_end - BIOS_AREA_END))
    if mem_size > layout.PCI_HOLE_START:
        regions.append((layout.FOUR_GIB, mem_size - layout.PCI_HOLE_START))
    return regions


def e820_entries(mem_size: int) -> list[tuple[int, int, int]]:
    """QEMU's etc/e820: RAM below 4 GiB from 0 and RAM above; the firmware carves
    out its own areas (EBDA, BIOS) from the first entry."""
    low_end = min(mem_size, layout.PCI_HOLE_START)
    entries = [(0, low_end, E820_RAM)]
    if mem_size > layout.PCI_HOLE_START:
        entries.append((layout.FOUR_GIB, mem_size - layout.PCI_HOLE_START, E820_RAM))
    return entries


def find_image(kind: str, configured: str | None, source: str) -> str:
    """The firmware image to map: --bios / key 'bios', else Debian's."""
    if configured:
        return configured
    candidates = OVMF_IMAGES if kind == "uefi" else SEABIOS_IMAGES
    for path in candidates:
        if os.path.isfile(path):
            return path
    package = "ovmf" if kind == "uefi" else "seabios"
    raise ConfigError(f"{source}: firmware {kind}: no image found ({', '.join(candidates)}); "
                      f"install Debian's {package} package or give one with --bios FILE (key 'bios')")


def read_image(path: str, source: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_IMAGE + 1)
    except OSError as e:
        raise ConfigError(f"{source}: bios {path}: {e.strerror}") from None
    if not data or len(data) > MAX_IMAGE or len(data) % 0x1000:
        raise ConfigError(f"{source}: bios {path}: a firmware image is a multiple of 4 KiB up to "
                          f"{MAX_IMAGE >> 20} MiB ({len(data)} bytes here)")
    return data


def open_vars_store(cfg, image_size: int) -> tuple[int, int, int]:
    """(fd, size, guest address) of the UEFI variable store ``cfg.firmware_vars``: opened
    read-write and locked against a second VM (as QEMU locks a pflash image), placed
    right below the firmware code as QEMU stacks its two flashes under 4 GiB."""
    import fcntl
    path, source = cfg.firmware_vars, cfg.source
    where = f"{source}: firmware_vars {path}"
    if firmware_kind(cfg) != "uefi":
        raise ConfigError(f"{where}: a variable store is for UEFI firmware (--firmware uefi)")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"{where}: {e.strerror} (the guest writes it: it must be writable)") from None
    try:
        size = os.fstat(fd).st_size
        if not size or size % 0x1000 or size + image_size > MAX_IMAGE:
            raise ConfigError(f"{where}: a variable store is a multiple of 4 KiB, at most "
                              f"{(MAX_IMAGE - image_size) >> 10} KiB beside this firmware ({size} bytes here)")
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"{where}: in use by another process (locked)") from None
    except BaseException:
        os.close(fd)
        raise
    return fd, size, layout.FOUR_GIB - image_size - size


class FirmwareMemory:
    """The firmware's ROM and the BIOS area's shadow RAM in ``memory``; made before
    the accelerator (which maps every region once), put back by ``reset()``."""

    def __init__(self, memory: GuestMemory, image: bytes) -> None:
        self.memory = memory
        self.image = image
        self.rom_base = layout.FOUR_GIB - len(image)
        memory.add_rom(self.rom_base, image)
        from ..devices.pci.host_bridge import PAM_SEGMENTS
        self.segments = [(base, size) for base, size, _reg, _shift in PAM_SEGMENTS]
        for base, size in sorted(self.segments):
            memory.add_region(base, size)
            memory.set_readonly(base, True)
        self.reset()

    def reset(self) -> None:
        """As at power-on: the BIOS area a fresh copy of the image's top, protected."""
        tail = self.image[-ISA_BIOS_SIZE:].rjust(ISA_BIOS_SIZE, b"\xff")
        for base, size in self.segments:
            if base >= ISA_BIOS_AREA:
                data = tail[base - ISA_BIOS_AREA:base - ISA_BIOS_AREA + size]
            else:
                data = bytes(size)
            self.memory.view(base, size)[:] = data
            self.memory.set_readonly(base, True)
        rom = self.memory.view(self.rom_base, len(self.image))
        if rom != self.image:
            rom[:] = self.image

    def pam_changed(self, segments: Iterable[tuple[int, int, int]]) -> None:
        """The host bridge's PAM registers: a piece is writable RAM when its write
        enable is set, else writes go nowhere (reads always see the shadow, which
        holds what the ROM would give until the firmware has copied itself)."""
        for base, _size, bits in segments:
            self.memory.set_readonly(base, not bits & PAM_WRITE)


# --- boot order (SeaBIOS src/boot.c matches these OpenFirmware paths) -----------------------
@dataclass(frozen=True)
class BootDevice:
    """A device the firmware can boot from: ``kind`` is "disk", "cdrom" or "net"
    (vm.toml's boot = [...] words), ``path`` its OpenFirmware path as QEMU writes it
    into fw_cfg's bootorder, e.g. "/pci@i0cf8/scsi@4/disk@0,0" for a virtio-blk."""

    kind: str
    path: str


def virtio_blk_boot_path(pci_slot: int) -> str:
    return f"/pci@i0cf8/scsi@{pci_slot:x}/disk@0,0"


def virtio_net_boot_path(pci_slot: int) -> str:
    return f"/pci@i0cf8/ethernet@{pci_slot:x}/ethernet-phy@0"


def bootorder(order: list[str], devices: list[BootDevice]) -> bytes:
    """fw_cfg's bootorder: the devices of each kind in ``order``, in device order,
    one path a line; empty without an order (the firmware's own order then)."""
    lines = [d.path for kind in order for d in devices if d.kind == kind]
    return "".join(line + "\n" for line in lines).encode()


# --- fw_cfg contents -----------------------------------------------------------------------
def fill_fw_cfg(fw_cfg, cfg, num_cpus: int, boot_devices: list[BootDevice],
                serial_port: int | None, extra_files: dict[str, bytes] | None = None,
                first_boot_paths: tuple[str, ...] = ()) -> None:
    """The items SeaBIOS and OVMF read, from the machine's configuration."""
    from ..devices import fw_cfg as f
    fw_cfg.add_u64(f.FW_CFG_RAM_SIZE, cfg.memory)
    fw_cfg.add_u16(f.FW_CFG_NB_CPUS, num_cpus)
    fw_cfg.add_u16(f.FW_CFG_MAX_CPUS, num_cpus)
    fw_cfg.add_u16(f.FW_CFG_NOGRAPHIC, 1)
    fw_cfg.add_u16(f.FW_CFG_BOOT_MENU, 1 if cfg.boot_menu else 0)
    fw_cfg.add_u32(f.FW_CFG_IRQ0_OVERRIDE, 1)
    fw_cfg.add_file("etc/e820", b"".join(struct.pack("<QQI", a, s, t) for a, s, t in e820_entries(cfg.memory)))
    # Without a menu SeaBIOS skips its "Press ESC" pause entirely.
    fw_cfg.add_file("etc/show-boot-menu", struct.pack("<B", 1 if cfg.boot_menu else 0))
    if cfg.boot_menu:
        fw_cfg.add_file("etc/boot-menu-wait", struct.pack("<H", 2500))
    from .smbios import build_smbios
    tables, anchor = build_smbios(num_cpus, [(a, n) for a, n, _t in e820_entries(cfg.memory)], cfg.memory)
    fw_cfg.add_file("etc/smbios/smbios-tables", tables)
    fw_cfg.add_file("etc/smbios/smbios-anchor", anchor)
    if serial_port is not None:
        # SeaBIOS mirrors its text console on this UART (sercon).
        fw_cfg.add_file("etc/sercon-port", struct.pack("<H", serial_port))
    order = "".join(p + "\n" for p in first_boot_paths).encode() + bootorder(cfg.boot_order, boot_devices)
    if order:
        fw_cfg.add_file("bootorder", order)
    for name, data in (extra_files or {}).items():
        fw_cfg.add_file(name, data)


def boot_devices_of(devices) -> list[BootDevice]:
    """The boot devices the machine's table declares: an entry whose options hold
    ``boot = callable(placed) -> BootDevice | list[BootDevice] | None`` (kvmpy.pc's
    virtio disks and NICs one each, the IDE controller one per drive)."""
    out = []
    for placed in devices.placed:
        describe: Callable | None = placed.entry.options.get("boot")
        if describe is not None:
            dev = describe(placed)
            if isinstance(dev, list):
                out.extend(dev)
            elif dev is not None:
                out.append(dev)
    return out


# --- -kernel through the firmware (QEMU hw/i386/x86.c x86_load_linux + linuxboot_dma.bin) ---
LINUXBOOT_ROM_FILE = "genroms/linuxboot_dma.bin"
LINUXBOOT_BOOT_PATH = "/rom@genroms/linuxboot_dma.bin"
REAL_MODE_ADDR = 0x10000           # where the option ROM puts the setup code
CMDLINE_ADDR = 0x20000
PROTECTED_MODE_ADDR = 0x100000
# Room the firmware keeps at the top of low RAM for its tables, above the initrd.
FIRMWARE_TABLE_ROOM = 0x200000


def find_linuxboot_rom(source: str) -> str:
    for path in LINUXBOOT_ROMS:
        if os.path.isfile(path):
            return path
    raise ConfigError(f"{source}: kernel with firmware: the option ROM linuxboot_dma.bin is missing "
                      f"({', '.join(LINUXBOOT_ROMS)}); install Debian's qemu-system-data package")


def linux_boot_items(fw_cfg, kernel: bytes, initrd: bytes | None, cmdline: str, mem_size: int,
                     source: str) -> None:
    """The FW_CFG_KERNEL_*/INITRD_*/CMDLINE_*/SETUP_* items linuxboot_dma.bin reads,
    with the bzImage header filled in as a boot loader does (QEMU's x86_load_linux)."""
    from ..devices import fw_cfg as f
    if len(kernel) < 0x400 or kernel[0x202:0x206] != b"HdrS":
        raise ConfigError(f"{source}: kernel: firmware boot takes a Linux bzImage (no 'HdrS' header)")
    protocol = struct.unpack_from("<H", kernel, 0x206)[0]
    if protocol < 0x202:
        raise ConfigError(f"{source}: kernel: boot protocol {protocol >> 8}.{protocol & 0xFF} is too old "
                          "(2.02 or later)")
    setup_sects = kernel[0x1F1] or 4
    setup_size = (setup_sects + 1) * 512
    if setup_size >= len(kernel):
        raise ConfigError(f"{source}: kernel: setup of {setup_size} bytes leaves no kernel")
    setup = bytearray(kernel[:setup_size])
    body = kernel[setup_size:]
    setup[0x210] = 0xB0                                   # type_of_loader: "other", as QEMU
    setup[0x211] |= 0x80                                  # CAN_USE_HEAP
    struct.pack_into("<H", setup, 0x224, CMDLINE_ADDR - REAL_MODE_ADDR - 0x200)   # heap_end_ptr
    struct.pack_into("<I", setup, 0x228, CMDLINE_ADDR)     # cmd_line_ptr
    cmd = cmdline.encode() + b"\0"
    if protocol >= 0x206:
        limit = struct.unpack_from("<I", kernel, 0x238)[0] + 1
        if len(cmd) > limit:
            raise ConfigError(f"{source}: cmdline is {len(cmd) - 1} bytes; this kernel takes {limit - 1}")
    if initrd:
        initrd_max = struct.unpack_from("<I", kernel, 0x22C)[0] if protocol >= 0x203 else 0x37FFFFFF
        low_end = min(mem_size, layout.PCI_HOLE_START)
        initrd_max = min(initrd_max, low_end - FIRMWARE_TABLE_ROOM - 1)
        initrd_addr = (initrd_max - len(initrd)) & ~0xFFF
        if initrd_addr < PROTECTED_MODE_ADDR + len(body):
            raise ConfigError(f"{source}: initrd of {len(initrd) >> 20} MiB does not fit below "
                              f"{initrd_max >> 20} MiB with the kernel; give more memory (-m)")
        struct.pack_into("<II", setup, 0x218, initrd_addr, len(initrd))
        fw_cfg.add_u32(f.FW_CFG_INITRD_ADDR, initrd_addr)
        fw_cfg.add_u32(f.FW_CFG_INITRD_SIZE, len(initrd))
        fw_cfg.add(f.FW_CFG_INITRD_DATA, initrd)
    fw_cfg.add_u32(f.FW_CFG_KERNEL_ADDR, PROTECTED_MODE_ADDR)
    fw_cfg.add_u32(f.FW_CFG_KERNEL_SIZE, len(body))
    fw_cfg.add(f.FW_CFG_KERNEL_DATA, body)
    fw_cfg.add_u32(f.FW_CFG_CMDLINE_ADDR, CMDLINE_ADDR)
    fw_cfg.add_u32(f.FW_CFG_CMDLINE_SIZE, len(cmd))
    fw_cfg.add(f.FW_CFG_CMDLINE_DATA, cmd)
    fw_cfg.add_u32(f.FW_CFG_SETUP_ADDR, REAL_MODE_ADDR)
    fw_cfg.add_u32(f.FW_CFG_SETUP_SIZE, len(setup))
    fw_cfg.add(f.FW_CFG_SETUP_DATA, bytes(setup))
