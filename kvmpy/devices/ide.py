"""IDE: two ATA channels of up to two devices each, ATA disks and ATAPI CD-ROMs,
with the bus-master DMA engine of the PIIX (SFF-8038i).

The controller is a pure state machine over the registers a driver sees:

  * per channel, the command block (8 ports: data, error/features, sector count,
    LBA low/mid/high, device, status/command) and the control block (one port:
    alternate status / device control with nIEN and SRST);
  * per channel, 8 bytes of bus-master registers (command, status, PRD table
    address) in the PCI function's BAR4.

Its outputs are injected: ``irqs`` (one level callback per channel: IRQ 14 and 15
in compatibility mode), guest memory for DMA, the block drivers of the devices
(kvmpy.block: raw or qcow2), and where host I/O errors go (werror/rerror and
BLOCK_IO_ERROR, as virtio-blk). Commands follow ATA/ATAPI-8 (ACS); a command's
data moves by PIO through the data port, one DRQ block at a time, or by DMA
along the guest's PRD table in one go when the driver starts the engine. I/O
happens on the thread that touches the register which asks for it (a vCPU's, or
the event loop's for a retry after a "stop"); one lock serialises them.

Everything the guest writes is checked: an address or count past the end of the
disk is IDNF, an unknown command ABRT, a PRD entry outside guest RAM or a PRD
table too short for the command sets the engine's error bit with a logged device
error, a table that never sets end-of-table is read no further than 64 KiB (the
most the hardware's table can hold), and nothing here raises on guest input.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from ..errors import GuestMemoryError, ImageError
from .atapi import ASC_UNRECOVERED_READ_ERROR, MEDIUM_ERROR, AtapiCdrom, AtapiState
from .bus import PortSlot
from .saved_state import Restorable, StateCheck, checked

if TYPE_CHECKING:  # pragma: no cover - protocols only
    from ..memory import GuestMemory
    from .context import BlockErrors

log = logging.getLogger(__name__)

SECTOR = 512

# Where compatibility mode puts the channels (the PIIX IDE function's prog-if 0x80).
PRIMARY_COMMAND = PortSlot(base=0x1F0, length=8, irq=14)
PRIMARY_CONTROL = PortSlot(base=0x3F6, length=1)
SECONDARY_COMMAND = PortSlot(base=0x170, length=8, irq=15)
SECONDARY_CONTROL = PortSlot(base=0x376, length=1)
CHANNEL_PORTS = ((PRIMARY_COMMAND, PRIMARY_CONTROL), (SECONDARY_COMMAND, SECONDARY_CONTROL))
LEGACY_SLOTS = (PRIMARY_COMMAND, PRIMARY_CONTROL, SECONDARY_COMMAND, SECONDARY_CONTROL)
BMDMA_CHANNEL_SIZE = 8
BMDMA_SIZE = 16

# command block registers (offsets from the channel's command port)
REG_DATA = 0
REG_ERROR = REG_FEATURE = 1
REG_NSECTOR = 2
REG_LBA_LOW = 3
REG_LBA_MID = 4
REG_LBA_HIGH = 5
REG_DEVICE = 6
REG_STATUS = REG_COMMAND = 7

# status register
BSY = 0x80
DRDY = 0x40
DF = 0x20
DSC = 0x10
DRQ = 0x08
ERR = 0x01
# error register
ABRT = 0x04
IDNF = 0x10
UNC = 0x40
# device register
DEV_LBA = 0x40
DEV_SELECT = 0x10
# device control register
CTL_NIEN = 0x02
CTL_SRST = 0x04
CTL_HOB = 0x80
# bus-master command and status
BM_CMD_START = 0x01
BM_CMD_TO_MEMORY = 0x08
BM_STATUS_ACTIVE = 0x01
BM_STATUS_ERROR = 0x02
BM_STATUS_INTERRUPT = 0x04
BM_STATUS_DRIVE_DMA = 0x60
PRD_EOT = 0x8000
# A PRD table lies in one 64 KiB region on the PIIX: 8192 entries at most.
MAX_PRD_ENTRIES = 0x10000 // 8
IOV_BATCH = 1024

# ATAPI interrupt reason (in the sector count register)
IREASON_COD = 0x01
IREASON_IO = 0x02
ATAPI_PACKET_BYTES = 12

MAX_MULT_SECTORS = 16
LBA28_LIMIT = 1 << 28
LBA48_LIMIT = 1 << 48

# commands
CMD_DEVICE_RESET = 0x08
CMD_READ_SECTORS = (0x20, 0x21)
CMD_READ_SECTORS_EXT = 0x24
CMD_READ_DMA_EXT = 0x25
CMD_READ_MULTIPLE_EXT = 0x29
CMD_WRITE_SECTORS = (0x30, 0x31)
CMD_WRITE_SECTORS_EXT = 0x34
CMD_WRITE_DMA_EXT = 0x35
CMD_WRITE_MULTIPLE_EXT = 0x39
CMD_READ_VERIFY = (0x40, 0x41)
CMD_READ_VERIFY_EXT = 0x42
CMD_SEEK = 0x70
CMD_EXECUTE_DIAGNOSTIC = 0x90
CMD_INITIALIZE_PARAMETERS = 0x91
CMD_PACKET = 0xA0
CMD_IDENTIFY_PACKET = 0xA1
CMD_READ_MULTIPLE = 0xC4
CMD_WRITE_MULTIPLE = 0xC5
CMD_SET_MULTIPLE = 0xC6
CMD_READ_DMA = (0xC8, 0xC9)
CMD_WRITE_DMA = (0xCA, 0xCB)
CMD_POWER = (0xE0, 0xE1, 0xE2, 0xE3, 0xE6, 0x94, 0x95, 0x96, 0x97, 0x99)  # standby/idle/sleep
CMD_CHECK_POWER_MODE = (0xE5, 0x98)
CMD_FLUSH_CACHE = 0xE7
CMD_IDENTIFY = 0xEC
CMD_FLUSH_CACHE_EXT = 0xEA
CMD_SET_FEATURES = 0xEF

# transfer kinds (what the data port is doing)
XFER_NONE = 0
XFER_PIO_IN = 1         # ATA read, or a buffer the device made (IDENTIFY)
XFER_PIO_OUT = 2        # ATA write
XFER_PACKET = 3         # the 12-byte ATAPI command
XFER_ATAPI_IN = 4       # an ATAPI reply, chunk by chunk
# DMA jobs
DMA_NONE = 0
DMA_FROM_DISK = 1       # the device reads, the engine writes guest memory
DMA_TO_DISK = 2

ERROR_POLICIES = ("enospc", "stop", "report", "ignore")


def ata_string(text: str, length: int) -> bytes:
    """ATA's string fields: space padded, two characters a word, first in the high byte."""
    raw = text.encode("ascii", "replace")[:length].ljust(length, b" ")
    return bytes(raw[i ^ 1] for i in range(length))


