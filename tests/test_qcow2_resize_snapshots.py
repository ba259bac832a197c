"""Resizing a qcow2 image that has internal snapshots, as qemu-img 7.2 does: v3
images grow and shrink (each snapshot keeps its own size and data), v2 images are
refused. Checked with the real qemu-img: check clean, snapshot -l, convert -l."""

from __future__ import annotations

import subprocess

import pytest

from support.qemu_utils import MISSING_REASON, QEMU_IMG, MiB, kimg, qio

if MISSING_REASON:
    pytest.skip(MISSING_REASON, allow_module_level=True)


def qimg(*args, rc=0):
    r = subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True)
    assert r.returncode == rc, r.stdout + r.stderr
    return r


def _snapshot_bytes(img, name, out):
    qimg("convert", "-l", f"snapshot.name={name}", "-O", "raw", img, out)
    return out.read_bytes()


@pytest.mark.parametrize("cluster", [512, 65536])
def test_grow_then_shrink_keeps_snapshots(tmp_path, cluster):
    img = tmp_path / "s.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", img, "1M")
    qio(img, "write -P 0x11 0 1M")
    qimg("snapshot", "-c", "one", img)
    kimg("resize", img, "+3M")
    assert qimg("info", "--output=json", img).stdout.count('"virtual-size": 4194304') == 1
    qio(img, "write -P 0x22 1536k 64k", "write -P 0x33 0 4k")
    qimg("snapshot", "-c", "two", img)
    qimg("check", img)
    listing = qimg("snapshot", "-l", img).stdout
    assert " one " in listing and " two " in listing
    assert _snapshot_bytes(img, "one", tmp_path / "one.raw")[:1 * MiB] == b"\x11" * MiB
    two = _snapshot_bytes(img, "two", tmp_path / "two.raw")
    assert two[:4096] == b"\x33" * 4096 and two[4096:MiB] == b"\x11" * (MiB - 4096)
    assert two[MiB:1536 * 1024] == bytes(512 * 1024) and two[1536 * 1024:1600 * 1024] == b"\x22" * 65536
    # shrinking under a snapshot copies the shared tables, never clears them in place
    kimg("resize", "--shrink", img, "512K")
    qimg("check", img)
    assert _snapshot_bytes(img, "two", tmp_path / "two-after.raw")[:512 * 1024] == two[:512 * 1024]
    # applying a snapshot brings its own size back, as qemu-img snapshot -a does
    kimg("snapshot", "-a", "two", img)
    qimg("check", img)
    qimg("convert", "-O", "raw", img, tmp_path / "active.raw")
    assert (tmp_path / "active.raw").read_bytes() == two
    kimg("snapshot", "-a", "one", img)
    qimg("check", img)
    assert "(1048576 bytes)" in qimg("info", img).stdout


def test_v2_image_with_snapshots_refused_as_qemu_img(tmp_path):
    img = tmp_path / "v2.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", img, "1M")
    qimg("snapshot", "-c", "s", img)
    theirs = qimg("resize", img, "+1M", rc=1).stderr
    assert "v2 image which has snapshots" in theirs
    r = kimg("resize", img, "+1M", rc=2)
    assert "v2 (compat=0.10) image which has snapshots" in r.stderr and len(r.stderr.splitlines()) == 1
    qimg("check", img)
