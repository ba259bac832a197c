"""Inside the nested-KVM L1, whose Debian kernel has vhost_net (the hosts have no
/dev/vhost-net): virtio-net with vhost=on hands its rings to the kernel, which
moves the test guest's frames both ways between guest RAM and a tap on a bridge
in a namespace the test makes, under real KVM (ioeventfd kicks, the ring's
interrupts through the call eventfd)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, guest_path
from support.nested import l1_only, linux_guest_files
from test_l1_linux import BOOT_TIMEOUT, Console
from test_virtio_guest_qemu import Echo

pytestmark = l1_only

FLOOD = 2000


def _kvmpy_in(netns, args, timeout=300):
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "kvmpy", "-v", *args], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_vhost_net_moves_frames_both_ways(netns):
    # The L1's init loads vhost_net with its other modules (kvmpy/tools/nested.py).
    if not os.path.exists("/dev/vhost-net"):
        pytest.fail("no /dev/vhost-net in the L1: the vhost_net module did not load")
    bridge = "kvbr0"
    subprocess.run(["ip", "-n", netns, "link", "add", bridge, "type", "bridge"], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", bridge, "up"], check=True)
    echo = Echo(netns, bridge)
    try:
        r = _kvmpy_in(netns, ["run", "--enable-kvm", "--kernel", guest_path("virtio_net"),
                              "--append", f"count=3 flood={FLOOD}",
                              "--net", f"tap,ifname=kvh0,bridge={bridge},mac=52:54:00:12:34:58,vhost=on"])
    finally:
        echo.close()
    out = r.stdout.splitlines()
    assert r.returncode == 0, r.stdout + r.stderr
    # the kernel took both rings (kvmpy -v logs it once per ring)
    assert "net0.vhost0: ring 0 (RX) served by the kernel" in r.stderr, r.stderr
    assert "net0.vhost0: ring 1 (TX) served by the kernel" in r.stderr, r.stderr
    assert "virtio-net: mac 52:54:00:12:34:58 link up" in out
    for i in range(3):
        assert f"virtio-net: rx echo:kvmpy-net-ping-{i}" in out, out
    assert "virtio-net: 3 echoes ok" in out
    assert any(line.startswith(f"virtio-net: flood {FLOOD} frames") for line in out), out
    pings = [p for p in echo.seen if p.startswith(b"kvmpy-net-ping-")]
    assert pings == [b"kvmpy-net-ping-%d" % i for i in range(3)]
    # the bridge saw the flood (a packet socket may drop a few under load)
    assert sum(p == b"kvmpy-net-flood" for p in echo.seen) > FLOOD // 2


def test_vhost_auto_uses_the_kernel_and_off_does_not(netns):
    if not os.path.exists("/dev/vhost-net"):
        pytest.fail("no /dev/vhost-net in the L1: the vhost_net module did not load")
    bridge = "kvbr1"
    subprocess.run(["ip", "-n", netns, "link", "add", bridge, "type", "bridge"], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", bridge, "up"], check=True)
    echo = Echo(netns, bridge)
    try:
        runs = {mode: _kvmpy_in(netns, ["run", "--enable-kvm", "--kernel", guest_path("virtio_net"),
                                        "--append", "count=2",
                                        "--net", f"tap,ifname=kvh1,bridge={bridge},vhost={mode}"])
                for mode in ("auto", "off")}
    finally:
        echo.close()
    for mode, r in runs.items():
        assert r.returncode == 0 and "virtio-net: 2 echoes ok" in r.stdout, mode + r.stdout + r.stderr
    assert "served by the kernel" in runs["auto"].stderr
    assert "served by the kernel" not in runs["off"].stderr


def test_linux_over_vhost_with_two_queue_pairs(netns, tmp_path):
    """The default Linux guest under KVM on a vhost=on NIC with two queue pairs:
    its driver's merged RX buffers, EVENT_IDX and indirect rings go to the kernel,
    the control queue (filter, MQ_VQ_PAIRS_SET) stays with kvmpy, and pings cross
    both ways before and after a stop/cont took every ring back and handed it again."""
    if not os.path.exists("/dev/vhost-net"):
        pytest.fail("no /dev/vhost-net in the L1: the vhost_net module did not load")
    files = linux_guest_files()
    for cmd in (["link", "add", "kvbr2", "type", "bridge"], ["addr", "add", "10.79.0.1/24", "dev", "kvbr2"],
                ["link", "set", "kvbr2", "up"], ["link", "set", "lo", "up"]):
        subprocess.run(["ip", "-n", netns, *cmd], check=True)
    qmp_path = str(tmp_path / "vm.qmp")
    console = Console(["ip", "netns", "exec", netns, sys.executable, "-m", "kvmpy", "-v", "run", "--enable-kvm",
                       "--smp", "2", "-m", "512", "--kernel", files["vmlinuz"], "--initrd", files["initrd.img"],
                       "--no-reboot", "--net", "tap,bridge=kvbr2,queues=2,vhost=on", "--qmp", f"unix:{qmp_path}",
                       "--append", "console=ttyS0 panic=-1 quiet kvmpy.ip=10.79.0.2/24"],
                      str(tmp_path / "kvmpy.stderr"))

    def ping_in():
        r = subprocess.run(["ip", "netns", "exec", netns, "busybox", "ping", "-c", "3", "-W", "5", "10.79.0.2"],
                           capture_output=True, text=True, timeout=60)
        return r.returncode, r.stdout + r.stderr
    try:
        console.wait_for(r"shell on the console", BOOT_TIMEOUT)
        status, out = console.shell("ls /sys/class/net/eth0/queues; ping -c 3 -W 5 10.79.0.1", timeout=60)
        assert status == 0 and "3 packets received" in out, out
        assert "rx-1" in out and "tx-1" in out, out
        assert ping_in()[0] == 0
        from qemu.qmp.legacy import QEMUMonitorProtocol
        qmp = QEMUMonitorProtocol(qmp_path)
        qmp.connect()
        qmp.cmd("stop")
        qmp.cmd("cont")
        qmp.close()
        status, out = ping_in()
        assert status == 0, out
        status, out = console.shell("ping -c 3 -W 5 10.79.0.1", timeout=60)
        assert status == 0 and "3 packets received" in out, out
    finally:
        console.close()
    err = open(tmp_path / "kvmpy.stderr", errors="replace").read()
    assert "2 queue pairs in use" in err, err[-3000:]
    for pair in (0, 1):
        assert f"net0.vhost{pair}: ring 0 (RX) served by the kernel" in err, err[-3000:]
    assert "net0.vhost0: ring 1 (TX) served by the kernel" in err, err[-3000:]
    assert "answered VIRTIO_NET_ERR" not in err and "device needs reset" not in err, err[-3000:]
