"""Format probing as safe as QEMU's: a raw image opened by probing refuses writes
that would make it probe as another format; a probed qcow2 must name its backing
file's format. Through the block layer here; tests/test_virtio_kvm.py does the same
through `kvmpy run`."""

from __future__ import annotations

import os

import pytest
from hypothesis import assume, given, settings, strategies as st

from kvmpy.block import open_image
from kvmpy.block.qcow2 import create_qcow2
from kvmpy.block.formats import probe_head
from kvmpy.block.raw import FOREIGN_MAGICS
from kvmpy.errors import ImageError

FUZZ = bool(os.environ.get("KVMPY_FUZZ"))


def test_explicit_raw_and_tools_are_not_restricted(tmp_path):
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(65536))
    for kw in ({"format": "raw", "guard_probe": True}, {"guard_probe": False}):
        with open_image(str(img), **kw) as d:
            d.pwrite(b"QFI\xfb" + bytes(508), 0)
        img.write_bytes(bytes(65536))


@settings(max_examples=400 if FUZZ else 60, deadline=None)
@given(head=st.sampled_from([b""] + [m[:k] for m in FOREIGN_MAGICS for k in (1, len(m) - 1)]),
       magic=st.sampled_from((None,) + FOREIGN_MAGICS), offset=st.integers(0, 40),
       noise=st.binary(min_size=0, max_size=40), split=st.integers(1, 7))
def test_probed_raw_block0(tmp_path_factory, head, magic, offset, noise, split):
    """Refused exactly when the first bytes afterwards would carry a foreign magic,
    whatever the offset and however the data is split into segments."""
    img = tmp_path_factory.mktemp("probe") / "d.raw"
    before = head + bytes(4096 - len(head))
    assume(probe_head(before) is None)      # "QED" + zeroes is already a QED header
    img.write_bytes(before)
    data = (magic[offset:] if magic and offset < len(magic) else b"") + noise
    if not data:
        data = b"\0"
    segs = [memoryview(data[i:i + split]) for i in range(0, len(data), split)]
    expect = bytearray(before)
    expect[offset:offset + len(data)] = data
    bad = probe_head(bytes(expect)) is not None
    # every magic the strategy plants is one the guard knows
    assert bad or not any(bytes(expect).startswith(m) for m in FOREIGN_MAGICS)
    with open_image(str(img), guard_probe=True) as d:
        assert d.format == "raw"
        if bad:
            with pytest.raises(ImageError, match="write to block 0 refused"):
                d.pwritev(segs, offset)
        else:
            d.pwritev(segs, offset)
    assert img.read_bytes() == (before if bad else bytes(expect))


def test_probed_qcow2_backing_chain_needs_formats(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"B" * 65536)
    mid = tmp_path / "mid.qcow2"
    create_qcow2(str(mid), 65536, backing_file=str(base), backing_format=None)
    top = tmp_path / "top.qcow2"
    create_qcow2(str(top), 65536, backing_file=str(mid), backing_format="qcow2")
    for path in (mid, top):     # the rule holds down the chain, not only at the top
        with pytest.raises(ImageError, match=f"{mid}: image format was probed and its backing file"):
            open_image(str(path), guard_probe=True)
        with open_image(str(path), format="qcow2", guard_probe=True) as d:   # explicit: as before
            assert d.pread(4, 0) == b"BBBB"
        with open_image(str(path)) as d:                                     # img tools: as before
            assert d.pread(4, 0) == b"BBBB"
    create_qcow2(str(mid), 65536, backing_file=str(base), backing_format="raw")
    with open_image(str(top), guard_probe=True) as d:
        assert d.backing.read_only and d.backing.backing.read_only
        assert d.pread(4, 0) == b"BBBB"


def test_probed_raw_block0_writes_the_bytes_it_checked(tmp_path, monkeypatch):
    """The buffers are guest RAM: another vCPU may rewrite them between the check and
    the write. What lands on the disk is the copy that was checked."""
    from kvmpy.block import raw
    img = tmp_path / "d.raw"
    img.write_bytes(b"M" * 4096)
    guest = bytearray(1024)
    real = raw.probe_head

    def racing_probe(head):
        answer = real(head)
        guest[:4] = b"QFI\xfb"          # another vCPU, between the check and the write
        return answer

    monkeypatch.setattr(raw, "probe_head", racing_probe)
    with open_image(str(img), guard_probe=True) as d:
        d.pwritev([memoryview(guest)[:512], memoryview(guest)[512:]], 0)
    data = img.read_bytes()
    assert data[:1024] == bytes(1024) and data[1024:] == b"M" * 3072
    assert real(data[:2048]) is None
