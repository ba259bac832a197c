"""Disk cache modes (QEMU's cache=, kvmpy/block/direct.py): the flags the VM's image
is open with, O_DIRECT's alignment served through bounce buffers (the drivers'
Python path and the native data plane's C path) with the same answers as the
model on the page cache, qcow2 staying consistent under O_DIRECT, the guest's
write cache (CONFIG_WCE), and a file system that refuses O_DIRECT.

O_DIRECT needs a file system that has it: the tests make their images under
pytest's tmp_path and skip, saying so, where that file system refuses it.
"""

from __future__ import annotations

import os
import random
import re
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.block import direct, open_image
from kvmpy.block.qcow2 import Qcow2Driver, create_qcow2
from kvmpy.block.raw import RawDriver
from kvmpy.config import ConfigError, load_config, parse_drive
from kvmpy.devices.virtio import dataplane
from kvmpy.devices.virtio.blk import (VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN,
                                      VIRTIO_BLK_T_OUT, VirtioBlk)
from conftest import ROOT, guest_path, run_kvmpy, tool_required

FUZZ = bool(os.environ.get("KVMPY_FUZZ"))
needs_native = pytest.mark.skipif(not dataplane.available(),
                                  reason=f"native data plane not built: {dataplane.unavailable_reason()}")

O_DIRECT = os.O_DIRECT
O_DSYNC = os.O_DSYNC
MODE_FLAGS = {"writeback": 0, "none": O_DIRECT, "directsync": O_DIRECT | O_DSYNC, "writethrough": O_DSYNC,
              "unsafe": 0}


def _direct_io_skip_reason(directory) -> str | None:
    probe = os.path.join(directory, ".odirect-probe")
    with open(probe, "wb") as f:
        f.write(bytes(4096))
    try:
        os.close(os.open(probe, os.O_RDONLY | O_DIRECT))
        return None
    except OSError as e:
        return f"{directory}: this file system refuses O_DIRECT ({e.strerror})"
    finally:
        os.unlink(probe)


@pytest.fixture
def direct_dir(tmp_path):
    reason = _direct_io_skip_reason(tmp_path)
    if reason:
        pytest.skip(reason)
    return tmp_path


