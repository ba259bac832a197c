"""QEMU's firmware configuration device (fw_cfg) on ports 0x510-0x51B.

How SeaBIOS and OVMF learn what QEMU would tell them: RAM size, CPUs, the e820
map, ACPI tables (through the table-loader script), SMBIOS, the boot order, the
kernel for a firmware-loaded -kernel boot. The interface is QEMU's
docs/specs/fw_cfg.rst:

- 0x510 (16-bit write): select an item; reading starts at its first byte.
- 0x511 (8-bit): the selected item's next byte; past the end reads 0.
- 0x514 (two big-endian 32-bit writes, high half first; the low half starts it):
  the guest-physical address of a ``FWCfgDmaAccess`` {be32 control, be32 length,
  be64 address}; control is SELECT (selector in bits 31-16) | READ | SKIP | WRITE,
  answered in place with 0 (done) or ERROR. Reading 0x514 gives "QEMU CFG".

The guest is hostile: every DMA descriptor and buffer is checked against guest
RAM (GuestMemory refuses anything outside), and a bad one answers ERROR with a
logged warning, never an exception out of the device. Items are read-only: the
guest's writes to items are refused (QEMU dropped data-port writes in 2.4).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from ..errors import GuestMemoryError
from .bus import PortSlot
from .saved_state import Restorable, StateCheck, checked

log = logging.getLogger(__name__)

FW_CFG_PORTS = PortSlot(base=0x510, length=12)      # selector, data, (pad), DMA address

SELECTOR_OFFSET = 0
DATA_OFFSET = 1
DMA_OFFSET = 4

# items (QEMU include/standard-headers/linux/qemu_fw_cfg.h)
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MACHINE_ID = 0x06
FW_CFG_KERNEL_ADDR = 0x07
FW_CFG_KERNEL_SIZE = 0x08
FW_CFG_KERNEL_CMDLINE = 0x09
FW_CFG_INITRD_ADDR = 0x0A
FW_CFG_INITRD_SIZE = 0x0B
FW_CFG_BOOT_DEVICE = 0x0C
FW_CFG_NUMA = 0x0D
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_KERNEL_ENTRY = 0x10
FW_CFG_KERNEL_DATA = 0x11
FW_CFG_INITRD_DATA = 0x12
FW_CFG_CMDLINE_ADDR = 0x13
FW_CFG_CMDLINE_SIZE = 0x14
FW_CFG_CMDLINE_DATA = 0x15
FW_CFG_SETUP_ADDR = 0x16
FW_CFG_SETUP_SIZE = 0x17
FW_CFG_SETUP_DATA = 0x18
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_FILE_SLOTS = 0x1000 - FW_CFG_FILE_FIRST
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_IRQ0_OVERRIDE = FW_CFG_ARCH_LOCAL + 0
FW_CFG_E820_TABLE = FW_CFG_ARCH_LOCAL + 3

FW_CFG_VERSION = 0x01
FW_CFG_VERSION_DMA = 0x02

DMA_CTL_ERROR = 0x01
DMA_CTL_READ = 0x02
DMA_CTL_SKIP = 0x04
DMA_CTL_SELECT = 0x08
DMA_CTL_WRITE = 0x10
DMA_SIGNATURE = 0x51454D5520434647          # "QEMU CFG", read big-endian from 0x514

FILE_NAME_SIZE = 56
_DIR_ENTRY = struct.Struct(">IHH56s")
_DMA_ACCESS = struct.Struct(">IIQ")

# A guest's DMA buffer is RAM; this only bounds one transfer's host-side copy.
MAX_DMA_CHUNK = 1 << 20


@dataclass(frozen=True)
class FwCfgState:
    """What the guest changed: the selected item, the read position in it, the DMA
    address half written so far (the items themselves are the machine's)."""

    selector: int
    offset: int
    dma_address_high: int

    def validate(self) -> None:
        check = StateCheck(self)
        check.integer("selector", self.selector, 0, 0xFFFF)
        check.integer("offset", self.offset, 0, 1 << 40)
        check.integer("dma_address_high", self.dma_address_high, 0, 0xFFFFFFFF)


class FwCfg(Restorable):
    """fw_cfg over port I/O with DMA. ``memory`` is the GuestMemory DMA goes to.

    The machine adds items before the guest runs: ``add(key, data)`` for the
    numbered ones, ``add_file(name, data)`` for named files (listed in
    FW_CFG_FILE_DIR, sorted by name as QEMU lists them)."""

    def __init__(self, memory, dma: bool = True) -> None:
        self.memory = memory
        self.dma_enabled = dma
        self._items: dict[int, bytes] = {}
        self._files: dict[str, bytes] = {}
        self._file_keys: dict[str, int] = {}
        self._file_names: list[str] = []
        self.selector = 0
        self.offset = 0
        self.dma_address_high = 0
        self.add(FW_CFG_SIGNATURE, b"QEMU")
        self.add(FW_CFG_ID, struct.pack("<I", FW_CFG_VERSION | (FW_CFG_VERSION_DMA if dma else 0)))
        self._rebuild_directory()

    # --- what the machine provides ----------------------------------------------------
    def add(self, key: int, data: bytes) -> None:
        if not 0 <= key <= 0xFFFF or FW_CFG_FILE_FIRST <= key < 0x1000:
            raise ValueError(f"fw_cfg key {key:#x} is not a numbered item")
        self._items[key] = bytes(data)

    def add_u16(self, key: int, value: int) -> None:
        self.add(key, struct.pack("<H", value))

    def add_u32(self, key: int, value: int) -> None:
        self.add(key, struct.pack("<I", value))

    def add_u64(self, key: int, value: int) -> None:
        self.add(key, struct.pack("<Q", value))

    def add_file(self, name: str, data: bytes) -> int:
        """Add (or replace) a named file; returns its selector."""
        raw = name.encode()
        if not raw or len(raw) >= FILE_NAME_SIZE:
            raise ValueError(f"fw_cfg file name {name!r} must be 1-55 bytes")
        if name not in self._files and len(self._files) >= FW_CFG_FILE_SLOTS:
            raise ValueError("fw_cfg: too many files")
        self._files[name] = bytes(data)
        self._rebuild_directory()
        return self._file_keys[name]

    def file(self, name: str) -> bytes | None:
        return self._files.get(name)

    def item(self, key: int) -> bytes:
        return self._items.get(key, b"")

    def _rebuild_directory(self) -> None:
        names = sorted(self._files)
        self._file_names = names
        self._file_keys = {name: FW_CFG_FILE_FIRST + i for i, name in enumerate(names)}
        directory = bytearray(struct.pack(">I", len(names)))
        for name in names:
            directory += _DIR_ENTRY.pack(len(self._files[name]), self._file_keys[name], 0, name.encode())
        self._items[FW_CFG_FILE_DIR] = bytes(directory)

    def _data(self, key: int) -> bytes:
        if FW_CFG_FILE_FIRST <= key < FW_CFG_FILE_FIRST + len(self._file_keys):
            return self._files[self._file_names[key - FW_CFG_FILE_FIRST]]
        return self._items.get(key, b"")

    # --- the guest's side ---------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == SELECTOR_OFFSET:
            return 0xFFFF if size >= 2 else 0xFF
        if offset == DATA_OFFSET:
            # Wider reads take successive bytes, the first in the low byte (QEMU's
            # data port is byte-wide; this is what repeated byte reads give).
            data = self._data(self.selector)
            chunk = data[self.offset:self.offset + size]
            self.offset = min(self.offset + size, max(len(data), self.offset))
            return int.from_bytes(chunk.ljust(size, b"\0"), "little")
        if DMA_OFFSET <= offset < DMA_OFFSET + 8 and self.dma_enabled:
            sig = DMA_SIGNATURE.to_bytes(8, "big")
            start = offset - DMA_OFFSET
            return int.from_bytes(sig[start:start + size].ljust(size, b"\xff"), "little")
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == SELECTOR_OFFSET and size >= 2:
            self.select(value & 0xFFFF)
        elif offset == DATA_OFFSET:
            log.debug("fw_cfg: data port write ignored (items are read-only)")
        elif offset == DMA_OFFSET and size == 4 and self.dma_enabled:
            self.dma_address_high = int.from_bytes(value.to_bytes(4, "little"), "big")
        elif offset == DMA_OFFSET + 4 and size == 4 and self.dma_enabled:
            low = int.from_bytes(value.to_bytes(4, "little"), "big")
            address = (self.dma_address_high << 32) | low
            self.dma_address_high = 0
            self.dma(address)
        elif offset == DMA_OFFSET and size == 8 and self.dma_enabled:
            self.dma_address_high = 0
            self.dma(int.from_bytes(value.to_bytes(8, "little"), "big"))

    def select(self, key: int) -> None:
        self.selector = key
        self.offset = 0

    def dma(self, address: int) -> None:
        """Run the FWCfgDmaAccess at ``address``; its control word gets the answer."""
        try:
            control, length, buffer = _DMA_ACCESS.unpack(self.memory.read(address, _DMA_ACCESS.size))
        except GuestMemoryError as e:
            log.warning("fw_cfg: DMA descriptor at %#x: %s", address, e)
            return
        ok = self._transfer(control, length, buffer)
        try:
            self.memory.writable_view(address, 4)[:] = (0 if ok else DMA_CTL_ERROR).to_bytes(4, "big")
        except GuestMemoryError as e:
            log.warning("fw_cfg: DMA descriptor at %#x: status not written: %s", address, e)

    def _transfer(self, control: int, length: int, buffer: int) -> bool:
        if control & DMA_CTL_SELECT:
            self.select(control >> 16)
        if control & DMA_CTL_WRITE:
            log.warning("fw_cfg: DMA write to item %#x refused (items are read-only)", self.selector)
            return False
        if not control & (DMA_CTL_READ | DMA_CTL_SKIP):
            return True
        data = self._data(self.selector)
        if control & DMA_CTL_READ:
            # Past the item's end a read gives zeros, as QEMU does.
            chunk = data[self.offset:self.offset + length]
            try:
                view = self.memory.writable_view(buffer, length)
            except GuestMemoryError as e:
                log.warning("fw_cfg: DMA read of %d bytes to %#x: %s", length, buffer, e)
                return False
            view[:len(chunk)] = chunk
            # zeros past the end in bounded pieces: the guest chooses the length
            for pos in range(len(chunk), length, MAX_DMA_CHUNK):
                end = min(pos + MAX_DMA_CHUNK, length)
                view[pos:end] = bytes(end - pos)
            self.memory.notify_dma_write(buffer, length)
        self.offset = min(self.offset + length, max(len(data), self.offset))
        return True

    # --- state -----------------------------------------------------------------------------
    def state(self) -> FwCfgState:
        return FwCfgState(selector=self.selector, offset=self.offset, dma_address_high=self.dma_address_high)

    def restore(self, state: FwCfgState) -> None:
        state = checked(state, FwCfgState)
        self.selector, self.offset, self.dma_address_high = state.selector, state.offset, state.dma_address_high

    def reset(self) -> None:
        self.selector = 0
        self.offset = 0
        self.dma_address_high = 0


# --- the table-loader script (QEMU hw/acpi/bios-linker-loader.c) -----------------------------
LOADER_ALLOCATE = 1
LOADER_ADD_POINTER = 2
LOADER_ADD_CHECKSUM = 3
LOADER_ZONE_HIGH = 1
LOADER_ZONE_FSEG = 2
LOADER_ENTRY_SIZE = 128


class TableLoader:
    """Builds ``etc/table-loader``: the commands by which the firmware allocates the
    blobs, patches the pointers between them and fixes their checksums."""

    def __init__(self) -> None:
        self.commands = bytearray()

    @staticmethod
    def _name(name: str) -> bytes:
        raw = name.encode()
        if len(raw) >= FILE_NAME_SIZE:
            raise ValueError(f"table-loader file name {name!r} is too long")
        return raw.ljust(FILE_NAME_SIZE, b"\0")

    def _entry(self, body: bytes) -> None:
        self.commands += body.ljust(LOADER_ENTRY_SIZE, b"\0")

    def allocate(self, name: str, align: int, fseg: bool = False) -> None:
        self._entry(struct.pack("<I", LOADER_ALLOCATE) + self._name(name)
                    + struct.pack("<IB", align, LOADER_ZONE_FSEG if fseg else LOADER_ZONE_HIGH))

    def add_pointer(self, dest: str, src: str, offset: int, size: int) -> None:
        self._entry(struct.pack("<I", LOADER_ADD_POINTER) + self._name(dest) + self._name(src)
                    + struct.pack("<IB", offset, size))

    def add_checksum(self, name: str, offset: int, start: int, length: int) -> None:
        self._entry(struct.pack("<I", LOADER_ADD_CHECKSUM) + self._name(name)
                    + struct.pack("<III", offset, start, length))

    def blob(self) -> bytes:
        return bytes(self.commands)


def parse_table_loader(blob: bytes) -> list[tuple]:
    """The commands of a table-loader blob: ("allocate", file, align, zone),
    ("add_pointer", dest, src, offset, size), ("add_checksum", file, offset, start, length)."""
    out: list[tuple] = []
    for pos in range(0, len(blob) - len(blob) % LOADER_ENTRY_SIZE, LOADER_ENTRY_SIZE):
        entry = blob[pos:pos + LOADER_ENTRY_SIZE]
        command = struct.unpack_from("<I", entry)[0]

        def name(at: int) -> str:
            return entry[at:at + FILE_NAME_SIZE].split(b"\0", 1)[0].decode()
        if command == LOADER_ALLOCATE:
            align, zone = struct.unpack_from("<IB", entry, 4 + FILE_NAME_SIZE)
            out.append(("allocate", name(4), align, zone))
        elif command == LOADER_ADD_POINTER:
            offset, size = struct.unpack_from("<IB", entry, 4 + 2 * FILE_NAME_SIZE)
            out.append(("add_pointer", name(4), name(4 + FILE_NAME_SIZE), offset, size))
        elif command == LOADER_ADD_CHECKSUM:
            offset, start, length = struct.unpack_from("<III", entry, 4 + FILE_NAME_SIZE)
            out.append(("add_checksum", name(4), offset, start, length))
        elif command:
            out.append(("unknown", command))
    return out
