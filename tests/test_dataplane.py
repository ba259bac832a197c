"""virtio-blk's native data plane, driven from Python as a guest would, on real raw images.

Each test runs the same requests with ``dataplane="native"`` and, where the answer
is compared, ``"python"``: the C thread must answer exactly as the model, hand every
case it leaves to the model back without losing or doubling a request, and stop
cleanly on reset, a moved ring and ``state()``.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.block.raw import RawDriver
from kvmpy.config import ConfigError, load_config, parse_drive
from kvmpy.devices.virtio import dataplane
from kvmpy.devices.virtio.blk import (VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
                                      VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
                                      VIRTIO_BLK_T_WRITE_ZEROES, VirtioBlk)
from kvmpy.devices.virtio.pci import DEVICE_NEEDS_RESET, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1
from kvmpy.devices.virtio.queue import VIRTQ_DESC_F_NEXT
from conftest import tool_required
from support.virtio_driver import SoftMachine, VirtioPciDriver
from support.polling import settle, wait_for

needs_native = pytest.mark.skipif(not dataplane.available(),
                                  reason=f"native data plane not built: {dataplane.unavailable_reason()}")

DISK = 8 << 20
HDR = 0x200000
STATUS = 0x2F0000
DATA = 0x300000          # 16 slots of 64 KiB
SLOTS = 16
FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << 9 | 1 << 13 | 1 << 14 | 1 << 28


class Recorder:
    """BlockErrors as the machine would take them: reports and the retries `cont` runs."""

    def __init__(self, events) -> None:
        self.events = events
        self.reports: list[tuple[str, str, str]] = []
        self.retries: list = []

    def io_error(self, device, node_name, operation, action, nospace, reason, retry=None):
        self.reports.append((operation, action, reason))
        if retry is not None:
            self.retries.append(retry)

    def cont(self) -> None:
        retries, self.retries = self.retries, []
        for retry in retries:
            self.events.call_soon(retry)


class Rig:
    def __init__(self, image, mode="native", event_idx=False, werror="enospc", ring_base=0x100000,
                 queue_size=64, flush=True, restrict_block0=False, driver=None, iothread=""):
        self.m = SoftMachine()
        self.driver = driver or RawDriver(str(image), restrict_block0=restrict_block0)
        self.errors = Recorder(self.m.events)
        self.blk = VirtioBlk(self.driver, serial="dp-serial", dataplane=mode, werror=werror, errors=self.errors,
                             iothread=iothread)
        self.dev = self.m.virtio_pci(self.blk)
        self.d = VirtioPciDriver(self.m, self.m.pci.add(self.dev), ring_base=ring_base)
        self.event_idx = event_idx
        self.queue_size = queue_size
        self.features = FEATURES | (event_idx << VIRTIO_F_RING_EVENT_IDX)
        if not flush:
            self.features &= ~(1 << 9)
        self.start()

    def start(self, ring_base=None):
        if ring_base is not None:
            self.d.ring_base = ring_base
        self.d.negotiate(self.features)
        self.d.enable_msix()
        self.q = self.d.setup_queue(0, self.queue_size, vector=1, event_idx=self.event_idx)
        self.d.common_write(0x10, 2, 0)
        self.d.driver_ok()
        self.n = 0
        # The model serves the queue once at DRIVER_OK, then hands it to the thread.
        self.settle()

    def put(self, rtype, sector, out=b"", in_len=0, publish=True):
        """Lay out one request in the next slot and make it available; returns (head, slot)."""
        n = self.n % SLOTS
        self.n += 1
        hdr = HDR + 0x100 * n
        self.m.memory.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        data = DATA + 0x10000 * n
        readable, writable = [(hdr, 16)], []
        if out:
            self.m.memory.write(data, out)
            readable.append((data, len(out)))
        if in_len:
            self.m.memory.write(data, b"\xcc" * in_len)
            writable.append((data, in_len))
        self.m.memory.write(STATUS + n, b"\xee")
        writable.append((STATUS + n, 1))
        return self.q.add(readable, writable, publish=publish), n

    def request(self, rtype, sector, out=b"", in_len=0):
        """One request to completion: (status, used length, data read)."""
        head, n = self.put(rtype, sector, out, in_len)
        self.d.kick(0)
        (h, used), = self.d.wait_used(0)
        assert h == head
        return self.m.memory.read(STATUS + n, 1)[0], used, self.m.memory.read(DATA + 0x10000 * n, in_len)

    def settle(self):
        assert settle(self.m.events)

    def native_requests(self) -> int:
        """Requests the C threads answered so far (state() takes the queues back)."""
        self.dev.state()
        return self.dev.native_requests

    def close(self):
        self.dev.close()
        self.driver.close()
        self.m.close()


@pytest.fixture
def make_rig(tmp_path):
    rigs = []

    def make(mode="native", name=None, **kw):
        path = tmp_path / (name or f"{mode}-{len(rigs)}.raw")
        if not path.exists():
            path.write_bytes(bytes(range(256)) * (DISK // 256))
        rigs.append(Rig(path, mode=mode, **kw))
        rigs[-1].path = path
        return rigs[-1]
    yield make
    for r in rigs:
        r.close()


PATTERN = bytes((i * 13 + 5) & 0xFF for i in range(64 * 1024))


def script(rig):
    """A mix of what the data plane serves and what it leaves to the model."""
    out = []
    out.append(rig.request(VIRTIO_BLK_T_OUT, 16, out=PATTERN))
    out.append(rig.request(VIRTIO_BLK_T_IN, 16, in_len=len(PATTERN)))
    out.append(rig.request(VIRTIO_BLK_T_IN, 3, in_len=4096))
    out.append(rig.request(VIRTIO_BLK_T_FLUSH, 0))
    out.append(rig.request(VIRTIO_BLK_T_GET_ID, 0, in_len=20))
    out.append(rig.request(VIRTIO_BLK_T_GET_ID, 0, in_len=7))
    out.append(rig.request(VIRTIO_BLK_T_IN, DISK // 512, in_len=512))         # beyond the end
    out.append(rig.request(VIRTIO_BLK_T_IN, DISK // 512 - 1, in_len=1024))    # straddles the end
    out.append(rig.request(VIRTIO_BLK_T_OUT, 0, out=b"x" * 100))              # not whole sectors
    out.append(rig.request(99, 0))                                             # unknown type
    out.append(rig.request(VIRTIO_BLK_T_DISCARD, 0, out=struct.pack("<QII", 40, 8, 0)))
    out.append(rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, out=struct.pack("<QII", 64, 4, 1)))
    out.append(rig.request(VIRTIO_BLK_T_IN, 32, in_len=8192))
    out.append(rig.request(VIRTIO_BLK_T_OUT, 1, out=PATTERN[:4096]))
    out.append(rig.request(VIRTIO_BLK_T_IN, 0, in_len=0))
    return out


@needs_native
@pytest.mark.parametrize("event_idx", [False, True])
def test_same_answers_as_the_python_model(make_rig, event_idx):
    native, python = make_rig("native", event_idx=event_idx), make_rig("python", event_idx=event_idx)
    got, want = script(native), script(python)
    assert got == want
    statuses = [s for s, _, _ in got]
    assert statuses.count(VIRTIO_BLK_S_IOERR) == 3 and statuses.count(VIRTIO_BLK_S_UNSUPP) == 1
    assert got[1][2] == PATTERN and got[4][2] == b"dp-serial".ljust(20, b"\0") and got[5][2] == b"dp-serial"[:7]
    assert native.path.read_bytes() == python.path.read_bytes()
    assert native.dev.native_queues == (True,), "the queue went back to the thread after the model's turns"
    # The four IOERR/UNSUPP answers are the model's, the eleven others the thread's,
    # except that the model may take the request right after each of its four
    # before it hands the queue back (its loop looks once more for buffers).
    assert 11 - 4 <= native.native_requests() <= 11 and python.native_requests() == 0
    assert not native.d.status & DEVICE_NEEDS_RESET


@needs_native
def test_many_requests_in_flight_and_interrupts(make_rig):
    """A full ring of writes, one kick: every request once, in the image, one MSI at least."""
    rig = make_rig("native")
    msis = len(rig.m.msis)
    heads = []
    for i in range(SLOTS):
        heads.append(rig.put(VIRTIO_BLK_T_OUT, 128 * i, out=bytes([i + 1]) * 65536)[0])
    rig.d.kick(0)
    used = rig.d.wait_used(0, count=SLOTS)
    assert sorted(h for h, _ in used) == sorted(heads) and all(n == 1 for _, n in used)
    assert rig.m.wait_msi(msis + 1)
    data = rig.path.read_bytes()
    for i in range(SLOTS):
        assert data[128 * 512 * i:128 * 512 * i + 65536] == bytes([i + 1]) * 65536
    assert rig.native_requests() == SLOTS
    time.sleep(0.05)
    assert rig.q.collect() == [], "no request answered twice"


@needs_native
def test_write_through_without_flush(make_rig):
    """No FLUSH negotiated: the disk is write-through; the thread serves it too."""
    rig = make_rig("native", flush=False)
    assert rig.request(VIRTIO_BLK_T_OUT, 8, out=PATTERN[:8192])[:2] == (VIRTIO_BLK_S_OK, 1)
    assert rig.path.read_bytes()[4096:4096 + 8192] == PATTERN[:8192]
    assert rig.native_requests() == 1


@needs_native
def test_bad_descriptor_mid_stream(make_rig, caplog):
    """Good, good, a chain pointing outside RAM, good: the first two are answered once,
    the model sets NEEDS_RESET on the third and the fourth is never run."""
    rig = make_rig("native")
    before = rig.path.read_bytes()
    h1, _ = rig.put(VIRTIO_BLK_T_OUT, 0, out=b"\1" * 512)
    h2, _ = rig.put(VIRTIO_BLK_T_OUT, 1, out=b"\2" * 512)
    bad, _ = rig.put(VIRTIO_BLK_T_OUT, 2, out=b"\3" * 512, publish=False)
    # its data descriptor now points beyond the 16 MiB of RAM
    rig.m.memory.write_u64(rig.q.desc_addr + 16 * rig.q.chains[bad][1], 0x7FFF0000)
    rig.q.publish(bad)
    rig.put(VIRTIO_BLK_T_OUT, 3, out=b"\4" * 512)
    with caplog.at_level(logging.ERROR):
        rig.d.kick(0)
        used = rig.d.wait_used(0, count=2)
        deadline = time.monotonic() + 5
        while not rig.d.status & DEVICE_NEEDS_RESET and time.monotonic() < deadline:
            time.sleep(0.005)
    assert [h for h, _ in used] == [h1, h2]
    assert rig.d.status & DEVICE_NEEDS_RESET
    assert "buffer of chain" in caplog.text
    rig.settle()
    assert rig.q.collect() == []
    data = rig.path.read_bytes()
    assert data[:1024] == b"\1" * 512 + b"\2" * 512 and data[1024:] == before[1024:]
    assert rig.dev.native_queues == (False,)


@needs_native
def test_reset_with_requests_queued(make_rig):
    """A reset while the thread works: it stops between requests; every used entry is
    a whole write in the image, every write in the image has its used entry, and
    nothing changes once the reset returned."""
    rig = make_rig("native")
    heads = {}
    for i in range(SLOTS):
        head, _ = rig.put(VIRTIO_BLK_T_OUT, 128 * i, out=bytes([0xA0 + i]) * 65536)
        heads[head] = i
    rig.d.kick(0)
    rig.d.set_status(0)
    used = rig.q.collect()
    done = {heads[h] for h, _ in used}
    data = rig.path.read_bytes()
    for i in range(SLOTS):
        chunk = data[128 * 512 * i:128 * 512 * i + 65536]
        if i in done:
            assert chunk == bytes([0xA0 + i]) * 65536
        else:
            assert chunk == (bytes(range(256)) * 256), f"request {i} ran without a used entry"
    time.sleep(0.05)
    assert rig.path.read_bytes() == data
    assert rig.dev.native_queues == (False,)
    assert len(used) == len(done)


@needs_native
def test_driver_moves_its_ring(make_rig):
    """After a reset the driver puts the rings elsewhere: the new thread serves the
    new ring and never touches the old one."""
    rig = make_rig("native")
    assert rig.request(VIRTIO_BLK_T_OUT, 0, out=b"\5" * 512)[0] == VIRTIO_BLK_S_OK
    old = (rig.q.desc_addr, rig.q.used_addr)
    rig.d.set_status(0)
    rig.m.memory.write(0x100000, b"\x77" * 0x10000)
    rig.start(ring_base=0x180000)
    assert rig.q.desc_addr != old[0]
    st, used, data = rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)
    assert (st, used, data) == (VIRTIO_BLK_S_OK, 513, b"\5" * 512)
    assert rig.m.memory.read(0x100000, 0x10000) == b"\x77" * 0x10000
    assert rig.native_requests() == 2


@needs_native
def test_state_takes_the_indices_back(make_rig):
    rig = make_rig("native")
    for i in range(5):
        assert rig.request(VIRTIO_BLK_T_IN, i, in_len=512)[0] == VIRTIO_BLK_S_OK
    q = rig.dev.state().queues[0]
    assert (q.next_avail, q.next_used, q.signalled_used) == (5, 5, 5)
    # and the thread serves on afterwards from there
    assert rig.request(VIRTIO_BLK_T_IN, 9, in_len=512)[0] == VIRTIO_BLK_S_OK
    rig.settle()
    assert rig.dev.native_queues == (True,)
    assert rig.dev.state().queues[0].next_used == 6


@pytest.fixture
def file_size_limit():
    """Writes beyond 1 MiB fail with EFBIG in this process: a real host error the
    kernel returns to the data plane's pwritev."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    state = {"on": False}

    def set_on(on: bool):
        resource.setrlimit(resource.RLIMIT_FSIZE, ((1 << 20) if on else old_limit[0], old_limit[1]))
        state["on"] = on
    yield set_on
    resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)


