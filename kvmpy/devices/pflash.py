"""A parallel NOR flash with Intel's command set (CFI 0x0001), the part QEMU's
``-drive if=pflash`` gives OVMF for its variable store (QEMU hw/block/pflash_cfi01.c,
one byte wide, 4 KiB erase blocks).

The guest reads the array until it writes a command; OVMF's flash driver
(OvmfPkg/QemuFlashFvbServicesRuntimeDxe) uses these: 0x50 clear status, 0x70 read
status (it tells flash from RAM and ROM by reading 0x00 back after the two), 0x10 or
0x40 then one data write to program, 0x20 then 0xD0 to erase a block, 0xFF back to
reading the array. Reading ID and CFI query data is answered with a JEDEC-less
device (zeros), as nothing here asks for it.

Persistence: the image lives in a host file. A programmed or erased range is written
to the file at once, and the file is made durable (fdatasync) when the guest returns
the part to reading the array, which OVMF does after every variable update; a host
write error is a logged device error and the status register's error bits, never an
exception in the vCPU thread.

Snapshots: QEMU snapshots the variable store as one of the VM's block devices, so a
loadvm brings back the variables of its savevm. Here the state carries the array's
contents, and ``restore`` writes them back to the host file (durably), so whatever
gathers the machine's device states brings the variables back with them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .saved_state import Restorable, StateCheck, checked

log = logging.getLogger(__name__)

BLOCK_SIZE = 0x1000

CMD_READ_ARRAY = 0xFF
CMD_READ_ARRAY_ALT = 0x00
CMD_PROGRAM = 0x10
CMD_PROGRAM_ALT = 0x40
CMD_ERASE = 0x20
CMD_ERASE_CONFIRM = 0xD0
CMD_CLEAR_STATUS = 0x50
CMD_READ_STATUS = 0x70
CMD_READ_ID = 0x90
CMD_CFI_QUERY = 0x98

STATUS_READY = 0x80
STATUS_ERASE_ERROR = 0x20
STATUS_PROGRAM_ERROR = 0x10
STATUS_BITS = STATUS_READY | STATUS_ERASE_ERROR | STATUS_PROGRAM_ERROR

# What a read returns: the array, the status register, or the (empty) ID/query data.
MODE_ARRAY = 0
MODE_STATUS = 1
MODE_ID = 2
# What the next write is: a command, a byte to program, or an erase's confirmation.
NEXT_COMMAND = 0
NEXT_PROGRAM_DATA = 1
NEXT_ERASE_CONFIRM = 2


@dataclass(frozen=True)
class PflashState:
    mode: int
    next_write: int
    status: int
    erase_block: int        # the block a pending 0x20 named (its confirmation erases it)
    # The array as the guest reads it: the variables themselves (a snapshot without
    # them would pair a restored machine with the variables of a later run).
    contents: bytes

    def validate(self) -> None:
        check = StateCheck(self)
        check.integer("mode", self.mode, MODE_ARRAY, MODE_ID)
        check.integer("next_write", self.next_write, NEXT_COMMAND, NEXT_ERASE_CONFIRM)
        check.bits("status", self.status, STATUS_BITS)
        check.integer("erase_block", self.erase_block, 0, (1 << 32) - 1)
        check.data("contents", self.contents)


class Pflash(Restorable):
    """The flash over ``fd`` (opened read-write by the caller, which keeps owning the
    path's lock): ``size`` bytes, a multiple of BLOCK_SIZE, read into memory once."""

    def __init__(self, fd: int, size: int, name: str = "pflash") -> None:
        if size <= 0 or size % BLOCK_SIZE:
            raise ValueError(f"{name}: size {size:#x} is not a multiple of {BLOCK_SIZE:#x}")
        self.name = name
        self.fd = fd
        self.size = size
        self.data = bytearray(os.pread(fd, size, 0).ljust(size, b"\xff"))
        self.mode = MODE_ARRAY
        self.next_write = NEXT_COMMAND
        self.status = STATUS_READY
        self.erase_block = 0
        self._unsynced = False

    # --- the guest's side ------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > self.size:
            return (1 << (8 * size)) - 1
        if self.mode == MODE_STATUS:
            return int.from_bytes(bytes((self.status,)) * size, "little")
        if self.mode == MODE_ID:
            return 0
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > self.size:
            log.warning("%s: write of %d bytes at %#x is outside the flash", self.name, size, offset)
            return
        if self.next_write == NEXT_PROGRAM_DATA:
            self.next_write = NEXT_COMMAND
            self._program(offset, value.to_bytes(size, "little"))
            return
        command = value & 0xFF
        if self.next_write == NEXT_ERASE_CONFIRM:
            self.next_write = NEXT_COMMAND
            if command == CMD_ERASE_CONFIRM:
                self._erase(self.erase_block)
            else:
                # An erase set up and not confirmed: the part reports a command sequence error.
                log.warning("%s: erase at block %#x not confirmed (%#x)", self.name, self.erase_block, command)
                self.status |= STATUS_ERASE_ERROR | STATUS_PROGRAM_ERROR
                self.mode = MODE_STATUS
            return
        if command in (CMD_READ_ARRAY, CMD_READ_ARRAY_ALT):
            self.mode = MODE_ARRAY
            self._sync()
        elif command in (CMD_PROGRAM, CMD_PROGRAM_ALT):
            self.next_write = NEXT_PROGRAM_DATA
            self.mode = MODE_STATUS
        elif command == CMD_ERASE:
            self.next_write = NEXT_ERASE_CONFIRM
            self.erase_block = offset // BLOCK_SIZE
            self.mode = MODE_STATUS
        elif command == CMD_CLEAR_STATUS:
            # QEMU's part clears the register and goes back to the array.
            self.status = 0
            self.mode = MODE_ARRAY
        elif command == CMD_READ_STATUS:
            self.mode = MODE_STATUS
        elif command in (CMD_READ_ID, CMD_CFI_QUERY):
            self.mode = MODE_ID
        else:
            log.warning("%s: unknown command %#x at %#x; reading the array", self.name, command, offset)
            self.mode = MODE_ARRAY

    # --- the host file -----------------------------------------------------------------
    def _program(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data
        self.mode = MODE_STATUS
        if not self._store(offset, data):
            self.status |= STATUS_PROGRAM_ERROR
        self.status |= STATUS_READY

    def _erase(self, block: int) -> None:
        offset = block * BLOCK_SIZE
        self.mode = MODE_STATUS
        blank = b"\xff" * BLOCK_SIZE
        self.data[offset:offset + BLOCK_SIZE] = blank
        if not self._store(offset, blank):
            self.status |= STATUS_ERASE_ERROR
        self.status |= STATUS_READY

    def _store(self, offset: int, data: bytes) -> bool:
        try:
            written = os.pwrite(self.fd, data, offset)
        except OSError as e:
            log.error("%s: writing %d bytes at %#x: %s", self.name, len(data), offset, e.strerror or e)
            return False
        if written != len(data):
            log.error("%s: short write at %#x (%d of %d bytes)", self.name, offset, written, len(data))
            return False
        self._unsynced = True
        return True

    def _sync(self) -> None:
        if not self._unsynced:
            return
        self._unsynced = False
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            log.error("%s: fdatasync: %s", self.name, e.strerror or e)

    def flush(self) -> None:
        """Make every write so far durable (the machine calls it as it closes)."""
        self._sync()

    # --- machine ---------------------------------------------------------------------------
    def reset(self) -> None:
        self._sync()
        self.mode = MODE_ARRAY
        self.next_write = NEXT_COMMAND
        self.status = STATUS_READY

    def close(self) -> None:
        self._sync()

    def state(self) -> PflashState:
        return PflashState(mode=self.mode, next_write=self.next_write, status=self.status,
                           erase_block=self.erase_block, contents=bytes(self.data))

    def restore(self, state: PflashState) -> None:
        """The state's registers and array; the blocks that differ are written to the
        host file and made durable before this returns. OSError if the file refuses
        them (the blocks written so far are both in the file and in the array)."""
        state = checked(state, PflashState)
        check = StateCheck(state)
        if state.erase_block * BLOCK_SIZE >= self.size:
            raise check.fail("erase_block", f"{state.erase_block:#x} is past the flash's end")
        if len(state.contents) != self.size:
            raise check.fail("contents", f"{len(state.contents)} bytes, the flash has {self.size}")
        self._write_back(state.contents)
        self.mode, self.next_write, self.status = state.mode, state.next_write, state.status
        self.erase_block = state.erase_block

    def _write_back(self, contents: bytes) -> None:
        for offset in range(0, self.size, BLOCK_SIZE):
            block = contents[offset:offset + BLOCK_SIZE]
            if self.data[offset:offset + BLOCK_SIZE] == block:
                continue
            written = os.pwrite(self.fd, block, offset)
            if written != len(block):
                raise OSError(f"{self.name}: short write at {offset:#x} ({written} of {len(block)} bytes)")
            self.data[offset:offset + BLOCK_SIZE] = block
            self._unsynced = True
        if self._unsynced:
            os.fdatasync(self.fd)
            self._unsynced = False
