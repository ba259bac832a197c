"""The small PC ports Linux touches while booting, so it boots quietly.

Where each sits (the slots below; the machine's device table places them):

    0x80   1  POST_CODE         PostCodePort    POST codes / Linux io_delay: remembered,
                                                logged at debug
    0x81  15  DMA_PAGE          PortSink        DMA page registers 0x81-0x8f (0x87 included)
    0xed   1  IO_DELAY          PortSink        Linux's alternative io_delay port
    0xf4   4  DEBUG_EXIT        DebugExit       test-guest exit port: on_exit(value)
    0x61   1  SYSTEM_CONTROL_B  SystemControlB  speaker / PIT channel 2 gate (only when
                                                KVM's in-kernel PIT is NOT used:
                                                KVM_CREATE_PIT2 claims 0x61 itself)
    0x92   1  SYSTEM_CONTROL_A  FastA20Reset    system control port A: bit 0 pulses a reset

Not here on purpose: the PIC/ELCR ports (0x20, 0xa0, 0x4d0; KVM's irqchip), the
PCI configuration ports 0xcf8-0xcff (and the 0xcf9 reset control inside them),
and COM2-COM4 (0x2f8/0x3e8/0x2e8): an absent UART must read as a floating bus,
which the Bus does for unclaimed ports.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from .bus import PortSlot

log = logging.getLogger(__name__)

POST_CODE = PortSlot(base=0x80, length=1)
DMA_PAGE = PortSlot(base=0x81, length=15)
IO_DELAY = PortSlot(base=0xED, length=1)
DEBUG_EXIT = PortSlot(base=0xF4, length=4)
SYSTEM_CONTROL_A = PortSlot(base=0x92, length=1)
SYSTEM_CONTROL_B = PortSlot(base=0x61, length=1)


class PortSink:
    """Accepts writes, reads back a fixed value (all ones: nothing drives the bus)."""

    def __init__(self, name: str, read_value: int = 0xFF) -> None:
        self.name = name
        self.read_value = read_value

    def read(self, offset: int, size: int) -> int:
        return self.read_value & ((1 << (8 * max(1, min(size, 8)))) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        pass

    def __repr__(self) -> str:
        return f"PortSink({self.name!r})"


class PostCodePort:
    """Port 0x80: firmware POST codes; Linux writes it only as an I/O delay."""

    def __init__(self) -> None:
        self.last_code = 0

    def read(self, offset: int, size: int) -> int:
        return 0xFF if size == 1 else (1 << (8 * max(1, min(size, 8)))) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        code = value & 0xFF
        if code != self.last_code:
            log.debug("POST code %#04x", code)
        self.last_code = code


class DebugExit:
    """The test exit port: a write ends the machine.

    kvmpy's own (0xf4, 4 bytes, in every PC) passes the value through as the exit
    status. QEMU's isa-debug-exit (``qemu_status=True``, at a user's ``iobase``/
    ``iosize``: kvmpy.devices.testdev) exits with ``(value << 1) | 1``, so a test
    suite written for QEMU reads the same status from kvmpy; a write anywhere in
    its range counts, as QEMU's region does.
    """

    def __init__(self, on_exit: Callable[[int], None], qemu_status: bool = False, length: int = 4) -> None:
        self._on_exit = on_exit
        self.qemu_status = qemu_status
        self.length = length

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * max(1, min(size, 8)))) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or not (offset == 0 or self.qemu_status and 0 <= offset < self.length):
            log.debug("debug-exit: %d-byte write at offset %d ignored", size, offset)
            return
        value &= (1 << (8 * size)) - 1
        self._on_exit((value << 1) | 1 if self.qemu_status else value)


# port 0x61 bits
PORTB_GATE2 = 0x01
PORTB_SPEAKER = 0x02
PORTB_REFRESH = 0x10
PORTB_OUT2 = 0x20
PORTB_WRITABLE = 0x0F


class SystemControlB:
    """Port 0x61 (system control port B) for machines without KVM's in-kernel PIT.

    Loops that wait on the refresh toggle (bit 4) or on PIT channel 2's output
    (bit 5) must end. ``pit_out2`` supplies channel 2's real output where the
    machine has a PIT model; without one, OUT2 rises a fixed time after the gate
    is raised (``out2_delay`` seconds, the ~50 ms calibration latch Linux uses by
    default; TSC calibration against it is then wrong but bounded) and the
    refresh bit toggles on every read, as the 15 us refresh clock would.
    """

    def __init__(self, pit_out2: Callable[[], bool] | None = None,
                 out2_delay: float = 0.05,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pit_out2 = pit_out2
        self._delay = out2_delay
        self._clock = clock
        self.value = 0
        self._refresh = 0
        self._gate_since: float | None = None

    @property
    def speaker_on(self) -> bool:
        return self.value & (PORTB_GATE2 | PORTB_SPEAKER) == PORTB_GATE2 | PORTB_SPEAKER

    def _out2(self) -> bool:
        if self._pit_out2 is not None:
            return bool(self._pit_out2())
        if self._gate_since is None:
            return False
        return self._clock() - self._gate_since >= self._delay

    def read(self, offset: int, size: int) -> int:
        self._refresh ^= PORTB_REFRESH
        return (self.value & PORTB_WRITABLE) | self._refresh | (PORTB_OUT2 if self._out2() else 0)

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 1:
            log.debug("port 0x61: %d-byte write, using the low byte", size)
        value &= PORTB_WRITABLE
        gate_was = self.value & PORTB_GATE2
        self.value = value
        if value & PORTB_GATE2 and not gate_was:
            self._gate_since = self._clock()
        elif not value & PORTB_GATE2:
            self._gate_since = None


class FastA20Reset:
    """Port 0x92 (system control port A): bit 1 is the A20 gate (always on here),
    a 0->1 edge of bit 0 resets the machine."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self.value = 0x02

    def read(self, offset: int, size: int) -> int:
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        old = self.value
        self.value = value | 0x02
        if value & 0x01 and not old & 0x01:
            self._on_reset()


def register_legacy_ports(bus, on_exit: Callable[[int], None],
                          on_reset: Callable[[], None],
                          port_b: bool = False) -> dict[str, object]:
    """Register every device of this module at its PC address on the port-I/O bus.

    ``port_b``: also claim 0x61 (only when KVM's in-kernel PIT is not in use).
    Returns the devices by name so the machine can inspect them.
    """
    devices: dict[str, object] = {
        "post": PostCodePort(),
        "dma-page": PortSink("dma-page"),
        "delay-ed": PortSink("io-delay-0xed"),
        "debug-exit": DebugExit(on_exit),
        "port-a": FastA20Reset(on_reset),
    }
    slots = {"post": POST_CODE, "dma-page": DMA_PAGE, "delay-ed": IO_DELAY,
             "debug-exit": DEBUG_EXIT, "port-a": SYSTEM_CONTROL_A}
    if port_b:
        devices["port-b"] = SystemControlB()
        slots["port-b"] = SYSTEM_CONTROL_B
    for name, slot in slots.items():
        bus.register(slot.base, slot.length, devices[name])
    return devices
