"""Tap devices for virtio-net: open (python-pytun), offloads, bridge attach (pyroute2).

    net = TapNetwork.open(bridge="br0", vm_name="web", index=0)   # tap attached to br0
    dev = VirtioNet(net.tap, mac=net.mac)                         # a VirtioDevice on it
    ...
    net.close()        # detaches and deletes the tap (and a bridge we created, if now empty)

Everything can also run inside a named network namespace (``netns=``, as made
by ``ip netns add``): the tap and the netlink socket are created by a thread
that joined that namespace, and the tap fd stays bound to it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import logging
import os
import struct
import threading

from ..errors import UserError
from ..net.backend import OFFLOAD_FEATURES, TUN_F_CSUM, TUN_F_UFO, VIRTIO_NET_F_GUEST_UFO, NetBackend

log = logging.getLogger(__name__)

TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400

VNET_HDR_SIZE = 12  # virtio 1.x: virtio_net_hdr + num_buffers
CLONE_NEWNET = 0x40000000


class TapError(UserError):
    """A tap or bridge cannot be set up (missing /dev/net/tun, no CAP_NET_ADMIN, busy name)."""


def stable_mac(vm_name: str, index: int) -> bytes:
    """52:54:00:xx:xx:xx derived from the VM name and interface index: the same VM
    gets the same MAC on every boot, different VMs (almost surely) different ones."""
    digest = hashlib.sha256(f"{vm_name}/{index}".encode()).digest()
    return b"\x52\x54\x00" + digest[:3]


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    try:
        if len(parts) != 6:
            raise ValueError
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise UserError(f"invalid MAC address {text!r} (want xx:xx:xx:xx:xx:xx)") from None
    if mac[0] & 1:
        raise UserError(f"MAC address {text} is a multicast address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


_libc = None


def run_in_netns(netns: str | None, fn, *args):
    """Run ``fn(*args)`` in a thread that joined network namespace ``netns``
    (/run/netns/NAME); with None, just call it. Exceptions propagate."""
    if netns is None:
        return fn(*args)
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    result: dict = {}

    def body():
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            result["error"] = TapError(f"network namespace {netns}: {e.strerror}")
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                result["error"] = TapError(f"network namespace {netns}: setns: {os.strerror(err)}")
                return
            result["value"] = fn(*args)
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e
        finally:
            os.close(fd)

    t = threading.Thread(target=body, name=f"netns-{netns}")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


class Tap(NetBackend):
    """An open tap device with a 12-byte virtio-net header on every frame.

    ``fd`` is non-blocking; readv/writev on it move one frame each. With
    ``queues`` > 1 the tap is IFF_MULTI_QUEUE and ``fds`` holds one fd per queue
    (``fd`` is the first): the kernel spreads flows over the attached ones.
    """

    # The kernel reads and writes frames itself: a C thread may do all the rest.
    allows_native_plane = True

    def __init__(self, name: str | None = None, netns: str | None = None, queues: int = 1) -> None:
        self.netns = netns
        self._devs = []
        self._dev = run_in_netns(netns, self._open, name or "", queues > 1)
        self._devs.append(self._dev)
        self.name = self._dev.name.decode() if isinstance(self._dev.name, bytes) else self._dev.name
        try:
            for _ in range(queues - 1):
                self._devs.append(run_in_netns(netns, self._open, self.name, True))
        except BaseException:
            self.close()
            raise
        self.fds = tuple(d.fileno() for d in self._devs)
        self.fd = self.fds[0]
        self._attached = [True] * queues
        for fd in self.fds:
            os.set_blocking(fd, False)
        try:
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        except OSError as e:
            self.close()
            raise TapError(f"tap {self.name}: cannot set the vnet header size: {e.strerror}") from None
        self.supports_ufo = self.set_offload(TUN_F_CSUM | TUN_F_UFO)
        self.set_offload(0)

    @staticmethod
    def _open(name: str, multi_queue: bool = False):
        try:
            import pytun
        except ImportError:
            raise TapError("tap networking needs python-pytun: pip install 'kvmpy[net]'") from None
        if not os.path.exists("/dev/net/tun"):
            raise TapError(f"tap {name or '(auto)'}: /dev/net/tun does not exist (modprobe tun)")
        flags = pytun.IFF_TAP | pytun.IFF_NO_PI | pytun.IFF_VNET_HDR
        if multi_queue:
            flags |= pytun.IFF_MULTI_QUEUE
        try:
            return pytun.TunTapDevice(name=name, flags=flags)
        except pytun.Error as e:
            code = e.args[0] if e.args and isinstance(e.args[0], int) else None
            if code in (errno.EPERM, errno.EACCES):
                raise TapError(f"tap {name or '(auto)'}: not permitted (needs root or CAP_NET_ADMIN)") from None
            if code == errno.EBUSY:
                raise TapError(f"tap {name}: the interface is busy (already in use)") from None
            raise TapError(f"tap {name or '(auto)'}: cannot create: {e}") from None

    @property
    def offloads(self) -> int:
        """Every offload a tap takes; UFO where this kernel's tap accepted it at open."""
        return OFFLOAD_FEATURES & ~(0 if self.supports_ufo else 1 << VIRTIO_NET_F_GUEST_UFO)

    def set_queue_attached(self, index: int, attached: bool) -> bool:
        """TUNSETQUEUE: let the kernel steer frames to queue ``index`` or not (a
        detached queue's fd stays open for when the guest uses its pair again)."""
        if self._attached[index] == attached:
            return True
        flags = IFF_ATTACH_QUEUE if attached else IFF_DETACH_QUEUE
        try:
            fcntl.ioctl(self.fds[index], TUNSETQUEUE, struct.pack("16sH22x", b"", flags))
        except OSError as e:
            log.warning("tap %s: TUNSETQUEUE queue %d %s: %s", self.name, index,
                        "attach" if attached else "detach", e.strerror)
            return False
        self._attached[index] = attached
        return True

    def set_offload(self, flags: int) -> bool:
        """TUNSETOFFLOAD: which offloaded frames the kernel may hand us (and so the guest)."""
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
            return True
        except OSError as e:
            log.debug("tap %s: TUNSETOFFLOAD %#x: %s", self.name, flags, e.strerror)
            return False

    def close(self) -> None:
        if self._dev is not None:
            # A non-persistent tap disappears with its last fd.
            for dev in self._devs:
                dev.close()
            self._devs = []
            self._dev = None
            self.fd = -1
            self.fds = ()


