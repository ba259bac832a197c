"""The vCPU thread: run the backend, dispatch exits to the buses, obey the machine.

One loop serves both backends (KVM and the translator); it only speaks the
protocol of kvmpy.vcpu.exits. Device faults are logged, never raised into the
guest loop: a hostile guest must not be able to kill the VMM through a device.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from . import exits

if TYPE_CHECKING:  # pragma: no cover
    from ..machine import Machine

log = logging.getLogger(__name__)


class VcpuThread(threading.Thread):
    def __init__(self, machine: "Machine", vcpu, index: int) -> None:
        super().__init__(name=f"vcpu{index}", daemon=True)
        self.machine = machine
        self.vcpu = vcpu
        self.index = index
        self._device_errors = 0

    def run(self) -> None:
        m = self.machine
        vcpu = self.vcpu
        pio, mmio = m.pio_bus, m.mmio_bus
        # Software doorbells (translator); under KVM, ioeventfds take those writes in the kernel.
        doorbell = getattr(m.platform, "doorbell_write", None)
        soft_doorbells = doorbell is not None
        started = getattr(m.accel, "vcpu_thread_started", None)
        if started is not None:
            started(self.index)
        pre_run = getattr(m.accel, "pre_run", None)   # software interrupt delivery (translator)
        # KVM's coalesced port writes: handed to their device before any exit is, so
        # the device sees the guest's accesses in order.
        drain = getattr(m.accel, "drain_coalesced", None)
        index = self.index
        # Tracing wraps the vCPU, so the loop below is the same code, and as fast,
        # with tracing off.
        tracer = None
        if "exits" in getattr(m.cfg, "trace", ()):
            from .trace import ExitTracer
            vcpu = tracer = ExitTracer(vcpu, index, m.memory, getattr(m.accel, "name", ""))
        try:
            while True:
                if m.control_pending:
                    if not m.vcpu_checkpoint(self):
                        return
                if pre_run is not None:
                    pre_run(index)
                kind = vcpu.run()
                if drain is not None:
                    drain()
                if kind == exits.EXIT_IO:
                    port, size, data = vcpu.io_port, vcpu.io_size, vcpu.io_data
                    try:
                        if vcpu.io_write:
                            for off in range(0, len(data), size):
                                value = int.from_bytes(data[off:off + size], "little")
                                if soft_doorbells and doorbell(port, size, value, True):
                                    continue
                                pio.write(port, size, value)
                        else:
                            for off in range(0, len(data), size):
                                data[off:off + size] = (pio.read(port, size) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
                    except Exception as e:  # a device bug or hostile value: log, keep the VM alive
                        self._device_error(f"port {port:#x}", e)
                elif kind == exits.EXIT_MMIO:
                    addr, size, data = vcpu.mmio_addr, vcpu.mmio_size, vcpu.mmio_data
                    try:
                        if vcpu.mmio_write:
                            value = int.from_bytes(data, "little")
                            if not (soft_doorbells and doorbell(addr, size, value, False)):
                                mmio.write(addr, size, value)
                        else:
                            data[:] = (mmio.read(addr, size) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
                    except Exception as e:
                        self._device_error(f"MMIO {addr:#x}", e)
                elif kind == exits.EXIT_INTR:
                    continue
                elif kind == exits.EXIT_HLT:
                    m.vcpu_halted(self)
                elif kind == exits.EXIT_SHUTDOWN:
                    m.guest_triple_fault(self)
                elif kind == exits.EXIT_SYSTEM_EVENT:
                    if vcpu.system_event == exits.SYSTEM_EVENT_RESET:
                        m.request_reset(guest=True, reason="guest-reset")
                    else:
                        m.request_shutdown(0, guest=True, reason="guest-shutdown")
                elif kind == exits.EXIT_INTERNAL_ERROR:
                    m.vcpu_internal_error(self, vcpu.internal_error)
                elif kind == exits.EXIT_DEBUG:
                    continue
        except Exception as e:  # a bug in kvmpy itself: stop the VM with a clear message
            log.debug("vcpu%d crashed", self.index, exc_info=True)
            m.vcpu_internal_error(self, f"vCPU {self.index} thread failed: {e}")
        finally:
            if tracer is not None:
                tracer.close()
            m.vcpu_exited(self)

    def _device_error(self, where: str, e: Exception) -> None:
        self._device_errors += 1
        if self._device_errors <= 20:
            log.error("device error at %s: %s: %s", where, type(e).__name__, e)
            log.debug("device error traceback", exc_info=True)
