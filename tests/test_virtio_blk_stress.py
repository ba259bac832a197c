"""virtio-blk under a driver with 32 writes in flight and two vCPUs kicking, on an O_DIRECT raw image.

Once, a benchmark's guest (tests/guests/virtio_blk.elf qd=32 randw=N) saw a used
entry whose status byte still held the 0xff it put there: a completion published
before its status was written, or one for a chain the device had not served.
These tests hunt for that on the real parts (a raw image opened cache=none, the
Python model and the native plane, the transport's doorbells and event loop):
two threads share the ring as two vCPUs would (the ring under the driver's lock,
the doorbell written outside it), with sector-aligned and unaligned buffers, one
or two data descriptors, any whole number of sectors (part of a block where the
file system's blocks are larger, which the plane leaves to the model). Every used entry must name a chain in flight, come once, carry length 1
and a status byte of VIRTIO_BLK_S_OK written before it; the image must then hold
every write, and the used entries come in the order the chains were made
available (the native plane's batches complete in any order, but it publishes
in ring order: its hand-back point is a ring position).
"""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.block import direct
from kvmpy.block.raw import RawDriver
from kvmpy.devices.virtio import dataplane
from kvmpy.devices.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT, VirtioBlk
from kvmpy.devices.virtio.pci import VIRTIO_F_VERSION_1
from support.virtio_driver import SoftMachine, VirtioPciDriver

DEPTH = 32
QUEUE_SIZE = 128           # four descriptors per request at most: header, two data, status
CHUNK_SECTORS = 64         # each request writes inside a chunk of its own (32 KiB)
CHUNKS = 96
DISK = CHUNKS * CHUNK_SECTORS * 512
HDR = 0x200000
STATUS = 0x2F0000          # the status bytes side by side, as the guest's slot_status[]
DATA = 0x300000            # 128 KiB per slot: 8 KiB of data at most, at any offset in its page
UNWRITTEN = 0xFF           # what the driver leaves in a status byte before it submits
FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << 9
FUZZ = int(os.environ.get("KVMPY_FUZZ", "0") or 0)


def _o_direct_refused(directory) -> str | None:
    probe = os.path.join(directory, ".odirect-probe")
    with open(probe, "wb") as f:
        f.write(bytes(4096))
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        return None
    except OSError as e:
        return f"{directory}: this file system refuses O_DIRECT ({e.strerror}), which cache=none needs"
    finally:
        os.unlink(probe)


writes = st.lists(
    st.tuples(st.integers(0, CHUNKS - 1),             # chunk: no two requests overlap
              st.integers(0, CHUNK_SECTORS - 1),       # first sector in the chunk
              st.integers(1, 16),                      # sectors
              st.sampled_from([0, 0, 512, 1, 7, 3000]),  # buffer offset from its page: aligned, or not
              st.integers(0, 2)),                      # where a two-descriptor split falls (0: one descriptor)
    min_size=DEPTH, max_size=3 * DEPTH, unique_by=lambda w: w[0])


