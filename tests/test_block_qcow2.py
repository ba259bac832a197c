"""qcow2 and raw drivers against the real qemu-img / qemu-io (Debian qemu-utils)."""

import os
import random
import shutil
import subprocess

import pytest

from kvmpy.block import open_image
from kvmpy.block.qcow2 import create_qcow2
from kvmpy.errors import ImageError
from support.qemu_utils import MISSING_REASON, QEMU_IMG, QEMU_IO, MiB, run_qemu_io

needs_qemu = pytest.mark.skipif(MISSING_REASON is not None, reason=str(MISSING_REASON))


def qimg(*args, check=True):
    r = subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(f"qemu-img {' '.join(map(str, args))}: rc={r.returncode}\n{r.stdout}{r.stderr}")
    return r


def qio(path, *cmds, fmt="qcow2"):
    r = run_qemu_io(path, *cmds, fmt=fmt)
    assert r.returncode == 0 and "error" not in r.stdout.lower() + r.stderr.lower(), r.stdout + r.stderr
    return r.stdout


def qcheck(path):
    r = qimg("check", path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found" in r.stdout


def read_all(path, fmt=None):
    with open_image(str(path), fmt, read_only=True) as d:
        return d.pread(d.size, 0)


def qemu_read_all(path, tmp_path, fmt="qcow2"):
    out = tmp_path / "qemu-export.raw"
    qimg("convert", "-f", fmt, "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


# ------------------------------------------------------------- raw driver

def test_raw_roundtrip_and_sparse(tmp_path):
    p = tmp_path / "r.img"
    with open(p, "wb") as f:
        f.truncate(4 * MiB)
    with open_image(str(p)) as d:
        assert (d.format, d.size) == ("raw", 4 * MiB)
        buf = bytearray(os.urandom(12288))
        assert d.pwritev([memoryview(buf)[:5000], memoryview(buf)[5000:]], 8192) == 12288
        out = bytearray(12288)
        assert d.preadv([memoryview(out)[:100], memoryview(out)[100:]], 8192) == 12288
        assert out == buf
        d.discard(8192, 4096)
        assert d.pread(4096, 8192) == bytes(4096)
        d.write_zeroes(12288, 4096, may_unmap=False)
        assert d.pread(4096, 12288) == bytes(4096)
        assert d.pread(100, 16384) == bytes(buf[8192:8292])
        d.flush()
        with pytest.raises(ImageError):
            d.preadv([memoryview(bytearray(10))], 4 * MiB - 5)
    assert os.stat(p).st_blocks * 512 < MiB


def test_raw_read_only_refuses_writes(tmp_path):
    p = tmp_path / "r.img"
    p.write_bytes(b"x" * 4096)
    with open_image(str(p), read_only=True) as d:
        with pytest.raises(ImageError, match="read-only"):
            d.pwrite(b"y", 0)
        with pytest.raises(ImageError, match="read-only"):
            d.discard(0, 512)
    assert p.read_bytes() == b"x" * 4096


def test_missing_and_unknown_format(tmp_path):
    with pytest.raises(ImageError, match="nope.img"):
        open_image(str(tmp_path / "nope.img"))
    (tmp_path / "a").write_bytes(b"abc")
    with pytest.raises(ImageError, match="unknown image format 'vhdx'"):
        open_image(str(tmp_path / "a"), "vhdx")
    with pytest.raises(ImageError, match="no KDMV magic|vmdk image without a sparse header"):
        open_image(str(tmp_path / "a"), "vmdk", read_only=True)     # read-only vmdk: this is none


# --------------------------------------------------- images kvmpy writes

@needs_qemu
@pytest.mark.parametrize("cluster_size", [512, 65536, 2 * MiB])
@pytest.mark.parametrize("version", [2, 3])
def test_kvmpy_written_image_passes_qemu_check(tmp_path, cluster_size, version):
    p = tmp_path / "k.qcow2"
    size = 48 * MiB
    create_qcow2(str(p), size, cluster_size=cluster_size, version=version)
    qcheck(p)
    model = bytearray(size)
    rng = random.Random(cluster_size + version)
    with open_image(str(p)) as d:
        for i in range(60):
            off = rng.randrange(0, size - 1)
            n = min(rng.randrange(1, 300000), size - off)
            data = rng.randbytes(n)
            d.pwrite(data, off)
            model[off:off + n] = data
            if i % 7 == 0:
                zo = rng.randrange(0, size - 1)
                zn = min(rng.randrange(1, 3 * cluster_size), size - zo)
                d.write_zeroes(zo, zn, may_unmap=bool(i % 2))
                model[zo:zo + zn] = bytes(zn)
            if i % 11 == 0:
                d.flush()
        assert d.pread(size, 0) == model
    qcheck(p)
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    assert qimg("compare", "-f", "raw", "-F", "qcow2", raw, p, check=False).returncode == 0


@needs_qemu
def test_refcount_table_growth_small_clusters(tmp_path):
    """512 B clusters: one refcount table cluster covers only 8 MiB, so it must grow."""
    p = tmp_path / "g.qcow2"
    create_qcow2(str(p), 64 * MiB, cluster_size=512)
    with open_image(str(p)) as d:
        chunk = os.urandom(MiB)
        for k in range(24):
            d.pwrite(chunk, k * 2 * MiB)
        assert d.header.refcount_table_clusters > 1
    qcheck(p)
    assert qemu_read_all(p, tmp_path)[22 * MiB:23 * MiB] == chunk


@needs_qemu
@pytest.mark.parametrize("refcount_bits", [1, 2, 8, 16, 64])
def test_other_refcount_widths(tmp_path, refcount_bits):
    p = tmp_path / "w.qcow2"
    qimg("create", "-f", "qcow2", "-o", f"refcount_bits={refcount_bits},cluster_size=4096", p, "16M")
    qio(p, "write -P 0x44 0 100k")
    with open_image(str(p)) as d:
        assert d.refcount_bits == refcount_bits
        assert d.pread(4, 0) == b"DDDD"
        d.pwrite(b"\x55" * 300000, 5 * MiB)
        d.discard(0, 65536)
    qcheck(p)
    qio(p, "read -P 0x55 5M 300000", "read -P 0 0 64k", "read -P 0x44 64k 36k")


@needs_qemu
def test_overlay_cow_and_relative_backing(tmp_path):
    base = tmp_path / "base.qcow2"
    qimg("create", "-f", "qcow2", base, "8M")
    qio(base, "write -P 0xaa 0 8M")
    sub = tmp_path / "sub"
    sub.mkdir()
    shutil.copy(base, sub / "base.qcow2")
    top = sub / "top.qcow2"
    # Relative name: resolved against the overlay's directory, not the cwd.
    qimg("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    with open_image(str(top)) as d:
        d.pwrite(b"\x01" * 10, 65536 + 100)   # COW: the rest of the cluster comes from base
        d.write_zeroes(3 * 65536, 65536)       # zero cluster over non-zero backing
        d.discard(5 * 65536, 65536)
        assert d.pread(65536, 65536) == b"\xaa" * 100 + b"\x01" * 10 + b"\xaa" * (65536 - 110)
    qcheck(top)
    qio(top, "read -P 0xaa 64k 100", "read -P 1 65636 10", "read -P 0xaa 65646 65426",
        "read -P 0 192k 64k", "read -P 0 320k 64k", "read -P 0xaa 384k 64k")
    assert qimg("compare", top, base, check=False).returncode == 1


# --------------------------------------------------- images qemu writes

@needs_qemu
@pytest.mark.parametrize("opts", ["cluster_size=512", "cluster_size=65536", "cluster_size=2M",
                                  "preallocation=metadata", "compat=0.10", "compat=0.10,cluster_size=4096",
                                  "refcount_bits=64"])
def test_qemu_written_images_read_identically(tmp_path, opts):
    p = tmp_path / "q.qcow2"
    qimg("create", "-f", "qcow2", "-o", opts, p, "24M")
    qio(p, "write -P 0x11 0 100k", "write -P 0x22 3M 1M", "write -P 0x33 23M 1M",
        "write -P 0x44 12345 1000")
    if "compat=0.10" not in opts:
        qio(p, "write -z 3M 64k", "write -z -u 23M 512k")
    assert read_all(p) == qemu_read_all(p, tmp_path)


@needs_qemu
def test_compressed_clusters_read(tmp_path):
    raw = tmp_path / "src.raw"
    rng = random.Random(5)
    data = bytearray(8 * MiB)
    for k in range(0, len(data), 65536):
        if rng.random() < 0.6:
            data[k:k + 65536] = bytes([rng.randrange(256)]) * 30000 + rng.randbytes(35536)
    raw.write_bytes(data)
    for cs in ("4096", "65536", "2M"):
        c = tmp_path / f"c{cs}.qcow2"
        qimg("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cs}", raw, c)
        assert read_all(c) == data
        # Overwriting part of a compressed cluster decompresses, merges, reallocates.
        with open_image(str(c)) as d:
            d.pwrite(b"\xee" * 100, 65536 + 7)
        data2 = bytearray(data)
        data2[65536 + 7:65536 + 107] = b"\xee" * 100
        qcheck(c)
        assert qemu_read_all(c, tmp_path) == data2


@needs_qemu
def test_backing_chain_any_depth_mixed_formats(tmp_path):
    base = tmp_path / "base.raw"
    qimg("create", "-f", "raw", base, "4M")
    qio(base, "write -P 1 0 4M", fmt="raw")
    prev, prev_fmt = base, "raw"
    for i in range(5):
        p = tmp_path / f"l{i}.qcow2"
        qimg("create", "-f", "qcow2", "-b", prev.name, "-F", prev_fmt, p)
        qio(p, f"write -P {i + 2} {i * 512}k 64k")
        prev, prev_fmt = p, "qcow2"
    assert read_all(prev) == qemu_read_all(prev, tmp_path)


@needs_qemu
def test_backing_smaller_than_overlay_reads_zero_tail(tmp_path):
    base = tmp_path / "b.qcow2"
    qimg("create", "-f", "qcow2", base, "1M")
    qio(base, "write -P 9 0 1M")
    top = tmp_path / "t.qcow2"
    qimg("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "3M")
    assert read_all(top) == b"\x09" * MiB + bytes(2 * MiB)


def test_backing_loop_and_missing_backing(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create_qcow2(str(a), MiB, backing_file="b.qcow2", backing_format="qcow2")
    create_qcow2(str(b), MiB, backing_file="a.qcow2", backing_format="qcow2")
    with pytest.raises(ImageError, match="loops"):
        open_image(str(a))
    c = tmp_path / "c.qcow2"
    create_qcow2(str(c), MiB, backing_file="gone.qcow2", backing_format="qcow2")
    with pytest.raises(ImageError, match=r"gone.qcow2.*kvmpy img rebase"):
        open_image(str(c))


@needs_qemu
def test_qemu_made_image_with_snapshot_writes_leave_the_snapshot_intact(tmp_path):
    p = tmp_path / "s.qcow2"
    qimg("create", "-f", "qcow2", p, "4M")
    qio(p, "write -P 7 0 64k")
    qimg("snapshot", "-c", "snap1", p)
    qio(p, "write -P 8 0 64k")
    assert read_all(p)[:65536] == b"\x08" * 65536
    with open_image(str(p)) as d:            # shared L2 tables and clusters are copied on write
        d.pwritev([b"\x09" * 512], 4096)
        d.pwritev([b"\x0a" * 512], 1 << 20)
    qimg("check", p)
    snap = tmp_path / "snap.raw"
    qimg("convert", "-l", "snap1", "-O", "raw", p, snap)
    assert snap.read_bytes()[:65536] == b"\x07" * 65536 and snap.read_bytes()[1 << 20:(1 << 20) + 512] == bytes(512)
    now = read_all(p)
    assert now[4096:4608] == b"\x09" * 512 and now[:4096] == b"\x08" * 4096 and now[1 << 20:(1 << 20) + 512] == b"\x0a" * 512


@needs_qemu
def test_dirty_image_is_repaired_on_open(tmp_path):
    """qemu with lazy refcounts leaves the dirty bit set after a crash; kvmpy rebuilds refcounts."""
    p = tmp_path / "d.qcow2"
    qimg("create", "-f", "qcow2", "-o", "lazy_refcounts=on", p, "8M")
    r = subprocess.run([QEMU_IO, "-c", "write -P 5 0 1M", "-c", "abort", str(p)], capture_output=True)
    with open_image(str(p), read_only=True) as d:
        dirty = d.header.incompatible & 1
    assert dirty, "qemu-io abort should leave the dirty bit set"
    with open_image(str(p)) as d:
        assert not d.header.incompatible & 1
        assert d.pread(4, 0) == b"\x05" * 4
        d.pwrite(b"\x06" * 70000, 2 * MiB)
    qcheck(p)
    qio(p, "read -P 5 0 1M", "read -P 6 2M 70000")


def test_concurrent_requests_from_threads(tmp_path):
    """virtio-blk may submit from several threads; the qcow2 caches must stay consistent."""
    import threading
    p = tmp_path / "t.qcow2"
    create_qcow2(str(p), 32 * MiB, cluster_size=4096)
    errors = []
    with open_image(str(p)) as d:
        def worker(k):
            try:
                for i in range(200):
                    off = (k * 200 + i) * 40000
                    d.pwrite(bytes([k + 1]) * 40000, off)
                    assert d.pread(40000, off) == bytes([k + 1]) * 40000
            except Exception as e:  # reported below
                errors.append(e)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    if QEMU_IMG:
        qcheck(p)
