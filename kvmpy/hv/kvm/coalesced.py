"""Coalesced port writes: KVM queues guest OUTs to a registered port range in a ring
(a page of the vCPU mmap, shared by the whole VM) instead of exiting to userspace.

Used for the UART's THR while its IER is 0 (no interrupt of its can be pending, so
when a byte is taken is invisible to the guest): Linux's console writes each byte
as an LSR read and a THR write, and under nested KVM every exit to userspace costs
far more than the in-kernel queueing, so this halves the console's exits.

Order is kept: every exit to userspace drains the ring before it is handled (the
vCPU loop calls ``drain``: this is KvmAccel's ``port_write_queue``), so the device sees the queued writes before any later
read, IER write or other access, as the guest issued them. A guest that writes and
then makes no exit for a while (spins, or halts in the in-kernel irqchip) is
covered by a timer on the machine's event loop that empties the ring every
DRAIN_INTERVAL seconds while a zone is registered; closing the accelerator drains
what is left.
"""

from __future__ import annotations

import logging
import mmap
import threading
from typing import Callable

from ...events import EventLoop, TimerHandle
from ._kvm_cffi import ffi, lib

log = logging.getLogger(__name__)

DRAIN_INTERVAL = 0.01


class CoalescedPio:
    def __init__(self, vm, vcpu_mm: mmap.mmap, write: Callable[[int, int, int], None],
                 events: EventLoop) -> None:
        """``write(port, size, value)`` is the port bus; ``vcpu_mm`` any vCPU's kvm_run mmap;
        ``events`` runs the periodic drain."""
        self.vm = vm
        self._write = write
        self._events = events
        off = lib.KVM_COALESCED_MMIO_PAGE_OFFSET * mmap.PAGESIZE
        if len(vcpu_mm) < off + mmap.PAGESIZE:
            raise ValueError("the vCPU mmap has no coalesced ring page")
        # A raw pointer, as KvmVcpu keeps its kvm_run: valid while the vCPU's mmap is
        # open, and holding no buffer export that would stop that mmap from closing.
        base = int(ffi.cast("uintptr_t", ffi.from_buffer(vcpu_mm)))
        self._ring = ffi.cast("struct kvm_coalesced_mmio_ring *", base + off)
        self._max = (mmap.PAGESIZE - ffi.sizeof("struct kvm_coalesced_mmio_ring")) // ffi.sizeof(
            "struct kvm_coalesced_mmio")
        self._lock = threading.Lock()
        self._zones: set[tuple[int, int]] = set()
        self._closed = False
        self._timer: TimerHandle | None = None
        self._timer_lock = threading.Lock()     # set_zone (a vCPU) vs the tick (the loop)

    def set_zone(self, port: int, length: int, on: bool) -> None:
        """Queue (True) or stop queueing (False) OUTs to port..port+length-1."""
        key = (port, length)
        if on == (key in self._zones) or self._closed:
            return
        self.vm.coalesced_zone(port, length, pio=True, register=on)
        if on:
            with self._timer_lock:
                self._zones.add(key)
                if self._timer is None:
                    self._timer = self._events.call_later(DRAIN_INTERVAL, self._drain_tick)
        else:
            with self._timer_lock:
                self._zones.discard(key)

    def pending(self) -> bool:
        ring = self._ring
        return ring.first != ring.last

    def drain(self) -> None:
        """Hand the queued writes to the bus, oldest first."""
        ring = self._ring
        if ring.first == ring.last:
            return
        with self._lock:
            first = ring.first
            while first != ring.last:
                e = ring.coalesced_mmio[first]
                port, length = e.phys_addr, min(e.len, 8)
                value = int.from_bytes(ffi.buffer(e.data, length), "little")
                try:
                    self._write(port, length, value)
                except Exception as exc:  # a device fault must not stop draining
                    log.error("coalesced write to port %#x failed: %s: %s", port, type(exc).__name__, exc)
                # Only now: until the device has the write, the unlocked check at the
                # top must see it pending, so a vCPU's exit waits here for the lock
                # rather than reaching the device ahead of it.
                first = (first + 1) % self._max
                ring.first = first

    def _drain_tick(self) -> None:
        """On the event loop: drain, and come back while a zone is registered."""
        self.drain()
        with self._timer_lock:
            if self._zones and not self._closed:
                self._timer = self._events.call_later(DRAIN_INTERVAL, self._drain_tick)
            else:
                self._timer = None

    def close(self) -> None:
        if self._closed:
            return
        with self._timer_lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
        self.drain()
