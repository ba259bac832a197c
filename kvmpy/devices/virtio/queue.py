"""The split virtqueue (virtio 1.x, section 2.7), device side, on its own.

Everything here reads guest-written memory, so every value is treated as hostile:
a bad descriptor table, ring index or buffer address raises QueueError, which the
transport turns into DEVICE_NEEDS_RESET. Buffers come back as memoryview slices of
guest RAM so device models can hand them to preadv/pwritev/readv/writev directly.

Layout (all little endian):
  descriptor table: size x {u64 addr, u32 len, u16 flags, u16 next}
  avail ring:       u16 flags, u16 idx, u16 ring[size], u16 used_event
  used ring:        u16 flags, u16 idx, {u32 id, u32 len}[size], u16 avail_event

The driver reads and writes the rings while the device does (a vCPU thread, the
translator's, the kernel's): every index, flag and event field is read and written
here as one aligned 16-bit access, through memoryviews cast to native u16/u32 (the
host is x86-64: native is little endian). struct's pack_into would not do: it
zeroes its target before it stores the value, so a driver polling the used idx
could see it at 0 for a moment and take requests for completed that were not.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field

from ...errors import GuestMemoryError
from ...memory import GuestMemory

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
DESC_SIZE = 16

# A chain's total length is bounded so a guest cannot make the device walk (or
# hand to a syscall) more than this; matches the largest length a used element
# can report.
MAX_CHAIN_BYTES = 0xFFFFFFFF

_DESC = struct.Struct("<QIHH")

# A full memory barrier for Python code: the uncontended acquire and release of a
# lock are locked read-modify-writes on x86 (glibc's sem_trywait / sem_post), which
# order every earlier store before every later load. See _store_load_fence.
_FENCE = threading.Lock()


def _store_load_fence() -> None:
    """Between our store of an event field (or the used idx) and our load of the
    driver's index (or its event field): the driver does the mirror image (store,
    mb, load), and without a barrier on both sides each may read the other's old
    value, so the driver skips the kick the device waits for (or the device the
    interrupt), as the virtio spec's notes on suppression warn (2.7.10, 2.7.14).
    The C planes use __atomic_thread_fence for the same."""
    _FENCE.acquire()
    _FENCE.release()


class QueueError(Exception):
    """The guest put something invalid in a virtqueue; the device must be reset."""


class AvailJumpError(QueueError):
    """The avail idx ran more than a queue's size ahead of ``queue``'s next_avail:
    the transport adds who serves that queue object (if it is still one of its own)."""

    def __init__(self, message: str, queue: "SplitQueue") -> None:
        super().__init__(message)
        self.queue = queue


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True if ``event_idx`` lies in the window (old_idx, new_idx] (mod 2**16).

    This is the notification-suppression test of VIRTIO_F_EVENT_IDX: the other
    side asked to be told once the index moves past ``event_idx``.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


@dataclass
class DescriptorChain:
    """One request: device-readable buffers followed by device-writable buffers."""

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)


@dataclass(frozen=True)
class QueueState:
    """One split virtqueue as a value: what the driver configured and how far both
    sides got. Taken between requests, so no chain is popped and not yet used."""

    max_size: int
    size: int
    ready: bool
    desc_addr: int
    avail_addr: int
    used_addr: int
    event_idx: bool
    indirect: bool
    next_avail: int
    next_used: int
    # The used idx at the last interrupt decision (None: nothing signalled yet).
    signalled_used: int | None


class SplitQueue:
    """Device view of one split virtqueue.

    The transport fills in ``size``, the three ring addresses and ``ready``;
    ``activate`` validates them once, after which ``pop``/``add_used`` serve the
    device. Not thread safe: the transport runs one device callback at a time.
    """

    def __init__(self, memory: GuestMemory, max_size: int = 256) -> None:
        if max_size <= 0 or max_size > MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue max size {max_size} must be a power of two <= {MAX_QUEUE_SIZE}")
        self.memory = memory
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.event_idx = False
        self.indirect = False
        self.next_avail = 0
        self.next_used = 0
        # The used idx value at the last interrupt decision (EVENT_IDX "old").
        self.signalled_used: int | None = None
        self._clear_views()
        self._dma_ranges: dict[int, list[tuple[int, int]]] = {}   # head -> writable (gpa, len), translator only

    # setup -----------------------------------------------------------------

    def activate(self, event_idx: bool = False, indirect: bool = False) -> None:
        """Validate the guest's ring configuration and map the rings.

        Raises QueueError for a size that is not a power of two within max_size,
        misaligned rings or rings outside RAM.
        """
        size = self.size
        if size <= 0 or size > self.max_size or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of two <= {self.max_size}")
        if self.desc_addr % 16 or self.avail_addr % 2 or self.used_addr % 4:
            raise QueueError(f"misaligned rings desc={self.desc_addr:#x} "
                             f"avail={self.avail_addr:#x} used={self.used_addr:#x}")
        self.event_idx = event_idx
        self.indirect = indirect
        self._map_rings()
        self.next_avail = 0
        self.next_used = 0
        self.signalled_used = None
        self.ready = True

    def _map_rings(self) -> None:
        size = self.size
        try:
            self._desc = self.memory.view(self.desc_addr, DESC_SIZE * size)
            avail = self.memory.view(self.avail_addr, 4 + 2 * size + 2)
            used = self.memory.view(self.used_addr, 4 + 8 * size + 2)
        except GuestMemoryError as e:
            self._clear_views()
            raise QueueError(f"ring outside guest RAM: {e}") from None
        # u16 slots: avail [0] flags, [1] idx, [2 + i] ring, [2 + size] used_event;
        # used [0] flags, [1] idx, [2 + 4 * size] avail_event. u32 slots of the used
        # ring: element i's id at [1 + 2 * i], its len at [2 + 2 * i].
        self._avail = avail.cast("H")
        self._used = used.cast("H")
        self._used_elems = used[:4 + 8 * size].cast("I")

    def _clear_views(self) -> None:
        self._desc = self._avail = self._used = self._used_elems = None

    # state as a value --------------------------------------------------------

    def state(self) -> QueueState:
        return QueueState(max_size=self.max_size, size=self.size, ready=self.ready, desc_addr=self.desc_addr,
                          avail_addr=self.avail_addr, used_addr=self.used_addr, event_idx=self.event_idx,
                          indirect=self.indirect, next_avail=self.next_avail, next_used=self.next_used,
                          signalled_used=self.signalled_used)

    @classmethod
    def from_state(cls, memory: GuestMemory, state: QueueState) -> "SplitQueue":
        """The queue ``state`` describes, on ``memory`` (which holds the rings' contents).

        A ready queue maps its rings again, with the same checks as ``activate``:
        QueueError if the state does not fit this memory.
        """
        q = cls(memory, state.max_size)
        q.size = state.size
        q.desc_addr, q.avail_addr, q.used_addr = state.desc_addr, state.avail_addr, state.used_addr
        q.event_idx, q.indirect = state.event_idx, state.indirect
        if state.ready:
            q.activate(event_idx=state.event_idx, indirect=state.indirect)
        q.next_avail = state.next_avail & 0xFFFF
        q.next_used = state.next_used & 0xFFFF
        q.signalled_used = None if state.signalled_used is None else state.signalled_used & 0xFFFF
        return q

    @property
    def active(self) -> bool:
        return self._desc is not None

    # driver -> device ------------------------------------------------------

    def avail_idx(self) -> int:
        return self._avail[1]

    def used_event(self) -> int:
        return self._avail[2 + self.size]

    def pending(self) -> int:
        """How many chains the driver has made available that we have not popped.

        Raises QueueError when the driver moved avail idx by more than the queue
        size, which no valid driver can do.
        """
        avail = self.avail_idx()
        n = (avail - self.next_avail) & 0xFFFF
        if n > self.size:
            raise AvailJumpError(self._jump_report(avail, n), self)
        return n

    def _jump_report(self, avail: int, n: int) -> str:
        """The error of an avail idx ``n`` ahead, with what tells whose cursor went
        wrong: a driver is bounded by the used idx it reads, so with this queue the
        only writer of the used idx (it equals next_used) the driver ran ahead of
        what it was given back; otherwise another writer (a second queue object, a
        plane, the kernel) moved the ring behind this one. Error path only."""
        used_in_ram = self._used[1]
        if used_in_ram != self.next_used:
            verdict = ("the used idx in RAM is not this queue's next_used: something else wrote it "
                       "(another queue object or plane on this ring, or the driver)")
        elif (self.next_avail - self.next_used) & 0xFFFF > self.size:
            verdict = "this queue popped more chains than it returned"
        else:
            verdict = ("the driver made more available than it got back "
                       "(a driver bug, or guest RAM the driver and the VMM no longer see alike)")
        return (f"avail idx jumped by {n} entries in a queue of {self.size} (ring at {self.avail_addr:#x}: "
                f"avail idx {avail}, next_avail {self.next_avail}, next_used {self.next_used}, "
                f"used idx in RAM {used_in_ram}; queue {id(self):#x} on thread "
                f"{threading.current_thread().name}): {verdict}")

    def pop(self) -> DescriptorChain | None:
        """The next available descriptor chain, or None if the ring is empty."""
        if not self.active:
            raise QueueError("queue used before activation")
        if not self.pending():
            return None
        slot = self.next_avail % self.size
        head = self._avail[2 + slot]
        # Advance first: a bad chain is still consumed, and the device is reset anyway.
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return self._read_chain(head)

    def _read_chain(self, head: int) -> DescriptorChain:
        size = self.size
        if head >= size:
            raise QueueError(f"chain head {head} outside a queue of {size}")
        chain = DescriptorChain(head)
        dma: list | None = [] if self.memory.dma_listeners else None
        table, table_len, index = self._desc, size, head
        in_indirect = False
        # Each descriptor of a valid chain is visited once, so more steps than
        # entries in the current table means a loop.
        steps = 0
        total = 0
        # Any device-writable descriptor, an empty one too, ends the readable part
        # (the spec's order rule; an empty one carries no view to remember it by).
        seen_writable = False
        while True:
            steps += 1
            if steps > table_len:
                raise QueueError(f"chain from head {head} longer than its table ({table_len}): loop?")
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise QueueError(f"nested indirect descriptor in chain {head}")
                if not self.indirect:
                    raise QueueError(f"indirect descriptor in chain {head} without VIRTIO_F_INDIRECT_DESC")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise QueueError(f"indirect descriptor with NEXT in chain {head}")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_QUEUE_SIZE:
                    raise QueueError(f"indirect table length {length} in chain {head}")
                try:
                    table = self.memory.view(addr, length)
                except GuestMemoryError as e:
                    raise QueueError(f"indirect table of chain {head}: {e}") from None
                table_len = length // DESC_SIZE
                index = 0
                steps = 0
                in_indirect = True
                continue
            if flags & VIRTQ_DESC_F_WRITE:
                seen_writable = True
            elif seen_writable:
                raise QueueError(f"chain {head}: device-readable buffer after a writable one")
            if length:
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise QueueError(f"chain {head} is longer than {MAX_CHAIN_BYTES} bytes")
                try:
                    view = self.memory.view(addr, length)
                except GuestMemoryError as e:
                    raise QueueError(f"buffer of chain {head}: {e}") from None
                if flags & VIRTQ_DESC_F_WRITE:
                    chain.writable.append(view)
                    if dma is not None:
                        dma.append((addr, length))
                else:
                    chain.readable.append(view)
            if not flags & VIRTQ_DESC_F_NEXT:
                if dma:
                    self._dma_ranges[head] = dma
                return chain
            if nxt >= table_len:
                raise QueueError(f"chain {head}: next index {nxt} outside a table of {table_len}")
            index = nxt

    def undo_pop(self) -> None:
        """Give back the chain just popped (e.g. no packet was ready for it after all)."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF

    # device -> driver ------------------------------------------------------

    def add_used(self, head: int, length: int) -> None:
        """Return chain ``head`` with ``length`` bytes written into its writable part."""
        if not self.active:
            raise QueueError("queue used before activation")
        ranges = self._dma_ranges.pop(head, None) if self._dma_ranges else None
        if ranges:
            for gpa, n in ranges:
                self.memory.notify_dma_write(gpa, n)
        slot = self.next_used % self.size
        self._used_elems[1 + 2 * slot] = head
        self._used_elems[2 + 2 * slot] = length & 0xFFFFFFFF
        # The element must be visible before the index that publishes it (x86 keeps
        # stores in order; each is one store).
        self.next_used = (self.next_used + 1) & 0xFFFF
        self._used[1] = self.next_used

    def add_used_many(self, entries: list[tuple[int, int]]) -> None:
        """Return several chains (head, length) at once, published by one index
        update: a driver polling the ring sees all of them or none (a merged RX
        frame's buffers must arrive together)."""
        if not self.active:
            raise QueueError("queue used before activation")
        slot = self.next_used
        for head, length in entries:
            ranges = self._dma_ranges.pop(head, None) if self._dma_ranges else None
            if ranges:
                for gpa, n in ranges:
                    self.memory.notify_dma_write(gpa, n)
            at = 1 + 2 * (slot % self.size)
            self._used_elems[at] = head
            self._used_elems[at + 1] = length & 0xFFFFFFFF
            slot = (slot + 1) & 0xFFFF
        self.next_used = slot
        self._used[1] = slot

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for the used entries added so far."""
        if not self.active:
            return False
        old = self.signalled_used
        new = self.next_used
        self.signalled_used = new
        _store_load_fence()
        if self.event_idx:
            if old is None:
                return True
            return vring_need_event(self.used_event(), new, old)
        return not (self._avail[0] & VIRTQ_AVAIL_F_NO_INTERRUPT)

    def set_notification(self, enable: bool) -> bool:
        """Ask the driver to (not) ring the doorbell for new buffers.

        Returns True if buffers are already pending, so the caller processes them
        instead of sleeping (the driver may have added them before it saw the
        request).
        """
        if not self.active:
            return False
        if not enable:
            # Without EVENT_IDX a flag; with it nothing: the driver rings only past
            # the avail_event the last enable wrote. A doorbell already on its way
            # is harmless, so no fence.
            if not self.event_idx:
                self._used[0] |= VIRTQ_USED_F_NO_NOTIFY
            return self.pending() > 0
        if self.event_idx:
            self._used[2 + 4 * self.size] = self.next_avail
        else:
            self._used[0] &= ~VIRTQ_USED_F_NO_NOTIFY
        _store_load_fence()
        return self.pending() > 0

    def ask_for_more(self) -> bool:
        """Ask the driver to ring once it makes buffers available beyond those
        pending now (a device that needs more than there are, e.g. a merged frame
        waiting whole); returns True if it already has, so the caller looks again
        instead of sleeping. set_notification(True) would ask only for buffers past
        next_avail, which a driver refilling behind the pending ones never rings for."""
        if not self.active:
            return False
        seen = self.avail_idx()
        if self.event_idx:
            self._used[2 + 4 * self.size] = seen
        else:
            self._used[0] = self._used[0] & ~VIRTQ_USED_F_NO_NOTIFY
        _store_load_fence()
        return self.avail_idx() != seen

    # helpers for device models --------------------------------------------

    def iter_chains(self):
        """Pop chains until the ring is empty."""
        while True:
            chain = self.pop()
            if chain is None:
                return
            yield chain


def gather(views: list[memoryview], length: int) -> tuple[bytes, list[memoryview]]:
    """The first ``length`` bytes across ``views`` and the views of what follows.

    Headers (virtio-blk request, virtio-net header) may be split across buffers in
    any way a driver likes; returns fewer than ``length`` bytes if the views are
    shorter.
    """
    head = bytearray()
    rest: list[memoryview] = []
    for i, v in enumerate(views):
        need = length - len(head)
        if need <= 0:
            rest.extend(views[i:])
            break
        if len(v) <= need:
            head += v
        else:
            head += v[:need]
            rest.append(v[need:])
            rest.extend(views[i + 1:])
            break
    return bytes(head), rest


def split_tail(views: list[memoryview], length: int) -> tuple[list[memoryview], list[memoryview]]:
    """Split off the last ``length`` bytes of ``views`` (e.g. a status byte)."""
    tail: list[memoryview] = []
    body = list(views)
    need = length
    while need and body:
        v = body.pop()
        if len(v) <= need:
            tail.insert(0, v)
            need -= len(v)
        else:
            tail.insert(0, v[len(v) - need:])
            body.append(v[:len(v) - need])
            need = 0
    return body, tail


def truncate_views(views: list[memoryview], length: int) -> list[memoryview]:
    """The first ``length`` bytes of ``views`` as views."""
    out = []
    for v in views:
        if length <= 0:
            break
        out.append(v[:length])
        length -= len(out[-1])
    return out


def write_views(views: list[memoryview], data: bytes) -> int:
    """Copy ``data`` into the views in order; returns bytes copied."""
    done = 0
    for v in views:
        if done >= len(data):
            break
        n = min(len(v), len(data) - done)
        v[:n] = data[done:done + n]
        done += n
    return done
