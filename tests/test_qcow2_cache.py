"""The qcow2 L2 cache sized as QEMU 7.2 sizes it (the whole image's tables, capped at
32 MiB, at least 2 tables), its l2-cache-size and cache-clean-interval options, and
that a cache far smaller than the image still reads and writes correctly (dirty
tables go out before they are evicted: qemu-img check stays clean)."""

from __future__ import annotations

import subprocess
import time

import pytest

from kvmpy.block import open_image
from kvmpy.block.qcow2 import create_qcow2
from support.qemu_utils import MISSING_REASON, QEMU_IMG, MiB, qio

if MISSING_REASON:
    pytest.skip(MISSING_REASON, allow_module_level=True)


@pytest.mark.parametrize("size,cluster,tables", [
    (1 * MiB, 65536, 2),                  # one table needed: the minimum of two
    (1 << 30, 65536, 2),                  # 16384 entries = 128 KiB of tables
    (8 << 30, 65536, 16),
    (1 << 40, 65536, 512),                # capped at 32 MiB
    (1 << 30, 512, 32768),                # 16 MiB of 512-byte tables
])
def test_default_size_like_qemu(tmp_path, size, cluster, tables):
    p = tmp_path / "a.qcow2"
    create_qcow2(str(p), size, cluster_size=cluster)
    with open_image(str(p), read_only=True) as d:
        assert d.l2_cache_tables == tables


def test_small_cache_reads_and_writes_correctly(tmp_path):
    p = tmp_path / "a.qcow2"
    create_qcow2(str(p), 64 * MiB, cluster_size=4096)     # 512 guest clusters per L2 table
    stride = 2 * MiB + 4096                               # each access in another table
    offsets = [i * stride for i in range(30)]
    qio(p, *[f"write -P {i % 250 + 1} {off} 4096" for i, off in enumerate(offsets[::2])])
    with open_image(str(p), l2_cache_size=3 * 4096) as d:
        assert d.l2_cache_tables == 3
        for i, off in enumerate(offsets[1::2]):
            d.pwrite(bytes([i % 250 + 101]) * 4096, off)
            assert len(d.l2_cache) <= 3
        for i, off in enumerate(offsets[::2]):
            assert d.pread(4096, off) == bytes([i % 250 + 1]) * 4096
            assert len(d.l2_cache) <= 3
        d.flush()
    r = subprocess.run([QEMU_IMG, "check", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for i, off in enumerate(offsets[1::2]):
        qio(p, f"read -P {i % 250 + 101} {off} 4096")


def test_cache_clean_interval_drops_unused_tables(tmp_path):
    p = tmp_path / "a.qcow2"
    create_qcow2(str(p), 16 * MiB, cluster_size=4096)
    qio(p, "write -P 1 0 4096", "write -P 2 8M 4096")
    with open_image(str(p), read_only=True, cache_clean_interval=0.2) as d:
        d.pread(4096, 0)
        d.pread(4096, 8 * MiB)
        assert len(d.l2_cache) == 2
        time.sleep(0.25)
        d.pread(4096, 8 * MiB)    # the clean runs here: both used in the interval
        time.sleep(0.25)
        assert d.pread(4096, 8 * MiB) == b"\2" * 4096
        assert len(d.l2_cache) == 1     # the table of offset 0 was not used for a whole interval
    with open_image(str(p), read_only=True, cache_clean_interval=0) as d:
        d.pread(4096, 0)
        assert d.l2_used == set()       # 0: never cleaned, nothing tracked
