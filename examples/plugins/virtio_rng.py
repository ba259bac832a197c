"""virtio-rng (virtio 1.x, section 5.4, "entropy device"): the first device plug-in.

A plug-in is a class outside the kvmpy package; this one implements the
VirtioDevice protocol (kvmpy/devices/virtio/device.py) and declares ``bus =
"virtio"``, so kvmpy puts it on PCI behind its virtio transport, like its own
disks and NICs. It is named in vm.toml (or ``--device``) with its options::

    [[device]]
    type = "examples.plugins.virtio_rng:VirtioRng"     # or a file: "path/virtio_rng.py:VirtioRng"
    max_bytes_per_request = 4096

The device has one queue. The driver posts device-writable buffers; each request
gets fresh bytes from the host's ``os.urandom``, at most ``max_bytes_per_request``
of them, so a guest cannot make the host draw (and hold) gigabytes at once. A
request with a device-readable buffer is a driver bug the spec rules out; it is
refused as a device error (DEVICE_NEEDS_RESET), like a descriptor outside RAM or
a chain that loops, which the queue itself refuses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

from kvmpy.devices.virtio.device import FdWatch, QueueError, VirtioDevice, VirtioTransport
from kvmpy.devices.virtio.queue import MAX_QUEUE_SIZE, SplitQueue, write_views
from kvmpy.errors import ConfigError
from kvmpy.memory import GuestMemory

VIRTIO_ID_ENTROPY = 4
REQUEST_QUEUE = 0

DEFAULT_MAX_BYTES_PER_REQUEST = 64 << 10
# os.urandom of more than this per request would only let a guest pin host memory.
LIMIT_MAX_BYTES_PER_REQUEST = 1 << 20
DEFAULT_QUEUE_SIZE = 256


@dataclass(frozen=True)
class VirtioRngState:
    max_bytes_per_request: int
    queue_size: int
    requests: int
    bytes_served: int


class VirtioRng(VirtioDevice):
    """An entropy device. Its options (``ctx.options``, all optional):

      max_bytes_per_request: bytes served per request at most (1 .. 1 MiB, default 64 KiB)
      queue_size: largest ring the driver may use (a power of two <= 32768, default 256)

    An unknown key or a bad value is a ConfigError naming it.
    """

    bus = "virtio"
    device_type = VIRTIO_ID_ENTROPY

    @classmethod
    def place(cls, options: Mapping) -> tuple:
        return ()             # on PCI: the bus gives it its addresses

    def __init__(self, ctx) -> None:
        """``ctx``: the kvmpy.devices.context.DeviceContext (only ``name`` and ``options`` are used)."""
        if not isinstance(ctx.options, Mapping):
            raise ConfigError(f"virtio-rng: options must be a table, got {type(ctx.options).__name__}")
        options = dict(ctx.options)
        self.name = ctx.name or "virtio-rng"
        self.max_bytes_per_request = _option_int(options, "max_bytes_per_request", DEFAULT_MAX_BYTES_PER_REQUEST,
                                                 1, LIMIT_MAX_BYTES_PER_REQUEST)
        self.queue_size = _option_int(options, "queue_size", DEFAULT_QUEUE_SIZE, 1, MAX_QUEUE_SIZE)
        if self.queue_size & (self.queue_size - 1):
            raise ConfigError(f"{self.name}: queue_size {self.queue_size} is not a power of two")
        if options:
            raise ConfigError(f"{self.name}: unknown option(s) {', '.join(sorted(options))} "
                              "(known: max_bytes_per_request, queue_size)")
        self.queue_max_sizes = (self.queue_size,)
        self.requests = 0
        self.bytes_served = 0
        self._queue: SplitQueue | None = None
        self._transport: VirtioTransport | None = None

    # state ---------------------------------------------------------------------------

    def state(self) -> VirtioRngState:
        return VirtioRngState(max_bytes_per_request=self.max_bytes_per_request, queue_size=self.queue_size,
                              requests=self.requests, bytes_served=self.bytes_served)

    @classmethod
    def from_state(cls, state: VirtioRngState, ctx) -> "VirtioRng":
        dev = cls(_Rebuilt(ctx.name, {"max_bytes_per_request": state.max_bytes_per_request,
                                      "queue_size": state.queue_size}))
        dev.requests, dev.bytes_served = state.requests, state.bytes_served
        return dev

    # what the driver sees: no feature bits, no config space -----------------------------

    def device_features(self) -> int:
        return 0

    def ack_features(self, features: int) -> None:
        """Nothing to do: the device behaves the same whatever the driver accepted."""

    def config_bytes(self) -> bytes:
        return b""

    def write_config(self, offset: int, size: int, value: int) -> None:
        """There is no config space to write."""

    # life cycle ------------------------------------------------------------------------

    def activate(self, queues: Sequence[SplitQueue], memory: GuestMemory, transport: VirtioTransport) -> None:
        self._queue = queues[REQUEST_QUEUE]
        self._transport = transport

    def fd_watches(self) -> Sequence[FdWatch]:
        return ()

    def reset(self) -> None:
        self._queue = None
        self._transport = None

    # requests (event loop thread) ----------------------------------------------------------

    def process_queue(self, index: int) -> None:
        q = self._queue
        while True:
            served = False
            for chain in q.iter_chains():
                if chain.readable:
                    raise QueueError(f"request {chain.head} has a device-readable buffer "
                                     f"({chain.readable_len} bytes); entropy requests are write-only")
                wanted = min(chain.writable_len, self.max_bytes_per_request)
                written = write_views(chain.writable, os.urandom(wanted)) if wanted else 0
                q.add_used(chain.head, written)
                self.requests += 1
                self.bytes_served += written
                served = True
            if served:
                self._transport.signal_used(index)
            if not q.set_notification(True):
                return


def _option_int(options: dict, key: str, default: int, low: int, high: int) -> int:
    value = options.pop(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"virtio-rng: {key} must be an integer in {low}..{high}, got {value!r}")
    return value


@dataclass(frozen=True)
class _Rebuilt:
    """The part of a DeviceContext the constructor reads, for from_state."""
    name: str
    options: Mapping
