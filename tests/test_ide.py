"""The IDE controller (kvmpy.devices.ide), its ATAPI CD-ROM (kvmpy.devices.atapi) and
the PIIX3 functions (kvmpy.devices.pci.piix), driven from the host side as libata
and SeaBIOS drive them, over real raw images in tmp_path; then hostile register
traffic from Hypothesis, and the controller's state as a value."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.block import open_image
from kvmpy.config import DiskConfig, VmConfig, parse_drive
from kvmpy.devices.atapi import CD_SECTOR
from kvmpy.devices.bus import Bus
from kvmpy.devices.ide import (ABRT, BM_STATUS_ACTIVE, BM_STATUS_ERROR, BM_STATUS_INTERRUPT, BSY, CTL_NIEN,
                               CTL_SRST, DRDY, DRQ, ERR, IDNF, REG_DEVICE, REG_LBA_HIGH, REG_LBA_LOW, REG_LBA_MID,
                               REG_NSECTOR, IdeController, IdeControllerState, IdeDrive, IdeLegacyPorts)
from kvmpy.devices.pci import PciBus
from kvmpy.devices.pci.piix import Piix3, ide_boot_path
from kvmpy.devices.saved_state import StateError
from kvmpy.errors import ConfigError
from kvmpy.events import EventLoop
from kvmpy.memory import GuestMemory
from kvmpy.pc import BlockErrorsOnLoop, ide_device_name, ide_positions
from support.ide_driver import AtaHost, IrqLine
from support.polling import settle
from test_block_errors import FailingHost, Recorder

FUZZ = bool(os.environ.get("KVMPY_FUZZ"))
RAM = 1 << 20
TABLE, BUF = 0x8000, 0x10000
DISK_SECTORS = 256
CD_SECTORS = 40


def sector_pattern(lba: int) -> bytes:
    return struct.pack("<I", lba) * 128


def cd_pattern(lba: int) -> bytes:
    return struct.pack("<I", 0xC0000000 | lba) * (CD_SECTOR // 4)


@pytest.fixture
def disk_path(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(sector_pattern(i) for i in range(DISK_SECTORS)))
    return str(path)


@pytest.fixture
def iso_path(tmp_path):
    path = tmp_path / "cd.iso"
    path.write_bytes(b"".join(cd_pattern(i) for i in range(CD_SECTORS)))
    return str(path)


class Rig:
    def __init__(self, drives: dict[int, IdeDrive], errors=None) -> None:
        self.memory = GuestMemory.anonymous([(0, RAM)])
        self.irqs = (IrqLine(), IrqLine())
        self.controller = IdeController(self.memory, self.irqs, drives, errors=errors)
        self.hosts = (AtaHost(self.controller, 0), AtaHost(self.controller, 1))
        self.drivers = [d.backend for d in drives.values() if d.backend is not None]

    def close(self) -> None:
        for driver in self.drivers:
            driver.close()
        self.memory.close()


@pytest.fixture
def rig(disk_path, iso_path):
    r = Rig({0: IdeDrive(open_image(disk_path, "raw"), device="ide0-hd0"),
             2: IdeDrive(open_image(iso_path, "raw", read_only=True), media="cdrom", device="ide1-cd0")})
    yield r
    r.close()


def identify(host: AtaHost, cmd: int = 0xEC) -> list[int]:
    host.command(cmd)
    assert host.status() & DRQ
    return list(struct.unpack("<256H", host.read_pio(512)))


def ata_text(words: list[int]) -> str:
    return b"".join(struct.pack(">H", w) for w in words).decode().strip()


# --- ATA disks --------------------------------------------------------------------------------

def test_identify_says_lba48_and_the_size(rig):
    host = rig.hosts[0]
    host.select(0)
    w = identify(host)
    assert w[0] == 0x0040 and ata_text(w[27:47]) == "KVMPY HARDDISK"
    assert w[60] | w[61] << 16 == DISK_SECTORS
    assert w[83] & 1 << 10 and w[86] & 1 << 10, "48-bit addressing supported and enabled"
    assert w[83] & 1 << 12 and w[83] & 1 << 13, "FLUSH CACHE and FLUSH CACHE EXT"
    assert sum(w[100 + i] << 16 * i for i in range(4)) == DISK_SECTORS
    assert w[49] & 1 << 8 and w[88] & 0x3F, "DMA and UDMA modes"
    assert host.status() == DRDY | 0x10
    assert rig.irqs[0].raised == 1


def test_pio_read_sectors_and_read_multiple(rig):
    host = rig.hosts[0]
    host.select(0)
    host.taskfile(lba=5, count=3)
    host.command(0x20)
    assert host.pio_in(3) == b"".join(sector_pattern(i) for i in (5, 6, 7))
    assert not host.status() & (DRQ | ERR)
    assert rig.irqs[0].raised == 3, "one interrupt per DRQ block"
    # the address registers name the last sector moved
    assert (host.inp(REG_LBA_LOW), host.inp(REG_LBA_MID)) == (7, 0)
    host.taskfile(lba=0, count=4)
    host.command(0xC6)          # SET MULTIPLE MODE: 4 sectors per block
    assert not host.status() & ERR
    host.taskfile(lba=100, count=8)
    host.command(0xC4)
    assert host.pio_in(2, 4 * 512) == b"".join(sector_pattern(i) for i in range(100, 108))
    host.taskfile(lba=0, count=3)
    host.command(0xC6)          # not a power of two
    assert host.status() & ERR and host.error() & ABRT


def test_chs_addressing_reaches_the_same_sector(rig):
    host = rig.hosts[0]
    host.select(0, lba_mode=False, head=1)      # cylinder 0, head 1, sector 2 = LBA 63 + 1
    host.out(REG_NSECTOR, 1)
    host.out(REG_LBA_LOW, 2)
    host.out(REG_LBA_MID, 0)
    host.out(REG_LBA_HIGH, 0)
    host.command(0x20)
    assert host.pio_in(1) == sector_pattern(64)
    host.out(REG_LBA_LOW, 0)    # sector numbers start at 1
    host.command(0x20)
    assert host.status() & ERR and host.error() & IDNF


def test_lba48_beyond_the_28_bit_limit(tmp_path):
    path = tmp_path / "big.img"
    far = (1 << 28) + 12345
    with open(path, "wb") as f:
        f.truncate((far + 8) * 512)     # sparse: 128 GiB of which one sector is written
        f.seek(far * 512)
        f.write(sector_pattern(far))
    r = Rig({0: IdeDrive(open_image(str(path), "raw"))})
    try:
        host = r.hosts[0]
        host.select(0)
        w = identify(host)
        assert w[60] | w[61] << 16 == (1 << 28) - 1, "LBA28 capacity saturates"
        host.taskfile(lba=far, count=1, lba48=True)
        host.command(0x24)              # READ SECTORS EXT
        assert host.pio_in(1) == sector_pattern(far)
        host.taskfile(lba=far + 8, count=1, lba48=True)
        host.command(0x24)
        assert host.status() & ERR and host.error() & IDNF
    finally:
        r.close()


def test_out_of_range_and_unknown_commands_are_errors(rig):
    host = rig.hosts[0]
    host.select(0)
    host.taskfile(lba=DISK_SECTORS - 1, count=2)
    host.command(0x20)
    assert host.status() == DRDY | 0x10 | ERR and host.error() == IDNF | ABRT
    host.command(0x00)          # NOP aborts
    assert host.status() & ERR and host.error() == ABRT
    host.command(0xB0)          # SMART: not offered
    assert host.error() == ABRT
    for cmd in (0xE5, 0xE0, 0xE1, 0x91, 0x70, 0x10):     # power, geometry, seek: accepted
        host.command(cmd)
        assert not host.status() & ERR, hex(cmd)


def test_pio_write_then_flush_is_on_disk(rig, disk_path):
    host = rig.hosts[0]
    host.select(0)
    data = bytes(range(256)) * 4
    host.taskfile(lba=9, count=2)
    host.command(0x30)
    assert host.status() & DRQ and rig.irqs[0].raised == 0, "the first block is asked for without an interrupt"
    host.write_pio(data, 4)
    drive = rig.controller.drive(0)
    synced = []
    real_flush = drive.backend.flush
    drive.backend.flush = lambda: (synced.append(1), real_flush())
    host.command(0xE7)
    assert host.status() == DRDY | 0x10
    assert synced == [1], "FLUSH CACHE reaches the image's flush (fsync)"
    with open(disk_path, "rb") as f:
        f.seek(9 * 512)
        assert f.read(1024) == data
        assert f.read(512) == sector_pattern(11)


def test_a_dma_write_to_block_0_of_a_probed_raw_disk_writes_what_was_checked(disk_path, monkeypatch):
    """The guard against a raw disk becoming qcow2 checks the guest's data; another
    vCPU may rewrite that RAM before the write reaches the file, so what goes to
    the file must be what was checked, not the guest's buffer read a second time."""
    from kvmpy.block import raw
    r = Rig({0: IdeDrive(open_image(disk_path, guard_probe=True))})
    qcow2_header = b"QFI\xfb" + struct.pack(">I", 3) + bytes(504)
    real_probe = raw.probe_head

    def probe_then_the_guest_rewrites(head):
        answer = real_probe(head)
        r.memory.write(BUF, qcow2_header)       # the other vCPU, between check and write
        return answer
    monkeypatch.setattr(raw, "probe_head", probe_then_the_guest_rewrites)
    try:
        host = r.hosts[0]
        host.select(0)
        r.memory.write(BUF, sector_pattern(77))
        host.setup_dma(r.memory, TABLE, [(BUF, 512)], to_memory=False)
        host.taskfile(lba=0, count=1)
        host.command(0xCA)
        host.start_dma(to_memory=False)
        assert not host.status() & ERR
    finally:
        r.close()
    with open(disk_path, "rb") as f:
        assert f.read(512) == sector_pattern(77)


