"""A minimal driver side of a split virtqueue, written the way a guest driver would.

Used by the device tests and the benchmark to act as the guest: it lays out the
rings in guest RAM, publishes chains in the avail ring and collects used entries.
It is deliberately independent of queue.py (different code path, plain
GuestMemory accessors) so tests compare two implementations of the layout.
"""

from __future__ import annotations

from .queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE


def ring_bytes(size: int) -> int:
    """Bytes needed for desc table + avail + used rings of ``size`` entries, each 4 KiB aligned."""
    def up(n):
        return (n + 4095) & ~4095
    return up(16 * size) + up(6 + 2 * size) + up(6 + 8 * size)


class DriverQueue:
    def __init__(self, memory, base: int, size: int, event_idx: bool = False) -> None:
        self.memory = memory
        self.size = size
        self.desc_addr = base
        self.avail_addr = base + ((16 * size + 4095) & ~4095)
        self.used_addr = self.avail_addr + ((6 + 2 * size + 4095) & ~4095)
        self.event_idx = event_idx
        memory.view(base, ring_bytes(size))[:] = bytes(ring_bytes(size))
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.chains: dict[int, list[int]] = {}  # head -> descriptor indices to free

    def _write_desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        d = table + 16 * i
        self.memory.write_u64(d, addr)
        self.memory.write_u32(d + 8, length)
        self.memory.write_u16(d + 12, flags)
        self.memory.write_u16(d + 14, nxt)

    def add(self, readable: list[tuple[int, int]], writable: list[tuple[int, int]],
            indirect_at: int | None = None, publish: bool = True) -> int:
        """Make a chain available; ``indirect_at`` puts its descriptors in an indirect
        table at that guest address. Returns the head index."""
        segs = [(a, n, 0) for a, n in readable] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in writable]
        if indirect_at is not None:
            for i, (a, n, f) in enumerate(segs):
                last = i == len(segs) - 1
                self._write_desc(indirect_at, i, a, n, f | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else i + 1)
            head = self.free.pop(0)
            self._write_desc(self.desc_addr, head, indirect_at, 16 * len(segs), VIRTQ_DESC_F_INDIRECT, 0)
            self.chains[head] = [head]
        else:
            if len(segs) > len(self.free):
                raise RuntimeError("queue full")
            idx = [self.free.pop(0) for _ in segs]
            for j, (a, n, f) in enumerate(segs):
                last = j == len(segs) - 1
                self._write_desc(self.desc_addr, idx[j], a, n, f | (0 if last else VIRTQ_DESC_F_NEXT),
                                 0 if last else idx[j + 1])
            head = idx[0]
            self.chains[head] = idx
        if publish:
            self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.memory.write_u16(self.avail_addr + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail_addr + 2, self.avail_idx)

    def used_idx(self) -> int:
        return self.memory.read_u16(self.used_addr + 2)

    def collect(self) -> list[tuple[int, int]]:
        """Used entries (head, length) since the last call; frees their descriptors."""
        out = []
        while self.last_used != self.used_idx():
            slot = self.used_addr + 4 + 8 * (self.last_used % self.size)
            head, length = self.memory.read_u32(slot), self.memory.read_u32(slot + 4)
            self.free.extend(self.chains.pop(head, []))
            out.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            self.memory.write_u16(self.avail_addr + 4 + 2 * self.size, self.last_used)
        return out

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail_addr + 4 + 2 * self.size, value & 0xFFFF)

    def set_no_interrupt(self, on: bool) -> None:
        self.memory.write_u16(self.avail_addr, 1 if on else 0)

    def avail_event(self) -> int:
        return self.memory.read_u16(self.used_addr + 4 + 8 * self.size)

    def device_wants_notify(self) -> bool:
        return not self.memory.read_u16(self.used_addr) & 1
