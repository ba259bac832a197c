"""Formats a user hands kvmpy: every image qemu-img can make that kvmpy does not read
is recognised by its magic (as QEMU's probes) and refused by name, never opened as
raw (which would serve the container's bytes as the disk's)."""

from __future__ import annotations

import struct
import subprocess

import pytest

from conftest import guest_path, run_kvmpy
from kvmpy.block import open_image, probe_format
from kvmpy.block.formats import CLOOP_MAGIC, probe_head
from kvmpy.errors import ImageError
from support.qemu_utils import MISSING_REASON, QEMU_IMG, kimg

if MISSING_REASON:
    pytest.skip(MISSING_REASON, allow_module_level=True)

# (qemu-img create -f, its -o options, the name kvmpy gives it)
MADE_BY_QEMU_IMG = [
    ("vmdk", [], "vmdk"),
    ("vmdk", ["-o", "subformat=streamOptimized"], "vmdk"),
    ("vmdk", ["-o", "subformat=monolithicFlat"], "vmdk"),       # the text descriptor
    ("vdi", [], "vdi"),
    ("vdi", ["-o", "static=on"], "vdi"),
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
    assert r.returncode == 0, r.stderr
    assert probe_format(str(img)) == name
    expect = f"{img}: a {name} image; kvmpy reads raw and qcow2 (convert it with: qemu-img convert -O qcow2 {img} out.qcow2)"
    for args in (["info", img], ["convert", "-O", "raw", img, tmp_path / "out.raw"], ["map", img],
                 ["compare", img, img], ["measure", "-O", "qcow2", img], ["check", img]):
        r = kimg(*args, rc=2)
        assert expect in _one_line(r.stderr), (args, r.stderr)
    assert not (tmp_path / "out.raw").exists()
    with pytest.raises(ImageError, match=f"a {name} image"):
        open_image(str(img))


def test_vm_refuses_a_vmdk_disk(tmp_path):
    img = tmp_path / "cloud.vmdk"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "vmdk", str(img), "1M"], check=True)
    r = run_kvmpy(["run", "--kernel", guest_path("hello"), "--serial", "none", "--drive", f"file={img}"])
    assert r.returncode == 2, r
    line = _one_line(r.stderr.decode())
    assert "a vmdk image" in line and "qemu-img convert -O qcow2" in line, line


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
