"""Formats a user hands kvmpy: every image qemu-img can make that kvmpy does not read
is recognised by its magic (as QEMU's probes) and refused by name, never opened as
raw (which would serve the container's bytes as the disk's)."""

from __future__ import annotations

import json
import os
import pathlib
import random
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import guest_path, run_kvmpy
from kvmpy.block import open_image, probe_format
from kvmpy.block.formats import CLOOP_MAGIC, probe_head
from kvmpy.errors import ImageError
from support.qemu_utils import MISSING_REASON, QEMU_IMG, MiB, kimg

FUZZ = bool(os.environ.get("KVMPY_FUZZ"))

if MISSING_REASON:
    pytest.skip(MISSING_REASON, allow_module_level=True)

# (qemu-img create -f, its -o options, the name kvmpy gives it)
MADE_BY_QEMU_IMG = [
    ("vmdk", ["-o", "subformat=monolithicFlat"], "vmdk"),       # the text descriptor
    ("vmdk", ["-o", "subformat=twoGbMaxExtentSparse"], "vmdk"),
    ("vhdx", [], "vhdx"),
    ("vpc", [], "vpc"),
    ("vpc", ["-o", "subformat=fixed"], "vpc"),                  # only a footer says so
    ("qed", [], "qed"),
    ("qcow", [], "qcow"),
    ("parallels", [], "parallels"),
    ("luks", ["--object", "secret,id=s0,data=pw", "-o", "key-secret=s0"], "luks"),
]


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("fmt,opts,name", MADE_BY_QEMU_IMG,
                         ids=[f"{f}-{'-'.join(o[-1:]) or 'default'}" for f, o, _ in MADE_BY_QEMU_IMG])
def test_foreign_formats_refused_by_name(tmp_path, fmt, opts, name):
    img = tmp_path / f"disk.{fmt}"
    r = subprocess.run([QEMU_IMG, "create", "-q", "-f", fmt, *opts, str(img), "1M"], capture_output=True,
                       text=True)
    if fmt == "luks" and "Unable to get accurate CPU usage" in r.stderr:
        # qemu-img times LUKS's PBKDF with the thread's CPU clock and gives up on a
        # loaded machine; a LUKS1 header's start is what a probe reads
        img.write_bytes(b"LUKS\xba\xbe\x00\x01".ljust(1 << 20, b"\0"))
    else:
        assert r.returncode == 0, r.stderr
    assert probe_format(str(img)) == name
    if name == "vmdk":      # recognised as vmdk, then refused for its kind of vmdk
        expect = f"(convert it with: qemu-img convert -O qcow2 {img} out.qcow2)"
    else:
        expect = f"{img}: a {name} image; kvmpy reads raw and qcow2 (convert it with: qemu-img convert -O qcow2 {img} out.qcow2)"
    for args in (["info", img], ["convert", "-O", "raw", img, tmp_path / "out.raw"], ["map", img],
                 ["compare", img, img], ["measure", "-O", "qcow2", img], ["check", img]):
        r = kimg(*args, rc=2)
        assert expect in _one_line(r.stderr), (args, r.stderr)
    assert not (tmp_path / "out.raw").exists()
    with pytest.raises(ImageError, match=f"a {name} image"):
        open_image(str(img), read_only=True)


def test_vm_refuses_a_vhdx_disk(tmp_path):
    img = tmp_path / "disk.vhdx"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "vhdx", str(img), "1M"], check=True)
    r = run_kvmpy(["run", "--kernel", guest_path("hello"), "--serial", "none", "--drive", f"file={img}"])
    assert r.returncode == 2, r
    line = _one_line(r.stderr.decode())
    assert "a vhdx image" in line and "qemu-img convert -O qcow2" in line, line


# ------------------------------------------------------------ read-only vmdk and vdi

READABLE = [("vmdk", []), ("vmdk", ["-o", "subformat=streamOptimized"]), ("vdi", []),
            ("vdi", ["-o", "static=on"])]
READABLE_IDS = ["vmdk", "vmdk-stream", "vdi", "vdi-static"]


