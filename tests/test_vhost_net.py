"""vhost-net on the host: the ioctl numbers and struct layouts against <linux/vhost.h>,
the vhost= and queues= options, and vhost=on refused with one line where
/dev/vhost-net does not open. The kernel's data plane itself moves frames in
tests/nested/test_l1_vhost_net.py (the nested L1's kernel has vhost_net)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT, guest_path
from kvmpy.config import ConfigError, config_from_dict, parse_netdev
from kvmpy.devices.virtio import vhost
from kvmpy.sandbox import IOCTLS

HEADER_PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/vhost.h>
#define P(x) printf("%s %lu\n", #x, (unsigned long)(x))
int main(void) {
    P(VHOST_GET_FEATURES); P(VHOST_SET_FEATURES); P(VHOST_SET_OWNER); P(VHOST_SET_MEM_TABLE);
    P(VHOST_SET_VRING_NUM); P(VHOST_SET_VRING_ADDR); P(VHOST_SET_VRING_BASE); P(VHOST_GET_VRING_BASE);
    P(VHOST_SET_VRING_KICK); P(VHOST_SET_VRING_CALL); P(VHOST_SET_VRING_ERR); P(VHOST_NET_SET_BACKEND);
    P(sizeof(struct vhost_vring_addr)); P(offsetof(struct vhost_vring_addr, used_user_addr));
    P(offsetof(struct vhost_vring_addr, avail_user_addr)); P(sizeof(struct vhost_memory_region));
    P(offsetof(struct vhost_memory, regions)); P(sizeof(struct vhost_vring_file));
    P(VHOST_FILE_UNBIND + 0x100); P(VHOST_NET_F_VIRTIO_NET_HDR);
    return 0;
}
"""


def test_ioctls_and_layouts_match_the_kernel_header(tmp_path):
    if not shutil.which("gcc"):
        pytest.skip("gcc is needed to read <linux/vhost.h>")
    src = tmp_path / "probe.c"
    src.write_text(HEADER_PROBE)
    build = subprocess.run(["gcc", "-o", str(tmp_path / "probe"), str(src)], capture_output=True, text=True)
    if build.returncode and "vhost.h" in build.stderr:
        pytest.skip("<linux/vhost.h> is missing (linux-libc-dev)")
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True, check=True).stdout
    header = {k: int(v) for k, v in (line.rsplit(" ", 1) for line in out.splitlines())}
    for name, value in vhost.VHOST_IOCTLS.items():
        assert header[name] == value, name
        if name != "VHOST_SET_OWNER":           # made before the filter, at open
            assert IOCTLS[name] == value, f"sandbox: {name}"
    assert header["sizeof(struct vhost_vring_addr)"] == vhost._ADDR.size
    assert header["offsetof(struct vhost_vring_addr, used_user_addr)"] == 16
    assert header["offsetof(struct vhost_vring_addr, avail_user_addr)"] == 24
    assert header["sizeof(struct vhost_memory_region)"] == vhost._REGION.size
    assert header["offsetof(struct vhost_memory, regions)"] == vhost._MEMORY.size
    assert header["sizeof(struct vhost_vring_file)"] == vhost._FILE.size
    assert header["VHOST_FILE_UNBIND + 0x100"] == vhost.VHOST_FILE_UNBIND + 0x100


def test_open_modes(tmp_path):
    missing = str(tmp_path / "no-vhost-net")
    assert vhost.open_vhost_nets([5], "off", "net0", path=missing) is None
    assert vhost.open_vhost_nets([5], "auto", "net0", path=missing) is None
    with pytest.raises(vhost.VhostUnavailable, match="no-vhost-net"):
        vhost.open_vhost_nets([5], "on", "net0", path=missing)
    # a node that opens but is no vhost device: SET_OWNER fails, also unavailable
    with pytest.raises(vhost.VhostUnavailable):
        vhost.open_vhost_nets([5], "on", "net0", path="/dev/null")


def test_net_options_parse():
    n = parse_netdev("tap,ifname=t0,queues=4,vhost=on")
    assert (n.queues, n.vhost) == (4, "on")
    assert parse_netdev("tap").vhost == "auto" and parse_netdev("tap").queues == 1
    for bad, needle in (("tap,queues=0", "queues"), ("tap,queues=17", "queues"), ("tap,queues=x", "queues"),
                        ("tap,vhost=yes", "vhost")):
        with pytest.raises(ConfigError, match=needle):
            parse_netdev(bad)
    cfg = config_from_dict(tomllib.loads('[[net]]\ntype = "tap"\nqueues = 2\nvhost = "off"\n'), "vm.toml")
    assert (cfg.nets[0].queues, cfg.nets[0].vhost) == (2, "off")
    for body, needle in (('queues = "2"', "queues"), ("queues = 99", "queues"), ('vhost = "maybe"', "vhost")):
        with pytest.raises(ConfigError, match=f"vm.toml: \\[\\[net\\]\\] #1 key '{needle}'"):
            config_from_dict(tomllib.loads(f'[[net]]\ntype = "tap"\n{body}\n'), "vm.toml")


def _run_in(netns, args, timeout=120):
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "kvmpy", *args], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.mark.guest
def test_vhost_on_without_the_device_is_one_line_and_status_2(netns):
    if os.path.exists(vhost.VHOST_NET_PATH):
        pytest.skip("this host has /dev/vhost-net: vhost=on would work (see tests/nested/test_l1_vhost_net.py)")
    r = _run_in(netns, ["run", "--kernel", guest_path("virtio_net"), "--net", "tap,ifname=kvh0,vhost=on"])
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        "kvmpy: net0: vhost=on, but /dev/vhost-net: No such file or directory "
        "(load the vhost_net module, or use vhost=off)"]
    links = subprocess.run(["ip", "-n", netns, "-o", "link"], capture_output=True, text=True).stdout
    assert "kvh0" not in links          # the tap opened first is gone again


def test_memory_table_addresses_are_our_mappings():
    import ctypes

    from kvmpy.memory import GuestMemory
    mem = GuestMemory.anonymous([(0, 1 << 20), (1 << 32, 1 << 20)])
    try:
        for gpa in (0x1234, (1 << 32) + 0x10):
            mem.write(gpa, b"vhost!")
            r = next(r for r in mem.regions if r.gpa <= gpa < r.end)
            assert ctypes.string_at(vhost.host_address(r.view) + gpa - r.gpa, 6) == b"vhost!"
    finally:
        mem.close()