class TwoVcpuDriver:
    """The driver side of one queue shared by two submitting threads."""

    def __init__(self, image: str, mode: str) -> None:
        self.m = SoftMachine()
        self.driver = RawDriver(image, cache="none")
        self.dev = self.m.virtio_pci(VirtioBlk(self.driver, dataplane=mode))
        self.d = VirtioPciDriver(self.m, self.m.pci.add(self.dev))
        self.d.negotiate(FEATURES)
        # INTx and no vector: the benchmark guest polls the used ring
        self.q = self.d.setup_queue(0, QUEUE_SIZE)
        self.d.driver_ok()
        self.d.common_write(0x16, 2, 0)
        self.notify = self.d._region(2) + self.d.common_read(0x1E, 2) * self.d.notify_mult
        self.lock = threading.Lock()          # the driver's virtqueue lock
        self.in_flight: dict[int, int] = {}   # head -> slot
        self.free_slots = list(range(DEPTH))
        self.problems: list[str] = []
        self.completed = 0
        # Both the model and the native plane answer in ring order (the plane's
        # hand-back point is a ring position), however its batches complete.
        self.avail_order: list[int] = []
        self.used_order: list[int] = []
        self._first_turn_to_the_model(mode)

    def _first_turn_to_the_model(self, mode: str) -> None:
        """A flush the model answers; afterwards the native plane (if any) has the
        queue, else the model would keep it for as long as the two threads keep
        it busy."""
        hdr = HDR + 0x40 * DEPTH
        self.m.memory.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_FLUSH, 0, 0))
        self.m.memory.write(STATUS + DEPTH, bytes([UNWRITTEN]))
        self.q.add([(hdr, 16)], [(STATUS + DEPTH, 1)])
        self.m.mmio_write(self.notify, 2, 0)
        deadline = time.monotonic() + 5
        while not self.q.collect():
            assert time.monotonic() < deadline, "the flush did not complete"
            time.sleep(0.0005)
        assert self.m.memory.read(STATUS + DEPTH, 1)[0] == VIRTIO_BLK_S_OK
        while mode == "native" and self.dev.native_queues != (True,):
            assert time.monotonic() < deadline, "the native plane did not take the queue"
            time.sleep(0.0005)

    def submit(self, slot: int, sector: int, data: bytes, misalign: int, split: int) -> None:
        hdr = HDR + 0x40 * slot
        self.m.memory.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, sector))
        buf = DATA + 0x20000 * slot + misalign
        self.m.memory.write(buf, data)
        cut = {0: len(data), 1: 512, 2: len(data) // 2 + 1}[split] if len(data) > 512 else len(data)
        readable = [(hdr, 16), (buf, cut)] + ([(buf + cut, len(data) - cut)] if cut < len(data) else [])
        self.m.memory.write(STATUS + slot, bytes([UNWRITTEN]))
        with self.lock:
            head = self.q.add(readable, [(STATUS + slot, 1)])
            self.in_flight[head] = slot
            self.avail_order.append(head)
        # the doorbell outside the lock, as Linux's virtqueue_notify
        self.m.mmio_write(self.notify, 2, 0)

    def reap(self) -> int:
        """Check the used entries so far and free their slots; returns how many."""
        with self.lock:
            used = self.q.collect()
            for head, length in used:
                self.used_order.append(head)
                slot = self.in_flight.pop(head, None)
                if slot is None:
                    self.problems.append(f"used entry for head {head}, which is not in flight")
                    continue
                status = self.m.memory.read(STATUS + slot, 1)[0]
                if status != VIRTIO_BLK_S_OK or length != 1:
                    self.problems.append(f"head {head} (slot {slot}): status {status}, used length {length}")
                self.free_slots.append(slot)
                self.completed += 1
            return len(used)

    def take_slot(self) -> int:
        """A free slot, reaping completions until one is (DEPTH requests in flight at most)."""
        deadline = time.monotonic() + 10
        while True:
            with self.lock:
                if self.free_slots:
                    return self.free_slots.pop()
            if not self.reap():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(self.in_flight)} requests in flight, none completes")
                time.sleep(0.0002)

    def close(self) -> None:
        self.dev.close()
        self.driver.close()
        self.m.close()


def run_two_vcpus(rig: TwoVcpuDriver, requests: list, want: bytearray) -> None:
    """Each thread submits half of ``requests`` (and reaps as it goes); ``want``
    gets what the image must hold afterwards."""
    errors: list[BaseException] = []

    def vcpu(share):
        try:
            for chunk, first, count, misalign, split in share:
                sector = chunk * CHUNK_SECTORS + min(first, CHUNK_SECTORS - count)
                data = bytes([(sector * 7 + count) % 251 + 1]) * (count * 512)
                want[sector * 512:sector * 512 + len(data)] = data
                rig.submit(rig.take_slot(), sector, data, misalign, split)
                rig.reap()
        except BaseException as e:     # the main thread reports it
            errors.append(e)

    threads = [threading.Thread(target=vcpu, args=(requests[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    deadline = time.monotonic() + 10
    while rig.completed < len(requests) and time.monotonic() < deadline:
        if not rig.reap():
            time.sleep(0.0005)
    assert rig.completed == len(requests), f"{rig.completed} of {len(requests)} requests completed"


@pytest.mark.parametrize("mode", ["python", "native"])
def test_qd32_writes_from_two_vcpus_complete_once_with_their_status(tmp_path, mode):
    if mode == "native" and not dataplane.available():
        pytest.skip(f"native data plane not built: {dataplane.unavailable_reason()}")
    refused = _o_direct_refused(tmp_path)
    if refused:
        pytest.skip(refused)

    @settings(max_examples=8 * (10 if FUZZ else 1), deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(requests=writes)
    def run(requests):
        image = tmp_path / f"disk-{mode}.raw"
        initial = bytes(range(256)) * (DISK // 256)
        image.write_bytes(initial)
        want = bytearray(initial)
        rig = TwoVcpuDriver(str(image), mode)
        try:
            run_two_vcpus(rig, requests, want)
            assert not rig.problems, rig.problems[:5]
            assert rig.used_order == rig.avail_order
            rig.dev.state()     # a native thread stops: nothing of it still runs
            if mode == "native" and direct.alignment_of(rig.driver.fd).offset <= 512:
                # every request is whole blocks then: the plane has no reason to hand any back
                assert rig.dev.native_requests > 0, "the plane served none of them"
        finally:
            rig.close()
        assert image.read_bytes() == bytes(want)

    run()
