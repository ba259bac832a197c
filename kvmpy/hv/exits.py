"""The one protocol every vCPU backend (KVM, translator) offers to the run loop.

``run()`` enters the guest and returns an exit kind. For EXIT_IO and EXIT_MMIO
the backend exposes the access through attributes set before returning:

  EXIT_IO:   io_port, io_size (1/2/4), io_write (bool), io_count (rep count),
             io_data: writable memoryview of io_size*io_count bytes. For a write
             it holds the guest's data; for a read the loop fills it before the
             next run().
  EXIT_MMIO: mmio_addr, mmio_size (1..8), mmio_write, mmio_data (memoryview of
             mmio_size bytes, same rule).
  EXIT_INTERNAL_ERROR: internal_error (str, includes instruction bytes when known).
  EXIT_SYSTEM_EVENT: system_event (SYSTEM_EVENT_* below).

Registers: get_regs()/set_regs(Regs), get_sregs()/set_sregs(SRegs),
get_msrs([index])->{index: value}/set_msrs({index: value}) with the dataclasses
in kvmpy.hv.regs. The whole protocol is declared as kvmpy.hv.protocol.Vcpu. ``kick()`` may be called from any thread: the vCPU leaves
run() soon with EXIT_INTR.
"""

from typing import Any, Callable, NamedTuple

EXIT_IO = 1
EXIT_MMIO = 2
EXIT_HLT = 3
EXIT_SHUTDOWN = 4          # triple fault / shutdown
EXIT_INTERNAL_ERROR = 5    # emulation failure, entry failure, unknown exit
EXIT_INTR = 6              # kicked (signal / immediate_exit) or otherwise interrupted
EXIT_SYSTEM_EVENT = 7      # PSCI-like system events: reset/shutdown requested by the hypervisor
EXIT_DEBUG = 8

SYSTEM_EVENT_SHUTDOWN = 1
SYSTEM_EVENT_RESET = 2

NAMES = {
    EXIT_IO: "io", EXIT_MMIO: "mmio", EXIT_HLT: "hlt", EXIT_SHUTDOWN: "shutdown",
    EXIT_INTERNAL_ERROR: "internal-error", EXIT_INTR: "intr",
    EXIT_SYSTEM_EVENT: "system-event", EXIT_DEBUG: "debug",
}


# What DecodedExits.run returns for one port or MMIO access (any other value is
# for DecodedExits.exit_kind).
DECODED_PIO_WRITE = 0x100
DECODED_PIO_READ = 0x101
DECODED_MMIO_WRITE = 0x102
DECODED_MMIO_READ = 0x103
# Added to a DECODED_* value when queued port writes (Accel.port_write_queue) were
# pending at that exit: the loop drains them first, then serves the access.
DECODED_AFTER_QUEUED = 0x200
# What the native serve (DecodedExits.native, kvmpy.vcpu._claimed) returns after an
# access it served when the machine's control_pending was set: the loop goes round.
DECODED_SERVED = 0x400


class DecodedExits(NamedTuple):
    """A backend's fast path for the vCPU loop (``Vcpu.decoded_exits()``), for the
    exits a device must answer: ``run(state)`` enters the guest and returns
    DECODED_* with ``access[0]`` the port or address, ``access[1]`` the size and,
    for a write, ``access[2]`` the value; for a read the loop stores the value in
    ``access[3]`` before the next ``run``. Any other return value becomes the exit
    kind, with the exit attributes set, through ``exit_kind(value)``.

    ``native``, where the backend has one, is the same entry for C: the addresses of
    ``int run(void *state)`` (callable without the GIL), of its state, and of the
    access as ``uint64_t[4]``; the vCPU loop then serves claimed accesses without
    returning to Python's loop (c_ext/exitpath/claimed.c)."""

    run: Callable[[Any], int]
    state: Any
    access: Any                  # indexable and writable: address, size, value, read's value
    exit_kind: Callable[[int], int]
    native: tuple[int, int, int] | None = None
