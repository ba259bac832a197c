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
covered by a drainer thread that empties the ring every DRAIN_INTERVAL seconds
while a zone is registered; closing the accelerator drains what is left.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from typing import Callable

from ._kvm_cffi import ffi, lib

log = logging.getLogger(__name__)

DRAIN_INTERVAL = 0.01


class CoalescedPio:
    def __init__(self, vm, vcpu_mm: mmap.mmap, write: Callable[[int, int, int], None]) -> None:
        """``write(port, size, value)`` is the port bus; ``vcpu_mm`` any vCPU's kvm_run mmap."""
        self.vm = vm
        self._write = write
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
        self._active = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def set_zone(self, port: int, length: int, on: bool) -> None:
        """Queue (True) or stop queueing (False) OUTs to port..port+length-1."""
        key = (port, length)
        if on == (key in self._zones) or self._closed:
            return
        self.vm.coalesced_zone(port, length, pio=True, register=on)
        if on:
            self._zones.add(key)
            self._active.set()
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain_loop, name="coalesced-pio", daemon=True)
                self._thread.start()
        else:
            self._zones.discard(key)
            if not self._zones:
                self._active.clear()

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

    def _drain_loop(self) -> None:
        while not self._closed:
            if not self._active.wait(1.0):
                continue
            time.sleep(DRAIN_INTERVAL)
            self.drain()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._active.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        self.drain()