def test_write_to_a_read_only_disk_aborts(disk_path):
    r = Rig({1: IdeDrive(open_image(disk_path, "raw"), read_only=True)})
    try:
        host = r.hosts[0]
        host.select(1)
        host.taskfile(lba=0, count=1)
        host.command(0x30)
        assert host.status() & ERR and host.error() == ABRT
        assert not host.status() & DRQ
    finally:
        r.close()


def test_dma_read_and_write_along_the_prd_table(rig, disk_path):
    host = rig.hosts[0]
    host.select(0)
    # three sectors into a 512-byte and a 1024-byte buffer
    host.setup_dma(rig.memory, TABLE, [(BUF, 512), (BUF + 0x4000, 1024)], to_memory=True)
    host.taskfile(lba=20, count=3)
    host.command(0xC8)
    assert host.status() & DRQ, "waits for the engine"
    host.start_dma(to_memory=True)
    assert host.bm(2) & (BM_STATUS_ACTIVE | BM_STATUS_INTERRUPT | BM_STATUS_ERROR) == BM_STATUS_INTERRUPT
    host.stop_dma()
    assert host.status() == DRDY | 0x10
    assert rig.memory.read(BUF, 512) == sector_pattern(20)
    assert rig.memory.read(BUF + 0x4000, 1024) == sector_pattern(21) + sector_pattern(22)
    # the other way, with the engine started first, LBA48
    rig.memory.write(BUF, b"\xA5" * 1024)
    host.setup_dma(rig.memory, TABLE, [(BUF, 1024)], to_memory=False)
    host.start_dma(to_memory=False)
    host.taskfile(lba=30, count=2, lba48=True)
    host.command(0x35)
    assert host.bm(2) & BM_STATUS_INTERRUPT and not host.status() & ERR
    host.command(0xEA)
    with open(disk_path, "rb") as f:
        f.seek(30 * 512)
        assert f.read(1024) == b"\xA5" * 1024


