"""An 8042 keyboard controller with a minimal AT keyboard and no AUX (mouse) port.

Enough for Linux's i8042 and atkbd drivers to probe quickly and quietly (each
command is answered at once, so no 0.5 s controller timeouts) and for the
``reboot=k`` path: command 0xfe pulses the CPU reset line, calling ``on_reset``.

Registered as two devices: ``I8042.data`` at 0x60 and ``I8042.command`` at 0x64
(``register(bus)`` does both). The keyboard interrupt is ISA IRQ 1, driven
through ``irq_kbd(level)``: high while the output buffer holds a keyboard byte
and the configuration byte enables the keyboard interrupt (an edge for the
in-kernel PIC/IOAPIC, as QEMU drives it).

There is no AUX port: AUX loopback (0xd3) is refused by answering without the
AUXDATA status bit and the AUX interface test (0xa9) reports "clock line stuck
high", which makes Linux drop the AUX port without waiting. Describing only
PNP0303 in the DSDT (kvmpy.boot.acpi) gets the same result earlier.
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

DATA_PORT = 0x60
COMMAND_PORT = 0x64
KBD_IRQ = 1
# Two single ports, not a range: 0x61 between them is the PIT's port B.
KBD_DATA = PortSlot(base=DATA_PORT, length=1, irq=KBD_IRQ)
KBD_COMMAND = PortSlot(base=COMMAND_PORT, length=1)

# status register
STR_OBF = 0x01
STR_IBF = 0x02
STR_SYSFLAG = 0x04
STR_CMDDAT = 0x08  # last write went to the command port
STR_KEYLOCK = 0x10  # 1 = keyboard not inhibited
STR_AUXDATA = 0x20
STR_TIMEOUT = 0x40
STR_PARITY = 0x80

# controller configuration byte (CTR)
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYSFLAG = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40

CTR_DEFAULT = CTR_KBDINT | CTR_SYSFLAG | CTR_AUXDIS | CTR_XLATE

# keyboard replies
KBD_ACK = 0xFA
KBD_RESEND = 0xFE
KBD_BAT_OK = 0xAA

# commands that take one data byte after them (to the keyboard)
_KBD_CMDS_WITH_ARG = {0xED, 0xF0, 0xF3}
# controller commands that take one data byte after them
_CONTROLLER_CMDS_WITH_ARG = frozenset(range(0x60, 0x80)) | {0xD1, 0xD2, 0xD3, 0xD4}

# The keyboard queue only grows with host input (inject_scancodes); a saved state
# holding more than this much unread input is not one this model produced.
MAX_SAVED_QUEUE = 1 << 16


@dataclass(frozen=True)
class I8042State:
    """The controller's registers and the keyboard's (see kvmpy/devices/saved_state.py)."""

    ctr: int
    ram: bytes
    status: int
    output_buffer: int | None
    output_is_aux: bool
    keyboard_queue: bytes
    pending_command: int | None
    keyboard_pending_command: int | None
    keyboard_scanning: bool
    scancode_set: int
    output_port: int

    def validate(self) -> None:
        check = StateCheck(self)
        check.integer("ctr", self.ctr, 0, 0xFF)
        check.data("ram", self.ram, length=32)
        check.bits("status", self.status, STR_SYSFLAG | STR_KEYLOCK | STR_CMDDAT)
        check.optional_integer("output_buffer", self.output_buffer, 0, 0xFF)
        if check.flag("output_is_aux", self.output_is_aux) and self.output_buffer is None:
            raise check.fail("output_is_aux", "set with an empty output buffer")
        check.data("keyboard_queue", self.keyboard_queue, max_length=MAX_SAVED_QUEUE)
        if check.optional_integer("pending_command", self.pending_command, 0, 0xFF) is not None \
                and self.pending_command not in _CONTROLLER_CMDS_WITH_ARG:
            raise check.fail("pending_command", f"{self.pending_command:#x} takes no data byte")
        if check.optional_integer("keyboard_pending_command", self.keyboard_pending_command,
                                  0, 0xFF) is not None \
                and self.keyboard_pending_command not in _KBD_CMDS_WITH_ARG:
            raise check.fail("keyboard_pending_command",
                             f"{self.keyboard_pending_command:#x} takes no argument")
        check.flag("keyboard_scanning", self.keyboard_scanning)
        check.integer("scancode_set", self.scancode_set, 1, 3)
        if not check.integer("output_port", self.output_port, 0, 0xFF) & 0x02:
            raise check.fail("output_port", "A20 (bit 1) is always on in this model")


class I8042(Restorable):
    def __init__(self, on_reset: Callable[[], None],
                 irq_kbd: Callable[[bool], None] | None = None,
                 keyboard: bool = True) -> None:
        self._on_reset = on_reset
        self._irq_kbd = irq_kbd or (lambda level: None)
        self.keyboard_present = keyboard
        self.data = _Port(self, DATA_PORT)
        self.command = _Port(self, COMMAND_PORT)
        self._irq_level = False
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.ctr = CTR_DEFAULT
        self.ram = bytearray(32)  # internal RAM; byte 0 is the CTR
        self.status = STR_SYSFLAG | STR_KEYLOCK
        self.outbuf: int | None = None
        self.out_aux = False
        self.queue: deque[int] = deque()  # keyboard bytes waiting for the output buffer
        self.pending_cmd: int | None = None  # controller command awaiting its data byte
        self.kbd_pending: int | None = None  # keyboard command awaiting its argument
        self.kbd_scanning = True
        self.scancode_set = 2
        self.output_port = 0x03  # bit 0: reset line inactive, bit 1: A20 on
        self._update_irq()

    def state(self) -> I8042State:
        with self._lock:
            return I8042State(
                ctr=self.ctr, ram=bytes(self.ram), status=self.status, output_buffer=self.outbuf,
                output_is_aux=self.out_aux, keyboard_queue=bytes(self.queue),
                pending_command=self.pending_cmd, keyboard_pending_command=self.kbd_pending,
                keyboard_scanning=self.kbd_scanning, scancode_set=self.scancode_set,
                output_port=self.output_port)

    def restore(self, state: I8042State) -> None:
        """Take over ``state`` (StateError and no change if it is malformed)."""
        state = checked(state, I8042State)
        with self._lock:
            self.ctr = state.ctr
            self.ram = bytearray(state.ram)
            self.status = state.status
            self.outbuf = state.output_buffer
            self.out_aux = state.output_is_aux
            self.queue = deque(state.keyboard_queue)
            self.pending_cmd = state.pending_command
            self.kbd_pending = state.keyboard_pending_command
            self.kbd_scanning = state.keyboard_scanning
            self.scancode_set = state.scancode_set
            self.output_port = state.output_port
            self._update_irq()

    def register(self, bus) -> None:
        bus.register(DATA_PORT, 1, self.data)
        bus.register(COMMAND_PORT, 1, self.command)

    # ----------------------------------------------------------- internals
    def _set_output(self, value: int, aux: bool = False) -> None:
        self.outbuf = value & 0xFF
        self.out_aux = aux

    def _controller_reply(self, value: int, aux: bool = False) -> None:
        # Controller replies overtake queued keyboard bytes, as the 8042 firmware
        # answers a command before it looks at the keyboard again.
        if self.outbuf is not None and not self.out_aux:
            self.queue.appendleft(self.outbuf)
        self._set_output(value, aux)

    def _kbd_reply(self, *values: int) -> None:
        self.queue.extend(v & 0xFF for v in values)
        self._refill()

    def _refill(self) -> None:
        if self.outbuf is None and self.queue and not self.ctr & CTR_KBDDIS:
            self._set_output(self.queue.popleft())

    def _update_irq(self) -> None:
        level = (self.outbuf is not None and not self.out_aux and bool(self.ctr & CTR_KBDINT))
        if level != self._irq_level:
            self._irq_level = level
            self._irq_kbd(level)

    def _status(self) -> int:
        s = self.status & (STR_SYSFLAG | STR_KEYLOCK | STR_CMDDAT)
        if self.outbuf is not None:
            s |= STR_OBF
            if self.out_aux:
                s |= STR_AUXDATA
        return s

    def _read_data(self) -> int:
        if self.outbuf is None:
            # Reading an empty buffer returns the last byte on real parts; 0 is as good.
            return 0
        value = self.outbuf
        self.outbuf = None
        self.out_aux = False
        self._refill()
        return value

    # ------------------------------------------------------ controller side
    def _write_command(self, cmd: int) -> None:
        self.status |= STR_CMDDAT
        self.pending_cmd = None
        if 0x20 <= cmd <= 0x3F:
            idx = cmd & 0x1F
            self._controller_reply(self.ctr if idx == 0 else self.ram[idx])
        elif cmd in _CONTROLLER_CMDS_WITH_ARG:
            self.pending_cmd = cmd
        elif cmd == 0xA7:
            self.ctr |= CTR_AUXDIS
        elif cmd == 0xA8:
            self.ctr &= ~CTR_AUXDIS
        elif cmd == 0xA9:
            self._controller_reply(0x02)  # AUX clock line stuck high: no AUX port
        elif cmd == 0xAA:
            self._controller_reply(0x55)
        elif cmd == 0xAB:
            self._controller_reply(0x00)
        elif cmd == 0xAD:
            self.ctr |= CTR_KBDDIS
        elif cmd == 0xAE:
            self.ctr &= ~CTR_KBDDIS
            self._refill()
        elif cmd == 0xC0:
            self._controller_reply(0xFF)  # input port: nothing special
        elif cmd == 0xD0:
            self._controller_reply(self.output_port)
        elif cmd == 0xE0:
            self._controller_reply(0x00)  # test inputs
        elif 0xF0 <= cmd <= 0xFF:
            # pulse output port bits; bit 0 low is the CPU reset line
            if not cmd & 0x01:
                log.info("i8042: reset requested by the guest (command %#x)", cmd)
                self._on_reset()
        else:
            log.debug("i8042: unknown controller command %#x ignored", cmd)

    def _write_data(self, value: int) -> None:
        self.status &= ~STR_CMDDAT
        cmd = self.pending_cmd
        self.pending_cmd = None
        if cmd is None:
            self._keyboard_write(value)
        elif 0x60 <= cmd <= 0x7F:
            idx = cmd & 0x1F
            if idx == 0:
                self.ctr = value
                if value & CTR_SYSFLAG:
                    self.status |= STR_SYSFLAG
                else:
                    self.status &= ~STR_SYSFLAG
                self._refill()
            else:
                self.ram[idx] = value
        elif cmd == 0xD1:
            self.output_port = value | 0x02
            if not value & 0x01:
                log.info("i8042: reset through the output port")
                self._on_reset()
        elif cmd == 0xD2:
            self._controller_reply(value)  # as if the keyboard sent it
        elif cmd == 0xD3:
            # No AUX port: the byte comes back but not as AUX data, which
            # Linux's AUX loopback test reads as "no AUX".
            self._controller_reply(value)
        elif cmd == 0xD4:
            log.debug("i8042: byte %#x for the absent AUX device dropped", value)

    # --------------------------------------------------------- the keyboard
    def _keyboard_write(self, value: int) -> None:
        self.ctr &= ~CTR_KBDDIS  # writing to the keyboard enables its interface
        if not self.keyboard_present:
            return
        pending = self.kbd_pending
        if pending is not None:
            self.kbd_pending = None
            if pending == 0xF0 and value == 0:
                # report the current scancode set (translated as through XLATE)
                self._kbd_reply(KBD_ACK, {1: 0x43, 2: 0x41, 3: 0x3F}[self.scancode_set]
                                if self.ctr & CTR_XLATE else self.scancode_set)
                return
            if pending == 0xF0 and value in (1, 2, 3):
                self.scancode_set = value
            self._kbd_reply(KBD_ACK)
            return
        if value in _KBD_CMDS_WITH_ARG:
            self.kbd_pending = value
            self._kbd_reply(KBD_ACK)
        elif value == 0xFF:
            self.queue.clear()
            self.kbd_scanning = True
            self.scancode_set = 2
            self._kbd_reply(KBD_ACK, KBD_BAT_OK)
        elif value == 0xF2:
            self._kbd_reply(KBD_ACK, 0xAB, 0x41 if self.ctr & CTR_XLATE else 0x83)
        elif value == 0xEE:
            self._kbd_reply(0xEE)
        elif value == 0xF4:
            self.kbd_scanning = True
            self._kbd_reply(KBD_ACK)
        elif value in (0xF5, 0xF6):
            self.kbd_scanning = value == 0xF6
            self._kbd_reply(KBD_ACK)
        elif value in (0xF7, 0xF8, 0xF9, 0xFA, 0xFB, 0xFC, 0xFD):
            self._kbd_reply(KBD_ACK)
        elif value == 0xFE:
            pass  # resend: nothing was sent that could have been lost
        else:
            self._kbd_reply(KBD_RESEND)

    def inject_scancodes(self, data: bytes) -> None:
        """Host-side key input (already in the set the guest reads)."""
        with self._lock:
            if self.keyboard_present and self.kbd_scanning:
                self.queue.extend(data)
                self._refill()
                self._update_irq()

    # ---------------------------------------------------------- bus entry
    def _io_read(self, port: int, size: int) -> int:
        if size != 1:
            log.debug("i8042: %d-byte read of %#x, answering the low byte", size, port)
        with self._lock:
            value = self._status() if port == COMMAND_PORT else self._read_data()
            self._update_irq()
            return value

    def _io_write(self, port: int, size: int, value: int) -> None:
        if size != 1:
            log.debug("i8042: %d-byte write to %#x, using the low byte", size, port)
        value &= 0xFF
        with self._lock:
            if port == COMMAND_PORT:
                self._write_command(value)
            else:
                self._write_data(value)
            self._update_irq()


class _Port:
    """One of the controller's two ports as a bus device."""

    def __init__(self, ctl: I8042, port: int) -> None:
        self._ctl = ctl
        self.port = port

    def read(self, offset: int, size: int) -> int:
        return self._ctl._io_read(self.port, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._ctl._io_write(self.port, size, value)

    def __repr__(self) -> str:
        return f"i8042({self.port:#x})"
