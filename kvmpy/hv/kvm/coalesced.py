"""Coalesced port writes: KVM queues guest OUTs to a registered port range in a ring
(a page of the vCPU mmap, shared by the whole VM) instead of exiting to userspace.

Used for the UART's THR (Serial16550's docstring says why that is safe whatever
IER says) and the RTC's index port: Linux's console writes each byte as an LSR read
and a THR write, and under nested KVM every exit to userspace costs far more than
the in-kernel queueing. With the LSR read answered by the C run loop from the
value the UART publishes (kvmpy/hv/kvm/_build.py, KVMPY_PUBLISHED), the console's
bytes reach Python only when the ring is full or the watcher finds them. A run of
byte writes to one port goes to the bus as one burst (``Bus.write_burst``): a
console's run of bytes, or the ones Linux's transmit interrupt handler writes, are
one call into the UART and one console write.

Order is kept: every exit to userspace drains the ring before it is handled (the
vCPU loop calls ``drain``: this is KvmAccel's ``port_write_queue``; the C loop flags
a decoded access made while writes were queued, DECODED_AFTER_QUEUED), so the device sees the queued writes before any later
read, IER write or other access, as the guest issued them. A guest that writes and
then makes no exit for a while (spins, or halts in the in-kernel irqchip) is
covered by ``RingWatch``: from the first zone on, a C thread looks at the ring every
DRAIN_INTERVAL seconds (IDLE_DRAIN_INTERVAL once no write has come for QUIET_BEFORE_IDLE)
and wakes the machine's event loop, which drains it, only when writes wait; closing
the accelerator drains what is left.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from typing import Callable

from ...events import EVENT_READ, EventLoop
from ..drain_tick import DrainTick
from ._kvm_cffi import ffi, lib

log = logging.getLogger(__name__)

DRAIN_INTERVAL = 0.01
# A guest that has written nothing for QUIET_BEFORE_IDLE seconds: its ring is looked at
# this often until it writes again, so the first bytes after a quiet spell wait up to
# this long (if the guest makes no exit meanwhile), the rest DRAIN_INTERVAL.
IDLE_DRAIN_INTERVAL = 0.1
QUIET_BEFORE_IDLE = 1.0
# Most byte writes handed over in one burst: a page's ring holds fewer entries.
BURST_MAX = 256
_take = lib.kvmpy_coalesced_take


class RingWatch:
    """DrainTick's job for KVM's ring, with no Python on a clock: once started, a C
    thread (kvmpy_ring_watch_start) looks at the ring's indices every ``interval``
    seconds (``idle_interval`` once the guest has written nothing for ``idle_after``)
    and wakes the event loop through an eventfd only when writes wait; the
    loop then calls ``drain()``. DrainTick's timer woke the loop 100 times a second for
    an empty ring: in the nested L1 (one CPU, Python about 20x slower) that loop took
    1.1-2.1 s of a 10 s virtio-net flood's CPU from the guest. Where the thread cannot
    be started, a DrainTick does the job as before. It runs until ``close()``."""

    def __init__(self, events: EventLoop, ring, interval: float, drain: Callable[[], None],
                 idle_interval: float = IDLE_DRAIN_INTERVAL, idle_after: float = QUIET_BEFORE_IDLE) -> None:
        self._events = events
        self._ring = ring
        self._interval = interval
        self._idle_interval = idle_interval
        self._idle_after = idle_after
        self._drain = drain
        self._lock = threading.Lock()       # start (a vCPU's zone) vs close vs counts
        self._watch = ffi.NULL
        self._wake_fd = -1
        self._fallback: DrainTick | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        """Start watching (again a no-op once started, and after close)."""
        with self._lock:
            if self._closed or self._watch != ffi.NULL or self._fallback is not None:
                return
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            err = ffi.new("int *")
            watch = lib.kvmpy_ring_watch_start(self._ring, fd, *(max(1, round(t * 1000)) for t in (
                self._interval, self._idle_interval, self._idle_after)), err)
            if watch == ffi.NULL:
                os.close(fd)
                log.warning("coalesced ring: no watcher thread (%s); a timer drains it instead",
                            os.strerror(err[0]))
                self._fallback = DrainTick(self._events, self._interval, self._drain)
                self._fallback.set_zone("ring", True)
                return
            self._watch, self._wake_fd = watch, fd
            self._events.subscribe(fd, EVENT_READ, self._woken)

    def _woken(self, _ready: int) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except OSError:       # BlockingIOError: a wake already read
            pass
        self._drain()

    def counts(self) -> tuple[int, int]:
        """(looks, wakes): how often the thread looked at the ring, and woke the loop."""
        with self._lock:
            watch = self._watch
            if watch == ffi.NULL:
                return 0, 0
            return lib.kvmpy_ring_watch_looks(watch), lib.kvmpy_ring_watch_wakes(watch)

    def close(self) -> bool:
        """Stop watching for good; True on the first call only (the owner then drains
        what is left once)."""
        with self._lock:
            first = not self._closed
            self._closed = True
            watch, self._watch = self._watch, ffi.NULL
            if watch != ffi.NULL:
                lib.kvmpy_ring_watch_stop(watch)        # at once: the thread waits on its stop eventfd
            fallback = self._fallback
        if watch != ffi.NULL:
            self._events.unsubscribe(self._wake_fd, close=True)
        if fallback is not None:
            fallback.close()
        return first


class CoalescedPio:
    def __init__(self, vm, vcpu_mm: mmap.mmap, write: Callable[[int, int, int], None],
                 events: EventLoop, write_burst: Callable[[int, bytes], None] | None = None) -> None:
        """``write(port, size, value)`` is the port bus; ``vcpu_mm`` any vCPU's kvm_run mmap;
        ``events`` runs the periodic drain; ``write_burst(port, data)``, where given,
        takes a run of queued byte writes to one port at once (Bus.write_burst)."""
        self.vm = vm
        self._write = write
        self._write_burst = write_burst
        # kvmpy_coalesced_take's answers: the oldest write (port, length, value),
        # and the bytes of a run of byte writes to that port.
        self._head_c = ffi.new("__u64[3]")
        self._head = memoryview(ffi.buffer(self._head_c)).cast("Q")
        self._run_c = ffi.new("unsigned char[]", BURST_MAX)
        self._run = ffi.buffer(self._run_c)
        off = lib.KVM_COALESCED_MMIO_PAGE_OFFSET * mmap.PAGESIZE
        if len(vcpu_mm) < off + mmap.PAGESIZE:
            raise ValueError("the vCPU mmap has no coalesced ring page")
        # A raw pointer, as KvmVcpu keeps its kvm_run: valid while the vCPU's mmap is
        # open, and holding no buffer export that would stop that mmap from closing.
        base = int(ffi.cast("uintptr_t", ffi.from_buffer(vcpu_mm)))
        self._ring = ffi.cast("struct kvm_coalesced_mmio_ring *", base + off)
        self._max = (mmap.PAGESIZE - ffi.sizeof("struct kvm_coalesced_mmio_ring")) // ffi.sizeof(
            "struct kvm_coalesced_mmio")
        # The same page as 32- and 64-bit words: the emptiness check and a single
        # entry (an RTC index write before its data port's exit; a console's byte
        # where LSR reads still exit) are read here, with no call into C and its GIL
        # release; C walks runs of several entries (kvmpy_coalesced_take).
        page = ffi.buffer(self._ring, mmap.PAGESIZE)
        entry = ffi.sizeof("struct kvm_coalesced_mmio")
        head_at = ffi.offsetof("struct kvm_coalesced_mmio_ring", "coalesced_mmio")
        layout = (ffi.offsetof("struct kvm_coalesced_mmio_ring", "first"),
                  ffi.offsetof("struct kvm_coalesced_mmio_ring", "last"),
                  ffi.offsetof("struct kvm_coalesced_mmio", "len"),
                  ffi.offsetof("struct kvm_coalesced_mmio", "data"), entry % 8, head_at % 8)
        if layout != (0, 4, 8, 16, 0, 0):
            raise ValueError(f"unexpected coalesced ring layout {layout}")
        self._words = memoryview(page).cast("I")          # [0] first, [1] last
        self._qwords = memoryview(page).cast("Q")
        self._entry_q, self._head_q = entry // 8, head_at // 8
        self._lock = threading.Lock()
        self._watch = RingWatch(events, self._ring, DRAIN_INTERVAL, self.drain)
        self._zones: set[tuple[int, int]] = set()      # (port, length) ranges KVM queues

    def set_zone(self, port: int, length: int, on: bool) -> None:
        """Queue (True) or stop queueing (False) OUTs to port..port+length-1; the first
        zone starts the ring's watcher."""
        key = (port, length)
        if on == (key in self._zones) or self._watch.closed:
            return
        self.vm.coalesced_zone(port, length, pio=True, register=on)
        if on:
            self._zones.add(key)
            self._watch.start()
        else:
            self._zones.discard(key)

    def watch_counts(self) -> tuple[int, int]:
        """RingWatch.counts: the watcher thread's looks at the ring and wakes of the loop."""
        return self._watch.counts()

    def pending(self) -> bool:
        words = self._words
        return words[0] != words[1]

    def drain(self) -> None:
        """Hand the queued writes to the bus, oldest first; consecutive byte writes to
        one port (the UART's THR: up to 16 per interrupt from Linux's handler, a line
        from a console) as one burst where the bus takes bursts."""
        words = self._words
        if words[0] == words[1]:
            return
        with self._lock:
            ring, qwords, head, run, head_c, run_c = (self._ring, self._qwords, self._head, self._run,
                                                       self._head_c, self._run_c)
            size, entry_q, head_q = self._max, self._entry_q, self._head_q
            cap = BURST_MAX if self._write_burst is not None else 1
            while True:
                first, last = words[0], words[1]
                if first == last or first >= size:
                    break
                if (first + 1) % size == last:
                    # One entry (an RTC index write, a lone console byte): read here.
                    at = head_q + first * entry_q
                    length = min(qwords[at + 1] & 0xFFFFFFFF, 8)
                    port, value, n = qwords[at], qwords[at + 2] & ((1 << (8 * length)) - 1), 1
                else:
                    n = _take(ring, size, head_c, run_c, cap)
                    if n == 0:
                        break
                    port, length, value = head[0], head[1], head[2]
                try:
                    if n == 1:
                        self._write(port, length, value)
                    else:
                        self._write_burst(port, run[0:n])
                except Exception as exc:  # a device fault must not stop draining
                    log.error("coalesced write to port %#x failed: %s: %s", port, type(exc).__name__, exc)
                # Only now: until the device has the writes, the unlocked check at the
                # top must see them pending, so a vCPU's exit waits here for the lock
                # rather than reaching the device ahead of them.
                words[0] = (first + n) % size

    def close(self) -> None:
        if self._watch.close():
            self.drain()