def test_a_longer_prd_table_leaves_the_engine_active(rig):
    host = rig.hosts[0]
    host.select(0)
    host.setup_dma(rig.memory, TABLE, [(BUF, 4096)], to_memory=True)
    host.taskfile(lba=1, count=1)
    host.command(0xC8)
    host.start_dma(to_memory=True)
    assert host.bm(2) & (BM_STATUS_ACTIVE | BM_STATUS_INTERRUPT) == BM_STATUS_ACTIVE | BM_STATUS_INTERRUPT
    assert rig.memory.read(BUF, 512) == sector_pattern(1)


@pytest.mark.parametrize("segments, eot", [
    ([(RAM - 256, 512)], True),                 # crosses the end of RAM
    ([(0xFEE00000, 512)], True),                # not RAM at all
    ([(BUF, 256)], True),                       # too short for the command
    ([(BUF, 256), (0xFEE00000, 256)], False),   # the second entry is no RAM
])
def test_bad_prd_tables_are_engine_errors(rig, segments, eot, caplog):
    host = rig.hosts[0]
    host.select(0)
    host.setup_dma(rig.memory, TABLE, segments, to_memory=True, eot=eot)
    host.taskfile(lba=0, count=1)
    host.command(0xC8)
    host.start_dma(to_memory=True)
    assert host.bm(2) & (BM_STATUS_ERROR | BM_STATUS_ACTIVE) == BM_STATUS_ERROR
    assert host.status() & ERR and host.error() & ABRT
    assert "DMA failed" in caplog.text


def test_dma_does_not_write_rom_but_reads_it(rig, disk_path, caplog):
    rom = rig.memory.add_rom(RAM, b"\x90" * 4096)
    host = rig.hosts[0]
    host.select(0)
    host.setup_dma(rig.memory, TABLE, [(rom.gpa, 512)], to_memory=True)
    host.taskfile(lba=5, count=1)
    host.command(0xC8)
    host.start_dma(to_memory=True)
    assert host.bm(2) & BM_STATUS_ERROR and host.status() & ERR
    assert rig.memory.read(rom.gpa, 4096) == b"\x90" * 4096
    assert "is ROM" in caplog.text
    host.stop_dma()
    host.bm(2, BM_STATUS_ERROR | BM_STATUS_INTERRUPT)
    # to the disk, ROM is as good a source as RAM
    host.setup_dma(rig.memory, TABLE, [(rom.gpa, 512)], to_memory=False)
    host.taskfile(lba=5, count=1)
    host.command(0xCA)
    host.start_dma(to_memory=False)
    assert not host.status() & ERR and not host.bm(2) & BM_STATUS_ERROR
    with open(disk_path, "rb") as f:
        f.seek(5 * 512)
        assert f.read(512) == b"\x90" * 512


def test_a_table_without_end_mark_is_read_no_further_than_64k(tmp_path):
    path = tmp_path / "big.img"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    r = Rig({0: IdeDrive(open_image(str(path), "raw"))})
    try:
        host = r.hosts[0]
        host.select(0)
        # 8192 two-byte entries cannot cover 65536 sectors: the walk stops at 64 KiB of table
        for i in range(8192):
            r.memory.write(0x20000 + 8 * i, struct.pack("<IHH", BUF, 2, 0))
        host.bm(4, 0x20000, 4)
        host.taskfile(lba=0, count=0, lba48=True)       # 0 = 65536 sectors
        host.command(0x25)
        started = time.monotonic()
        host.start_dma(to_memory=True)
        assert time.monotonic() - started < 5
        assert host.bm(2) & BM_STATUS_ERROR and host.status() & ERR
    finally:
        r.close()


def test_dma_waits_for_bus_mastering(rig):
    enabled = [False]
    rig.controller.bus_master = lambda: enabled[0]
    host = rig.hosts[0]
    host.select(0)
    host.setup_dma(rig.memory, TABLE, [(BUF, 512)], to_memory=True)
    host.taskfile(lba=3, count=1)
    host.command(0xC8)
    host.start_dma(to_memory=True)
    assert host.status() & DRQ and rig.memory.read(BUF, 4) == bytes(4)
    enabled[0] = True
    host.stop_dma()
    host.start_dma(to_memory=True)
    assert rig.memory.read(BUF, 512) == sector_pattern(3)


def test_write_cache_off_makes_every_write_durable(rig):
    host = rig.hosts[0]
    host.select(0)
    flushes = []
    drive = rig.controller.drive(0)
    real_flush = drive.backend.flush
    drive.backend.flush = lambda: (flushes.append(1), real_flush())
    host.taskfile(lba=0, count=1, feature=0x82)     # SET FEATURES: write cache off
    host.command(0xEF)
    w = identify(host)
    assert not w[85] & 1 << 5
    host.taskfile(lba=2, count=1)
    host.command(0x30)
    host.write_pio(bytes(512))
    assert flushes == [1]


# --- channels, reset, interrupts --------------------------------------------------------------

def test_empty_channel_and_absent_slave_answer_nothing(disk_path):
    r = Rig({0: IdeDrive(open_image(disk_path, "raw"))})
    try:
        assert [r.controller.read_command(1, reg, 1) for reg in range(1, 8)] == [0] * 7
        assert r.controller.read_control(1, 0, 1) == 0
        host = r.hosts[0]
        host.select(1)
        assert host.status() == 0
        host.command(0xEC)          # nobody there: ignored, no interrupt
        assert host.status() == 0 and r.irqs[0].raised == 0
        host.select(0)
        assert host.status() & DRDY
    finally:
        r.close()


def test_srst_resets_and_nien_masks_the_line(rig):
    host = rig.hosts[0]
    host.select(0)
    rig.controller.write_control(0, 0, 1, CTL_NIEN)
    host.command(0xEC)
    assert not rig.irqs[0].level, "nIEN masks INTRQ"
    rig.controller.write_control(0, 0, 1, 0)
    assert rig.irqs[0].level, "the pending interrupt shows once unmasked"
    host.status()
    assert not rig.irqs[0].level, "reading status acknowledges"
    rig.controller.write_control(0, 0, 1, CTL_SRST)
    assert rig.controller.read_control(0, 0, 1) & BSY
    rig.controller.write_control(0, 0, 1, 0)
    assert host.status() == DRDY | 0x10 and host.error() == 1
    assert [host.inp(r) for r in (REG_NSECTOR, REG_LBA_LOW, REG_LBA_MID, REG_LBA_HIGH)] == [1, 1, 0, 0]
    assert not host.status() & DRQ


