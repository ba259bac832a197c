"""Address-range buses for port I/O and MMIO exits.

A device is any object with ``read(offset, size) -> int`` and
``write(offset, size, value)``; offsets are relative to the range the device
was registered at. Devices never see the vCPU or KVM. Unclaimed reads return
all ones (as on real hardware: a floating bus) and unclaimed writes are dropped.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from typing import Protocol

log = logging.getLogger(__name__)


class Device(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class BusError(Exception):
    pass


class Bus:
    def __init__(self, name: str) -> None:
        self.name = name
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, Device]] = []  # (base, end, device), sorted
        self._unclaimed_logged: set[int] = set()

    def register(self, base: int, length: int, device: Device) -> None:
        end = base + length
        if length <= 0:
            raise BusError(f"{self.name}: empty range at {base:#x}")
        for b, e, d in self._entries:
            if base < e and b < end:
                raise BusError(f"{self.name}: {base:#x}-{end - 1:#x} overlaps {b:#x}-{e - 1:#x} ({d!r})")
        self._entries.append((base, end, device))
        self._entries.sort(key=lambda t: t[0])
        self._starts = [t[0] for t in self._entries]

    def unregister(self, base: int) -> None:
        self._entries = [t for t in self._entries if t[0] != base]
        self._starts = [t[0] for t in self._entries]

    def find(self, addr: int) -> tuple[int, Device] | None:
        i = bisect_right(self._starts, addr) - 1
        if i >= 0:
            base, end, dev = self._entries[i]
            if addr < end:
                return base, dev
        return None

    def read(self, addr: int, size: int) -> int:
        hit = self.find(addr)
        if hit is None:
            self._note_unclaimed(addr, "read")
            return (1 << (8 * size)) - 1
        base, dev = hit
        return dev.read(addr - base, size)

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self.find(addr)
        if hit is None:
            self._note_unclaimed(addr, "write")
            return
        base, dev = hit
        dev.write(addr - base, size, value)

    def _note_unclaimed(self, addr: int, what: str) -> None:
        if addr not in self._unclaimed_logged and len(self._unclaimed_logged) < 256:
            self._unclaimed_logged.add(addr)
            log.debug("%s: unclaimed %s at %#x", self.name, what, addr)
