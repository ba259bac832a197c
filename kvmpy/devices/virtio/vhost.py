"""vhost-net: the kernel's virtio-net data plane (/dev/vhost-net), set up from Python.

QEMU's ``vhost=on``: a kernel thread moves frames between a tap queue and a
virtqueue pair in guest RAM, woken by the queue's doorbell eventfd (KVM's
ioeventfd) and interrupting through the MSI-X vector's eventfd (KVM's irqfd), so
neither direction runs VMM code. kvmpy only programs it, with the ioctls of
<linux/vhost.h> (plain ``fcntl.ioctl`` on packed structs; tests/test_vhost_net.py
holds the numbers and layouts to the header):

  VHOST_SET_OWNER                        once, when opened: the rings live in our mm
  VHOST_GET_FEATURES / SET_FEATURES      what the guest negotiated that vhost acts on
  VHOST_SET_MEM_TABLE                    guest RAM as (gpa, size, our address)
  VHOST_SET_VRING_NUM / BASE / ADDR      a ring's size, next avail index, addresses
  VHOST_SET_VRING_KICK / CALL / ERR      doorbell, interrupt, error eventfds
  VHOST_NET_SET_BACKEND                  the tap queue's fd (-1 stops the ring)

One VhostNet per RX/TX pair (each on its own tap queue), vring 0 the pair's RX
queue, 1 its TX queue. A started ring is the transport's NativeQueue (pci.py):
``stop()`` detaches the backend and reads the ring's next avail index back
(VHOST_GET_VRING_BASE) and the used index from guest RAM into the SplitQueue,
so the Python model (and ``state()``) carries on exactly where the kernel
stopped; the ERR eventfd is the hand-back: the kernel met a descriptor it
refuses, the model takes the ring and answers it (a device error, normally).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import struct
from typing import Callable

from ...memory import GuestMemory
from . import plane_glue
from .dataplane import StopInfo
from .queue import SplitQueue

log = logging.getLogger(__name__)

VHOST_NET_PATH = "/dev/vhost-net"
VHOST_VIRTIO = 0xAF


def _ioc(direction: int, nr: int, size: int) -> int:
    """Linux's _IOC: direction (1 write, 2 read, 3 both) << 30 | size << 16 | type << 8 | nr."""
    return direction << 30 | size << 16 | VHOST_VIRTIO << 8 | nr


_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")            # struct vhost_vring_state {unsigned int index, num}
_FILE = struct.Struct("<Ii")             # struct vhost_vring_file {unsigned int index; int fd}
_ADDR = struct.Struct("<IIQQQQ")         # struct vhost_vring_addr: index, flags, desc, used, avail, log
_MEMORY = struct.Struct("<II")           # struct vhost_memory: nregions, padding, then regions
_REGION = struct.Struct("<QQQQ")         # struct vhost_memory_region: gpa, size, userspace addr, flags

VHOST_GET_FEATURES = _ioc(2, 0x00, 8)
VHOST_SET_FEATURES = _ioc(1, 0x00, 8)
VHOST_SET_OWNER = _ioc(0, 0x01, 0)
VHOST_SET_MEM_TABLE = _ioc(1, 0x03, _MEMORY.size)
VHOST_SET_VRING_NUM = _ioc(1, 0x10, _STATE.size)
VHOST_SET_VRING_ADDR = _ioc(1, 0x11, _ADDR.size)
VHOST_SET_VRING_BASE = _ioc(1, 0x12, _STATE.size)
VHOST_GET_VRING_BASE = _ioc(3, 0x12, _STATE.size)
VHOST_SET_VRING_KICK = _ioc(1, 0x20, _FILE.size)
VHOST_SET_VRING_CALL = _ioc(1, 0x21, _FILE.size)
VHOST_SET_VRING_ERR = _ioc(1, 0x22, _FILE.size)
VHOST_NET_SET_BACKEND = _ioc(1, 0x30, _FILE.size)

#: every request this module makes, for the seccomp filter (kvmpy/sandbox.py)
VHOST_IOCTLS = {name: value for name, value in globals().items()
                if name.startswith("VHOST_") and isinstance(value, int) and name != "VHOST_VIRTIO"}

VHOST_FILE_UNBIND = -1