def test_hob_reads_the_previous_values(rig):
    host = rig.hosts[0]
    host.taskfile(lba=0x123456789A, count=0x0203, lba48=True)
    rig.controller.write_control(0, 0, 1, 0x80)
    assert [host.inp(r) for r in (REG_NSECTOR, REG_LBA_LOW, REG_LBA_MID, REG_LBA_HIGH)] == [2, 0x34, 0x12, 0]
    rig.controller.write_control(0, 0, 1, 0)
    assert [host.inp(r) for r in (REG_NSECTOR, REG_LBA_LOW, REG_LBA_MID, REG_LBA_HIGH)] == [3, 0x9A, 0x78, 0x56]


# --- host errors follow werror/rerror ---------------------------------------------------------

@pytest.fixture
def loop():
    events = EventLoop("test-ide")
    events.start()
    yield events
    events.close()


@pytest.mark.parametrize("rerror, failed", [("report", True), ("ignore", False)])
def test_read_errors_follow_rerror(disk_path, loop, rerror, failed):
    recorder = Recorder(loop)
    host_disk = FailingHost(open_image(disk_path, "raw"))
    r = Rig({0: IdeDrive(host_disk, rerror=rerror, device="ide0-hd0", node_name="#ide0")},
            errors=BlockErrorsOnLoop(recorder, loop))
    try:
        host_disk.failing["preadv"] = errno.EIO
        host = r.hosts[0]
        host.select(0)
        host.taskfile(lba=1, count=1)
        host.command(0x20)
        assert bool(host.status() & ERR) == failed
        assert settle(loop)
        assert recorder.reports == [{"device": "ide0-hd0", "node-name": "#ide0", "operation": "read",
                                     "action": rerror, "nospace": False, "reason": os.strerror(errno.EIO)}]
    finally:
        r.close()


def test_stop_keeps_the_write_until_the_retry(disk_path, loop):
    recorder = Recorder(loop)
    host_disk = FailingHost(open_image(disk_path, "raw"))
    r = Rig({0: IdeDrive(host_disk, werror="enospc", device="ide0-hd0")}, errors=BlockErrorsOnLoop(recorder, loop))
    try:
        host_disk.failing["pwritev"] = errno.ENOSPC
        host = r.hosts[0]
        host.select(0)
        host.taskfile(lba=4, count=1)
        host.command(0x30)
        host.write_pio(b"\x77" * 512)
        assert host.status() & BSY, "the request is kept"
        assert r.controller.drive(0).io_status == "nospace"
        assert settle(loop)
        assert recorder.reports[0]["action"] == "stop" and recorder.reports[0]["nospace"]
        del host_disk.failing["pwritev"]
        loop.call_and_wait(recorder.retries[0])
        assert host.status() == DRDY | 0x10 and r.controller.drive(0).io_status == "ok"
        with open(disk_path, "rb") as f:
            f.seek(4 * 512)
            assert f.read(512) == b"\x77" * 512
    finally:
        r.close()


# --- ATAPI ------------------------------------------------------------------------------------

def test_atapi_signature_and_identify(rig):
    host = rig.hosts[1]
    host.select(0)
    assert [host.inp(r) for r in (REG_NSECTOR, REG_LBA_LOW, REG_LBA_MID, REG_LBA_HIGH)] == [1, 1, 0x14, 0xEB]
    host.command(0xEC)      # IDENTIFY DEVICE: aborted, with the signature
    assert host.status() & ERR and host.error() & ABRT
    assert (host.inp(REG_LBA_MID), host.inp(REG_LBA_HIGH)) == (0x14, 0xEB)
    w = identify(host, 0xA1)
    assert w[0] == 0x85C0 and ata_text(w[27:47]) == "KVMPY DVD-ROM"


def test_atapi_inquiry_capacity_and_reads(rig):
    host = rig.hosts[1]
    host.select(0)
    st, data = host.packet(b"\x12\0\0\0\x24")
    assert not st & ERR and data[0] == 0x05 and data[1] & 0x80 and data[8:13] == b"KVMPY"
    st, data = host.packet(b"\x25")
    assert struct.unpack(">II", data) == (CD_SECTORS - 1, CD_SECTOR)
    # READ(10) of three sectors with an odd byte-count limit: chunks of 3000 bytes
    st, data = host.packet(struct.pack(">BBIBH3x", 0x28, 0, 7, 0, 3), byte_limit=3001)
    assert not st & ERR and data == cd_pattern(7) + cd_pattern(8) + cd_pattern(9)
    assert host.inp(REG_NSECTOR) & 3 == 3, "interrupt reason: command complete"
    st, data = host.packet(struct.pack(">BBII2x", 0xA8, 0, CD_SECTORS - 1, 1))
    assert data == cd_pattern(CD_SECTORS - 1)


def test_atapi_dma_read(rig):
    host = rig.hosts[1]
    host.select(0)
    host.setup_dma(rig.memory, TABLE, [(BUF, 2 * CD_SECTOR)], to_memory=True)
    st, _ = host.packet(struct.pack(">BBIBH3x", 0x28, 0, 3, 0, 2), dma=True)
    assert st & DRQ
    host.start_dma(to_memory=True)
    assert host.bm(2) & (BM_STATUS_INTERRUPT | BM_STATUS_ERROR) == BM_STATUS_INTERRUPT
    assert not host.status() & (ERR | DRQ)
    assert rig.memory.read(BUF, 2 * CD_SECTOR) == cd_pattern(3) + cd_pattern(4)


