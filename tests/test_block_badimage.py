"""Malformed qcow2 images: ImageError naming the file and the field, exit 2, bytes untouched."""

import contextlib
import hashlib
import io
import os
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.block import open_image
from kvmpy.block.qcow2 import create_qcow2
from kvmpy.cli import main as kvmpy_main
from kvmpy.errors import ImageError

MiB = 1 << 20


def make_image(path, with_data=True):
    create_qcow2(str(path), 4 * MiB, cluster_size=65536)
    if with_data:
        with open_image(str(path)) as d:
            d.pwrite(b"\x42" * 200000, 0)
    return path


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def poke(path, fmt, offset, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def header_field(path, fmt, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def run_cli(*args):
    """The real `kvmpy img` entry point, in-process (a subprocess per case is too slow)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = kvmpy_main(["img", *map(str, args)])
        except SystemExit as e:
            rc = e.code
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def assert_refused(path, field, cli=("info", "check", "map", "convert")):
    before = digest(path)
    for ro in (True, False):
        with pytest.raises(ImageError) as ei:
            d = open_image(str(path), read_only=ro)
            try:
                # Lazily validated structures fail on first use, before any write.
                d.pread(d.size, 0)
                d.pwrite(b"x" * 70000, 0)
            finally:
                d.close()
        msg = str(ei.value)
        assert str(path) in msg and field in msg, msg
        assert "\n" not in msg
    for name in cli:
        cmd = [name, "-O", "raw"] if name == "convert" else [name]
        extra = [str(path) + ".out"] if cmd[0] == "convert" else []
        r = run_cli(*cmd, path, *extra)
        assert r.returncode == 2, (cmd, r.returncode, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and field in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert digest(path) == before


@pytest.mark.parametrize("fmt,offset,value,field", [
    (">I", 4, 4, "version"),
    (">I", 20, 30, "cluster_bits"),
    (">I", 20, 8, "cluster_bits"),
    (">I", 36, 0xFFFFFFFF, "l1_size"),
    (">I", 36, 0, "l1_size"),
    (">Q", 40, 1 << 50, "l1_table_offset"),
    (">Q", 40, 65536 + 512, "l1_table_offset"),
    (">Q", 48, 1 << 50, "refcount_table_offset"),
    (">I", 56, 0xFFFFFFFF, "refcount_table_clusters"),
    (">I", 56, 0, "refcount_table_clusters"),
    (">I", 60, 0xFFFFFFFF, "nb_snapshots"),
    (">Q", 8, 200, "backing_file_size"),
    (">I", 100, 1 << 20, "header_length"),
    (">I", 100, 99, "header_length"),
    (">I", 96, 7, "refcount_order"),
    (">Q", 72, 1 << 40, "unknown feature bit 40"),
    (">Q", 72, 1 << 4, "extended L2"),
    (">I", 32, 1, "encrypted"),
])
def test_bad_header_fields(tmp_path, fmt, offset, value, field):
    p = make_image(tmp_path / "bad.qcow2")
    if field == "backing_file_size":
        poke(p, ">I", 16, 5000)
    poke(p, fmt, offset, value)
    assert_refused(p, field)


def test_truncated_file(tmp_path):
    p = make_image(tmp_path / "t.qcow2")
    with open(p, "r+b") as f:
        f.truncate(50)
    assert_refused(p, "too short")


def test_truncated_before_tables(tmp_path):
    p = make_image(tmp_path / "t.qcow2")
    l1 = header_field(p, ">Q", 40)
    with open(p, "r+b") as f:
        f.truncate(l1)
    assert_refused(p, "outside the file")


def test_l1_entry_out_of_range(tmp_path):
    p = make_image(tmp_path / "l1.qcow2")
    poke(p, ">Q", header_field(p, ">Q", 40), (1 << 63) | (1 << 45))
    assert_refused(p, "L1 entry 0")


def test_l2_entry_out_of_range(tmp_path):
    p = make_image(tmp_path / "l2.qcow2")
    l2 = header_field(p, ">Q", header_field(p, ">Q", 40)) & 0x00FFFFFFFFFFFE00
    poke(p, ">Q", l2 + 8, (1 << 63) | (1 << 45))
    # Like qemu-img, info does not read L2 tables and check reports (not refuses) them.
    assert_refused(p, "guest cluster 1", cli=("map", "convert"))


def test_l2_entry_unaligned(tmp_path):
    p = make_image(tmp_path / "l2u.qcow2")
    l2 = header_field(p, ">Q", header_field(p, ">Q", 40)) & 0x00FFFFFFFFFFFE00
    poke(p, ">Q", l2, (1 << 63) | (65536 * 5 + 512))
    assert_refused(p, "not cluster aligned", cli=("map", "convert"))
    r = run_cli("check", p)
    assert r.returncode == 2 and "unaligned" in r.stderr


def test_refcount_block_out_of_range(tmp_path):
    p = make_image(tmp_path / "rc.qcow2")
    poke(p, ">Q", header_field(p, ">Q", 48), 1 << 45)
    assert_refused(p, "refcount table entry 0")


def test_backing_loop_cli(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create_qcow2(str(a), MiB, backing_file="b.qcow2", backing_format="qcow2")
    create_qcow2(str(b), MiB, backing_file="a.qcow2", backing_format="qcow2")
    r = run_cli("map", a)
    assert r.returncode == 2 and "loops" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("info", "--backing-chain", a)
    assert r.returncode == 2 and "loops" in r.stderr


def test_missing_backing_cli_and_unsafe_rebase_fixes_it(tmp_path):
    c = tmp_path / "c.qcow2"
    create_qcow2(str(c), MiB, backing_file="gone.raw", backing_format="raw")
    r = run_cli("convert", "-O", "raw", c, tmp_path / "o.raw")
    assert r.returncode == 2 and "kvmpy img rebase" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "new.raw").write_bytes(b"\x07" * MiB)
    r = run_cli("rebase", "-u", "-b", "new.raw", "-F", "raw", c)
    assert r.returncode == 0, r.stderr
    with open_image(str(c), read_only=True) as d:
        assert d.pread(8, 0) == b"\x07" * 8


@settings(max_examples=150 if os.environ.get("KVMPY_FUZZ") else 40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(corruptions=st.lists(st.tuples(st.integers(0, 3 * 65536 + 4095), st.integers(0, 255)),
                            min_size=1, max_size=6))
def test_random_metadata_corruption_never_tracebacks(tmp_path, corruptions):
    """Flip bytes in the header, refcount table/block and L1: open/read/write fail cleanly or work."""
    p = tmp_path / "fuzz.qcow2"
    make_image(p)
    with open(p, "r+b") as f:
        for off, val in corruptions:
            f.seek(off)
            f.write(bytes([val]))
    try:
        d = open_image(str(p))
    except ImageError as e:
        assert str(p) in str(e)
        return
    try:
        d.pread(d.size, 0)
        d.pwrite(b"\x01" * 100000, 12345)
        d.discard(0, 65536)
    except ImageError as e:
        assert str(p) in str(e)
    finally:
        try:
            d.close()
        except ImageError:
            pass