@needs_native
def test_host_io_error_goes_to_the_error_policy(make_rig, file_size_limit):
    rig = make_rig("native", werror="report")
    file_size_limit(True)
    sector = (2 << 20) // 512
    assert rig.request(VIRTIO_BLK_T_OUT, sector, out=PATTERN[:4096])[:2] == (VIRTIO_BLK_S_IOERR, 1)
    assert rig.errors.reports == [("write", "report", "File too large")]
    file_size_limit(False)
    assert rig.request(VIRTIO_BLK_T_OUT, sector, out=PATTERN[:4096])[:2] == (VIRTIO_BLK_S_OK, 1)
    assert rig.path.read_bytes()[2 << 20:(2 << 20) + 4096] == PATTERN[:4096]
    rig.settle()
    assert rig.dev.native_queues == (True,)


@needs_native
def test_stop_policy_keeps_the_request_until_cont(make_rig, file_size_limit):
    """werror=stop: the model keeps the request the thread handed back; `cont` runs it
    once, and the requests queued behind it after it, each once."""
    rig = make_rig("native", werror="stop")
    file_size_limit(True)
    sector = (2 << 20) // 512
    h1, _ = rig.put(VIRTIO_BLK_T_OUT, sector, out=b"\x11" * 4096)
    h2, _ = rig.put(VIRTIO_BLK_T_OUT, 0, out=b"\x22" * 4096)
    rig.d.kick(0)
    deadline = time.monotonic() + 5
    while not rig.errors.retries and time.monotonic() < deadline:
        time.sleep(0.005)
    assert rig.errors.reports == [("write", "stop", "File too large")]
    rig.settle()
    assert rig.q.collect() == [] and rig.blk.stopped_request
    file_size_limit(False)
    rig.errors.cont()
    used = rig.d.wait_used(0, count=2)
    assert [h for h, _ in used] == [h1, h2]
    data = rig.path.read_bytes()
    assert data[2 << 20:(2 << 20) + 4096] == b"\x11" * 4096 and data[:4096] == b"\x22" * 4096
    time.sleep(0.05)
    assert rig.q.collect() == []
    # the next request brings the thread back
    assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)[2] == b"\x22" * 512
    rig.settle()
    assert rig.dev.native_queues == (True,)


