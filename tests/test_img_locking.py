"""Image locking that QEMU and kvmpy both honour (QEMU's OFD lock bytes 100+perm and
200+perm), checked against the real qemu-img, qemu-io and `kvmpy run`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, guest_path
from kvmpy.block import open_image
from kvmpy.errors import ImageError
from support.qemu_utils import MISSING_REASON, QEMU_IMG, QEMU_IO, kimg

if MISSING_REASON:
    pytest.skip(MISSING_REASON, allow_module_level=True)


def qimg(*args):
    return subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True)


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture
def qcow2(tmp_path):
    p = tmp_path / "disk.qcow2"
    r = qimg("create", "-q", "-f", "qcow2", p, "64M")
    assert r.returncode == 0, r.stderr
    return p


class QemuIoHolder:
    """qemu-io keeping an image open (read-write unless -r) until closed."""

    def __init__(self, path, fmt="qcow2", read_only=False):
        argv = [QEMU_IO, "-f", fmt] + (["-r"] if read_only else []) + [str(path)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        # qemu-io has its locks once it answers a command.
        self.proc.stdin.write("help\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def test_kvmpy_writer_keeps_qemu_out(qcow2):
    with open_image(str(qcow2)) as drv:
        r = qimg("info", qcow2)
        assert r.returncode == 1 and 'Failed to get shared "write" lock' in r.stderr, r.stderr
        r = qimg("info", "-U", qcow2)
        assert r.returncode == 0 and "file format: qcow2" in r.stdout, r.stderr
        r = subprocess.run([QEMU_IO, "-f", "qcow2", "-c", "write 0 4k", str(qcow2)],
                           capture_output=True, text=True)
        assert "Failed to get" in r.stderr + r.stdout
        drv.pwrite(b"x" * 4096, 0)
        drv.flush()
    assert qimg("info", qcow2).returncode == 0       # released with the driver's descriptor


def test_second_writer_and_reader_in_one_process_refused(qcow2):
    with open_image(str(qcow2)):
        with pytest.raises(ImageError, match=r'locked by another process.*"write" lock.*-U'):
            open_image(str(qcow2))
        with pytest.raises(ImageError, match=r'shared "write" lock'):
            open_image(str(qcow2), read_only=True)
        with open_image(str(qcow2), read_only=True, force_share=True) as ro:
            assert ro.size == 64 << 20
    with pytest.raises(ImageError, match="only for read-only"):
        open_image(str(qcow2), force_share=True)


def test_readers_coexist_and_keep_writers_out(qcow2):
    with open_image(str(qcow2), read_only=True), open_image(str(qcow2), read_only=True):
        assert qimg("info", qcow2).returncode == 0
        kimg("info", qcow2)
        r = qimg("resize", qcow2, "+1M")
        assert r.returncode == 1 and 'Failed to get "write" lock' in r.stderr, r.stderr
        r = kimg("resize", qcow2, "+1M", rc=2)
        assert "locked by another process" in _one_line(r.stderr)
    kimg("resize", qcow2, "+1M")


def test_qemu_holding_an_image_refuses_kvmpy_writers(qcow2, tmp_path):
    holder = QemuIoHolder(qcow2)
    try:
        pid = holder.proc.pid
        for args in (["snapshot", "-c", "s1", qcow2], ["resize", qcow2, "+1M"], ["check", "-r", "all", qcow2],
                     ["info", qcow2], ["map", qcow2], ["snapshot", "-l", qcow2]):
            r = kimg(*args, rc=2)
            line = _one_line(r.stderr)
            assert f"locked by another process (pid {pid})" in line and "-U" in line, line
        r = kimg("create", "-f", "qcow2", qcow2, "1M", rc=2)    # recreating it would pull it away
        assert "locked by another process" in _one_line(r.stderr)
        assert qimg("info", "-U", qcow2).returncode == 0
        assert "file format: qcow2" in kimg("info", "-U", qcow2).stdout
        kimg("map", "-U", qcow2)
        kimg("check", "-U", qcow2)
        kimg("snapshot", "-l", "-U", qcow2)
        kimg("convert", "-U", "-O", "raw", qcow2, tmp_path / "copy.raw")
        assert "identical" in kimg("compare", "-U", qcow2, tmp_path / "copy.raw").stdout
        r = kimg("resize", "-U", qcow2, "+1M", rc=2)
        assert "read-only" in _one_line(r.stderr)
    finally:
        holder.close()
    kimg("snapshot", "-c", "s1", qcow2)
    assert qimg("check", qcow2).returncode == 0


def test_read_only_qemu_user_shares_with_kvmpy_readers(qcow2):
    holder = QemuIoHolder(qcow2, read_only=True)
    try:
        kimg("info", qcow2)
        with open_image(str(qcow2), read_only=True) as d:
            assert d.size == 64 << 20
        r = kimg("snapshot", "-c", "s1", qcow2, rc=2)
        assert 'failed to get "write" lock' in _one_line(r.stderr)
    finally:
        holder.close()


def test_backing_files_are_locked_as_qemu_locks_them(tmp_path):
    base = tmp_path / "base.raw"
    assert qimg("create", "-q", "-f", "raw", base, "16M").returncode == 0
    top = tmp_path / "top.qcow2"
    assert qimg("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top).returncode == 0
    with open_image(str(top)) as drv:
        assert drv.backing is not None
        # Reading the backing file is shared; writing or resizing it is not.
        assert qimg("info", base).returncode == 0
        r = qimg("resize", "-f", "raw", base, "+1M")
        assert r.returncode == 1 and 'Failed to get "write" lock' in r.stderr, r.stderr
        with pytest.raises(ImageError, match="locked by another process"):
            open_image(str(base))
        # and the overlay itself is the writer's
        r = qimg("info", top)
        assert r.returncode == 1 and "write" in r.stderr
    # commit writes into the backing file the overlay holds: kvmpy hands it over
    kimg("commit", top)


def _vm(disk, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "kvmpy", "run", "--kernel", guest_path("exitloop"),
                             "--append", "n=100000000000", "--serial", "none",
                             "--drive", f"file={disk},format=qcow2", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_vms_on_one_image(qcow2):
    """The second VM refuses to start (one line, status 2); QEMU sees the first's lock."""
    first = _vm(qcow2)
    inode = f":{os.stat(qcow2).st_ino} "
    try:
        # Watched in /proc/locks, which takes no lock: a probe with qemu-img holds
        # the image's shared lock for a moment, and a VM starting in that moment
        # rightly refuses to run.
        deadline = time.monotonic() + 60
        while not any(inode in line for line in open("/proc/locks")):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the VM never locked its disk"
            time.sleep(0.05)
        r = qimg("info", qcow2)
        assert 'Failed to get shared "write" lock' in r.stderr, r.stderr
        second = _vm(qcow2)
        out, err = second.communicate(timeout=60)
        assert second.returncode == 2, (out, err)
        line = _one_line(err.decode())
        assert str(qcow2) in line and f"locked by another process (pid {first.pid})" in line, line
        assert "file format: qcow2" in kimg("info", "-U", qcow2).stdout
    finally:
        first.kill()
        first.communicate()
    assert qimg("info", qcow2).returncode == 0
