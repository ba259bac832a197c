"""A host-side ATA/ATAPI driver for the IDE controller model, as Linux's libata
(ata_sff) and SeaBIOS drive it: task-file writes, the command, then the status
register and data port, or a PRD table and the bus-master engine. Tests use it to
drive kvmpy.devices.ide without a guest."""

from __future__ import annotations

import struct

from kvmpy.devices.ide import (BM_CMD_START, BM_CMD_TO_MEMORY, DRQ, ERR, IdeController, REG_COMMAND, REG_DATA,
                               REG_DEVICE, REG_ERROR, REG_FEATURE, REG_LBA_HIGH, REG_LBA_LOW, REG_LBA_MID,
                               REG_NSECTOR, REG_STATUS)

PRD_EOT = 0x8000


class IrqLine:
    """An interrupt line as the PIC sees it: its level and how often it rose."""

    def __init__(self) -> None:
        self.level = False
        self.raised = 0

    def __call__(self, level: bool) -> None:
        if level and not self.level:
            self.raised += 1
        self.level = level


class AtaHost:
    def __init__(self, controller: IdeController, channel: int = 0) -> None:
        self.c = controller
        self.channel = channel

    # registers -----------------------------------------------------------------------
    def out(self, reg: int, value: int, size: int = 1) -> None:
        self.c.write_command(self.channel, reg, size, value)

    def inp(self, reg: int, size: int = 1) -> int:
        return self.c.read_command(self.channel, reg, size)

    def status(self) -> int:
        return self.inp(REG_STATUS)

    def error(self) -> int:
        return self.inp(REG_ERROR)

    def select(self, unit: int, lba_mode: bool = True, head: int = 0) -> None:
        self.out(REG_DEVICE, 0xA0 | (0x40 if lba_mode else 0) | unit << 4 | head)

    def taskfile(self, lba: int, count: int, lba48: bool = False, feature: int = 0) -> None:
        if lba48:       # the high bytes first: the device keeps them as the "previous" values
            self.out(REG_FEATURE, 0)
            self.out(REG_NSECTOR, count >> 8 & 0xFF)
            self.out(REG_LBA_LOW, lba >> 24 & 0xFF)
            self.out(REG_LBA_MID, lba >> 32 & 0xFF)
            self.out(REG_LBA_HIGH, lba >> 40 & 0xFF)
        self.out(REG_FEATURE, feature)
        self.out(REG_NSECTOR, count & 0xFF)
        self.out(REG_LBA_LOW, lba & 0xFF)
        self.out(REG_LBA_MID, lba >> 8 & 0xFF)
        self.out(REG_LBA_HIGH, lba >> 16 & 0xFF)

    def command(self, cmd: int) -> None:
        self.out(REG_COMMAND, cmd)

    # PIO -----------------------------------------------------------------------------
    def read_pio(self, nbytes: int, size: int = 2) -> bytes:
        return b"".join(self.inp(REG_DATA, size).to_bytes(size, "little") for _ in range(nbytes // size))

    def write_pio(self, data: bytes, size: int = 2) -> None:
        for i in range(0, len(data), size):
            self.out(REG_DATA, int.from_bytes(data[i:i + size], "little"), size)

    def pio_in(self, blocks: int, block_bytes: int = 512) -> bytes:
        """Read ``blocks`` DRQ blocks; stops early (and returns what it got) on an error."""
        out = b""
        for _ in range(blocks):
            st = self.status()
            if st & ERR or not st & DRQ:
                break
            out += self.read_pio(block_bytes, 4)
        return out

    # ATAPI ---------------------------------------------------------------------------
    def packet(self, cdb: bytes, byte_limit: int = 0xFFFE, dma: bool = False) -> tuple[int, bytes]:
        """Send one packet command by PIO; returns (final status, the data read)."""
        self.out(REG_FEATURE, 1 if dma else 0)
        self.out(REG_LBA_MID, byte_limit & 0xFF)
        self.out(REG_LBA_HIGH, byte_limit >> 8 & 0xFF)
        self.command(0xA0)
        st = self.status()
        if not st & DRQ:
            return st, b""
        self.write_pio(cdb.ljust(12, b"\0"))
        data = b""
        for _ in range(100000):
            st = self.status()
            if not st & DRQ or dma:
                return st, data
            n = self.inp(REG_LBA_MID) | self.inp(REG_LBA_HIGH) << 8
            data += self.read_pio(n)
        raise AssertionError("the device never finished the packet command")

    # bus-master DMA ------------------------------------------------------------------
    def bm(self, reg: int, value: int | None = None, size: int = 1) -> int:
        offset = 8 * self.channel + reg
        if value is None:
            return self.c.read_bmdma(offset, size)
        self.c.write_bmdma(offset, size, value)
        return 0

    def setup_dma(self, memory, table: int, segments: list[tuple[int, int]], to_memory: bool,
                  eot: bool = True) -> None:
        for i, (addr, length) in enumerate(segments):
            flags = PRD_EOT if eot and i == len(segments) - 1 else 0
            memory.write(table + 8 * i, struct.pack("<IHH", addr, length & 0xFFFF, flags))
        self.bm(4, table, 4)
        self.bm(2, 0x06)                    # clear error and interrupt
        self.bm(0, BM_CMD_TO_MEMORY if to_memory else 0)

    def start_dma(self, to_memory: bool) -> None:
        self.bm(0, BM_CMD_START | (BM_CMD_TO_MEMORY if to_memory else 0))

    def stop_dma(self) -> None:
        self.bm(0, 0)