@needs_native
def test_block_0_of_a_probed_raw_disk_stays_the_models(make_rig):
    """A probed raw image refuses writes that would make it probe as another format
    (a guest-written qcow2 header could name a host file as its backing file): the
    thread leaves every write below the guarded span to the model, which checks it."""
    rig = make_rig(restrict_block0=True)
    qcow2_header = b"QFI\xfb" + struct.pack(">I", 3) + bytes(504)
    assert rig.request(VIRTIO_BLK_T_OUT, 0, out=qcow2_header)[0] == VIRTIO_BLK_S_IOERR
    assert rig.request(VIRTIO_BLK_T_OUT, 3, out=b"\xa5" * 512)[0] == VIRTIO_BLK_S_OK
    before = rig.native_requests()
    # state() took the queue back; it goes to the thread again on the loop's next
    # turn, and a request sent before that is the model's (a loaded host was slower).
    assert wait_for(lambda: rig.dev.native_queues == (True,))
    assert rig.request(VIRTIO_BLK_T_OUT, 4, out=qcow2_header)[0] == VIRTIO_BLK_S_OK
    assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=2048)[2] == bytes(range(256)) * 6 + b"\xa5" * 512
    assert rig.native_requests() > before, "past the guarded span the thread serves writes"
    with open(rig.path, "rb") as f:
        assert f.read(4) == bytes(range(4))