def sense(host: AtaHost) -> tuple[int, int]:
    st, data = host.packet(b"\x03\0\0\0\x12")
    return data[2] & 0xF, data[12]


@pytest.mark.parametrize("cdb, key, asc", [
    (b"\xFF", 0x05, 0x20),                                          # no such opcode
    (struct.pack(">BBIBH3x", 0x28, 0, CD_SECTORS, 0, 1), 0x05, 0x21),  # past the end
    (struct.pack(">BBIBH3x", 0x2A, 0, 0, 0, 1), 0x07, 0x27),        # WRITE(10): write protected
    (b"\x43\0\x05", 0x05, 0x24),                                    # READ TOC format 5
    (b"\x4A\0\0\0\x10\0\0\0\x08", 0x05, 0x24),                      # GET EVENT STATUS, not polled
])
def test_atapi_errors_are_check_conditions(rig, cdb, key, asc):
    host = rig.hosts[1]
    host.select(0)
    st, _ = host.packet(cdb)
    assert st & ERR and host.error() >> 4 == key
    assert sense(host) == (key, asc)
    assert sense(host) == (0, 0), "REQUEST SENSE clears it"


def test_atapi_toc_and_mmc_queries(rig):
    host = rig.hosts[1]
    host.select(0)
    st, toc = host.packet(b"\x43\0\0\0\0\0\0\x03\x24")
    assert toc[:4] == bytes((0, 18, 1, 1))
    assert toc[4 + 2] == 1 and toc[12 + 2] == 0xAA and struct.unpack(">I", toc[16:20])[0] == CD_SECTORS
    st, toc = host.packet(b"\x43\x02\0\0\0\0\0\x03\x24")          # MSF
    assert toc[8:12] == bytes((0, 0, 2, 0)), "track 1 at 00:02:00"
    st, toc = host.packet(b"\x43\0\x01\0\0\0\0\0\x0c")             # multi-session
    assert toc[:4] == bytes((0, 10, 1, 1))
    st, conf = host.packet(b"\x46\0\0\0\0\0\0\0\x20")
    assert struct.unpack(">H", conf[6:8])[0] == 0x0008, "current profile: CD-ROM"
    st, ev = host.packet(b"\x4A\x01\0\0\x10\0\0\0\x08")
    assert ev[2] == 4 and ev[4] == 2 and ev[5] & 2, "a new medium, present"
    st, mode = host.packet(b"\x5A\0\x2A\0\0\0\0\0\x40")
    assert not st & ERR and mode[8] == 0x2A
    st, info = host.packet(b"\x51\0\0\0\0\0\0\0\x22")
    assert len(info) == 34 and info[2] == 0x0E
    for cdb in (b"\x00", b"\x1E\0\0\0\x01", b"\x1B\0\0\0\x01", b"\xBB"):
        st, _ = host.packet(cdb)
        assert not st & ERR, cdb.hex()
    st, _ = host.packet(b"\x1B\0\0\0\x02")      # eject while locked
    assert st & ERR and sense(host) == (0x05, 0x53)


def test_atapi_medium_change_is_a_unit_attention(rig, iso_path):
    host = rig.hosts[1]
    host.select(0)
    atapi = rig.controller.drive(2).atapi
    atapi.change_medium(None)
    st, _ = host.packet(b"\x00")
    assert st & ERR and host.error() >> 4 == 0x06
    st, _ = host.packet(b"\x00")
    assert st & ERR and sense(host) == (0x02, 0x3A), "then: no medium"
    atapi.change_medium(rig.drivers[1])
    host.packet(b"\x00")
    st, _ = host.packet(b"\x00")
    assert not st & ERR


def test_atapi_device_reset_and_ata_commands(rig):
    host = rig.hosts[1]
    host.select(0)
    host.out(REG_LBA_MID, 0)
    host.command(0x08)          # DEVICE RESET
    assert (host.inp(REG_LBA_MID), host.inp(REG_LBA_HIGH)) == (0x14, 0xEB)
    host.command(0x20)          # an ATA read: aborted
    assert host.status() & ERR


# --- the PIIX3 on PCI -------------------------------------------------------------------------

class IsaPlatform:
    def __init__(self) -> None:
        self.levels: dict[int, bool] = {}

    def set_irq_level(self, irq: int, level: bool) -> None:
        self.levels[irq] = level


@pytest.fixture
def piix(rig):
    platform = IsaPlatform()
    pio, mmio = Bus("pio"), Bus("mmio")
    pci = PciBus(mmio, pio, platform)
    dev = Piix3(rig.controller, set_isa_irq=platform.set_irq_level)
    assert pci.add(dev) == 1
    return pci, dev, pio, platform


def test_piix3_functions_on_the_bus(piix):
    pci, dev, pio, _ = piix
    assert pci.config_read(0, 1, 0, 0, 4) == 0x70008086
    assert pci.config_read(0, 1, 0, 0x0E, 1) == 0x80, "multi-function"
    assert pci.config_read(0, 1, 0, 0x08, 4) >> 8 == 0x060100
    assert pci.config_read(0, 1, 1, 0, 4) == 0x70108086
    assert pci.config_read(0, 1, 1, 0x08, 4) >> 8 == 0x010180
    assert pci.config_read(0, 1, 1, 0x0E, 1) == 0
    assert pci.config_read(0, 1, 1, 0x41, 1) & 0x80 and pci.config_read(0, 1, 1, 0x43, 1) & 0x80
    for fn in (2, 4, 5, 6, 7):             # 3: the power-management function (tests/test_boot_media.py)
        assert pci.config_read(0, 1, fn, 0, 2) == 0xFFFF
    assert pci.config_read(0, 0, 1, 0, 2) == 0xFFFF, "the host bridge has one function"
    bar4 = pci.config_read(0, 1, 1, 0x20, 4)
    assert bar4 & 1 and bar4 & ~3
    pci.config_write(0, 1, 1, 0x04, 2, 0x5)        # I/O + bus master
    base = bar4 & ~3
    pio.write(base + 4, 4, 0x12345678)
    assert pio.read(base + 4, 4) == 0x12345678 & ~3
    assert dev.controller.bus_master()


