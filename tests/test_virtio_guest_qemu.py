"""The virtio guest drivers (tests/guests/virtio_blk.c, virtio_net.c) under real QEMU.

This proves the guests right independently of kvmpy's device models, so the
same guests booted under ``kvmpy run`` test kvmpy's devices against a known-good
driver. QEMU's isa-debug-exit makes guest exit code N process status 2N+1.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import threading

import pytest

GUESTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guests")
BUILD_DIR = os.path.join(GUESTS_DIR, "build")
QEMU = shutil.which("qemu-system-x86_64")
ETH_TYPE = 0x88B5
MAGIC = b"KVMPY-DISK-MAGIC-0123456789"


def fnv1a(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def guest_pattern(nbytes: int) -> bytes:
    return bytes(((i * 13 + 7) ^ (i >> 9)) & 0xFF for i in range(nbytes))


@pytest.fixture(scope="module")
def built():
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    if not shutil.which("make") or not shutil.which("gcc"):
        pytest.skip("make and gcc are needed to build tests/guests")
    r = subprocess.run(["make", "-s", "-C", GUESTS_DIR], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("virtio_blk", "virtio_net"):
        assert os.path.exists(os.path.join(BUILD_DIR, f"{name}.elf"))
    return BUILD_DIR


def qemu_cmd(guest: str, devices: list[str], append: str = "") -> list[str]:
    return [QEMU, "-accel", "tcg", "-machine", "q35", "-m", "128", "-nodefaults", "-display", "none",
            "-serial", "stdio", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel", os.path.join(BUILD_DIR, f"{guest}.elf"), "-append", append, *devices]


def make_image(path, size=8 << 20):
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(MAGIC)


def test_virtio_blk_guest_under_qemu(built, tmp_path):
    img = tmp_path / "disk.raw"
    make_image(img)
    r = subprocess.run(qemu_cmd("virtio_blk", [
        "-device", "virtio-blk-pci,drive=d0,disable-legacy=on,serial=qemu-serial-42",
        "-drive", f"if=none,id=d0,file={img},format=raw"], "sector=2048 bytes=32768"),
        capture_output=True, text=True, timeout=120)
    out = r.stdout.replace("\r\n", "\n")
    lines = out.splitlines()
    assert r.returncode == 1, f"status {r.returncode}\n{out}{r.stderr}"
    pattern = guest_pattern(32768)
    assert "virtio-blk: capacity 16384 sectors" in lines
    assert "virtio-blk: serial qemu-serial-42" in lines
    assert "virtio-blk: sector0 KVMPY-DISK-MAGIC" in lines
    sector0 = MAGIC + bytes(512 - len(MAGIC))
    assert f"virtio-blk: sector0 checksum {fnv1a(sector0):#010x}" in lines
    assert f"virtio-blk: wrote 32768 bytes at sector 2048 checksum {fnv1a(pattern):#010x}" in lines
    assert f"virtio-blk: read back checksum {fnv1a(pattern):#010x}" in lines
    assert "virtio-blk: pattern ok" in lines and lines[-1] == "guest: done"
    with open(img, "rb") as f:
        f.seek(2048 * 512)
        assert f.read(32768) == pattern  # the write really reached the image


def test_virtio_blk_guest_rejects_missing_device(built):
    r = subprocess.run(qemu_cmd("virtio_blk", []), capture_output=True, text=True, timeout=60)
    assert r.returncode == 3  # exit 1
    assert "virtio-blk: no modern virtio-blk device found" in r.stdout


# -- virtio-net: QEMU's tap on a bridge in a namespace, a packet socket answering -----------

class Echo:
    """Answers every frame of our EtherType on ``bridge`` with 'echo:' + payload to its sender."""

    def __init__(self, netns: str, bridge: str) -> None:
        from kvmpy.tap import run_in_netns
        self.sock = run_in_netns(netns, self._open, bridge)
        self.seen: list[bytes] = []
        self.stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    @staticmethod
    def _open(bridge):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_TYPE))
        s.bind((bridge, 0))
        s.settimeout(0.2)
        return s

    def _loop(self):
        while not self.stop:
            try:
                frame = self.sock.recv(2048)
            except socket.timeout:
                continue
            except OSError:
                return
            if frame[12:14] != struct.pack("!H", ETH_TYPE) or frame[6] & 1:
                continue
            payload = frame[14:].split(b"\0", 1)[0]
            self.seen.append(payload)
            reply = frame[6:12] + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", ETH_TYPE) + b"echo:" + payload + b"\0"
            self.sock.send(reply.ljust(60, b"\0"))

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


def setup_bridge_with_tap(ns: str, bridge: str, tap: str) -> None:
    for cmd in (["ip", "-n", ns, "link", "add", bridge, "type", "bridge"],
                ["ip", "-n", ns, "tuntap", "add", tap, "mode", "tap", "vnet_hdr"],
                ["ip", "-n", ns, "link", "set", tap, "master", bridge],
                ["ip", "-n", ns, "link", "set", bridge, "up"],
                ["ip", "-n", ns, "link", "set", tap, "up"]):
        subprocess.run(cmd, check=True)


def test_virtio_net_guest_under_qemu(built, netns):
    setup_bridge_with_tap(netns, "kbr0", "ktap0")
    echo = Echo(netns, "kbr0")
    try:
        r = subprocess.run(["ip", "netns", "exec", netns] + qemu_cmd("virtio_net", [
            "-netdev", "tap,id=n0,ifname=ktap0,script=no,downscript=no,vhost=off",
            "-device", "virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:12:34:56"], "count=3"),
            capture_output=True, text=True, timeout=120)
    finally:
        echo.close()
    out = r.stdout.replace("\r\n", "\n")
    lines = out.splitlines()
    assert r.returncode == 1, f"status {r.returncode}\n{out}{r.stderr}"
    assert "virtio-net: mac 52:54:00:12:34:56 link up" in lines
    for i in range(3):
        assert f"virtio-net: tx kvmpy-net-ping-{i}" in lines
        assert f"virtio-net: rx echo:kvmpy-net-ping-{i}" in lines
    assert "virtio-net: 3 echoes ok" in lines
    assert [b"kvmpy-net-ping-%d" % i for i in range(3)] == echo.seen[:3]
