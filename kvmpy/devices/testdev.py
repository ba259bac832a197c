"""QEMU's test devices, as test suites written for QEMU (kvm-unit-tests, firmware CI)
drive them: ``-device isa-debug-exit``, ``-device pc-testdev``, ``-device pci-testdev``.

    isa-debug-exit  pio  iobase (0x501), iosize (2)   a write exits with (value << 1) | 1
    pc-testdev      pio  0xe0-0xe3                    a 32-bit scratch register, any access width
                    pio  0xe4-0xe7                    "flush page": a 4-byte write names a guest page
                    pio  0xe8-0xeb                    the scratch register again, byte accesses only
                    pio  0x2000-0x2017                a byte written at 0x2000+N sets ISA IRQ/GSI N's level
                    mmio 0xff000000-0xff00ffff        64 KiB of scratch memory
    pci-testdev     pci  1b36:0005, BAR0 mmio 4 KiB, BAR1 io 256 bytes: the I/O tests of
                         QEMU's docs/specs/pci-testdev.rst

The first two are kvmpy plug-in classes (``bus``/``place``; kvmpy.plugins places them
from ``-device``'s options); pci-testdev is a PciDevice that kvmpy.pc puts on the bus.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from .bus import MmioSlot, PortSlot
from .legacy import DebugExit
from .pci.device import BAR_IO, BAR_MEM32, PciDevice
from .saved_state import Restorable, StateCheck, checked

log = logging.getLogger(__name__)

PORT_SPACE = 1 << 16


class IsaDebugExit(DebugExit):
    """QEMU's isa-debug-exit: where the user puts it, QEMU's exit status."""

    bus: ClassVar[str] = "pio"

    @classmethod
    def place(cls, options: Mapping[str, Any]) -> tuple[PortSlot, ...]:
        iobase, iosize = options.get("iobase", 0x501), options.get("iosize", 2)
        for key, value in (("iobase", iobase), ("iosize", iosize)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{key} must be a number, got {value!r}")
        if iosize not in (1, 2, 4):
            raise ValueError(f"iosize must be 1, 2 or 4, got {iosize}")
        if not 0 <= iobase <= PORT_SPACE - iosize:
            raise ValueError(f"iobase {iobase:#x} with iosize {iosize} is outside the port space")
        return (PortSlot(base=iobase, length=iosize),)

    def __init__(self, ctx) -> None:
        unknown = set(ctx.options) - {"iobase", "iosize"}
        if unknown:
            raise ValueError(f"unknown option {sorted(unknown)[0]!r} (known: iobase, iosize)")
        super().__init__(ctx.power.guest_power_off, qemu_status=True, length=ctx.slot.length)


# --- pc-testdev -----------------------------------------------------------------------
PC_TESTDEV_IOPORT = PortSlot(base=0xE0, length=12)       # scratch, flush page, scratch (bytes)
PC_TESTDEV_IRQ = PortSlot(base=0x2000, length=24)
PC_TESTDEV_IOMEM = MmioSlot(base=0xFF000000, length=0x10000)
IOPORT, FLUSH, IOPORT_BYTE = 0, 4, 8
IRQ_OFFSET = PC_TESTDEV_IRQ.base - PC_TESTDEV_IOPORT.base
IRQ_LINES = PC_TESTDEV_IRQ.length


@dataclass(frozen=True)
class PcTestdevPortsState:
    ioport_data: int
    irq_levels: int         # bit N: the level last written for IRQ N

    def validate(self) -> None:
        check = StateCheck(self)
        check.integer("ioport_data", self.ioport_data, 0, 0xFFFFFFFF)
        check.integer("irq_levels", self.irq_levels, 0, (1 << IRQ_LINES) - 1)


class PcTestdevPorts(Restorable):
    """pc-testdev's ports. The flush-page port makes QEMU mprotect the host page behind
    a guest address, to exercise KVM's MMU notifiers; kvmpy checks and logs the address
    (what the guest can observe of it is nothing, on a working host)."""

    bus: ClassVar[str] = "pio"

    @classmethod
    def place(cls, options: Mapping[str, Any]) -> tuple[PortSlot, ...]:
        if options:
            raise ValueError(f"pc-testdev takes no options, got {sorted(options)[0]!r}")
        return (PC_TESTDEV_IOPORT, PC_TESTDEV_IRQ)

    def __init__(self, ctx=None, irq_line=None) -> None:
        self._irq_line = irq_line if irq_line is not None else ctx.irq_line
        self._lines = [self._irq_line(n) for n in range(IRQ_LINES)]
        self.ioport_data = 0
        self.irq_levels = 0
        self.last_flush_page: int | None = None

    def read(self, offset: int, size: int) -> int:
        if IOPORT <= offset < IOPORT + 4 or IOPORT_BYTE <= offset < IOPORT_BYTE + 4:
            return self._scratch_read(offset & 3, size if offset < IOPORT_BYTE else 1, size)
        return (1 << (8 * max(1, min(size, 8)))) - 1

    def _scratch_read(self, start: int, width: int, size: int) -> int:
        """QEMU's ioport_byte region serves one byte per access, however wide the guest's."""
        value = 0
        for i in range(0, size, width):
            byte_offset = (start + i) & 3
            mask = (1 << (8 * width)) - 1
            part = (self.ioport_data >> (8 * byte_offset)) & mask if byte_offset + width <= 4 else 0
            value |= part << (8 * i)
        return value & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4):
            log.debug("pc-testdev: %d-byte write at %#x ignored", size, offset)
            return
        value &= (1 << (8 * size)) - 1
        if IOPORT <= offset < IOPORT + 4:
            self._scratch_write(offset & 3, size, value)
        elif IOPORT_BYTE <= offset < IOPORT_BYTE + 4:
            for i in range(size):
                self._scratch_write((offset + i) & 3, 1, (value >> (8 * i)) & 0xFF)
        elif offset == FLUSH and size == 4:
            self.last_flush_page = value & ~0xFFF
            log.debug("pc-testdev: flush page %#x", self.last_flush_page)
        elif IRQ_OFFSET <= offset < IRQ_OFFSET + IRQ_LINES and size == 1:
            line = offset - IRQ_OFFSET
            level = bool(value)
            self.irq_levels = (self.irq_levels & ~(1 << line)) | (int(level) << line)
            self._lines[line](level)
        else:
            log.debug("pc-testdev: %d-byte write at %#x ignored", size, offset)

    def _scratch_write(self, start: int, size: int, value: int) -> None:
        for i in range(size):
            byte_offset = start + i
            if byte_offset > 3:      # QEMU's mask stops at the register's top
                break
            self.ioport_data &= ~(0xFF << (8 * byte_offset))
            self.ioport_data |= ((value >> (8 * i)) & 0xFF) << (8 * byte_offset)

    def state(self) -> PcTestdevPortsState:
        return PcTestdevPortsState(self.ioport_data, self.irq_levels)

    def restore(self, state: PcTestdevPortsState) -> None:
        state = checked(state, PcTestdevPortsState)
        self.ioport_data = state.ioport_data
        for line in range(IRQ_LINES):
            level = bool(state.irq_levels >> line & 1)
            if level != bool(self.irq_levels >> line & 1):
                self._lines[line](level)
        self.irq_levels = state.irq_levels

    def reset(self) -> None:
        # QEMU's device has no reset handler: the scratch register survives a reset.
        pass


@dataclass(frozen=True)
class PcTestdevIomemState:
    data: bytes

    def validate(self) -> None:
        StateCheck(self).data("data", self.data, length=PC_TESTDEV_IOMEM.length)


class PcTestdevIomem(Restorable):
    """pc-testdev's 64 KiB of MMIO scratch memory at 0xff000000."""

    bus: ClassVar[str] = "mmio"

    @classmethod
    def place(cls, options: Mapping[str, Any]) -> tuple[MmioSlot, ...]:
        if options:
            raise ValueError(f"pc-testdev takes no options, got {sorted(options)[0]!r}")
        return (PC_TESTDEV_IOMEM,)

    def __init__(self, ctx=None) -> None:
        self.data = bytearray(PC_TESTDEV_IOMEM.length)

    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4, 8) or not 0 <= offset <= len(self.data) - size:
            return (1 << (8 * max(1, min(size, 8)))) - 1
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4, 8) or not 0 <= offset <= len(self.data) - size:
            log.debug("pc-testdev iomem: %d-byte write at %#x ignored", size, offset)
            return
        self.data[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def state(self) -> PcTestdevIomemState:
        return PcTestdevIomemState(bytes(self.data))

    def restore(self, state: PcTestdevIomemState) -> None:
        self.data[:] = checked(state, PcTestdevIomemState).data


# --- pci-testdev ------------------------------------------------------------------------
PCI_VENDOR_REDHAT = 0x1B36
PCI_DEVICE_REDHAT_TEST = 0x0005
PCI_CLASS_OTHERS = 0x00FF00     # QEMU's class_id 0x00ff: base class 0, subclass 0xff
MMIO_TEST_SIZE, PIO_TEST_SIZE = 2048, 128
TESTS = ("no-eventfd", "wildcard-eventfd", "datamatch-eventfd")
KINDS = ("mmio", "portio")
DATAMATCH, NOMATCH = 0xFA, 0xCE
ACCESS_WIDTH = 1
HEADER_SIZE = 16        # test, width, pad[2], offset, data, count; the name follows


@dataclass(frozen=True)
class PciTestdevIoTest:
    """One test: its number (kind * 3 + test), where the guest must write, and what."""
    number: int

    @property
    def kind(self) -> str:
        return KINDS[self.number // len(TESTS)]

    @property
    def test(self) -> str:
        return TESTS[self.number % len(TESTS)]

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.test}"

    @property
    def offset(self) -> int:
        return (MMIO_TEST_SIZE if self.kind == "mmio" else PIO_TEST_SIZE) + self.number * ACCESS_WIDTH

    @property
    def match_data(self) -> bool:
        return self.test != "wildcard-eventfd"

    @property
    def data(self) -> int:
        return DATAMATCH if self.match_data else NOMATCH

    @property
    def notifier_size(self) -> int | None:
        """The write size an ioeventfd takes (None: no ioeventfd); 0 is any size, as QEMU
        registers it for a wildcard MMIO test where KVM matches any length."""
        if self.test == "no-eventfd":
            return None
        return 0 if self.kind == "mmio" and not self.match_data else ACCESS_WIDTH

    def header(self, count: int) -> bytes:
        return (bytes([self.number, ACCESS_WIDTH, 0, 0]) + self.offset.to_bytes(4, "little")
                + self.data.to_bytes(4, "little") + (count & 0xFFFFFFFF).to_bytes(4, "little")
                + self.name.encode() + b"\0")


@dataclass(frozen=True)
class PciTestdevState:
    pci: object             # PciConfigState
    current: int            # -1: no test running
    count: int

    def validate(self) -> None:
        check = StateCheck(self)
        check.integer("current", self.current, -1, len(TESTS) * len(KINDS) - 1)
        check.integer("count", self.count, 0, 0xFFFFFFFF)


class PciTestdev(PciDevice):
    """QEMU's pci-testdev: BAR0 (MMIO) and BAR1 (I/O) each start with a test header;
    writing a test number to byte 0 starts that test of the BAR's kind, and the guest's
    writes to the test's offset are counted, as QEMU counts them. The eventfd tests'
    matching writes are taken by an ioeventfd in QEMU and never counted; kvmpy has the
    device count exactly what QEMU's callback would (none of those), so a guest sees the
    same header."""

    def __init__(self, name: str = "pci-testdev") -> None:
        super().__init__(PCI_VENDOR_REDHAT, PCI_DEVICE_REDHAT_TEST, PCI_CLASS_OTHERS, interrupt_pin=0, name=name)
        self.add_bar(0, 2 * MMIO_TEST_SIZE, BAR_MEM32)
        self.add_bar(1, 2 * PIO_TEST_SIZE, BAR_IO)
        self.current: PciTestdevIoTest | None = None
        self.count = 0
        self._header, self._header_test, self._header_count = b"", None, 0

    def bar_read(self, index: int, offset: int, size: int) -> int:
        # QEMU's region serves single bytes: a wider read is those bytes, little-endian,
        # each 0 past the header (its closing NUL included). Taken at once, not byte
        # by byte: under the nested L1 the byte loop cost a claimed MMIO read about
        # three times QEMU's whole exit (bench.kvm's pci-testdev row).
        test = self.current
        if test is None or offset < 0:
            return 0
        # Made again only when the test or its count changed: a guest polls the header.
        if test is not self._header_test or self.count != self._header_count:
            self._header, self._header_test, self._header_count = test.header(self.count), test, self.count
        header = self._header
        return int.from_bytes(header[offset:min(offset + max(1, min(size, 8)), len(header) - 1)], "little")

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index not in (0, 1) or size not in (1, 2, 4, 8):
            return
        kind = 0 if index == 0 else 1
        value &= (1 << (8 * size)) - 1
        test = self.current
        if test is not None and offset == test.offset and test.notifier_size is not None:
            if (test.notifier_size in (0, size)) and (not test.match_data or value == test.data):
                return      # the ioeventfd's: QEMU's device never sees it
        for i in range(size):
            self._write_byte(kind, offset + i, (value >> (8 * i)) & 0xFF)

    def _write_byte(self, kind: int, addr: int, value: int) -> None:
        if addr == 0:
            self.current = None
            if value < len(TESTS):
                self.current = PciTestdevIoTest(kind * len(TESTS) + value)
                self.count = 0
            return
        test = self.current
        if test is None or addr != test.offset:
            return
        if test.match_data and value != test.data:
            return
        self.count = (self.count + 1) & 0xFFFFFFFF

    def reset(self) -> None:
        self.current = None

    def state(self) -> PciTestdevState:       # type: ignore[override]
        return PciTestdevState(super().state(), -1 if self.current is None else self.current.number, self.count)

    def restore(self, state: PciTestdevState) -> None:     # type: ignore[override]
        state = checked(state, PciTestdevState)
        super().restore(state.pci)
        self.current = None if state.current < 0 else PciTestdevIoTest(state.current)
        self.count = state.count
