"""The PC interrupt controllers and timer in software, for the translator machine.

Under KVM, kvmpy uses the in-kernel irqchip (LAPIC per vCPU, IOAPIC, two 8259s)
and PIT. A guest run by the C translator gets this instead: ``SoftIrqChip`` bundles
the PIC pair, the IOAPIC, one LAPIC per vCPU, the PIT and port 0x61, and
implements the interrupt half of the Platform interface.

Wiring (as on a PC with QEMU's / KVM's MADT):
  * ``set_irq_level(gsi, level)``: GSI 0 (ISA IRQ0, the PIT) goes to PIC IRQ0 and
    IOAPIC pin 2 (the MADT interrupt source override 0 -> 2); GSI 1 and 3-15 go to
    the PIC IRQ and IOAPIC pin of the same number; GSI 2 and 16-23 only to the IOAPIC.
  * the PIC's INTR goes to LINT0 of every LAPIC (only the BSP's LINT0 is ExtINT at
    reset, as firmware leaves it).
  * IOAPIC messages, MSIs and IPIs are routed by ``_route`` to the LAPICs:
    physical (0xFF = broadcast) or logical (flat / cluster) destination, fixed,
    lowest priority (the first matching LAPIC), NMI, INIT, SIPI, ExtINT.
  * LAPIC EOIs of level-triggered vectors are broadcast to the IOAPIC.

The vCPU side (translator run loop) -- the protocol:
  1. ``cpu_kick(cpu)`` is called (from any thread) whenever ``has_pending(cpu)`` may
     have become true; it must not block (TcgVcpu.kick is a C atomic store).
  2. Before (re)entering ``run()``, and whenever it returns EXIT_INTR or EXIT_HLT,
     the vCPU thread checks ``has_pending(cpu)``. If the CPU can take an
     interrupt now (IF=1, no STI/MOV SS shadow) it calls ``intr_ack(cpu)`` ->
     vector or -1 and, for a vector, ``vcpu.request_interrupt(vector)``. If it
     cannot, it asks the translator to stop at the first instruction boundary
     where it can (an interrupt-window exit) and acks then. Acknowledging moves
     the vector IRR -> ISR (or runs the 8259 INTA cycle for ExtINT), so it must be
     done exactly once per interrupt the CPU actually takes.
  3. ``take_nmi(cpu)`` -> bool for NMIs (independent of IF).
  4. EXIT_HLT: wait (e.g. on an Event set by the kick) until ``has_pending(cpu)``.
  5. MSR 0x1B writes go to ``set_apic_base(cpu, value)``, CR8 to ``lapic.set_cr8``.
  LAPIC MMIO: register() maps one 4 KiB region at 0xFEE00000; the vCPU thread
  calls ``set_current_cpu(cpu)`` once when it starts, and accesses from that thread
  reach that vCPU's LAPIC (``lapic_read``/``lapic_write`` take an explicit cpu).

Threading: one re-entrant lock for the whole chip (vCPU threads and the event
loop's thread, which fires the TimerWheel's timers and the MSIs, all come through it). Callouts to the CPU side
(``cpu_kick``, ``on_init``, ``on_sipi``) are deferred until the outermost holder
releases the lock, so the machine may call back into the chip from them.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable

from .ioapic import IoApic
from .lapic import APIC_DEFAULT_BASE, DM_FIXED, DM_LOWEST, Lapic
from .legacy import SYSTEM_CONTROL_B, SystemControlB
from .pic8259 import Pic8259Pair
from .pit8254 import Pit8254
from ..events import EVENT_READ, EventLoop, TimerFd

log = logging.getLogger(__name__)

NUM_IOAPIC_PINS = 24


# ---------------------------------------------------------------------- TimerWheel

class WheelTimer:
    """One timer of a TimerWheel: ``arm(deadline_ns, token)``, ``cancel()``.

    The callback runs on the wheel's loop thread as ``callback(deadline_ns, token)``,
    without any wheel lock held; a re-arm or cancel racing with the callback may
    still let one stale call through, so callbacks check ``token`` under their own
    lock.
    """

    __slots__ = ("_wheel", "callback", "deadline", "token", "_gen")

    def __init__(self, wheel: "TimerWheel", callback: Callable[[int, object], None]) -> None:
        self._wheel = wheel
        self.callback = callback
        self.deadline: int | None = None
        self.token: object = None
        self._gen = 0

    def arm(self, deadline_ns: int, token: object = None) -> None:
        self._wheel._arm(self, int(deadline_ns), token)

    def cancel(self) -> None:
        self._wheel._cancel(self)

    @property
    def armed(self) -> bool:
        return self.deadline is not None


# Timers fired per wake-up of the loop at most: a guest whose timers are all overdue
# (a host that stalled) must not keep the console and the monitors waiting.
MAX_FIRED_PER_WAKE = 64


class TimerWheel:
    """All the timers of one machine in one heap, fired on an event loop.

    The wheel subscribes a timerfd (kvmpy.events.TimerFd) set to its earliest
    deadline to ``events`` (the machine's loop), or, without one, to a loop of its
    own started at the first arm. Arming a timer earlier than that deadline, from
    any thread, resets the timerfd; nothing else wakes the loop. ``clock`` is in
    nanoseconds: on a loop it must be time.monotonic_ns (the timerfd's clock). With
    ``threaded=False`` nothing runs by itself: ``run_due()`` fires what is due at
    ``clock()`` (deterministic tests drive a fake clock this way).
    """

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns, threaded: bool = True,
                 name: str = "timer-wheel", events: EventLoop | None = None) -> None:
        if threaded and clock is not time.monotonic_ns:
            raise ValueError("a TimerWheel on an event loop keeps time.monotonic_ns (its timerfd's clock); "
                             "other clocks need threaded=False")
        if events is not None and not threaded:
            raise ValueError("a TimerWheel with threaded=False fires only in run_due(): give it no loop")
        self.clock = clock
        self._threaded = threaded
        self._name = name
        self._lock = threading.Lock()
        self._heap: list[tuple[int, int, WheelTimer, int]] = []
        self._seq = itertools.count()
        self._live = 0
        self._events = events
        self._own_events = False
        self._timerfd: TimerFd | None = None
        self._programmed: int | None = None     # the deadline the timerfd is set to
        self._firing = False                    # the loop is firing: it sets the timerfd after
        self._closed = False
        self.fired = 0

    def timer(self, callback: Callable[[int, object], None]) -> WheelTimer:
        return WheelTimer(self, callback)

    def _arm(self, t: WheelTimer, deadline: int, token: object) -> None:
        with self._lock:
            if self._closed:
                return
            if t.deadline is None:
                self._live += 1
            t._gen += 1
            t.deadline = deadline
            t.token = token
            heapq.heappush(self._heap, (deadline, next(self._seq), t, t._gen))
            if len(self._heap) > 4 * self._live + 64:
                # re-armed timers leave stale entries behind: drop them
                self._heap = [e for e in self._heap if e[2]._gen == e[3] and e[2].deadline is not None]
                heapq.heapify(self._heap)
            if not self._threaded:
                return
            if self._timerfd is None:
                self._subscribe_locked()
            if not self._firing and (self._programmed is None or deadline < self._programmed):
                self._program_locked(deadline)

    def _subscribe_locked(self) -> None:
        if self._events is None:
            self._events = EventLoop(name=self._name)
            self._own_events = True
            self._events.start()
        self._timerfd = TimerFd()
        self._events.subscribe(self._timerfd.fd, EVENT_READ, self._on_timerfd)

    def _program_locked(self, deadline: int) -> None:
        self._timerfd.set(deadline)
        self._programmed = deadline

    def _cancel(self, t: WheelTimer) -> None:
        with self._lock:
            if t.deadline is not None:
                self._live -= 1
            t._gen += 1
            t.deadline = None

    def _pop_due(self, now: int):
        """(timer, deadline, token) of the next due live entry, or None. Under _lock."""
        while self._heap:
            deadline, _, t, gen = self._heap[0]
            if t._gen != gen or t.deadline is None:
                heapq.heappop(self._heap)
                continue
            if deadline > now:
                return None
            heapq.heappop(self._heap)
            t.deadline = None
            self._live -= 1
            return t, deadline, t.token
        return None

    def _fire(self, t: WheelTimer, deadline: int, token: object) -> None:
        self.fired += 1
        try:
            t.callback(deadline, token)
        except Exception:  # noqa: BLE001 - a device bug must not stop every timer
            log.exception("timer callback %r failed", t.callback)

    def run_due(self) -> int:
        """Fire every timer due now (manual mode); returns how many fired."""
        n = 0
        while True:
            with self._lock:
                hit = self._pop_due(self.clock())
            if hit is None:
                return n
            self._fire(*hit)
            n += 1

    def _earliest_locked(self) -> int | None:
        """The heap's first live deadline (stale entries on top are dropped)."""
        while self._heap:
            deadline, _, t, gen = self._heap[0]
            if t._gen == gen and t.deadline is not None:
                return deadline
            heapq.heappop(self._heap)
        return None

    def next_deadline(self) -> int | None:
        with self._lock:
            live = [e[0] for e in self._heap if e[2]._gen == e[3] and e[2].deadline is not None]
            return min(live) if live else None

    def _on_timerfd(self, ready: int) -> None:
        with self._lock:
            if self._closed:
                return
            self._timerfd.clear()
            self._firing = True
        try:
            for _ in range(MAX_FIRED_PER_WAKE):
                with self._lock:
                    hit = None if self._closed else self._pop_due(self.clock())
                if hit is None:
                    break
                self._fire(*hit)
        finally:
            with self._lock:
                self._firing = False
                self._programmed = None
                if not self._closed:
                    head = self._earliest_locked()
                    if head is not None:
                        self._program_locked(head)

    def close(self) -> None:
        """Stop every timer; once this returns no callback runs (one that was
        running has finished), unless the loop is stuck for more than 2 s."""
        with self._lock:
            self._closed = True
            self._heap.clear()
            timerfd, self._timerfd = self._timerfd, None
        events = self._events
        if events is None:
            return
        if timerfd is not None:
            def release() -> None:
                events.unsubscribe(timerfd.fd)
                timerfd.close()
            events.call_and_wait(release, timeout=2)
        if self._own_events:
            events.close()


# ---------------------------------------------------------------------- the chip lock

class ChipLock:
    """A re-entrant lock whose ``defer(fn, *args)`` calls run after the outermost release."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self._deferred: list[tuple[Callable, tuple]] = []

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        ok = self._lock.acquire(blocking, timeout)
        if ok:
            self._depth += 1
        return ok

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._deferred:
            calls, self._deferred = self._deferred, []
            self._lock.release()
            for fn, args in calls:
                try:
                    fn(*args)
                except Exception:  # noqa: BLE001 - a machine callback must not break the chip
                    log.exception("irqchip callout %r failed", fn)
            return
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()

    def defer(self, fn: Callable, *args) -> None:
        """Call ``fn(*args)`` once no thread holds the lock (now, if it is free)."""
        if self._depth > 0 and self._lock._is_owned():  # type: ignore[attr-defined]
            self._deferred.append((fn, args))
        else:
            fn(*args)


# ---------------------------------------------------------------------- bus views

class LapicMmio:
    """The 4 KiB LAPIC page: each access goes to the accessing vCPU's LAPIC."""

    def __init__(self, chip: "SoftIrqChip") -> None:
        self._chip = chip

    def read(self, offset: int, size: int) -> int:
        cpu = self._chip.current_cpu()
        if cpu is None:
            log.debug("lapic mmio: read at %#x from a thread that is no vCPU", offset)
            return (1 << (8 * min(max(size, 1), 8))) - 1
        return self._chip.lapics[cpu].read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        cpu = self._chip.current_cpu()
        if cpu is None:
            log.debug("lapic mmio: write at %#x from a thread that is no vCPU", offset)
            return
        self._chip.lapics[cpu].write(offset, size, value)

    def __repr__(self) -> str:
        return "LapicMmio"


class PitPortB(SystemControlB):
    """Port 0x61 wired to the software PIT: bit 0 is channel 2's gate, bit 5 its OUT."""

    def __init__(self, pit: Pit8254) -> None:
        super().__init__(pit_out2=pit.out2)
        self._pit = pit

    def write(self, offset: int, size: int, value: int) -> None:
        super().write(offset, size, value)
        self._pit.gate2(bool(self.value & 0x01))


# ---------------------------------------------------------------------- SoftIrqChip

class SoftIrqChip:
    """PIC pair + IOAPIC + one LAPIC per vCPU + PIT, wired as a PC."""

    def __init__(self, num_cpus: int, cpu_kick: Callable[[int], None], timer_wheel: TimerWheel,
                 on_init: Callable[[int], None] | None = None,
                 on_sipi: Callable[[int, int], None] | None = None,
                 bus_hz: int | None = None) -> None:
        if not 1 <= num_cpus <= 255:
            raise ValueError(f"num_cpus must be 1..255, not {num_cpus}")
        self.num_cpus = num_cpus
        self.timer_wheel = timer_wheel
        self.lock = ChipLock()
        self._cpu_kick = cpu_kick
        self._on_init = on_init or (lambda cpu: None)
        self._on_sipi = on_sipi or (lambda cpu, vector: None)
        self._tls = threading.local()
        self.pic = Pic8259Pair(on_intr=self._pic_intr, lock=self.lock)
        self.ioapic = IoApic(deliver=self._ioapic_deliver, lock=self.lock)
        extra = {} if bus_hz is None else {"bus_hz": bus_hz}
        self.lapics = [
            Lapic(i, bsp=(i == 0), notify=self._kicker(i), send_ipi=self._send_ipi,
                  eoi_broadcast=self.ioapic.eoi, pic_ack=self.pic._acknowledge_locked,
                  on_init=lambda cpu: self.lock.defer(self._on_init, cpu),
                  on_sipi=lambda cpu, vec: self.lock.defer(self._on_sipi, cpu, vec),
                  timer_wheel=timer_wheel, lock=self.lock, **extra)
            for i in range(num_cpus)]
        self.pit = Pit8254(irq0=lambda level: self._isa_irq(0, level), timer_wheel=timer_wheel,
                           lock=self.lock)
        self.port_b = PitPortB(self.pit)
        self.lapic_mmio = LapicMmio(self)

    def _kicker(self, cpu: int) -> Callable[[], None]:
        return lambda: self.lock.defer(self._cpu_kick, cpu)

    # ---- mapping ----

    def register(self, pio_bus, mmio_bus, port_b: bool = True) -> None:
        """Map every device. ``port_b``: also claim port 0x61 (then the machine must
        call legacy.register_legacy_ports with port_b=False)."""
        self.pic.register(pio_bus)
        self.pit.register(pio_bus)
        if port_b:
            pio_bus.register(SYSTEM_CONTROL_B.base, SYSTEM_CONTROL_B.length, self.port_b)
        self.ioapic.register(mmio_bus)
        mmio_bus.register(APIC_DEFAULT_BASE, 0x1000, self.lapic_mmio)

    def set_current_cpu(self, cpu: int | None) -> None:
        """Called by each vCPU thread once: its LAPIC MMIO accesses go to ``cpu``."""
        if cpu is not None and not 0 <= cpu < self.num_cpus:
            raise ValueError(f"cpu {cpu} out of range")
        self._tls.cpu = cpu

    def current_cpu(self) -> int | None:
        return getattr(self._tls, "cpu", None)

    def lapic_read(self, cpu: int, offset: int, size: int) -> int:
        return self.lapics[cpu].read(offset, size)

    def lapic_write(self, cpu: int, offset: int, size: int, value: int) -> None:
        self.lapics[cpu].write(offset, size, value)

    # ---- Platform interrupt side ----

    def set_irq_level(self, gsi: int, level: bool) -> None:
        if not isinstance(gsi, int) or not 0 <= gsi < NUM_IOAPIC_PINS:
            log.debug("irqchip: set_irq_level(%r) ignored", gsi)
            return
        with self.lock:
            if gsi < 16:
                self._isa_irq(gsi, level)
            else:
                self.ioapic.set_irq(gsi, level)

    def _isa_irq(self, irq: int, level: bool) -> None:
        with self.lock:
            if irq != 2:
                self.pic.set_irq(irq, level)
            self.ioapic.set_irq(2 if irq == 0 else irq, level)

    def send_msi(self, address: int, data: int) -> None:
        """Decode an x86 MSI (address 0xFEExxxxx: dest id bits 19:12, bit 2 logical
        destination, bit 3 redirection hint; data: vector 7:0, delivery mode 10:8,
        level 14, trigger 15) and deliver it."""
        address &= 0xFFFFFFFFFFFFFFFF
        data &= 0xFFFFFFFF
        if address >> 20 != 0xFEE:
            log.debug("irqchip: MSI to %#x (not 0xFEExxxxx) dropped", address)
            return
        dest = (address >> 12) & 0xFF
        logical = bool(address & (1 << 2))
        mode = (data >> 8) & 7
        if address & (1 << 3) and mode == DM_FIXED:
            mode = DM_LOWEST
        with self.lock:
            self._route(None, dest, logical, mode, data & 0xFF, bool(data & (1 << 15)),
                        bool(data & (1 << 14)) or not data & (1 << 15), 0)

    # ---- routing ----

    def _targets(self, src: Lapic | None, dest: int, logical: bool, shorthand: int) -> list[Lapic]:
        if shorthand == 1:
            return [src] if src is not None else []
        if shorthand == 2:
            return list(self.lapics)
        if shorthand == 3:
            return [la for la in self.lapics if la is not src]
        if logical:
            return [la for la in self.lapics if la.matches_logical(dest)]
        return [la for la in self.lapics if la.matches_physical(dest)]

    def _route(self, src: Lapic | None, dest: int, logical: bool, mode: int, vector: int,
               level_trig: bool, assert_level: bool, shorthand: int) -> None:
        targets = self._targets(src, dest, logical, shorthand)
        if mode == DM_LOWEST and targets:
            # no arbitration: the first enabled candidate takes it
            enabled = [la for la in targets if la.hw_enabled and la.sw_enabled]
            targets = (enabled or targets)[:1]
        if not targets:
            log.debug("irqchip: message vector %#x mode %d to %#x (logical=%s) has no target",
                      vector, mode, dest, logical)
        for la in targets:
            la.deliver(mode, vector, level_trig, assert_level)

    def _send_ipi(self, src: Lapic, dest: int, logical: bool, mode: int, vector: int,
                  level_trig: bool, assert_level: bool, shorthand: int) -> None:
        self._route(src, dest, logical, mode, vector, level_trig, assert_level, shorthand)

    def _ioapic_deliver(self, dest: int, logical: bool, mode: int, vector: int, level: bool) -> None:
        self._route(None, dest, logical, mode, vector, level, True, 0)

    def _pic_intr(self, level: bool) -> None:
        for la in self.lapics:
            la.set_lint0(level)

    # ---- vCPU side ----

    def has_pending(self, cpu: int) -> bool:
        return self.lapics[cpu].has_pending()

    def intr_ack(self, cpu: int) -> int:
        return self.lapics[cpu].intr_ack()

    def take_nmi(self, cpu: int) -> bool:
        return self.lapics[cpu].take_nmi()

    def set_apic_base(self, cpu: int, value: int) -> None:
        self.lapics[cpu].set_apic_base(value)

    def apic_base(self, cpu: int) -> int:
        return self.lapics[cpu].apic_base

    def reset(self) -> None:
        with self.lock:
            self.pic.reset()
            self.ioapic.reset()
            self.pit.reset()
            for la in self.lapics:
                la.reset()

    def close(self) -> None:
        """Stop this chip's timers (the wheel itself belongs to the machine)."""
        with self.lock:
            for la in self.lapics:
                la.timer_initial = 0
                la._timer_stop()
            self.pit._gen += 1
            if self.pit._timer is not None:
                self.pit._timer.cancel()