def test_pirq_routing_drives_the_isa_irq(piix):
    pci, dev, _, platform = piix
    from kvmpy.devices.pci import PciDevice
    nic = PciDevice(0x1AF4, 0x1000, 0x020000, name="nic")
    slot = pci.add(nic)
    pirq = (slot + 1 - 1) % 4
    pci.set_intx(nic, True)
    assert platform.levels[16 + pirq] and 11 not in platform.levels, "PIRQs start disabled"
    pci.config_write(0, 1, 0, 0x60 + pirq, 1, 11)
    assert platform.levels[11], "routing a line that is up raises its IRQ"
    pci.set_intx(nic, False)
    assert not platform.levels[11] and not platform.levels[16 + pirq]
    pci.set_intx(nic, True)
    pci.config_write(0, 1, 0, 0x60 + pirq, 1, 0x80)
    assert not platform.levels[11], "disabling the route lowers the IRQ"
    dev.reset()
    assert pci.config_read(0, 1, 0, 0x60, 4) == 0x80808080


def test_boot_paths_are_seabios_spelling():
    assert ide_boot_path(0) == "/pci@i0cf8/ide@1,1/drive@0/disk@0"
    assert ide_boot_path(1) == "/pci@i0cf8/ide@1,1/drive@0/disk@1"
    assert ide_boot_path(2) == "/pci@i0cf8/ide@1,1/drive@1/disk@0"
    with pytest.raises(ValueError):
        ide_boot_path(4)


# --- configuration ----------------------------------------------------------------------------

def test_drive_options_and_positions():
    cd = parse_drive("file=/x.iso,media=cdrom")
    assert (cd.interface, cd.media, cd.readonly) == ("ide", "cdrom", True)
    hdb = parse_drive("file=/b.img,if=ide,index=1")
    hda = parse_drive("file=/a.img,if=ide")
    virtio = parse_drive("file=/v.img")
    assert virtio.interface == "virtio"
    cd.index = 2
    assert ide_positions([hda, hdb, cd, virtio]) == {0: hda, 1: hdb, 2: cd}
    assert ide_device_name(2, cd) == "ide1-cd0" and ide_device_name(1, hdb) == "ide0-hd1"
    for spec, message in [("file=/x,if=scsi", "if: must be one of virtio, ide"),
                          ("file=/x,media=cdrom,if=virtio", "CD-ROM is an IDE"),
                          ("file=/x,if=ide,index=4", "index must be 0-3"),
                          ("file=/x,index=one", "index must be a number")]:
        with pytest.raises(ConfigError, match=message):
            parse_drive(spec)


def test_the_pc_attaches_ide_disks(tmp_path, disk_path, iso_path):
    from test_pc_table import Pc
    from kvmpy.pc import pc_devices
    cfg = VmConfig(memory=32 << 20, disks=[DiskConfig(disk_path, format="raw", interface="ide"),
                                           DiskConfig(iso_path, format="raw", interface="ide", media="cdrom",
                                                      readonly=True, index=2)])
    pc = Pc(pc_devices(cfg), cfg)
    try:
        blocks = pc.devices.query("block")
        assert [(b["device"], b["removable"], b["inserted"]["ro"]) for b in blocks] == [
            ("ide0-hd0", False, False), ("ide1-cd0", True, True)]
        assert pc.pio.read(0x1F7, 1) & DRDY
        pc.pio.write(0x176, 1, 0xA0)
        assert (pc.pio.read(0x174, 1), pc.pio.read(0x175, 1)) == (0x14, 0xEB)
        assert pc.pci.config_read(0, 1, 1, 0, 4) == 0x70108086
    finally:
        pc.close()


# --- hostile traffic --------------------------------------------------------------------------

