"""Queued port writes for the translator: KVM's coalesced PIO, done by the C core.

A one-byte OUT to a queued port (the UART's THR, the RTC's index port 0x70; the
devices ask for it with ``set_zone``, as under KVM) does not leave the guest: the core
appends it to the machine's queue (c_ext/tcg.h ``PortQueue``), shared by every vCPU so
the writes stay in the order the guest issued them, and goes on. Linux's console
then costs no exit per byte: its LSR poll is answered in the core from the value the
UART publishes (``TcgPublishedReads`` below), and its bytes reach the UART in runs
when the queue is drained; its transmit interrupt handler costs one exit per 16 bytes
(the IIR read after them).

Order is kept as under KVM (kvmpy/hv/kvm/coalesced.py): the vCPU loop calls ``drain``
after every exit the fast path does not serve, and a decoded exit made while writes
were queued comes back flagged (DECODED_AFTER_QUEUED), so the devices get the queued
writes before any later access, HLT, interrupt window or kick is served. Writes stay
counted as pending until their device has them, so a vCPU exiting meanwhile waits
for the drain in progress rather than overtaking it. A guest that writes and then
makes no exit (a spin with interrupts off) is covered by a tick on the machine's
event loop every DRAIN_INTERVAL seconds while a zone is registered (every
IDLE_DRAIN_INTERVAL once nothing has been queued for QUIET_BEFORE_IDLE). A full queue
(PORT_QUEUE_SIZE writes) makes the next OUT exit as any other.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from ...events import EventLoop
from ..drain_tick import DrainTick

log = logging.getLogger(__name__)

DRAIN_INTERVAL = 0.01
# As KVM's ring watcher (kvmpy/hv/kvm/coalesced.py): after QUIET_BEFORE_IDLE seconds
# with no write queued, the tick comes every IDLE_DRAIN_INTERVAL until one is.
IDLE_DRAIN_INTERVAL = 0.1
QUIET_BEFORE_IDLE = 1.0


class TcgPortWrites:
    """The translator's ``Accel.port_write_queue`` (kvmpy.hv.protocol.PortWriteQueue)."""

    def __init__(self, queue, write: Callable[[int, int, int], None], write_burst: Callable[[int, bytes], None],
                 events: EventLoop) -> None:
        """``queue``: a kvmpy._tcg.PortQueue every vCPU was given (set_port_queue);
        ``write(port, size, value)`` and ``write_burst(port, data)`` are the port bus's."""
        self._queue = queue
        self._write = write
        self._write_burst = write_burst
        self._lock = threading.Lock()           # one drain at a time: vCPUs and the tick
        self._tick = DrainTick(events, DRAIN_INTERVAL, self.drain, activity=queue.pushed,
                               idle_interval=IDLE_DRAIN_INTERVAL, idle_after=QUIET_BEFORE_IDLE)

    def set_zone(self, port: int, length: int, on: bool) -> None:
        """Queue (True) or stop queueing (False) one-byte writes to port..port+length-1;
        before the vCPUs run. Ports past the queue's few zones keep exiting."""
        for p in range(port, port + length):
            if on and not self._queue.set_zone(p, True):
                log.debug("port queue: no room for port %#x; its writes exit", p)
                continue
            if not on:
                self._queue.set_zone(p, False)
            self._tick.set_zone(p, on)

    def pending(self) -> bool:
        return self._queue.pending()

    def drain(self) -> None:
        """Hand the queued writes to the port bus, oldest first; a run of writes to one
        port (a console line, a transmit interrupt's 16 bytes) as one burst."""
        queue = self._queue
        if not queue.pending():
            return
        with self._lock:
            # The writes stay pending until the devices have them, so a vCPU exiting
            # meanwhile waits here for this lock rather than overtaking them.
            try:
                queue.hand_over(self._write, self._write_burst)
            except Exception as exc:  # a device fault: every other write was handed over
                log.error("queued port write failed: %s: %s", type(exc).__name__, exc)

    def close(self) -> None:
        """Stop the tick and hand over what is left."""
        self._tick.close()
        self.drain()


class TcgPublishedReads:
    """The translator's ``Accel.published_port_reads`` (kvmpy.hv.protocol.PublishedPortReads):
    the cores answer one-byte reads of a published port from the machine's PortQueue."""

    def __init__(self, queue) -> None:
        self._queue = queue

    def publisher(self, port: int) -> Callable[[int | None], None] | None:
        slot = self._queue.published_slot(port)
        if slot < 0:
            log.debug("no published-read slot left for port %#x: its reads exit", port)
            return None
        publish = self._queue.publish

        def publish_value(value: int | None) -> None:
            publish(slot, -1 if value is None else value & 0xFF)
        return publish_value