# Feature bits the kernel's rings act on; the rest of the guest's (offloads) are
# the tap's business (TUNSETOFFLOAD), the control queue's or the transport's.
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_F_RING_INDIRECT_DESC = 28
VIRTIO_F_RING_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
RING_FEATURES = (1 << VIRTIO_NET_F_MRG_RXBUF | 1 << VIRTIO_F_RING_INDIRECT_DESC | 1 << VIRTIO_F_RING_EVENT_IDX
                 | 1 << VIRTIO_F_VERSION_1)


class VhostUnavailable(OSError):
    """/dev/vhost-net cannot be opened or set up here."""


def host_address(view: memoryview) -> int:
    """The address of a writable memoryview's first byte in this process."""
    anchor = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor          # releases the buffer export at once: the mapping stays closable


class VhostNet:
    """One /dev/vhost-net instance for one RX/TX queue pair on ``tap_fd`` (a tap
    queue opened with IFF_VNET_HDR and a 12-byte header: the kernel then leaves
    the header to the tap, as QEMU sets it up). Open it before the sandbox and
    ``--runas`` (it is a device node); ``close()`` after the transport's."""

    def __init__(self, tap_fd: int, path: str = VHOST_NET_PATH, name: str = "vhost-net") -> None:
        self.name = name
        self.tap_fd = tap_fd
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise VhostUnavailable(e.errno, f"{path}: {e.strerror}") from None
        try:
            fcntl.ioctl(self.fd, VHOST_SET_OWNER)
            buf = bytearray(8)
            fcntl.ioctl(self.fd, VHOST_GET_FEATURES, buf, True)
            self.features = _U64.unpack(buf)[0]
        except OSError as e:
            os.close(self.fd)
            raise VhostUnavailable(e.errno, f"{path}: {e.strerror}") from None
        self._features_set: int | None = None
        self._memory_set: GuestMemory | None = None
        self._regions: list[tuple[int, int, int]] = []
        self.running: set[int] = set()
        self.announced: set[int] = set()

    def start_ring(self, ring: int, queue: SplitQueue, acked_features: int, kick_fd: int, irq_fd: int | None,
                   on_stop: Callable[[], None] | None = None) -> "VhostQueue":
        """Hand ``queue`` (vring ``ring``: 0 RX, 1 TX) to the kernel, from its
        current indices; OSError if the kernel refuses (the model keeps it)."""
        wanted = acked_features & RING_FEATURES
        missing = wanted & ~self.features
        if missing:
            raise OSError(errno.EOPNOTSUPP, f"{self.name}: the kernel lacks features {missing:#x}")
        if self._features_set != wanted:
            if self.running:
                raise OSError(errno.EBUSY, f"{self.name}: features change while rings {self.running} run")
            fcntl.ioctl(self.fd, VHOST_SET_FEATURES, _U64.pack(wanted))
            self._features_set = wanted
        if self._memory_set is not queue.memory:
            self._set_mem_table(queue.memory)
        return VhostQueue(self, ring, queue, kick_fd, irq_fd, on_stop)

    def _set_mem_table(self, memory: GuestMemory) -> None:
        # Read-only regions (ROM) are left out: rings and buffers the kernel may
        # touch are RAM; a descriptor pointing elsewhere is the model's to answer.
        regions = [(r.gpa, r.size, host_address(r.view)) for r in memory.regions if not r.view.readonly]
        table = bytearray(_MEMORY.pack(len(regions), 0))
        for gpa, size, addr in regions:
            table += _REGION.pack(gpa, size, addr, 0)
        fcntl.ioctl(self.fd, VHOST_SET_MEM_TABLE, table, True)
        self._regions = regions
        self._memory_set = memory

    def user_address(self, gpa: int, length: int) -> int:
        for start, size, addr in self._regions:
            if start <= gpa and gpa + length <= start + size:
                return addr + gpa - start
        raise OSError(errno.EFAULT, f"{self.name}: ring at {gpa:#x}+{length:#x} outside the memory table")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VhostQueue:
    """One ring the kernel serves, as the transport's NativeQueue: ``stop()``,
    ``take_interrupt()``, ``call_fd``, ``handback_fd``, ``irq_fd``, ``queue``."""

    #: the kernel raises every interrupt it wants: no INTx flag to share
    intx_pending = None

    def __init__(self, vhost: VhostNet, ring: int, queue: SplitQueue, kick_fd: int, irq_fd: int | None,
                 on_stop: Callable[[], None] | None) -> None:
        self.vhost = vhost
        self.ring = ring
        self.queue = queue
        self.irq_fd = irq_fd
        self._on_stop = on_stop
        # Without an unmasked MSI-X vector (INTx, a masked vector) the kernel writes
        # call_fd and the transport raises the interrupt from the event loop.
        self.call_fd = plane_glue.new_eventfd()
        self.handback_fd = plane_glue.new_eventfd()
        fd = vhost.fd
        try:
            size = queue.size
            desc = vhost.user_address(queue.desc_addr, 16 * size)
            avail = vhost.user_address(queue.avail_addr, 6 + 2 * size)
            used = vhost.user_address(queue.used_addr, 6 + 8 * size)
            fcntl.ioctl(fd, VHOST_SET_VRING_NUM, _STATE.pack(ring, size))
            fcntl.ioctl(fd, VHOST_SET_VRING_BASE, _STATE.pack(ring, queue.next_avail))
            fcntl.ioctl(fd, VHOST_SET_VRING_ADDR, _ADDR.pack(ring, 0, desc, used, avail, 0))
            fcntl.ioctl(fd, VHOST_SET_VRING_KICK, _FILE.pack(ring, kick_fd))
            fcntl.ioctl(fd, VHOST_SET_VRING_CALL, _FILE.pack(ring, self.call_fd if irq_fd is None else irq_fd))
            fcntl.ioctl(fd, VHOST_SET_VRING_ERR, _FILE.pack(ring, self.handback_fd))
            fcntl.ioctl(fd, VHOST_NET_SET_BACKEND, _FILE.pack(ring, vhost.tap_fd))
        except OSError:
            self._unbind()
            plane_glue.close_fds((self.call_fd, self.handback_fd))
            raise
        vhost.running.add(ring)
        if ring not in vhost.announced:
            vhost.announced.add(ring)
            log.info("%s: ring %d (%s) served by the kernel", vhost.name, ring, "RX" if ring == 0 else "TX")

    def _unbind(self) -> None:
        fd = self.vhost.fd
        for request in (VHOST_NET_SET_BACKEND, VHOST_SET_VRING_KICK, VHOST_SET_VRING_CALL, VHOST_SET_VRING_ERR):
            try:
                fcntl.ioctl(fd, request, _FILE.pack(self.ring, VHOST_FILE_UNBIND))
            except OSError as e:
                log.debug("%s: unbinding ring %d: %s", self.vhost.name, self.ring, e.strerror)

    def stop(self) -> StopInfo:
        """Take the ring back: the kernel finishes the frame in hand and stops, its
        indices go into the SplitQueue (the transport closes the eventfds)."""
        fd = self.vhost.fd
        try:
            fcntl.ioctl(fd, VHOST_NET_SET_BACKEND, _FILE.pack(self.ring, VHOST_FILE_UNBIND))
            buf = bytearray(_STATE.pack(self.ring, 0))
            fcntl.ioctl(fd, VHOST_GET_VRING_BASE, buf, True)
            self.queue.next_avail = _STATE.unpack(buf)[1] & 0xFFFF
        except OSError as e:
            # The kernel consumed what it consumed; without its index the model goes
            # on from where it handed the ring over (frames may be sent twice).
            log.error("%s: ring %d: VHOST_GET_VRING_BASE: %s", self.vhost.name, self.ring, e.strerror)
        self._unbind()
        self.vhost.running.discard(self.ring)
        q = self.queue
        if q.active:
            q.next_used = q.memory.read_u16(q.used_addr + 2)
        # The kernel's interrupt bookkeeping is not ours: the next decision is conservative.
        q.signalled_used = None
        handed_back = plane_glue.take_event(self.handback_fd)
        if self._on_stop is not None:
            self._on_stop()
        return StopInfo(handed_back=handed_back, completed=0, deferred=0)

    def take_interrupt(self) -> bool:
        return plane_glue.take_event(self.call_fd)


def open_vhost_nets(tap_fds, mode: str, name: str, path: str = VHOST_NET_PATH) -> list[VhostNet] | None:
    """One VhostNet per tap queue for ``vhost=mode``: "off" None; "auto" None
    where the device cannot be opened (logged); "on" raises VhostUnavailable."""
    if mode == "off":
        return None
    opened: list[VhostNet] = []
    try:
        for i, fd in enumerate(tap_fds):
            opened.append(VhostNet(fd, path=path, name=f"{name}.vhost{i}"))
    except VhostUnavailable as e:
        for v in opened:
            v.close()
        if mode == "on":
            raise
        log.info("%s: vhost-net not used: %s", name, e.strerror)
        return None
    return opened
