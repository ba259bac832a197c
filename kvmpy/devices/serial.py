"""A 16550A UART (COM1 at 0x3f8, 8 ports) as a pure state machine.

The model follows what Linux's 8250 driver checks when it autodetects a port
(IER masks to 4 bits, MSR follows MCR in loopback, IIR bits 7:6 report an
enabled FIFO and bits 5:4 read 0 so no 16750/NS/XScale variant is matched) and
how it drives the port afterwards (THRE re-asserted when IER.THRI is enabled
with an empty transmitter, which its startup "THRE test" relies on).

Transmission is instantaneous: every THR write becomes one ``out(bytes)`` call at
once, so THRE and TEMT always read 1. The machine passes the console's
``buffered_write`` as ``out``, which gathers a burst for a few milliseconds before
one host write (kvmpy/console.py says what a SIGKILL can lose). Reception has a 16-byte FIFO (1 byte with the FIFO
disabled). The host pushes input with ``receive``, which accepts only what fits
so the console keeps the rest (back-pressure); ``on_rx_space`` tells it when the
guest has drained the FIFO. Overrun happens only in loopback mode, where the
guest itself overfills the FIFO.

The character-timeout interrupt is modelled as immediately due whenever the FIFO
holds fewer bytes than the trigger level: there is no host timer, and reporting
it at once only makes the guest read sooner.

The interrupt output is gated by MCR.OUT2 as on a PC (the OUT2 pin enables the
IRQ driver) and, because loopback forces OUT2's pin inactive, is off in loopback.
``irq(level)`` is called only when the line changes.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

from .bus import PortSlot
from .saved_state import Restorable, StateCheck, checked

log = logging.getLogger(__name__)

# register offsets
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

# IER
IER_RDI = 0x01
IER_THRI = 0x02
IER_RLSI = 0x04
IER_MSI = 0x08
IER_MASK = 0x0F

# IIR
IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_TIMEOUT = 0x0C
IIR_FIFO_ENABLED = 0xC0

# FCR
FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_CLEAR_XMIT = 0x04
FCR_TRIGGER_MASK = 0xC0
TRIGGER_LEVELS = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}

# LCR
LCR_DLAB = 0x80
LCR_SBC = 0x40

# MCR
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

# LSR
LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_FIFOE = 0x80
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

# MSR
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F

FIFO_SIZE = 16
# What the (virtual) cable presents when not in loopback: a null-modem peer that
# is always there, as QEMU reports.
EXTERNAL_LINES = MSR_DCD | MSR_DSR | MSR_CTS

# What a THR write hands to ``out``, made once rather than per byte.
SINGLE_BYTES = tuple(bytes((b,)) for b in range(256))

PORT_COUNT = 8
COM1 = PortSlot(base=0x3F8, length=PORT_COUNT, irq=4)


@dataclass(frozen=True)
class SerialState:
    """A Serial16550's registers and RX FIFO (see kvmpy/devices/saved_state.py)."""

    ier: int
    lcr: int
    mcr: int
    scr: int
    dll: int
    dlm: int
    fifo_enabled: bool
    fcr_trigger_bits: int
    rx: bytes
    lsr_errors: int
    thr_pending: bool
    msr_deltas: int
    last_rbr: int
    # the host has input the FIFO had no room for: on_rx_space is owed to it
    rx_wanted: bool

    def validate(self) -> None:
        check = StateCheck(self)
        check.bits("ier", self.ier, IER_MASK)
        check.integer("lcr", self.lcr, 0, 0xFF)
        check.bits("mcr", self.mcr, MCR_MASK)
        check.integer("scr", self.scr, 0, 0xFF)
        check.integer("dll", self.dll, 0, 0xFF)
        check.integer("dlm", self.dlm, 0, 0xFF)
        check.flag("fifo_enabled", self.fifo_enabled)
        check.integer("fcr_trigger_bits", self.fcr_trigger_bits, 0, 0xFF)
        if self.fcr_trigger_bits not in TRIGGER_LEVELS:
            raise check.fail("fcr_trigger_bits", f"{self.fcr_trigger_bits:#x} is no trigger level")
        check.data("rx", self.rx, max_length=FIFO_SIZE if self.fifo_enabled else 1)
        check.bits("lsr_errors", self.lsr_errors, LSR_ERRORS)
        check.flag("thr_pending", self.thr_pending)
        check.bits("msr_deltas", self.msr_deltas, MSR_DELTAS)
        check.integer("last_rbr", self.last_rbr, 0, 0xFF)
        check.flag("rx_wanted", self.rx_wanted)


