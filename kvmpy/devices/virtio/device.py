"""What a virtio device model is to its transport, and what the transport is to it.

A device model (virtio-blk, virtio-net, a plug-in such as virtio-rng) knows its
queues' requests and nothing of PCI: a transport (VirtioPciTransport) wraps it and
owns the status state machine, feature negotiation, queue configuration,
interrupts and the event loop subscriptions. The split follows Firecracker's
``VirtioDevice`` trait and kvmtool's ``struct virtio_ops``.

Life of a device, as the transport drives it:
  1. the driver reads ``device_features()`` (the transport adds the ring and
     version bits) and ``config_bytes()``; it may ``write_config``;
  2. at FEATURES_OK the transport calls ``ack_features`` with the accepted set;
  3. at DRIVER_OK, ``activate(queues, memory, transport)``; the device keeps what
     it needs and may raise (a backend that cannot start is a device error);
     then the transport waits on ``fd_watches()`` besides the doorbells;
  4. every queue notification runs ``process_queue(index)``, every ready fd its
     ``on_ready``; both on the machine's event loop thread, one at a time;
  5. ``reset()`` when the driver resets the device (or the machine resets):
     back to the state before step 2.

Anything hostile in a queue raises QueueError (or GuestMemoryError) out of
``process_queue``/``on_ready``: the transport sets DEVICE_NEEDS_RESET, logs one
error and stops serving the device until the driver resets it. A bad *request*
the device can answer (an out-of-range sector) is answered, not raised.

A native data plane (optional: the defaults below say "none", and a device that
does not derive from VirtioDevice is always served in Python). The transport
offers a queue to a plane each time the model has served it:
  offer: ``native_backend()`` says what threads of the transport's may serve on
     their own now (dataplane.BlkBackend: each queue on a virtio-blk thread;
     netplane.NetPairs: rx/tx pairs on virtio-net threads); where it has none,
     ``native_queue()`` may start a plane of the device's own (vhost-net's kernel
     rings) on one queue and return it as a ServedQueue. From then on the queue's
     doorbell and ring indices are the plane's, not the event loop's.
  take back: at the first request or frame the plane would not handle exactly as
     the model would, it stops before consuming it and writes its hand-back
     eventfd; the transport stops it, puts the ring indices back into the
     SplitQueue (``native_stopped()`` for a net pair) and runs the model from there.
  stop: a reset, a device error, FAILED, a BAR move, a change of interrupt route,
     a paused VM, ``state()`` and an offer of None (the model holds a request for
     `cont`, a receive filter is set) take every queue back the same way first.

State as values: ``state()`` returns a frozen dataclass of the device's own
state (not the transport's, not the queues'); each device class also offers
``from_state(state, <its backend>)`` building an equal device, as rust-vmm's
vm-superio does (``Serial::from_state``). It is a constructor, not a Protocol
member, because every device takes different backends (a block driver, a tap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from ...memory import GuestMemory
from .queue import QueueError, SplitQueue

if TYPE_CHECKING:   # the planes load their cffi modules; a plug-in needs neither
    from .dataplane import BlkBackend, StopInfo
    from .netplane import NetPairBackend, NetPairs, NetStopInfo

__all__ = ["FdWatch", "QueueError", "ServedQueue", "VirtioDevice", "VirtioTransport"]


@dataclass(frozen=True)
class FdWatch:
    """A host fd an active device waits on (a tap), besides its queues' doorbells.

    ``events`` is what it waits for at activation (kvmpy.events.EVENT_READ /
    EVENT_WRITE); ``on_ready(ready_events)`` runs on the event loop thread.
    """

    fd: int
    events: int
    on_ready: Callable[[int], None]


class VirtioTransport(Protocol):
    """What an activated device may ask of the transport that carries it."""

    def signal_used(self, queue_index: int) -> None:
        """Used buffers were added to queue ``queue_index``: interrupt the driver
        if it asked for it (no-interrupt flag, used_event)."""

    def config_changed(self) -> None:
        """The device config changed under the driver: a config interrupt."""

    def set_fd_events(self, fd: int, events: int) -> None:
        """Change what one of the device's ``fd_watches`` waits for (0: nothing
        for now, e.g. no RX buffers to fill); called from the device's callbacks."""

    def native_offer_changed(self) -> None:
        """What ``native_backend()`` offers changed in a way the threads serving it
        must follow before the driver sees the request that changed it complete (a
        new receive filter): running threads take the new offer, or stop, now."""

    def hold_native(self, held: bool) -> None:
        """Stop the device's native data plane threads (``held``) or let them serve
        again; meanwhile the event loop serves the queues through the device."""


