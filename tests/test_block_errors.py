"""Disk I/O errors as QEMU reports them: werror=/rerror= policies, BLOCK_IO_ERROR, the
"io-error" run state and `cont`'s retry.

First the device alone, driven by the soft virtio driver over a raw image whose
host calls fail on demand (a host's EIO or ENOSPC cannot be had on a plain file
without root); then the real thing: `kvmpy run` with the virtio-blk test guest
writing to a qcow2 image made by qemu-img on a tmpfs that is full (a private mount
namespace, so root), and to a qcow2 image whose corrupt refcounts would send the
write onto metadata.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings, strategies as st

from conftest import ROOT, guest_path, tool_required
from support.qmp_client import connect_when_up
from kvmpy.block import open_image
from kvmpy.config import RERROR_POLICIES, WERROR_POLICIES, config_from_dict, parse_drive
from kvmpy.devices.virtio.blk import (VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN,
                                      VIRTIO_BLK_T_OUT, VirtioBlk)
from kvmpy.devices.virtio.pci import VIRTIO_F_VERSION_1
from kvmpy.errors import ConfigError
from support.polling import settle
from support.virtio_driver import SoftMachine, VirtioPciDriver

FUZZ = bool(os.environ.get("KVMPY_FUZZ"))
DISK = 1 << 20
HDR, STATUS, DATA = 0x200000, 0x2F0000, 0x300000


# --- configuration ---------------------------------------------------------------------------

def test_defaults_are_qemus():
    d = parse_drive("file=/x.img,format=raw")
    assert (d.werror, d.rerror) == ("enospc", "report")
    cfg = config_from_dict({"kernel": "k", "disk": [{"path": "/x.img"}]}, "vm.toml")
    assert (cfg.disks[0].werror, cfg.disks[0].rerror) == ("enospc", "report")


def test_drive_and_toml_keys():
    d = parse_drive("file=/x.img,format=qcow2,werror=stop,rerror=ignore")
    assert (d.werror, d.rerror) == ("stop", "ignore")
    cfg = config_from_dict({"kernel": "k", "disk": [{"path": "/x.img", "werror": "report", "rerror": "stop"}]},
                           "vm.toml")
    assert (cfg.disks[0].werror, cfg.disks[0].rerror) == ("report", "stop")


@pytest.mark.parametrize("spec, message", [
    ("file=/x,werror=halt", "--drive file=/x,werror=halt: werror: must be one of enospc, stop, report, ignore, "
                            "got 'halt'"),
    ("file=/x,rerror=enospc", "--drive file=/x,rerror=enospc: rerror: must be one of stop, report, ignore, "
                              "got 'enospc'"),
])
def test_bad_drive_policy_is_one_line(spec, message):
    with pytest.raises(ConfigError) as e:
        parse_drive(spec)
    assert str(e.value) == message


@pytest.mark.parametrize("key, value", [("werror", "halt"), ("rerror", "enospc"), ("werror", 1), ("rerror", True)])
def test_bad_toml_policy_names_the_key(key, value):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"kernel": "k", "disk": [{"path": "/x.img", key: value}]}, "vm.toml")
    assert str(e.value).startswith(f"vm.toml: [[disk]] #1 key '{key}': must be one of ")
    assert "\n" not in str(e.value)


@settings(max_examples=500 if FUZZ else 50, deadline=None)
@given(key=st.sampled_from(["werror", "rerror"]), value=st.text(alphabet="abcdefghijklmnopqrstuvwxyz", max_size=8))
def test_policy_values_accepted_exactly(key, value):
    allowed = WERROR_POLICIES if key == "werror" else RERROR_POLICIES
    try:
        d = parse_drive(f"file=/x.img,{key}={value}")
    except ConfigError as e:
        assert value not in allowed and f": {key}: must be one of" in str(e)
    else:
        assert value in allowed and getattr(d, key) == value


# --- the device with a failing host ------------------------------------------------------------

class FailingHost:
    """A real raw image whose next host calls fail with ``errno`` while ``failing``
    names them: what the kernel returns for a full or broken disk."""

    def __init__(self, driver) -> None:
        self._driver = driver
        self.failing: dict[str, int] = {}

    def __getattr__(self, name):
        return getattr(self._driver, name)

    def _maybe_fail(self, op: str) -> None:
        err = self.failing.get(op)
        if err is not None:
            raise OSError(err, os.strerror(err))

    def preadv(self, buffers, offset):
        self._maybe_fail("preadv")
        return self._driver.preadv(buffers, offset)

    def pwritev(self, buffers, offset):
        self._maybe_fail("pwritev")
        return self._driver.pwritev(buffers, offset)

    def flush(self):
        self._maybe_fail("flush")
        return self._driver.flush()


class Recorder:
    """The machine's side of BlockErrors as the device sees it: what was reported,
    and the retry the machine would run on `cont`."""

    def __init__(self, events) -> None:
        self.events = events
        self.reports: list[dict] = []
        self.retries: list = []

    def io_error(self, device, node_name, operation, action, nospace, reason, retry=None):
        assert self.events.on_loop_thread(), "disks report I/O errors on the event loop"
        self.reports.append({"device": device, "node-name": node_name, "operation": operation,
                             "action": action, "nospace": nospace, "reason": reason})
        if retry is not None:
            self.retries.append(retry)

    def cont(self) -> None:
        retries, self.retries = self.retries, []
        for retry in retries:
            self.events.call_soon(retry)


class Rig:
    def __init__(self, image, werror="enospc", rerror="report", with_errors=True):
        self.m = SoftMachine()
        self.host = FailingHost(open_image(str(image), "raw"))
        self.errors = Recorder(self.m.events) if with_errors else None
        self.blk = VirtioBlk(self.host, werror=werror, rerror=rerror, errors=self.errors, device="virtio0",
                             node_name="#block0")
        self.dev = self.m.virtio_pci(self.blk)
        self.d = VirtioPciDriver(self.m, self.m.pci.add(self.dev))
        self.d.negotiate(1 << VIRTIO_F_VERSION_1 | 1 << 9)
        self.q = self.d.setup_queue(0, 64)
        self.d.driver_ok()
        self.n = 0

    def submit(self, rtype, sector, out=b"", in_len=0) -> tuple[int, int]:
        """Queue one request and ring the doorbell; returns (head, slot)."""
        n = self.n % 16
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
        head = self.q.add(readable, writable)
        self.d.kick(0)
        return head, n

    def status(self, n: int) -> int:
        return self.m.memory.read(STATUS + n, 1)[0]

    def data(self, n: int, length: int) -> bytes:
        return self.m.memory.read(DATA + 0x10000 * n, length)

    def request(self, rtype, sector, out=b"", in_len=0) -> tuple[int, int, int]:
        """One request to completion: (status, used length, slot)."""
        head, n = self.submit(rtype, sector, out, in_len)
        (h, used), = self.d.wait_used(0)
        assert h == head
        return self.status(n), used, n

    def settle(self) -> None:
        """Let the event loop finish what the doorbells started."""
        assert settle(self.m.events)

    def close(self):
        self.dev.close()
        self.host.close()
        self.m.close()


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.raw"
    p.write_bytes(bytes(range(256)) * (DISK // 256))
    return p


@pytest.fixture
def make_rig(image):
    rigs = []

    def make(**kw):
        rigs.append(Rig(image, **kw))
        return rigs[-1]
    yield make
    for r in rigs:
        r.close()


PATTERN = bytes((i * 7 + 3) & 0xFF for i in range(4096))


def test_report_fails_the_write_and_tells_the_monitor(make_rig, image):
    rig = make_rig(werror="report")
    before = image.read_bytes()
    rig.host.failing["pwritev"] = errno.EIO
    status, used, _ = rig.request(VIRTIO_BLK_T_OUT, 8, out=PATTERN)
    assert (status, used) == (VIRTIO_BLK_S_IOERR, 1)
    assert rig.errors.reports == [{"device": "virtio0", "node-name": "#block0", "operation": "write",
                                   "action": "report", "nospace": False, "reason": "Input/output error"}]
    assert rig.errors.retries == []
    assert image.read_bytes() == before
    # The disk works on once the host does.
    del rig.host.failing["pwritev"]
    assert rig.request(VIRTIO_BLK_T_OUT, 8, out=PATTERN)[0] == VIRTIO_BLK_S_OK
    assert image.read_bytes()[8 * 512:8 * 512 + len(PATTERN)] == PATTERN


def test_reads_follow_rerror_and_writes_werror(make_rig):
    rig = make_rig(werror="ignore", rerror="report")
    rig.host.failing.update(preadv=errno.EIO, pwritev=errno.EIO, flush=errno.EIO)
    assert rig.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_IOERR
    assert rig.request(VIRTIO_BLK_T_OUT, 0, out=PATTERN[:512])[0] == VIRTIO_BLK_S_OK
    # A flush changes the disk's durable state: werror's, as QEMU's virtio-blk does.
    assert rig.request(VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
    assert [(r["operation"], r["action"]) for r in rig.errors.reports] == [
        ("read", "report"), ("write", "ignore"), ("write", "ignore")]


def test_ignore_completes_a_read_as_if_it_worked(make_rig):
    rig = make_rig(rerror="ignore")
    rig.host.failing["preadv"] = errno.EIO
    status, used, n = rig.request(VIRTIO_BLK_T_IN, 0, in_len=1024)
    assert (status, used) == (VIRTIO_BLK_S_OK, 1025)
    assert rig.data(n, 1024) == b"\xcc" * 1024      # nothing was read: QEMU's ignore
    assert rig.errors.reports[0]["action"] == "ignore"


def test_enospc_policy_reports_other_errors(make_rig, image):
    rig = make_rig()                                  # werror=enospc
    rig.host.failing["pwritev"] = errno.EIO
    assert rig.request(VIRTIO_BLK_T_OUT, 8, out=PATTERN)[0] == VIRTIO_BLK_S_IOERR
    assert rig.errors.reports[-1]["action"] == "report" and rig.errors.retries == []


@pytest.mark.parametrize("werror, err", [("enospc", errno.ENOSPC), ("stop", errno.EIO), ("stop", errno.ENOSPC)])
def test_stop_keeps_the_request_until_cont(make_rig, image, werror, err):
    rig = make_rig(werror=werror)
    rig.host.failing["pwritev"] = err
    head, n = rig.submit(VIRTIO_BLK_T_OUT, 8, out=PATTERN)
    # A read queued behind the kept write waits too: the guest's order is kept.
    head2, n2 = rig.submit(VIRTIO_BLK_T_IN, 8, in_len=len(PATTERN))
    rig.settle()
    assert rig.q.collect() == []
    assert rig.status(n) == 0xEE and rig.status(n2) == 0xEE
    assert rig.blk.stopped_request
    assert rig.errors.reports == [{"device": "virtio0", "node-name": "#block0", "operation": "write",
                                   "action": "stop", "nospace": err == errno.ENOSPC,
                                   "reason": os.strerror(err)}]
    assert len(rig.errors.retries) == 1
    assert rig.blk.io_status == ("nospace" if err == errno.ENOSPC else "failed")
    # Space freed, `cont`: the write and then the read complete, in order.
    del rig.host.failing["pwritev"]
    rig.errors.cont()
    used = rig.d.wait_used(0, 2)
    assert [h for h, _ in used] == [head, head2]
    assert rig.status(n) == VIRTIO_BLK_S_OK and rig.status(n2) == VIRTIO_BLK_S_OK
    assert rig.data(n2, len(PATTERN)) == PATTERN
    assert image.read_bytes()[8 * 512:8 * 512 + len(PATTERN)] == PATTERN
    assert not rig.blk.stopped_request and rig.blk.io_status == "ok"
    assert len(rig.errors.reports) == 1


def test_a_retry_that_fails_again_stops_again(make_rig):
    rig = make_rig(werror="stop")
    rig.host.failing["pwritev"] = errno.ENOSPC
    head, n = rig.submit(VIRTIO_BLK_T_OUT, 8, out=PATTERN)
    rig.settle()
    rig.errors.cont()                  # nothing freed
    rig.settle()
    rig.settle()
    assert rig.q.collect() == [] and rig.blk.stopped_request
    assert [r["action"] for r in rig.errors.reports] == ["stop", "stop"]
    rig.host.failing["pwritev"] = errno.EIO     # now a different error, still werror=stop
    rig.errors.cont()
    rig.settle()
    rig.settle()
    assert rig.errors.reports[-1]["reason"] == "Input/output error"
    del rig.host.failing["pwritev"]
    rig.errors.cont()
    (h, _), = rig.d.wait_used(0)
    assert h == head and rig.status(n) == VIRTIO_BLK_S_OK


def test_a_device_reset_drops_the_kept_request(make_rig, image):
    rig = make_rig(werror="stop")
    before = image.read_bytes()
    rig.host.failing["pwritev"] = errno.ENOSPC
    rig.submit(VIRTIO_BLK_T_OUT, 8, out=PATTERN)
    rig.settle()
    assert rig.blk.stopped_request
    rig.d.set_status(0)                # the driver resets the device
    rig.settle()
    assert not rig.blk.stopped_request and rig.blk.io_status == "ok"
    del rig.host.failing["pwritev"]
    rig.errors.cont()                  # a stale retry does nothing
    rig.settle()
    assert image.read_bytes() == before


def test_without_a_machine_stop_is_report(make_rig):
    rig = make_rig(werror="stop", with_errors=False)
    rig.host.failing["pwritev"] = errno.ENOSPC
    assert rig.request(VIRTIO_BLK_T_OUT, 8, out=PATTERN)[0] == VIRTIO_BLK_S_IOERR
    assert not rig.blk.stopped_request


def test_corrupt_qcow2_write_is_an_io_error_of_the_write(tmp_path):
    """The overlap check refuses the write (ImageError): the guest gets IOERR, the
    monitor a write error with EIO, and the image keeps its data."""
    qemu_img = tool_required("qemu-img")
    from test_block_overlap import zero_first_refcount_block
    img = tmp_path / "d.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "1M"], check=True)
    zero_first_refcount_block(img)
    before = img.read_bytes()
    m = SoftMachine()
    driver = open_image(str(img), "qcow2")
    errors = Recorder(m.events)
    dev = m.virtio_pci(VirtioBlk(driver, errors=errors, device="virtio0", node_name="#block0"))
    try:
        d = VirtioPciDriver(m, m.pci.add(dev))
        d.negotiate(1 << VIRTIO_F_VERSION_1)
        q = d.setup_queue(0, 16)
        d.driver_ok()
        m.memory.write(HDR, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 8))
        m.memory.write(DATA, PATTERN)
        m.memory.write(STATUS, b"\xee")
        q.add([(HDR, 16), (DATA, len(PATTERN))], [(STATUS, 1)])
        d.kick(0)
        d.wait_used(0)
        assert m.memory.read(STATUS, 1)[0] == VIRTIO_BLK_S_IOERR
        assert errors.reports == [{"device": "virtio0", "node-name": "#block0", "operation": "write",
                                   "action": "report", "nospace": False, "reason": "Input/output error"}]
    finally:
        dev.close()
        driver.close()
        m.close()
    after = img.read_bytes()
    assert after[:72] == before[:72] and after[80:] == before[80:]


# --- the real VMM: kvmpy run with QMP -------------------------------------------------------------

def pattern_bytes(n: int) -> bytes:
    """What tests/guests/virtio_blk.c writes."""
    return bytes(((i * 13 + 7) ^ (i >> 9)) & 0xFF for i in range(n))


class Vm:
    """`kvmpy run --enable-kvm` with the virtio-blk guest, QMP and the console on pipes,
    optionally inside ``wrapper`` (a command that ends by running the VM)."""

    def __init__(self, tmp_path, drive: str, append: str, wrapper: list[str] = ()) -> None:
        self.qmp_path = tmp_path / "vm.qmp"
        env = dict(os.environ, PYTHONPATH=ROOT)
        cmd = [sys.executable, "-m", "kvmpy", "run", "--enable-kvm", "--name", "ioerr",
               "--kernel", guest_path("virtio_blk"), "--append", append, "--drive", drive,
               "--qmp", f"unix:{self.qmp_path}"]
        self.proc = subprocess.Popen([*wrapper, *cmd], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.out = b""
        try:
            self.qmp = connect_when_up(self.proc, self.qmp_path, timeout=30)
        except BaseException:
            self.kill()
            raise

    def read_until(self, needle: bytes, timeout: float = 30) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.out and time.monotonic() < deadline:
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                break
            self.out += chunk
        assert needle in self.out, self.out.decode(errors="replace")
        return self.out

    def key(self) -> None:
        self.proc.stdin.write(b"g")
        self.proc.stdin.flush()

    def event(self, name: str, timeout: float = 15) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.qmp.get_events(wait=max(0.1, deadline - time.monotonic())):
                if e["event"] == name:
                    return e
        raise AssertionError(f"no {name} event within {timeout} s")

    def finish(self, timeout: float = 30) -> int:
        self.read_until(b"guest: ", timeout)
        rc = self.proc.wait(timeout)
        self.out += self.proc.stdout.read()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def close(self) -> None:
        try:
            self.qmp.close()
        except Exception:    # after the VM's exit the socket is gone
            pass
        self.kill()


# The image on a 1 MiB tmpfs filled up by a filler file, in a mount namespace of the
# VM's own; the filler is deleted through /proc/PID/root to free the space, and the
# image is copied out for checking when the VM has exited.
FULL_DISK = r"""
set -e
mnt=$1 image=$2 out=$3
shift 3
mount -t tmpfs -o size=1M kvmpy-ioerr "$mnt"
cp "$image" "$mnt/d.qcow2"
dd if=/dev/zero of="$mnt/filler" bs=4k 2>/dev/null || true
st=0
"$@" || st=$?
cp "$mnt/d.qcow2" "$out"
exit $st
"""


@pytest.fixture
def full_tmpfs(tmp_path, kvm_required):
    if os.geteuid() != 0:
        pytest.skip("needs root: the full disk is a tmpfs mounted in a private mount namespace")
    qemu_img = tool_required("qemu-img")
    tool_required("unshare")
    image = tmp_path / "src.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = tmp_path / "after.qcow2"
    wrapper = ["unshare", "-m", "--propagation", "private", "sh", "-c", FULL_DISK, "sh", str(mnt), str(image),
               str(out)]
    return mnt, out, wrapper


@pytest.mark.guest
def test_werror_stop_pauses_with_io_error_and_cont_completes_the_write(tmp_path, full_tmpfs):
    qemu_img = tool_required("qemu-img")
    mnt, out, wrapper = full_tmpfs
    vm = Vm(tmp_path, f"file={mnt}/d.qcow2,format=qcow2,werror=stop", "sector=2048 bytes=32768 waitkey=1",
            wrapper)
    try:
        vm.read_until(b"virtio-blk: waiting for a key")
        vm.key()
        e = vm.event("BLOCK_IO_ERROR")
        assert e["data"] == {"device": "virtio0", "node-name": "#block0", "operation": "write", "action": "stop",
                             "nospace": True, "reason": "No space left on device"}
        vm.event("STOP")
        assert vm.qmp.cmd("query-status") == {"status": "io-error", "running": False, "singlestep": False}
        assert vm.qmp.cmd("human-monitor-command",
                          **{"command-line": "info status"}) == "VM status: paused (io-error)\r\n"
        assert vm.qmp.cmd("query-block")[0]["io-status"] == "nospace"
        # `stop` leaves an io-error VM as it is, as QEMU's does.
        vm.qmp.cmd("stop")
        assert vm.qmp.cmd("query-status")["status"] == "io-error"
        time.sleep(0.3)
        assert vm.proc.poll() is None
        assert b"virtio-blk: wrote" not in vm.out and b"failed" not in vm.out
        os.unlink(f"/proc/{vm.proc.pid}/root{mnt}/filler")
        vm.qmp.cmd("cont")
        vm.event("RESUME")
        rc = vm.finish()
        text = vm.out.decode(errors="replace")
        assert rc == 0, text + vm.proc.stderr.read().decode()
        assert "virtio-blk: pattern ok" in text and "guest: done" in text
    finally:
        vm.close()
    assert subprocess.run([qemu_img, "check", "-q", str(out)]).returncode == 0
    raw = tmp_path / "after.raw"
    subprocess.run([qemu_img, "convert", "-O", "raw", str(out), str(raw)], check=True)
    assert raw.read_bytes()[2048 * 512:2048 * 512 + 32768] == pattern_bytes(32768)


@pytest.mark.guest
def test_werror_report_gives_the_guest_an_io_error(tmp_path, full_tmpfs):
    mnt, out, wrapper = full_tmpfs
    vm = Vm(tmp_path, f"file={mnt}/d.qcow2,format=qcow2,werror=report", "sector=2048 bytes=32768 waitkey=1",
            wrapper)
    try:
        vm.read_until(b"virtio-blk: waiting for a key")
        vm.key()
        e = vm.event("BLOCK_IO_ERROR")
        assert e["data"] == {"device": "virtio0", "node-name": "#block0", "operation": "write", "action": "report",
                             "nospace": True, "reason": "No space left on device"}
        rc = vm.finish()
        text = vm.out.decode(errors="replace")
        assert "virtio-blk: request type 1 sector 2048 failed: id 0 status 1" in text, text
        assert rc == 1 and "guest: exit 1" in text
    finally:
        vm.close()


@pytest.mark.guest
def test_guest_write_onto_metadata_of_a_corrupt_qcow2_is_an_io_error(tmp_path, kvm_required):
    qemu_img = tool_required("qemu-img")
    from test_block_overlap import qemu_info, zero_first_refcount_block
    img = tmp_path / "d.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "1M"], check=True)
    zero_first_refcount_block(img)
    before = img.read_bytes()
    vm = Vm(tmp_path, f"file={img},format=qcow2", "sector=8 bytes=4096 waitkey=1")
    try:
        vm.read_until(b"virtio-blk: waiting for a key")
        vm.key()
        e = vm.event("BLOCK_IO_ERROR")
        assert e["data"] == {"device": "virtio0", "node-name": "#block0", "operation": "write", "action": "report",
                             "nospace": False, "reason": "Input/output error"}
        rc = vm.finish()
        text = vm.out.decode(errors="replace")
        assert "virtio-blk: request type 1 sector 8 failed: id 0 status 1" in text, text
        assert rc == 1
    finally:
        vm.close()
    after = img.read_bytes()
    # Only the corrupt bit: no guest data, no table written.
    assert after[:72] == before[:72] and after[80:] == before[80:]
    assert qemu_info(qemu_img, img)["format-specific"]["data"]["corrupt"] is True


@pytest.mark.guest
def test_quit_and_reset_from_io_error(tmp_path, full_tmpfs):
    """An io-error VM still obeys the monitor: system_reset keeps it stopped (QEMU's
    run state survives a reset) and drops the kept request; quit ends it at once."""
    mnt, out, wrapper = full_tmpfs
    vm = Vm(tmp_path, f"file={mnt}/d.qcow2,format=qcow2,werror=stop", "sector=2048 bytes=32768 waitkey=1",
            wrapper)
    try:
        vm.read_until(b"virtio-blk: waiting for a key")
        vm.key()
        vm.event("BLOCK_IO_ERROR")
        vm.event("STOP")
        vm.qmp.cmd("system_reset")
        vm.event("RESET")
        assert vm.qmp.cmd("query-status")["status"] == "io-error"
        vm.qmp.cmd("quit")
        assert vm.proc.wait(10) == 0
    finally:
        vm.close()
