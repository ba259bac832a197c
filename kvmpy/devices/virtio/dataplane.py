"""The native virtio-blk data plane's Python side: hand a queue to its C thread and take it back.

The C thread (c_ext/dataplane/blk_dataplane.c) serves one split virtqueue from its
doorbell eventfd: reads and writes inside the disk, flushes, GET_ID, well-formed
DISCARD and WRITE_ZEROES (fallocate, as RawDriver), straight between the raw image
and guest RAM, with the same ring checks as queue.py.

A qcow2 disk's thread reads and overwrites only the data clusters in its
``ClusterMap``, which the model fills from the driver (Qcow2Driver.in_place_clusters)
and the driver empties through ``mapping_listeners`` whenever a mapping changes
(allocation over an old entry, discard, zeroing, snapshots, resize, commit,
repair, a refused write); everything else (unallocated or zero clusters, backing
files, compressed or shared clusters, allocating writes, flushes, discards) is
handed back to the model. It
never decides anything the device model decides: at the first request it does not
serve exactly as the model would (a bad descriptor, a host I/O error, a request
type, range or layout it leaves to the model) it stops before consuming that
request and writes its hand-back eventfd; the transport then takes the queue
indices back into the SplitQueue and lets the model carry on from there.

Reads and writes go to the queue's io_uring (``Ring``), a batch of up to 32 at
once (on qcow2 those within one run of host clusters; one over several runs is
done on the thread, run by run); a flush or discard waits for the batch's I/O first. Without a
ring (KVMPY_BLK_AIO=threads, or a kernel that refuses io_uring), reads the page
cache cannot answer at once (preadv2 RWF_NOWAIT) go to four worker threads, so up to 32 of a batch wait on the disk together; used entries still go
out in ring order, so the hand-back point is always a ring position. A worker's
failed read hands the queue back at that request; the requests after it in the
batch were done but not answered, and the model does them again (a read or write
of the same bytes twice is what an in-flight request may see anyway).

Interrupts: with MSI-X on and the queue's vector unmasked, the thread writes the
vector's own eventfd (an irqfd under KVM: no Python on the way). Otherwise (INTx
with its ISR bit, a masked vector whose pending bit the capability keeps) it writes
a call eventfd that the transport turns into the interrupt on the event loop; the
transport restarts the thread when the guest changes which applies. Whether the
driver wants an interrupt at all (EVENT_IDX, NO_INTERRUPT) is decided in C.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from ...memory import GuestMemory
from . import plane_glue
from .queue import SplitQueue

log = logging.getLogger(__name__)

ffi, lib, _IMPORT_ERROR = plane_glue.load_cffi("_dataplane_cffi")

#: ``[[disk]] dataplane`` / ``--drive dataplane=`` values
DATAPLANE_MODES = ("native", "python")


def available() -> bool:
    """Whether the native module was built (``setup.py build_ext``, or a pip install)."""
    return lib is not None


def unavailable_reason() -> str:
    return _IMPORT_ERROR


#: ``KVMPY_BLK_AIO=threads`` keeps the data plane off io_uring (preadv workers), as
#: QEMU's aio=threads; anything else uses io_uring where the kernel lets us.
AIO_ENV = "KVMPY_BLK_AIO"


class Ring:
    """One queue thread's io_uring (struct dp_ring), made while the process may
    still call io_uring_setup (before the sandbox), restricted to reads, writes,
    fsync and fallocate. ``Ring.make()`` is None where the kernel refuses one
    (seccomp, io_uring_disabled, an old kernel) or the environment asks for the
    worker threads; the data plane then does without."""

    def __init__(self, handle) -> None:
        self.handle = handle

    @classmethod
    def make(cls) -> "Ring | None":
        if os.environ.get(AIO_ENV, "") == "threads":
            return None
        err = ffi.new("int *")
        handle = lib.dp_ring_new(err)
        if handle == ffi.NULL:
            log.info("io_uring unavailable (%s): the virtio-blk data plane uses worker threads",
                     os.strerror(err[0]))
            return None
        return cls(handle)

    def close(self) -> None:
        """After the thread using it stopped."""
        if self.handle is not None:
            lib.dp_ring_free(self.handle)
            self.handle = None

    # Owned by the disk, which outlives its queue threads (see ClusterMap).
    __del__ = close


class Iothread:
    """A C thread serving, in turn, the queues of every disk that names it (QEMU's
    ``-object iothread`` and ``iothread=`` on the device) instead of a thread per
    queue. Made on first use by name (``iothread(name)``) and kept for the
    process, as QEMU keeps its iothread objects."""

    def __init__(self, name: str) -> None:
        err = ffi.new("int *")
        handle = lib.dp_iothread_new(err)
        if handle == ffi.NULL:
            raise OSError(err[0], f"iothread {name}: {os.strerror(err[0])}")
        self.name = name
        self.handle = handle

    @property
    def thread_id(self) -> int:
        return lib.dp_iothread_tid(self.handle)


_IOTHREADS: dict[str, Iothread] = {}
_IOTHREADS_LOCK = threading.Lock()


def iothread(name: str) -> Iothread:
    """The iothread called ``name``, started on first use."""
    with _IOTHREADS_LOCK:
        found = _IOTHREADS.get(name)
        if found is None:
            found = _IOTHREADS[name] = Iothread(name)
        return found


def iothreads() -> list[dict]:
    """query-iothreads' entries for the iothreads made so far, by name. The
    thread waits in poll() without busy-polling first, so poll-max-ns is 0 (QEMU's
    meaning: polling off)."""
    with _IOTHREADS_LOCK:
        found = sorted(_IOTHREADS.values(), key=lambda t: t.name)
    return [{"id": t.name, "thread-id": t.thread_id, "poll-max-ns": 0, "poll-grow": 0, "poll-shrink": 0,
             "aio-max-batch": 0} for t in found]


class ClusterMap:
    """The C cluster map of one qcow2 disk (struct dp_map), shared by its queues'
    threads: guest cluster -> host offset for the data clusters the driver says a
    read or write may reach in place. A request touching any other cluster goes to
    the model. ``generation`` is the driver's mapping generation: entries computed
    at an older one than the last ``invalidate`` are dropped, so a fill racing with
    a change of mapping can never store a stale entry."""

    def __init__(self, cluster_bits: int) -> None:
        handle = lib.dp_map_new(cluster_bits)
        if handle == ffi.NULL:
            raise ValueError(f"cluster_bits {cluster_bits}: no cluster map")
        self.handle = handle
        self.cluster_bits = cluster_bits

    def set(self, generation: int, pairs: list[tuple[int, int]]) -> int:
        """Store (guest cluster, host offset) pairs; returns how many were stored."""
        if not pairs or self.handle is None:
            return 0
        clusters = ffi.new("uint64_t[]", [c for c, _ in pairs])
        hosts = ffi.new("uint64_t[]", [h for _, h in pairs])
        return lib.dp_map_set(self.handle, generation, clusters, hosts, len(pairs))

    def invalidate(self, generation: int) -> None:
        """Forget every entry; returns once no thread does I/O through an old one."""
        if self.handle is not None:
            lib.dp_map_invalidate(self.handle, generation)

    def get(self, cluster: int) -> int | None:
        """The host offset the threads would use for guest cluster ``cluster``."""
        host = ffi.new("uint64_t *")
        return host[0] if self.handle is not None and lib.dp_map_get(self.handle, cluster, host) else None

    def close(self) -> None:
        """After every thread using the map stopped."""
        if self.handle is not None:
            lib.dp_map_free(self.handle)
            self.handle = None

    # The disk that owns the map outlives its queue threads (the transport stops
    # them on reset and close), so the map goes with the disk.
    __del__ = close


class IntxPending:
    """A device's INTx line as its queue threads see it (``int *intx_pending`` of
    struct dp_config): a thread sets it when it writes its call eventfd, the
    transport clears it when the driver reads the ISR. While it is set, a thread
    writes no call eventfd: the raise on its way (or the level already up) makes
    the driver read the ISR and look at the used ring after every entry published
    so far, so another write would only wake the event loop to raise a raised
    line. Clearing it is always safe (at worst an interrupt more)."""

    def __init__(self) -> None:
        self._flag = ffi.new("int *")

    @property
    def pointer(self):
        return self._flag

    def clear(self) -> None:
        self._flag[0] = 0

    @property
    def pending(self) -> bool:
        return bool(self._flag[0])


@dataclass(frozen=True)
class BlkBackend:
    """What a virtio-blk model lets its data plane do on its own, as plain values."""

    fd: int
    capacity: int            # in 512-byte sectors
    read_only: bool
    write_through: bool      # FLUSH not negotiated: each write durable before its used entry
    guarded_bytes: int       # writes below this offset stay with the model
    serial: bytes            # GET_ID's answer, at most 20 bytes
    discard: bool = False    # DISCARD and WRITE_ZEROES offered
    cluster_map: ClusterMap | None = None   # qcow2: where the data clusters are (fd is the image file)
    rings: tuple[Ring | None, ...] = ()      # per queue; None or missing: worker threads
    iothread: Iothread | None = None         # serves the queues; None: a thread per queue
    flush_ignored: bool = False              # cache=unsafe
    direct_align: int = 0                    # fd is O_DIRECT: offsets and lengths in these units; 0: not
    direct_mem_align: int = 0                # and buffer addresses in these


@dataclass(frozen=True)
class StopInfo:
    """What a stopped blk thread did, and whether it handed a request back."""

    handed_back: bool        # the thread stopped at a request the model must answer
    completed: int           # requests the thread answered
    deferred: int            # reads of them its workers did (the page cache had not the data)
    ring_ops: int = 0        # reads and writes of them done through its io_uring
    ring_enters: int = 0     # its io_uring_enter calls
    interrupts: int = 0      # its call eventfd writes
    interrupts_coalesced: int = 0   # interrupts the driver wanted that an INTx level already up covered


class RegionPointers:
    """Guest RAM as (gpa, size, host pointer) for C, kept alive with the memory."""

    def __init__(self, memory: GuestMemory) -> None:
        if len(memory.regions) > lib.DP_MAX_REGIONS:
            raise ValueError(f"{len(memory.regions)} RAM regions > {lib.DP_MAX_REGIONS}")
        # The address only, no buffer export held: an exported memoryview in a garbage
        # cycle cannot be cleared (and GuestMemory.close could not unmap). The mmaps
        # are kept referenced; the transport stops its threads before the machine
        # closes the memory.
        self.regions = []
        for r in memory.regions:
            buf = ffi.from_buffer("uint8_t[]", r.view, require_writable=True)
            self.regions.append((r.gpa, r.size, int(ffi.cast("uintptr_t", buf))))
            ffi.release(buf)
        self._mappings = [r.mm for r in memory.regions]

    def fill(self, array) -> int:
        for i, (gpa, size, host) in enumerate(self.regions):
            array[i].gpa = gpa
            array[i].size = size
            array[i].host = ffi.cast("uint8_t *", host)
        return len(self.regions)


class NativeQueue:
    """One queue served by a C thread from ``start`` until ``stop``."""

    def __init__(self, regions: RegionPointers, queue: SplitQueue, backend: BlkBackend, kick_fd: int,
                 irq_fd: int | None = None, index: int = 0, intx_pending: IntxPending | None = None) -> None:
        self.queue = queue
        self.irq_fd = irq_fd
        # kept alive with the thread that writes it
        self.intx_pending = intx_pending if irq_fd is None else None
        self.call_fd = plane_glue.new_eventfd()
        self.handback_fd = plane_glue.new_eventfd()
        cfg = ffi.new("struct dp_config *")
        cfg.nregions = regions.fill(cfg.regions)
        plane_glue.ring_to_c(cfg, queue)
        cfg.event_idx, cfg.indirect = int(queue.event_idx), int(queue.indirect)
        cfg.fd = backend.fd
        cfg.capacity = backend.capacity
        cfg.read_only = int(backend.read_only)
        cfg.write_through = int(backend.write_through)
        cfg.guarded_bytes = backend.guarded_bytes
        cfg.discard = int(backend.discard)
        cfg.flush_ignored = int(backend.flush_ignored)
        cfg.direct_align = backend.direct_align
        cfg.direct_mem_align = backend.direct_mem_align or backend.direct_align
        cfg.map = backend.cluster_map.handle if backend.cluster_map is not None else ffi.NULL
        ring = backend.rings[index] if index < len(backend.rings) else None
        cfg.ring = ring.handle if ring is not None and ring.handle is not None else ffi.NULL
        self._ring = ring
        cfg.iothread = backend.iothread.handle if backend.iothread is not None else ffi.NULL
        ffi.memmove(cfg.serial, backend.serial.ljust(lib.DP_SERIAL_BYTES, b"\0"), lib.DP_SERIAL_BYTES)
        cfg.kick_fd, cfg.handback_fd = kick_fd, self.handback_fd
        cfg.call_fd = self.call_fd if irq_fd is None else irq_fd
        cfg.intx_pending = self.intx_pending.pointer if self.intx_pending is not None else ffi.NULL
        self._regions = regions
        err = ffi.new("int *")
        self._handle = lib.dp_start(cfg, err)
        if self._handle == ffi.NULL:
            self._close_fds()
            raise OSError(err[0], f"data plane did not start: {os.strerror(err[0])}")

    def stop(self) -> StopInfo:
        """Join the thread (it finishes the request in hand) and put the ring
        indices back into the SplitQueue, which carries on from there."""
        out = ffi.new("struct dp_indices *")
        lib.dp_stop(self._handle, out)
        self._handle = None
        plane_glue.ring_from_c(self.queue, out)
        return StopInfo(handed_back=out.exit_reason == lib.DP_EXIT_HANDBACK, completed=out.completed,
                        deferred=out.deferred, ring_ops=out.ring_ops, ring_enters=out.ring_enters,
                        interrupts=out.interrupts, interrupts_coalesced=out.interrupts_coalesced)

    def take_interrupt(self) -> bool:
        """Whether the thread asked for an interrupt through the call eventfd since
        the last call (never when it raises the MSI-X vector itself)."""
        return plane_glue.take_event(self.call_fd)

    def close(self) -> None:
        """After ``stop``: release the eventfds."""
        self._close_fds()

    def _close_fds(self) -> None:
        plane_glue.close_fds((self.call_fd, self.handback_fd))
        self.call_fd = self.handback_fd = -1


def walk_chain(memory: GuestMemory, desc_addr: int, size: int, indirect: bool, head: int,
               regions: RegionPointers | None = None) -> list[tuple[int, int, bool]] | None:
    """The C walker's view of one chain: its buffers as (gpa, len, writable), or
    None where it refuses the chain. The entry point the tests hold against
    SplitQueue; the data plane's threads call the same C function."""
    return plane_glue.walk_chain(ffi, lib, regions or RegionPointers(memory), lib.DP_MAX_SEGS, desc_addr, size,
                                 indirect, head)
