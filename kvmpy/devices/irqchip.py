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

import logging
import threading
from typing import Callable, Sequence

from .ioapic import IoApic
from .lapic import APIC_DEFAULT_BASE, DM_FIXED, DM_LOWEST, Lapic
from .legacy import SYSTEM_CONTROL_B, SystemControlB
from .pic8259 import Pic8259Pair
from .pit8254 import Pit8254
from .timers import TimerWheel

log = logging.getLogger(__name__)

NUM_IOAPIC_PINS = 24


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

class _VcpuThreadLocal(threading.local):
    cpu: int | None = None      # a thread that never said which vCPU it runs: none


class SoftIrqChip:
    """PIC pair + IOAPIC + one LAPIC per vCPU + PIT, wired as a PC."""

    def __init__(self, num_cpus: int, cpu_kick: Callable[[int], None], timer_wheel: TimerWheel,
                 on_init: Callable[[int], None] | None = None,
                 on_sipi: Callable[[int, int], None] | None = None,
                 bus_hz: int | None = None,
                 lapic_timer_wheels: Sequence[TimerWheel] | None = None) -> None:
        """``lapic_timer_wheels``: CPU i's LAPIC takes its timer from the i-th (the
        translator keeps each LAPIC's timer on its own vCPU); without them, from
        ``timer_wheel``, as the PIT does."""
        if not 1 <= num_cpus <= 255:
            raise ValueError(f"num_cpus must be 1..255, not {num_cpus}")
        if lapic_timer_wheels is None:
            lapic_timer_wheels = [timer_wheel] * num_cpus
        elif len(lapic_timer_wheels) != num_cpus:
            raise ValueError(f"{len(lapic_timer_wheels)} LAPIC timer wheels for {num_cpus} CPUs")
        self.num_cpus = num_cpus
        self.timer_wheel = timer_wheel
        self.lock = ChipLock()
        self._cpu_kick = cpu_kick
        self._on_init = on_init or (lambda cpu: None)
        self._on_sipi = on_sipi or (lambda cpu, vector: None)
        self._tls = _VcpuThreadLocal()
        self.pic = Pic8259Pair(on_intr=self._pic_intr, lock=self.lock)
        self.ioapic = IoApic(deliver=self._ioapic_deliver, lock=self.lock)
        extra = {} if bus_hz is None else {"bus_hz": bus_hz}
        self.lapics = [
            Lapic(i, bsp=(i == 0), notify=self._kicker(i), send_ipi=self._send_ipi,
                  eoi_broadcast=self.ioapic.eoi, pic_ack=self.pic._acknowledge_locked,
                  on_init=lambda cpu: self.lock.defer(self._on_init, cpu),
                  on_sipi=lambda cpu, vec: self.lock.defer(self._on_sipi, cpu, vec),
                  timer_wheel=lapic_timer_wheels[i], lock=self.lock, **extra)
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
        return self._tls.cpu

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