class ServedQueue(Protocol):
    """One queue a data plane outside the event loop serves, from its start until
    ``stop()`` (dataplane.NativeQueue, vhost.VhostQueue); its doorbell is the plane's."""

    #: the queue whose ring indices the plane holds while it runs
    queue: SplitQueue
    #: the unmasked MSI-X vector's eventfd the plane raises itself, or None: it
    #: writes ``call_fd`` and the transport raises the interrupt on the event loop
    irq_fd: int | None
    #: written when the plane wants an interrupt the transport must raise
    call_fd: int
    #: written when the plane stopped before something only the model may answer
    handback_fd: int
    #: the INTx flag it shares with the transport (a blk thread: dataplane.IntxPending,
    #: set while its raise is pending), or None
    intx_pending: object | None

    def stop(self) -> StopInfo:
        """Stop at a request boundary and put the ring indices back into ``queue``."""

    def take_interrupt(self) -> bool:
        """Whether ``call_fd`` was written since the last call (reads it empty)."""


class VirtioDevice(Protocol):
    """A virtio device model, transport independent (see the module docstring)."""

    #: for log messages and the transport's name
    name: str
    #: the virtio device id (1 network, 2 block, 4 entropy, ...)
    device_type: int
    #: the largest ring size of each queue; its length is the number of queues
    queue_max_sizes: tuple[int, ...]

    def device_features(self) -> int:
        """The device-specific feature bits offered (bits 0-23 and 50-127 of the
        spec's space); the transport adds VERSION_1, INDIRECT_DESC and EVENT_IDX."""

    def ack_features(self, features: int) -> None:
        """The features the driver accepted (FEATURES_OK), transport bits included."""

    def config_bytes(self) -> bytes:
        """The device-specific config structure as the driver sees it now."""

    def write_config(self, offset: int, size: int, value: int) -> None:
        """A driver write into the device config (ignore what is read-only)."""

    def activate(self, queues: Sequence[SplitQueue], memory: GuestMemory, transport: VirtioTransport) -> None:
        """DRIVER_OK: start serving ``queues`` (all of them, enabled or not; an
        enabled one has ``ready`` set). Raise to refuse (a device error)."""

    def process_queue(self, index: int) -> None:
        """The driver notified queue ``index`` (enabled, device active)."""

    def fd_watches(self) -> Sequence[FdWatch]:
        """The host fds to wait on while active (asked right after ``activate``)."""

    def reset(self) -> None:
        """Forget the negotiation and stop using the queues (they are the
        transport's; it resets them)."""

    def state(self) -> object:
        """The device's own state as a frozen dataclass (see the module docstring)."""

    # a native data plane (see the module docstring); the defaults: none ------------

    def native_backend(self) -> BlkBackend | NetPairs | None:
        """Offer: what the transport's threads may serve on their own now, or None
        while everything must come to ``process_queue``. Asked on the event loop
        thread right after the model served a queue; None also takes back every
        queue those threads serve, so none runs on past what the model holds."""
        return None

    def native_queue(self, index: int, queue: SplitQueue, kick_fd: int, irq_fd: int | None) -> ServedQueue | None:
        """Offer of a plane of the device's own, asked where ``native_backend()`` has
        none: start serving queue ``index`` from its doorbell ``kick_fd``, raising
        ``irq_fd`` (None: the returned queue's ``call_fd``), or return None to keep
        the queue in the model. OSError: the plane cannot start (the transport then
        keeps every queue in Python)."""
        return None

    def native_started(self, pair: NetPairBackend, counts: Callable[[], dict[str, int]]) -> None:
        """A thread serves the rx/tx ``pair`` of a NetPairs offer now; ``counts()``
        tells what it moved so far."""

    def native_stopped(self, pair: NetPairBackend, info: NetStopInfo) -> None:
        """Take back: the thread of ``pair`` stopped (handed back, or stopped by the
        transport) and the rings' indices are in the SplitQueues again; ``info`` has
        what it moved."""