@needs_native
def test_chain_longer_than_the_thread_keeps_is_the_models(make_rig):
    """An indirect table of 5000 data buffers: beyond the walker's segment cap and
    preadv's 1024; the model answers (IOERR), the device stays healthy."""
    rig = make_rig("native")
    rig.settle()
    n = 5000
    table = 0x600000
    hdr, st = HDR, STATUS
    rig.m.memory.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
    descs = [(hdr, 16, VIRTQ_DESC_F_NEXT)] + [(0x700000 + 512 * i, 512, VIRTQ_DESC_F_NEXT | 2) for i in range(n)]
    descs.append((st, 1, 2))
    for i, (a, ln, f) in enumerate(descs):
        rig.m.memory.write(table + 16 * i, struct.pack("<QIHH", a, ln, f, i + 1 if f & VIRTQ_DESC_F_NEXT else 0))
    head = rig.q.free.pop(0)
    rig.m.memory.write(rig.q.desc_addr + 16 * head, struct.pack("<QIHH", table, 16 * len(descs), 4, 0))
    rig.q.chains[head] = [head]
    rig.q.publish(head)
    rig.d.kick(0)
    (h, used), = rig.d.wait_used(0)
    assert h == head and used == 1 and rig.m.memory.read(st, 1)[0] == VIRTIO_BLK_S_IOERR
    assert not rig.d.status & DEVICE_NEEDS_RESET


