"""Internal qcow2 snapshots (`kvmpy img snapshot -c/-a/-d/-l`), checked with the real qemu-img."""

import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.block import open_image
from kvmpy.block.qcow2 import Qcow2Driver, create_qcow2
from kvmpy.block.snapshot import apply_snapshot, create_snapshot, delete_snapshot
from support.qemu_utils import MISSING_REASON, QEMU_IMG, MiB, kimg, qio

if MISSING_REASON:
    pytest.skip(MISSING_REASON, allow_module_level=True)


def qemu_check(path):
    r = subprocess.run([QEMU_IMG, "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr
    assert "leaked" not in r.stdout, r.stdout


def qemu_read(path, snapshot=None, out=None):
    """The disk as qemu-img sees it (a snapshot's contents with -l)."""
    out = str(out or path) + ".read.raw"
    argv = [QEMU_IMG, "convert", "-O", "raw"] + (["-l", snapshot] if snapshot else []) + [str(path), out]
    subprocess.run(argv, check=True, capture_output=True)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


def test_create_write_apply_delete_against_qemu_img(tmp_path):
    img = tmp_path / "d.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", img, "16M"], check=True)
    qio(img, "write -P 1 0 3M", "write -c -P 7 8M 64k", "write -z 12M 1M")
    kimg("snapshot", "-c", "base", img)
    qemu_check(img)
    listing = subprocess.run([QEMU_IMG, "snapshot", "-l", img], capture_output=True, text=True).stdout
    assert "base" in listing
    at_base = qemu_read(img)
    assert qemu_read(img, "base") == at_base
    # kvmpy writes after the snapshot: partial clusters, whole clusters, zeroes, over compressed data
    d = open_image(str(img))
    d.pwritev([b"\x03" * 100_000], 5000)
    d.write_zeroes(2 * MiB, MiB)
    d.pwritev([b"\x09" * 4096], 8 * MiB + 512)
    d.discard(0, 64 * 1024)
    d.close()
    qemu_check(img)
    assert qemu_read(img, "base") == at_base          # the snapshot did not move
    now = qemu_read(img)
    assert now[5000:105000] != at_base[5000:105000] and now[8 * MiB + 512:8 * MiB + 4608] == b"\x09" * 4096
    kimg("snapshot", "-c", "second", img)
    kimg("snapshot", "-a", "base", img)
    qemu_check(img)
    assert qemu_read(img) == at_base
    kimg("snapshot", "-d", "1", img)                   # by ID
    qemu_check(img)
    assert qemu_read(img) == at_base and qemu_read(img, "second") == now
    kimg("snapshot", "-a", "second", img)
    kimg("snapshot", "-d", "second", img)
    qemu_check(img)
    assert qemu_read(img) == now
    assert kimg("snapshot", "-l", img).stdout == ""


def test_snapshots_made_by_qemu_img(tmp_path):
    img = tmp_path / "q.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "4M"], check=True)
    qio(img, "write -P 0x11 0 1M")
    subprocess.run([QEMU_IMG, "snapshot", "-c", "q1", img], check=True)
    qio(img, "write -P 0x22 512k 1M")
    first = qemu_read(img, "q1")
    kimg("snapshot", "-a", "q1", img)
    qemu_check(img)
    assert qemu_read(img) == first
    kimg("snapshot", "-d", "q1", img)
    qemu_check(img)
    r = subprocess.run([QEMU_IMG, "snapshot", "-l", img], capture_output=True, text=True)
    assert "q1" not in r.stdout


def test_bad_requests_are_one_line_exit_2(tmp_path):
    img = tmp_path / "e.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", img, "4M"], check=True)
    kimg("snapshot", "-c", "s", img)
    before = img.read_bytes()
    for args, text in ((("-c", "s"), "already exists"), (("-a", "nope"), "no snapshot"),
                       (("-d", "nope"), "no snapshot"), ((), "exactly one")):
        r = kimg("snapshot", *args, img, rc=2)
        assert text in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert img.read_bytes() == before
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(4096))
    assert "no internal snapshots" in kimg("snapshot", "-c", "x", raw, rc=2).stderr


# ----------------------------------------------------------- random sequences vs a model

ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 255 * 1024), st.integers(1, 20_000), st.integers(1, 255)),
    st.tuples(st.just("zero"), st.integers(0, 63), st.integers(1, 8)),   # in 4 KiB clusters
    st.tuples(st.just("snap")),
    st.tuples(st.just("apply"), st.integers(0, 7)),
    st.tuples(st.just("delete"), st.integers(0, 7)),
), min_size=1, max_size=14)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops)
def test_random_snapshot_sequences(tmp_path, seq):
    size = 256 * 1024
    path = str(tmp_path / "h.qcow2")
    if os.path.exists(path):
        os.unlink(path)
    create_qcow2(path, size, cluster_size=4096)
    model = bytearray(size)
    snaps: dict[str, bytes] = {}
    n = 0
    d = Qcow2Driver(path)
    try:
        for op in seq:
            if op[0] == "write":
                _, off, length, byte = op
                length = min(length, size - off)
                d.pwritev([bytes([byte]) * length], off)
                model[off:off + length] = bytes([byte]) * length
            elif op[0] == "zero":
                off, length = op[1] * 4096, min(op[2] * 4096, size - op[1] * 4096)
                d.write_zeroes(off, length, may_unmap=True)
                model[off:off + length] = bytes(length)
            elif op[0] == "snap":
                n += 1
                create_snapshot(d, f"s{n}")
                snaps[f"s{n}"] = bytes(model)
            elif snaps:
                name = sorted(snaps)[op[1] % len(snaps)]
                if op[0] == "apply":
                    apply_snapshot(d, name)
                    model[:] = snaps[name]
                else:
                    delete_snapshot(d, name)
                    del snaps[name]
            assert d.pread(size, 0) == bytes(model)
    finally:
        d.close()
    qemu_check(path)
    assert qemu_read(path) == bytes(model)
    for name, data in snaps.items():
        assert qemu_read(path, name) == data
