"""Local APIC (xAPIC, MMIO at 0xFEE00000), one per vCPU, in software.

Used when the guest runs on the translator. Models what Linux's
arch/x86/kernel/apic/ relies on: ID, version 0x50014 (integrated APIC, 6 LVT
entries, no EOI-broadcast suppression), TPR/PPR, EOI, the 256-bit IRR/ISR/TMR,
LDR/DFR (flat and cluster logical mode), SVR (software enable, spurious vector),
ESR (write-to-latch), ICR (fixed, lowest priority, NMI, INIT, SIPI, ExtINT; self /
all / all-but-self shorthands), the six LVTs and the timer (one-shot, periodic,
divide configuration; no TSC-deadline mode: the translator does not advertise it).

Timer clock: a nominal bus frequency of 1 GHz (``bus_hz``), so the timer counts
``1e9 / divide`` ticks per second of host CLOCK_MONOTONIC. The current count is
computed from the clock when read; expiry is delivered by the machine's shared
TimerWheel (``timer_wheel.timer(callback)`` -> handle with ``arm(deadline_ns)``
and ``cancel()``). Periodic expiries closer than MIN_PERIOD_NS are spaced out (a
guest cannot make the host spin), the counter itself keeps the programmed rate.

Interrupt acknowledge protocol with the CPU (the translator):
  * the LAPIC calls ``notify()`` (-> vCPU kick) whenever ``has_pending()`` may have
    become true: a fixed interrupt above PPR, the PIC's INTR through LINT0 ExtINT
    (or with the APIC hardware-disabled, on the BSP), an NMI.
  * at an instruction boundary where it can take an interrupt (IF=1, no
    interrupt shadow) the CPU calls ``intr_ack()``: it returns the vector and moves
    it IRR -> ISR (or runs the PIC's INTA cycle for ExtINT), or -1 when nothing is
    deliverable any more (the interrupt was retracted or masked meanwhile).
  * ``take_nmi()`` -> bool consumes a pending NMI (independent of IF).
  * ``pending_vector()`` peeks without acknowledging; ``accept(vector)`` is the
    lower-level IRR -> ISR step for a vector obtained from ``pending_vector()``.
INIT and SIPI received from the ICR call ``on_init(cpu)`` / ``on_sipi(cpu, vector)``
(the machine starts the AP at vector * 0x1000 in real mode); a SIPI is honoured
only in the wait-for-SIPI state that INIT enters (APs start in it).

Routing of messages this LAPIC sends (IPIs) and of EOIs of level-triggered
vectors is the irqchip's: ``send_ipi(src_lapic, dest, logical, mode, vector,
level, shorthand)`` and ``eoi_broadcast(vector)``.

Threading: every entry point takes ``lock`` (re-entrant; the irqchip shares one
lock between all its devices); callbacks are called with it held and must not
block.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .saved_state import Restorable, StateCheck, checked

log = logging.getLogger(__name__)

APIC_DEFAULT_BASE = 0xFEE00000
APIC_BASE_BSP = 1 << 8
APIC_BASE_ENABLE = 1 << 11
APIC_BASE_ADDR_MASK = 0xFFFFFF000
APIC_VERSION = 0x50014              # version 0x14, max LVT index 5 (6 entries)
NOMINAL_BUS_HZ = 1_000_000_000
MIN_PERIOD_NS = 100_000

# delivery modes (ICR, LVT, IOAPIC redirection entries, MSI data)
DM_FIXED = 0
DM_LOWEST = 1
DM_SMI = 2
DM_NMI = 4
DM_INIT = 5
DM_SIPI = 6
DM_EXTINT = 7

# register offsets
REG_ID = 0x20
REG_VERSION = 0x30
REG_TPR = 0x80
REG_APR = 0x90
REG_PPR = 0xA0
REG_EOI = 0xB0
REG_RRD = 0xC0
REG_LDR = 0xD0
REG_DFR = 0xE0
REG_SVR = 0xF0
REG_ISR = 0x100
REG_TMR = 0x180
REG_IRR = 0x200
REG_ESR = 0x280
REG_ICR_LO = 0x300
REG_ICR_HI = 0x310
REG_LVT_TIMER = 0x320
REG_LVT_THERMAL = 0x330
REG_LVT_PERF = 0x340
REG_LVT_LINT0 = 0x350
REG_LVT_LINT1 = 0x360
REG_LVT_ERROR = 0x370
REG_TIMER_ICR = 0x380
REG_TIMER_CCR = 0x390
REG_TIMER_DCR = 0x3E0

LVT_MASKED = 1 << 16
LVT_PERIODIC = 1 << 17
LVT_LEVEL = 1 << 15
LVT_REMOTE_IRR = 1 << 14
SVR_ENABLE = 1 << 8

# writable bits of each LVT (delivery status and remote IRR are read-only)
_LVT_WRITABLE = {
    REG_LVT_TIMER: 0xFF | LVT_MASKED | LVT_PERIODIC,
    REG_LVT_THERMAL: 0xFF | 0x700 | LVT_MASKED,
    REG_LVT_PERF: 0xFF | 0x700 | LVT_MASKED,
    REG_LVT_LINT0: 0xFF | 0x700 | (1 << 13) | LVT_LEVEL | LVT_MASKED,
    REG_LVT_LINT1: 0xFF | 0x700 | (1 << 13) | LVT_LEVEL | LVT_MASKED,
    REG_LVT_ERROR: 0xFF | LVT_MASKED,
}

ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECV_ILLEGAL_VECTOR = 1 << 6
ESR_ILLEGAL_REGISTER = 1 << 7


# the LVT registers in the order a saved state lists them
LVT_REGISTERS = (REG_LVT_TIMER, REG_LVT_THERMAL, REG_LVT_PERF, REG_LVT_LINT0, REG_LVT_LINT1,
                 REG_LVT_ERROR)
ESR_BITS = ESR_SEND_ILLEGAL_VECTOR | ESR_RECV_ILLEGAL_VECTOR | ESR_ILLEGAL_REGISTER
# vectors 0-15 are refused on arrival, so they are never in IRR, ISR or TMR
VECTOR_BITS = ((1 << 256) - 1) & ~0xFFFF


@dataclass(frozen=True)
class LapicState:
    """One local APIC's registers, pending inputs and timer (see kvmpy/devices/saved_state.py)."""

    apic_base: int
    apic_id: int
    tpr: int
    ldr: int
    dfr: int
    svr: int
    irr: int
    isr: int
    tmr: int
    esr: int
    esr_pending: int        # errors latched into ESR by the next ESR write
    icr_lo: int
    icr_hi: int
    lvt: tuple[int, ...]    # in LVT_REGISTERS order
    timer_initial: int
    timer_divide_config: int
    timer_running: bool
    # the timer's start (its count is computed from it), before the state was taken
    timer_started_ns_ago: int
    # when the armed timer expiry is due, relative to the state's moment
    timer_due_in_ns: int | None
    lint0_level: bool
    nmi_pending: bool
    extint_message: bool
    wait_for_sipi: bool

    def validate(self) -> None:
        check = StateCheck(self)
        check.integer("apic_base", self.apic_base, 0, (1 << 64) - 1)
        if self.apic_base & ~(APIC_BASE_ENABLE | APIC_BASE_BSP) != APIC_DEFAULT_BASE:
            raise check.fail("apic_base", f"{self.apic_base:#x}: the APIC does not move from "
                             f"{APIC_DEFAULT_BASE:#x}")
        check.integer("apic_id", self.apic_id, 0, 0xFF)
        check.integer("tpr", self.tpr, 0, 0xFF)
        check.bits("ldr", self.ldr, 0xFF000000)
        if check.integer("dfr", self.dfr, 0, 0xFFFFFFFF) & 0x0FFFFFFF != 0x0FFFFFFF:
            raise check.fail("dfr", f"{self.dfr:#x}: bits 27:0 read as ones")
        check.integer("svr", self.svr, 0, 0x1FF)
        check.bits("irr", self.irr, VECTOR_BITS)
        check.bits("isr", self.isr, VECTOR_BITS)
        check.bits("tmr", self.tmr, VECTOR_BITS)
        check.bits("esr", self.esr, ESR_BITS)
        check.bits("esr_pending", self.esr_pending, ESR_BITS)
        check.bits("icr_lo", self.icr_lo, 0xFFFFFFFF & ~(1 << 12))
        check.bits("icr_hi", self.icr_hi, 0xFF000000)
        check.integers("lvt", self.lvt, len(LVT_REGISTERS), 0, 0xFFFFFFFF)
        for reg, value in zip(LVT_REGISTERS, self.lvt):
            check.bits(f"lvt[{reg:#x}]", value, _LVT_WRITABLE[reg] | LVT_REMOTE_IRR)
        check.integer("timer_initial", self.timer_initial, 0, 0xFFFFFFFF)
        check.bits("timer_divide_config", self.timer_divide_config, 0xB)
        if check.flag("timer_running", self.timer_running) and self.timer_initial == 0:
            raise check.fail("timer_running", "set with an initial count of 0")
        check.relative_ns("timer_started_ns_ago", self.timer_started_ns_ago)
        if check.optional_relative_ns("timer_due_in_ns", self.timer_due_in_ns) is not None \
                and not self.timer_running:
            raise check.fail("timer_due_in_ns", "an expiry is due but the timer is not running")
        for name, flag in (("lint0_level", self.lint0_level), ("nmi_pending", self.nmi_pending),
                           ("extint_message", self.extint_message),
                           ("wait_for_sipi", self.wait_for_sipi)):
            check.flag(name, flag)


