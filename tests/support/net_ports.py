"""A virtio-net backend for tests without a tap: kvmpy.net.backend.NetBackend over a
socket the test holds, so a VirtioNet runs on a SoftMachine without root."""

from __future__ import annotations

import socket

from kvmpy.net.backend import OFFLOAD_FEATURES, VIRTIO_NET_F_GUEST_UFO, NetBackend


class SocketPort(NetBackend):
    """A tap's contract on one fd: a tap's offloads (UFO as on a kernel that refuses
    it), a native data plane allowed. ``SocketPort.pair()`` makes it one end of a
    SOCK_SEQPACKET pair, one frame per message as a tap has them, ``host`` the other
    end of the wire; ``SocketPort()`` has no fd, for a device that moves no frame.
    ``offload_calls`` records what ``set_offload`` was asked."""

    offloads = OFFLOAD_FEATURES & ~(1 << VIRTIO_NET_F_GUEST_UFO)
    allows_native_plane = True

    def __init__(self, fd: int = -1, name: str = "ftap0") -> None:
        self.fd = fd
        self.name = name
        self.host: socket.socket | None = None
        self._ours: socket.socket | None = None
        self.offload_calls: list[int] = []

    @classmethod
    def pair(cls, name: str = "ftap0") -> "SocketPort":
        ours, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        port = cls(ours.fileno(), name)
        port._ours, port.host = ours, host
        return port

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.fd,)

    def set_offload(self, flags: int) -> bool:
        self.offload_calls.append(flags)
        return True

    def set_queue_attached(self, index: int, attached: bool) -> bool:
        return index == 0 and attached

    def close(self) -> None:
        for s in (self._ours, self.host):
            if s is not None:
                s.close()
