"""A virtio-net NIC on a real tap in the test's network namespace, driven without a
guest: the scaffolding the virtio-net, control queue and net data plane tests share."""

from __future__ import annotations

import socket

from kvmpy.devices.virtio.net import VirtioNet
from kvmpy.tap import TapNetwork, run_in_netns

from .virtio_driver import SoftMachine, VirtioPciDriver

# The config-change interrupt's MSI-X vector; the queues' follow it.
CONFIG_VECTOR = 0


def packet_socket(ns: str, ifname: str, ethertype: int, timeout: float = 5.0) -> socket.socket:
    """A raw socket in namespace ``ns`` on ``ifname`` that sees frames of ``ethertype`` only."""
    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
        s.bind((ifname, 0))
        s.settimeout(timeout)
        return s
    return run_in_netns(ns, make)


class TapNicRig:
    """A VirtioNet on a tap (on ``bridge`` if given), on a SoftMachine's virtio-pci
    function, and its driver (``d``); ``start_driver`` takes the driver to FEATURES_OK
    with MSI-X on, the queues are the test's to set up."""

    def __init__(self, ns: str, vm_name: str, ram_size: int, bridge: str | None = None, pairs: int = 1,
                 dataplane: str = "native") -> None:
        self.ns = ns
        self.net = TapNetwork.open(bridge=bridge, vm_name=vm_name, netns=ns, queues=pairs)
        self.m = SoftMachine(ram_size=ram_size)
        self.model = VirtioNet(self.net.tap, mac=self.net.mac, queue_pairs=pairs, dataplane=dataplane)
        self.dev = self.m.virtio_pci(self.model)
        self.d = VirtioPciDriver(self.m, self.m.pci.add(self.dev))
        self.sock: socket.socket | None = None

    def start_driver(self, features: int) -> int:
        """Negotiate ``features`` (returns what the device accepted), MSI-X on, the
        config vector set."""
        accepted = self.d.negotiate(features)
        self.d.enable_msix()
        self.d.common_write(0x10, 2, CONFIG_VECTOR)
        return accepted

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.dev.close()
        self.net.close()
        self.m.close()
