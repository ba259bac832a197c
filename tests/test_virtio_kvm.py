"""virtio-blk and virtio-net under `kvmpy run --enable-kvm`: the same guest drivers
that pass under QEMU, against kvmpy's PCI/virtio devices, ioeventfd and irqfd."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, guest_path, run_kvmpy, tool_required
from test_virtio_guest_qemu import Echo, fnv1a, guest_pattern, make_image

pytestmark = pytest.mark.usefixtures("kvm_required")


def check_blk_output(out: str, pattern: bytes) -> None:
    lines = out.splitlines()
    assert "virtio-blk: sector0 KVMPY-DISK-MAGIC" in lines
    assert f"virtio-blk: wrote {len(pattern)} bytes at sector 2048 checksum {fnv1a(pattern):#010x}" in lines
    assert f"virtio-blk: read back checksum {fnv1a(pattern):#010x}" in lines
    assert "virtio-blk: pattern ok" in lines and lines[-1] == "guest: done"


def test_virtio_blk_raw_image(tmp_path):
    img = tmp_path / "disk.raw"
    make_image(img)
    p = run_kvmpy(["run", "--enable-kvm", "--kernel", guest_path("virtio_blk"), "--append", "sector=2048 bytes=32768",
                   "--drive", f"file={img},format=raw,serial=kvmpy-serial-7"], timeout=120)
    out = p.stdout.decode()
    assert p.returncode == 0, out + p.stderr.decode()
    assert "virtio-blk: capacity 16384 sectors" in out
    assert "virtio-blk: serial kvmpy-serial-7" in out
    pattern = guest_pattern(32768)
    check_blk_output(out, pattern)
    with open(img, "rb") as f:
        f.seek(2048 * 512)
        assert f.read(32768) == pattern       # flushed data is in the file on the host


def test_virtio_blk_qcow2_overlay_checked_by_qemu_img(tmp_path):
    qemu_img = tool_required("qemu-img")
    base = tmp_path / "base.raw"
    make_image(base)
    overlay = tmp_path / "overlay.qcow2"
    p = run_kvmpy(["img", "create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay)])
    assert p.returncode == 0, p.stderr.decode()
    p = run_kvmpy(["run", "--enable-kvm", "--kernel", guest_path("virtio_blk"), "--append", "sector=2048 bytes=32768",
                   "--drive", f"file={overlay},format=qcow2"], timeout=120)
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
    check_blk_output(p.stdout.decode(), guest_pattern(32768))
    assert subprocess.run([qemu_img, "check", str(overlay)], capture_output=True).returncode == 0
    flat = tmp_path / "flat.raw"
    subprocess.run([qemu_img, "convert", "-O", "raw", str(overlay), str(flat)], check=True)
    data = flat.read_bytes()
    assert data[2048 * 512:2048 * 512 + 32768] == guest_pattern(32768)
    assert data.startswith(b"KVMPY-DISK-MAGIC")          # read through to the backing file
    assert base.read_bytes()[2048 * 512:2048 * 512 + 16] == bytes(16)   # backing untouched


def test_virtio_blk_readonly_disk_refuses_writes(tmp_path):
    img = tmp_path / "disk.raw"
    make_image(img)
    before = img.read_bytes()
    p = run_kvmpy(["run", "--enable-kvm", "--kernel", guest_path("virtio_blk"), "--append", "sector=2048 bytes=4096",
                   "--drive", f"file={img},format=raw,readonly=on"], timeout=120)
    assert p.returncode != 0
    assert "pattern ok" not in p.stdout.decode()
    assert img.read_bytes() == before


def test_virtio_net_echo_across_a_bridge(netns):
    echo = None
    bridge = "kbr1"
    subprocess.run(["ip", "-n", netns, "link", "add", bridge, "type", "bridge"], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", bridge, "up"], check=True)
    echo = Echo(netns, bridge)
    try:
        env = dict(os.environ, PYTHONPATH=ROOT)
        r = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "kvmpy", "run", "--enable-kvm",
                            "--kernel", guest_path("virtio_net"), "--append", "count=3",
                            "--net", f"tap,ifname=ktap9,bridge={bridge},mac=52:54:00:12:34:57"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    finally:
        echo.close()
    lines = r.stdout.splitlines()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "virtio-net: mac 52:54:00:12:34:57 link up" in lines
    for i in range(3):
        assert f"virtio-net: rx echo:kvmpy-net-ping-{i}" in lines
    assert "virtio-net: 3 echoes ok" in lines
    # kvmpy removed its tap on exit; the bridge it did not create stays.
    links = subprocess.run(["ip", "-n", netns, "-o", "link"], capture_output=True, text=True).stdout
    assert "ktap9" not in links and bridge in links


def test_virtio_blk_write_onto_qcow2_metadata_is_refused(tmp_path):
    """Issue 15: an overlay whose refcounts were zeroed used to take the guest's data
    on its header. Now the request fails, the VMM logs one line, the header stays."""
    qemu_img = tool_required("qemu-img")
    base = tmp_path / "base.raw"
    make_image(base)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", str(base),
                    "-F", "raw", str(overlay)], check=True)
    with open(overlay, "r+b") as f:
        rt = int.from_bytes((f.seek(48), f.read(8))[1], "big")
        rb = int.from_bytes((f.seek(rt), f.read(8))[1], "big")
        f.seek(rb)
        f.write(bytes(4096))
    before = overlay.read_bytes()
    p = run_kvmpy(["run", "--enable-kvm", "--kernel", guest_path("virtio_blk"), "--append", "sector=2048 bytes=4096",
                   "--drive", f"file={overlay},format=qcow2"], timeout=120)
    out, err = p.stdout.decode(), p.stderr.decode()
    assert "virtio-blk: request type 1 sector 2048 failed" in out, out + err
    assert "pattern ok" not in out
    assert "Traceback" not in err
    assert len([l for l in err.splitlines() if "preventing invalid write on metadata" in l]) == 1, err
    after = overlay.read_bytes()
    assert after[:72] == before[:72] and after[80:] == before[80:]
    info = subprocess.run([qemu_img, "info", str(overlay)], capture_output=True, text=True).stdout
    assert "file format: qcow2" in info and "corrupt: true" in info


PROBED_RAW_WARNING = ("Image format was not specified for '{}' and probing guessed raw. Automatically detecting "
                      "the format is dangerous for raw images, write operations on block 0 will be restricted. "
                      "Specify the 'raw' format explicitly to remove the restrictions.")


def test_probed_raw_disk_warns_and_guards_block0(tmp_path):
    """Issue 15: a guest must not turn a probed raw disk into a qcow2 (whose header,
    backing file included, it would then control on the next boot)."""
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(4 << 20))
    kernel = guest_path("virtio_blk")
    p = run_kvmpy(["run", "--enable-kvm", "--kernel", kernel, "--append", "sector=0 bytes=4096 qcow2magic=1",
                   "--drive", f"file={img}"], timeout=120)
    out, err = p.stdout.decode(), p.stderr.decode()
    assert "virtio-blk: request type 1 sector 0 failed" in out, out + err
    warnings = [l for l in err.splitlines() if "WARNING" in l]
    assert len(warnings) == 1 and warnings[0].endswith(PROBED_RAW_WARNING.format(img)), err
    assert "write to block 0 refused" in err and "Traceback" not in err
    assert img.read_bytes() == bytes(4 << 20)
    # Block 0 itself stays writable with data that keeps the image raw (QEMU's rule).
    p = run_kvmpy(["run", "--enable-kvm", "--kernel", kernel, "--append", "sector=0 bytes=4096",
                   "--drive", f"file={img}"], timeout=120)
    assert p.returncode == 0 and "pattern ok" in p.stdout.decode(), p.stdout.decode() + p.stderr.decode()
    assert img.read_bytes()[:4096] == guest_pattern(4096)
    # format=raw given: no warning, no restriction.
    p = run_kvmpy(["run", "--enable-kvm", "--kernel", kernel, "--append", "sector=0 bytes=4096 qcow2magic=1",
                   "--drive", f"file={img},format=raw"], timeout=120)
    assert p.returncode == 0 and "pattern ok" in p.stdout.decode(), p.stdout.decode() + p.stderr.decode()
    assert "WARNING" not in p.stderr.decode()
    assert img.read_bytes()[:4] == b"QFI\xfb"


def test_probed_qcow2_needs_its_backing_format(tmp_path):
    """Issue 15: a qcow2 opened by probing must not name a host file for the VMM to
    probe and hand to the guest."""
    qemu_img = tool_required("qemu-img")
    from kvmpy.block.qcow2 import create_qcow2
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"host secret, not for guests\n")
    evil = tmp_path / "evil.img"
    # No backing_fmt extension: today's qemu-img refuses to write one, older ones did.
    create_qcow2(str(evil), 4 << 20, backing_file=str(secret), backing_format=None)
    info = subprocess.run([qemu_img, "info", str(evil)], capture_output=True, text=True).stdout
    assert "backing file: " in info and "backing file format" not in info
    kernel = guest_path("virtio_blk")
    p = run_kvmpy(["run", "--enable-kvm", "--kernel", kernel, "--drive", f"file={evil}"], timeout=120)
    err = p.stderr.decode()
    assert p.returncode == 2, err
    assert p.stdout.decode() == ""                       # the guest never ran
    assert err.count("\n") == 1 and "has no backing format" in err and "rebase -u" in err and "-F" in err, err
    # With the backing format recorded, the probed image opens (with the warning),
    # its backing file read-only: the guest's writes go to the overlay.
    p = run_kvmpy(["img", "rebase", "-u", "-b", str(secret), "-F", "raw", str(evil)])
    assert p.returncode == 0, p.stderr.decode()
    p = run_kvmpy(["run", "--enable-kvm", "--kernel", kernel, "--append", "sector=0 bytes=4096",
                   "--drive", f"file={evil}"], timeout=120)
    out, err = p.stdout.decode(), p.stderr.decode()
    assert p.returncode == 0 and "pattern ok" in out, out + err
    assert f"Image format was not specified for '{evil}' and probing guessed qcow2" in err
    assert secret.read_bytes() == b"host secret, not for guests\n"
