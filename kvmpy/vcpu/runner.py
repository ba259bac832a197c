"""The vCPU thread: run the backend, dispatch exits to the buses, obey the machine.

One loop serves both accelerators; it speaks the run protocol of kvmpy.hv.exits
and asks its machine only what ``VcpuHost`` declares. Device faults are logged,
never raised into the guest loop: a hostile guest must not be able to kill the
VMM through a device.

Where the backend offers it (KVM and the translator without tracing; the
translator under ``--trace profile`` too), one port or MMIO access a device claims
takes the shortest way there is: the C loop returns it decoded, and the loop calls
the device's own read or write with the offset the bus resolved once for that
address (``Bus.accessors``). Under KVM that much is done in C
(``kvmpy.vcpu._claimed``, c_ext/exitpath/claimed.c), which calls the device's method
itself and hands this loop only what it cannot serve. Under nested KVM, and for the
translator's console, the Python run per exit is most of what a claimed access costs
the guest.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Protocol

from ..hv.exits import (DECODED_AFTER_QUEUED, DECODED_MMIO_READ, DECODED_MMIO_WRITE, DECODED_PIO_READ,
                        DECODED_PIO_WRITE, DECODED_SERVED,
                        EXIT_DEBUG, EXIT_HLT, EXIT_INTERNAL_ERROR, EXIT_INTR, EXIT_IO, EXIT_MMIO,
                        EXIT_SHUTDOWN, EXIT_SYSTEM_EVENT, SYSTEM_EVENT_RESET)
from ..threadname import name_this_thread
from . import _claimed     # its copy of the DECODED_* codes: tests/test_claimed_serve.py

if TYPE_CHECKING:  # pragma: no cover - annotations only; none of these imports this module
    from ..devices.bus import Bus
    from ..hv.protocol import Accel, Vcpu
    from ..memory import GuestMemory
    from .profile import BootProfile

log = logging.getLogger(__name__)

DEVICE_ERRORS_LOGGED = 20     # per vCPU: a guest hammering a broken device must not flood the log


class VcpuHost(Protocol):
    """What a vCPU thread reads of its machine and all it may call there (the Machine)."""

    pio_bus: Bus
    mmio_bus: Bus
    memory: GuestMemory          # for the exit tracer's view of the guest's code
    accel: Accel
    trace_exits: bool            # ``trace = ["exits"]``: wrap the vCPU in an ExitTracer
    profile: BootProfile | None  # ``trace = ["profile"]``: time the vCPU's run and exits
    # Set when the machine wants its vCPUs at a checkpoint (pause, reset, stop).
    control_pending: bool

    def vcpu_checkpoint(self, thread: VcpuThread) -> bool:
        """Between exits while control_pending; blocks while paused. False: end the thread."""

    def vcpu_halted(self, thread: VcpuThread) -> None:
        """After a halt exit: wait until something can end the halt."""

    def guest_triple_fault(self, thread: VcpuThread) -> None: ...

    def request_reset(self, guest: bool, reason: str) -> None: ...

    def request_shutdown(self, status: int, guest: bool, reason: str, message: str = "") -> None: ...

    def vcpu_internal_error(self, thread: VcpuThread, message: str) -> None:
        """The vCPU cannot go on (the backend failed, or kvmpy has a bug): stop the VM."""

    def vcpu_exited(self, thread: VcpuThread) -> None:
        """Last call on the thread, however it ended."""


class VcpuThread(threading.Thread):
    def __init__(self, host: VcpuHost, vcpu: Vcpu, index: int) -> None:
        super().__init__(name=f"vcpu{index}", daemon=True)
        self.host = host
        self.vcpu = vcpu
        self.index = index
        self._device_errors = 0

    def run(self) -> None:
        host = self.host
        accel = host.accel
        vcpu = self.vcpu
        index = self.index
        pio, mmio = host.pio_bus, host.mmio_bus
        name_this_thread(f"CPU {index}/{accel.name.upper()}")     # QEMU's name for it
        accel.vcpu_thread_started(index)
        # Decided once here, so that an accelerator with nothing to do before an
        # entry, after an exit or on a doorbell write costs the loop no call.
        doorbell = accel.platform.doorbell_write if accel.software_doorbells else None
        before_entry = accel.before_guest_entry if accel.needs_before_guest_entry else None
        # Queued port writes reach their device before any exit does, so the device
        # sees the guest's accesses in order.
        port_writes = accel.port_write_queue
        drain = port_writes.drain if port_writes is not None else None
        # A value's bytes by access size, up to the translator's widest (32-byte) access.
        masks = [(1 << (8 * n)) - 1 for n in range(33)]
        # The tracer and the profiler count every exit, so the backend must return each one.
        if host.trace_exits or host.profile is not None:
            vcpu.report_every_exit = True
        # Tracing wraps the vCPU, so the loop below is the same code, and as fast,
        # with tracing off.
        tracer = None
        if host.trace_exits:
            from .trace import ExitTracer
            vcpu = tracer = ExitTracer(vcpu, index, host.memory, accel.name)
        profiled = None
        if host.profile is not None:
            vcpu = profiled = host.profile.wrap(vcpu, index)
        # The fast path (timed by the profiler where the backend keeps it while every
        # exit is reported): a single port or MMIO access comes back from the backend's
        # C loop already decoded, and goes straight to the claiming device's method
        # (the bus's accessors, resolved once per address per bus map); one made
        # while port writes were queued comes back flagged (DECODED_AFTER_QUEUED) and
        # they are drained first. Everything else takes the general path below.
        decoded = None
        if tracer is None and doorbell is None:
            decoded = vcpu.decoded_exits()
        serve = None
        if decoded is not None:
            run_decoded, state, access, exit_kind, native = decoded
            # Where the backend has a C entry and nothing must run before an entry, a
            # claimed access is served from C (c_ext/exitpath/claimed.c): the device's
            # method is called there as below, and only what that loop cannot serve
            # (another exit, an address no accessor is known for yet, a set
            # control_pending) comes back to this loop, which serves it as before.
            if native is not None and before_entry is None:
                serve_args = (*native, pio, mmio, host, drain, self._served_device_error)
                serve = _claimed.serve
        # Where the accelerator moves interrupts into the CPU (the translator), the fast
        # path does so only before the first entry and after an exit it does not serve:
        # whatever makes an interrupt pending kicks the vCPU, and a kicked CPU returns
        # EXIT_INTR at once (kvmpy.devices.irqchip's protocol), which is such an exit.
        check_interrupts = True
        try:
            while True:
                if host.control_pending:
                    check_interrupts = True
                    if not host.vcpu_checkpoint(self):
                        return
                if decoded is not None:
                    if check_interrupts:
                        check_interrupts = False
                        if before_entry is not None:
                            before_entry(index)
                    if serve is not None:
                        code = serve(*serve_args)
                        if code == DECODED_SERVED:
                            continue
                    else:
                        code = run_decoded(state)
                    if code > DECODED_MMIO_READ:
                        # Queued port writes were pending: they reach their devices first.
                        if drain is not None:
                            drain()
                        code -= DECODED_AFTER_QUEUED
                    if code == DECODED_PIO_WRITE:
                        port = access[0]
                        acc = pio.accessors.get(port) or pio.accessor(port)
                        try:
                            if acc is None:
                                pio.write(port, access[1], access[2])     # unclaimed: the bus notes it
                            else:
                                acc[1](acc[2], access[1], access[2])
                        except Exception as e:  # a device bug or hostile value: log, keep the VM alive
                            self._device_error(f"port {port:#x}", e)
                        continue
                    if code == DECODED_PIO_READ:
                        port, size = access[0], access[1]
                        acc = pio.accessors.get(port) or pio.accessor(port)
                        try:
                            access[3] = (pio.read(port, size) if acc is None else acc[0](acc[2], size)) & masks[size]
                        except Exception as e:
                            access[3] = masks[size]
                            self._device_error(f"port {port:#x}", e)
                        continue
                    if code == DECODED_MMIO_WRITE:
                        addr = access[0]
                        acc = mmio.accessors.get(addr) or mmio.accessor(addr)
                        try:
                            if acc is None:
                                mmio.write(addr, access[1], access[2])
                            else:
                                acc[1](acc[2], access[1], access[2])
                        except Exception as e:
                            self._device_error(f"MMIO {addr:#x}", e)
                        continue
                    if code == DECODED_MMIO_READ:
                        addr, size = access[0], access[1]
                        acc = mmio.accessors.get(addr) or mmio.accessor(addr)
                        try:
                            access[3] = (mmio.read(addr, size) if acc is None else acc[0](acc[2], size)) & masks[size]
                        except Exception as e:
                            access[3] = masks[size]
                            self._device_error(f"MMIO {addr:#x}", e)
                        continue
                    kind = exit_kind(code)
                    check_interrupts = True
                else:
                    if before_entry is not None:
                        before_entry(index)
                    kind = vcpu.run()
                if drain is not None:
                    drain()
                if kind == EXIT_IO:
                    port, size, data = vcpu.io_port, vcpu.io_size, vcpu.io_data
                    try:
                        if len(data) == size:      # one access (all but rep ins/outs): no slicing
                            if vcpu.io_write:
                                value = int.from_bytes(data, "little")
                                if doorbell is None or not doorbell(port, size, value, True):
                                    pio.write(port, size, value)
                            else:
                                data[:] = (pio.read(port, size) & masks[size]).to_bytes(size, "little")
                        elif vcpu.io_write:
                            for off in range(0, len(data), size):
                                value = int.from_bytes(data[off:off + size], "little")
                                if doorbell is not None and doorbell(port, size, value, True):
                                    continue
                                pio.write(port, size, value)
                        else:
                            for off in range(0, len(data), size):
                                data[off:off + size] = (pio.read(port, size) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
                    except Exception as e:  # a device bug or hostile value: log, keep the VM alive
                        self._device_error(f"port {port:#x}", e)
                elif kind == EXIT_MMIO:
                    addr, size, data = vcpu.mmio_addr, vcpu.mmio_size, vcpu.mmio_data
                    try:
                        if vcpu.mmio_write:
                            value = int.from_bytes(data, "little")
                            if doorbell is None or not doorbell(addr, size, value, False):
                                mmio.write(addr, size, value)
                        else:
                            data[:] = (mmio.read(addr, size) & masks[size]).to_bytes(size, "little")
                    except Exception as e:
                        self._device_error(f"MMIO {addr:#x}", e)
                elif kind == EXIT_INTR:
                    continue
                elif kind == EXIT_HLT:
                    host.vcpu_halted(self)
                elif kind == EXIT_SHUTDOWN:
                    host.guest_triple_fault(self)
                elif kind == EXIT_SYSTEM_EVENT:
                    if vcpu.system_event == SYSTEM_EVENT_RESET:
                        host.request_reset(guest=True, reason="guest-reset")
                    else:
                        host.request_shutdown(0, guest=True, reason="guest-shutdown")
                elif kind == EXIT_INTERNAL_ERROR:
                    host.vcpu_internal_error(self, vcpu.internal_error)
                elif kind == EXIT_DEBUG:
                    continue
        except Exception as e:  # a bug in kvmpy itself: stop the VM with a clear message
            log.debug("vcpu%d crashed", self.index, exc_info=True)
            host.vcpu_internal_error(self, f"vCPU {self.index} thread failed: {e}")
        finally:
            if tracer is not None:
                tracer.close()
            if profiled is not None:
                profiled.close()
            host.vcpu_exited(self)

    def _served_device_error(self, code: int, addr: int, e: Exception) -> None:
        """A device's exception in an access the C loop served."""
        kind = "MMIO" if code in (DECODED_MMIO_WRITE, DECODED_MMIO_READ) else "port"
        self._device_error(f"{kind} {addr:#x}", e)

    def _device_error(self, where: str, e: Exception) -> None:
        self._device_errors += 1
        if self._device_errors <= DEVICE_ERRORS_LOGGED:
            log.error("device error at %s: %s: %s", where, type(e).__name__, e)
            log.debug("device error traceback", exc_info=True)
