"""`kvmpy img compare` and `kvmpy img measure` beside the real qemu-img: the same
lines on stdout and the same exit status on the same images."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from support.qemu_utils import MISSING_REASON, QEMU_IMG, MiB, kimg, qio

if MISSING_REASON:
    pytest.skip(MISSING_REASON, allow_module_level=True)

FUZZ = bool(os.environ.get("KVMPY_FUZZ"))


def qimg(*args):
    return subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True)


def both(*args):
    """(rc, stdout) of qemu-img and of kvmpy img with the same arguments."""
    q = qimg(*args)
    k = subprocess.run(["python3", "-m", "kvmpy", "img", *map(str, args)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__))))
    return (q.returncode, q.stdout), (k.returncode, k.stdout)


def _info_lines(text):
    """img info's lines but the disk size (the file's allocation, which two stats may see differ)."""
    return [ln for ln in text.splitlines() if not ln.startswith("disk size")]


def make(path, fmt, size, writes=(), zero=()):
    assert qimg("create", "-q", "-f", fmt, path, size).returncode == 0
    cmds = [f"write -P {pat} {off} {n}" for off, n, pat in writes] + [f"write -z {off} {n}" for off, n in zero]
    if cmds:
        qio(path, *cmds, fmt=fmt)
    return path


CASES = {
    # name: (image 1, image 2) as (fmt, size, writes, zero-writes)
    "empty-same": (("raw", "1M", [], []), ("qcow2", "1M", [], [])),
    "data-same": (("raw", "1M", [(65536, 4096, 7)], []), ("qcow2", "1M", [(65536, 4096, 7)], [])),
    "byte-differs": (("raw", "1M", [(4097, 1, 2)], []), ("qcow2", "1M", [], [])),
    "late-differs": (("qcow2", "2M", [(0, 65536, 1), (1 << 20, 512, 3)], []),
                     ("qcow2", "2M", [(0, 65536, 1), (1 << 20, 512, 4)], [])),
    "zero-vs-unallocated": (("qcow2", "1M", [], [(0, 65536)]), ("qcow2", "1M", [], [])),
    "written-zeroes": (("qcow2", "1M", [(0, 65536, 0)], []), ("raw", "1M", [], [])),
    "bigger-zero-tail": (("raw", "1M", [], []), ("qcow2", "2M", [], [])),
    "bigger-data-tail": (("raw", "1M", [], []), ("qcow2", "2M", [(1573641, 1, 1)], [])),
    "smaller-second": (("qcow2", "3M", [(2 << 20, 4096, 9)], []), ("raw", "1M", [], [])),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("strict", [False, True], ids=["", "strict"])
def test_compare_like_qemu_img(tmp_path, case, strict):
    a, b = CASES[case]
    pa = make(tmp_path / f"a.{a[0]}", *a)
    pb = make(tmp_path / f"b.{b[0]}", *b)
    flags = ["-s"] if strict else []
    for x, y in ((pa, pb), (pb, pa)):
        q, k = both("compare", *flags, x, y)
        assert k == q, (case, strict, q, k)


def test_compare_errors(tmp_path):
    a = make(tmp_path / "a.raw", "raw", "1M")
    for args in (["compare", a, tmp_path / "missing"], ["compare", "-f", "qcow2", a, a],
                 ["compare", "-F", "qcow2", a, a]):
        q, k = both(*args)
        assert q[0] == k[0] == 2, (args, q, k)
    r = kimg("compare", "-q", a, make(tmp_path / "b.raw", "raw", "1M", [(0, 1, 1)]), rc=1)
    assert r.stdout == ""


def test_compare_through_backing_chain(tmp_path):
    base = make(tmp_path / "base.qcow2", "qcow2", "1M", [(0, 65536, 5)])
    top = tmp_path / "top.qcow2"
    assert qimg("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top).returncode == 0
    flat = make(tmp_path / "flat.raw", "raw", "1M", [(0, 65536, 5)])
    for flags in ([], ["-s"]):
        q, k = both("compare", *flags, top, flat)
        assert k == q


@settings(max_examples=40 if FUZZ else 8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(size_kib=st.sampled_from([64, 192, 1024]),
       writes=st.lists(st.tuples(st.integers(0, 2047), st.integers(1, 8), st.sampled_from([0, 1, 2]),
                                 st.booleans()), max_size=5),
       bigger=st.sampled_from([0, 0, 64]))
def test_compare_random_sparse_images(tmp_path_factory, size_kib, writes, bigger):
    """Random writes (in 512-byte sectors, some of zeroes) into one of two images:
    kvmpy and qemu-img agree on the verdict and the offset."""
    d = tmp_path_factory.mktemp("cmp")
    size = size_kib * 1024
    a = make(d / "a.qcow2", "qcow2", size)
    b = make(d / "b.raw", "raw", size + bigger * 1024)
    for sector, count, pat, into_a in writes:
        off = sector * 512 % size
        n = min(count * 512, size - off)
        qio(a if into_a else b, f"write -P {pat} {off} {n}", fmt="qcow2" if into_a else "raw")
    q, k = both("compare", a, b)
    assert k == q


MEASURE_SIZES = ["0", "1", "512", "1M", "1G", "100G", "3T"]


@pytest.mark.parametrize("size", MEASURE_SIZES)
@pytest.mark.parametrize("opts", [[], ["-o", "cluster_size=4k"], ["-o", "cluster_size=2M,refcount_bits=1"],
                                  ["-o", "extended_l2=on"], ["-o", "preallocation=full"]],
                         ids=["default", "4k", "2M-rc1", "l2ext", "full"])
def test_measure_sizes_like_qemu_img(size, opts):
    q, k = both("measure", "--size", size, "-O", "qcow2", *opts)
    assert k == q


def test_measure_images_like_qemu_img(tmp_path):
    raw = make(tmp_path / "a.raw", "raw", "3M", [(4097, 1, 1), (2 << 20, 70000, 2)])
    qc = make(tmp_path / "b.qcow2", "qcow2", "5M", [(0, 512, 1), (3 << 20, 131072, 3)], [(1 << 20, 65536)])
    meta = tmp_path / "meta.qcow2"       # clusters allocated over holes of the file
    assert qimg("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", meta, "8M").returncode == 0
    qio(meta, "write -P 4 1M 64k")
    falloc = tmp_path / "falloc.qcow2"   # clusters allocated and stored
    assert qimg("create", "-q", "-f", "qcow2", "-o", "preallocation=falloc", falloc, "4M").returncode == 0
    for a in (meta, falloc):
        for b in (raw, qc, meta, falloc):
            for flags in ([], ["-s"]):
                q, k = both("compare", *flags, a, b)
                assert k == q, (a, b, flags)
    for img in (meta, falloc, qc):
        assert _info_lines(kimg("info", img).stdout) == _info_lines(qimg("info", img).stdout)
        q = qimg("map", "--output=json", img).stdout
        assert json.loads(kimg("map", "--output=json", img).stdout) == json.loads(q)
    for img in (raw, qc, meta, falloc):
        for out in (["-O", "qcow2"], ["-O", "raw"], [], ["-O", "qcow2", "-o", "cluster_size=4096"],
                    ["-O", "qcow2", "-o", "compat=0.10"]):
            q, k = both("measure", *out, img)
            assert k == q, (img, out)
        q, k = both("measure", "-O", "qcow2", "--output=json", img)
        assert k == q and json.loads(k[1])["required"] > 0
    for args in (["measure", "--size", "1G", raw], ["measure", "-O", "qcow2"],
                 ["measure", "--size", "100P", "-O", "qcow2"]):
        q, k = both(*args)
        assert q[0] == 1 and k[0] == 2, (args, q, k)      # kvmpy: bad input is status 2
    # what measure says is what convert makes
    out = tmp_path / "out.qcow2"
    kimg("convert", "-O", "qcow2", qc, out)
    required = int(kimg("measure", "-O", "qcow2", qc).stdout.split()[2])
    assert os.path.getsize(out) <= required <= 8 * MiB