def fd_flags(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return int(re.search(r"^flags:\s+([0-7]+)", f.read(), re.M).group(1), 8)


# --- the drivers' Python path -------------------------------------------------------------

@pytest.mark.parametrize("mode", sorted(MODE_FLAGS))
def test_each_mode_opens_the_image_with_its_flags(direct_dir, mode):
    for fmt in ("raw", "qcow2"):
        path = direct_dir / f"d-{mode}.{fmt}"
        if fmt == "raw":
            path.write_bytes(bytes(1 << 20))
        else:
            create_qcow2(str(path), 1 << 20)
        with open_image(str(path), fmt, cache=mode) as drv:
            flags = fd_flags(os.getpid(), drv.fd)
            assert flags & (O_DIRECT | O_DSYNC) == MODE_FLAGS[mode], (fmt, oct(flags))
            assert (direct.alignment_of(drv.fd) is not None) == bool(MODE_FLAGS[mode] & O_DIRECT)
        assert direct.alignment_of(drv.fd) is None


@pytest.mark.parametrize("fmt,options", [("vmdk", []), ("vmdk", ["-o", "subformat=streamOptimized"]),
                                         ("vdi", [])])
def test_read_only_formats_honour_the_mode(direct_dir, fmt, options):
    """vmdk and vdi are read-only in kvmpy, so only O_DIRECT matters: under none and
    directsync their reads (headers, tables, grains, compressed grains at odd
    offsets) bypass the page cache and still give qemu-img's bytes."""
    qemu_img = tool_required("qemu-img")
    rnd = random.Random(7)
    raw = direct_dir / "src.raw"
    content = bytearray(2 << 20)
    for start in range(0, len(content), 192 << 10):     # data runs among holes
        content[start:start + (64 << 10)] = rnd.randbytes(64 << 10)
    raw.write_bytes(content)
    image = direct_dir / f"d.{fmt}"
    subprocess.run([qemu_img, "convert", "-f", "raw", "-O", fmt, *options, str(raw), str(image)], check=True)
    for mode in sorted(MODE_FLAGS):
        with open_image(str(image), fmt, read_only=True, cache=mode) as drv:
            assert fd_flags(os.getpid(), drv.fd) & O_DIRECT == MODE_FLAGS[mode] & O_DIRECT, (mode,)
            assert (direct.alignment_of(drv.fd) is not None) == bool(MODE_FLAGS[mode] & O_DIRECT)
            assert drv.pread(len(content), 0) == content, mode
            for _ in range(20):
                offset = rnd.randrange(len(content))
                length = rnd.randint(1, min(70000, len(content) - offset))
                assert drv.pread(length, offset) == content[offset:offset + length], (mode, offset, length)
        assert direct.alignment_of(drv.fd) is None


DISK = 1 << 20
ACCESS = st.tuples(st.booleans(), st.integers(0, DISK - 1), st.integers(1, 9000), st.integers(0, 7))


@settings(max_examples=200 if FUZZ else 25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(accesses=st.lists(ACCESS, min_size=1, max_size=20), odd_size=st.integers(0, 511))
def test_unaligned_reads_and_writes_on_o_direct_read_back_as_written(direct_dir, accesses, odd_size):
    """Any offset, length and buffer address (qcow2's 8-byte table entries, a
    guest's odd buffers) on an O_DIRECT raw image: the bytes a page-cache model
    holds, and a file size the padding of a block never grows."""
    size = DISK - odd_size
    path = direct_dir / "u.raw"
    model = bytearray(os.urandom(size))
    path.write_bytes(model)
    with RawDriver(str(path), cache="none") as drv:
        assert fd_flags(os.getpid(), drv.fd) & O_DIRECT
        for write, offset, length, skew in accesses:
            offset = min(offset, size - 1)
            length = min(length, size - offset)
            space = bytearray(length + skew)
            view = memoryview(space)[skew:]
            if write:
                view[:] = os.urandom(length)
                half = length // 2
                drv.pwritev([view[:half], view[half:]], offset)
                model[offset:offset + length] = view
            else:
                drv.preadv([view], offset)
                assert view == model[offset:offset + length]
            assert direct.pread(drv.fd, length, offset) == model[offset:offset + length]
    assert os.path.getsize(path) == size
    assert path.read_bytes() == model


def test_qcow2_metadata_under_o_direct_and_qemu_img_check(direct_dir):
    """qcow2's tables are read and written in pieces of any size: under O_DIRECT they
    go through the bounce path, and qemu-img finds the image clean and the data there."""
    qemu_img = tool_required("qemu-img")
    path = direct_dir / "m.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "32M"],
                   check=True)
    model = {}
    rnd = random.Random(7)
    with Qcow2Driver(str(path), cache="none") as drv:
        assert fd_flags(os.getpid(), drv.fd) & O_DIRECT
        for i in range(300):
            sector = rnd.randrange(0, (32 << 20) // 512 - 64)
            n = rnd.randrange(1, 64)
            data = bytes([i & 0xFF]) * (n * 512)
            drv.pwrite(data, sector * 512)
            for s in range(n):
                model[sector + s] = i & 0xFF
            if i % 50 == 0:
                drv.flush()
        drv.flush()
    check = subprocess.run([qemu_img, "check", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    with open_image(str(path), "qcow2", read_only=True) as drv:
        for sector, value in model.items():
            assert drv.pread(512, sector * 512) == bytes([value]) * 512


# --- configuration ---------------------------------------------------------------------------

def test_cache_key_and_option(tmp_path):
    toml = tmp_path / "vm.toml"
    toml.write_text('[[disk]]\npath = "d.raw"\ncache = "none"\n[[disk]]\npath = "e.raw"\n')
    cfg = load_config(str(toml))
    assert [d.cache for d in cfg.disks] == ["none", "writeback"]
    toml.write_text('[[disk]]\npath = "d.raw"\ncache = "direct"\n')
    with pytest.raises(ConfigError, match=r"\[\[disk\]\] #1 key 'cache'"):
        load_config(str(toml))
    assert parse_drive("file=d.raw,cache=directsync").cache == "directsync"
    with pytest.raises(ConfigError, match="cache"):
        parse_drive("file=d.raw,cache=sometimes")


# --- the device: the write cache and the native data plane's bounce path --------------------

from test_dataplane import DATA, HDR, SLOTS, STATUS, Rig  # noqa: E402  (the data plane's test rig)


def put_split(rig, rtype, sector, payload=b"", in_len=0, skew=0):
    """One request whose data sits ``skew`` bytes into its slot, in two buffers split
    off any sector boundary: what O_DIRECT cannot take as it is."""
    n = rig.n % SLOTS
    rig.n += 1
    hdr = HDR + 0x100 * n
    rig.m.memory.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
    data = DATA + 0x10000 * n + skew
    length = len(payload) or in_len
    cut = length // 2 + 3 if length > 8 else length
    pieces = [(data, cut)] + ([(data + cut, length - cut)] if length > cut else [])
    readable, writable = [(hdr, 16)], []
    if payload:
        rig.m.memory.write(data, payload)
        readable += pieces
    elif in_len:
        rig.m.memory.write(data, b"\xcc" * in_len)
        writable += pieces
    rig.m.memory.write(STATUS + n, b"\xee")
    writable.append((STATUS + n, 1))
    return rig.q.add(readable, writable), n, data


def run_split(rig, rtype, sector, payload=b"", in_len=0, skew=0):
    head, n, data = put_split(rig, rtype, sector, payload, in_len, skew)
    rig.d.kick(0)
    (h, used), = rig.d.wait_used(0)
    assert h == head
    return rig.m.memory.read(STATUS + n, 1)[0], used, rig.m.memory.read(data, in_len)


def random_script(rnd: random.Random, count: int, sectors: int):
    script = []
    for i in range(count):
        rtype = rnd.choice((VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH))
        nsec = rnd.randrange(1, 64)
        sector = rnd.randrange(0, sectors - nsec)
        skew = rnd.choice((0, 0, 1, 3, 511, 512, 2048))
        payload = bytes([rnd.randrange(256)]) * (nsec * 512) if rtype == VIRTIO_BLK_T_OUT else b""
        script.append((rtype, sector, payload, nsec * 512 if rtype == VIRTIO_BLK_T_IN else 0, skew))
    return script


def make_image(path, fmt, size):
    if fmt == "raw":
        path.write_bytes(bytes(range(256)) * (size // 256))
    else:
        subprocess.run([tool_required("qemu-img"), "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
                        str(path), str(size)], check=True)


@needs_native
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@settings(max_examples=20 if FUZZ else 3, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_unaligned_guest_buffers_under_cache_none_same_as_the_model(direct_dir, fmt, seed):
    """Reads and writes with buffers off every alignment O_DIRECT wants, on a
    cache=none disk served by the native data plane, against the Python model on
    the page cache: the same statuses, data and image, and the thread served most
    of them (through its bounce buffer). qcow2 images stay clean for qemu-img."""
    size = 8 << 20
    base = direct_dir / f"s{seed}"
    base.mkdir()
    rnd = random.Random(seed)
    script = random_script(rnd, 60, size // 512)
    images = [base / f"native.{fmt}", base / f"python.{fmt}"]
    for path in images:
        make_image(path, fmt, size)
    drivers = [open_image(str(images[0]), fmt, cache="none"), open_image(str(images[1]), fmt)]
    rigs = [Rig(images[0], mode="native", driver=drivers[0]), Rig(images[1], mode="python", driver=drivers[1])]
    try:
        answers = [[run_split(r, *req) for req in script] for r in rigs]
        assert answers[0] == answers[1]
        assert all(status == 0 for status, _, _ in answers[0])
        if fmt == "raw":
            # qcow2 leaves allocating writes to the model; on raw the thread serves them all
            assert rigs[0].native_requests() >= len(script) // 2
        assert rigs[1].native_requests() == 0
    finally:
        for r in rigs:
            r.close()
    if fmt == "qcow2":
        qemu_img = tool_required("qemu-img")
        for path in images:
            check = subprocess.run([qemu_img, "check", str(path)], capture_output=True, text=True)
            assert check.returncode == 0, check.stdout + check.stderr
        converted = [base / f"{p.stem}.flat" for p in images]
        for src, dst in zip(images, converted):
            subprocess.run([qemu_img, "convert", "-O", "raw", str(src), str(dst)], check=True)
        images = converted
    assert images[0].read_bytes() == images[1].read_bytes()


def test_write_cache_follows_the_mode_and_the_guest(direct_dir):
    """writeback/none/unsafe offer a write cache, writethrough/directsync none (the
    config's writeback byte); with CONFIG_WCE the driver switches it, and a reset
    goes back to the mode's."""
    path = direct_dir / "w.raw"
    path.write_bytes(bytes(1 << 20))
    for mode, cached in (("none", True), ("directsync", False), ("writethrough", False), ("unsafe", True)):
        with RawDriver(str(path), cache=mode) as drv:
            blk = VirtioBlk(drv, dataplane="python", write_cache=direct.cache_mode(mode).write_cache)
            assert blk.device_features() >> VIRTIO_BLK_F_CONFIG_WCE & 1
            assert blk.config_bytes()[32] == cached, mode
            blk.write_config(32, 1, int(not cached))
            assert blk.config_bytes()[32] == cached, "not without CONFIG_WCE negotiated"
            blk.ack_features(1 << VIRTIO_BLK_F_CONFIG_WCE | 1 << 9)
            blk.write_config(32, 1, int(not cached))
            assert blk.config_bytes()[32] == (not cached) and blk.state().write_cache == (not cached)
            again = VirtioBlk.from_state(blk.state(), drv)
            assert again.config_bytes()[32] == (not cached)
            blk.reset()
            assert blk.config_bytes()[32] == cached


@needs_native
def test_write_cache_off_makes_the_thread_write_through(tmp_path):
    """The guest turning the write cache off restarts the native thread write-through."""
    path = tmp_path / "t.raw"
    path.write_bytes(bytes(8 << 20))
    rig = Rig(path, mode="native", driver=RawDriver(str(path)))
    rig.features |= 1 << VIRTIO_BLK_F_CONFIG_WCE
    rig.start()
    try:
        assert rig.blk.native_backend().write_through is False
        rig.m.mmio_write(rig.d._region(4) + 32, 1, 0)     # the device config's writeback byte
        assert rig.blk.write_cache is False
        assert rig.blk.native_backend().write_through is True
        status, _, _ = run_split(rig, VIRTIO_BLK_T_OUT, 8, payload=b"w" * 4096)
        assert status == 0 and path.read_bytes()[4096:8192] == b"w" * 4096
    finally:
        rig.close()


# --- the VM process ------------------------------------------------------------------------

def _image_fds(pid: int, image) -> list[int]:
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == str(image):
                found.append(int(name))
        except OSError:
            continue
    return found


@pytest.mark.guest
@pytest.mark.parametrize("mode", sorted(MODE_FLAGS))
def test_vm_image_fd_flags(direct_dir, kvm_required, mode):
    """/proc/PID/fdinfo of the running VM: its image is open with the mode's flags."""
    from test_block_errors import Vm
    img = direct_dir / "d.raw"
    img.write_bytes(bytes(8 << 20))
    vm = Vm(direct_dir, f"file={img},format=raw,cache={mode}", "sector=8 bytes=4096 waitkey=1")
    try:
        vm.read_until(b"virtio-blk: waiting for a key")
        fds = _image_fds(vm.proc.pid, img)
        assert fds, "the VM holds its image open"
        for fd in fds:
            assert fd_flags(vm.proc.pid, fd) & (O_DIRECT | O_DSYNC) == MODE_FLAGS[mode], (mode, fd)
        block = vm.qmp.cmd("query-block")[0]["inserted"]["cache"]
        assert block == {"writeback": mode in ("writeback", "none", "unsafe"), "direct": mode in ("none", "directsync"),
                         "no-flush": mode == "unsafe"}
        # HMP prints it as QEMU's does: "writeback, direct" for none, ", ignore flushes" for unsafe.
        hmp = vm.qmp.cmd("human-monitor-command", **{"command-line": "info block"})
        want = {"writeback": "writeback", "none": "writeback, direct", "unsafe": "writeback, ignore flushes",
                "writethrough": "writethrough", "directsync": "writethrough, direct"}[mode]
        assert f"    Cache mode:       {want}" in hmp.splitlines(), hmp
        vm.key()
        assert vm.finish() == 0
        assert b"virtio-blk: pattern ok" in vm.out
    finally:
        vm.close()


@pytest.mark.guest
@pytest.mark.parametrize("misalign", [3, 512 + 100])
def test_guest_with_unaligned_buffers_under_cache_none(direct_dir, kvm_required, misalign):
    """The test guest's pattern written and read back from buffers off their page
    (two descriptors split off a sector) on a cache=none disk: the same output and
    image with the native data plane and the Python model."""
    outputs, images = [], []
    for dp in ("native", "python"):
        img = direct_dir / f"{dp}.raw"
        img.write_bytes(b"KVMPY-DISK-MAGIC".ljust(512, b"\0"))
        os.truncate(img, 8 << 20)
        p = run_kvmpy(["run", "--enable-kvm", "--kernel", guest_path("virtio_blk"), "--append",
                       f"sector=2047 bytes=32768 misalign={misalign} rand=50 depth=8",
                       "--drive", f"file={img},format=raw,cache=none,dataplane={dp}"], timeout=120)
        out = p.stdout.decode()
        assert p.returncode == 0, out + p.stderr.decode()
        assert "virtio-blk: pattern ok" in out and "guest: done" in out
        outputs.append([line for line in out.splitlines() if "cycles=" not in line])
        images.append(img.read_bytes())
    assert outputs[0] == outputs[1]
    assert images[0] == images[1]


REFUSE = r"""
set -e
mnt=$1 fstype=$2
shift 2
mount -t "$fstype" kvmpy-nodirect "$mnt"
truncate -s 8M "$mnt/d.raw"
exec "$@"
"""


def _fs_refusing_o_direct() -> str | None:
    """tmpfs where this kernel refuses O_DIRECT on it (before 6.6), else ramfs (never has it)."""
    try:
        fd = os.open("/dev/shm", os.O_RDWR | os.O_TMPFILE | O_DIRECT)
    except OSError:
        return "tmpfs"
    os.close(fd)
    return "ramfs"


@pytest.mark.guest
def test_file_system_without_o_direct_is_one_line_and_status_2(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: the file system without O_DIRECT is mounted in a private mount namespace")
    tool_required("unshare")
    fstype = _fs_refusing_o_direct()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", REFUSE, "sh", str(mnt), fstype,
           sys.executable, "-m", "kvmpy", "run", "--kernel", guest_path("virtio_blk"),
           "--drive", f"file={mnt}/d.raw,format=raw,cache=none"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1, p.stderr
    assert lines[0] == f"kvmpy: Could not open '{mnt}/d.raw': filesystem does not support O_DIRECT (cache=none)", (
        fstype, lines)


@needs_native
def test_aligned_requests_under_cache_none_go_straight_to_the_ring(direct_dir):
    """Page-aligned guest buffers on a cache=none disk need no bounce: the thread
    serves every request, reads and writes through its io_uring where it has one."""
    path = direct_dir / "a.raw"
    path.write_bytes(bytes(8 << 20))
    rig = Rig(path, mode="native", driver=RawDriver(str(path), cache="none"))
    try:
        writes = SLOTS - 1
        for i in range(writes):
            rig.put(VIRTIO_BLK_T_OUT, 128 * i, out=bytes([i + 1]) * 65536)
        rig.d.kick(0)
        assert len(rig.d.wait_used(0, count=writes)) == writes
        rig.n = 0
        reads = [rig.put(VIRTIO_BLK_T_IN, 128 * i, in_len=65536) for i in range(writes)]
        rig.d.kick(0)
        assert len(rig.d.wait_used(0, count=writes)) == writes
        for _head, n in reads:
            assert rig.m.memory.read(STATUS + n, 1)[0] == 0
            assert rig.m.memory.read(DATA + 0x10000 * n, 65536) == bytes([n + 1]) * 65536
        assert rig.native_requests() == 2 * writes
        has_ring = any(r is not None for r in rig.blk._rings)
        assert rig.dev.native_ring_ops == (2 * writes if has_ring else 0)
    finally:
        rig.close()


FLUSH_SCRIPT = """
import os, sys
from kvmpy.block import open_image
path, fmt, mode = sys.argv[1:4]
with open_image(path, fmt, cache=mode) as drv:
    drv.pwrite(b"x" * 4096, 65536)
    os.write(1, b"flush-begins\\n")
    drv.flush()
    os.write(1, b"flush-ends\\n")
"""


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_flush_is_durable_in_every_mode_but_unsafe(direct_dir, fmt):
    """The system calls a guest's flush makes, seen by strace: fdatasync in every
    mode (O_DIRECT and O_DSYNC leave the file system's metadata and the device's
    cache to it), none under cache=unsafe."""
    strace = tool_required("strace")
    path = direct_dir / f"f.{fmt}"
    make_image(path, fmt, 1 << 20)
    for mode in sorted(MODE_FLAGS):
        # Between the two writes to stdout: the flush's calls only (the first write's
        # qcow2 allocation writes its tables out at the flush).
        p = subprocess.run([strace, "-f", "-qq", "-e", "trace=fdatasync,fsync,write", "-e", "signal=none",
                            sys.executable, "-c", FLUSH_SCRIPT, str(path), fmt, mode],
                           cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                           timeout=60)
        if p.returncode and "ptrace" in p.stderr:
            pytest.skip(f"strace cannot trace here: {p.stderr.strip().splitlines()[-1]}")
        assert p.returncode == 0, p.stderr
        trace = p.stderr
        during = trace[trace.index('"flush-begins\\n"'):trace.index('"flush-ends\\n"')]
        syncs = len(re.findall(r"\b(fdatasync|fsync)\(", during))
        if mode == "unsafe":
            assert syncs == 0, (fmt, mode, during)
        else:
            assert syncs >= 1, (fmt, mode, during)


def test_backing_file_inherits_o_direct(direct_dir):
    """As QEMU's cache.direct: the base image of a cache=none overlay is read with
    O_DIRECT too, and unaligned reads through the chain read what qemu-img wrote."""
    qemu_img = tool_required("qemu-img")
    base, top = direct_dir / "base.raw", direct_dir / "top.qcow2"
    content = os.urandom(1 << 20)
    base.write_bytes(content)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top)], check=True)
    for mode, direct_base in (("none", True), ("directsync", True), ("writeback", False)):
        with open_image(str(top), "qcow2", cache=mode) as drv:
            assert bool(fd_flags(os.getpid(), drv.backing.fd) & O_DIRECT) == direct_base, mode
            assert drv.pread(1000, 12345) == content[12345:13345]
