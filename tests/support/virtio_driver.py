"""A minimal driver side of a split virtqueue, written the way a guest driver would.

Used by the device tests to act as the guest: it lays out the rings in guest
RAM, publishes chains in the avail ring and collects used entries. It is
deliberately independent of queue.py (different code path, plain GuestMemory
accessors) so tests compare two implementations of the layout.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from kvmpy.devices.bus import Bus
from kvmpy.devices.pci.bus import PciBus, PciConfigIo
from kvmpy.devices.platform import SoftPlatform
from kvmpy.devices.virtio.device import VirtioDevice
from kvmpy.devices.virtio.pci import VirtioPciTransport
from kvmpy.devices.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from kvmpy.events import EventLoop
from kvmpy.memory import GuestMemory


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
        self.publish_many([head])

    def publish_many(self, heads: list[int]) -> None:
        """Make ``heads`` available with one write of the avail index: a device looking
        at the ring sees none of them or all."""
        for i, head in enumerate(heads):
            self.memory.write_u16(self.avail_addr + 4 + 2 * ((self.avail_idx + i) % self.size), head)
        self.avail_idx = (self.avail_idx + len(heads)) & 0xFFFF
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


# -- a software machine and a virtio-pci driver, for tests and the benchmark ----------------

class SoftMachine:
    """RAM, the PIO/MMIO buses, a SoftPlatform, an event loop and PCI bus 0 behind
    0xCF8: enough machine to drive PCI devices from Python exactly as a guest would."""

    def __init__(self, ram_size: int = 16 << 20, mmio_window=(0xC0000000, 0xFEBFFFFF),
                 io_window=(0xC000, 0xFFFF)) -> None:
        self.memory = GuestMemory.anonymous([(0, ram_size)])
        self.msis: list[tuple[int, int]] = []
        self.irq_changes: list[tuple[int, bool]] = []
        self.cond = threading.Condition()

        def on_msi(address, data):
            with self.cond:
                self.msis.append((address, data))
                self.cond.notify_all()

        # Called with every INTx level the devices drive, on the thread that drives it
        # (for virtio-pci: the one that wrote the used entries), before it goes on: a
        # test's stand-in for a guest interrupt handler that runs at that very moment.
        self.irq_hook: Callable[[int, bool], None] | None = None

        def on_irq(gsi, level):
            with self.cond:
                self.irq_changes.append((gsi, level))
                self.cond.notify_all()
            hook = self.irq_hook
            if hook is not None:
                hook(gsi, level)

        self.platform = SoftPlatform(self.memory, on_irq=on_irq, on_msi=on_msi)
        self.events = EventLoop(name="soft-machine-events")
        self.events.start()
        self.mmio = Bus("mmio")
        self.pio = Bus("pio")
        self.pci = PciBus(self.mmio, self.pio, self.platform, mmio_window=mmio_window, io_window=io_window)
        self.pio.register(0xCF8, 8, PciConfigIo(self.pci))

    def virtio_pci(self, device: VirtioDevice) -> VirtioPciTransport:
        """``device`` on a virtio-pci function of this machine (not on the bus yet)."""
        return VirtioPciTransport(self.platform, self.events, device)

    def pio_read(self, addr, size):
        return self.pio.read(addr, size)

    def pio_write(self, addr, size, value):
        if not self.platform.doorbell_write(addr, size, value, True):
            self.pio.write(addr, size, value)

    def mmio_read(self, addr, size):
        return self.mmio.read(addr, size)

    def mmio_write(self, addr, size, value):
        if not self.platform.doorbell_write(addr, size, value, False):
            self.mmio.write(addr, size, value)

    def cfg_read(self, slot, reg, size=4):
        self.pio_write(0xCF8, 4, 0x80000000 | slot << 11 | (reg & 0xFC))
        return self.pio_read(0xCFC + (reg & 3), size)

    def cfg_write(self, slot, reg, size, value):
        self.pio_write(0xCF8, 4, 0x80000000 | slot << 11 | (reg & 0xFC))
        self.pio_write(0xCFC + (reg & 3), size, value)

    def wait_msi(self, count: int, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.msis) >= count, timeout)

    def close(self):
        self.events.close()
        self.platform.close()


class VirtioPciDriver:
    """The guest side of a modern virtio-pci function, through config ports and MMIO."""

    MSI_ADDRESS = 0xFEE00000

    def __init__(self, machine: SoftMachine, slot: int, ring_base: int = 0x100000) -> None:
        self.m = machine
        self.slot = slot
        self.ring_base = ring_base
        self.caps: dict[int, tuple[int, int, int]] = {}  # cfg_type -> (bar, offset, length)
        self.notify_mult = 0
        self.msix_cap = None
        ptr = machine.cfg_read(slot, 0x34, 1)
        seen = 0
        while ptr and seen < 48:
            seen += 1
            cap_id = machine.cfg_read(slot, ptr, 1)
            nxt = machine.cfg_read(slot, ptr + 1, 1)
            if cap_id == 0x09:
                cfg_type = machine.cfg_read(slot, ptr + 3, 1)
                bar = machine.cfg_read(slot, ptr + 4, 1)
                off = machine.cfg_read(slot, ptr + 8, 4)
                length = machine.cfg_read(slot, ptr + 12, 4)
                self.caps.setdefault(cfg_type, (bar, off, length))
                if cfg_type == 2:
                    self.notify_mult = machine.cfg_read(slot, ptr + 16, 4)
            elif cap_id == 0x11:
                self.msix_cap = ptr
            ptr = nxt
        self.queues: dict[int, DriverQueue] = {}

    def bar_addr(self, bar: int) -> int:
        lo = self.m.cfg_read(self.slot, 0x10 + 4 * bar)
        addr = lo & ~0xF
        if lo & 0x6 == 0x4:
            addr |= self.m.cfg_read(self.slot, 0x14 + 4 * bar) << 32
        return addr

    def enable(self) -> None:
        cmd = self.m.cfg_read(self.slot, 0x04, 2)
        self.m.cfg_write(self.slot, 0x04, 2, cmd | 0x6)

    def _region(self, cfg_type: int) -> int:
        bar, off, _ = self.caps[cfg_type]
        return self.bar_addr(bar) + off

    def common_read(self, off: int, size: int) -> int:
        return self.m.mmio_read(self._region(1) + off, size)

    def common_write(self, off: int, size: int, value: int) -> None:
        self.m.mmio_write(self._region(1) + off, size, value)

    def device_cfg(self, off: int, size: int) -> int:
        return self.m.mmio_read(self._region(4) + off, size)

    def isr(self) -> int:
        return self.m.mmio_read(self._region(3), 1)

    @property
    def status(self) -> int:
        return self.common_read(0x14, 1)

    def set_status(self, value: int) -> None:
        self.common_write(0x14, 1, value)

    def device_features(self) -> int:
        self.common_write(0x00, 4, 0)
        lo = self.common_read(0x04, 4)
        self.common_write(0x00, 4, 1)
        return lo | self.common_read(0x04, 4) << 32

    def negotiate(self, wanted: int) -> int:
        """Reset, ACKNOWLEDGE|DRIVER, features ∩ wanted, FEATURES_OK; returns the features."""
        self.enable()
        self.set_status(0)
        self.set_status(1)
        self.set_status(3)
        feats = self.device_features() & wanted
        self.common_write(0x08, 4, 0)
        self.common_write(0x0C, 4, feats & 0xFFFFFFFF)
        self.common_write(0x08, 4, 1)
        self.common_write(0x0C, 4, feats >> 32)
        self.set_status(3 | 8)
        if not self.status & 8:
            raise RuntimeError("device refused features")
        return feats

    def enable_msix(self) -> None:
        ctrl = self.m.cfg_read(self.slot, self.msix_cap + 2, 2)
        table = self.m.cfg_read(self.slot, self.msix_cap + 4, 4)
        base = self.bar_addr(table & 7) + (table & ~7)
        for v in range((ctrl & 0x7FF) + 1):
            self.m.mmio_write(base + 16 * v, 4, self.MSI_ADDRESS)
            self.m.mmio_write(base + 16 * v + 4, 4, 0)
            self.m.mmio_write(base + 16 * v + 8, 4, 0x30 + v)
            self.m.mmio_write(base + 16 * v + 12, 4, 0)
        self.m.cfg_write(self.slot, self.msix_cap + 2, 2, ctrl | 0x8000)

    def setup_queue(self, index: int, size: int, vector: int | None = None, event_idx: bool = False) -> DriverQueue:
        base = self.ring_base + index * ((ring_bytes(size) + 0xFFFF) & ~0xFFFF)
        dq = DriverQueue(self.m.memory, base, size, event_idx=event_idx)
        self.common_write(0x16, 2, index)
        self.common_write(0x18, 2, size)
        if vector is not None:
            self.common_write(0x1A, 2, vector)
        for off, addr in ((0x20, dq.desc_addr), (0x28, dq.avail_addr), (0x30, dq.used_addr)):
            self.common_write(off, 4, addr & 0xFFFFFFFF)
            self.common_write(off + 4, 4, addr >> 32)
        self.common_write(0x1C, 2, 1)
        self.queues[index] = dq
        return dq

    def driver_ok(self) -> None:
        self.set_status(self.status | 4)

    def kick(self, index: int) -> None:
        self.common_write(0x16, 2, index)
        off = self.common_read(0x1E, 2)
        self.m.mmio_write(self._region(2) + off * self.notify_mult, 2, index)

    def wait_used(self, index: int, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        dq = self.queues[index]
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            got += dq.collect()
            if len(got) >= count:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {index}: {len(got)} of {count} used entries")
            time.sleep(0.0005)
        return got
