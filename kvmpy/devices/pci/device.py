"""A PCI function: type 0 configuration header, BARs, capability list.

Config space is a bytearray with a write mask per byte (bits the guest may change)
and a write-1-to-clear mask (status register error bits). Everything the guest
writes goes through those masks, so read-only fields stay read-only whatever the
access size or alignment. BARs are sized the hardware way: the address bits
below the BAR size are read-only zero, so writing all ones reads back the size
mask. Subclasses declare BARs with ``add_bar`` and capabilities with
``add_capability``, and serve their BAR ranges through ``bar_read``/``bar_write``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Callable

from ..saved_state import Restorable, StateCheck, checked

log = logging.getLogger(__name__)

# header offsets
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION = 0x08
CLASS_PROG = 0x09
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

CMD_IO = 1 << 0
CMD_MEMORY = 1 << 1
CMD_BUS_MASTER = 1 << 2
CMD_PARITY = 1 << 6
CMD_SERR = 1 << 8
CMD_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = CMD_IO | CMD_MEMORY | CMD_BUS_MASTER | CMD_PARITY | CMD_SERR | CMD_INTX_DISABLE

STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4
STATUS_W1C = 0xF900  # parity/abort/SERR error bits

BAR_IO = "io"
BAR_MEM32 = "mem32"
BAR_MEM64 = "mem64"

CAP_ID_VENDOR = 0x09
CAP_ID_MSIX = 0x11

CONFIG_SIZE = 256
EXT_CONFIG_SIZE = 4096


@dataclass(frozen=True)
class PciConfigState:
    """A function's configuration space (see kvmpy/devices/saved_state.py): the
    command register, BAR addresses, interrupt line and capability registers are
    all in it. Capability owners keep what lives outside it (MsixCapability.state)."""

    config: bytes   # CONFIG_SIZE bytes
    # BARs the bus decodes: of two BARs the guest made overlap, the one mapped first
    # keeps the range, and the config bytes cannot tell which that was
    decoded_bars: tuple[int, ...]

    def validate(self) -> None:
        check = StateCheck(self)
        check.data("config", self.config, length=CONFIG_SIZE)
        check.integers("decoded_bars", self.decoded_bars, None, 0, 5)
        if list(self.decoded_bars) != sorted(set(self.decoded_bars)):
            raise check.fail("decoded_bars", f"{self.decoded_bars} is not a sorted set of BARs")


@dataclass
class Bar:
    """One base address register of a PCI function: its size, kind and where the guest put it."""

    index: int
    size: int
    kind: str
    prefetchable: bool = False

    @property
    def is_io(self) -> bool:
        return self.kind == BAR_IO

    def flag_bits(self) -> int:
        if self.is_io:
            return 0x1
        bits = 0x4 if self.kind == BAR_MEM64 else 0x0
        return bits | (0x8 if self.prefetchable else 0)


class PciDevice(Restorable):
    """Base of every PCI function on the bus.

    A multi-function device is its function 0 with ``other_functions`` set to
    {function number: PciDevice}; the bus plugs them in with it and sets the
    multi-function bit of function 0's header type. ``preferred_slot`` pins a
    device where guests expect it (the PIIX3 at 00:01).
    """

    preferred_slot: int | None = None
    # True on the chipset function that also routes PIRQA-D to ISA IRQs (the PIIX3):
    # the bus then hands it the PIRQ lines' levels through ``route_intx``.
    routes_pirqs: bool = False

    def __init__(self, vendor_id: int, device_id: int, class_code: int, revision: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0, interrupt_pin: int = 1,
                 name: str = "pci") -> None:
        self.name = name
        self.config = bytearray(EXT_CONFIG_SIZE)
        self.wmask = bytearray(EXT_CONFIG_SIZE)
        self.w1cmask = bytearray(EXT_CONFIG_SIZE)
        self.bars: dict[int, Bar] = {}
        self._cap_tail: int | None = None  # offset of the last capability's next pointer
        self._cap_next_free = 0x40
        self._cap_handlers: list[tuple[int, int, Callable[[int, int], None]]] = []
        # Set by PciBus when the device is attached.
        self.pci_bus = None
        self.slot: int | None = None
        self.function = 0
        self.other_functions: dict[int, PciDevice] = {}
        self.intx_gsi: int | None = None
        self._set16(VENDOR_ID, vendor_id)
        self._set16(DEVICE_ID, device_id)
        self.config[REVISION] = revision
        self.config[CLASS_PROG] = class_code & 0xFF
        self.config[CLASS_PROG + 1] = (class_code >> 8) & 0xFF
        self.config[CLASS_PROG + 2] = (class_code >> 16) & 0xFF
        self._set16(SUBSYSTEM_VENDOR_ID, subsystem_vendor_id)
        self._set16(SUBSYSTEM_ID, subsystem_id)
        self.config[INTERRUPT_PIN] = interrupt_pin
        self._mask16(COMMAND, COMMAND_WRITABLE)
        self.w1cmask[STATUS] = STATUS_W1C & 0xFF
        self.w1cmask[STATUS + 1] = STATUS_W1C >> 8
        self.wmask[0x0C] = 0xFF  # cache line size
        self.wmask[0x0D] = 0xFF  # latency timer
        self.wmask[INTERRUPT_LINE] = 0xFF

    # raw helpers ------------------------------------------------------------

    def _set16(self, off: int, v: int) -> None:
        self.config[off:off + 2] = (v & 0xFFFF).to_bytes(2, "little")

    def _set32(self, off: int, v: int) -> None:
        self.config[off:off + 4] = (v & 0xFFFFFFFF).to_bytes(4, "little")

    def _mask16(self, off: int, m: int) -> None:
        self.wmask[off:off + 2] = (m & 0xFFFF).to_bytes(2, "little")

    def _mask32(self, off: int, m: int) -> None:
        self.wmask[off:off + 4] = (m & 0xFFFFFFFF).to_bytes(4, "little")

    def get16(self, off: int) -> int:
        return int.from_bytes(self.config[off:off + 2], "little")

    def get32(self, off: int) -> int:
        return int.from_bytes(self.config[off:off + 4], "little")

    @property
    def command(self) -> int:
        return self.get16(COMMAND)

    # BARs -------------------------------------------------------------------

    def add_bar(self, index: int, size: int, kind: str = BAR_MEM32, prefetchable: bool = False) -> Bar:
        """Declare BAR ``index`` (a 64-bit BAR also takes index+1)."""
        if size < (4 if kind == BAR_IO else 16) or size & (size - 1):
            raise ValueError(f"BAR size {size:#x} must be a power of two")
        if kind == BAR_MEM64 and index > 4:
            raise ValueError("a 64-bit BAR needs two slots")
        bar = Bar(index, size, kind, prefetchable)
        self.bars[index] = bar
        off = BAR0 + 4 * index
        low_mask = ~(size - 1) & (0xFFFFFFFC if kind == BAR_IO else 0xFFFFFFF0)
        self._set32(off, bar.flag_bits())
        self._mask32(off, low_mask)
        if kind == BAR_MEM64:
            self._mask32(off + 4, ~((size - 1) >> 32))
        return bar

    def bar_address(self, index: int) -> int:
        bar = self.bars[index]
        off = BAR0 + 4 * index
        if bar.is_io:
            return self.get32(off) & 0xFFFFFFFC
        addr = self.get32(off) & 0xFFFFFFF0
        if bar.kind == BAR_MEM64:
            addr |= self.get32(off + 4) << 32
        return addr

    def set_bar_address(self, index: int, addr: int) -> None:
        """Firmware-style assignment (by the PciBus before the guest runs)."""
        bar = self.bars[index]
        off = BAR0 + 4 * index
        self._set32(off, (addr & 0xFFFFFFFF & ~(bar.size - 1)) | bar.flag_bits())
        if bar.kind == BAR_MEM64:
            self._set32(off + 4, addr >> 32)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        """A guest read at ``offset`` inside BAR ``index``."""
        return (1 << (8 * size)) - 1

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        """A guest write at ``offset`` inside BAR ``index``."""

    def bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        """BAR ``index`` is now decoded at ``new`` (None: not decoded). Hook for doorbells."""

    # capabilities -----------------------------------------------------------

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None,
                       on_write: Callable[[int, int], None] | None = None) -> int:
        """Append a capability; ``body`` excludes the id/next bytes.

        ``writable`` is the write mask for ``body``; ``on_write(offset_in_cap, size)``
        runs after a guest write touching it. Returns the capability offset.
        """
        length = 2 + len(body)
        off = (self._cap_next_free + 3) & ~3
        if off + length > CONFIG_SIZE:
            raise ValueError("capabilities do not fit in config space")
        self.config[off] = cap_id
        self.config[off + 1] = 0
        self.config[off + 2:off + length] = body
        if writable is not None:
            self.wmask[off + 2:off + length] = writable
        if self._cap_tail is None:
            self.config[CAPABILITIES_POINTER] = off
            self._set16(STATUS, self.get16(STATUS) | STATUS_CAP_LIST)
        else:
            self.config[self._cap_tail] = off
        self._cap_tail = off + 1
        self._cap_next_free = off + length
        if on_write is not None:
            self._cap_handlers.append((off, off + length, on_write))
        return off

    # interrupt status (status register bit 3), kept by the bus for INTx --------

    def route_intx(self, pirq_levels: list[bool]) -> None:
        """The four PIRQ lines' levels now; the bus calls it only where ``routes_pirqs``,
        so a function that routes nothing keeps this no-op."""

    def set_interrupt_status(self, asserted: bool) -> None:
        st = self.get16(STATUS)
        self._set16(STATUS, st | STATUS_INTERRUPT if asserted else st & ~STATUS_INTERRUPT)

    # saved state --------------------------------------------------------------

    def state(self) -> PciConfigState:
        bus = self.pci_bus
        decoded = () if bus is None else tuple(i for i in sorted(self.bars)
                                               if bus.mapping(self, i) is not None)
        return PciConfigState(config=bytes(self.config[:CONFIG_SIZE]), decoded_bars=decoded)

    def restore(self, state: PciConfigState) -> None:
        """Take over ``state`` (StateError and no change if it is malformed or of
        another kind of device), then map the BARs where it puts them and drive INTx
        as its status register says. Capability write hooks are not run: their
        owners restore their own state afterwards."""
        state = checked(state, PciConfigState)
        undeclared = set(state.decoded_bars) - set(self.bars)
        if undeclared:
            raise StateCheck(state).fail("decoded_bars", f"{self.name} has no BAR {min(undeclared)}")
        for offset in range(CONFIG_SIZE):
            # what the guest cannot write is what makes the device: IDs, BAR sizes and
            # kinds, the capability list; only the INTx status bit is the device's to change
            fixed = ~(self.wmask[offset] | self.w1cmask[offset]) & 0xFF
            if offset == STATUS:
                fixed &= ~STATUS_INTERRUPT
            if (state.config[offset] ^ self.config[offset]) & fixed:
                raise StateCheck(state).fail(
                    f"config[{offset:#x}]", f"{state.config[offset]:#04x} differs from {self.name}'s "
                    f"read-only bits ({self.config[offset]:#04x} under mask {fixed:#04x}): "
                    "a state of another device")
        self.config[:CONFIG_SIZE] = state.config
        if self.pci_bus is not None:
            self.pci_bus.device_mapping_changed(self, decodable=frozenset(state.decoded_bars))
            self.pci_bus.set_intx(self, bool(self.get16(STATUS) & STATUS_INTERRUPT))

    # config access from the host bridge ---------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > EXT_CONFIG_SIZE:
            return (1 << (8 * size)) - 1
        if offset >= CONFIG_SIZE:
            return 0  # no extended capabilities: reads as an empty list
        return int.from_bytes(self.config[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > CONFIG_SIZE or size not in (1, 2, 4):
            return
        old_cmd = self.command
        old_bars = {i: self.bar_address(i) for i in self.bars}
        data = value.to_bytes(8, "little")[:size]
        for i in range(size):
            o = offset + i
            m, c = self.wmask[o], self.w1cmask[o]
            b = (self.config[o] & ~m) | (data[i] & m)
            b &= ~(data[i] & c)
            self.config[o] = b
        end = offset + size
        for lo, hi, handler in self._cap_handlers:
            if offset < hi and lo < end:
                handler(offset - lo, size)
        bars_changed = any(self.bar_address(i) != a for i, a in old_bars.items())
        if (old_cmd != self.command or bars_changed) and self.pci_bus is not None:
            self.pci_bus.device_mapping_changed(self)
        if (old_cmd ^ self.command) & CMD_INTX_DISABLE and self.pci_bus is not None:
            self.pci_bus.refresh_intx(self)

    # BAR range adapters: the objects registered on the machine's buses ---------

    def bar_device(self, index: int) -> "BarRange":
        return BarRange(self, index)


class BarRange:
    """The bus-protocol device for one BAR, forwarding to the PciDevice."""

    def __init__(self, dev: PciDevice, index: int) -> None:
        self.dev = dev
        self.index = index

    def read(self, offset: int, size: int) -> int:
        return self.dev.bar_read(self.index, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.dev.bar_write(self.index, offset, size, value)

    def register_accessors(self, offset: int) -> tuple[Callable[[int, int], int], Callable[[int, int, int], None]]:
        """The bus's RegisterAccessors: the device's own bar_read/bar_write with this
        BAR's index bound in C (functools.partial), so a claimed BAR access in the vCPU
        loop costs one Python frame, not two. The same pair for every offset."""
        return partial(self.dev.bar_read, self.index), partial(self.dev.bar_write, self.index)

    def __repr__(self) -> str:
        return f"<{self.dev.name} BAR{self.index}>"
