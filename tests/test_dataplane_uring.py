"""The virtio-blk data plane's io_uring path and its worker-thread fallback.

A raw disk's queue threads put a batch's reads and writes into an io_uring made
(and restricted) when the device is built; KVMPY_BLK_AIO=threads, or a kernel or
seccomp filter that refuses io_uring_setup, leaves them on preadv/pwritev and the
read workers. Both paths must give the Python model's answers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy import sandbox
from kvmpy.devices.virtio import dataplane
from kvmpy.devices.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from kvmpy.devices.virtio.pci import DEVICE_NEEDS_RESET
from test_dataplane import DISK, REQUEST, SLOTS, Rig, run_requests

needs_native = pytest.mark.skipif(not dataplane.available(),
                                  reason=f"native data plane not built: {dataplane.unavailable_reason()}")


def uring_refused() -> str | None:
    if not dataplane.available():
        return "native data plane not built"
    ring = dataplane.Ring.make()
    if ring is None:
        return "this kernel refuses io_uring (see the log: io_uring unavailable)"
    ring.close()
    return None


@pytest.fixture(params=["io_uring", "threads"])
def aio(request, monkeypatch):
    if request.param == "io_uring":
        reason = uring_refused()
        if reason:
            pytest.skip(reason)
        monkeypatch.delenv(dataplane.AIO_ENV, raising=False)
    else:
        monkeypatch.setenv(dataplane.AIO_ENV, "threads")
    return request.param


def raw_image(path):
    path.write_bytes(bytes(range(256)) * (DISK // 256))
    return path


@needs_native
def test_a_full_ring_of_writes_then_reads(tmp_path, aio):
    rig = Rig(raw_image(tmp_path / "d.raw"))
    try:
        assert all(r is not None for r in rig.blk._rings) == (aio == "io_uring")
        writes = SLOTS - 1
        heads = [rig.put(VIRTIO_BLK_T_OUT, 128 * i, out=bytes([i + 1]) * 65536)[0] for i in range(writes)]
        # A flush in the batch: it waits for the writes before it.
        heads.append(rig.put(VIRTIO_BLK_T_FLUSH, 0)[0])
        rig.d.kick(0)
        used = rig.d.wait_used(0, count=writes + 1)
        assert sorted(h for h, _ in used) == sorted(heads)
        data = (tmp_path / "d.raw").read_bytes()
        for i in range(writes):
            assert data[128 * 512 * i:128 * 512 * i + 65536] == bytes([i + 1]) * 65536
        rig.n = 0
        reads = [rig.put(VIRTIO_BLK_T_IN, 128 * i + 1, in_len=4096) for i in range(writes)]
        rig.d.kick(0)
        assert len(rig.d.wait_used(0, count=writes)) == writes
        for head, n in reads:
            assert rig.m.memory.read(0x2F0000 + n, 1)[0] == VIRTIO_BLK_S_OK
            assert rig.m.memory.read(0x300000 + 0x10000 * n, 4096) == bytes([n + 1]) * 4096
        assert rig.native_requests() == 2 * writes + 1
        ring_ops = rig.dev.native_ring_ops
        assert ring_ops == 2 * writes if aio == "io_uring" else ring_ops == 0
        assert not rig.d.status & DEVICE_NEEDS_RESET
    finally:
        rig.close()


@needs_native
@settings(max_examples=60 if os.environ.get("KVMPY_FUZZ") else 12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(REQUEST, min_size=1, max_size=12), seed=st.integers(0, 255))
def test_random_requests_same_answers_either_way(tmp_path_factory, aio, requests, seed):
    base = tmp_path_factory.mktemp("aio")
    rigs = [Rig(raw_image(base / "native.raw")), Rig(raw_image(base / "python.raw"), mode="python")]
    try:
        got, want = (run_requests(r, requests, seed) for r in rigs)
        assert got == want
        assert (base / "native.raw").read_bytes() == (base / "python.raw").read_bytes()
        assert not rigs[0].d.status & DEVICE_NEEDS_RESET
    finally:
        for r in rigs:
            r.close()


SANDBOXED = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from kvmpy import sandbox
    from kvmpy.devices.virtio import dataplane
    from kvmpy.devices.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
    from test_dataplane import Rig
    rig = Rig({image!r})                    # its ring is made here, before the filter
    sandbox.install()
    print("ring after the filter:", dataplane.Ring.make())
    for i in range(8):
        assert rig.request(VIRTIO_BLK_T_OUT, 8 * i, out=bytes([i + 1]) * 4096)[0] == VIRTIO_BLK_S_OK
        assert rig.request(VIRTIO_BLK_T_IN, 8 * i, in_len=4096)[2] == bytes([i + 1]) * 4096
    rig.native_requests()
    print("ring ops:", rig.dev.native_ring_ops)
    rig.close()
""")


@needs_native
def test_rings_made_before_the_sandbox_work_under_it(tmp_path):
    reason = sandbox.unavailable_reason() or uring_refused()
    if reason:
        pytest.skip(reason)
    tests = os.path.dirname(os.path.abspath(__file__))
    script = SANDBOXED.format(root=os.path.dirname(tests), tests=tests, image=str(raw_image(tmp_path / "d.raw")))
    env = {k: v for k, v in os.environ.items() if k not in (dataplane.AIO_ENV, sandbox.AUDIT_ENV)}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    # A new ring is refused (EPERM, not a killed process); the one made before serves.
    assert "ring after the filter: None" in p.stdout
    ops = int(p.stdout.split("ring ops:")[1].split()[0])
    assert ops >= 8, p.stdout


@needs_native
def test_a_batch_of_reads_costs_one_enter(tmp_path):
    """32 reads of 64 KiB made available at once and one kick: the thread submits them in one
    io_uring_enter and sleeps in it until the last is done, a wake per batch and not
    one per completion (on the nested L1's single CPU each wake is a context switch
    the polling guest pays for: issue 17's QD32 rows). O_DIRECT, so the reads
    complete one by one on the device rather than at submission from the page cache."""
    from kvmpy.block.raw import RawDriver
    reason = uring_refused()
    if reason:
        pytest.skip(reason)
    path = raw_image(tmp_path / "d.raw")
    try:
        driver = RawDriver(str(path), cache="none")
    except Exception as e:  # noqa: BLE001 - the file system decides
        pytest.skip(f"no O_DIRECT under {tmp_path}: {e}")
    rig = Rig(path, driver=driver, queue_size=128)
    try:
        assert rig.dev.native_queues == (True,)
        count = 32
        # All made available at once, as a driver's batch before its one kick: the
        # thread, whenever it looks, sees none or all of them.
        heads = [rig.put(VIRTIO_BLK_T_IN, 128 * ((37 * i) % (DISK // 65536)), in_len=65536, publish=False)[0]
                 for i in range(count)]
        rig.q.publish_many(heads)
        rig.d.kick(0)
        assert len(rig.d.wait_used(0, count=count)) == count
        rig.dev.state()
        assert rig.dev.native_ring_ops == count
        # One enter for the batch (a wait per completion took 2 to 4).
        assert rig.dev.native_ring_enters == 1, rig.dev.native_ring_enters
        for n in range(16):
            assert rig.m.memory.read(0x2F0000 + n, 1)[0] == VIRTIO_BLK_S_OK
    finally:
        rig.close()
