"""MSI-X: capability, vector table and pending-bit array, each vector an eventfd.

Every vector owns a Platform MSI eventfd (an irqfd under KVM), created when the
guest first enables MSI-X and re-aimed whenever it rewrites that table entry, so
an I/O thread raises an interrupt with one eventfd write. Masked vectors (entry
mask or function mask) latch a pending bit instead and fire on unmask, as the
PCI spec requires. ``notify`` may be called from any thread.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from dataclasses import dataclass
from typing import Callable

from ..saved_state import Restorable, StateCheck, checked
from .device import CAP_ID_MSIX, PciDevice

log = logging.getLogger(__name__)

ENTRY_SIZE = 16
CTRL_ENABLE = 1 << 15
CTRL_FUNCTION_MASK = 1 << 14
VECTOR_MASKED = 1
NO_VECTOR = 0xFFFF

_ENTRY = struct.Struct("<IIII")


@dataclass(frozen=True)
class MsixState:
    """The vector table and pending bits (see kvmpy/devices/saved_state.py); the
    enable and function-mask bits are in config space (PciConfigState)."""

    table: bytes
    pending_bits: bytes     # the PBA as the guest reads it

    def validate(self) -> None:
        check = StateCheck(self)
        check.data("table", self.table)
        check.data("pending_bits", self.pending_bits)


class MsixCapability(Restorable):
    def __init__(self, dev: PciDevice, platform, num_vectors: int, bar: int,
                 table_offset: int, pba_offset: int) -> None:
        if not 1 <= num_vectors <= 2048:
            raise ValueError("MSI-X supports 1..2048 vectors")
        if table_offset % 8 or pba_offset % 8:
            raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
        self.dev = dev
        self.platform = platform
        self.num_vectors = num_vectors
        self.bar = bar
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        self.table = bytearray(ENTRY_SIZE * num_vectors)
        for v in range(num_vectors):
            self.table[ENTRY_SIZE * v + 12] = VECTOR_MASKED
        self.pending = [False] * num_vectors
        self.fds: list[int | None] = [None] * num_vectors
        self.lock = threading.Lock()
        # Called (without the lock) after the guest changed the control word or the
        # table: whoever raises vectors behind the capability's back (a native data
        # plane writing a vector's eventfd) looks again at what it may do.
        self.on_change: Callable[[], None] | None = None
        body = struct.pack("<HII", num_vectors - 1, table_offset | bar, pba_offset | bar)
        writable = struct.pack("<HII", CTRL_ENABLE | CTRL_FUNCTION_MASK, 0, 0)
        self.cap_offset = dev.add_capability(CAP_ID_MSIX, body, writable, self._config_written)

    @property
    def table_size(self) -> int:
        return ENTRY_SIZE * self.num_vectors

    @property
    def pba_size(self) -> int:
        return 8 * ((self.num_vectors + 63) // 64)

    def _control(self) -> int:
        return self.dev.get16(self.cap_offset + 2)

    @property
    def enabled(self) -> bool:
        return bool(self._control() & CTRL_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self._control() & CTRL_FUNCTION_MASK)

    def _entry(self, v: int) -> tuple[int, int, bool]:
        lo, hi, data, ctrl = _ENTRY.unpack_from(self.table, ENTRY_SIZE * v)
        return (hi << 32) | lo, data, bool(ctrl & VECTOR_MASKED)

    def _masked(self, v: int) -> bool:
        return self.function_masked or self._entry(v)[2]

    # guest config writes (vCPU thread) ------------------------------------

    def _config_written(self, offset: int, size: int) -> None:
        with self.lock:
            if self.enabled:
                self._ensure_fds()
            self._deliver_unmasked_pending()
        if self.on_change is not None:
            self.on_change()

    def _ensure_fds(self) -> None:
        for v in range(self.num_vectors):
            if self.fds[v] is None:
                addr, data, _ = self._entry(v)
                self.fds[v] = self.platform.msi_eventfd(addr, data)

    def _deliver_unmasked_pending(self) -> None:
        if not self.enabled:
            return
        for v in range(self.num_vectors):
            if self.pending[v] and not self._masked(v):
                self.pending[v] = False
                self._fire(v)

    def _fire(self, v: int) -> None:
        fd = self.fds[v]
        if fd is None:
            return
        try:
            os.eventfd_write(fd, 1)
        except OSError as e:
            log.error("%s: MSI-X vector %d eventfd: %s", self.dev.name, v, e)

    # table and PBA in the BAR ---------------------------------------------

    def covers(self, offset: int) -> bool:
        return (self.table_offset <= offset < self.table_offset + self.table_size
                or self.pba_offset <= offset < self.pba_offset + self.pba_size)

    def read(self, offset: int, size: int) -> int:
        with self.lock:
            if self.table_offset <= offset and offset + size <= self.table_offset + self.table_size:
                o = offset - self.table_offset
                return int.from_bytes(self.table[o:o + size], "little")
            if self.pba_offset <= offset and offset + size <= self.pba_offset + self.pba_size:
                pba = self._pba()
                o = offset - self.pba_offset
                return int.from_bytes(pba[o:o + size], "little")
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if not (self.table_offset <= offset and offset + size <= self.table_offset + self.table_size):
            return  # PBA is read-only; stray writes are dropped
        if size not in (4, 8) or offset % size:
            log.debug("%s: MSI-X table access size %d at %#x ignored", self.dev.name, size, offset)
            return
        o = offset - self.table_offset
        with self.lock:
            self.table[o:o + size] = value.to_bytes(size, "little")
            v = o // ENTRY_SIZE
            if self.fds[v] is not None and (o % ENTRY_SIZE < 12 or size == 8 and o % ENTRY_SIZE == 8):
                addr, data, _ = self._entry(v)
                self.platform.update_msi_eventfd(self.fds[v], addr, data)
            self._deliver_unmasked_pending()
        if self.on_change is not None:
            self.on_change()

    # saved state ------------------------------------------------------------

    def _pba(self) -> bytes:
        bits = sum(1 << v for v in range(self.num_vectors) if self.pending[v])
        return bits.to_bytes(self.pba_size, "little")

    def state(self) -> MsixState:
        with self.lock:
            return MsixState(table=bytes(self.table), pending_bits=self._pba())

    def restore(self, state: MsixState) -> None:
        """Take over ``state`` (StateError and no change if it does not fit this
        capability), after the function's config space (PciDevice.restore): vectors
        are aimed at the restored table, and if MSI-X is enabled every vector gets
        its eventfd as on the guest's own enable."""
        state = checked(state, MsixState)
        check = StateCheck(state)
        if len(state.table) != self.table_size:
            raise check.fail("table", f"{len(state.table)} bytes for {self.num_vectors} vectors")
        if len(state.pending_bits) != self.pba_size:
            raise check.fail("pending_bits", f"{len(state.pending_bits)} bytes for "
                             f"{self.num_vectors} vectors")
        pending = int.from_bytes(state.pending_bits, "little")
        if pending >> self.num_vectors:
            raise check.fail("pending_bits", f"bits set beyond vector {self.num_vectors - 1}")
        with self.lock:
            self.table[:] = state.table
            self.pending = [bool(pending >> v & 1) for v in range(self.num_vectors)]
            for v, fd in enumerate(self.fds):
                if fd is not None:
                    addr, data, _ = self._entry(v)
                    self.platform.update_msi_eventfd(fd, addr, data)
            if self.enabled:
                self._ensure_fds()
            self._deliver_unmasked_pending()

    # device side (any thread) ---------------------------------------------

    def notify(self, vector: int) -> bool:
        """Raise ``vector``; returns False if MSI-X is off or the vector invalid."""
        if not 0 <= vector < self.num_vectors:
            return False
        with self.lock:
            if not self.enabled:
                return False
            if self._masked(vector):
                self.pending[vector] = True
            else:
                self._fire(vector)
        return True

    def unmasked_fd(self, vector: int) -> int | None:
        """The eventfd that raises ``vector`` when MSI-X is on and the vector is
        unmasked: a write to it is then exactly ``notify(vector)``. None otherwise."""
        if not 0 <= vector < self.num_vectors:
            return None
        with self.lock:
            if not self.enabled or self._masked(vector):
                return None
            return self.fds[vector]

    def reset(self) -> None:
        """Device reset: table masked, MSI-X disabled; eventfds are kept for reuse."""
        with self.lock:
            self.table[:] = bytes(len(self.table))
            for v in range(self.num_vectors):
                self.table[ENTRY_SIZE * v + 12] = VECTOR_MASKED
            self.pending = [False] * self.num_vectors
            ctrl = self.cap_offset + 2
            self.dev._set16(ctrl, self.dev.get16(ctrl) & ~(CTRL_ENABLE | CTRL_FUNCTION_MASK))

    def close(self) -> None:
        with self.lock:
            for v, fd in enumerate(self.fds):
                if fd is not None:
                    self.platform.release_msi_eventfd(fd)
                    self.fds[v] = None
