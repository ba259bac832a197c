"""qcow2 under virtio-blk's native data plane, on images made and checked by QEMU's tools.

The C thread reads and overwrites the data clusters the driver put in the disk's
cluster map; every other request (unallocated or zero clusters, a backing file,
shared clusters, allocating writes, flush, discard) goes back to the Python model,
which fills the map again. Whatever answered, the guest must see what the Python
model alone gives it, and the image must stay one `qemu-img check` calls clean:
never a data write onto qcow2 metadata, never a write through a stale mapping.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.block.qcow2 import Qcow2Driver
from kvmpy.block.snapshot import create_snapshot
from kvmpy.devices.virtio import dataplane
from kvmpy.devices.virtio.blk import (VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN,
                                      VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES)
from kvmpy.devices.virtio.pci import DEVICE_NEEDS_RESET
from conftest import tool_required
from test_dataplane import Rig
from test_dataplane_uring import aio  # noqa: F401 - the fixture: io_uring and worker threads

needs_native = pytest.mark.skipif(not dataplane.available(),
                                  reason=f"native data plane not built: {dataplane.unavailable_reason()}")

DISK = 8 << 20
CLUSTER = 65536


def qemu(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=True)


def make_qcow2(path, size=DISK, cluster_size=CLUSTER, writes=(), backing=None, snapshot=False) -> str:
    """A qcow2 image made by qemu-img, with ``writes`` = [(offset, length, byte)] by qemu-io."""
    tool_required("qemu-img")
    tool_required("qemu-io")
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}"]
    if backing:
        args += ["-b", str(backing), "-F", "raw"]
    qemu(*args, str(path), str(size))
    if writes:
        cmds = []
        for off, length, byte in writes:
            cmds += ["-c", f"write -P {byte} {off} {length}"]
        qemu("qemu-io", "-f", "qcow2", *cmds, str(path))
    if snapshot:
        qemu("qemu-img", "snapshot", "-c", "s1", str(path))
    return str(path)


def check_clean(path) -> None:
    r = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, f"qemu-img check {path}: {r.stdout}{r.stderr}"


def qemu_io_reads(path, offset: int, length: int, byte: int) -> bool:
    """Whether QEMU reads ``length`` bytes of ``byte`` at ``offset`` of the image."""
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", f"read -P {byte} {offset} {length}", str(path)],
                       capture_output=True, text=True)
    return r.returncode == 0 and "Pattern verification failed" not in r.stdout


def qcow2_rig(path, mode="native", **kw) -> Rig:
    return Rig(path, mode=mode, driver=Qcow2Driver(str(path)), **kw)


def segment(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


# --- the driver's side: what it lets C cache, and that every change of mapping is told ---

def test_in_place_clusters_are_the_allocated_unshared_data_clusters(tmp_path):
    path = make_qcow2(tmp_path / "d.qcow2", writes=[(1 << 20, 128 << 10, 0x61), (0, 64 << 10, 0x62)])
    drv = Qcow2Driver(path)
    try:
        generation, pairs = drv.in_place_clusters(0, DISK // CLUSTER)
        assert [c for c, _ in pairs] == [0, 16, 17]
        for c, host in pairs:
            kind, mapped, _ = drv.host_mapping(c * CLUSTER, CLUSTER)
            assert mapped == host and host % CLUSTER == 0
        # qemu-io wrote cluster 16 first: the host clusters are out of guest order.
        assert dict(pairs)[0] > dict(pairs)[16]
        assert generation == drv.mapping_generation
    finally:
        drv.close()
    path2 = make_qcow2(tmp_path / "s.qcow2", writes=[(0, 64 << 10, 0x61)], snapshot=True)
    drv = Qcow2Driver(path2)
    try:
        assert drv.in_place_clusters(0, DISK // CLUSTER)[1] == [], "a snapshot's cluster is no overwrite in place"
    finally:
        drv.close()
    ro = Qcow2Driver(path2, read_only=True)
    try:
        assert [c for c, _ in ro.in_place_clusters(0, DISK // CLUSTER)[1]] == [0], "reads of a shared cluster are"
    finally:
        ro.close()


CHANGES = {
    "discard": lambda d: d.discard(0, CLUSTER),
    "zeroes, unmapped": lambda d: d.write_zeroes(0, CLUSTER, may_unmap=True),
    "zeroes, allocation kept": lambda d: d.write_zeroes(0, CLUSTER, may_unmap=False),
    "snapshot": lambda d: create_snapshot(d, "snap"),
    "shrink": lambda d: d.resize(DISK // 2),
    "grow": lambda d: d.resize(DISK * 2),
    "commit (make empty)": lambda d: d.make_empty(),
    "corrupt": lambda d: d._mark_corrupt(),
    "close": lambda d: d.close(),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_change_of_mapping_is_told(tmp_path, change):
    path = make_qcow2(tmp_path / "d.qcow2", writes=[(0, 256 << 10, 0x61)])
    drv = Qcow2Driver(path)
    told = []
    drv.mapping_listeners.append(told.append)
    try:
        before = drv.mapping_generation
        CHANGES[change](drv)
        assert told and told[-1] == drv.mapping_generation > before
    finally:
        drv.close()


def test_overwrites_and_reads_change_no_mapping(tmp_path):
    path = make_qcow2(tmp_path / "d.qcow2", writes=[(0, 256 << 10, 0x61)])
    drv = Qcow2Driver(path)
    told = []
    drv.mapping_listeners.append(told.append)
    try:
        drv.pwritev([bytearray(b"x" * 4096)], 8192)
        drv.preadv([bytearray(4096)], 0)
        drv.pwritev([bytearray(b"y" * CLUSTER)], 1 << 20)      # a new cluster: nothing cached can be stale
        drv.flush()
        assert told == []
    finally:
        drv.close()


@needs_native
def test_a_fill_computed_before_a_change_is_dropped(tmp_path):
    path = make_qcow2(tmp_path / "d.qcow2", writes=[(0, 256 << 10, 0x61)])
    drv = Qcow2Driver(path)
    cmap = dataplane.ClusterMap(drv.cluster_bits)
    drv.mapping_listeners.append(cmap.invalidate)
    try:
        generation, pairs = drv.in_place_clusters(0, 4)
        assert cmap.set(generation, pairs) == 4 and cmap.get(1) == dict(pairs)[1]
        stale_generation, stale = drv.in_place_clusters(0, 4)
        drv.discard(CLUSTER, CLUSTER)
        assert cmap.get(1) is None and cmap.get(0) is None, "the change emptied the map"
        assert cmap.set(stale_generation, stale) == 0 and cmap.get(1) is None
        generation, pairs = drv.in_place_clusters(0, 4)
        assert [c for c, _ in pairs] == [0, 2, 3]
        assert cmap.set(generation, pairs) == 3 and cmap.get(1) is None
    finally:
        drv.close()
        cmap.close()


# --- requests through the data plane --------------------------------------------------------

def answered(rig, rtype, sector, out=b"", in_len=0):
    """One request and who answered it: (status, used length, data, by the C thread)."""
    before = rig.native_requests()
    # native_requests() took the queue back and gives it to a thread again from the
    # event loop: once the loop has run that, the thread serves the next kick.
    rig.settle()
    assert rig.dev.native_queues == (True,)
    status, used, data = rig.request(rtype, sector, out, in_len)
    by_thread = rig.native_requests() - before == 1
    rig.settle()
    return status, used, data, by_thread


@needs_native
def test_allocated_clusters_in_c_the_rest_in_the_model(tmp_path, aio):
    path = make_qcow2(tmp_path / "d.qcow2", writes=[(1 << 20, 1 << 20, 0x61)])
    rig = qcow2_rig(path)
    try:
        cmap = rig.blk.cluster_map
        sector = (1 << 20) // 512
        # The first request in a table is the model's; it fills the table into the map.
        assert answered(rig, VIRTIO_BLK_T_IN, sector, in_len=4096) == (VIRTIO_BLK_S_OK, 4097, b"\x61" * 4096, False)
        assert cmap.get(17) is not None and cmap.get(0) is None
        # Reads and overwrites of allocated clusters, across cluster boundaries: C.
        assert answered(rig, VIRTIO_BLK_T_IN, sector + 120, in_len=8192) == (VIRTIO_BLK_S_OK, 8193, b"\x61" * 8192,
                                                                             True)
        assert answered(rig, VIRTIO_BLK_T_OUT, sector + 127, out=b"\x62" * 1024)[0::3] == (VIRTIO_BLK_S_OK, True)
        assert answered(rig, VIRTIO_BLK_T_IN, sector + 126, in_len=2048)[2:] == (
            b"\x61" * 512 + b"\x62" * 1024 + b"\x61" * 512, True)
        # Unallocated: zeroes, from the model; an allocating write, the model's, and
        # the new cluster is in the map for the overwrite that follows.
        assert answered(rig, VIRTIO_BLK_T_IN, 0, in_len=4096)[2:] == (bytes(4096), False)
        assert answered(rig, VIRTIO_BLK_T_OUT, 0, out=b"\x63" * 4096)[0::3] == (VIRTIO_BLK_S_OK, False)
        host = cmap.get(0)
        assert host is not None and host == rig.driver.host_mapping(0, CLUSTER)[1]
        assert answered(rig, VIRTIO_BLK_T_OUT, 8, out=b"\x64" * 4096)[0::3] == (VIRTIO_BLK_S_OK, True)
        # Flush and discard are the model's; the discard takes the cluster out of the map.
        assert answered(rig, VIRTIO_BLK_T_FLUSH, 0)[0::3] == (VIRTIO_BLK_S_OK, False)
        assert answered(rig, VIRTIO_BLK_T_DISCARD, 0, out=segment(sector, 128))[0::3] == (VIRTIO_BLK_S_OK, False)
        assert cmap.get(16) is None
        assert answered(rig, VIRTIO_BLK_T_IN, sector, in_len=4096)[2:] == (bytes(4096), False)
        assert not rig.d.status & DEVICE_NEEDS_RESET
    finally:
        rig.close()
    check_clean(path)
    assert qemu_io_reads(path, 0, 4096, 0x63) and qemu_io_reads(path, 4096, 4096, 0x64)
    # The 1 KiB write straddled clusters 16 and 17; the discard took 16.
    assert qemu_io_reads(path, 1 << 20, CLUSTER, 0) and qemu_io_reads(path, (1 << 20) + CLUSTER, 512, 0x62)
    assert qemu_io_reads(path, (1 << 20) + CLUSTER + 512, CLUSTER - 512, 0x61)


@needs_native
def test_write_through_qcow2_stays_in_the_model(tmp_path):
    """Without FLUSH every write must make the driver's tables durable: the model's."""
    path = make_qcow2(tmp_path / "d.qcow2", writes=[(0, 1 << 20, 0x61)])
    rig = qcow2_rig(path, flush=False)
    try:
        for _ in range(3):
            assert rig.request(VIRTIO_BLK_T_OUT, 8, out=b"\x65" * 4096)[0] == VIRTIO_BLK_S_OK
        assert rig.dev.native_queues == (False,) and rig.native_requests() == 0
    finally:
        rig.close()
    check_clean(path)


@needs_native
def test_python_mode_has_no_cluster_map(tmp_path):
    path = make_qcow2(tmp_path / "d.qcow2", writes=[(0, 1 << 20, 0x61)])
    rig = qcow2_rig(path, mode="python")
    try:
        assert rig.blk.cluster_map is None and rig.driver.mapping_listeners == []
        assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=4096)[2] == b"\x61" * 4096
        assert rig.native_requests() == 0
    finally:
        rig.close()


@needs_native
def test_reads_off_the_disk_run_in_parallel(tmp_path, aio):
    """A ring of reads of qcow2 data not in the page cache: through the io_uring or
    the read workers (a batch at a time, as on raw), used entries in ring order."""
    path = make_qcow2(tmp_path / "d.qcow2", writes=[(0, DISK, 0x61), (0, DISK // 2, 0x62)])
    rig = qcow2_rig(path)
    try:
        assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK   # the model fills the map
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        rig.settle()
        rig.n = 0
        heads = [rig.put(VIRTIO_BLK_T_IN, 1024 * i, in_len=65536)[0] for i in range(16)]
        rig.d.kick(0)
        used = rig.d.wait_used(0, count=16)
        assert [h for h, _ in used] == heads and all(n == 65537 for _, n in used)
        for i in range(16):
            want = 0x62 if 1024 * 512 * i < DISK // 2 else 0x61
            assert rig.m.memory.read(0x300000 + 0x10000 * i, 65536) == bytes([want]) * 65536
        assert rig.native_requests() >= 16
        if aio == "io_uring":
            assert rig.dev.native_ring_ops >= 16
        elif rig.dev.native_deferred_reads == 0:
            pytest.skip("the page cache kept the image (or RWF_NOWAIT is refused here): the workers were not needed")
    finally:
        rig.close()
    check_clean(path)


# Random request streams against the model alone: same answers, same image, clean image.
SMALL_CLUSTER = 4096
SMALL_DISK = 2 << 20
SECTORS = SMALL_DISK // 512

REQUEST = st.one_of(
    st.tuples(st.just(VIRTIO_BLK_T_IN), st.integers(0, SECTORS + 1), st.sampled_from([512, 4096, 12288, 65536])),
    st.tuples(st.just(VIRTIO_BLK_T_OUT), st.integers(0, SECTORS + 1), st.sampled_from([512, 4096, 9216, 65536])),
    st.tuples(st.just(VIRTIO_BLK_T_FLUSH), st.just(0), st.just(0)),
    st.tuples(st.sampled_from([VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES]), st.integers(0, SECTORS - 1),
              st.sampled_from([1, 8, 64, 200])))
BASE = st.lists(st.tuples(st.integers(0, SMALL_DISK // SMALL_CLUSTER - 1), st.integers(1, 24)), max_size=6)


def run_stream(rig, requests, seed):
    answers = []
    for i, (rtype, sector, arg) in enumerate(requests):
        if rtype == VIRTIO_BLK_T_OUT:
            answers.append(rig.request(rtype, sector, out=bytes([(seed + i) & 0xFF or 1]) * arg))
        elif rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            flags = 1 if rtype == VIRTIO_BLK_T_WRITE_ZEROES and seed & 1 else 0
            answers.append(rig.request(rtype, 0, out=segment(sector, min(arg, SECTORS - sector), flags)))
        else:
            answers.append(rig.request(rtype, sector, in_len=arg))
    return answers


@needs_native
@settings(max_examples=200 if os.environ.get("KVMPY_FUZZ") else 15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=BASE, requests=st.lists(REQUEST, min_size=1, max_size=16), seed=st.integers(0, 255),
       layout=st.sampled_from(["plain", "snapshot", "backing"]))
def test_random_streams_same_as_the_model_and_clean(tmp_path_factory, aio, base, requests, seed, layout):
    tmp = tmp_path_factory.mktemp("q")
    backing = None
    if layout == "backing":
        backing = tmp / "base.raw"
        backing.write_bytes(bytes((i * 7) & 0xFF for i in range(256)) * (SMALL_DISK // 256))
    # Allocated in the order given: host clusters out of guest order.
    writes = [(c * SMALL_CLUSTER, min(n, SMALL_DISK // SMALL_CLUSTER - c) * SMALL_CLUSTER, 0x30 + k)
              for k, (c, n) in enumerate(base)]
    first = make_qcow2(tmp / "native.qcow2", size=SMALL_DISK, cluster_size=SMALL_CLUSTER, writes=writes,
                       backing=backing, snapshot=layout == "snapshot")
    second = str(tmp / "python.qcow2")
    shutil.copyfile(first, second)
    rigs = [qcow2_rig(first), qcow2_rig(second, mode="python")]
    try:
        got, want = (run_stream(r, requests, seed) for r in rigs)
        assert got == want
        assert not rigs[0].d.status & DEVICE_NEEDS_RESET
    finally:
        for r in rigs:
            r.close()
    for p in (first, second):
        check_clean(p)
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", first, second],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.guest
@needs_native
def test_guest_under_kvm_same_image_with_either_data_plane(tmp_path, kvm_required):
    """The test guest through `kvmpy run` on a half-allocated qcow2 disk, 32 random
    writes and reads in flight: the native data plane leaves the image the Python
    model leaves, and both are clean."""
    from conftest import guest_path, run_kvmpy
    images = {}
    for mode in ("native", "python"):
        path = make_qcow2(tmp_path / f"{mode}.qcow2", writes=[(0, 4 << 20, 0x61)])
        p = run_kvmpy(["run", "--enable-kvm", "--kernel", guest_path("virtio_blk"), "--append",
                       "sector=2048 bytes=32768 qd=32 rand=300 randw=300 writes=20",
                       "--drive", f"file={path},format=qcow2,dataplane={mode}"], timeout=120)
        out = p.stdout.decode()
        assert p.returncode == 0, out + p.stderr.decode()
        assert "virtio-blk: pattern ok" in out and "randw4k=300" in out and "guest: done" in out
        check_clean(path)
        images[mode] = path
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", images["native"], images["python"]],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