class Serial16550(Restorable):
    def __init__(self, irq: Callable[[bool], None], out: Callable[[bytes], None],
                 on_rx_space: Callable[[], None] | None = None,
                 tx_batching: Callable[[bool], None] | None = None,
                 publish_lsr: Callable[[int | None], None] | None = None) -> None:
        """``tx_batching(True)``, when given, is called once: THR writes may be queued
        and handed over later (KVM's coalesced port writes), whatever IER says.

        ``publish_lsr``, when given, is told LSR's value whenever a read of it would
        change nothing (no error latched) and no queued THR write could change it
        (loopback off), and None otherwise; the accelerator answers the guest's LSR
        reads from it without an exit (kvmpy.devices.context.PublishedPortReads).
        It is told before the access or host call that changed the value returns.

        Why queueing is safe: every read of a UART register leaves the guest, or
        is an LSR read answered from the published value, which THR writes do not
        change; and the vCPU loop hands the queued writes over before it serves any
        exit, so IIR, RBR and every other register read reflect all earlier THR
        writes, in order. What a queued write delays is only its effect on the
        interrupt line: THRE's interrupt (IER.THRI), or the RX one of a loopback
        byte, comes when the write is handed over (the guest's next exit, or the
        coalesced ring's drain timer within 10 ms), as it would from a UART on a
        slower line. THR writes have no other effect. Linux's 8250 driver writes
        THR with IER 0 from the console (one LSR read per byte, answered without
        Python where LSR is published; two exits per byte in QEMU) and, with
        THRI, up to 16 bytes per interrupt from its handler, whose loop then reads
        IIR again: one exit per 16 bytes instead of one per byte. QEMU does not
        queue THR writes; this is kvmpy's own use of KVM's coalesced PIO."""
        self._irq = irq
        self._out = out
        self._on_rx_space = on_rx_space
        # Serialises what changes an interrupt source against the host side
        # (receive, send_break on the console's thread). Output order needs no lock:
        # THR writes come from one thread at a time (the vCPU, or the coalesced
        # ring's drain, which has its own lock and empties the ring before the vCPU
        # serves any exit). RLock: a callback run under it that re-enters the UART
        # must not deadlock.
        self._lock = threading.RLock()
        self._irq_level = False
        self._rx_wanted = False
        self._publish_lsr = publish_lsr
        self._published_lsr: int | None = None      # what the accelerator answers now
        self._readers = (self._read_rbr_dll, self._read_ier_dlm, self._read_iir, self._read_lcr,
                         self._read_mcr, self._read_lsr, self._read_msr, self._read_scr)
        self._writers = (self._write_thr_dll, self._write_ier_dlm, self._write_fcr, self._write_lcr,
                         self._write_mcr, self._write_read_only, self._write_read_only, self._write_scr)
        self.reset()
        if tx_batching is not None:
            tx_batching(True)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        with self._lock:
            self.ier = 0
            self.lcr = 0
            self.mcr = 0
            self.scr = 0
            self.dll = 0x0C  # 9600 baud with the PC's 1.8432 MHz clock
            self.dlm = 0
            self.fifo_enabled = False
            self.trigger = 1
            self.fcr_trigger_bits = 0
            self.rx: deque[int] = deque()
            self.lsr_errors = 0  # OE/PE/FE/BI latched until LSR is read
            self.thr_pending = True  # THR starts empty; IER gates reporting
            self.msr_deltas = 0
            self.last_rbr = 0
            self._update_outputs()

    def state(self) -> SerialState:
        with self._lock:
            return SerialState(
                ier=self.ier, lcr=self.lcr, mcr=self.mcr, scr=self.scr, dll=self.dll, dlm=self.dlm,
                fifo_enabled=self.fifo_enabled, fcr_trigger_bits=self.fcr_trigger_bits,
                rx=bytes(self.rx), lsr_errors=self.lsr_errors, thr_pending=self.thr_pending,
                msr_deltas=self.msr_deltas, last_rbr=self.last_rbr, rx_wanted=self._rx_wanted)

    def restore(self, state: SerialState) -> None:
        """Take over ``state`` (StateError and no change if it is malformed)."""
        state = checked(state, SerialState)
        with self._lock:
            self.ier, self.lcr, self.mcr, self.scr = state.ier, state.lcr, state.mcr, state.scr
            self.dll, self.dlm = state.dll, state.dlm
            self.fifo_enabled = state.fifo_enabled
            self.fcr_trigger_bits = state.fcr_trigger_bits
            self.trigger = TRIGGER_LEVELS[state.fcr_trigger_bits]
            self.rx = deque(state.rx)
            self.lsr_errors = state.lsr_errors
            self.thr_pending = state.thr_pending
            self.msr_deltas = state.msr_deltas
            self.last_rbr = state.last_rbr
            self._rx_wanted = state.rx_wanted
            self._update_outputs()

    @property
    def rx_capacity(self) -> int:
        return FIFO_SIZE if self.fifo_enabled else 1

    def rx_space(self) -> int:
        with self._lock:
            return max(0, self.rx_capacity - len(self.rx))

    def _lines(self) -> int:
        """The modem-status line bits (MSR 7:4) as currently seen."""
        if self.mcr & MCR_LOOP:
            m = self.mcr
            return ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                    | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
        return EXTERNAL_LINES

    def _lsr(self) -> int:
        v = LSR_THRE | LSR_TEMT | self.lsr_errors
        if self.rx:
            v |= LSR_DR
        if self.fifo_enabled and self.lsr_errors & (LSR_PE | LSR_FE | LSR_BI):
            v |= LSR_FIFOE
        return v

    def _pending_iid(self) -> int:
        """The highest-priority interrupt source, as the IIR low nibble."""
        ier = self.ier
        if ier & IER_RLSI and self.lsr_errors:
            return IIR_RLSI
        if ier & IER_RDI and self.rx:
            if not self.fifo_enabled or len(self.rx) >= self.trigger:
                return IIR_RDI
            return IIR_TIMEOUT
        if ier & IER_THRI and self.thr_pending:
            return IIR_THRI
        if ier & IER_MSI and self.msr_deltas:
            return IIR_MSI
        return IIR_NO_INT

    def interrupt_line(self) -> bool:
        """What the IRQ pin is driven to now (no side effects)."""
        with self._lock:
            return self._line()

    def _line(self) -> bool:
        return (self._pending_iid() != IIR_NO_INT and bool(self.mcr & MCR_OUT2)
                and not self.mcr & MCR_LOOP)

    def _update_outputs(self) -> None:
        """After any change made under the lock: LSR's published value (every change
        to the FIFO, the latched errors or MCR is made under the lock), then the
        interrupt line. In that order: a guest that takes the RX interrupt reads LSR
        at once, from the published value where the accelerator answers it, and an
        old value there (DR clear) would leave an edge-triggered IRQ unanswered."""
        if self._publish_lsr is not None:
            lsr = None if self.lsr_errors or self.mcr & MCR_LOOP else self._lsr()
            if lsr != self._published_lsr:
                self._published_lsr = lsr
                self._publish_lsr(lsr)
        level = self._line()
        if level != self._irq_level:
            self._irq_level = level
            self._irq(level)

    # ------------------------------------------------------------ host side
    def receive(self, data: bytes) -> int:
        """Queue host input; returns how many bytes fitted in the RX FIFO."""
        with self._lock:
            n = min(len(data), self.rx_capacity - len(self.rx))
            if n > 0:
                self.rx.extend(data[:n])
                self._update_outputs()
            if n < len(data):
                self._rx_wanted = True
            return max(n, 0)

    def send_break(self) -> None:
        """A break condition on the line: a NUL with BI, as the receiver loads it."""
        with self._lock:
            if len(self.rx) < self.rx_capacity:
                self.rx.append(0)
            else:
                self.lsr_errors |= LSR_OE
            self.lsr_errors |= LSR_BI
            self._update_outputs()

    # ----------------------------------------------------------- guest side
    # Each register has its own read and write method, found by offset in a table:
    # the vCPU loop calls them directly (``register_accessors``), so a claimed
    # access costs one call. Under nested KVM every frame and every object a guest
    # exit touches is paid again after each exit, so the registers whose access has
    # no effect on the interrupt line (SCR, LCR, DLL/DLM, IER and MCR reads, LSR and
    # MSR with nothing latched, a THR write while THRE is already due) take no lock
    # and skip the line update. Lock-free paths write only lcr, scr, dll and dlm,
    # which no interrupt source depends on, and read single attributes, so every
    # locked path still sees a consistent state; the rest take the lock as before.
    def register_accessors(self, offset: int) -> tuple[Callable[[int, int], int], Callable[[int, int, int], None]]:
        """The read and write serving ``offset`` (Bus.accessor's per-register fast path)."""
        reg = offset & 7
        return self._readers[reg], self._writers[reg]

    def read(self, offset: int, size: int) -> int:
        if size != 1:
            log.debug("serial: %d-byte read at offset %d, answering the low byte", size, offset)
        return self._readers[offset & 7](offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 1:
            log.debug("serial: %d-byte write at offset %d, using the low byte", size, offset)
        self._writers[offset & 7](offset, size, value)

    def write_burst(self, offset: int, data: bytes) -> None:
        """``len(data)`` byte writes to ``offset``, in order, with the effect of writing
        them one by one: the queued THR writes KVM's coalesced ring hands over, which
        go to ``out`` as one call. THRE rises at most once over the run, as it would
        over single writes; DLAB or loopback (set only by exits, which empty the ring
        first) send the run through the single-byte path."""
        write = self._writers[offset & 7]
        if not data:
            return
        if offset & 7 != RBR_THR_DLL:
            for value in data:
                write(offset, 1, value)
            return
        with self._lock:
            if self.lcr & LCR_DLAB or self.mcr & MCR_LOOP:
                for value in data:
                    write(offset, 1, value)
                return
            self._out(bytes(data))
            if not self.thr_pending:
                self.thr_pending = True
                self._update_outputs()

    def _locked_read(self, reg: int) -> int:
        with self._lock:
            value = self._read(reg)
            self._update_outputs()
            return value

    def _locked_write(self, reg: int, value: int) -> None:
        with self._lock:
            self._write(reg, value & 0xFF)
            self._update_outputs()

    def _read_rbr_dll(self, offset: int, size: int) -> int:
        if self.lcr & LCR_DLAB:
            return self.dll
        return self._locked_read(RBR_THR_DLL)

    def _read_ier_dlm(self, offset: int, size: int) -> int:
        return self.dlm if self.lcr & LCR_DLAB else self.ier

    def _read_iir(self, offset: int, size: int) -> int:
        # Reading IIR changes something only when it reports THRE (which it takes):
        # the line is looked at again only then.
        with self._lock:
            iid = self._pending_iid()
            if iid == IIR_THRI:
                self.thr_pending = False
                self._update_outputs()
            return iid | (IIR_FIFO_ENABLED if self.fifo_enabled else 0)

    def _read_lcr(self, offset: int, size: int) -> int:
        return self.lcr

    def _read_mcr(self, offset: int, size: int) -> int:
        return self.mcr

    def _read_lsr(self, offset: int, size: int) -> int:
        # The FIFO first, the latched errors second: the host side only adds to
        # either, so errors still clear when read mean none had arrived when the
        # FIFO was looked at, and the value is the state of that moment. With
        # errors latched the read clears them, which moves the line: locked.
        ready = LSR_DR if self.rx else 0
        if self.lsr_errors:
            return self._locked_read(LSR)
        return LSR_THRE | LSR_TEMT | ready

    def _read_msr(self, offset: int, size: int) -> int:
        # Deltas come only from the guest's own MCR writes; none latched, the read
        # changes nothing.
        if self.msr_deltas:
            return self._locked_read(MSR)
        return self._lines()

    def _read_scr(self, offset: int, size: int) -> int:
        return self.scr

    def _write_thr_dll(self, offset: int, size: int, value: int) -> None:
        if self.lcr & LCR_DLAB:
            self.dll = value & 0xFF
        elif self.thr_pending and not self.mcr & MCR_LOOP:
            # THRE already due and the byte leaves at once: nothing else changes,
            # so there is no line to update and nothing a lock would order.
            self._out(SINGLE_BYTES[value & 0xFF])
            if not self.thr_pending:
                # Another vCPU took THRE (an IIR read) between the check and the byte,
                # in a guest that does not lock its UART: this byte makes THRE due
                # again, as the locked path would have, or its interrupt is lost.
                with self._lock:
                    if not self.thr_pending:
                        self.thr_pending = True
                        self._update_outputs()
        else:
            self._locked_write(RBR_THR_DLL, value)

    def _write_ier_dlm(self, offset: int, size: int, value: int) -> None:
        if self.lcr & LCR_DLAB:
            self.dlm = value & 0xFF
        elif value & IER_MASK != self.ier:
            self._locked_write(IER_DLM, value)

    def _write_fcr(self, offset: int, size: int, value: int) -> None:
        self._locked_write(IIR_FCR, value)

    def _write_lcr(self, offset: int, size: int, value: int) -> None:
        self.lcr = value & 0xFF

    def _write_mcr(self, offset: int, size: int, value: int) -> None:
        if value & MCR_MASK != self.mcr:
            self._locked_write(MCR, value)

    def _write_read_only(self, offset: int, size: int, value: int) -> None:
        log.debug("serial: write %#x to read-only %s ignored", value & 0xFF, "LSR" if offset & 7 == LSR else "MSR")

    def _write_scr(self, offset: int, size: int, value: int) -> None:
        self.scr = value & 0xFF

    def _read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return self.dll
            if self.rx:
                self.last_rbr = self.rx.popleft()
                if self._rx_wanted and self._on_rx_space is not None:
                    self._rx_wanted = False
                    self._on_rx_space()
            return self.last_rbr
        if offset == LSR:
            v = self._lsr()
            self.lsr_errors = 0
            return v
        if offset == MSR:
            v = self._lines() | self.msr_deltas
            self.msr_deltas = 0
            return v
        raise AssertionError(f"serial: offset {offset} is read without the lock")

    def _write(self, offset: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self.dll = value
                return
            self._transmit(value)
        elif offset == IER_DLM:
            if dlab:
                self.dlm = value
                return
            old = self.ier
            self.ier = value & IER_MASK
            # A 16550 with an idle transmitter raises THRE as soon as THRI is
            # enabled; Linux's startup THRE test depends on it.
            if self.ier & IER_THRI and not old & IER_THRI:
                self.thr_pending = True
        elif offset == IIR_FCR:
            self._write_fcr_locked(value)
        elif offset == MCR:
            before = self._lines()
            self.mcr = value & MCR_MASK
            self._note_line_change(before, self._lines())
        else:
            raise AssertionError(f"serial: offset {offset} is written without the lock")

    def _transmit(self, value: int) -> None:
        if self.mcr & MCR_LOOP:
            if len(self.rx) < self.rx_capacity:
                self.rx.append(value)
            else:
                self.lsr_errors |= LSR_OE
        else:
            self._out(SINGLE_BYTES[value])
        # The byte left THR at once: THR is empty again and THRE is due.
        self.thr_pending = True

    def _write_fcr_locked(self, value: int) -> None:
        enable = bool(value & FCR_ENABLE_FIFO)
        if enable != self.fifo_enabled:
            # Toggling the FIFO enable resets both FIFOs (16550A data sheet).
            self.rx.clear()
            self.fifo_enabled = enable
        if not enable:
            return  # the other FCR bits are only written with bit 0 set
        if value & FCR_CLEAR_RCVR:
            self.rx.clear()
        self.fcr_trigger_bits = value & FCR_TRIGGER_MASK
        self.trigger = TRIGGER_LEVELS[self.fcr_trigger_bits]
        if self._rx_wanted and self._on_rx_space is not None and len(self.rx) < self.rx_capacity:
            self._rx_wanted = False
            self._on_rx_space()

    def _note_line_change(self, before: int, after: int) -> None:
        changed = before ^ after
        if changed & MSR_CTS:
            self.msr_deltas |= MSR_DCTS
        if changed & MSR_DSR:
            self.msr_deltas |= MSR_DDSR
        if changed & MSR_DCD:
            self.msr_deltas |= MSR_DDCD
        if before & MSR_RI and not after & MSR_RI:
            self.msr_deltas |= MSR_TERI