def _mixed_source(path, size=20 * MiB):
    rng = random.Random(7)
    with open(path, "wb") as f:
        f.truncate(size)
        for k in range(0, size // MiB, 3):
            f.seek(k * MiB + (k * 4096) % 65536)
            f.write(rng.randbytes(300_000) if k % 2 else bytes(65536) + rng.randbytes(5000))
        f.seek(size - 777)
        f.write(b"the end")
    return path


def test_the_drivers_declare_what_tools_and_devices_ask(tmp_path):
    """The members BlockDriver declares, with the values the getattr fallbacks gave
    when a driver had no such attribute: format_specific None (no "format-specific"
    in info: vdi, raw), holes_are_zero False (a dynamic vdi, a plain qcow2, raw),
    restrict_block0 False unless a raw image was probed for a guest, fd -1 once closed, cache
    the mode the image was opened with (writeback when none was asked for). (qcow2's holes_are_zero is
    QEMU's preallocation heuristic, true of a file this small; info shows qcow2's own
    format-specific data, not format_specific's.)"""
    made = {}
    for fmt, opts in (("vdi", []), ("vdi", ["-o", "static=on"]), ("vmdk", []), ("qcow2", []), ("raw", [])):
        path = tmp_path / f"{fmt}{len(opts)}.img"
        subprocess.run([QEMU_IMG, "create", "-q", "-f", fmt, *opts, str(path), "4M"], check=True)
        made[(fmt, bool(opts))] = str(path)
    expect = {("vdi", False): (None, False), ("vdi", True): (None, True), ("vmdk", False): ("dict", False),
              ("qcow2", False): (None, None), ("raw", False): (None, False)}
    for (fmt, static), path in made.items():
        drv = open_image(path, None if fmt == "raw" else fmt, read_only=True)
        try:
            specific, holes = expect[(fmt, static)]
            got = drv.format_specific()
            assert (None if got is None else type(got).__name__) == specific, fmt
            assert drv.holes_are_zero is holes if holes is not None else type(drv.holes_are_zero) is bool
            assert drv.restrict_block0 is False, fmt
            assert drv.fd >= 0
            assert drv.cache.name == "writeback", fmt
        finally:
            drv.close()
        assert drv.fd == -1
    raw = open_image(made[("raw", False)], None, guard_probe=True)
    try:
        assert raw.restrict_block0 is True, "a probed raw disk a guest writes is guarded"
    finally:
        raw.close()
    info = json.loads(kimg("info", "--output=json", made[("vdi", False)]).stdout)
    assert "format-specific" not in info


@pytest.mark.parametrize("fmt,opts", READABLE, ids=READABLE_IDS)
def test_read_only_formats_read_like_qemu(tmp_path, fmt, opts):
    src = _mixed_source(tmp_path / "src.raw")
    img = tmp_path / f"img.{fmt}"
    subprocess.run([QEMU_IMG, "convert", "-O", fmt, *opts, str(src), str(img)], check=True)
    theirs = tmp_path / "q.raw"
    subprocess.run([QEMU_IMG, "convert", "-O", "raw", str(img), str(theirs)], check=True)
    kimg("convert", "-O", "raw", img, tmp_path / "k.raw")
    assert (tmp_path / "k.raw").read_bytes() == theirs.read_bytes() == src.read_bytes()
    kimg("convert", "-O", "qcow2", img, tmp_path / "k.qcow2")
    assert subprocess.run([QEMU_IMG, "compare", str(src), str(tmp_path / "k.qcow2")]).returncode == 0
    info = kimg("info", img).stdout
    assert f"file format: {fmt}" in info and "(20971520 bytes)" in info
    theirs_info = subprocess.run([QEMU_IMG, "info", str(img)], capture_output=True, text=True).stdout
    # disk size is the file's allocation, which differs between two runs of stat
    assert [ln for ln in info.splitlines() if not ln.startswith("disk size")] == \
        [ln for ln in theirs_info.splitlines() if not ln.startswith("disk size")]
    assert kimg("compare", img, src).stdout == "Images are identical.\n"
    with open_image(str(img), read_only=True) as d:
        assert d.format == fmt
        assert d.pread(7, 20 * MiB - 777) == b"the end"
        with pytest.raises(ImageError, match="read-only"):
            d.pwrite(b"x", 0)
    with pytest.raises(ImageError, match="read-only; use readonly=on"):
        open_image(str(img))
    # the layout qemu-img map reports, entry for entry (present, zero, data, offset)
    q = subprocess.run([QEMU_IMG, "map", "--output=json", str(img)], capture_output=True, text=True).stdout
    assert json.loads(kimg("map", "--output=json", img).stdout) == json.loads(q)
    q = subprocess.run([QEMU_IMG, "map", str(img)], capture_output=True, text=True).stdout
    assert kimg("map", img).stdout == q


def test_vm_reads_a_vmdk_disk_read_only(tmp_path):
    img = tmp_path / "cloud.vmdk"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "vmdk", str(img), "1M"], check=True)
    r = run_kvmpy(["run", "--kernel", guest_path("hello"), "--serial", "none", "--drive",
                   f"file={img},readonly=on"])
    assert r.returncode == 0, r
    r = run_kvmpy(["run", "--kernel", guest_path("hello"), "--serial", "none", "--drive", f"file={img}"])
    assert r.returncode == 2, r
    line = _one_line(r.stderr.decode())
    assert "read-only; use readonly=on" in line and "qemu-img convert -O qcow2" in line, line