HOSTILE = settings(max_examples=1000 if FUZZ else 75, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

commands = st.sampled_from([0xEC, 0xA1, 0xA0, 0x20, 0x24, 0x29, 0x30, 0x34, 0x39, 0xC4, 0xC5, 0xC6, 0xC8, 0xCA,
                            0x25, 0x35, 0xE7, 0xEA, 0xEF, 0x91, 0x08, 0x90, 0xE5, 0x00, 0x40]) | st.integers(0, 255)
ops = st.one_of(
    st.tuples(st.just("cmd"), st.integers(0, 1), st.integers(1, 7), st.sampled_from([1, 2, 4]),
              st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("cmd"), st.integers(0, 1), st.just(7), st.just(1), commands),
    st.tuples(st.just("data"), st.integers(0, 1), st.just(0), st.sampled_from([1, 2, 4]),
              st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("read"), st.integers(0, 1), st.integers(0, 8), st.sampled_from([1, 2, 4]), st.just(0)),
    st.tuples(st.just("ctl"), st.integers(0, 1), st.just(0), st.just(1), st.integers(0, 255)),
    st.tuples(st.just("bm"), st.just(0), st.integers(0, 15), st.sampled_from([1, 2, 4]),
              st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("prd"), st.just(0), st.integers(0, 7), st.just(8), st.integers(0, (1 << 64) - 1)),
)


def apply(r: Rig, op) -> int | None:
    kind, channel, reg, size, value = op
    c = r.controller
    if kind == "cmd":
        c.write_command(channel, reg, size, value)
    elif kind == "data":
        c.write_command(channel, 0, size, value)
    elif kind == "read":
        return c.read_command(channel, reg % 8, size) if reg < 8 else c.read_control(channel, 0, size)
    elif kind == "ctl":
        c.write_control(channel, 0, size, value)
    elif kind == "bm":
        if reg % 2:
            return c.read_bmdma(reg, size)
        c.write_bmdma(reg, size, value)
    elif kind == "prd":         # the guest's PRD table: entries pointing anywhere
        r.memory.write(TABLE + 8 * reg, value.to_bytes(8, "little"))
    return None


def fresh_rig(disk_path, iso_path) -> Rig:
    return Rig({0: IdeDrive(open_image(disk_path, "raw")), 1: IdeDrive(open_image(iso_path, "raw", read_only=True),
                                                                      media="cdrom"),
                2: IdeDrive(open_image(iso_path, "raw", read_only=True), media="cdrom")})


@HOSTILE
@given(st.lists(ops, max_size=80))
def test_hostile_traffic_never_raises_nor_hangs(disk_path, iso_path, sequence):
    r = fresh_rig(disk_path, iso_path)
    try:
        r.controller.write_bmdma(4, 4, TABLE)
        started = time.monotonic()
        for op in sequence:
            value = apply(r, op)
            assert value is None or 0 <= value < 1 << (8 * op[3])
        assert time.monotonic() - started < 10
        r.controller.state().validate()
        assert all(line.level in (True, False) for line in r.irqs)
    finally:
        r.close()


@HOSTILE
@given(st.lists(ops, max_size=60), st.lists(ops, max_size=30))
def test_state_round_trip(disk_path, iso_path, before, after):
    twin = disk_path + ".twin"          # a writer holds its image's lock: one file each
    shutil.copyfile(disk_path, twin)
    a, b = fresh_rig(disk_path, iso_path), fresh_rig(twin, iso_path)
    try:
        for rig_ in (a, b):
            rig_.controller.write_bmdma(4, 4, TABLE)
        for op in before:
            apply(a, op)
        b.memory.write(0, a.memory.read(0, RAM))
        saved = a.controller.state()
        b.controller.restore(saved)
        assert b.controller.state() == saved
        assert [line.level for line in b.irqs] == [line.level for line in a.irqs]
        for op in after:
            assert apply(a, op) == apply(b, op), op
        assert a.controller.state() == b.controller.state()
    finally:
        a.close()
        b.close()


def test_bad_states_are_refused_and_change_nothing(rig, disk_path):
    before = rig.controller.state()
    channel = before.channels[0]
    drive = channel.drives[0]
    rep = dataclasses.replace
    bad = [
        "not a state",
        IdeControllerState(channels=(channel,)),
        rep(before, channels=(rep(channel, bm_prd=3), before.channels[1])),
        rep(before, channels=(rep(channel, drives=(None, None)), before.channels[1])),
        rep(before, channels=(rep(channel, drives=(rep(drive, lba=DISK_SECTORS, remaining=1), None)),
                              before.channels[1])),
        rep(before, channels=(rep(channel, drives=(rep(drive, pos=5, buffer=b""), None)), before.channels[1])),
        rep(before, channels=(before.channels[0], rep(before.channels[1], drives=(
            rep(before.channels[1].drives[0], atapi=None), None)))),
    ]
    for state in bad:
        with pytest.raises(StateError):
            rig.controller.restore(state)
        assert rig.controller.state() == before


def test_legacy_ports_decode_both_channels(rig):
    ports = IdeLegacyPorts(rig.controller)
    ports.write(REG_DEVICE, 1, 0xA0)
    assert ports.read(7, 1) & DRDY                      # 0x1F7
    ports.write(0x170 - 0x1F0 + REG_DEVICE, 1, 0xA0)
    assert ports.read(0x170 - 0x1F0 + REG_LBA_HIGH, 1) == 0xEB
    assert ports.read(0x3F6 - 0x1F0, 1) & DRDY
    assert ports.read(0x100, 1) == 0xFF


def test_a_medium_change_abandons_the_read_in_flight(rig, iso_path):
    host = rig.hosts[1]
    host.select(0)
    host.out(REG_LBA_MID, 0x00)
    host.out(REG_LBA_HIGH, 0x08)            # 2048 bytes per DRQ
    host.command(0xA0)
    host.write_pio(struct.pack(">BBIBH3x", 0x28, 0, 0, 0, 4))
    assert host.status() & DRQ
    old = rig.controller.change_medium(2, None)
    assert old is rig.drivers[1]
    st = host.status()
    assert st & ERR and not st & DRQ, "the read of the old disc ended"
    new = open_image(iso_path, "raw", read_only=True)
    rig.drivers.append(new)
    assert rig.controller.change_medium(2, new) is None
    st, _ = host.packet(b"\x00")
    assert st & ERR and sense(host) == (0x06, 0x28)
    st, data = host.packet(struct.pack(">BBIBH3x", 0x28, 0, 5, 0, 1))
    assert data == cd_pattern(5)
    with pytest.raises(ValueError):
        rig.controller.change_medium(0, None)


def test_monitor_eject_and_change(tmp_path, disk_path, iso_path):
    """The real machine (not started) behind HMP and QMP: eject, change, query-block."""
    from conftest import guest_path
    from kvmpy.machine import Machine
    from kvmpy.monitor.hmp import Hmp
    other = tmp_path / "other.iso"
    other.write_bytes(cd_pattern(0) * 3)
    cfg = VmConfig(kernel=guest_path("hello"), memory=32 << 20,
                   disks=[DiskConfig(disk_path, format="raw", interface="ide"),
                          DiskConfig(iso_path, format="raw", interface="ide", media="cdrom", readonly=True, index=2)])
    m = Machine(cfg, accel="tcg")
    try:
        hmp = Hmp(m)
        assert hmp.execute("eject ide0-hd0") == "Error: Device 'ide0-hd0' is not removable\n"
        assert hmp.execute("eject ide9-cd0") == "Error: Device 'ide9-cd0' not found\n"
        m.pio_bus.write(0x176, 1, 0xA0)
        host = AtaHost(m.devices.get("ide", IdeLegacyPorts).controller, 1)
        host.packet(b"\x1E\0\0\0\x01")                 # the guest locks the tray
        assert "is locked and force was not specified" in hmp.execute("eject ide1-cd0")
        assert hmp.execute("eject -f ide1-cd0") == ""
        cd = [b for b in m.block_devices() if b["device"] == "ide1-cd0"][0]
        assert "inserted" not in cd and cd["tray_open"]
        assert "ide1-cd0: [not inserted]" in hmp.execute("info block")
        st, _ = host.packet(b"\x00")
        assert st & ERR and host.error() >> 4 == 0x06          # unit attention first
        st, _ = host.packet(b"\x00")
        assert st & ERR and sense(host) == (0x02, 0x3A)         # then: no medium
        assert "Could not open" in hmp.execute(f"change ide1-cd0 {tmp_path / 'missing.iso'}")
        assert hmp.execute(f"change ide1-cd0 {other} raw") == ""
        cd = [b for b in m.block_devices() if b["device"] == "ide1-cd0"][0]
        assert cd["inserted"]["file"] == str(other) and cd["inserted"]["image"]["virtual-size"] == 3 * CD_SECTOR
        host.packet(b"\x00")
        st, data = host.packet(b"\x25")
        assert struct.unpack(">II", data) == (2, CD_SECTOR)
    finally:
        m.close()


@HOSTILE
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 0xFF), st.sampled_from([1, 2, 4]),
                          st.integers(0, 0xFFFFFFFF)), max_size=30), st.lists(ops, max_size=30))