def _top(bits: int) -> int:
    return bits.bit_length() - 1


def _noop(*args) -> None:
    pass


class Lapic(Restorable):
    """One vCPU's local APIC."""

    def __init__(self, cpu_index: int, apic_id: int | None = None, *, bsp: bool | None = None,
                 notify: Callable[[], None] | None = None,
                 send_ipi: Callable[..., None] | None = None,
                 eoi_broadcast: Callable[[int], None] | None = None,
                 pic_ack: Callable[[], int] | None = None,
                 on_init: Callable[[int], None] | None = None,
                 on_sipi: Callable[[int, int], None] | None = None,
                 timer_wheel=None,
                 clock: Callable[[], int] | None = None,
                 bus_hz: int = NOMINAL_BUS_HZ,
                 lock: threading.RLock | None = None) -> None:
        self.cpu_index = cpu_index
        self.bsp = (cpu_index == 0) if bsp is None else bsp
        self._initial_id = (cpu_index if apic_id is None else apic_id) & 0xFF
        self._notify = notify or _noop
        self._send_ipi = send_ipi
        self._eoi_broadcast = eoi_broadcast or _noop
        self._pic_ack = pic_ack
        self._on_init = on_init or _noop
        self._on_sipi = on_sipi or _noop
        self._lock = lock if lock is not None else threading.RLock()
        if clock is None:
            clock = timer_wheel.clock if timer_wheel is not None else time.monotonic_ns
        self._clock = clock
        self.bus_hz = max(1, int(bus_hz))
        self._timer = timer_wheel.timer(self._timer_expired) if timer_wheel is not None else None
        self.apic_base = APIC_DEFAULT_BASE | APIC_BASE_ENABLE | (APIC_BASE_BSP if self.bsp else 0)
        self.lint0_level = False    # the PIC's INTR as seen on LINT0
        self.nmi_pending = False
        self.extint_message = False  # an IOAPIC/MSI ExtINT message awaits its INTA
        self.wait_for_sipi = not self.bsp
        self.stats = {"accepted": 0, "acked": 0, "eoi": 0, "timer_fired": 0, "ipi_sent": 0}
        self._reset_registers()

    # ------------------------------------------------------------------ state

    def _reset_registers(self) -> None:
        """Power-on / INIT state of everything but the APIC base MSR."""
        self.id = self._initial_id
        self.tpr = 0
        self.ldr = 0
        self.dfr = 0xFFFFFFFF
        self.svr = 0xFF
        self.irr = 0
        self.isr = 0
        self.tmr = 0
        self.esr = 0
        self._esr_pending = 0
        self.icr_lo = 0
        self.icr_hi = 0
        self.lvt = {reg: LVT_MASKED for reg in _LVT_WRITABLE}
        if self.bsp:
            # what firmware leaves behind (QEMU and KVM do the same): the PIC's INTR
            # reaches the BSP through LINT0 until Linux sets up the APIC
            self.lvt[REG_LVT_LINT0] = DM_EXTINT << 8
        self.timer_initial = 0
        self.timer_dcr = 0
        self._timer_start = 0
        self._timer_running = False
        self._timer_gen = 0
        self._timer_deadline: int | None = None   # when the armed expiry is due
        if self._timer is not None:
            self._timer.cancel()

    @property
    def hw_enabled(self) -> bool:
        return bool(self.apic_base & APIC_BASE_ENABLE)

    @property
    def sw_enabled(self) -> bool:
        return bool(self.svr & SVR_ENABLE)

    def set_apic_base(self, value: int) -> None:
        """IA32_APIC_BASE MSR write: relocation is ignored, the enable bit is honoured."""
        with self._lock:
            value = int(value) & 0xFFFFFFFFFFFFFFFF
            if (value & APIC_BASE_ADDR_MASK) != APIC_DEFAULT_BASE:
                log.debug("lapic%d: APIC base relocation to %#x ignored", self.cpu_index,
                          value & APIC_BASE_ADDR_MASK)
            was = self.hw_enabled
            self.apic_base = APIC_DEFAULT_BASE | (value & APIC_BASE_ENABLE) | \
                (APIC_BASE_BSP if self.bsp else 0)
            if was and not self.hw_enabled:
                # a hardware-disabled APIC loses its interrupt state (SDM 10.4.3)
                self.svr &= ~SVR_ENABLE
                self.irr = self.isr = self.tmr = 0
                for reg in self.lvt:
                    self.lvt[reg] |= LVT_MASKED
                self._timer_stop()
            self._maybe_notify()

    def reset(self) -> None:
        """Machine reset."""
        with self._lock:
            self.apic_base = APIC_DEFAULT_BASE | APIC_BASE_ENABLE | (APIC_BASE_BSP if self.bsp else 0)
            self.lint0_level = False
            self.nmi_pending = False
            self.extint_message = False
            self.wait_for_sipi = not self.bsp
            self._reset_registers()

    # ------------------------------------------------------------------ priority

    @property
    def ppr(self) -> int:
        isrv = _top(self.isr)
        isr_class = (isrv & 0xF0) if isrv >= 0 else 0
        if (self.tpr & 0xF0) >= isr_class:
            return self.tpr & 0xFF
        return isr_class

    def _deliverable_vector(self) -> int:
        if not self.hw_enabled or not self.sw_enabled:
            return -1
        v = _top(self.irr)
        if v >= 0 and (v & 0xF0) > (self.ppr & 0xF0):
            return v
        return -1

    def _accepts_pic(self) -> bool:
        """Whether the PIC's INTR reaches this CPU as an ExtINT."""
        if not self.hw_enabled:
            return self.bsp    # virtual wire: with the APIC off, INTR goes straight in
        lvt = self.lvt[REG_LVT_LINT0]
        return not lvt & LVT_MASKED and (lvt >> 8) & 7 == DM_EXTINT

    def _extint_pending(self) -> bool:
        return (self.lint0_level and (self.extint_message or self._accepts_pic())
                and self._pic_ack is not None)

    def has_pending(self) -> bool:
        with self._lock:
            return self.nmi_pending or self._deliverable_vector() >= 0 or self._extint_pending()

    def pending_vector(self) -> int:
        """Highest fixed vector the CPU would get now (not acknowledged), or -1."""
        with self._lock:
            return self._deliverable_vector()

    def accept(self, vector: int) -> bool:
        """The CPU took ``vector`` (from pending_vector): IRR -> ISR."""
        with self._lock:
            if not isinstance(vector, int) or not 0 <= vector < 256 or not self.irr >> vector & 1:
                log.debug("lapic%d: accept(%r) of a vector not in IRR", self.cpu_index, vector)
                return False
            self.irr &= ~(1 << vector)
            self.isr |= 1 << vector
            self.stats["acked"] += 1
            return True

    def intr_ack(self) -> int:
        """Interrupt acknowledge: the vector the CPU takes now, or -1."""
        with self._lock:
            v = self._deliverable_vector()
            if v >= 0:
                self.irr &= ~(1 << v)
                self.isr |= 1 << v
                self.stats["acked"] += 1
                return v
            if self._extint_pending():
                self.extint_message = False
                return self._pic_ack() & 0xFF
            return -1

    def take_nmi(self) -> bool:
        with self._lock:
            pending, self.nmi_pending = self.nmi_pending, False
            return pending

    def _maybe_notify(self) -> None:
        if self.nmi_pending or self._deliverable_vector() >= 0 or self._extint_pending():
            self._notify()

    # ------------------------------------------------------------------ inputs

    def accept_irq(self, vector: int, level_triggered: bool = False) -> bool:
        """A fixed / lowest-priority interrupt message arrives (IOAPIC, MSI, IPI, LVT)."""
        with self._lock:
            vector = int(vector) & 0xFF
            if vector < 16:
                self._error(ESR_RECV_ILLEGAL_VECTOR)
                return False
            if not self.hw_enabled:
                return False
            bit = 1 << vector
            self.irr |= bit
            if level_triggered:
                self.tmr |= bit
            else:
                self.tmr &= ~bit
            self.stats["accepted"] += 1
            self._maybe_notify()
            return True

    def deliver(self, mode: int, vector: int, level_triggered: bool = False,
                assert_level: bool = True) -> None:
        """Receive one interrupt message of any delivery mode."""
        with self._lock:
            mode &= 7
            if mode in (DM_FIXED, DM_LOWEST):
                self.accept_irq(vector, level_triggered)
            elif mode == DM_NMI:
                self.nmi()
            elif mode == DM_INIT:
                if level_triggered and not assert_level:
                    return                # INIT level de-assert: no effect on xAPICs
                self.init()
            elif mode == DM_SIPI:
                self.sipi(vector)
            elif mode == DM_EXTINT:
                # the INTA cycle goes to the PIC: pending as long as its INTR is up
                self.extint_message = True
                self._maybe_notify()
            else:
                log.debug("lapic%d: delivery mode %d (SMI/reserved) dropped", self.cpu_index, mode)

    def nmi(self) -> None:
        with self._lock:
            self.nmi_pending = True
            self._notify()

    def init(self) -> None:
        """INIT: registers back to their reset state, then wait for a SIPI."""
        with self._lock:
            self._reset_registers()
            self.nmi_pending = False
            self.wait_for_sipi = True
            self._on_init(self.cpu_index)

    def sipi(self, vector: int) -> None:
        with self._lock:
            if not self.wait_for_sipi:
                log.debug("lapic%d: SIPI %#x outside wait-for-SIPI ignored", self.cpu_index, vector)
                return
            self.wait_for_sipi = False
            self._on_sipi(self.cpu_index, int(vector) & 0xFF)

    def set_lint0(self, level: bool) -> None:
        """The PIC's INTR (wired to LINT0 of every LAPIC)."""
        with self._lock:
            level = bool(level)
            rising = level and not self.lint0_level
            self.lint0_level = level
            self._lint_input(REG_LVT_LINT0, rising)

    def set_lint1(self, level: bool) -> None:
        """The NMI input (LINT1)."""
        with self._lock:
            self._lint_input(REG_LVT_LINT1, bool(level))

    def _lint_input(self, reg: int, rising: bool) -> None:
        lvt = self.lvt[reg]
        if not self.hw_enabled:
            if reg == REG_LVT_LINT0:
                self._maybe_notify()
            elif rising and self.bsp:
                self.nmi()
            return
        if lvt & LVT_MASKED:
            return
        mode = (lvt >> 8) & 7
        if mode == DM_EXTINT:
            self._maybe_notify()
        elif rising and mode == DM_FIXED:
            self._local_interrupt(reg)
        elif rising and mode == DM_NMI:
            self.nmi()

    def _local_interrupt(self, reg: int) -> None:
        """Deliver the interrupt an LVT entry describes."""
        lvt = self.lvt[reg]
        if lvt & LVT_MASKED or not self.hw_enabled:
            return
        mode = (lvt >> 8) & 7 if reg not in (REG_LVT_TIMER, REG_LVT_ERROR) else DM_FIXED
        if mode == DM_NMI:
            self.nmi()
            return
        if mode != DM_FIXED:
            log.debug("lapic%d: LVT %#x delivery mode %d unsupported", self.cpu_index, reg, mode)
            return
        vector = lvt & 0xFF
        if vector < 16:
            # reported in ESR, but without another error interrupt (that would loop)
            self._esr_pending |= ESR_SEND_ILLEGAL_VECTOR
            return
        self.accept_irq(vector, level_triggered=False)

    def _error(self, bits: int) -> None:
        self._esr_pending |= bits
        if self.hw_enabled:
            self._local_interrupt(REG_LVT_ERROR)

    # ------------------------------------------------------------------ EOI

    def eoi(self) -> None:
        with self._lock:
            v = _top(self.isr)
            if v < 0:
                return
            self.isr &= ~(1 << v)
            self.stats["eoi"] += 1
            level = self.tmr >> v & 1
            self.tmr &= ~(1 << v)
            if level:
                self._eoi_broadcast(v)
            self._maybe_notify()

    # ------------------------------------------------------------------ TPR / CR8

    def set_cr8(self, value: int) -> None:
        with self._lock:
            self.tpr = (int(value) & 0xF) << 4
            self._maybe_notify()

    def get_cr8(self) -> int:
        with self._lock:
            return (self.tpr >> 4) & 0xF

    # ------------------------------------------------------------------ logical destination

    def matches_logical(self, dest: int) -> bool:
        dest &= 0xFF
        ldr = (self.ldr >> 24) & 0xFF
        if (self.dfr >> 28) & 0xF == 0xF:            # flat model
            return bool(ldr & dest)
        # cluster model: high nibble is the cluster, low nibble a bitmap in it
        if dest == 0xFF:
            return True
        return (ldr >> 4) == (dest >> 4) and bool(ldr & dest & 0xF)

    def matches_physical(self, dest: int) -> bool:
        dest &= 0xFF
        return dest == 0xFF or dest == self.id

    # ------------------------------------------------------------------ timer

    @property
    def timer_divide(self) -> int:
        code = (self.timer_dcr & 3) | ((self.timer_dcr >> 1) & 4)
        return 1 << ((code + 1) & 7)

    def _ticks_to_ns(self, ticks: int) -> int:
        return -(-ticks * self.timer_divide * 1_000_000_000 // self.bus_hz)

    def _elapsed_ticks(self, now: int) -> int:
        return max(0, now - self._timer_start) * self.bus_hz // (1_000_000_000 * self.timer_divide)

    def _current_count(self, now: int) -> int:
        if not self._timer_running or self.timer_initial == 0:
            return 0
        ticks = self._elapsed_ticks(now)
        if self.lvt[REG_LVT_TIMER] & LVT_PERIODIC:
            return self.timer_initial - ticks % self.timer_initial
        return max(0, self.timer_initial - ticks)

    def current_count(self) -> int:
        with self._lock:
            return self._current_count(self._clock())

    def _timer_stop(self) -> None:
        self._timer_running = False
        self._timer_gen += 1
        self._timer_deadline = None
        if self._timer is not None:
            self._timer.cancel()

    def _timer_start_at(self, start: int) -> None:
        self._timer_start = start
        self._timer_running = self.timer_initial != 0
        self._timer_gen += 1
        if not self._timer_running:
            self._timer_deadline = None
            if self._timer is not None:
                self._timer.cancel()
            return
        period = self._ticks_to_ns(self.timer_initial)
        now = self._clock()
        if self.lvt[REG_LVT_TIMER] & LVT_PERIODIC:
            k = max(1, -(-(now - start) // period)) if now > start else 1
            self._arm_timer(start + k * period)
        else:
            self._arm_timer(start + period)

    def _arm_timer(self, deadline: int) -> None:
        self._timer_deadline = deadline
        if self._timer is not None:
            self._timer.arm(deadline, self._timer_gen)

    @property
    def timer_interrupt_due_ns(self) -> int | None:
        """When the armed timer expires with an interrupt (the wheel's clock); None if it
        is not armed or its LVT is masked (that expiry ends no halt)."""
        if self.lvt[REG_LVT_TIMER] & LVT_MASKED or not self.hw_enabled:
            return None
        return self._timer_deadline

    def expire_timer_if_due(self) -> bool:
        """On a halted vCPU's own thread: expire the timer now if its deadline has
        passed, rather than sleep on until the wheel's loop thread gets to it (under a
        loaded host that took milliseconds). The wheel's later call finds the expiry
        done. True if this call expired it."""
        with self._lock:
            deadline, token = self._timer_deadline, self._timer_gen
        if deadline is None or self._clock() < deadline:
            return False
        return self._timer_expired(deadline, token)

    def _timer_expired(self, deadline: int, token=None) -> bool:
        with self._lock:
            # the deadline too: expire_timer_if_due and the wheel may both come for one expiry
            if token != self._timer_gen or not self._timer_running or deadline != self._timer_deadline:
                return False
            self._timer_deadline = None
            self.stats["timer_fired"] += 1
            self._local_interrupt(REG_LVT_TIMER)
            if self.lvt[REG_LVT_TIMER] & LVT_PERIODIC:
                period = self._ticks_to_ns(self.timer_initial)
                now = self._clock()
                nxt = deadline + period
                if nxt <= now:
                    # the host fell behind: skip the lost periods, they coalesce in IRR anyway
                    nxt = self._timer_start + (-(-(now - self._timer_start) // period)) * period
                self._arm_timer(max(nxt, deadline + MIN_PERIOD_NS))
            # one-shot: the count stays at 0 until the next initial-count write
            return True

    # ------------------------------------------------------------------ MMIO

    def read(self, offset: int, size: int) -> int:
        mask = (1 << (8 * min(max(size, 1), 8))) - 1
        if not isinstance(offset, int) or not 0 <= offset < 0x1000 or size not in (1, 2, 4, 8):
            log.debug("lapic%d: bad read offset=%r size=%r", self.cpu_index, offset, size)
            return mask
        with self._lock:
            if not self.hw_enabled:
                return mask
            sub = offset & 0xF
            if sub + size > 4:
                log.debug("lapic%d: read at %#x size %d crosses a register", self.cpu_index, offset, size)
            value = self._read_register(offset & 0xFF0)
            return (value >> (8 * min(sub, 4))) & mask & 0xFFFFFFFF

    def _read_register(self, reg: int) -> int:
        if reg == REG_ID:
            return self.id << 24
        if reg == REG_VERSION:
            return APIC_VERSION
        if reg == REG_TPR:
            return self.tpr
        if reg == REG_APR:
            return 0
        if reg == REG_PPR:
            return self.ppr
        if reg in (REG_EOI, REG_RRD):
            return 0
        if reg == REG_LDR:
            return self.ldr
        if reg == REG_DFR:
            return self.dfr
        if reg == REG_SVR:
            return self.svr
        if REG_ISR <= reg < REG_ISR + 0x80:
            return (self.isr >> (32 * ((reg - REG_ISR) >> 4))) & 0xFFFFFFFF
        if REG_TMR <= reg < REG_TMR + 0x80:
            return (self.tmr >> (32 * ((reg - REG_TMR) >> 4))) & 0xFFFFFFFF
        if REG_IRR <= reg < REG_IRR + 0x80:
            return (self.irr >> (32 * ((reg - REG_IRR) >> 4))) & 0xFFFFFFFF
        if reg == REG_ESR:
            return self.esr
        if reg == REG_ICR_LO:
            return self.icr_lo & ~(1 << 12)      # delivery is instantaneous: never "pending"
        if reg == REG_ICR_HI:
            return self.icr_hi
        if reg in self.lvt:
            return self.lvt[reg]
        if reg == REG_TIMER_ICR:
            return self.timer_initial
        if reg == REG_TIMER_CCR:
            return self._current_count(self._clock())
        if reg == REG_TIMER_DCR:
            return self.timer_dcr
        self._error(ESR_ILLEGAL_REGISTER)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if not isinstance(offset, int) or not 0 <= offset < 0x1000 or offset & 0xF or size != 4:
            # Linux only ever does aligned 32-bit accesses; anything else is dropped
            log.debug("lapic%d: dropped write offset=%r size=%r", self.cpu_index, offset, size)
            return
        with self._lock:
            if not self.hw_enabled:
                return
            self._write_register(offset, int(value) & 0xFFFFFFFF)

    def _write_register(self, reg: int, value: int) -> None:
        if reg == REG_ID:
            self.id = value >> 24
        elif reg == REG_TPR:
            self.tpr = value & 0xFF
            self._maybe_notify()
        elif reg == REG_EOI:
            self.eoi()
        elif reg == REG_LDR:
            self.ldr = value & 0xFF000000
        elif reg == REG_DFR:
            self.dfr = (value & 0xF0000000) | 0x0FFFFFFF
        elif reg == REG_SVR:
            self.svr = value & 0x1FF         # no focus checking, no EOI-broadcast suppression
            if not self.sw_enabled:
                for r in self.lvt:
                    self.lvt[r] |= LVT_MASKED
            self._maybe_notify()
        elif reg == REG_ESR:
            self.esr, self._esr_pending = self._esr_pending, 0
        elif reg == REG_ICR_LO:
            self.icr_lo = value & 0xFFFFFFFF & ~(1 << 12)
            self._send_icr()
        elif reg == REG_ICR_HI:
            self.icr_hi = value & 0xFF000000
        elif reg in self.lvt:
            new = value & _LVT_WRITABLE[reg]
            if not self.sw_enabled:
                new |= LVT_MASKED
            old = self.lvt[reg]
            self.lvt[reg] = new | (old & LVT_REMOTE_IRR)
            if reg == REG_LVT_TIMER and (old ^ new) & LVT_PERIODIC and self._timer_running:
                self._timer_start_at(self._timer_start)
            elif reg == REG_LVT_LINT0:
                self._maybe_notify()
        elif reg == REG_TIMER_ICR:
            self.timer_initial = value
            self._timer_start_at(self._clock())
        elif reg == REG_TIMER_DCR:
            now = self._clock()
            cur = self._current_count(now)
            self.timer_dcr = value & 0xB
            if self._timer_running:
                # keep the current count, continue at the new rate
                done = self.timer_initial - cur
                self._timer_start_at(now - self._ticks_to_ns(done))
        elif reg in (REG_VERSION, REG_APR, REG_PPR, REG_RRD, REG_TIMER_CCR) or \
                REG_ISR <= reg < REG_IRR + 0x80:
            log.debug("lapic%d: write to read-only register %#x", self.cpu_index, reg)
        else:
            self._error(ESR_ILLEGAL_REGISTER)

    def _send_icr(self) -> None:
        lo = self.icr_lo
        vector = lo & 0xFF
        mode = (lo >> 8) & 7
        logical = bool(lo & (1 << 11))
        assert_level = bool(lo & (1 << 14))
        level_trig = bool(lo & (1 << 15))
        shorthand = (lo >> 18) & 3
        dest = (self.icr_hi >> 24) & 0xFF
        if mode in (DM_FIXED, DM_LOWEST) and vector < 16:
            self._error(ESR_SEND_ILLEGAL_VECTOR)
            return
        self.stats["ipi_sent"] += 1
        if self._send_ipi is not None:
            self._send_ipi(self, dest, logical, mode, vector, level_trig, assert_level, shorthand)
        elif shorthand in (1, 2) or (shorthand == 0 and
                                     (self.matches_logical(dest) if logical else self.matches_physical(dest))):
            # a lone LAPIC (no bus): it can still interrupt itself
            self.deliver(mode, vector, level_trig, assert_level)

    # ------------------------------------------------------------------ saved state

    def state(self) -> LapicState:
        with self._lock:
            now = self._clock()
            return LapicState(
                apic_base=self.apic_base, apic_id=self.id, tpr=self.tpr, ldr=self.ldr, dfr=self.dfr,
                svr=self.svr, irr=self.irr, isr=self.isr, tmr=self.tmr, esr=self.esr,
                esr_pending=self._esr_pending, icr_lo=self.icr_lo, icr_hi=self.icr_hi,
                lvt=tuple(self.lvt[reg] for reg in LVT_REGISTERS),
                timer_initial=self.timer_initial, timer_divide_config=self.timer_dcr,
                timer_running=self._timer_running, timer_started_ns_ago=now - self._timer_start,
                timer_due_in_ns=None if self._timer_deadline is None else self._timer_deadline - now,
                lint0_level=self.lint0_level, nmi_pending=self.nmi_pending,
                extint_message=self.extint_message, wait_for_sipi=self.wait_for_sipi)

    def restore(self, state: LapicState) -> None:
        """Take over ``state`` (StateError and no change if it is malformed); the vCPU is
        kicked if an interrupt is pending."""
        state = checked(state, LapicState)
        if bool(state.apic_base & APIC_BASE_BSP) != self.bsp:
            raise StateCheck(state).fail("apic_base", f"BSP flag {bool(state.apic_base & APIC_BASE_BSP)}"
                                         f" restored into LAPIC {self.cpu_index} (bsp={self.bsp})")
        with self._lock:
            self.apic_base = state.apic_base
            self.id = state.apic_id
            self.tpr, self.ldr, self.dfr, self.svr = state.tpr, state.ldr, state.dfr, state.svr
            self.irr, self.isr, self.tmr = state.irr, state.isr, state.tmr
            self.esr, self._esr_pending = state.esr, state.esr_pending
            self.icr_lo, self.icr_hi = state.icr_lo, state.icr_hi
            self.lvt = dict(zip(LVT_REGISTERS, state.lvt))
            self.timer_initial = state.timer_initial
            self.timer_dcr = state.timer_divide_config
            self.lint0_level = state.lint0_level
            self.nmi_pending = state.nmi_pending
            self.extint_message = state.extint_message
            self.wait_for_sipi = state.wait_for_sipi
            now = self._clock()
            self._timer_stop()
            self._timer_start = now - state.timer_started_ns_ago
            self._timer_running = state.timer_running
            if state.timer_due_in_ns is not None:
                self._arm_timer(now + state.timer_due_in_ns)
            self._maybe_notify()
