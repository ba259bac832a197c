"""The qcow2 overlap check: no write through the driver ever lands on metadata.

Corrupt tables are how a VMM destroys an image: refcounts that call a table free
hand it out as a data cluster, an L2 entry that points at a table turns guest
writes into table writes. QEMU refuses such writes ("Preventing invalid write on
metadata") and marks the image corrupt; so must we.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from conftest import run_kvmpy, tool_required
from kvmpy.block import open_image
from kvmpy.block.qcow2_format import (INCOMPAT_CORRUPT, L1E_OFFSET_MASK, L1E_RESERVED, L2E_OFFSET_MASK,
                                      L2E_STD_RESERVED, OFLAG_COMPRESSED, RT_RESERVED)
from kvmpy.errors import ImageError

FUZZ = bool(os.environ.get("KVMPY_FUZZ"))


def zero_first_refcount_block(path) -> None:
    with open(path, "r+b") as f:
        f.seek(48)
        rt = struct.unpack(">Q", f.read(8))[0]
        cs = 1 << struct.unpack(">I", (f.seek(20), f.read(4))[1])[0]
        f.seek(rt)
        rb = struct.unpack(">Q", f.read(8))[0]
        f.seek(rb)
        f.write(bytes(cs))


def qemu_info(qemu_img, path) -> dict:
    out = subprocess.run([qemu_img, "info", "--output=json", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_snapshot_over_zeroed_refcounts_is_refused(tmp_path):
    """Issue 15's reproducer: before the check, the snapshot's L1 copy went to cluster 0."""
    qemu_img = tool_required("qemu-img")
    raw = tmp_path / "a.raw"
    raw.write_bytes(random.Random(15).randbytes(2 << 20))
    img = tmp_path / "x.qcow2"
    subprocess.run([qemu_img, "convert", "-O", "qcow2", "-o", "cluster_size=4096", str(raw), str(img)], check=True)
    zero_first_refcount_block(img)
    before = img.read_bytes()
    p = run_kvmpy(["img", "snapshot", "-c", "s", str(img)])
    err = p.stderr.decode()
    assert p.returncode == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"kvmpy: {img}: preventing invalid write on metadata: host offset 0 ")
    assert "qcow2 header" in err
    after = img.read_bytes()
    # Only the corrupt bit changed, and nowhere else in the file.
    incompat = struct.unpack(">Q", before[72:80])[0]
    assert struct.unpack(">Q", after[72:80])[0] == incompat | INCOMPAT_CORRUPT
    assert after[:72] == before[:72] and after[80:] == before[80:]
    info = qemu_info(qemu_img, img)
    assert info["format"] == "qcow2"
    assert info["format-specific"]["data"]["corrupt"] is True
    assert "snapshots" not in info
    # Still writable only after a repair, which still works, and then the snapshot works.
    p = run_kvmpy(["img", "snapshot", "-c", "s", str(img)])
    assert p.returncode == 2 and "marked corrupt" in p.stderr.decode()
    p = run_kvmpy(["img", "check", "-r", "all", str(img)])
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
    assert subprocess.run([qemu_img, "check", str(img)], capture_output=True).returncode == 0
    p = run_kvmpy(["img", "snapshot", "-c", "s", str(img)])
    assert p.returncode == 0, p.stderr.decode()
    assert subprocess.run([qemu_img, "check", str(img)], capture_output=True).returncode == 0
    assert [s["name"] for s in qemu_info(qemu_img, img)["snapshots"]] == ["s"]
    flat = tmp_path / "flat.raw"
    subprocess.run([qemu_img, "convert", "-O", "raw", str(img), str(flat)], check=True)
    assert flat.read_bytes() == raw.read_bytes()


def test_guest_write_through_l2_entry_pointing_at_refcount_table(tmp_path):
    """An L2 entry aimed at a table makes a plain in-place write a table write."""
    qemu_img = tool_required("qemu-img")
    img = tmp_path / "d.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "1M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 4k", str(img)], check=True, capture_output=True)
    h = img.read_bytes()[:104]
    l1_off, rt_off = struct.unpack(">Q", h[40:48])[0], struct.unpack(">Q", h[48:56])[0]
    with open(img, "r+b") as f:
        f.seek(l1_off)
        l2_off = struct.unpack(">Q", f.read(8))[0] & L1E_OFFSET_MASK
        f.seek(l2_off)
        f.write(struct.pack(">Q", rt_off | (1 << 63)))
    before = img.read_bytes()
    with open_image(str(img), format="qcow2") as d:
        with pytest.raises(ImageError, match=r"host offset %d .*overlaps the refcount table" % rt_off):
            d.pwrite(b"\xaa" * 512, 0)
        with pytest.raises(ImageError, match="marked corrupt"):
            d.pwrite(b"\xaa" * 512, 65536)
    after = img.read_bytes()
    assert after[rt_off:rt_off + 4096] == before[rt_off:rt_off + 4096]
    assert after[80:] == before[80:]
    assert qemu_info(qemu_img, img)["format-specific"]["data"]["corrupt"] is True


def test_read_only_open_is_never_marked(tmp_path):
    qemu_img = tool_required("qemu-img")
    img = tmp_path / "d.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "1M"], check=True)
    zero_first_refcount_block(img)
    before = img.read_bytes()
    with open_image(str(img), format="qcow2", read_only=True) as d:
        assert d.pread(4096, 0) == bytes(4096)
    assert img.read_bytes() == before


# ---------------------------------------------------------------- the property

CS = 512          # small clusters: many L2 tables and refcount blocks in a tiny file
VSIZE = 256 << 10


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A small image with data, an internal snapshot (inactive L1/L2) and more data after it."""
    qemu_img = tool_required("qemu-img")
    tool_required("qemu-io")
    d = tmp_path_factory.mktemp("overlap")
    img = d / "t.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", str(img), str(VSIZE)],
                   check=True)
    for cmd in ("write -P 0x51 0 40k", "write -P 0x52 100k 30k", "write -P 0x53 200k 8k"):
        subprocess.run(["qemu-io", "-c", cmd, str(img)], check=True, capture_output=True)
    subprocess.run([qemu_img, "snapshot", "-c", "snap1", str(img)], check=True)
    for cmd in ("write -P 0x61 16k 16k", "write -P 0x62 150k 20k"):
        subprocess.run(["qemu-io", "-c", cmd, str(img)], check=True, capture_output=True)
    assert subprocess.run([qemu_img, "check", str(img)], capture_output=True).returncode == 0
    return img       # a path: Hypothesis prints the arguments of a failing example