def test_piix3_state_round_trip(disk_path, iso_path, config_writes, traffic):
    """The PIIX3's whole state (both functions' config space, the controller) as a
    value: a fresh PIIX3 restored from it hands out the same state and drives its
    PIRQ-routed ISA IRQs the same."""
    twin = disk_path + ".twin"          # a writer holds its image's lock: one file each
    shutil.copyfile(disk_path, twin)
    rigs = [fresh_rig(disk_path, iso_path), fresh_rig(twin, iso_path)]
    platforms = [IsaPlatform(), IsaPlatform()]
    try:
        buses, piixes, nics = [], [], []
        from kvmpy.devices.pci import PciDevice
        for r, platform in zip(rigs, platforms):
            bus = PciBus(Bus("mmio"), Bus("pio"), platform)
            dev = Piix3(r.controller, set_isa_irq=platform.set_irq_level)
            bus.add(dev)
            nic = PciDevice(0x1AF4, 0x1000, 0x020000, name="nic")
            bus.add(nic)
            buses.append(bus), piixes.append(dev), nics.append(nic)
        bus, dev, nic = buses[0], piixes[0], nics[0]
        bus.set_intx(nic, True)
        for fn, offset, size, value in config_writes:
            if offset + size <= 0x100:
                bus.config_write(0, 1, fn, offset & ~(size - 1), size, value)
        for op in traffic:
            apply(rigs[0], op)
        saved = dev.state()
        buses[1].set_intx(nics[1], True)
        piixes[1].restore(saved)
        assert piixes[1].state() == saved
        def isa_irqs_up(platform: IsaPlatform) -> set[int]:
            return {irq for irq, level in platform.levels.items() if level and irq < 16}
        assert isa_irqs_up(platforms[1]) == isa_irqs_up(platforms[0])
        with pytest.raises(StateError):
            piixes[1].restore(dataclasses.replace(saved, bridge=saved.ide))    # the IDE's config as the bridge's
        assert piixes[1].state() == saved
    finally:
        for r in rigs:
            r.close()


def test_toml_disks_on_ide():
    from kvmpy.config import config_from_dict
    cfg = config_from_dict({"kernel": "k", "disk": [{"path": "/a.img", "interface": "ide", "index": 1},
                                                    {"path": "/c.iso", "media": "cdrom"}]}, "vm.toml")
    positions = ide_positions(cfg.disks)
    assert positions[1] is cfg.disks[0] and positions[0] is cfg.disks[1] and list(positions) == [0, 1]
    for disk, message in [({"path": "/a.img", "interface": "ide", "index": 5}, "index must be 0-3"),
                          ({"path": "/a.img", "interface": "ide", "index": "1"}, "key 'index': expected"),
                          ({"path": "/a.img", "index": 1}, "index must be 0-3 on an IDE disk")]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"kernel": "k", "disk": [disk]}, "vm.toml")
    with pytest.raises(ConfigError, match="two IDE disks at index 1"):
        config_from_dict({"kernel": "k", "disk": [{"path": "/a", "interface": "ide", "index": 1},
                                                  {"path": "/b", "interface": "ide", "index": 1}]}, "vm.toml")


def test_the_guest_ejects_and_loads(rig):
    host = rig.hosts[1]
    host.select(0)
    atapi = rig.controller.drive(2).atapi
    st, _ = host.packet(b"\x1B\0\0\0\x02")              # START STOP UNIT: eject
    assert not st & ERR and atapi.tray_open
    st, _ = host.packet(b"\x00")
    assert st & ERR
    st, data = host.packet(b"\x03\0\0\0\x12")
    assert (data[2], data[12], data[13]) == (0x02, 0x3A, 0x02), "not ready: medium not present, tray open"
    st, ev = host.packet(b"\x4A\x01\0\0\x10\0\0\0\x08")
    assert ev[4] == 3 and ev[5] == 3, "media removal; a disc in the open tray"
    st, _ = host.packet(b"\x1B\0\0\0\x03")              # load
    st, _ = host.packet(b"\x00")
    assert not st & ERR and not atapi.tray_open


def test_a_cdrom_image_may_be_qcow2(tmp_path, iso_path):
    import subprocess
    from conftest import tool_required
    qemu_img = tool_required("qemu-img")
    qcow2 = tmp_path / "cd.qcow2"
    subprocess.run([qemu_img, "convert", "-q", "-f", "raw", "-O", "qcow2", iso_path, str(qcow2)], check=True)
    r = Rig({2: IdeDrive(open_image(str(qcow2), read_only=True), media="cdrom")})
    try:
        host = r.hosts[1]
        host.select(0)
        st, data = host.packet(b"\x25")
        assert struct.unpack(">II", data) == (CD_SECTORS - 1, CD_SECTOR)
        st, data = host.packet(struct.pack(">BBIBH3x", 0x28, 0, 11, 0, 2))
        assert data == cd_pattern(11) + cd_pattern(12)
    finally:
        r.close()
