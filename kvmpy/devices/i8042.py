"""An 8042 keyboard controller with a minimal AT keyboard and, optionally, a PS/2 mouse.

Enough for Linux's i8042 and atkbd drivers to probe quickly and quietly (each
command is answered at once, so no 0.5 s controller timeouts) and for the
``reboot=k`` path: command 0xfe pulses the CPU reset line, calling ``on_reset``.

Registered as two devices: ``I8042.data`` at 0x60 and ``I8042.command`` at 0x64
(``register(bus)`` does both). The keyboard interrupt is ISA IRQ 1, driven
through ``irq_kbd(level)``: high while the output buffer holds a keyboard byte
and the configuration byte enables the keyboard interrupt (an edge for the
in-kernel PIC/IOAPIC, as QEMU drives it).

Without a mouse (``aux=False``, the default) there is no AUX port: AUX loopback
(0xd3) is refused by answering without the AUXDATA status bit and the AUX interface
test (0xa9) reports "clock line stuck high", which makes Linux drop the AUX port
without waiting. Describing only PNP0303 in the DSDT (kvmpy.boot.acpi) gets the
same result earlier. With ``aux=True`` (a display is configured) the AUX port has
a PS/2 mouse (IntelliMouse wheel after the 200-100-80 sample-rate knock), fed by
``mouse_event`` and interrupting on ISA IRQ 12 through ``irq_aux``.

Host key input: ``press_key(number, down)`` takes QEMU's key number (set 1, 0x80
for the 0xE0 keys) and queues what a keyboard in the guest's chosen set sends,
through the controller's set 2 -> set 1 translation when that is on.
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

AUX_IRQ = 12
MOUSE_QUEUE_LIMIT = 256      # bytes: a guest that never reads loses movement, not memory
MOUSE_ACK = 0xFA
_MOUSE_CMDS_WITH_ARG = {0xF3, 0xE8}

# Set 1 -> set 2 make codes, for a guest that turns translation off.
SET1_TO_SET2 = {
    0x01: 0x76, 0x02: 0x16, 0x03: 0x1E, 0x04: 0x26, 0x05: 0x25, 0x06: 0x2E, 0x07: 0x36, 0x08: 0x3D,
    0x09: 0x3E, 0x0A: 0x46, 0x0B: 0x45, 0x0C: 0x4E, 0x0D: 0x55, 0x0E: 0x66, 0x0F: 0x0D, 0x10: 0x15,
    0x11: 0x1D, 0x12: 0x24, 0x13: 0x2D, 0x14: 0x2C, 0x15: 0x35, 0x16: 0x3C, 0x17: 0x43, 0x18: 0x44,
    0x19: 0x4D, 0x1A: 0x54, 0x1B: 0x5B, 0x1C: 0x5A, 0x1D: 0x14, 0x1E: 0x1C, 0x1F: 0x1B, 0x20: 0x23,
    0x21: 0x2B, 0x22: 0x34, 0x23: 0x33, 0x24: 0x3B, 0x25: 0x42, 0x26: 0x4B, 0x27: 0x4C, 0x28: 0x52,
    0x29: 0x0E, 0x2A: 0x12, 0x2B: 0x5D, 0x2C: 0x1A, 0x2D: 0x22, 0x2E: 0x21, 0x2F: 0x2A, 0x30: 0x32,
    0x31: 0x31, 0x32: 0x3A, 0x33: 0x41, 0x34: 0x49, 0x35: 0x4A, 0x36: 0x59, 0x37: 0x7C, 0x38: 0x11,
    0x39: 0x29, 0x3A: 0x58, 0x3B: 0x05, 0x3C: 0x06, 0x3D: 0x04, 0x3E: 0x0C, 0x3F: 0x03, 0x40: 0x0B,
    0x41: 0x83, 0x42: 0x0A, 0x43: 0x01, 0x44: 0x09, 0x45: 0x77, 0x46: 0x7E, 0x47: 0x6C, 0x48: 0x75,
    0x49: 0x7D, 0x4A: 0x7B, 0x4B: 0x6B, 0x4C: 0x73, 0x4D: 0x74, 0x4E: 0x79, 0x4F: 0x69, 0x50: 0x72,
    0x51: 0x7A, 0x52: 0x70, 0x53: 0x71, 0x56: 0x61, 0x57: 0x78, 0x58: 0x07,
}
SET1_TO_SET2_EXTENDED = {
    0x1C: 0x5A, 0x1D: 0x14, 0x35: 0x4A, 0x37: 0x7C, 0x38: 0x11, 0x47: 0x6C, 0x48: 0x75, 0x49: 0x7D,
    0x4B: 0x6B, 0x4D: 0x74, 0x4F: 0x69, 0x50: 0x72, 0x51: 0x7A, 0x52: 0x70, 0x53: 0x71, 0x5B: 0x1F,
    0x5C: 0x27, 0x5D: 0x2F,
}


def key_bytes(number: int, down: bool, scancode_set: int, translated: bool) -> bytes:
    """What a keyboard sends for QEMU key ``number`` as the guest reads it."""
    extended, code = bool(number & 0x80), number & 0x7F
    if translated or scancode_set == 1:
        return (b"\xe0" if extended else b"") + bytes([code if down else code | 0x80])
    table = SET1_TO_SET2_EXTENDED if extended else SET1_TO_SET2
    set2 = table.get(code)
    if set2 is None:
        return b""
    return (b"\xe0" if extended else b"") + (b"" if down else b"\xf0") + bytes([set2])


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
    mouse_queue: bytes = b""
    mouse_pending_command: int | None = None
    mouse_streaming: bool = False
    mouse_sample_rate: int = 100
    mouse_resolution: int = 2
    mouse_scaling: bool = False
    mouse_id: int = 0
    mouse_rate_history: bytes = b""

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
        check.data("mouse_queue", self.mouse_queue, max_length=MOUSE_QUEUE_LIMIT + 8)
        if check.optional_integer("mouse_pending_command", self.mouse_pending_command, 0, 0xFF) is not None \
                and self.mouse_pending_command not in _MOUSE_CMDS_WITH_ARG:
            raise check.fail("mouse_pending_command", f"{self.mouse_pending_command:#x} takes no argument")
        check.flag("mouse_streaming", self.mouse_streaming)
        check.flag("mouse_scaling", self.mouse_scaling)
        check.integer("mouse_sample_rate", self.mouse_sample_rate, 0, 0xFF)
        check.integer("mouse_resolution", self.mouse_resolution, 0, 3)
        if self.mouse_id not in (0, 3):
            raise check.fail("mouse_id", f"{self.mouse_id} is not 0 or 3")
        check.data("mouse_rate_history", self.mouse_rate_history, max_length=3)


class I8042(Restorable):
    def __init__(self, on_reset: Callable[[], None],
                 irq_kbd: Callable[[bool], None] | None = None,
                 keyboard: bool = True, aux: bool = False,
                 irq_aux: Callable[[bool], None] | None = None) -> None:
        self._on_reset = on_reset
        self._irq_kbd = irq_kbd or (lambda level: None)
        self._irq_aux = irq_aux or (lambda level: None)
        self.aux_present = aux
        self._aux_level = False
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
        self._mouse_reset()
        self._update_irq()

    def _mouse_reset(self) -> None:
        self.mouse_queue: deque[int] = deque()
        self.mouse_pending: int | None = None
        self.mouse_streaming = False
        self.mouse_sample_rate = 100
        self.mouse_resolution = 2
        self.mouse_scaling = False
        self.mouse_id = 0
        self.mouse_rates: deque[int] = deque(maxlen=3)

    def state(self) -> I8042State:
        with self._lock:
            return I8042State(
                ctr=self.ctr, ram=bytes(self.ram), status=self.status, output_buffer=self.outbuf,
                output_is_aux=self.out_aux, keyboard_queue=bytes(self.queue),
                pending_command=self.pending_cmd, keyboard_pending_command=self.kbd_pending,
                keyboard_scanning=self.kbd_scanning, scancode_set=self.scancode_set,
                output_port=self.output_port, mouse_queue=bytes(self.mouse_queue),
                mouse_pending_command=self.mouse_pending, mouse_streaming=self.mouse_streaming,
                mouse_sample_rate=self.mouse_sample_rate, mouse_resolution=self.mouse_resolution,
                mouse_scaling=self.mouse_scaling, mouse_id=self.mouse_id,
                mouse_rate_history=bytes(self.mouse_rates))

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
            self.mouse_queue = deque(state.mouse_queue)
            self.mouse_pending = state.mouse_pending_command
            self.mouse_streaming = state.mouse_streaming
            self.mouse_sample_rate = state.mouse_sample_rate
            self.mouse_resolution = state.mouse_resolution
            self.mouse_scaling = state.mouse_scaling
            self.mouse_id = state.mouse_id
            self.mouse_rates = deque(state.mouse_rate_history, maxlen=3)
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
        if self.outbuf is not None:
            return
        if self.queue and not self.ctr & CTR_KBDDIS:
            self._set_output(self.queue.popleft())
        elif self.mouse_queue and not self.ctr & CTR_AUXDIS:
            self._set_output(self.mouse_queue.popleft(), aux=True)

    def _update_irq(self) -> None:
        level = (self.outbuf is not None and not self.out_aux and bool(self.ctr & CTR_KBDINT))
        if level != self._irq_level:
            self._irq_level = level
            self._irq_kbd(level)
        aux_level = self.outbuf is not None and self.out_aux and bool(self.ctr & CTR_AUXINT)
        if aux_level != self._aux_level:
            self._aux_level = aux_level
            self._irq_aux(aux_level)

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
            self._refill()
        elif cmd == 0xA9:
            # 0x00: the AUX interface passed; 0x02: clock line stuck high, no AUX port
            self._controller_reply(0x00 if self.aux_present else 0x02)
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
            # Without an AUX port the byte comes back but not as AUX data, which
            # Linux's AUX loopback test reads as "no AUX".
            self._controller_reply(value, aux=self.aux_present)
        elif cmd == 0xD4:
            if self.aux_present:
                self.ctr &= ~CTR_AUXDIS     # writing to the mouse enables its interface
                self._mouse_write(value)
            else:
                log.debug("i8042: byte %#x for the absent AUX device dropped", value)

    # ------------------------------------------------------------ the mouse
    def _mouse_reply(self, *values: int) -> None:
        # Command replies go ahead of movement packets still queued.
        self.mouse_queue.extendleft(reversed([v & 0xFF for v in values]))
        self._refill()

    def _mouse_write(self, value: int) -> None:
        pending = self.mouse_pending
        if pending is not None:
            self.mouse_pending = None
            if pending == 0xF3:
                self.mouse_sample_rate = value
                self.mouse_rates.append(value)
                if list(self.mouse_rates) == [200, 100, 80]:
                    self.mouse_id = 3       # IntelliMouse: the wheel byte from now on
            elif pending == 0xE8:
                self.mouse_resolution = value & 3
            self._mouse_reply(MOUSE_ACK)
            return
        if value in _MOUSE_CMDS_WITH_ARG:
            self.mouse_pending = value
            self._mouse_reply(MOUSE_ACK)
        elif value == 0xFF:
            self._mouse_reset()
            self._mouse_reply(MOUSE_ACK, 0xAA, 0x00)
        elif value == 0xF6:
            streaming = self.mouse_streaming
            self._mouse_reset()
            self.mouse_streaming = streaming
            self._mouse_reply(MOUSE_ACK)
        elif value in (0xF4, 0xF5):
            self.mouse_streaming = value == 0xF4
            self._mouse_reply(MOUSE_ACK)
        elif value == 0xF2:
            self._mouse_reply(MOUSE_ACK, self.mouse_id)
        elif value == 0xE9:
            status = (0x20 if self.mouse_streaming else 0) | (0x10 if self.mouse_scaling else 0)
            self._mouse_reply(MOUSE_ACK, status, self.mouse_resolution, self.mouse_sample_rate)
        elif value in (0xE6, 0xE7):
            self.mouse_scaling = value == 0xE7
            self._mouse_reply(MOUSE_ACK)
        elif value in (0xEA, 0xF0, 0xEB, 0xEC, 0xEE):
            self._mouse_reply(MOUSE_ACK)    # stream/remote/wrap modes: acknowledged, stream kept
        else:
            self._mouse_reply(0xFE)

    def mouse_event(self, dx: int, dy: int, dz: int, buttons: int) -> None:
        """Host pointer input: motion (dy positive is up, as PS/2 counts it), wheel
        steps and the buttons held (bit 0 left, 1 right, 2 middle)."""
        with self._lock:
            if not self.aux_present or not self.mouse_streaming:
                return
            first = True
            while first or dx or dy or dz:
                first = False
                step_x, step_y = max(-255, min(255, dx)), max(-255, min(255, dy))
                step_z = max(-7, min(7, dz))
                dx, dy, dz = dx - step_x, dy - step_y, dz - step_z
                packet = [0x08 | (buttons & 7) | (0x10 if step_x < 0 else 0) | (0x20 if step_y < 0 else 0),
                          step_x & 0xFF, step_y & 0xFF]
                if self.mouse_id == 3:
                    packet.append(step_z & 0xFF)
                if len(self.mouse_queue) + len(packet) > MOUSE_QUEUE_LIMIT:
                    break
                self.mouse_queue.extend(packet)
            self._refill()
            self._update_irq()

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

    def press_key(self, number: int, down: bool) -> None:
        """Host key input as QEMU's key number (see key_bytes)."""
        with self._lock:
            data = key_bytes(number, down, self.scancode_set, bool(self.ctr & CTR_XLATE))
        if data:
            self.inject_scancodes(data)

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
            if port == COMMAND_PORT:
                value = self._status()
            else:
                value = self._read_data()
                # The line drops when the guest reads the data port, as on a PC: the
                # next byte behind this one is then a new edge, which the edge-triggered
                # PIC/IOAPIC input needs to interrupt again (Linux's atkbd waits for
                # the ID bytes after GETID's acknowledge that way).
                self._lower_irqs()
            self._update_irq()
            return value

    def _lower_irqs(self) -> None:
        if self._irq_level:
            self._irq_level = False
            self._irq_kbd(False)
        if self._aux_level:
            self._aux_level = False
            self._irq_aux(False)

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