# --- the switch ----------------------------------------------------------------------------

def test_dataplane_key_and_option(tmp_path):
    assert parse_drive("file=/x.raw").dataplane == "native"
    assert parse_drive("file=/x.raw,dataplane=python").dataplane == "python"
    with pytest.raises(ConfigError, match=r"--drive file=/x.raw,dataplane=c: dataplane: must be one of native, python"):
        parse_drive("file=/x.raw,dataplane=c")
    toml = tmp_path / "vm.toml"
    toml.write_text('[[disk]]\npath = "d.raw"\ndataplane = "python"\n')
    assert load_config(str(toml)).disks[0].dataplane == "python"
    toml.write_text('[[disk]]\npath = "d.raw"\ndataplane = 1\n')
    with pytest.raises(ConfigError, match=r"\[\[disk\]\] #1 key 'dataplane': must be one of native, python"):
        load_config(str(toml))


def test_device_refuses_an_unknown_mode(tmp_path):
    p = tmp_path / "d.raw"
    p.write_bytes(bytes(4096))
    drv = RawDriver(str(p))
    try:
        with pytest.raises(ValueError, match="dataplane"):
            VirtioBlk(drv, dataplane="rust")
    finally:
        drv.close()


@needs_native
def test_python_mode_stays_in_python(make_rig):
    rig = make_rig("python")
    assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK
    assert rig.dev.native_queues == (False,)
    assert rig.blk.native_backend() is None



@needs_native
def test_vm_stop_holds_the_threads(make_rig):
    """The machine's stop/cont (hold_native): while stopped the event loop serves the
    queue with the indices the thread had reached; on cont the thread takes over again."""
    rig = make_rig("native")
    assert rig.request(VIRTIO_BLK_T_OUT, 0, out=b"\x31" * 512)[0] == VIRTIO_BLK_S_OK
    rig.dev.hold_native(True)
    assert rig.dev.native_queues == (False,)
    served = rig.dev.native_requests
    assert served == 1
    assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)[2] == b"\x31" * 512
    rig.settle()
    assert rig.dev.native_queues == (False,) and rig.dev.native_requests == served
    rig.dev.hold_native(False)
    rig.settle()
    assert rig.dev.native_queues == (True,)
    assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)[2] == b"\x31" * 512
    assert rig.native_requests() == served + 1
    assert rig.dev.state().queues[0].next_used == 3


def msix_table(rig) -> int:
    table = rig.m.cfg_read(rig.d.slot, rig.d.msix_cap + 4, 4)
    return rig.d.bar_addr(table & 7) + (table & ~7)


@needs_native
def test_masked_vector_keeps_the_interrupt_pending(make_rig):
    """The thread raises the queue's MSI-X vector itself only while it is unmasked: a
    completion under a mask sets the pending bit, and the unmask delivers it."""
    rig = make_rig("native")
    vector_ctrl = msix_table(rig) + 16 * 1 + 12
    first = len(rig.m.msis)
    assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK
    assert rig.dev.native_queues == (True,)
    # The thread writes the used ring before the vector's eventfd: wait for this
    # request's own interrupt, or it may land after the mask and be counted below.
    assert rig.m.wait_msi(first + 1)
    rig.m.mmio_write(vector_ctrl, 4, 1)
    rig.settle()
    before = len(rig.m.msis)
    rig.put(VIRTIO_BLK_T_IN, 1, in_len=512)
    rig.d.kick(0)
    rig.d.wait_used(0)
    rig.settle()
    time.sleep(0.05)
    assert len(rig.m.msis) == before, "an interrupt through a masked vector"
    pba = rig.m.mmio_read(msix_table(rig) + 0x800, 4)
    assert pba & 0b10
    rig.m.mmio_write(vector_ctrl, 4, 0)
    assert rig.m.wait_msi(before + 1)
    rig.settle()
    assert rig.dev.native_queues == (True,)
    assert rig.native_requests() == 2


