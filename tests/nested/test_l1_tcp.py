"""Inside the nested-KVM L1: TCP is byte-exact both ways, through vhost-net and
through kvmpy's native data plane. The default Linux guest under `kvmpy run
--enable-kvm` sends random bytes with busybox nc to a socket in the test's
namespace and receives others back; each end's SHA-256 must match the other's.
TSO/GSO frames, merged RX buffers and EVENT_IDX are all in play, so a wrong
virtio-net header, offload setting or ring index shows as a corrupt or truncated
stream, not as a lost ping. (Under real KVM the vCPU and the data plane thread run
truly in parallel; the translator's tests do not see the same interleavings.)"""

from __future__ import annotations

import os
import re

import pytest

from bench.tcp import PEER_IP, RX_PORT, TX_PORT, GuestConsole, TcpPeer, add_bridge, kvmpy_argv, transfer
from support.nested import l1_only, linux_guest_files

pytestmark = l1_only

# Not a multiple of a page, a segment or nc's 8 KiB buffer: a lost or doubled
# tail changes the digest.
SIZE = (3 << 20) + 12345
GUEST_IP = "10.78.0.40"


@pytest.mark.parametrize("vhost", ["on", "off"])
def test_tcp_is_byte_exact_both_ways(netns, tmp_path, vhost):
    if vhost == "on" and not os.path.exists("/dev/vhost-net"):
        raise AssertionError("no /dev/vhost-net in the L1: the vhost_net module did not load")
    files = linux_guest_files()
    add_bridge(netns)
    peer = TcpPeer(netns)
    stderr_path = str(tmp_path / "kvmpy.stderr")
    argv = kvmpy_argv(netns, files["vmlinuz"], files["initrd.img"], GUEST_IP, "52:54:00:78:40:01", "ktcpt0", vhost)
    if vhost == "off":
        argv = ["-vv" if a == "-v" else a for a in argv]      # the native thread's start is a debug line
    guest = GuestConsole("kvmpy", argv, stderr_path)
    try:
        guest.boot()
        status, out = guest.shell(f"head -c {SIZE} /dev/urandom > /root/tx.bin && sha256sum /root/tx.bin && "
                                  f"ping -c 2 -W 10 {PEER_IP} >/dev/null")
        assert status == 0, out
        sent = re.search(r"^([0-9a-f]{64})  /root/tx\.bin$", out, re.M)
        assert sent, out
        total, _, received, _ = transfer(peer, guest, "tx", SIZE, f"nc {PEER_IP} {TX_PORT} < /root/tx.bin",
                                         digest=True)
        assert (total, received) == (SIZE, sent.group(1))

        data = os.urandom(SIZE)
        total, _, sent_digest, out = transfer(peer, guest, "rx", data, f"nc {PEER_IP} {RX_PORT} | sha256sum")
        assert total == SIZE
        assert re.search(rf"^{sent_digest}  -$", out, re.M), out
    finally:
        guest.close()
        peer.close()
    with open(stderr_path, errors="replace") as f:
        err = f.read()
    kernel_rings = ("net0.vhost0: ring 0 (RX) served by the kernel", "net0.vhost0: ring 1 (TX) served by the kernel")
    for line in kernel_rings:
        assert (line in err) == (vhost == "on"), err[-3000:]
    if vhost == "off":
        assert "queues 0 and 1 served by a native thread" in err, err[-3000:]
    assert "device needs reset" not in err, err[-3000:]