@settings(max_examples=300 if FUZZ else 40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(READABLE_IDS), data=st.data())
def test_hostile_headers_and_tables(tmp_path_factory, which, data):
    """Random bytes over the header and tables: ImageError naming the file, or reads
    that stay inside the file; never another exception, never a hang."""
    d = tmp_path_factory.mktemp("hostile")
    img = _hostile_base(which)
    blob = bytearray(img.read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, min(len(blob) - 1, 0x30000)))
        chunk = data.draw(st.binary(min_size=1, max_size=8))
        blob[at:at + len(chunk)] = chunk
    bad = d / img.name
    bad.write_bytes(bytes(blob))
    try:
        drv = open_image(str(bad), read_only=True)
    except ImageError as e:
        assert str(bad) in str(e)
        return
    with drv:
        assert drv.size <= 1 << 52
        for off in (0, 65536, 1 << 20):
            if off < drv.size:
                try:
                    drv.pread(min(4096, drv.size - off), off)
                except ImageError as e:
                    assert str(bad) in str(e)


_HOSTILE_BASES = {}


def _hostile_base(which):
    if which not in _HOSTILE_BASES:
        import tempfile
        d = tempfile.mkdtemp(prefix="kvmpy-hostile-")
        fmt, opts = dict(zip(READABLE_IDS, READABLE))[which]
        src = os.path.join(d, "src.raw")
        with open(src, "wb") as f:
            f.truncate(2 * MiB)
            f.write(b"\x5a" * 70000)
        out = os.path.join(d, f"base.{fmt}")
        subprocess.run([QEMU_IMG, "convert", "-O", fmt, *opts, src, out], check=True)
        _HOSTILE_BASES[which] = pathlib.Path(out)
    return _HOSTILE_BASES[which]


def test_formats_qemu_only_reads():
    """bochs, cloop and dmg: qemu-img cannot create them, their magic is fixed."""
    assert probe_head(b"Bochs Virtual HD Image\0" + bytes(489)) == "bochs"
    assert probe_head(CLOOP_MAGIC + bytes(64)) == "cloop"
    assert probe_head(CLOOP_MAGIC[:-2] + bytes(64)) is None
    assert probe_head(b"QFI\xfb\0\0\0\x03" + bytes(64)) == "qcow2"
    assert probe_head(b"\n# a comment\nversion=1\ncreateType=x\n") == "vmdk"
    assert probe_head(b"version=12\n") is None
    assert probe_head(bytes(0x40) + struct.pack("<I", 0xBEDA107F)) == "vdi"


def test_dmg_trailer(tmp_path):
    img = tmp_path / "x.dmg"
    koly = b"koly" + struct.pack(">II", 4, 512) + bytes(500)
    img.write_bytes(bytes(4096) + koly)
    assert probe_format(str(img)) == "dmg"
    r = kimg("info", img, rc=2)
    assert "a dmg image" in _one_line(r.stderr)
    # A VM's probed raw disk never looks at its last sector: the guest owns it.
    with open_image(str(img), guard_probe=True) as d:
        assert d.format == "raw"


@pytest.mark.parametrize("offset,data", [(0x40, struct.pack("<I", 0xBEDA107F)), (0, b"COWD"),
                                         (0, b"version=2\n"), (0, b"QFI\xfb\0\0\0\x01")])
def test_guest_cannot_make_its_raw_disk_another_format(tmp_path, offset, data):
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(65536))
    with open_image(str(img), guard_probe=True) as d:
        with pytest.raises(ImageError, match="write to block 0 refused"):
            d.pwrite(data, offset)
        d.pwrite(data, 4096)            # elsewhere it is just data
    assert probe_format(str(img)) == "raw"


def test_measure_and_compare_read_only_formats_like_qemu(tmp_path):
    """Block status of vmdk (plain and compressed grains) and vdi (dynamic, and
    static over a sparse file) as qemu-img sees it: measure and compare -s agree."""
    src = _mixed_source(tmp_path / "src.raw")
    images = [src]
    for (fmt, opts), name in zip(READABLE, READABLE_IDS):
        img = tmp_path / f"{name}.{fmt}"
        subprocess.run([QEMU_IMG, "convert", "-O", fmt, *opts, str(src), str(img)], check=True)
        images.append(img)
    for img in images[1:]:
        q = subprocess.run([QEMU_IMG, "measure", "-O", "qcow2", str(img)], capture_output=True, text=True)
        assert kimg("measure", "-O", "qcow2", img).stdout == q.stdout, img
        for other in images:
            for flags in ([], ["-s"]):
                q = subprocess.run([QEMU_IMG, "compare", *flags, str(img), str(other)], capture_output=True,
                                   text=True)
                k = kimg("compare", *flags, img, other, rc=q.returncode)
                assert k.stdout == q.stdout, (img, other, flags)