@needs_native
def test_intx_goes_through_the_isr(tmp_path):
    """Without MSI-X the thread's completions raise INTx with the ISR's queue bit."""
    p = tmp_path / "d.raw"
    p.write_bytes(bytes(DISK))
    m = SoftMachine()
    drv = RawDriver(str(p))
    dev = m.virtio_pci(VirtioBlk(drv))
    try:
        d = VirtioPciDriver(m, m.pci.add(dev))
        d.negotiate(FEATURES)
        q = d.setup_queue(0, 16)
        d.driver_ok()
        assert m.events.call_and_wait(lambda: None)
        assert dev.native_queues == (True,)
        m.memory.write(HDR, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
        q.add([(HDR, 16)], [(DATA, 512), (STATUS, 1)])
        d.kick(0)
        d.wait_used(0)
        with m.cond:
            assert m.cond.wait_for(lambda: (dev.intx_gsi, True) in m.irq_changes, 5)
        assert d.isr() & 1
        assert m.irq_changes[-1] == (dev.intx_gsi, False)
        dev.state()
        assert dev.native_requests == 1
    finally:
        dev.close()
        drv.close()
        m.close()


@needs_native
def test_two_queues_and_a_kept_request_holds_both(tmp_path, file_size_limit):
    """num_queues=2: a thread per queue; a request kept by werror=stop on one queue
    stops the other queue's thread too, and `cont` runs the kept one once."""
    p = tmp_path / "d.raw"
    p.write_bytes(bytes(DISK))
    m = SoftMachine()
    drv = RawDriver(str(p))
    errors = Recorder(m.events)
    blk = VirtioBlk(drv, num_queues=2, werror="stop", errors=errors)
    dev = m.virtio_pci(blk)
    try:
        d = VirtioPciDriver(m, m.pci.add(dev))
        d.negotiate(FEATURES)
        d.enable_msix()
        qs = [d.setup_queue(i, 16, vector=1 + i) for i in range(2)]
        d.driver_ok()
        assert m.events.call_and_wait(lambda: None)
        assert dev.native_queues == (True, True)

        def put(qi, slot, rtype, sector, out):
            hdr = HDR + 0x100 * slot
            m.memory.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
            m.memory.write(DATA + 0x10000 * slot, out)
            return qs[qi].add([(hdr, 16), (DATA + 0x10000 * slot, len(out))], [(STATUS + slot, 1)])

        put(1, 1, VIRTIO_BLK_T_OUT, 8, b"\x41" * 512)
        d.kick(1)
        d.wait_used(1)
        file_size_limit(True)
        put(0, 0, VIRTIO_BLK_T_OUT, (2 << 20) // 512, b"\x42" * 512)
        d.kick(0)
        deadline = time.monotonic() + 5
        while not errors.retries and time.monotonic() < deadline:
            time.sleep(0.005)
        assert errors.reports == [("write", "stop", "File too large")]
        assert m.events.call_and_wait(lambda: None)
        assert dev.native_queues == (False, False)
        put(1, 2, VIRTIO_BLK_T_OUT, 16, b"\x43" * 512)
        d.kick(1)
        time.sleep(0.05)
        assert qs[1].collect() == [], "a queue ran on past the kept request"
        file_size_limit(False)
        errors.cont()
        assert len(d.wait_used(0)) == 1 and len(d.wait_used(1)) == 1
        data = p.read_bytes()
        assert data[2 << 20:(2 << 20) + 512] == b"\x42" * 512 and data[16 * 512:17 * 512] == b"\x43" * 512
    finally:
        dev.close()
        drv.close()
        m.close()


REQUEST = st.one_of(
    st.tuples(st.just(VIRTIO_BLK_T_IN), st.integers(0, DISK // 512 + 2), st.sampled_from([0, 512, 4096, 1000, 65536])),
    st.tuples(st.just(VIRTIO_BLK_T_OUT), st.integers(0, DISK // 512 + 2), st.sampled_from([0, 512, 8192, 700])),
    st.tuples(st.just(VIRTIO_BLK_T_FLUSH), st.just(0), st.just(0)),
    st.tuples(st.just(VIRTIO_BLK_T_GET_ID), st.just(0), st.sampled_from([0, 5, 20, 64])),
    st.tuples(st.sampled_from([VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES]), st.integers(0, DISK // 512),
              st.lists(st.tuples(st.integers(0, DISK // 512 + 4), st.integers(0, 64), st.sampled_from([0, 0, 1, 2])),
                       max_size=3)),
    st.tuples(st.sampled_from([2, 7, 99]), st.just(0), st.just(0)))


def run_requests(rig, requests, seed):
    answers = []
    for rtype, sector, arg in requests:
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            out = b"".join(struct.pack("<QII", s, n, f) for s, n, f in arg)
            answers.append(rig.request(rtype, sector, out=out))
        elif rtype == VIRTIO_BLK_T_OUT:
            answers.append(rig.request(rtype, sector, out=bytes([seed & 0xFF]) * arg))
        else:
            answers.append(rig.request(rtype, sector, in_len=arg))
    return answers


@needs_native
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(REQUEST, min_size=1, max_size=12), seed=st.integers(0, 255))
def test_random_requests_same_answers(tmp_path_factory, requests, seed):
    """Random request streams: the native data plane and the model give the same
    statuses, used lengths, data and image, whichever of them answers each one."""
    base = tmp_path_factory.mktemp("rand")
    images = []
    for mode in ("native", "python"):
        path = base / f"{mode}.raw"
        path.write_bytes(bytes(range(256)) * (DISK // 256))
        images.append(path)
    rigs = [Rig(images[0], mode="native"), Rig(images[1], mode="python")]
    try:
        got, want = (run_requests(r, requests, seed) for r in rigs)
        assert got == want
        assert images[0].read_bytes() == images[1].read_bytes()
        assert not rigs[0].d.status & DEVICE_NEEDS_RESET
    finally:
        for r in rigs:
            r.close()


# --- a real guest under KVM: a raw image on a full tmpfs, served by the native thread -------

@pytest.fixture
def full_tmpfs_raw(tmp_path, kvm_required):
    if os.geteuid() != 0:
        pytest.skip("needs root: the full disk is a tmpfs mounted in a private mount namespace")
    tool_required("unshare")
    from test_block_errors import FULL_DISK
    image = tmp_path / "src.raw"
    image.write_bytes(b"KVMPY-DISK-MAGIC".ljust(512, b"\0"))
    os.truncate(image, 16 << 20)          # sparse: the copy on the tmpfs takes one page
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = tmp_path / "after.raw"
    wrapper = ["unshare", "-m", "--propagation", "private", "sh", "-c", FULL_DISK, "sh", str(mnt), str(image),
               str(out)]
    return mnt, out, wrapper


@pytest.mark.guest
@needs_native
def test_guest_on_a_full_disk_stops_and_cont_completes_the_write(tmp_path, full_tmpfs_raw):
    """The guest's reads go through the thread; its write meets ENOSPC in the thread's
    pwritev, goes back to the model, which stops the VM (io-error); `cont` after the
    space is freed writes it once, and the guest carries on natively."""
    from test_block_errors import Vm, pattern_bytes
    mnt, out, wrapper = full_tmpfs_raw
    vm = Vm(tmp_path, f"file={mnt}/d.qcow2,format=raw,werror=stop,dataplane=native",
            "sector=2048 bytes=32768 waitkey=1", wrapper)
    try:
        vm.read_until(b"virtio-blk: waiting for a key")
        assert b"virtio-blk: sector0 KVMPY-DISK-MAGIC" in vm.out
        vm.key()
        e = vm.event("BLOCK_IO_ERROR")
        assert e["data"]["action"] == "stop" and e["data"]["nospace"] is True
        vm.event("STOP")
        assert vm.qmp.cmd("query-status")["status"] == "io-error"
        time.sleep(0.3)
        assert b"virtio-blk: wrote" not in vm.out
        os.unlink(f"/proc/{vm.proc.pid}/root{mnt}/filler")
        vm.qmp.cmd("cont")
        vm.event("RESUME")
        rc = vm.finish()
        text = vm.out.decode(errors="replace")
        assert rc == 0, text + vm.proc.stderr.read().decode()
        assert "virtio-blk: pattern ok" in text and "guest: done" in text
    finally:
        vm.close()
    assert out.read_bytes()[2048 * 512:2048 * 512 + 32768] == pattern_bytes(32768)


@needs_native
def test_reads_off_the_disk_go_to_the_workers_and_keep_ring_order(make_rig, monkeypatch):
    """A ring of reads of data not in the page cache: the thread's workers read them
    together (without io_uring), and the used entries still come out in ring order,
    each once."""
    monkeypatch.setenv(dataplane.AIO_ENV, "threads")
    rig = make_rig("native")
    data = bytes((i * 31 + 7) & 0xFF for i in range(DISK))
    rig.path.write_bytes(data)
    fd = os.open(rig.path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    heads = [rig.put(VIRTIO_BLK_T_IN, 1024 * i, in_len=65536)[0] for i in range(SLOTS)]
    rig.d.kick(0)
    used = rig.d.wait_used(0, count=SLOTS)
    assert [h for h, _ in used] == heads and all(n == 65537 for _, n in used)
    for i in range(SLOTS):
        assert rig.m.memory.read(STATUS + i, 1) == b"\0"
        assert rig.m.memory.read(DATA + 0x10000 * i, 65536) == data[1024 * 512 * i:1024 * 512 * i + 65536]
    assert rig.native_requests() == SLOTS
    if rig.dev.native_deferred_reads == 0:
        pytest.skip("the page cache kept the image (or RWF_NOWAIT is refused here): the workers were not needed")
    time.sleep(0.05)
    assert rig.q.collect() == []


@needs_native
@pytest.mark.parametrize("aio", ["threads", "io_uring"])
def test_a_failed_worker_read_goes_back_to_the_model_in_ring_order(make_rig, monkeypatch, aio):
    """The image shrinks under the disk: a worker's (or the io_uring's) read meets
    end of file, which the thread leaves to the model (it reads zeroes there, as
    QEMU's raw driver does); the requests around it are answered once each, in
    ring order."""
    if aio == "threads":
        monkeypatch.setenv(dataplane.AIO_ENV, "threads")
    else:
        monkeypatch.delenv(dataplane.AIO_ENV, raising=False)
    rig = make_rig("native")
    if aio == "io_uring" and rig.blk._rings[0] is None:
        pytest.skip("this kernel refuses io_uring")
    data = bytes((i * 31 + 7) & 0xFF for i in range(DISK // 2))
    rig.path.write_bytes(data)            # half of what the disk says it has
    fd = os.open(rig.path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    reads = [(0, 65536), (DISK // 512 - 256, 65536), (2048, 65536)]
    heads = [rig.put(VIRTIO_BLK_T_IN, sector, in_len=n)[0] for sector, n in reads]
    rig.d.kick(0)
    used = rig.d.wait_used(0, count=3)
    assert [h for h, _ in used] == heads and all(n == 65537 for _, n in used)
    assert [rig.m.memory.read(STATUS + i, 1) for i in range(3)] == [b"\0"] * 3
    assert rig.m.memory.read(DATA, 65536) == data[:65536]
    assert rig.m.memory.read(DATA + 0x10000, 65536) == bytes(65536)
    assert rig.m.memory.read(DATA + 0x20000, 65536) == data[2048 * 512:2048 * 512 + 65536]
    time.sleep(0.05)
    assert rig.q.collect() == []
    assert not rig.d.status & DEVICE_NEEDS_RESET


def test_queues_key_and_option(tmp_path):
    assert parse_drive("file=/x.raw").queues == 1
    assert parse_drive("file=/x.raw,queues=4").queues == 4
    for bad in ("0", "17", "x", "²", "-1"):
        with pytest.raises(ConfigError, match=rf"--drive file=/x.raw,queues={bad}: queues: expected a number of "
                                               r"queues from 1 to 16"):
            parse_drive(f"file=/x.raw,queues={bad}")
    toml = tmp_path / "vm.toml"
    toml.write_text('[[disk]]\npath = "d.raw"\nqueues = 2\n')
    assert load_config(str(toml)).disks[0].queues == 2
    for bad in ('"2"', "true", "0", "99"):
        toml.write_text(f'[[disk]]\npath = "d.raw"\nqueues = {bad}\n')
        with pytest.raises(ConfigError, match=r"\[\[disk\]\] #1 key 'queues': expected a number of queues"):
            load_config(str(toml))


@pytest.mark.guest
@needs_native
@pytest.mark.parametrize("mode", ["native", "python"])
def test_guest_under_kvm_with_four_queues(tmp_path, kvm_required, mode):
    """The test guest through `kvmpy run` with a 4-queue disk (it drives queue 0):
    the same output with either data plane, and the pattern on the host's image."""
    from conftest import guest_path, run_kvmpy
    from test_block_errors import pattern_bytes
    img = tmp_path / "d.raw"
    img.write_bytes(b"KVMPY-DISK-MAGIC".ljust(512, b"\0"))
    os.truncate(img, 8 << 20)
    p = run_kvmpy(["run", "--enable-kvm", "--kernel", guest_path("virtio_blk"), "--append",
                   "sector=2048 bytes=32768 rand=200 depth=32 writes=20",
                   "--drive", f"file={img},format=raw,serial=mq,queues=4,dataplane={mode}"], timeout=120)
    out = p.stdout.decode()
    assert p.returncode == 0, out + p.stderr.decode()
    assert "virtio-blk: serial mq" in out and "virtio-blk: pattern ok" in out and "guest: done" in out
    assert "virtio-blk: bench write64k=20" in out and "rand4k=200" in out
    assert img.read_bytes()[2048 * 512:2048 * 512 + 32768] == pattern_bytes(32768)


@needs_native
def test_msix_without_a_vector_wakes_nothing_until_one_is_set(make_rig):
    """MSI-X on and the queue without a vector: a completion interrupts nobody (as
    the transport's own _interrupt does), so the thread is given no eventfd to write
    and the event loop is not woken per batch; a vector set later gets the
    interrupts, from the same thread's successor."""
    from kvmpy.devices.virtio import netplane
    rig = make_rig("native")
    rig.d.common_write(0x16, 2, 0)
    rig.d.common_write(0x1A, 2, 0xFFFF)              # queue_msix_vector: NO_VECTOR
    rig.settle()
    before = len(rig.m.msis)
    assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK
    rig.settle()
    assert rig.dev.native_queues == (True,)
    assert rig.dev._native[0].irq_fd == netplane.NO_INTERRUPT
    assert not rig.dev._native[0].take_interrupt()   # the thread wrote no call eventfd either
    time.sleep(0.05)
    assert len(rig.m.msis) == before
    rig.d.common_write(0x1A, 2, 1)
    rig.settle()
    assert rig.request(VIRTIO_BLK_T_IN, 1, in_len=512)[0] == VIRTIO_BLK_S_OK
    assert rig.m.wait_msi(before + 1)
    assert rig.native_requests() == 2
