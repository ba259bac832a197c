"""``-c /dev/nbdX``: the kernel's nbd client reads the export through a socketpair.

As qemu-nbd does: one end of a socketpair is an ordinary client of our server;
we do the client's handshake on the other end (NBD_OPT_GO, no structured
replies: the kernel reads simple replies only), then give that end to the
device with NBD_SET_SOCK and park a thread in NBD_DO_IT, which returns when the
device is disconnected (``-d``, or the server going away).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
import struct
import threading
import time

from ..errors import UserError
from ..threadname import NamedThread
from . import protocol as p

log = logging.getLogger(__name__)

# linux/nbd.h: _IO(0xab, n)
NBD_SET_SOCK = 0xAB00
NBD_SET_BLKSIZE = 0xAB01
NBD_DO_IT = 0xAB03
NBD_CLEAR_SOCK = 0xAB04
NBD_CLEAR_QUE = 0xAB05
NBD_SET_SIZE_BLOCKS = 0xAB07
NBD_DISCONNECT = 0xAB08
NBD_SET_FLAGS = 0xAB0A
BLKROSET = 0x125D

SECTOR = 512


class NbdDeviceError(UserError):
    """The nbd device named by -c/-d cannot be used."""


def check_device(path: str, option: str = "-c/--connect") -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NbdDeviceError(f"{option} {path}: no such device (is the nbd module loaded? modprobe nbd)") from None
    except OSError as e:
        raise NbdDeviceError(f"{option} {path}: {e.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise NbdDeviceError(f"{option} {path}: not a block device")


def _open_device(path: str, option: str) -> int:
    check_device(path, option)
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise NbdDeviceError(f"{option} {path}: cannot open: {e.strerror}") from None


def disconnect_device(path: str) -> None:
    fd = _open_device(path, "-d/--disconnect")
    try:
        fcntl.ioctl(fd, NBD_DISCONNECT)
        fcntl.ioctl(fd, NBD_CLEAR_SOCK)
    except OSError as e:
        raise NbdDeviceError(f"-d/--disconnect {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise OSError(errno.ECONNRESET, "server closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


def client_handshake(sock: socket.socket, name: bytes) -> tuple[int, int]:
    """The client side of a fixed-newstyle handshake with NBD_OPT_GO: (size, flags)."""
    magic, opt_magic, flags = struct.unpack(">QQH", _recv_exact(sock, 18))
    if magic != p.NBDMAGIC or opt_magic != p.IHAVEOPT or not flags & p.FLAG_FIXED_NEWSTYLE:
        raise OSError(errno.EPROTO, "not a fixed-newstyle NBD server")
    sock.sendall(struct.pack(">I", p.CLIENT_FLAG_FIXED_NEWSTYLE | p.CLIENT_FLAG_NO_ZEROES))
    body = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, len(body)) + body)
    size = tflags = None
    while True:
        magic, option, reply, length = struct.unpack(">QIII", _recv_exact(sock, 20))
        if magic != p.OPTION_REPLY_MAGIC or option != p.OPT_GO or length > p.MAX_STRING + 64:
            raise OSError(errno.EPROTO, "bad option reply")
        data = _recv_exact(sock, length)
        if reply == p.REP_ACK:
            break
        if reply & (1 << 31):
            raise OSError(errno.EPROTO, f"server refused the export: {data.decode('utf-8', 'replace')}")
        if reply == p.REP_INFO and len(data) >= 12 and struct.unpack(">H", data[:2])[0] == p.INFO_EXPORT:
            _, size, tflags = struct.unpack(">HQH", data[:12])
    if size is None:
        raise OSError(errno.EPROTO, "server sent no export information")
    return size, tflags


class KernelClient:
    """Hands one socketpair end to /dev/nbdX and waits in NBD_DO_IT on a thread."""

    def __init__(self, device: str, export, server):
        self.device = device
        self.export = export
        self.server = server
        self.error: str | None = None
        self._fd = -1
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    def start(self) -> None:
        ours, kernels = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.add_client(ours, f"kernel {self.device}")
        try:
            size, flags = client_handshake(kernels, self.export.options.name)
            self._fd = _open_device(self.device, "-c/--connect")
            fcntl.ioctl(self._fd, NBD_SET_SOCK, kernels.fileno())
            fcntl.ioctl(self._fd, NBD_SET_BLKSIZE, SECTOR)
            fcntl.ioctl(self._fd, NBD_SET_SIZE_BLOCKS, size // SECTOR)
            fcntl.ioctl(self._fd, NBD_SET_FLAGS, flags)
            if flags & p.TFLAG_READ_ONLY:
                fcntl.ioctl(self._fd, BLKROSET, struct.pack("i", 1))
        except OSError as e:
            kernels.close()
            self._close_device()
            self.server.stop()
            raise NbdDeviceError(f"-c/--connect {self.device}: {e.strerror or e}") from None
        # The kernel holds its own reference to the socket from NBD_SET_SOCK on.
        self._socket = kernels
        self._thread = NamedThread(target=self._do_it, name=f"nbd-kernel-{self.device}", daemon=True)
        self._thread.start()
        self._wait_started()
        if size % SECTOR:
            log.warning("%s: the last %d bytes of the image are not visible (not a whole sector)",
                        self.device, size % SECTOR)

    def _wait_started(self, timeout: float = 10.0) -> None:
        """Return once the kernel serves the device: before NBD_DO_IT has started it,
        I/O on /dev/nbdX fails, and a `mount` right after `kvmpy nbd --fork -c` would."""
        marker = f"/sys/block/{os.path.basename(os.path.realpath(self.device))}/pid"
        deadline = time.monotonic() + timeout
        while not os.path.exists(marker):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                log.warning("%s: the kernel did not report the device started (%s)", self.device, marker)
                return
            time.sleep(0.01)

    def _do_it(self) -> None:
        try:
            fcntl.ioctl(self._fd, NBD_DO_IT)
        except OSError as e:
            # EPIPE/EIO after a disconnect request is the normal end.
            if e.errno not in (errno.EPIPE, errno.EIO, errno.ECONNRESET):
                self.error = f"NBD_DO_IT: {e.strerror}"
        finally:
            for request in (NBD_CLEAR_QUE, NBD_CLEAR_SOCK):
                try:
                    fcntl.ioctl(self._fd, request)
                except OSError:
                    pass
            self.server.stop()

    def stop(self) -> None:
        """On SIGTERM: tell the kernel to let go, then wait for NBD_DO_IT to return."""
        if self._thread is not None and self._thread.is_alive() and self._fd >= 0:
            try:
                fcntl.ioctl(self._fd, NBD_DISCONNECT)
            except OSError:
                pass
            self._thread.join(10.0)
        self._close_device()
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _close_device(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