def _pyroute2():
    try:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
    except ImportError:
        raise TapError("tap networking needs pyroute2: pip install 'kvmpy[net]'") from None
    return IPRoute, NetlinkError


def _netlink_error_message(e, what: str) -> TapError:
    code = getattr(e, "code", None)
    if code in (errno.EPERM, errno.EACCES):
        return TapError(f"{what}: not permitted (needs root or CAP_NET_ADMIN)")
    return TapError(f"{what}: {e}")


def _bridge_attach(bridge: str, tap: str) -> bool:
    IPRoute, NetlinkError = _pyroute2()
    created = False
    with IPRoute() as ipr:
        try:
            idx = ipr.link_lookup(ifname=bridge)
            if not idx:
                ipr.link("add", ifname=bridge, kind="bridge")
                created = True
                idx = ipr.link_lookup(ifname=bridge)
            tap_idx = ipr.link_lookup(ifname=tap)
            if not tap_idx:
                raise TapError(f"tap {tap}: vanished before it could join bridge {bridge}")
            ipr.link("set", index=tap_idx[0], master=idx[0])
            ipr.link("set", index=idx[0], state="up")
            ipr.link("set", index=tap_idx[0], state="up")
        except NetlinkError as e:
            if created:
                try:
                    ipr.link("del", ifname=bridge)
                except NetlinkError:
                    pass
            raise _netlink_error_message(e, f"bridge {bridge} (tap {tap})") from None
    return created


def _link_up(name: str) -> None:
    IPRoute, NetlinkError = _pyroute2()
    with IPRoute() as ipr:
        try:
            idx = ipr.link_lookup(ifname=name)
            if idx:
                ipr.link("set", index=idx[0], state="up")
        except NetlinkError as e:
            raise _netlink_error_message(e, f"tap {name}") from None


def _bridge_detach(bridge: str, tap: str, delete_bridge: bool) -> None:
    IPRoute, NetlinkError = _pyroute2()
    with IPRoute() as ipr:
        try:
            tap_idx = ipr.link_lookup(ifname=tap)
            if tap_idx:
                ipr.link("set", index=tap_idx[0], master=0)
            if delete_bridge:
                br = ipr.link_lookup(ifname=bridge)
                if br and not [link for link in ipr.get_links() if link.get_attr("IFLA_MASTER") == br[0]]:
                    ipr.link("del", index=br[0])
        except NetlinkError as e:
            log.warning("bridge %s: cleanup of tap %s: %s", bridge, tap, e)


class TapNetwork:
    """A tap for one guest NIC, optionally on a bridge; ``close()`` undoes it all."""

    def __init__(self, tap: Tap, mac: bytes, bridge: str | None, created_bridge: bool) -> None:
        self.tap = tap
        self.mac = mac
        self.bridge = bridge
        self.created_bridge = created_bridge
        self._bridge_cleanup_elsewhere = False
        # Open vhost-net devices bound to this tap's queues (kvmpy.devices.virtio.vhost),
        # released with the tap.
        self.vhost: list | None = None

    @classmethod
    def open(cls, ifname: str | None = None, bridge: str | None = None, mac: str | bytes | None = None,
             vm_name: str = "kvmpy", index: int = 0, netns: str | None = None,
             queues: int = 1) -> "TapNetwork":
        """Open tap ``ifname`` (kernel-chosen name if None) with ``queues`` queues,
        bring it up, attach it to ``bridge`` (created if missing). MAC: given, else
        stable_mac(vm_name, index)."""
        if isinstance(mac, str):
            mac = parse_mac(mac)
        mac = mac or stable_mac(vm_name, index)
        tap = Tap(ifname, netns=netns, queues=queues)
        try:
            created = False
            if bridge:
                created = run_in_netns(netns, _bridge_attach, bridge, tap.name)
            else:
                run_in_netns(netns, _link_up, tap.name)
        except BaseException:
            tap.close()
            raise
        return cls(tap, mac, bridge, created)

    def hand_over_bridge_cleanup(self):
        """The bridge's clean-up as a call for another process (lifecycle's cleanup
        helper, once this one is gone), or None without a bridge; ``close()`` then
        only closes the tap. For a process that will not be allowed netlink sockets
        (kvmpy.sandbox) or CAP_NET_ADMIN (--runas) when it closes: closing the tap
        takes it off the bridge, but a persistent tap stays on it and a bridge we
        created stays up."""
        if not self.bridge:
            return None
        self._bridge_cleanup_elsewhere = True
        netns, bridge, name, created = self.tap.netns, self.bridge, self.tap.name, self.created_bridge
        return lambda: run_in_netns(netns, _bridge_detach, bridge, name, created)

    def close(self) -> None:
        for vhost in self.vhost or ():
            vhost.close()
        self.vhost = None
        if self.tap.fd < 0:
            return
        if self.bridge and not self._bridge_cleanup_elsewhere:
            run_in_netns(self.tap.netns, _bridge_detach, self.bridge, self.tap.name, self.created_bridge)
        self.tap.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
