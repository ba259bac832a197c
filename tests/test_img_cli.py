"""`kvmpy img` subcommands, cross-checked with the real qemu-img."""

import json
import os
import subprocess
import sys

import pytest

from kvmpy.block import open_image
from kvmpy.block.imgcli import parse_size
from support.qemu_utils import MISSING_REASON, QEMU_IMG, ROOT, MiB, kimg, qio

if MISSING_REASON:
    pytest.skip(MISSING_REASON, allow_module_level=True)


def qimg(*args, rc=0):
    r = subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True)
    assert r.returncode == rc, r.stdout + r.stderr
    return r


def test_parse_size():
    assert parse_size("4G") == 4 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("1024") == 1024
    assert parse_size("1.5k") == 1536
    assert parse_size("+10G", allow_sign=True) == ("+", 10 << 30)
    for bad in ("", "x", "4Q", "-1"):
        with pytest.raises(Exception):
            parse_size(bad)


def test_create_and_info_match_qemu(tmp_path):
    p = tmp_path / "a.qcow2"
    kimg("create", "-f", "qcow2", "-o", "cluster_size=4096", p, "1G")
    ours = json.loads(kimg("info", "--output=json", p).stdout)
    theirs = json.loads(qimg("info", "--output=json", p).stdout)
    for k in ("virtual-size", "format", "cluster-size", "dirty-flag"):
        assert ours[k] == theirs[k], k
    assert ours["format-specific"]["data"]["compat"] == theirs["format-specific"]["data"]["compat"]
    assert json.loads(kimg("info", "--json", p).stdout)["virtual-size"] == 1 << 30
    qimg("check", p)
    r = kimg("create", "-f", "raw", tmp_path / "r.raw", "512M")
    assert os.path.getsize(tmp_path / "r.raw") == 512 * MiB and "Formatting" in r.stdout
    # compat=0.10 produces a version 2 image qemu agrees on.
    kimg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", tmp_path / "v2.qcow2", "64M")
    assert json.loads(qimg("info", "--output=json", tmp_path / "v2.qcow2").stdout)[
        "format-specific"]["data"]["compat"] == "0.10"


