"""What the rest of kvmpy may ask of an accelerator, declared once.

KVM (kvmpy.hv.kvm) and the translator (kvmpy.hv.tcg) implement every member
below, a no-op where they have nothing to do, so no caller ever asks an
accelerator whether it has a method. Where a call would cost the vCPU loop a
Python call per exit for nothing, a declared flag lets the loop decide once per
thread instead (``software_doorbells``, ``needs_before_guest_entry``,
``port_write_queue is None``).

Device models do not import this module: they see kvmpy.devices.platform only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Protocol, Sequence

from ..devices.platform import Platform as DevicePlatform

if TYPE_CHECKING:  # pragma: no cover - annotations only; none of these imports kvmpy.hv
    from ..boot.common import BootState
    from ..config import VmConfig
    from ..devices.acpi_pm import PmTimerClock
    from ..devices.bus import Bus
    from ..devices.timers import TimerWheel
    from ..events import EventLoop
    from ..memory import GuestMemory
    from .exits import DecodedExits
    from .regs import Regs, SRegs

CpuidEntry = tuple[int, int, int, int, int, int, int]   # function, index, flags, eax, ebx, ecx, edx


class Vcpu(Protocol):
    """One virtual CPU as the vCPU loop drives it (the run protocol of kvmpy.hv.exits).

    The exit attributes describe the exit ``run()`` last returned and are valid
    until the next ``run()``; for a read the loop stores the value in ``io_data``
    / ``mmio_data`` and the backend completes the instruction with it then.
    """

    io_port: int
    io_size: int
    io_write: bool
    io_count: int
    io_data: memoryview
    mmio_addr: int
    mmio_size: int
    mmio_write: bool
    mmio_data: memoryview
    internal_error: str
    system_event: int
    # False lets run() answer accesses no device claims without returning (KVM's C
    # loop: all ones for reads, writes dropped, as the bus would). The exits tracer
    # and the profiler set it True to see every exit.
    report_every_exit: bool
    # True where ``sample_rip`` reads a running vCPU's RIP from another thread (the
    # translator): the profiler starts its sampling thread only then.
    can_sample_rip: bool

    def run(self) -> int:
        """Enter the guest until the next exit; returns its kind (kvmpy.hv.exits.EXIT_*)."""

    def kick(self) -> None:
        """From any thread: make ``run()`` return EXIT_INTR soon."""

    def decoded_exits(self) -> DecodedExits | None:
        """The loop's fast path for exits a device answers, or None (then ``run()``);
        asked once, on the vCPU's thread, after ``report_every_exit`` is set."""

    def get_regs(self) -> Regs: ...

    def set_regs(self, regs: Regs) -> None: ...

    def get_sregs(self) -> SRegs: ...

    def set_sregs(self, sregs: SRegs) -> None: ...

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """The MSRs among ``indices`` that this vCPU has."""

    def set_msrs(self, values: dict[int, int]) -> None: ...

    def set_cpuid(self, entries: Iterable[CpuidEntry]) -> None: ...

    # --- ``--trace profile`` (kvmpy.vcpu.profile) ---
    def set_profiling(self, on: bool) -> None:
        """Count the accelerator's own work too (the translator's slow memory paths);
        a no-op where it keeps no counters (KVM)."""

    def sample_rip(self) -> int | None:
        """From any thread, while ``run()`` executes: the guest's RIP now; None when
        halted or where it cannot be read (``can_sample_rip`` False)."""

    def stats(self) -> dict | None:
        """The accelerator's own counters for the profile (kvmpy._tcg's), None where it
        keeps none (KVM)."""


class Platform(DevicePlatform, Protocol):
    """The devices' Platform, plus what the vCPU loop and the accelerator ask of it."""

    def doorbell_write(self, addr: int, size: int, value: int, pio: bool) -> bool:
        """Offer a guest write to the doorbells (``add_doorbell``); True if one took it.

        Only called where ``Accel.software_doorbells``: under KVM the kernel's
        ioeventfds take those writes before any exit, so KVM's answer is always False.
        """

    def close(self) -> None: ...


class PortWriteQueue(Protocol):
    """Guest port writes the accelerator queues instead of exiting (KVM's coalesced PIO ring)."""

    def set_zone(self, port: int, length: int, on: bool) -> None:
        """Queue (True) or stop queueing (False) writes to ``port``..``port + length - 1``."""

    def drain(self) -> None:
        """Hand the queued writes to the port bus, oldest first."""


class PublishedPortReads(Protocol):
    """Port reads the accelerator answers in its own loop, without a return to Python,
    from a value the device model publishes (KVM: a cell the C run loop reads)."""

    def publisher(self, port: int) -> Callable[[int | None], None] | None:
        """The setter of ``port``'s answer to one-byte reads (None: the reads reach the
        device again); None when the accelerator has no room for another port."""


class AccelHost(Protocol):
    """What an accelerator is built from: the machine's configuration, RAM and buses."""

    cfg: VmConfig
    memory: GuestMemory
    pio_bus: Bus
    mmio_bus: Bus
    events: EventLoop
    """The process's event loop: the translator's timers and MSI eventfds run on it."""


class Accel(Protocol):
    """An accelerator: the vCPUs, the interrupt delivery behind ``platform``, and the
    calls each vCPU thread's loop makes.

    The loop, per thread: ``vcpu_thread_started`` once; ``before_guest_entry`` before
    every ``run()`` where ``needs_before_guest_entry``; after every exit,
    ``port_write_queue.drain()`` where there is a queue (so devices see the queued
    writes before the exit, in the guest's order); ``wait_halted`` on a halt exit.
    """

    name: str                                # "kvm" or "tcg": the --accel spelling
    platform: Platform
    vcpus: Sequence[Vcpu]
    # The timers of the devices the accelerator emulates; None where the kernel keeps
    # them (KVM), and whoever needs one in userspace then makes its own.
    timer_wheel: TimerWheel | None
    port_write_queue: PortWriteQueue | None
    published_port_reads: PublishedPortReads | None
    # True where doorbell writes reach the vCPU loop (the translator): the loop then
    # offers every port and MMIO write to ``platform.doorbell_write`` before the bus.
    software_doorbells: bool
    # True where the accelerator delivers interrupts itself (the translator).
    needs_before_guest_entry: bool
    # The physical address width every vCPU's CPUID 0x80000008 announces (EAX[7:0]):
    # the firmware's 64-bit PCI window must end below it for the guest to reach it.
    phys_bits: int

    def load_boot_state(self, boot: BootState) -> None:
        """Registers of the bootstrap vCPU as the kernel loader left them."""

    def reset(self) -> None:
        """Every vCPU and the in-accelerator devices at power-on (vCPU threads parked)."""

    def close(self) -> None:
        """Release everything; before guest RAM is unmapped."""

    def vcpu_thread_started(self, index: int) -> None:
        """On vCPU ``index``'s own thread, before its first ``run()``."""

    def before_guest_entry(self, index: int) -> None:
        """On vCPU ``index``'s thread before each ``run()``: move what the interrupt
        controllers have for it into the vCPU."""

    def wait_halted(self, index: int) -> None:
        """On vCPU ``index``'s thread after a halt exit: sleep until something can end
        the halt (every such event kicks the vCPU), or briefly."""

    def serve_pm_timer(self, port: int, clock: PmTimerClock | None) -> None:
        """Answer the guest's reads of the ACPI PM timer at ``port`` from ``clock``
        without an exit, where the accelerator can (the translator); None sends them
        to the device model again. Under KVM the reads exit to the model, as in QEMU."""
