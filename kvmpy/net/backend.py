"""What virtio-net asks of the host end of a NIC: the NetBackend protocol.

A tap (kvmpy.tap.Tap) and the user network's port (kvmpy.net.slirp.FramePort)
implement it; the device (kvmpy.devices.virtio.net.VirtioNet) knows a backend's
abilities from it alone. Frames cross a backend's fds with the 12-byte virtio-net
header in front, one frame per read or write.
"""

from __future__ import annotations

from typing import Protocol

# virtio-net's offload feature bits (virtio 1.x, 5.1.3), in the vocabulary both
# the driver and the backend speak: HOST_* and CSUM are frames the guest leaves
# unfinished for the backend, GUEST_* frames the backend may hand the guest so.
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13

# What ``set_offload`` takes: the offloaded frames the driver accepts, in the
# tap's own flags (TUNSETOFFLOAD, <linux/if_tun.h>).
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

#: every bit a backend's ``offloads`` may hold
OFFLOAD_FEATURES = (1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4
                    | 1 << VIRTIO_NET_F_GUEST_TSO6 | 1 << VIRTIO_NET_F_GUEST_ECN | 1 << VIRTIO_NET_F_GUEST_UFO
                    | 1 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_HOST_TSO6 | 1 << VIRTIO_NET_F_HOST_ECN)


class NetBackend(Protocol):
    """The host end of a virtio-net NIC, as the device uses it."""

    #: for log messages
    name: str
    #: the first queue's fd, non-blocking (``fds[0]``)
    fd: int
    #: one non-blocking fd per queue pair (several on an IFF_MULTI_QUEUE tap)
    fds: tuple[int, ...]

    @property
    def offloads(self) -> int:
        """The offload feature bits (OFFLOAD_FEATURES) the backend honours; the
        device offers the driver these and no others."""
        ...

    @property
    def allows_native_plane(self) -> bool:
        """Whether a native data plane thread (netplane.py) may read and write the
        fds itself, the backend needing no Python per frame (a kernel tap); False
        keeps every frame in the device model."""
        ...

    def set_offload(self, flags: int) -> bool:
        """Which offloaded frames (the TUN_F_* flags above) the driver accepts now, as
        TUNSETOFFLOAD says it to a tap; False if the backend refuses them."""
        ...

    def set_queue_attached(self, index: int, attached: bool) -> bool:
        """Let frames reach queue ``index`` or not (TUNSETQUEUE); asked only with
        more than one queue pair. False if the backend could not."""
        ...
