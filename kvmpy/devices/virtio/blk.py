"""virtio-blk (virtio 1.x, section 5.2): a VirtioDevice on a kvmpy.block driver.

Requests are {u32 type, u32 reserved, u64 sector} + data + u8 status, laid out
in any split of buffers the driver likes. Data moves with the block driver's
preadv/pwritev straight between the image and guest RAM slices. Every sector
range is checked against the capacity before the driver is called; a malformed
request gets IOERR/UNSUPP in its status byte, never a device reset (only a
malformed ring does that).

A host I/O error (EIO, ENOSPC, a corrupt qcow2 refusing the write) follows the
disk's policy, QEMU's werror=/rerror=: "report" fails the request with IOERR,
"ignore" completes it as if it had worked, "stop" keeps it and has the machine
pause the VM (run state io-error) until `cont` retries it; "enospc" (werror's
default) stops on ENOSPC and reports the rest. Reads follow rerror, everything
that changes the disk (write, flush, discard, write-zeroes) werror, as in QEMU.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from ...block import direct
from ...block.qcow2 import Qcow2Driver
from ...block.raw import RAW_GUARDED_BYTES, RawDriver
from ...errors import ImageError
from ...memory import GuestMemory
from .dataplane import DATAPLANE_MODES, BlkBackend, ClusterMap, Iothread, Ring
from .dataplane import iothread as named_iothread
from .dataplane import available as dataplane_available
from .device import FdWatch, VirtioDevice, VirtioTransport
from .queue import DescriptorChain, SplitQueue, gather, split_tail, truncate_views, write_views

if TYPE_CHECKING:  # pragma: no cover - the protocol only; context.py imports far more
    from ..context import BlockErrors

log = logging.getLogger(__name__)

SECTOR = 512

# feature bits
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# request types
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20
# virtio_blk_config.writeback: the write cache the driver sees, and may switch with CONFIG_WCE
CONFIG_WRITEBACK_OFFSET = 32
WRITE_ZEROES_FLAG_UNMAP = 1

ERROR_POLICIES = ("enospc", "stop", "report", "ignore")

# preadv/pwritev take at most IOV_MAX buffers; a longer (indirect) chain is refused.
IOV_MAX = 1024

# Guest cluster ranges the model served, kept for the next cluster-map fill; more
# than this between two fills and the rest simply miss again.
CLUSTER_FILL_RANGES = 64

_REQ_HDR = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")


class _Kept(Exception):
    """The request failed with the "stop" action: it stays with the device until retried."""


class _RequestError(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass(frozen=True)
class VirtioBlkState:
    """virtio-blk's own state: what it offers the driver (requests carry no state
    between notifications)."""

    capacity: int          # in 512-byte sectors; a restore needs an image of this size
    serial: bytes
    read_only: bool
    num_queues: int
    queue_size: int
    seg_max: int
    discard: bool
    write_cache: bool = True   # the guest's write cache is on (config writeback)


class VirtioBlk(VirtioDevice):
    """virtio-blk, a VirtioDevice backed by a kvmpy.block BlockDriver.

    Arguments:
      driver: an open BlockDriver (``kvmpy.block.open_image(...)``); the device
        does not close it (the machine does, after the transport's ``close()``).
      serial: GET_ID string, at most 20 bytes.
      read_only: force VIRTIO_BLK_F_RO (also set when ``driver.read_only``).
      num_queues: request queues (VIRTIO_BLK_F_MQ when > 1).
      queue_size: maximum ring size offered to the driver.
      seg_max: data segments per request the driver may use.
      discard: offer DISCARD and WRITE_ZEROES (only on writable disks).
      name: for log messages.
      werror, rerror: QEMU's error policies for requests that change the disk and
        for reads: "enospc" (werror only), "stop", "report", "ignore".
      errors: where I/O errors go (BLOCK_IO_ERROR, the stop); without one, "stop"
        acts as "report" (nothing could pause the VM or retry).
      device, node_name: how BLOCK_IO_ERROR names this disk.
      dataplane: "native" lets the transport serve a raw or qcow2 image's queues
        from C threads (dataplane.py) while every request is one the model would
        answer the same way; "python" keeps every request here.
      iothread: with the native data plane, the name of the iothread that serves
        all the queues of every disk naming it (QEMU's iothread=); "" for a
        thread per queue.
      write_cache: whether the guest is told of a volatile write cache (QEMU's
        cache=writeback, none, unsafe) or that each write is durable when it
        completes (writethrough, directsync); with VIRTIO_BLK_F_CONFIG_WCE the
        driver may switch it, as on QEMU.
    Put it on PCI with ``pci_bus.add(VirtioPciTransport(platform, events, VirtioBlk(...)))``.
    """

    device_type = 2

    def __init__(self, driver, serial: str | bytes = "", read_only: bool = False, num_queues: int = 1,
                 queue_size: int = 256, seg_max: int = 126, discard: bool = True, name: str = "virtio-blk",
                 werror: str = "enospc", rerror: str = "report", errors: BlockErrors | None = None,
                 device: str = "", node_name: str = "", dataplane: str = "native", iothread: str = "",
                 write_cache: bool = True) -> None:
        self.name = name
        self.configured_write_cache = write_cache
        self.write_cache = write_cache
        # An image opened O_DSYNC (cache=writethrough, directsync) makes each data
        # write durable by itself; only qcow2's tables then need a flush.
        mode = driver.cache
        self._data_writes_durable = bool(mode is not None and mode.dsync)
        if dataplane not in DATAPLANE_MODES:
            raise ValueError(f"{name}: dataplane={dataplane!r}")
        self.dataplane = dataplane
        if werror not in ERROR_POLICIES or rerror not in ERROR_POLICIES[1:]:
            raise ValueError(f"{name}: werror={werror!r} rerror={rerror!r}")
        self.werror = werror
        self.rerror = rerror
        self.errors = errors
        self.device_name = device or name
        self.node_name = node_name
        # The request that failed with "stop", as (queue index, chain): the queues wait
        # behind it until `cont` retries it, so the guest's requests complete in order.
        self._kept: tuple[int, DescriptorChain] | None = None
        # query-block's io-status: the first error that stopped the VM, until `cont`.
        self.io_status = "ok"
        self.driver = driver
        self.read_only = bool(read_only or driver.read_only)
        serial_bytes = serial if isinstance(serial, bytes) else serial.encode()
        if len(serial_bytes) > VIRTIO_BLK_ID_BYTES:
            raise ValueError(f"{name}: serial {serial!r} is longer than 20 bytes")
        if num_queues < 1:
            raise ValueError(f"{name}: {num_queues} queues")
        self.serial = serial_bytes
        self.capacity = driver.size // SECTOR
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.queue_max_sizes = (queue_size,) * num_queues
        self.seg_max = seg_max
        self.discard_enabled = discard and not self.read_only
        self.max_discard_sectors = 0x3FFFFF
        self.max_discard_seg = 32
        self.max_write_zeroes_sectors = 0x3FFFFF
        self.max_write_zeroes_seg = 32
        self.blk_size = SECTOR
        if driver.size % SECTOR:
            log.warning("%s: image size %d is not a multiple of 512; the tail is not visible",
                        name, driver.size)
        self.acked_features = 0
        self._queues: Sequence[SplitQueue] = ()
        self._transport: VirtioTransport | None = None
        # qcow2 under the native data plane: where its threads may read and write in
        # place. Whole L2 tables are filled the first time the model serves a
        # request in them (since the last change of mapping), then the clusters of
        # each request the model served, so an allocating write is in the map for
        # the next overwrite.
        self.cluster_map: ClusterMap | None = None
        self._map_tables_filled: set[int] = set()
        self._map_wanted: list[tuple[int, int]] = []
        if dataplane == "native" and isinstance(driver, Qcow2Driver) and dataplane_available():
            self.cluster_map = ClusterMap(driver.cluster_bits)
            driver.mapping_listeners.append(self._mapping_changed)
        self.iothread: Iothread | None = None
        if iothread and dataplane == "native" and dataplane_available():
            self.iothread = named_iothread(iothread)
        # One io_uring per queue for the threads, made now: a device is built
        # before the sandbox, which refuses io_uring_setup afterwards.
        self._rings: tuple[Ring | None, ...] = ()
        if (dataplane == "native" and (isinstance(driver, RawDriver) or self.cluster_map is not None)
                and dataplane_available()):
            self._rings = tuple(Ring.make() for _ in range(num_queues))

    # state -------------------------------------------------------------------------

    def state(self) -> VirtioBlkState:
        return VirtioBlkState(capacity=self.capacity, serial=self.serial, read_only=self.read_only,
                              num_queues=self.num_queues, queue_size=self.queue_size, seg_max=self.seg_max,
                              discard=self.discard_enabled, write_cache=self.write_cache)

    @classmethod
    def from_state(cls, state: VirtioBlkState, driver, name: str = "virtio-blk") -> "VirtioBlk":
        """The device ``state`` describes, on ``driver`` (the same image, or a copy)."""
        if driver.size // SECTOR != state.capacity:
            raise ValueError(f"{name}: the image has {driver.size // SECTOR} sectors, the saved device "
                             f"{state.capacity}")
        if driver.read_only and not state.read_only:
            raise ValueError(f"{name}: the saved device is writable, the image is read-only")
        return cls(driver, serial=state.serial, read_only=state.read_only, num_queues=state.num_queues,
                   queue_size=state.queue_size, seg_max=state.seg_max, discard=state.discard, name=name,
                   write_cache=state.write_cache)

    # what the driver sees ----------------------------------------------------------

    def device_features(self) -> int:
        f = (1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH
             | 1 << VIRTIO_BLK_F_SIZE_MAX | 1 << VIRTIO_BLK_F_CONFIG_WCE)
        if self.read_only:
            f |= 1 << VIRTIO_BLK_F_RO
        if self.num_queues > 1:
            f |= 1 << VIRTIO_BLK_F_MQ
        if self.discard_enabled:
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES
        return f

    def ack_features(self, features: int) -> None:
        self.acked_features = features

    def config_bytes(self) -> bytes:
        return struct.pack(
            "<QII HBB I BBHI BB H III II B3x",
            self.capacity, 1 << 20, self.seg_max,
            0, 0, 0,                      # geometry (not offered)
            self.blk_size,
            0, 0, 0, 0,                   # topology (not offered)
            int(self.write_cache), 0,     # writeback, unused
            self.num_queues,
            self.max_discard_sectors, self.max_discard_seg, 1,
            self.max_write_zeroes_sectors, self.max_write_zeroes_seg,
            1,                            # write_zeroes_may_unmap
        )

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Only ``writeback``, and only with CONFIG_WCE negotiated (virtio 1.1, 5.2.6.1):
        the driver switches the write cache (Linux: /sys/block/vdX/queue/write_cache)."""
        if offset != CONFIG_WRITEBACK_OFFSET or size != 1:
            return
        if not self.acked_features >> VIRTIO_BLK_F_CONFIG_WCE & 1:
            log.debug("%s: writeback written without CONFIG_WCE", self.name)
            return
        wanted = bool(value & 1)
        if wanted == self.write_cache:
            return
        self.write_cache = wanted
        log.info("%s: the guest turned the write cache %s", self.name, "on" if wanted else "off")
        # Native threads carry the old mode in their configuration: stopped here (the
        # transport's lock is held), they start again with native_backend's new one.
        if self._transport is not None:
            self._transport.hold_native(True)
            self._transport.hold_native(False)

    # life cycle --------------------------------------------------------------------

    def activate(self, queues: Sequence[SplitQueue], memory: GuestMemory, transport: VirtioTransport) -> None:
        self._queues = queues
        self._transport = transport

    def fd_watches(self) -> Sequence[FdWatch]:
        return ()

    def reset(self) -> None:
        self._queues = ()
        self._transport = None
        self.acked_features = 0
        self._kept = None
        self.io_status = "ok"
        self.write_cache = self.configured_write_cache

    def native_backend(self) -> BlkBackend | None:
        """What a native data plane may serve on its own now, or None while every
        request must come here: another image format, the Python data plane chosen,
        the native module missing, or a request kept by a "stop" waiting for `cont`.
        A qcow2 disk is served while the driver can flush (a write-through disk
        flushes the driver's tables after every write, which is the model's)."""
        if self.dataplane != "native" or self._kept is not None or self.driver.fd < 0 or not dataplane_available():
            return None
        if self.cluster_map is not None:
            if self._each_write_flushed() and not self._data_writes_durable:
                return None
            self._fill_cluster_map()
            return BlkBackend(fd=self.driver.fd, capacity=self.capacity, read_only=self.read_only,
                              write_through=False, guarded_bytes=0, serial=self.serial,
                              discard=self.discard_enabled, cluster_map=self.cluster_map, rings=self._rings,
                              iothread=self.iothread, **self._cache_backend())
        if not isinstance(self.driver, RawDriver):
            return None
        return BlkBackend(fd=self.driver.fd, capacity=self.capacity, read_only=self.read_only,
                          write_through=self._each_write_flushed() and not self._data_writes_durable,
                          guarded_bytes=RAW_GUARDED_BYTES if self.driver.restrict_block0 else 0,
                          serial=self.serial, discard=self.discard_enabled, rings=self._rings,
                          iothread=self.iothread, **self._cache_backend())

    def _cache_backend(self) -> dict:
        """What the image's cache mode asks of a native thread (BlkBackend's fields)."""
        mode = self.driver.cache
        alignment = direct.alignment_of(self.driver.fd)
        return {"flush_ignored": bool(mode is not None and mode.flush_ignored),
                "direct_align": alignment.offset if alignment is not None else 0,
                "direct_mem_align": alignment.memory if alignment is not None else 0}

    def _mapping_changed(self, generation: int) -> None:
        """The qcow2 driver changed a mapping (under its lock): forget the map."""
        self._map_tables_filled.clear()
        self.cluster_map.invalidate(generation)

    def _want_clusters(self, offset: int, nbytes: int) -> None:
        if self.cluster_map is not None and nbytes and len(self._map_wanted) < CLUSTER_FILL_RANGES:
            bits = self.cluster_map.cluster_bits
            self._map_wanted.append((offset >> bits, ((offset + nbytes - 1) >> bits) - (offset >> bits) + 1))

    def _fill_cluster_map(self) -> None:
        wanted, self._map_wanted = self._map_wanted, []
        l2_entries = self.driver.l2_entries
        for first, count in wanted:
            table = first // l2_entries
            if table not in self._map_tables_filled and (first + count - 1) // l2_entries == table:
                self._map_tables_filled.add(table)
                first, count = table * l2_entries, l2_entries
            try:
                generation, pairs = self.driver.in_place_clusters(first, count)
            except (OSError, ImageError) as e:
                log.debug("%s: clusters %d+%d stay with the model: %s", self.name, first, count, e)
                continue
            self.cluster_map.set(generation, pairs)

    @property
    def stopped_request(self) -> bool:
        """Whether a request that failed with "stop" waits for a retry."""
        return self._kept is not None

    # request processing (event loop thread) ------------------------------------------

    def process_queue(self, index: int) -> None:
        if self._kept is not None:
            return          # stopped on an error: everything waits for the retry
        q = self._queues[index]
        while True:
            did = False
            # No doorbell for what the driver adds while this batch runs: the
            # set_notification(True) below looks again before the loop sleeps.
            q.set_notification(False)
            for chain in q.iter_chains():
                try:
                    written = self._handle(chain)
                except _Kept:
                    self._kept = (index, chain)
                    break
                q.add_used(chain.head, written)
                did = True
            if did:
                self._transport.signal_used(index)
            if self._kept is not None or not q.set_notification(True):
                return

    def retry(self) -> None:
        """Run the request kept by a "stop" again, then what queued up behind it
        (event loop thread; the machine calls it on `cont`)."""
        if self._kept is None or not self._queues:
            return
        index, chain = self._kept
        self._kept = None
        self.io_status = "ok"
        try:
            written = self._handle(chain)
        except _Kept:
            self._kept = (index, chain)
            return
        self._queues[index].add_used(chain.head, written)
        self._transport.signal_used(index)
        for i in range(len(self._queues)):
            if self._queues[i].active:
                self.process_queue(i)

    def _handle(self, chain: DescriptorChain) -> int:
        """Execute one request; returns the bytes written into the writable part."""
        header, data_out = gather(chain.readable, _REQ_HDR.size)
        data_in, status = split_tail(chain.writable, 1)
        if not status:
            # Nowhere to put a status: a driver bug, but not a ring corruption. Skip it.
            log.warning("%s: request without a status byte", self.name)
            return 0
        if len(header) < _REQ_HDR.size:
            status[0][0] = VIRTIO_BLK_S_IOERR
            log.warning("%s: request header is %d bytes", self.name, len(header))
            return 1
        rtype, _, sector = _REQ_HDR.unpack(header)
        try:
            written = self._execute(rtype, sector, data_out, data_in)
            status[0][0] = VIRTIO_BLK_S_OK
        except _RequestError as e:
            log.debug("%s: request type %d sector %d: %s", self.name, rtype, sector, e)
            status[0][0] = e.status
            written = 0
        except OSError as e:
            log.error("%s: I/O error on request type %d sector %d: %s", self.name, rtype, sector, e)
            written = self._io_failed(rtype, e.errno or errno.EIO, status, data_in)
        except ImageError as e:
            # A corrupt qcow2 table met on this request, or a write refused because it
            # would land on metadata: the guest sees EIO, never a silently lost write.
            log.error("%s: request type %d sector %d failed: %s", self.name, rtype, sector, e)
            written = self._io_failed(rtype, errno.EIO, status, data_in)
        return written + 1

    def _io_failed(self, rtype: int, err: int, status: list, data_in: list) -> int:
        """Apply the disk's error policy to a request the host failed; returns the
        bytes to report written (besides the status) or raises _Kept."""
        is_read = rtype == VIRTIO_BLK_T_IN
        policy = self.rerror if is_read else self.werror
        if policy == "enospc":
            action = "stop" if err == errno.ENOSPC else "report"
        else:
            action = policy
        if action == "stop" and self.errors is None:
            action = "report"
        if action == "stop" and self.io_status == "ok":
            # Before the event, as QEMU does: query-block never lags a BLOCK_IO_ERROR.
            self.io_status = "nospace" if err == errno.ENOSPC else "failed"
        if self.errors is not None:
            self.errors.io_error(self.device_name, self.node_name, "read" if is_read else "write",
                                 action, err == errno.ENOSPC, os.strerror(err),
                                 retry=self.retry if action == "stop" else None)
        if action == "stop":
            raise _Kept()
        if action == "ignore":
            status[0][0] = VIRTIO_BLK_S_OK
            return sum(len(v) for v in data_in) if is_read else 0
        status[0][0] = VIRTIO_BLK_S_IOERR
        return 0

    def _check_range(self, sector: int, nbytes: int) -> None:
        if nbytes % SECTOR:
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"length {nbytes} is not a multiple of 512")
        if sector > self.capacity or nbytes // SECTOR > self.capacity - sector:
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"sectors {sector}+{nbytes // SECTOR} beyond {self.capacity}")

    def _check_segments(self, views: list) -> None:
        if len(views) > IOV_MAX:
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"{len(views)} data segments > {IOV_MAX}")

    def _execute(self, rtype: int, sector: int, data_out: list, data_in: list) -> int:
        if rtype == VIRTIO_BLK_T_IN:
            n = sum(len(v) for v in data_in)
            self._check_range(sector, n)
            self._check_segments(data_in)
            if n:
                self.driver.preadv(data_in, sector * SECTOR)
                self._want_clusters(sector * SECTOR, n)
            return n
        if rtype == VIRTIO_BLK_T_OUT:
            if self.read_only:
                raise _RequestError(VIRTIO_BLK_S_IOERR, "write to a read-only disk")
            n = sum(len(v) for v in data_out)
            self._check_range(sector, n)
            self._check_segments(data_out)
            if n:
                self.driver.pwritev(data_out, sector * SECTOR)
                self._write_through()
                self._want_clusters(sector * SECTOR, n)
            return 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            self.driver.flush()
            return 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
            return write_views(truncate_views(data_in, VIRTIO_BLK_ID_BYTES), ident)
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            if not self.discard_enabled:
                raise _RequestError(VIRTIO_BLK_S_UNSUPP, "discard/write-zeroes not offered")
            self._segments(rtype, data_out)
            self._write_through()
            return 0
        raise _RequestError(VIRTIO_BLK_S_UNSUPP, f"request type {rtype}")

    def _write_through(self) -> None:
        """Makes a completed write stable when the driver has no way to ask for it.

        Without VIRTIO_BLK_F_FLUSH negotiated (and CONFIG_WCE, which is not offered)
        the disk is write-through: a write is stable once it completes (virtio 1.1,
        5.2.6.2), and a driver that cannot flush relies on that. So the write, and
        the image metadata that makes it reachable, must be durable before its used
        entry: qcow2 otherwise keeps new L2 entries cached until a flush that never
        comes. QEMU does the same (write cache off, each write flushed).

        The same when the write cache is off (cache=writethrough or directsync, or
        the driver switched it off): a raw image opened O_DSYNC needs nothing more."""
        if self._each_write_flushed() and not (self._data_writes_durable and isinstance(self.driver, RawDriver)):
            self.driver.flush()

    def _each_write_flushed(self) -> bool:
        """Whether a completed write must be durable before its used entry."""
        return not self.acked_features >> VIRTIO_BLK_F_FLUSH & 1 or not self.write_cache

    def _segments(self, rtype: int, data_out: list) -> None:
        payload = b"".join(bytes(v) for v in data_out[:self.max_discard_seg + 1])
        if len(payload) % _SEGMENT.size or not payload:
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"segment payload of {len(payload)} bytes")
        discard = rtype == VIRTIO_BLK_T_DISCARD
        limit_seg = self.max_discard_seg if discard else self.max_write_zeroes_seg
        limit_sectors = self.max_discard_sectors if discard else self.max_write_zeroes_sectors
        segs = [_SEGMENT.unpack_from(payload, o) for o in range(0, len(payload), _SEGMENT.size)]
        if len(segs) > limit_seg:
            raise _RequestError(VIRTIO_BLK_S_UNSUPP, f"{len(segs)} segments > {limit_seg}")
        for sector, num, flags in segs:
            if flags & ~WRITE_ZEROES_FLAG_UNMAP:
                raise _RequestError(VIRTIO_BLK_S_UNSUPP, f"segment flags {flags:#x}")
            if discard and flags:
                raise _RequestError(VIRTIO_BLK_S_UNSUPP, "discard with the unmap flag")
            if num > limit_sectors:
                raise _RequestError(VIRTIO_BLK_S_IOERR, f"{num} sectors > {limit_sectors}")
            self._check_range(sector, num * SECTOR)
        for sector, num, flags in segs:
            if discard:
                self.driver.discard(sector * SECTOR, num * SECTOR)
            else:
                self.driver.write_zeroes(sector * SECTOR, num * SECTOR, may_unmap=bool(flags))
