"""Iothreads: the native data plane serving several disks' queues from one thread
(QEMU's ``-object iothread`` with ``iothread=`` on the device), ``iothread=`` on
``--drive`` and ``[[disk]]``."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.config import ConfigError, load_config, parse_drive
from kvmpy.devices.virtio import dataplane
from kvmpy.devices.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from kvmpy.devices.virtio.pci import DEVICE_NEEDS_RESET
from test_dataplane import DISK, REQUEST, Rig, run_requests
from support.polling import wait_for

needs_native = pytest.mark.skipif(not dataplane.available(),
                                  reason=f"native data plane not built: {dataplane.unavailable_reason()}")


def threads(name: str) -> int:
    """The process's threads named ``name`` (the native planes name theirs), so
    threads other tests left ending, and io_uring's iou-wrk workers, do not count."""
    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                count += f.read().strip() == name
        except OSError:
            continue        # gone meanwhile
    return count


def raw_image(path):
    path.write_bytes(bytes(range(256)) * (DISK // 256))
    return path


@needs_native
def test_disks_naming_one_iothread_share_its_thread(tmp_path):
    dataplane.iothread("io-share")          # the thread itself, before counting
    rigs = []
    try:
        queue_threads = threads("kvmpy-blk")
        for i in range(3):
            rigs.append(Rig(raw_image(tmp_path / f"{i}.raw"), iothread="io-share"))
        assert wait_for(lambda: all(r.dev.native_queues == (True,) for r in rigs))
        assert threads("kvmpy-iothread") >= 1
        rigs.append(Rig(raw_image(tmp_path / "plain.raw")))
        assert wait_for(lambda: rigs[-1].dev.native_queues == (True,))
        # A thread names itself as it starts: wait for the plain disk's, then make
        # sure no other shows up (one an iothread disk started would have by now).
        assert wait_for(lambda: threads("kvmpy-blk") == queue_threads + 1), "a disk on no iothread has its own thread"
        assert not wait_for(lambda: threads("kvmpy-blk") > queue_threads + 1, timeout=0.3), \
            "a disk on the iothread brought a data-plane thread of its own for its queue"
        rigs.pop().close()
        assert all(r.dev.native_queues == (True,) for r in rigs)
        for round_ in range(4):
            for i, rig in enumerate(rigs):
                data = bytes([16 * i + round_ + 1]) * 4096
                assert rig.request(VIRTIO_BLK_T_OUT, 8 * round_, out=data)[0] == VIRTIO_BLK_S_OK
                assert rig.request(VIRTIO_BLK_T_IN, 8 * round_, in_len=4096)[2] == data
        assert [r.native_requests() for r in rigs] == [8, 8, 8]
        # state() took each queue back; it goes to the iothread again on the loop's
        # next turn, and a request sent before that is the model's.
        assert wait_for(lambda: all(r.dev.native_queues == (True,) for r in rigs))
        rigs[0].settle()
        # One disk's request the model must answer: it takes that queue back (and
        # gives it to the iothread again); the others are served on all the while.
        assert rigs[0].request(99, 0)[0] == VIRTIO_BLK_S_UNSUPP
        assert rigs[1].request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK
        assert rigs[0].request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK
        assert rigs[1].native_requests() == 9
        assert not any(r.d.status & DEVICE_NEEDS_RESET for r in rigs)
    finally:
        for r in rigs:
            r.close()


@needs_native
@settings(max_examples=40 if os.environ.get("KVMPY_FUZZ") else 10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(streams=st.lists(st.lists(REQUEST, min_size=1, max_size=8), min_size=2, max_size=2), seed=st.integers(0, 255))
def test_random_streams_through_one_iothread_same_as_the_model(tmp_path_factory, streams, seed):
    base = tmp_path_factory.mktemp("io")
    native = [Rig(raw_image(base / f"n{i}.raw"), iothread="io-random") for i in range(2)]
    python = [Rig(raw_image(base / f"p{i}.raw"), mode="python") for i in range(2)]
    try:
        for i in range(2):
            assert run_requests(native[i], streams[i], seed) == run_requests(python[i], streams[i], seed)
            assert (base / f"n{i}.raw").read_bytes() == (base / f"p{i}.raw").read_bytes()
            assert not native[i].d.status & DEVICE_NEEDS_RESET
    finally:
        for r in native + python:
            r.close()


def test_iothread_key_and_option(tmp_path):
    assert parse_drive("file=/x.raw").iothread == ""
    assert parse_drive("file=/x.raw,iothread=io0").iothread == "io0"
    for bad in ("", "0io", "a b", "x" * 65):
        with pytest.raises(ConfigError, match=r"--drive file=/x.raw,iothread=.*: iothread: expected an iothread name"):
            parse_drive(f"file=/x.raw,iothread={bad}")
    toml = tmp_path / "vm.toml"
    (tmp_path / "d.raw").write_bytes(bytes(4096))
    toml.write_text('[[disk]]\npath = "d.raw"\niothread = "io1"\n')
    assert load_config(str(toml)).disks[0].iothread == "io1"
    for bad in ('"-x"', "1", "true"):
        toml.write_text(f'[[disk]]\npath = "d.raw"\niothread = {bad}\n')
        with pytest.raises(ConfigError, match=r"\[\[disk\]\] #1 key 'iothread': expected an iothread name"):
            load_config(str(toml))


@pytest.mark.guest
@needs_native
def test_guest_under_kvm_with_two_disks_on_one_iothread(tmp_path, kvm_required):
    from conftest import guest_path, run_kvmpy
    images = []
    for i in range(2):
        img = tmp_path / f"d{i}.raw"
        img.write_bytes(bytes(8 << 20))
        images.append(img)
    p = run_kvmpy(["run", "--enable-kvm", "--kernel", guest_path("virtio_blk"), "--append",
                   "sector=2048 bytes=32768 qd=32 rand=200 randw=200",
                   "--drive", f"file={images[0]},format=raw,queues=2,iothread=io0",
                   "--drive", f"file={images[1]},format=raw,iothread=io0"], timeout=120)
    out = p.stdout.decode()
    assert p.returncode == 0, out + p.stderr.decode()
    assert "virtio-blk: pattern ok" in out and "randw4k=200" in out and "guest: done" in out


def test_qemu_object_iothread_and_device_iothread(tmp_path):
    from kvmpy.qemu_cli import config_from_qemu_args
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(1 << 20))
    drive = ["-drive", f"if=none,id=d0,file={img},format=raw"]
    cfg = config_from_qemu_args(["-object", "iothread,id=io0,poll-max-ns=32768", *drive,
                                 "-device", "virtio-blk-pci,drive=d0,iothread=io0,num-queues=4"])[0]
    assert (cfg.disks[0].iothread, cfg.disks[0].queues) == ("io0", 4)
    for argv, message in (
            (["-object", "iothread"], r"-object iothread: missing id="),
            (["-object", "iothread,id=a", "-object", "iothread,id=a"], r"iothread a is already defined"),
            (["-object", "memory-backend-ram,id=m"], r"-object memory-backend-ram: not supported by kvmpy"),
            ([*drive, "-device", "virtio-blk-pci,drive=d0,iothread=io9"],
             r"iothread=io9 names no -object iothread given before it"),
            (["-object", "iothread,id=io0", *drive, "-device", "virtio-blk-pci,drive=d0,num-queues=99"],
             r"num-queues: expected a number of queues from 1 to 16")):
        with pytest.raises(ConfigError, match=message):
            config_from_qemu_args(argv)


@pytest.mark.guest
@needs_native
def test_query_iothreads_names_the_vms_iothread(tmp_path, kvm_required):
    """QMP query-iothreads and HMP info iothreads, as QEMU's: the iothread the disk
    names, with the kernel id of the VM's thread that serves it."""
    from test_block_errors import Vm
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(8 << 20))
    vm = Vm(tmp_path, f"file={img},format=raw,iothread=io-q", "sector=8 bytes=4096 waitkey=1")
    try:
        vm.read_until(b"virtio-blk: waiting for a key")
        [entry] = vm.qmp.cmd("query-iothreads")
        assert entry["id"] == "io-q" and entry["poll-max-ns"] == 0
        with open(f"/proc/{vm.proc.pid}/task/{entry['thread-id']}/comm") as f:
            assert f.read().strip() == "kvmpy-iothread"
        hmp = vm.qmp.cmd("human-monitor-command", **{"command-line": "info iothreads"}).splitlines()
        assert hmp[:2] == ["io-q:", f"  thread_id={entry['thread-id']}"], hmp
        vm.key()
        assert vm.finish() == 0
    finally:
        vm.close()
