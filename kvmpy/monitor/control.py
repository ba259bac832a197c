"""The control surface a running machine offers to its monitors.

QMP, the human monitor, the console escape and the signal handlers all drive the
machine through this one protocol, so none of them imports the machine itself.
Every method may be called from a monitor thread (never from a vCPU thread), and
several monitors may call concurrently: the machine serialises as it needs.
Event callbacks, in contrast, may arrive from any thread (vCPU threads included)
and must never block; the monitors only queue them.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from ..net.announce import AnnounceParameters

# QMP RunState names this project reports (a subset of QEMU's qapi/run-state.json).
RUN_STATES = ("running", "paused", "shutdown", "prelaunch", "internal-error", "guest-panicked", "io-error")

# Events a machine emits through add_event_listener, with QEMU's data members:
#   STOP {}, RESUME {}, POWERDOWN {},
#   SHUTDOWN {"guest": bool, "reason": "guest-shutdown" | "host-qmp-quit" | "host-signal" | ...},
#   RESET {"guest": bool, "reason": "guest-reset" | "host-qmp-system-reset" | ...},
#   BLOCK_IO_ERROR {"device", "node-name", "operation": "read" | "write",
#                   "action": "stop" | "report" | "ignore", "nospace": bool, "reason": strerror}
#     (with "stop" the VM then goes to "io-error" and a STOP follows)
EVENT_NAMES = ("STOP", "RESUME", "SHUTDOWN", "POWERDOWN", "RESET", "BLOCK_IO_ERROR")

EventCallback = Callable[[str, dict], None]


class ControlError(Exception):
    """A control request the machine cannot honour now ("cannot resume: guest
    has shut down"). Monitors report the message (QMP GenericError) and carry on;
    any other exception from a control method is logged as a monitor bug."""


@runtime_checkable
class VmControl(Protocol):
    """Everything a monitor (QMP, HMP, the console's, the signal handlers) may ask
    of a VM; monitors call nothing else on it."""

    name: str

    def status(self) -> str:
        """The QMP RunState name, one of RUN_STATES."""

    def pause(self) -> None:
        """Stop all vCPUs: they leave KVM_RUN and wait. Emits STOP."""

    def resume(self) -> None:
        """Let the vCPUs run again, from "paused" or "io-error" (the requests a disk
        kept are retried). Emits RESUME. May raise ControlError where the
        VM cannot run on (QEMU: after a shutdown, until a reset)."""

    def reset(self) -> None:
        """system_reset. Emits RESET."""

    def powerdown(self) -> None:
        """ACPI power button press. Emits POWERDOWN."""

    def quit(self) -> None:
        """Stop the VM; the process exits. Emits SHUTDOWN."""

    def kvm_info(self) -> dict:
        """{"enabled": bool, "present": bool}"""

    def cpus(self) -> list[dict]:
        """query-cpus-fast entries: cpu-index, thread-id, qom-path, target, props."""

    def vcpu_registers(self) -> list[tuple[Any, Any]]:
        """(regs, sregs) per vCPU, read with the vCPUs held outside the guest: the
        fields of KVM's kvm_regs and kvm_sregs (rax..r15, rip, rflags; segments cs..tr
        with selector/base/limit/type/dpl/l/db/present, gdt/idt base/limit, cr0-cr4,
        efer, apic_base). ControlError when this VM has no registers to show."""

    def block_devices(self) -> list[dict]:
        """query-block shaped dicts."""

    def eject(self, device: str, force: bool = False) -> None:
        """Take the disc out of removable drive ``device`` ("ide1-cd0"), as QEMU's
        eject. ControlError for an unknown or fixed drive, or one the guest locked
        (unless ``force``)."""

    def change_medium(self, device: str, filename: str, format: str | None = None) -> None:
        """Put image ``filename`` (read-only; format probed when None) into removable
        drive ``device``: blockdev-change-medium, HMP change. ControlError naming
        what is wrong."""

    def network_devices(self) -> list[dict]:
        """[{"name", "type", "ifname", "mac", "bridge"}]"""

    def announce_self(self, params: AnnounceParameters) -> None:
        """announce-self: the NICs ``params`` names announce themselves in rounds on
        the VM's event loop (kvmpy.net.announce); returns at once."""

    def iothreads(self) -> list[dict]:
        """query-iothreads entries: id, thread-id, poll-max-ns, poll-grow,
        poll-shrink, aio-max-batch."""

    def add_event_listener(self, callback: EventCallback) -> None:
        """Call callback(event_name, data) for each event in EVENT_NAMES."""

    def remove_event_listener(self, callback: EventCallback) -> None:
        """Stop calling ``callback``; a callback never added is ignored."""

    def on_close(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` when the VM is closed (a monitor's servers close with it)."""


@runtime_checkable
class DisplayControl(Protocol):
    """What a VM with a screen offers besides VmControl (kvmpy.display); monitors
    check for it and answer as QEMU does without a display when it is missing."""

    def screendump(self, filename: str, fmt: str = "ppm") -> None:
        """Write the screen to ``filename`` as "ppm" or "png"; ControlError if it cannot."""

    def send_keys(self, keys: list[int], hold_ms: int = 100) -> None:
        """Press QEMU key numbers (kvmpy.display.keymap.QKEYCODES) in order, release
        them in reverse after ``hold_ms``."""

    def vnc_info(self) -> dict:
        """query-vnc's reply ({"enabled": False} without a VNC server)."""

    def set_vnc_password(self, password: str) -> None: ...