def test_backing_chain_info_and_relative_paths(tmp_path):
    base = tmp_path / "base.raw"
    kimg("create", "-f", "raw", base, "16M")
    top = tmp_path / "top.qcow2"
    kimg("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
    chain = json.loads(kimg("info", "--output=json", "--backing-chain", top).stdout)
    assert [c["format"] for c in chain] == ["qcow2", "raw"]
    assert chain[0]["virtual-size"] == 16 * MiB
    assert chain[0]["backing-filename"] == "base.raw"
    qchain = json.loads(qimg("info", "--output=json", "--backing-chain", top).stdout)
    assert len(qchain) == 2 and qchain[0]["backing-filename"] == "base.raw"


def test_check_reports_and_repairs_leaks(tmp_path):
    p = tmp_path / "l.qcow2"
    qimg("create", "-f", "qcow2", p, "16M")
    qio(p, "write -P 1 0 1M")
    # Leak a cluster: bump the refcount of a cluster past the image's end.
    with open_image(str(p)) as d:
        d._prepare_write()
        off = d._alloc_clusters(3)
        os.pwrite(d.fd, b"x" * 3 * d.cluster_size, off)
        d.flush()
    assert qimg("check", p, rc=3).returncode == 3
    r = kimg("check", p, rc=3)
    assert "3 leaked clusters" in r.stdout
    out = json.loads(kimg("check", "--output=json", p, rc=3).stdout)
    assert out["leaks"] == 3
    kimg("check", "-r", "leaks", p)
    qimg("check", p)


def test_resize_grow_and_shrink(tmp_path):
    p = tmp_path / "r.qcow2"
    kimg("create", "-f", "qcow2", p, "10M")
    qio(p, "write -P 3 0 10M")
    kimg("resize", p, "+2G")
    assert json.loads(qimg("info", "--output=json", p).stdout)["virtual-size"] == (10 << 20) + (2 << 30)
    qimg("check", p)
    r = kimg("resize", p, "5M", rc=2)
    assert "--shrink" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = kimg("resize", "--shrink", p, "5M")
    assert "file system" in r.stderr
    qimg("check", p)
    qio(p, "read -P 3 0 5M")
    kimg("resize", p, "8M")
    qio(p, "read -P 3 0 5M", "read -P 0 5M 3M")
    qimg("check", p)
    raw = tmp_path / "r.raw"
    kimg("create", "-f", "raw", raw, "1M")
    kimg("resize", "-f", "raw", raw, "+1M")
    assert os.path.getsize(raw) == 2 * MiB


def test_convert_roundtrip_sparse_and_compressed(tmp_path):
    src = tmp_path / "src.raw"
    qimg("create", "-f", "raw", src, "64M")
    qio(src, "write -P 0x5a 1M 3M", "write -P 7 40M 100k", "write -P 0 50M 1M", fmt="raw")
    q = tmp_path / "o.qcow2"
    r = kimg("convert", "-p", "-f", "raw", "-O", "qcow2", src, q)
    assert "100.00/100%" in r.stdout
    qimg("compare", src, q)
    qimg("check", q)
    # Zero areas (including the explicitly written zeroes) stay unallocated.
    mapped = json.loads(qimg("map", "--output=json", q).stdout)
    data = sum(e["length"] for e in mapped if e["data"])
    assert data <= 3 * MiB + 128 * 1024
    c = tmp_path / "c.qcow2"
    kimg("convert", "-c", "-O", "qcow2", src, c)
    qimg("compare", src, c)
    qimg("check", c)
    assert os.path.getsize(c) < os.path.getsize(q) / 5
    back = tmp_path / "back.raw"
    kimg("convert", "-O", "raw", c, back)
    qimg("compare", "-f", "raw", "-F", "raw", src, back)
    assert os.stat(back).st_blocks * 512 < 8 * MiB
    r = kimg("convert", "-c", "-O", "raw", src, tmp_path / "x", rc=2)
    assert len(r.stderr.strip().splitlines()) == 1


def _depth0_data(path):
    return [(e["start"], e["length"]) for e in json.loads(qimg("map", "--output=json", path).stdout)
            if e["depth"] == 0 and e["data"]]


def test_convert_with_backing_matches_qemu_img(tmp_path):
    base = tmp_path / "base.qcow2"
    qimg("create", "-f", "qcow2", base, "16M")
    qio(base, "write -P 0x55 0 8M")
    src = tmp_path / "src.raw"
    qimg("create", "-f", "raw", src, "16M")
    # the same as the base in places, different (data and zeroes) in others
    qio(src, "write -P 0x55 0 2M", "write -P 0x66 3M 200k", "write -P 0x77 12M 64k", fmt="raw")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    kimg("convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", src, ours)
    qimg("convert", "-O", "qcow2", "-B", base, "-F", "qcow2", src, theirs)
    qimg("check", ours)
    qimg("compare", "-F", "raw", ours, src)
    info = json.loads(qimg("info", "--output=json", ours).stdout)
    assert info["backing-filename"] == "base.qcow2" and info["backing-filename-format"] == "qcow2"
    # qemu-img copies every allocated source cluster; kvmpy also leaves to the backing
    # file the clusters that already read the same through it (the first 2 MiB)
    assert _depth0_data(ours) == [(3 * MiB, 256 * 1024), (12 * MiB, 64 * 1024)]
    assert _depth0_data(theirs) == [(0, 2 * MiB)] + _depth0_data(ours)
    # zeroes over the base's data read as zeroes (zero clusters, not the base's 0x55)
    assert open_image(str(ours), read_only=True).pread(4096, 6 * MiB) == bytes(4096)
    r = kimg("convert", "-B", base, src, tmp_path / "x.raw", rc=2)
    assert "needs -O qcow2" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_convert_into_existing_target_and_sparse_size(tmp_path):
    src = tmp_path / "src.raw"
    qimg("create", "-f", "raw", src, "8M")
    qio(src, "write -P 0x5a 1M 300k", "write -P 9 7M 4k", fmt="raw")
    junk = tmp_path / "junk.raw"
    junk.write_bytes(os.urandom(8 * MiB))
    kimg("convert", "-n", src, junk)                    # the target's old data must not show through
    qimg("compare", "-f", "raw", "-F", "raw", src, junk)
    assert os.stat(junk).st_blocks * 512 < 2 * MiB      # zero runs became holes again
    tgt = tmp_path / "tgt.qcow2"
    qimg("create", "-f", "qcow2", tgt, "16M")
    qio(tgt, "write -P 0x11 0 16M")
    kimg("convert", "-n", "-O", "qcow2", src, tgt)
    qimg("check", tgt)
    assert open_image(str(tgt), read_only=True).pread(8 * MiB, 0) == src.read_bytes()
    # -S 0: everything allocated, contents equal
    full = tmp_path / "full.raw"
    kimg("convert", "-S", "0", src, full)
    assert os.stat(full).st_blocks * 512 >= 8 * MiB and full.read_bytes() == src.read_bytes()
    small = tmp_path / "small.raw"
    qimg("create", "-f", "raw", small, "1M")
    r = kimg("convert", "-n", src, small, rc=2)
    assert "smaller" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = kimg("convert", "-S", "1000", src, tmp_path / "y.raw", rc=2)
    assert "-S" in r.stderr
    r = kimg("convert", "-n", src, tmp_path / "missing.raw", rc=2)
    assert "not found" in r.stderr


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_create_qcow2_preallocation_matches_qemu_img(tmp_path, mode):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    kimg("create", "-f", "qcow2", "-o", f"preallocation={mode}", ours, "64M")
    qimg("create", "-f", "qcow2", "-o", f"preallocation={mode}", theirs, "64M")
    qimg("check", ours)
    ours_map = json.loads(qimg("map", "--output=json", ours).stdout)
    assert ours_map == json.loads(qimg("map", "--output=json", theirs).stdout)
    assert ours_map[0]["data"] and ours_map[0]["length"] == 64 * MiB
    assert os.path.getsize(ours) == os.path.getsize(theirs)
    used = os.stat(ours).st_blocks * 512
    assert (used < 4 * MiB) if mode == "metadata" else (used >= 64 * MiB)
    with open_image(str(ours)) as d:
        assert d.pread(MiB, 63 * MiB) == bytes(MiB)
        d.pwritev([b"\x42" * 1000], 5 * MiB + 7)
    qimg("check", ours)
    qio(ours, "read -P 0x42 5242887 1000")
    r = kimg("create", "-f", "qcow2", "-o", f"preallocation={mode}", "-b", ours, "-F", "qcow2",
             tmp_path / "top.qcow2", rc=2)
    assert "backing" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_rebase_safe_and_unsafe(tmp_path):
    old = tmp_path / "old.raw"
    new = tmp_path / "new.raw"
    old.write_bytes(b"\x01" * MiB + b"\x02" * MiB)
    new.write_bytes(b"\x01" * MiB + b"\x09" * MiB)
    top = tmp_path / "top.qcow2"
    kimg("create", "-f", "qcow2", "-b", "old.raw", "-F", "raw", top)
    qio(top, "write -P 4 0 64k")
    before = subprocess.run([QEMU_IMG, "convert", "-O", "raw", top, tmp_path / "before.raw"], check=True)
    kimg("rebase", "-b", "new.raw", "-F", "raw", top)
    qimg("check", top)
    qimg("compare", "-F", "raw", top, tmp_path / "before.raw")
    info = json.loads(qimg("info", "--output=json", top).stdout)
    assert info["backing-filename"] == "new.raw"
    # Only the differing second MiB was copied in (plus the overlay's own cluster).
    alloc = [e for e in json.loads(qimg("map", "--output=json", top).stdout) if e["depth"] == 0 and e["data"]]
    assert sum(e["length"] for e in alloc) == MiB + 65536
    kimg("rebase", "-u", "-b", "old.raw", "-F", "raw", top)
    assert json.loads(qimg("info", "--output=json", top).stdout)["backing-filename"] == "old.raw"
    kimg("rebase", "-b", "", top)
    assert "backing-filename" not in json.loads(qimg("info", "--output=json", top).stdout)
    qimg("compare", "-F", "raw", top, tmp_path / "before.raw")


def test_commit(tmp_path):
    base = tmp_path / "base.qcow2"
    qimg("create", "-f", "qcow2", base, "8M")
    qio(base, "write -P 1 0 8M")
    top = tmp_path / "top.qcow2"
    qimg("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qio(top, "write -P 2 1M 100k", "write -z 4M 64k")
    expect = tmp_path / "expect.raw"
    qimg("convert", "-O", "raw", top, expect)
    r = kimg("commit", top)
    assert "Image committed." in r.stdout
    qimg("check", base)
    qimg("check", top)
    qimg("compare", "-F", "raw", base, expect)
    qimg("compare", "-F", "raw", top, expect)
    assert not [e for e in json.loads(qimg("map", "--output=json", top).stdout) if e["depth"] == 0]


def test_map_matches_qemu(tmp_path):
    base = tmp_path / "b.qcow2"
    qimg("create", "-f", "qcow2", base, "8M")
    qio(base, "write -P 1 0 1M", "write -P 2 5M 64k")
    top = tmp_path / "t.qcow2"
    qimg("create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", top)
    qio(top, "write -P 3 512k 64k", "write -z 5M 64k")
    ours = json.loads(kimg("map", "--output=json", top).stdout)
    theirs = json.loads(qimg("map", "--output=json", top).stdout)
    strip = lambda es: [{k: e[k] for k in ("start", "length", "depth", "present", "zero", "data", "offset")
                         if k in e} for e in es]
    assert strip(ours) == strip(theirs)
    assert "Mapped to" in kimg("map", top).stdout


def test_snapshot_list(tmp_path):
    p = tmp_path / "s.qcow2"
    qimg("create", "-f", "qcow2", p, "4M")
    qimg("snapshot", "-c", "first", p)
    qimg("snapshot", "-c", "second", p)
    out = kimg("snapshot", "-l", p).stdout
    assert "first" in out and "second" in out and "Snapshot list" in out
    assert len(json.loads(kimg("info", "--output=json", p).stdout)["snapshots"]) == 2


@pytest.mark.parametrize("argv", [
    ["create", "-f", "vmdk", "x", "1M"],
    ["create", "-f", "qcow2", "x", "12Q"],
    ["create", "-f", "qcow2", "-o", "cluster_size=1000", "x", "1M"],
    ["create", "-f", "qcow2", "-o", "bogus=1", "x", "1M"],
    ["info", "nonexistent.img"],
    ["info", "--output=xml", "x"],
    ["resize", "nonexistent.img", "+1G"],
    ["convert", "-O", "qcow2"],
    ["check", "-r", "everything", "x"],
    ["frobnicate"],
])
def test_bad_input_is_one_line_exit_2(tmp_path, argv):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "kvmpy", "img", *argv], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