def default_geometry(sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for CHS addressing: 16 heads of 63 sectors,
    as BIOSes and QEMU assume for a disk without a partition table that says otherwise."""
    return max(1, min(sectors // (16 * 63), 16383)), 16, 63


@dataclass(frozen=True)
class IdeDriveState:
    """One IDE drive's saved registers and transfer state."""

    status: int
    error: int
    mult_sectors: int
    write_cache: bool
    pio_mode: int
    dma_mode: int           # 0: none selected; 0x10|n single-word n; 0x20|n multiword n; 0x40|n UDMA n
    xfer: int
    buffer: bytes
    pos: int
    lba: int                # the next sector of an ATA command (PIO or DMA)
    remaining: int          # sectors still to move
    block: int              # sectors per DRQ block
    lba48: bool
    atapi_data: bytes       # reply bytes not yet sent (ATAPI)
    atapi_offset: int       # medium offset of the next byte to send (ATAPI read)
    atapi_remaining: int    # bytes still to send (ATAPI)
    atapi_limit: int        # the host's byte count limit per DRQ
    dma: int
    atapi: AtapiState | None

    def validate(self) -> None:
        check = StateCheck(self)
        check.integer("status", self.status, 0, 0xFF)
        check.integer("error", self.error, 0, 0xFF)
        check.integer("mult_sectors", self.mult_sectors, 0, MAX_MULT_SECTORS)
        check.flag("write_cache", self.write_cache)
        check.integer("pio_mode", self.pio_mode, 0, 4)
        check.integer("dma_mode", self.dma_mode, 0, 0x47)
        check.integer("xfer", self.xfer, XFER_NONE, XFER_ATAPI_IN)
        check.data("buffer", self.buffer, max_length=max(MAX_MULT_SECTORS * SECTOR, 0xFFFE))
        check.integer("pos", self.pos, 0, len(self.buffer))
        check.integer("lba", self.lba, 0, LBA48_LIMIT)
        check.integer("remaining", self.remaining, 0, 0x10000)
        check.integer("block", self.block, 0, MAX_MULT_SECTORS)
        check.flag("lba48", self.lba48)
        check.data("atapi_data", self.atapi_data, max_length=0x10000)
        check.integer("atapi_offset", self.atapi_offset, 0, 1 << 63)
        check.integer("atapi_remaining", self.atapi_remaining, 0, 1 << 48)
        check.integer("atapi_limit", self.atapi_limit, 0, 0xFFFE)
        check.integer("dma", self.dma, DMA_NONE, DMA_TO_DISK)
        if self.atapi is not None:
            checked(self.atapi, AtapiState)


@dataclass(frozen=True)
class IdeChannelState:
    """One IDE channel's saved taskfile, selection, bus-master registers and drives."""

    taskfile: tuple[int, ...]   # feature, nsector, lba low, mid, high
    hob: tuple[int, ...]        # the values written before those (LBA48's high bytes)
    select: int
    control: int
    irq_pending: bool
    bm_command: int
    bm_status: int
    bm_prd: int
    drives: tuple[IdeDriveState | None, IdeDriveState | None]

    def validate(self) -> None:
        check = StateCheck(self)
        check.integers("taskfile", self.taskfile, 5, 0, 0xFF)
        check.integers("hob", self.hob, 5, 0, 0xFF)
        check.integer("select", self.select, 0, 0xFF)
        check.integer("control", self.control, 0, 0xFF)
        check.flag("irq_pending", self.irq_pending)
        check.bits("bm_command", self.bm_command, BM_CMD_START | BM_CMD_TO_MEMORY)
        check.bits("bm_status", self.bm_status, 0x67)
        check.bits("bm_prd", self.bm_prd, 0xFFFFFFFC)
        if type(self.drives) is not tuple or len(self.drives) != 2:
            raise check.fail("drives", "expected a tuple of two")
        for drive in self.drives:
            if drive is not None:
                checked(drive, IdeDriveState)


@dataclass(frozen=True)
class IdeControllerState:
    """The IDE controller's saved state: its two channels."""

    channels: tuple[IdeChannelState, IdeChannelState]

    def validate(self) -> None:
        check = StateCheck(self)
        if type(self.channels) is not tuple or len(self.channels) != 2:
            raise check.fail("channels", "expected a tuple of two")
        for channel in self.channels:
            checked(channel, IdeChannelState)


class IdeDrive:
    """One ATA disk or ATAPI CD-ROM on a channel.

    backend: an open BlockDriver (a CD-ROM may have none: no disc); the drive
      does not close it. ``media`` is "disk" or "cdrom"; a CD-ROM is read-only.
    werror, rerror: QEMU's policies for host errors on writes/flushes and reads.
    device, node_name: how BLOCK_IO_ERROR and query-block name it ("ide0-hd0").
    """

    def __init__(self, backend, media: str = "disk", read_only: bool = False, serial: str = "",
                 werror: str = "enospc", rerror: str = "report", device: str = "ide", node_name: str = "") -> None:
        if media not in ("disk", "cdrom"):
            raise ValueError(f"{device}: media {media!r}")
        if werror not in ERROR_POLICIES or rerror not in ERROR_POLICIES[1:]:
            raise ValueError(f"{device}: werror={werror!r} rerror={rerror!r}")
        if media == "disk" and backend is None:
            raise ValueError(f"{device}: a disk needs an image")
        self.media = media
        self.backend = backend
        self.read_only = bool(read_only or media == "cdrom" or (backend is not None and backend.read_only))
        self.serial = serial or "QM00001"
        self.werror, self.rerror = werror, rerror
        self.device_name, self.node_name = device, node_name
        self.atapi = AtapiCdrom(backend, name=device) if media == "cdrom" else None
        self.io_status = "ok"
        if media == "disk":
            self.sectors = backend.size // SECTOR
            if backend.size % SECTOR:
                log.warning("%s: image size %d is not a multiple of 512; the tail is not visible",
                            device, backend.size)
            self.geometry = default_geometry(self.sectors)
        self.power_on()

    @property
    def is_atapi(self) -> bool:
        return self.atapi is not None

    def power_on(self) -> None:
        self.mult_sectors = MAX_MULT_SECTORS
        self.write_cache = True
        self.pio_mode = 4
        self.dma_mode = 0
        self.reset_device()
        self.status = DRDY | DSC    # a packet device too, at power-on (as QEMU's)

    def reset_device(self) -> None:
        """What SRST and DEVICE RESET leave: no command, diagnostics passed; a packet
        device is not ready (DRDY clear) until its driver has looked at it."""
        self.status = 0 if self.is_atapi else DRDY | DSC
        self.error = 0x01
        self.cancel()
        if self.atapi is not None:
            self.atapi.reset()

    def cancel(self) -> None:
        self.xfer = XFER_NONE
        self.buffer = bytearray()
        self.pos = 0
        self.lba = self.remaining = self.block = 0
        self.lba48 = False
        self.atapi_data = b""
        self.atapi_offset = self.atapi_remaining = self.atapi_limit = 0
        self.dma = DMA_NONE

    def signature(self) -> tuple[int, int, int, int]:
        """(sector count, LBA low, mid, high) after a reset: ATAPI's 0x14/0xEB tells it apart."""
        return (1, 1, 0x14, 0xEB) if self.is_atapi else (1, 1, 0, 0)

    # saved state -------------------------------------------------------------------

    def state(self) -> IdeDriveState:
        return IdeDriveState(
            status=self.status, error=self.error, mult_sectors=self.mult_sectors, write_cache=self.write_cache,
            pio_mode=self.pio_mode, dma_mode=self.dma_mode, xfer=self.xfer, buffer=bytes(self.buffer),
            pos=self.pos, lba=self.lba, remaining=self.remaining, block=self.block, lba48=self.lba48,
            atapi_data=self.atapi_data, atapi_offset=self.atapi_offset, atapi_remaining=self.atapi_remaining,
            atapi_limit=self.atapi_limit, dma=self.dma,
            atapi=self.atapi.state() if self.atapi is not None else None)

    def check_state(self, state: IdeDriveState, where: str) -> None:
        if (state.atapi is None) != (self.atapi is None):
            raise StateCheck(state).fail("atapi", f"{where} is a {self.media}, the state is not")
        if self.atapi is None and state.lba + state.remaining > self.sectors:
            raise StateCheck(state).fail("lba", f"{state.lba}+{state.remaining} is past the disk's end")
        if state.xfer in (XFER_PIO_IN, XFER_PIO_OUT) and state.remaining and not state.block:
            raise StateCheck(state).fail("block", "a transfer of sectors in blocks of none")
        if state.xfer == XFER_PIO_OUT and (len(state.buffer) % SECTOR or len(state.buffer) > state.block * SECTOR
                                           or len(state.buffer) > state.remaining * SECTOR):
            raise StateCheck(state).fail("buffer", f"{len(state.buffer)} bytes is not the block being written")
        if state.xfer == XFER_PACKET and len(state.buffer) != ATAPI_PACKET_BYTES:
            raise StateCheck(state).fail("buffer", f"a packet of {len(state.buffer)} bytes")

    def restore(self, state: IdeDriveState) -> None:
        for name in ("status", "error", "mult_sectors", "write_cache", "pio_mode", "dma_mode", "xfer", "pos",
                     "lba", "remaining", "block", "lba48", "atapi_data", "atapi_offset", "atapi_remaining",
                     "atapi_limit", "dma"):
            setattr(self, name, getattr(state, name))
        self.buffer = bytearray(state.buffer)
        if self.atapi is not None:
            self.atapi.restore(state.atapi)


class _Channel:
    def __init__(self, drives: Sequence[IdeDrive | None], irq: Callable[[bool], None]) -> None:
        self.drives = list(drives)
        self.irq = irq
        self.line = False
        self.power_on()

    def power_on(self) -> None:
        self.taskfile = [0] * 5
        self.hob = [0] * 5
        self.select = 0xA0
        self.control = 0
        self.irq_pending = False
        self.bm_command = 0
        self.bm_status = 0
        self.bm_prd = 0
        for drive in self.drives:
            if drive is not None:
                drive.power_on()
        self.set_signature()

    @property
    def unit(self) -> int:
        return 1 if self.select & DEV_SELECT else 0

    @property
    def drive(self) -> IdeDrive | None:
        return self.drives[self.unit]

    @property
    def empty(self) -> bool:
        return self.drives[0] is None and self.drives[1] is None

    def set_signature(self) -> None:
        drive = self.drives[0] or self.drives[1]
        if drive is not None:
            self.taskfile[1:5] = drive.signature()
        self.select = 0xA0


class IdeController(Restorable):
    """Both channels of a PIIX IDE function (or any SFF-8038i controller).

    drives: {position 0-3: IdeDrive} with QEMU's numbering: 0 primary master,
      1 primary slave, 2 secondary master, 3 secondary slave.
    irqs: (primary, secondary) level callbacks.
    memory: guest RAM, for DMA (GuestMemory).
    errors: where host I/O errors are reported (kvmpy.devices.context.BlockErrors);
      without one, "stop" acts as "report".
    bus_master: whether the PCI function may master the bus (its command register).
    """

    def __init__(self, memory: GuestMemory, irqs: tuple[Callable[[bool], None], Callable[[bool], None]],
                 drives: dict[int, IdeDrive] | None = None, errors: BlockErrors | None = None,
                 bus_master: Callable[[], bool] = lambda: True, name: str = "ide") -> None:
        drives = dict(drives or {})
        if not set(drives) <= {0, 1, 2, 3}:
            raise ValueError(f"{name}: IDE positions are 0-3, got {sorted(drives)}")
        self.name = name
        self.memory = memory
        self.errors = errors
        self.bus_master = bus_master
        self.channels = [_Channel((drives.get(2 * c), drives.get(2 * c + 1)), irqs[c]) for c in (0, 1)]
        self.lock = threading.RLock()
        # the request a "stop" error keeps: (channel, unit) -> how to run it again
        self._kept: dict[tuple[int, int], Callable[[], None]] = {}

    def drive(self, position: int) -> IdeDrive | None:
        return self.channels[position // 2].drives[position % 2]

    # removable media ---------------------------------------------------------------

    def change_medium(self, position: int, backend) -> object | None:
        """Put ``backend`` (None: take the disc out) into the CD-ROM at ``position``;
        returns the medium that was in it, for the caller to close. A command in
        flight on the drive is abandoned first (it would read from the old disc), and
        the guest learns of the change as a real drive tells it: a unit attention on
        its next command, a media event for GET EVENT STATUS NOTIFICATION."""
        with self.lock:
            drive = self.drive(position)
            if drive is None or drive.atapi is None:
                raise ValueError(f"{self.name}: position {position} is not a CD-ROM")
            c, unit = divmod(position, 2)
            if drive.xfer != XFER_NONE or drive.dma != DMA_NONE or (c, unit) in self._kept:
                self._kept.pop((c, unit), None)
                drive.atapi.fail(0x0B, 0)       # ABORTED COMMAND
                self._atapi_check_condition(self.channels[c], drive)
            old, drive.backend = drive.backend, backend
            drive.atapi.change_medium(backend)
            return old

    # life cycle --------------------------------------------------------------------

    def reset(self) -> None:
        with self.lock:
            # a system reset drops the requests a "stop" kept, and with them the error
            self._kept.clear()
            for ch in self.channels:
                ch.power_on()
                for drive in ch.drives:
                    if drive is not None:
                        drive.io_status = "ok"
                self._update_line(ch)

    def state(self) -> IdeControllerState:
        with self.lock:
            return IdeControllerState(tuple(IdeChannelState(
                taskfile=tuple(ch.taskfile), hob=tuple(ch.hob), select=ch.select, control=ch.control,
                irq_pending=ch.irq_pending, bm_command=ch.bm_command, bm_status=ch.bm_status, bm_prd=ch.bm_prd,
                drives=tuple(d.state() if d is not None else None for d in ch.drives))
                for ch in self.channels))

    def restore(self, state: IdeControllerState) -> None:
        state = checked(state, IdeControllerState)
        for c, (ch, saved) in enumerate(zip(self.channels, state.channels)):
            for u, (drive, ds) in enumerate(zip(ch.drives, saved.drives)):
                where = f"channel {c} unit {u}"
                if (drive is None) != (ds is None):
                    raise StateCheck(saved).fail(f"drives[{u}]", f"{where}: the state and this controller "
                                                 "disagree on whether a device is there")
                if drive is not None:
                    drive.check_state(ds, where)
        with self.lock:
            self._kept.clear()
            for ch, saved in zip(self.channels, state.channels):
                ch.taskfile, ch.hob = list(saved.taskfile), list(saved.hob)
                ch.select, ch.control, ch.irq_pending = saved.select, saved.control, saved.irq_pending
                ch.bm_command, ch.bm_status, ch.bm_prd = saved.bm_command, saved.bm_status, saved.bm_prd
                for drive, ds in zip(ch.drives, saved.drives):
                    if drive is not None:
                        drive.restore(ds)
                self._update_line(ch)

    # interrupts --------------------------------------------------------------------

    def _raise(self, ch: _Channel) -> None:
        ch.irq_pending = True
        # The PIIX latches the drive's INTRQ pin in the engine's status, DMA or not;
        # nIEN keeps the pin (and so the bit) low, as on QEMU's.
        if not ch.control & CTL_NIEN:
            ch.bm_status |= BM_STATUS_INTERRUPT
        self._update_line(ch)

    def _lower(self, ch: _Channel) -> None:
        ch.irq_pending = False
        self._update_line(ch)

    def _update_line(self, ch: _Channel) -> None:
        level = ch.irq_pending and not ch.control & CTL_NIEN
        if level != ch.line:
            ch.line = level
            ch.irq(level)

    # the command block -------------------------------------------------------------

    def read_command(self, c: int, offset: int, size: int) -> int:
        with self.lock:
            ch = self.channels[c]
            if offset == REG_DATA:
                return self._read_data(ch, size)
            if ch.empty or offset > REG_STATUS:
                return 0
            drive = ch.drive
            if offset == REG_STATUS:
                if drive is None:
                    return 0
                self._lower(ch)
                return drive.status
            if offset == REG_DEVICE:
                return ch.select
            if offset == REG_ERROR and (drive is None or not ch.control & CTL_HOB):
                # an absent device's error (and status) read 0; the task file it shares
                # with the present one reads back what was written, as on QEMU's
                return drive.error if drive is not None else 0
            regs = ch.hob if ch.control & CTL_HOB else ch.taskfile
            return regs[offset - 1]

    def write_command(self, c: int, offset: int, size: int, value: int) -> None:
        with self.lock:
            ch = self.channels[c]
            if offset == REG_DATA:
                self._write_data(ch, size, value)
                return
            value &= 0xFF
            if REG_FEATURE <= offset <= REG_LBA_HIGH:
                ch.control &= ~CTL_HOB      # a write clears HOB (ATA-8 ACS 6.2.5)
                ch.hob[offset - 1] = ch.taskfile[offset - 1]
                ch.taskfile[offset - 1] = value
            elif offset == REG_DEVICE:
                ch.control &= ~CTL_HOB
                ch.select = value | 0xA0
            elif offset == REG_COMMAND:
                drive = ch.drive
                if drive is None:
                    return              # nobody there to take it
                if drive.status & (BSY | DRQ) and not (drive.is_atapi and value == CMD_DEVICE_RESET):
                    log.debug("%s: command %#x while busy ignored", self.name, value)
                    return
                self._lower(ch)
                self._execute(c, ch, drive, value)

    def read_control(self, c: int, offset: int, size: int) -> int:
        with self.lock:
            ch = self.channels[c]
            if ch.empty or ch.drive is None:
                return 0
            return ch.drive.status        # alternate status: no interrupt acknowledge

    def write_control(self, c: int, offset: int, size: int, value: int) -> None:
        with self.lock:
            ch = self.channels[c]
            old = ch.control
            ch.control = value & (CTL_HOB | CTL_SRST | CTL_NIEN)
            if ch.control & CTL_SRST and not old & CTL_SRST:
                for unit, drive in enumerate(ch.drives):
                    if drive is not None:
                        self._kept.pop((c, unit), None)
                        drive.cancel()
                        drive.status = BSY | DSC
            elif old & CTL_SRST and not ch.control & CTL_SRST:
                for drive in ch.drives:
                    if drive is not None:
                        drive.reset_device()
                ch.set_signature()
                ch.bm_status &= ~BM_STATUS_ACTIVE
            self._update_line(ch)

    # the data port -----------------------------------------------------------------

    def _read_data(self, ch: _Channel, size: int) -> int:
        drive = ch.drive
        if drive is None or not drive.status & DRQ or drive.xfer not in (XFER_PIO_IN, XFER_ATAPI_IN):
            return 0
        chunk = bytes(drive.buffer[drive.pos:drive.pos + size])
        drive.pos += len(chunk)
        if drive.pos >= len(drive.buffer):
            self._pio_block_done(self.channels.index(ch), ch, drive)
        return int.from_bytes(chunk, "little")

    def _write_data(self, ch: _Channel, size: int, value: int) -> None:
        drive = ch.drive
        if drive is None or not drive.status & DRQ or drive.xfer not in (XFER_PIO_OUT, XFER_PACKET):
            return
        room = len(drive.buffer) - drive.pos
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")[:room]
        drive.buffer[drive.pos:drive.pos + len(data)] = data
        drive.pos += len(data)
        if drive.pos >= len(drive.buffer):
            self._pio_block_done(self.channels.index(ch), ch, drive)

    def _pio_block_done(self, c: int, ch: _Channel, drive: IdeDrive) -> None:
        if drive.xfer == XFER_PIO_IN:
            if drive.remaining:
                self._ata_read_block(c, ch, drive)
            else:
                drive.xfer = XFER_NONE
                drive.status = DRDY | DSC
        elif drive.xfer == XFER_PIO_OUT:
            self._ata_write_block(c, ch, drive)
        elif drive.xfer == XFER_PACKET:
            self._atapi_command(c, ch, drive)
        elif drive.xfer == XFER_ATAPI_IN:
            self._atapi_next_chunk(c, ch, drive)

    # ATA commands ------------------------------------------------------------------

    def _complete(self, ch: _Channel, drive: IdeDrive, status: int = DRDY | DSC) -> None:
        drive.xfer = XFER_NONE
        drive.dma = DMA_NONE
        drive.status = status
        self._raise(ch)

    def _abort(self, ch: _Channel, drive: IdeDrive, error: int = ABRT) -> None:
        drive.cancel()
        drive.error = error
        self._complete(ch, drive, DRDY | DSC | ERR)

    def _execute(self, c: int, ch: _Channel, drive: IdeDrive, cmd: int) -> None:
        drive.error = 0
        if drive.is_atapi:
            self._execute_atapi(c, ch, drive, cmd)
            return
        if cmd == CMD_IDENTIFY:
            self._start_pio_in(ch, drive, self._identify(drive))
        elif cmd in CMD_READ_SECTORS or cmd in (CMD_READ_SECTORS_EXT, CMD_READ_MULTIPLE, CMD_READ_MULTIPLE_EXT):
            multiple = cmd in (CMD_READ_MULTIPLE, CMD_READ_MULTIPLE_EXT)
            if self._setup_rw(ch, drive, cmd in (CMD_READ_SECTORS_EXT, CMD_READ_MULTIPLE_EXT), multiple):
                drive.xfer = XFER_PIO_IN
                self._ata_read_block(c, ch, drive)
        elif cmd in CMD_WRITE_SECTORS or cmd in (CMD_WRITE_SECTORS_EXT, CMD_WRITE_MULTIPLE, CMD_WRITE_MULTIPLE_EXT):
            multiple = cmd in (CMD_WRITE_MULTIPLE, CMD_WRITE_MULTIPLE_EXT)
            if self._refuse_write(ch, drive):
                return
            if self._setup_rw(ch, drive, cmd in (CMD_WRITE_SECTORS_EXT, CMD_WRITE_MULTIPLE_EXT), multiple):
                drive.xfer = XFER_PIO_OUT
                drive.buffer = bytearray(min(drive.block, drive.remaining) * SECTOR)
                drive.pos = 0
                drive.status = DRDY | DSC | DRQ   # the first block is asked for without an interrupt
        elif cmd in CMD_READ_DMA or cmd in CMD_WRITE_DMA or cmd in (CMD_READ_DMA_EXT, CMD_WRITE_DMA_EXT):
            to_disk = cmd in CMD_WRITE_DMA or cmd == CMD_WRITE_DMA_EXT
            if to_disk and self._refuse_write(ch, drive):
                return
            if self._setup_rw(ch, drive, cmd in (CMD_READ_DMA_EXT, CMD_WRITE_DMA_EXT), False):
                drive.dma = DMA_TO_DISK if to_disk else DMA_FROM_DISK
                drive.status = DRDY | DSC | DRQ
                self._maybe_start_dma(c, ch)
        elif cmd in CMD_READ_VERIFY or cmd == CMD_READ_VERIFY_EXT:
            if self._setup_rw(ch, drive, cmd == CMD_READ_VERIFY_EXT, False):
                self._set_address(ch, drive, drive.lba + drive.remaining - 1)
                drive.cancel()
                self._complete(ch, drive)
        elif cmd in (CMD_FLUSH_CACHE, CMD_FLUSH_CACHE_EXT):
            self._flush(c, ch, drive)
        elif cmd == CMD_SET_FEATURES:
            self._set_features(ch, drive)
        elif cmd == CMD_SET_MULTIPLE:
            count = ch.taskfile[1]
            if count > MAX_MULT_SECTORS or count & (count - 1):
                self._abort(ch, drive)
            else:
                drive.mult_sectors = count
                self._complete(ch, drive)
        elif cmd == CMD_INITIALIZE_PARAMETERS or cmd == CMD_SEEK or 0x10 <= cmd <= 0x1F:
            self._complete(ch, drive)       # translation and head movement: nothing to do
        elif cmd in CMD_POWER:
            self._complete(ch, drive)
        elif cmd in CMD_CHECK_POWER_MODE:
            ch.taskfile[1] = 0xFF           # active or idle
            self._complete(ch, drive)
        elif cmd == CMD_EXECUTE_DIAGNOSTIC:
            self._diagnostic(ch)
        else:
            # DEVICE RESET, PACKET and IDENTIFY PACKET are for ATAPI; NOP always aborts
            log.debug("%s: unsupported ATA command %#x", self.name, cmd)
            self._abort(ch, drive)

    def _refuse_write(self, ch: _Channel, drive: IdeDrive) -> bool:
        if drive.read_only:
            log.debug("%s: write to a read-only disk", drive.device_name)
            self._abort(ch, drive)
            return True
        return False

    def _diagnostic(self, ch: _Channel) -> None:
        for drive in ch.drives:
            if drive is not None:
                drive.reset_device()
                drive.status = (0 if drive.is_atapi else DRDY) | DSC
        ch.set_signature()
        self._raise(ch)

    def _setup_rw(self, ch: _Channel, drive: IdeDrive, lba48: bool, multiple: bool) -> bool:
        """Decode the address and count of a read/write; False after aborting a bad one."""
        tf, hob = ch.taskfile, ch.hob
        if lba48:
            count = (hob[1] << 8 | tf[1]) or 0x10000
            lba = (hob[4] << 40 | hob[3] << 32 | hob[2] << 24 | tf[4] << 16 | tf[3] << 8 | tf[2])
        else:
            count = tf[1] or 0x100
            if ch.select & DEV_LBA:
                lba = (ch.select & 0xF) << 24 | tf[4] << 16 | tf[3] << 8 | tf[2]
            else:
                cylinders, heads, per_track = drive.geometry
                cylinder, head, sector = tf[4] << 8 | tf[3], ch.select & 0xF, tf[2]
                if not sector or sector > per_track or head >= heads:
                    self._abort(ch, drive, IDNF | ABRT)
                    return False
                lba = (cylinder * heads + head) * per_track + sector - 1
        if multiple and not drive.mult_sectors:
            self._abort(ch, drive)
            return False
        if lba + count > drive.sectors:
            log.debug("%s: sectors %d+%d beyond %d", drive.device_name, lba, count, drive.sectors)
            self._abort(ch, drive, IDNF | ABRT)
            return False
        drive.lba, drive.remaining, drive.lba48 = lba, count, lba48
        drive.block = drive.mult_sectors if multiple else 1
        return True

    def _set_address(self, ch: _Channel, drive: IdeDrive, lba: int) -> None:
        """After a command, the address registers name its last sector (LBA modes)."""
        if not ch.select & DEV_LBA and not drive.lba48:
            return
        lba = max(lba, 0)
        ch.taskfile[2:5] = [lba & 0xFF, lba >> 8 & 0xFF, lba >> 16 & 0xFF]
        if drive.lba48:
            ch.hob[2:5] = [lba >> 24 & 0xFF, lba >> 32 & 0xFF, lba >> 40 & 0xFF]
        else:
            ch.select = (ch.select & 0xF0) | (lba >> 24 & 0xF)

    def _start_pio_in(self, ch: _Channel, drive: IdeDrive, data: bytes) -> None:
        drive.xfer = XFER_PIO_IN
        drive.buffer = bytearray(data)
        drive.pos = 0
        drive.remaining = 0
        drive.status = DRDY | DSC | DRQ
        self._raise(ch)

    def _ata_read_block(self, c: int, ch: _Channel, drive: IdeDrive) -> None:
        n = min(drive.block, drive.remaining)
        buffer = bytearray(n * SECTOR)
        outcome = self._host_io(c, ch, drive, "read",
                                lambda: drive.backend.preadv([memoryview(buffer)], drive.lba * SECTOR),
                                retry=lambda: self._ata_read_block(c, ch, drive))
        if outcome == "kept":
            return
        if outcome == "failed":
            self._set_address(ch, drive, drive.lba)
            self._abort(ch, drive, UNC | ABRT)
            return
        drive.buffer, drive.pos = buffer, 0
        drive.lba += n
        drive.remaining -= n
        if not drive.remaining:
            self._set_address(ch, drive, drive.lba - 1)
        drive.status = DRDY | DSC | DRQ
        self._raise(ch)

    def _ata_write_block(self, c: int, ch: _Channel, drive: IdeDrive) -> None:
        buffer = drive.buffer
        n = len(buffer) // SECTOR

        def write() -> None:
            drive.backend.pwritev([memoryview(buffer)], drive.lba * SECTOR)
            if not drive.write_cache and drive.remaining == n:
                drive.backend.flush()   # write-through: the command completes durable
        outcome = self._host_io(c, ch, drive, "write", write,
                                retry=lambda: self._ata_write_block(c, ch, drive))
        if outcome == "kept":
            return
        if outcome == "failed":
            self._set_address(ch, drive, drive.lba)
            self._abort(ch, drive)
            return
        drive.lba += n
        drive.remaining -= n
        if drive.remaining:
            drive.buffer = bytearray(min(drive.block, drive.remaining) * SECTOR)
            drive.pos = 0
            drive.status = DRDY | DSC | DRQ
            self._raise(ch)
        else:
            self._set_address(ch, drive, drive.lba - 1)
            drive.cancel()
            self._complete(ch, drive)

    def _flush(self, c: int, ch: _Channel, drive: IdeDrive) -> None:
        outcome = self._host_io(c, ch, drive, "write", drive.backend.flush,
                                retry=lambda: self._flush(c, ch, drive))
        if outcome == "kept":
            return
        if outcome == "failed":
            self._abort(ch, drive)
        else:
            self._complete(ch, drive)

    def _set_features(self, ch: _Channel, drive: IdeDrive) -> None:
        feature, value = ch.taskfile[0], ch.taskfile[1]
        if feature == 0x02 and not drive.is_atapi:
            drive.write_cache = True
        elif feature == 0x82 and not drive.is_atapi:
            drive.write_cache = False
        elif feature == 0x03:           # transfer mode
            kind, mode = value >> 3, value & 7
            if kind in (0, 1) and (kind == 0 or mode <= 4):
                drive.pio_mode = mode if kind == 1 else drive.pio_mode
            elif kind == 2 and mode <= 2:
                drive.dma_mode = 0x10 | mode
            elif kind == 4 and mode <= 2:
                drive.dma_mode = 0x20 | mode
            elif kind == 8 and mode <= 5:
                drive.dma_mode = 0x40 | mode
            else:
                self._abort(ch, drive)
                return
        elif feature not in (0x05, 0x85, 0x55, 0xAA, 0x66, 0xCC, 0x31, 0x42, 0xC2):
            # (APM, read look-ahead, revert to defaults, ...: accepted, nothing changes)
            self._abort(ch, drive)
            return
        self._complete(ch, drive)

    def _identify(self, drive: IdeDrive) -> bytes:
        w = [0] * 256
        cylinders, heads, per_track = drive.geometry
        chs_sectors = min(cylinders * heads * per_track, drive.sectors)
        lba28 = min(drive.sectors, LBA28_LIMIT - 1)
        w[0] = 0x0040                   # fixed disk
        w[1], w[3], w[6] = cylinders, heads, per_track
        w[20], w[21], w[22] = 3, 512, 4
        w[47] = 0x8000 | MAX_MULT_SECTORS
        w[48] = 1                       # 32-bit PIO
        w[49] = 1 << 11 | 1 << 9 | 1 << 8   # IORDY, LBA, DMA
        w[51] = w[52] = 0x200
        w[53] = 1 | 2 | 4               # words 54-58, 64-70 and 88 are valid
        w[54], w[55], w[56] = cylinders, heads, per_track
        w[57], w[58] = chs_sectors & 0xFFFF, chs_sectors >> 16
        if drive.mult_sectors:
            w[59] = 0x100 | drive.mult_sectors
        w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16
        w[62] = 0x07 | (1 << (8 + (drive.dma_mode & 7)) if drive.dma_mode & 0x10 else 0)
        w[63] = 0x07 | (1 << (8 + (drive.dma_mode & 7)) if drive.dma_mode & 0x20 else 0)
        w[64] = 0x03                    # PIO 3 and 4
        w[65] = w[66] = w[67] = w[68] = 120
        w[80] = 0xF0                    # ATA/ATAPI-4 to -7
        w[81] = 0x16
        w[82] = 1 << 14 | 1 << 5        # NOP, write cache
        w[83] = 1 << 14 | 1 << 13 | 1 << 12 | 1 << 10   # FLUSH CACHE EXT, FLUSH CACHE, 48-bit
        w[84] = 1 << 14
        w[85] = 1 << 14 | (1 << 5 if drive.write_cache else 0)
        w[86] = 1 << 13 | 1 << 12 | 1 << 10
        w[87] = 1 << 14
        w[88] = 0x3F | (1 << (8 + (drive.dma_mode & 7)) if drive.dma_mode & 0x40 else 0)
        w[93] = 1 | 1 << 14 | 1 << 13   # 80-conductor cable
        for i in range(4):
            w[100 + i] = drive.sectors >> (16 * i) & 0xFFFF
        data = bytearray(struct.pack("<256H", *w))
        data[20:40] = ata_string(drive.serial, 20)
        data[46:54] = ata_string("1.0", 8)
        data[54:94] = ata_string("KVMPY HARDDISK", 40)
        return bytes(data)

    # ATAPI -------------------------------------------------------------------------

    def _execute_atapi(self, c: int, ch: _Channel, drive: IdeDrive, cmd: int) -> None:
        if cmd == CMD_PACKET:
            limit = ch.taskfile[3] | ch.taskfile[4] << 8
            drive.atapi_limit = (limit & ~1 if limit not in (0, 0xFFFF) else 0xFFFE) or 0xFFFE
            drive.dma = DMA_FROM_DISK if ch.taskfile[0] & 1 else DMA_NONE
            drive.xfer = XFER_PACKET
            drive.buffer = bytearray(ATAPI_PACKET_BYTES)
            drive.pos = 0
            ch.taskfile[1] = (ch.taskfile[1] & ~7) | IREASON_COD
            drive.status = DRDY | DSC | DRQ
        elif cmd == CMD_IDENTIFY_PACKET:
            self._start_pio_in(ch, drive, self._identify_packet(drive))
        elif cmd == CMD_DEVICE_RESET:
            self._kept.pop((c, ch.drives.index(drive)), None)
            drive.reset_device()
            ch.taskfile[1:5] = drive.signature()
        elif cmd == CMD_EXECUTE_DIAGNOSTIC:
            self._diagnostic(ch)
        elif cmd == CMD_SET_FEATURES:
            self._set_features(ch, drive)
        elif cmd in CMD_CHECK_POWER_MODE:
            ch.taskfile[1] = 0xFF
            self._complete(ch, drive)
        elif cmd in CMD_POWER:
            self._complete(ch, drive)
        else:
            # IDENTIFY DEVICE and the rest of ATA: abort with the signature, which is
            # how a driver learns this is a packet device (ATA-8 ACS 7.12)
            ch.taskfile[1:5] = drive.signature()
            self._abort(ch, drive)

    def _identify_packet(self, drive: IdeDrive) -> bytes:
        w = [0] * 256
        w[0] = 0x85C0           # ATAPI, CD-ROM, removable, 50 us DRQ, 12-byte packets
        w[49] = 1 << 9 | 1 << 8     # LBA, DMA
        w[53] = 2 | 4
        w[62] = 0x07
        w[63] = 0x07 | (1 << (8 + (drive.dma_mode & 7)) if drive.dma_mode & 0x20 else 0)
        w[64] = 0x03
        w[65] = w[66] = w[67] = w[68] = 120
        w[71], w[72] = 30, 30
        w[80] = 0x1E            # ATAPI-4 to -7
        w[82] = 1 << 14 | 1 << 4    # NOP, PACKET
        w[83] = 1 << 14
        w[84] = 1 << 14
        w[85] = 1 << 14 | 1 << 4
        w[87] = 1 << 14
        w[88] = 0x3F | (1 << (8 + (drive.dma_mode & 7)) if drive.dma_mode & 0x40 else 0)
        w[93] = 1 | 1 << 14 | 1 << 13
        data = bytearray(struct.pack("<256H", *w))
        data[20:40] = ata_string(drive.serial, 20)
        data[46:54] = ata_string("1.0", 8)
        data[54:94] = ata_string("KVMPY DVD-ROM", 40)
        return bytes(data)

    def _atapi_command(self, c: int, ch: _Channel, drive: IdeDrive) -> None:
        cdb = bytes(drive.buffer)
        dma = drive.dma != DMA_NONE
        drive.xfer = XFER_NONE
        drive.dma = DMA_NONE
        reply = drive.atapi.execute(cdb)
        if reply is None:
            log.debug("%s: packet %s: check condition %s", drive.device_name, cdb.hex(), drive.atapi.sense)
            self._atapi_check_condition(ch, drive)
            return
        drive.atapi_data = reply.data
        drive.atapi_offset = reply.medium_offset
        drive.atapi_remaining = reply.length
        if not reply.length:
            self._atapi_done(ch, drive)
        elif dma:
            drive.dma = DMA_FROM_DISK
            drive.status = DRDY | DSC | DRQ
            self._maybe_start_dma(c, ch)
        else:
            self._atapi_next_chunk(c, ch, drive)

    def _atapi_check_condition(self, ch: _Channel, drive: IdeDrive) -> None:
        drive.cancel()
        drive.error = drive.atapi.sense[0] << 4 | ABRT
        ch.taskfile[1] = (ch.taskfile[1] & ~7) | IREASON_IO | IREASON_COD
        self._complete(ch, drive, DRDY | DSC | ERR)

    def _atapi_done(self, ch: _Channel, drive: IdeDrive) -> None:
        drive.cancel()
        ch.taskfile[1] = (ch.taskfile[1] & ~7) | IREASON_IO | IREASON_COD
        self._complete(ch, drive)

    def _atapi_next_chunk(self, c: int, ch: _Channel, drive: IdeDrive) -> None:
        if not drive.atapi_remaining:
            self._atapi_done(ch, drive)
            return
        size = min(drive.atapi_remaining, drive.atapi_limit)
        head = drive.atapi_data[:size]
        tail = size - len(head)
        buffer = bytearray(head) + bytearray(tail)
        if tail:
            view = memoryview(buffer)[len(head):]
            outcome = self._host_io(c, ch, drive, "read",
                                    lambda: drive.backend.preadv([view], drive.atapi_offset),
                                    retry=lambda: self._atapi_next_chunk(c, ch, drive))
            if outcome == "kept":
                return
            if outcome == "failed":
                drive.atapi.fail(MEDIUM_ERROR, ASC_UNRECOVERED_READ_ERROR)
                self._atapi_check_condition(ch, drive)
                return
        drive.atapi_data = drive.atapi_data[len(head):]
        drive.atapi_offset += tail
        drive.atapi_remaining -= size
        drive.xfer = XFER_ATAPI_IN
        drive.buffer, drive.pos = buffer, 0
        ch.taskfile[1] = (ch.taskfile[1] & ~7) | IREASON_IO
        ch.taskfile[3], ch.taskfile[4] = size & 0xFF, size >> 8
        drive.status = DRDY | DSC | DRQ
        self._raise(ch)

    # host errors -------------------------------------------------------------------

    def _host_io(self, c: int, ch: _Channel, drive: IdeDrive, operation: str, io: Callable[[], object],
                 retry: Callable[[], None]) -> str:
        """Run ``io``; "ok", or after a host error the disk's policy: "ok" (ignore),
        "failed" (report) or "kept" (stop: the drive stays busy until ``retry``)."""
        try:
            io()
            return "ok"
        except (OSError, ImageError) as e:
            err = (e.errno if isinstance(e, OSError) else None) or errno.EIO
            log.error("%s: host I/O error on %s: %s", drive.device_name, operation, e)
        policy = drive.rerror if operation == "read" else drive.werror
        action = ("stop" if err == errno.ENOSPC else "report") if policy == "enospc" else policy
        if action == "stop" and self.errors is None:
            action = "report"
        unit = ch.drives.index(drive)
        if action == "stop":
            if drive.io_status == "ok":
                drive.io_status = "nospace" if err == errno.ENOSPC else "failed"
            drive.status = BSY | DSC
            self._kept[(c, unit)] = retry
        if self.errors is not None:
            self.errors.io_error(drive.device_name, drive.node_name, operation, action, err == errno.ENOSPC,
                                 os.strerror(err), retry=(lambda: self.retry(c, unit)) if action == "stop" else None)
        return {"stop": "kept", "ignore": "ok"}.get(action, "failed")

    def retry(self, c: int, unit: int) -> None:
        """Run again the request a "stop" kept (when the VM continues)."""
        with self.lock:
            again = self._kept.pop((c, unit), None)
            if again is None:
                return
            drive = self.channels[c].drives[unit]
            drive.io_status = "ok"
            again()

    # bus-master DMA ----------------------------------------------------------------

    def read_bmdma(self, offset: int, size: int) -> int:
        with self.lock:
            value = 0
            for i in range(size):
                value |= self._bmdma_byte(offset + i) << (8 * i)
            return value

    def _bmdma_byte(self, offset: int) -> int:
        if not 0 <= offset < BMDMA_SIZE:
            return 0xFF
        ch = self.channels[offset // BMDMA_CHANNEL_SIZE]
        reg = offset % BMDMA_CHANNEL_SIZE
        if reg == 0:
            return ch.bm_command
        if reg == 2:
            return ch.bm_status
        if reg >= 4:
            return ch.bm_prd >> (8 * (reg - 4)) & 0xFF
        return 0

    def write_bmdma(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            for i in range(size):
                self._bmdma_write_byte(offset + i, value >> (8 * i) & 0xFF)

    def _bmdma_write_byte(self, offset: int, value: int) -> None:
        if not 0 <= offset < BMDMA_SIZE:
            return
        c = offset // BMDMA_CHANNEL_SIZE
        ch = self.channels[c]
        reg = offset % BMDMA_CHANNEL_SIZE
        if reg == 0:
            was_started = ch.bm_command & BM_CMD_START
            ch.bm_command = value & (BM_CMD_START | BM_CMD_TO_MEMORY)
            if ch.bm_command & BM_CMD_START and not was_started:
                ch.bm_status |= BM_STATUS_ACTIVE
                self._maybe_start_dma(c, ch)
            elif not ch.bm_command & BM_CMD_START:
                ch.bm_status &= ~BM_STATUS_ACTIVE    # the engine stops; a job left waits
        elif reg == 2:
            ch.bm_status = ((ch.bm_status & ~BM_STATUS_DRIVE_DMA & ~(value & (BM_STATUS_ERROR | BM_STATUS_INTERRUPT)))
                            | (value & BM_STATUS_DRIVE_DMA))
        elif reg >= 4:
            shift = 8 * (reg - 4)
            ch.bm_prd = (ch.bm_prd & ~(0xFF << shift) | value << shift) & 0xFFFFFFFC

    def _maybe_start_dma(self, c: int, ch: _Channel) -> None:
        drive = ch.drive
        if drive is None or drive.dma == DMA_NONE or drive.xfer == XFER_PACKET:
            return
        if not ch.bm_command & BM_CMD_START or not ch.bm_status & BM_STATUS_ACTIVE:
            return
        if not self.bus_master():
            log.debug("%s: DMA started with bus mastering off in the PCI command register", self.name)
            return
        self._run_dma(c, ch, drive)

    def _prd_segments(self, ch: _Channel, length: int,
                      to_memory: bool) -> tuple[list[tuple[int, memoryview]], bool] | str:
        """The guest memory the PRD table gives for ``length`` bytes, as (address,
        view) pairs, and whether the table ended exactly there; or why it cannot be used.
        ``to_memory``: the engine writes there, which ROM (and write-protected shadow
        RAM) refuses, as fw_cfg's DMA does."""
        view_of = self.memory.writable_view if to_memory else self.memory.view
        segments: list[tuple[int, memoryview]] = []
        total = 0
        for i in range(MAX_PRD_ENTRIES):
            entry = ch.bm_prd + 8 * i
            try:
                base, count, flags = struct.unpack("<IHH", self.memory.read(entry, 8))
            except GuestMemoryError:
                return f"PRD entry at {entry:#x} is outside guest RAM"
            count = count or 0x10000
            take = min(count, length - total)
            if take:
                try:
                    segments.append((base & ~1, view_of(base & ~1, take)))
                except GuestMemoryError as e:
                    return f"PRD entry {i}: {e}"
                total += take
            if total == length:
                return segments, bool(flags & PRD_EOT) and take == count
            if flags & PRD_EOT:
                return f"the PRD table covers {total} bytes of {length}"
        return f"the PRD table at {ch.bm_prd:#x} has no end-of-table mark in {MAX_PRD_ENTRIES} entries"

    def _run_dma(self, c: int, ch: _Channel, drive: IdeDrive) -> None:
        atapi = drive.is_atapi
        length = drive.atapi_remaining if atapi else drive.remaining * SECTOR
        found = self._prd_segments(ch, length, to_memory=atapi or drive.dma == DMA_FROM_DISK)
        if isinstance(found, str):
            log.error("%s: DMA failed: %s", drive.device_name, found)
            ch.bm_status = (ch.bm_status & ~BM_STATUS_ACTIVE) | BM_STATUS_ERROR
            if atapi:
                drive.atapi.fail(0x0B, 0)       # ABORTED COMMAND
                self._atapi_check_condition(ch, drive)
            else:
                self._abort(ch, drive)
            return
        segments, exact = found
        views = [view for _, view in segments]
        if atapi:
            data = drive.atapi_data
            if data:
                self._scatter(views, data)
                io = lambda: None       # noqa: E731 - the reply came from the device itself
            else:
                io = lambda: self._batched(drive.backend.preadv, views, drive.atapi_offset)  # noqa: E731
            operation = "read"
        elif drive.dma == DMA_FROM_DISK:
            io = lambda: self._batched(drive.backend.preadv, views, drive.lba * SECTOR)  # noqa: E731
            operation = "read"
        else:
            def io() -> None:
                self._batched(drive.backend.pwritev, views, drive.lba * SECTOR)
                if not drive.write_cache:
                    drive.backend.flush()
            operation = "write"
        outcome = self._host_io(c, ch, drive, operation, io, retry=lambda: self._run_dma(c, ch, drive))
        if outcome == "kept":
            return
        if operation == "read" and self.memory.dma_listeners:
            for gpa, view in segments:
                self.memory.notify_dma_write(gpa, len(view))
        if exact:
            # (when the table offered more than the device moved, the engine stays active)
            ch.bm_status &= ~BM_STATUS_ACTIVE
        if outcome == "failed":
            if atapi:
                drive.atapi.fail(MEDIUM_ERROR, ASC_UNRECOVERED_READ_ERROR)
                self._atapi_check_condition(ch, drive)
            else:
                self._set_address(ch, drive, drive.lba)
                self._abort(ch, drive, (UNC | ABRT) if operation == "read" else ABRT)
            return
        if atapi:
            self._atapi_done(ch, drive)
        else:
            self._set_address(ch, drive, drive.lba + drive.remaining - 1)
            drive.cancel()
            self._complete(ch, drive)

    @staticmethod
    def _scatter(views: list[memoryview], data: bytes) -> None:
        pos = 0
        for v in views:
            n = len(v)
            v[:] = data[pos:pos + n]
            pos += n

    @staticmethod
    def _batched(fn, views: list[memoryview], offset: int) -> None:
        # preadv/pwritev take at most IOV_MAX buffers
        for i in range(0, len(views), IOV_BATCH):
            batch = views[i:i + IOV_BATCH]
            fn(batch, offset)
            offset += sum(len(v) for v in batch)


class IdeLegacyPorts:
    """Both channels' command and control blocks as one bus device, placed at
    ``LEGACY_SLOTS``: an offset is the port's distance from the first slot (0x1F0),
    as the machine's table hands out a device's later slots."""

    def __init__(self, controller: IdeController) -> None:
        self.controller = controller

    def _decode(self, offset: int) -> tuple[int, bool, int] | None:
        port = PRIMARY_COMMAND.base + offset
        for channel, (command, control) in enumerate(CHANNEL_PORTS):
            if command.base <= port < command.end:
                return channel, True, port - command.base
            if control.base <= port < control.end:
                return channel, False, port - control.base
        return None

    def read(self, offset: int, size: int) -> int:
        where = self._decode(offset)
        if where is None:
            return (1 << (8 * size)) - 1
        channel, command, reg = where
        if command:
            return self.controller.read_command(channel, reg, size)
        return self.controller.read_control(channel, reg, size)

    def write(self, offset: int, size: int, value: int) -> None:
        where = self._decode(offset)
        if where is None:
            return
        channel, command, reg = where
        if command:
            self.controller.write_command(channel, reg, size, value)
        else:
            self.controller.write_control(channel, reg, size, value)

    def reset(self) -> None:
        self.controller.reset()

    def __repr__(self) -> str:
        return "<IDE legacy ports>"