def u64(b, off):
    return struct.unpack_from(">Q", b, off)[0]


def metadata_layout(img: bytes) -> dict:
    """cluster index -> set of kinds, parsed here independently of the driver.

    Follows the (possibly corrupted) tables exactly as a reader would, so that a
    cluster the corruption made both "an L2 table" and "a refcount block" is both."""
    kinds: dict[int, set] = {}
    size = len(img)

    def add(off, length, kind):
        if length <= 0 or off + length > size:
            return
        for c in range(off // CS, -(-(off + length) // CS)):
            kinds.setdefault(c, set()).add(kind)

    add(0, CS, "header")
    l1_size, l1_off = struct.unpack_from(">IQ", img, 36)
    rt_off, rt_clusters, nb_snap, snap_off = struct.unpack_from(">QIIQ", img, 48)
    add(l1_off, l1_size * 8, "l1")
    for i in range(l1_size):
        off = u64(img, l1_off + 8 * i) & L1E_OFFSET_MASK
        if off and off % CS == 0:
            add(off, CS, "l2")
    add(rt_off, rt_clusters * CS, "reftable")
    for i in range(rt_clusters * CS // 8):
        off = u64(img, rt_off + 8 * i)
        if off and off % CS == 0:
            add(off, CS, "refblock")
    pos = snap_off
    for _ in range(nb_snap):
        s_l1_off, s_l1_size, id_len, name_len = struct.unpack_from(">QIHH", img, pos)
        extra = struct.unpack_from(">I", img, pos + 36)[0]
        total = 40 + extra + id_len + name_len
        add(pos, total, "snaptable")
        add(s_l1_off, s_l1_size * 8, "snap_l1")
        for i in range(s_l1_size):
            off = u64(img, s_l1_off + 8 * i) & L1E_OFFSET_MASK
            if off and off % CS == 0:
                add(off, CS, "snap_l2")
        pos += total + (-total) % 8
    return kinds


def assert_metadata_intact(before: bytes, after: bytes, kinds: dict, overlap_refused: bool) -> None:
    """Every metadata cluster is unchanged or changed only as the driver itself changes it.

    The writes below are random bytes, so data landing on a table shows as reserved
    bits, misaligned offsets, offsets past the file or absurd refcounts."""
    end = len(after)
    for c, ks in sorted(kinds.items()):
        a, b = before[c * CS:(c + 1) * CS], after[c * CS:(c + 1) * CS]
        if a == b:
            continue
        where = f"cluster {c} ({', '.join(sorted(ks))})"
        # The driver never rewrites these during guest writes.
        assert not ks & {"snaptable", "snap_l1"}, where
        if "snap_l2" in ks:
            assert "l2" in ks, where      # only shared tables (their COPIED flags) may change
        if "header" in ks:
            assert c == 0 and a[:72] == b[:72] and a[80:] == b[80:], where
            assert u64(b, 72) == u64(a, 72) | INCOMPAT_CORRUPT and overlap_refused, where
            continue
        entries = [u64(b, i) for i in range(0, CS, 8)]
        old = [u64(a, i) for i in range(0, CS, 8)]
        changed = [e for e, o in zip(entries, old) if e != o]
        if "l1" in ks:
            for e in changed:
                off = e & L1E_OFFSET_MASK
                assert not e & L1E_RESERVED and off % CS == 0 and off < end, (where, hex(e))
        if "l2" in ks or "snap_l2" in ks:
            for e in changed:
                off = e & L2E_OFFSET_MASK
                assert not e & (L2E_STD_RESERVED | OFLAG_COMPRESSED) and off % CS == 0 and off < end, \
                    (where, hex(e))
        if "reftable" in ks:
            for e in changed:
                assert not e & RT_RESERVED and e % CS == 0 and e < end, (where, hex(e))
        if "refblock" in ks:
            # 16-bit refcounts: the template's are at most 2, corruptions below at most 3,
            # and a guest write adds or drops a handful.
            counts = struct.unpack(f">{CS // 2}H", b)
            assert max(counts) <= 16, (where, max(counts))


corruption = st.tuples(st.sampled_from(["refcount", "l2", "l1"]), st.integers(0, 10**9),
                       st.sampled_from(["zero", "metadata", "random"]))
io_op = st.tuples(st.sampled_from(["write", "write", "write", "zeroes", "discard"]),
                  st.integers(0, VSIZE - 1), st.integers(1, 24 << 10))


@settings(max_examples=300 if FUZZ else 40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])
@given(corruptions=st.lists(corruption, min_size=1, max_size=4), ops=st.lists(io_op, min_size=1, max_size=12),
       seed=st.integers(0, 2**32 - 1))
def test_random_corruption_then_writes_never_touch_metadata(template, tmp_path, corruptions, ops, seed):
    rnd = random.Random(seed)
    img = bytearray(template.read_bytes())
    kinds = metadata_layout(bytes(img))
    meta_clusters = sorted(kinds)
    by_kind = {}
    for c, ks in kinds.items():
        for k in ks:
            by_kind.setdefault(k, []).append(c)
    for where, pick, how in corruptions:
        if where == "refcount":
            # A refcount entry of a table or data cluster: zero makes the allocator hand it out.
            blk = by_kind["refblock"][pick % len(by_kind["refblock"])]
            i = pick // 7 % (CS // 2)
            struct.pack_into(">H", img, blk * CS + 2 * i, 0 if how != "random" else pick % 4)
        else:
            table = by_kind["l2" if where == "l2" else "l1"]
            c = table[pick % len(table)]
            n = CS // 8 if where == "l2" else struct.unpack_from(">I", img, 36)[0]
            at = c * CS + 8 * (pick // 13 % n) if where == "l2" else struct.unpack_from(">Q", img, 40)[0] + \
                8 * (pick // 13 % n)
            if how == "zero":
                target = 0
            elif how == "metadata":
                target = meta_clusters[pick // 31 % len(meta_clusters)] * CS
            else:
                target = (pick // 31 % (len(img) // CS)) * CS
            struct.pack_into(">Q", img, at, target | (1 << 63) if target else 0)
    path = tmp_path / "c.qcow2"
    path.write_bytes(img)
    kinds = metadata_layout(bytes(img))       # the corrupted tables are what must be protected
    refused = False
    try:
        d = open_image(str(path), format="qcow2")
    except ImageError:
        event("refused at open")
        assert path.read_bytes() == bytes(img)
        return
    try:
        for op, off, length in ops:
            length = min(length, VSIZE - off)
            try:
                if op == "write":
                    d.pwrite(rnd.randbytes(length), off)
                elif op == "zeroes":
                    d.write_zeroes(off, length)
                else:
                    d.discard(off, length)
            except ImageError as e:
                refused = refused or "preventing invalid write on metadata" in str(e)
        try:
            d.flush()
        except ImageError as e:
            refused = refused or "preventing invalid write on metadata" in str(e)
    finally:
        try:
            d.close()
        except ImageError as e:
            refused = refused or "preventing invalid write on metadata" in str(e)
    event("overlap refused" if refused else "written")
    assert_metadata_intact(bytes(img), path.read_bytes(), kinds, refused)
