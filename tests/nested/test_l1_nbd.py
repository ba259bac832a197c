"""Inside the nested-KVM L1, whose Debian kernel has the nbd module (the hosts have
none): `kvmpy nbd -c /dev/nbd0` hands an image to the kernel's nbd client, as the
seed's "mount a qcow2 image" needs, and `-d` lets it go with the writes in the image."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_kvmpy
from support.nested import l1_only

pytestmark = l1_only

MiB = 1 << 20


def test_kernel_nbd_client_reads_and_writes_a_qcow2(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("-c /dev/nbdX needs root")
    # The L1's init loads nbd with its other modules (kvmpy/tools/nested.py); the
    # chroot has no modprobe.
    if not os.path.exists("/dev/nbd0"):
        pytest.fail("no /dev/nbd0 in the L1: the nbd module did not load")
    img = str(tmp_path / "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", img], check=True, capture_output=True)
    server = subprocess.Popen([sys.executable, "-m", "kvmpy", "nbd", "-c", "/dev/nbd0", "-f", "qcow2", img],
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stderr=subprocess.PIPE)
    disconnected = None
    try:
        deadline = time.monotonic() + 120          # Python starts slowly in the L1
        while time.monotonic() < deadline:
            with open("/sys/block/nbd0/size") as f:
                if int(f.read()) * 512 == 4 * MiB:
                    break
            assert server.poll() is None, server.stderr.read().decode()
            time.sleep(0.2)
        else:
            pytest.fail("/dev/nbd0 never showed the image's size")
        fd = os.open("/dev/nbd0", os.O_RDWR)
        try:
            assert os.pread(fd, MiB, 0) == b"\x5a" * MiB
            assert os.pread(fd, 4096, MiB) == bytes(4096)
            os.pwrite(fd, b"\xa5" * 65536, 2 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        disconnected = run_kvmpy(["nbd", "-d", "/dev/nbd0"], timeout=120)
        server.wait(timeout=120)
    assert disconnected.returncode == 0, disconnected.stderr
    check = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    read = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0xa5 2M 64k", "-c", "read -P 0x5a 0 1M", img],
                          capture_output=True, text=True)
    assert read.returncode == 0 and "verification failed" not in read.stdout, read.stdout + read.stderr
