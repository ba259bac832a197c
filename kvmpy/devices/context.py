"""What a device factory is given: everything a device model may use of the machine.

A device of the machine's table, kvmpy's own or a plug-in, is made by a factory
``factory(ctx: DeviceContext) -> device``. The context is the device's whole view
of the machine: guest memory and interrupts (``platform``), the event loop for its
file descriptors, the console, the VM's configuration, its own options from the
table, where it was placed, and a way to ask for a reset or a power-off. Nothing
else of kvmpy is needed to write one, and the accelerators stay out of sight.

What the factory returns depends on the entry's bus:
  * "pio" / "mmio": a ``kvmpy.devices.bus.BusDevice`` (read/write at offsets from
    the first slot's base; see DeviceEntry in kvmpy.builder for several slots);
  * "pci": a ``kvmpy.devices.pci.PciDevice``; the PCI bus assigns its BARs.
Either may also be ``Resettable`` and ``Closeable`` (kvmpy.devices.bus).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from .bus import AddressSlot

if TYPE_CHECKING:  # pragma: no cover - annotations only: a KVM machine never loads the software irqchip
    from ..config import VmConfig
    from ..events import EventLoop
    from ..memory import GuestMemory
    from .timers import TimerWheel
    from .pci import PciBus
    from .platform import Platform


class GuestPower(Protocol):
    """What the guest can do to the whole machine through a device."""

    def guest_reset(self) -> None:
        """The guest pulled a reset line (keyboard controller, port 0x92, 0xCF9)."""

    def guest_power_off(self, status: int) -> None:
        """The guest turned the machine off (ACPI S5, the test exit port); the VMM
        process exits with ``status`` (its low 8 bits)."""


class BlockErrors(Protocol):
    """Where a disk reports a host I/O error that failed a guest's request, as QEMU's
    block layer does (``blk_error_action``): the machine emits BLOCK_IO_ERROR and, for
    ``action == "stop"``, pauses the VM with the run state "io-error"."""

    def io_error(self, device: str, node_name: str, operation: str, action: str,
                 nospace: bool, reason: str, retry: Callable[[], None] | None = None) -> None:
        """Called on the event loop thread; must not block (the pause happens later,
        off the loop). ``operation`` is "read" or "write", ``action`` "stop", "report"
        or "ignore", ``reason`` the host's strerror. With "stop" the device keeps the
        request and ``retry`` is called on the event loop once the VM continues
        (``cont``); a system reset drops it, as the device's reset drops the request."""


class SerialConsole(Protocol):
    """The host end of a UART: the console, as the UART sees it."""

    def attach(self, uart) -> None:
        """Input typed on the console goes to ``uart.receive(bytes) -> int``."""

    def buffered_write(self, data: bytes) -> None:
        """Guest output; must not block the vCPU for long."""

    def rx_space_available(self) -> None:
        """The UART has room again for input it refused."""


class PortWriteQueue(Protocol):
    """Port writes the accelerator may queue and hand to the device later, in order
    (KVM's coalesced PIO ring): the vCPU does not exit for each."""

    def set_zone(self, port: int, length: int, on: bool) -> None: ...


class PublishedPortReads(Protocol):
    """Port reads the accelerator may answer without the device, from a value the
    device publishes whenever it changes. Only for a register whose read has no side
    effect and whose value no queued write (PortWriteQueue) can change."""

    def publisher(self, port: int) -> Callable[[int | None], None] | None: ...


@dataclass(frozen=True)
class DeviceContext:
    """What a device model is given when built: its name and the platform it may use."""

    name: str
    """This device's name in the table (for log lines and the monitor)."""
    platform: Platform
    """Guest memory, interrupt lines, MSIs and doorbells."""
    events: EventLoop
    """The machine's one event loop: subscribe fds here rather than starting threads."""
    config: VmConfig
    power: GuestPower
    timer_wheel: TimerWheel
    """Host timers for device models (one thread for all)."""
    pci: PciBus
    """PCI bus 0. Entries on bus "pci" are plugged in by the machine; only a device
    that serves the bus itself (the config ports) needs it."""
    num_cpus: int = 1
    console: SerialConsole | None = None
    port_write_queue: PortWriteQueue | None = None
    """None where the accelerator has none, or every port write must exit (tracing)."""
    published_port_reads: PublishedPortReads | None = None
    """None where the accelerator answers no port read itself."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """The entry's own options (from the table; later from vm.toml)."""
    slots: tuple[AddressSlot, ...] = ()
    """Where the entry places the device (empty on bus "pci")."""
    backend: object | None = None
    """What the entry's backend opener returned (a disk image, a tap), else None."""
    block_errors: BlockErrors | None = None
    """Where a disk reports I/O errors (BLOCK_IO_ERROR, werror/rerror=stop); None
    where nothing can pause the VM (stop then acts as report)."""

    @property
    def slot(self) -> AddressSlot:
        """The first of ``slots``: where a single-range device sits."""
        return self.slots[0]

    @property
    def memory(self) -> GuestMemory:
        return self.platform.memory

    def irq_line(self, irq: int) -> Callable[[bool], None]:
        """A level callback driving ISA IRQ / GSI ``irq``."""
        set_level = self.platform.set_irq_level
        return lambda level: set_level(irq, level)


DeviceFactory = Callable[[DeviceContext], object]
BackendOpener = Callable[[DeviceContext], object]
