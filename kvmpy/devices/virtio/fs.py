"""virtio-fs (virtio 1.2, section 5.11; device id 26): a host directory as a guest file system.

The driver (Linux's virtiofs) puts FUSE requests in two kinds of queue: queue 0,
"hiprio", carries FORGET/BATCH_FORGET (and INTERRUPT), which get no reply; queue
1 carries everything else. Each request is a device-readable part (fuse_in_header
and its arguments, a WRITE's data) and a device-writable part for the reply. The
FUSE protocol itself is kvmpy.devices.virtio.fuse_server's FuseServer; this
module only moves bytes between the ring and it. Given the event loop, requests
are served on a worker thread of the device's own (kvmpy.events.Worker), one at a
time and in order, so a slow host file system stalls neither a vCPU nor the loop
(the console, the other devices); their used entries are added back on the loop.
Without one (unit tests), inline on the caller's thread.

A request longer than a FUSE header plus ``max_write`` plus a page for names is
not read (the server answers the truncated request with EINVAL); a reply that
does not fit the writable part is replaced by an EIO header, which always fits
when the driver gave room for any reply at all.

The mount tag is what the guest names: ``mount -t virtiofs TAG /mnt``.
"""

from __future__ import annotations

import errno
import logging
import struct
from dataclasses import dataclass
from typing import Sequence

from ...memory import GuestMemory
from .device import FdWatch, VirtioDevice, VirtioTransport
from .fuse_server import IN_HEADER, OUT_HEADER, FuseServer, FuseSessionState
from .queue import DescriptorChain, QueueError, SplitQueue, gather, write_views

log = logging.getLogger(__name__)

VIRTIO_ID_FS = 26
TAG_BYTES = 36
HIPRIO_QUEUE = 0
_CONFIG = struct.Struct("<36sII")       # tag, num_request_queues, notify_buf_size
NAME_ROOM = 2 * 4096                    # two names (RENAME, SYMLINK) besides the fixed arguments


def check_tag(tag: str) -> bytes:
    raw = tag.encode()
    if not raw or len(raw) > TAG_BYTES or b"\0" in raw:
        raise ValueError(f"virtio-fs tag {tag!r}: 1 to {TAG_BYTES} bytes without NUL")
    return raw


@dataclass(frozen=True)
class VirtioFsState:
    """virtio-fs's own state: its tag, queues and the FUSE session's negotiation.
    Open files and the node ids the guest holds are host descriptors and are not
    part of it: a device built from this state serves a new session, so a guest
    restored with the share mounted sees ESTALE/EIO until it mounts again."""

    tag: bytes
    readonly: bool
    queue_size: int
    session: FuseSessionState


class VirtioFs(VirtioDevice):
    """virtio-fs over a FuseServer (which the caller opened on the shared directory
    and closes; the device does not)."""

    device_type = VIRTIO_ID_FS

    def __init__(self, server: FuseServer, tag: str, queue_size: int = 128, name: str = "virtio-fs",
                 events=None) -> None:
        self.name = name
        self._events = events
        self._worker = None
        if events is not None:
            from ...events import Worker
            self._worker = Worker(f"{name}-requests")
        # bumped at every reset: completions of requests popped before it are dropped
        self._generation = 0
        self.server = server
        self.tag = check_tag(tag)
        self.queue_size = queue_size
        self.num_request_queues = 1
        self.queue_max_sizes = (queue_size,) * (1 + self.num_request_queues)
        self.max_request = IN_HEADER.size + 64 + server.max_write + NAME_ROOM
        self.acked_features = 0
        self._queues: Sequence[SplitQueue] = ()
        self._transport: VirtioTransport | None = None
        # Requests handed to the worker and not yet used, by queue: a driver has at
        # most a queue's worth; more is a head made available again while in flight,
        # and each would wait in the worker's queue, without bound.
        self._in_flight: list[int] = []

    def state(self) -> VirtioFsState:
        return VirtioFsState(self.tag, self.server.readonly, self.queue_size, self.server.state())

    @classmethod
    def from_state(cls, state: VirtioFsState, server: FuseServer, name: str = "virtio-fs") -> "VirtioFs":
        if server.readonly != state.readonly:
            raise ValueError(f"{name}: the saved share is {'read-only' if state.readonly else 'writable'}")
        return cls(server, state.tag.decode(), queue_size=state.queue_size, name=name)

    def device_features(self) -> int:
        return 0

    def ack_features(self, features: int) -> None:
        self.acked_features = features

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.tag, self.num_request_queues, 0)

    def write_config(self, offset: int, size: int, value: int) -> None:
        """virtio-fs's config is read-only."""

    def activate(self, queues: Sequence[SplitQueue], memory: GuestMemory, transport: VirtioTransport) -> None:
        self._queues = queues
        self._transport = transport
        self._in_flight = [0] * len(queues)

    def fd_watches(self) -> Sequence[FdWatch]:
        return ()

    def reset(self) -> None:
        self._generation += 1
        self._queues = ()
        self._transport = None
        self._in_flight = []
        self.acked_features = 0

    def close(self) -> None:
        """Stop the worker after the request it runs (the server is closed after this)."""
        self._generation += 1
        if self._worker is not None:
            self._worker.close()

    def process_queue(self, index: int) -> None:
        q = self._queues[index]
        while True:
            did = False
            q.set_notification(False)       # as blk's process_queue: no doorbells mid-batch
            for chain in q.iter_chains():
                if self._worker is not None:
                    if self._in_flight[index] >= q.size:
                        raise QueueError(f"more than {q.size} requests in flight on queue {index}: "
                                         f"head {chain.head} made available again before it was used")
                    self._in_flight[index] += 1
                    self._worker.submit(lambda chain=chain: self._serve_off_loop(index, chain, self._generation))
                    continue
                q.add_used(chain.head, self._serve(chain.readable, chain.writable))
                did = True
            if did:
                self._transport.signal_used(index)
            if not q.set_notification(True):
                return

    def _serve_off_loop(self, index: int, chain: DescriptorChain, generation: int) -> None:
        if generation != self._generation:
            return          # the driver reset the device since: nobody waits for it
        used = self._serve(chain.readable, chain.writable)
        self._events.call_soon(lambda: self._complete(index, chain.head, used, generation))

    def _complete(self, index: int, head: int, used: int, generation: int) -> None:
        if generation != self._generation or not self._queues:
            return
        self._in_flight[index] -= 1
        self._queues[index].add_used(head, used)
        self._transport.signal_used(index)

    def _serve(self, readable: list, writable: list) -> int:
        request, _ = gather(readable, self.max_request)
        reply = self.server.handle(request)
        if not reply:
            return 0
        room = sum(len(v) for v in writable)
        if len(reply) > room:
            unique = OUT_HEADER.unpack_from(reply)[2]
            log.warning("%s: a %d-byte reply for a %d-byte buffer", self.name, len(reply), room)
            reply = OUT_HEADER.pack(OUT_HEADER.size, -errno.EIO, unique)
            if len(reply) > room:
                return 0
        return write_views(writable, reply)
