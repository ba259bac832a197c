"""QEMU's ``-netdev user,smb=DIR`` with a real guest: the default Linux guest on the
translator with ``--net user,smb=DIR`` mounts ``//10.0.2.4/qemu`` with cifs, reads
a host file (same md5) and writes one the host then sees; every guest connection
gets a fresh smbd from the spawner (kvmpy.net.smb), which the VMM's seccomp
filter would not let it start itself. When the tests run as root the VM runs
``--runas nobody`` and its smbds as nobody too: what the guest writes is nobody's.
When the VM is gone, so are its smbds and its private directory.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pathlib
import pwd
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import ROOT
from support.serial_shell import booted_shell

pytestmark = pytest.mark.xdist_group("smb-guest")

MOUNT = "mount -t cifs //10.0.2.4/qemu /mnt/s -o username=guest,password=,vers=3.0"


def _smbd_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "smbd"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def _private_dirs_sharing(guest) -> set[str]:
    """The new private directories whose smb.conf exports this guest's share (a VM
    on the other test worker may run its own smbd meanwhile)."""
    found = set()
    for d in set(glob.glob(os.path.join(tempfile.gettempdir(), "kvmpy-smb.*"))) - guest.private_before:
        try:
            with open(os.path.join(d, "smb.conf")) as f:
                if f"path={guest.share}\n" in f.read():
                    found.add(d)
        except OSError:       # another VM's, going away or not written yet
            pass
    return found


class SmbGuest:
    def __init__(self, shell, proc, share, private_before, smbd_before, runas):
        self.shell, self.proc, self.share, self.runas = shell, proc, share, runas
        self.private_before, self.smbd_before = private_before, smbd_before

    def run(self, command: str) -> tuple[int, str]:
        return self.shell.run(command)


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    from kvmpy.net.smb import find_smbd
    from kvmpy.tools import guestbuild
    if find_smbd() is None:
        pytest.skip("no smbd on this host (Debian: apt-get install samba)")
    if not all(map(shutil.which, ("apt-get", "dpkg-deb", "pgrep"))):
        pytest.skip("not a Debian host: no apt-get/dpkg-deb to build the guest, or no pgrep")
    try:
        import kvmpy.net.slirp  # noqa: F401
    except ImportError as e:
        pytest.skip(f"kvmpy.net._slirp_cffi is not built ({e}): apt-get install libslirp-dev, rebuild")
    tmp = tmp_path_factory.mktemp("smb")
    built = guestbuild.build(out_dir=str(tmp / "guest"), with_disk=False)
    runas = os.geteuid() == 0
    # pytest's own temporary tree is root's alone: nobody's smbd needs a way in
    share = tmp / "share" if not runas else pathlib.Path(tempfile.mkdtemp(prefix="kvmpy-smbtest."))
    share.mkdir(exist_ok=True)
    share.chmod(0o777)
    (share / "host.bin").write_bytes(os.urandom(200 << 10))
    private_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "kvmpy-smb.*")))
    smbd_before = _smbd_pids()
    argv = [sys.executable, "-m", "kvmpy", "run", "--accel", "tcg", "-m", "256",
            "--kernel", built.kernel, "--initrd", built.initrd, "--no-reboot",
            "--append", "console=ttyS0 panic=-1 quiet", "--net", f"user,smb={share}"]
    if runas:
        argv += ["--runas", "nobody"]
    try:
        with booted_shell(argv, ROOT, dict(os.environ, PYTHONPATH=ROOT)) as shell:
            rc, out = shell.run("ip link set eth0 up; udhcpc -i eth0 -q -n -t 5 -s /etc/kvmpy/udhcpc.script "
                                "&& mkdir -p /mnt/s")
            assert rc == 0, out
            yield SmbGuest(shell, shell.proc, share, private_before, smbd_before, runas)
    finally:
        if runas:
            shutil.rmtree(share, ignore_errors=True)


def test_cifs_reads_and_writes_host_files(guest):
    rc, out = guest.run(f"{MOUNT} && md5sum /mnt/s/host.bin")
    assert rc == 0, out
    assert hashlib.md5((guest.share / "host.bin").read_bytes()).hexdigest() in out
    rc, out = guest.run("dd if=/dev/urandom of=/mnt/s/guest.bin bs=4096 count=20 2>/dev/null && sync "
                        "&& md5sum /mnt/s/guest.bin && umount /mnt/s")
    assert rc == 0, out
    assert hashlib.md5((guest.share / "guest.bin").read_bytes()).hexdigest() in out
    if guest.runas:
        assert os.stat(guest.share / "guest.bin").st_uid == pwd.getpwnam("nobody").pw_uid
    # a second connection gets its own smbd
    rc, out = guest.run(f"{MOUNT} && cat /mnt/s/guest.bin | md5sum && mv /mnt/s/guest.bin /mnt/s/moved.bin "
                        "&& umount /mnt/s")
    assert rc == 0, out
    assert (guest.share / "moved.bin").exists() and not (guest.share / "guest.bin").exists()


def test_smbds_and_private_dir_go_with_the_vm(guest):
    rc, out = guest.run(MOUNT)
    assert rc == 0, out
    mine = _private_dirs_sharing(guest)
    assert len(mine) == 1 and os.path.exists(os.path.join(mine.pop(), "smb.conf"))
    assert _smbd_pids() - guest.smbd_before, "no smbd serves the mounted share"
    guest.proc.stdin.write(b"poweroff -f\n")
    guest.proc.stdin.flush()
    assert guest.proc.wait(timeout=120) == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = _private_dirs_sharing(guest)
        if not left and not _smbd_pids() - guest.smbd_before:
            break
        time.sleep(0.5)
    assert not left, left
    assert not _smbd_pids() - guest.smbd_before


def test_smb_options():
    from kvmpy.config import parse_netdev
    from kvmpy.errors import ConfigError
    net = parse_netdev(f"user,smb={ROOT}")
    assert net.user.smb == ROOT and str(net.user.smbserver) == "10.0.2.4"
    assert str(parse_netdev(f"user,net=10.0.3.0/24,smb={ROOT},smbserver=10.0.3.9").user.smbserver) == "10.0.3.9"
    for spec, message in [("user,smb=/nonexistent-kvmpy", "is not a directory"),
                          ("user,smbserver=10.0.2.4", "smbserver without smb=DIR"),
                          (f"user,smb={ROOT},smbserver=192.168.1.1", "not a host address")]:
        with pytest.raises(ConfigError) as e:
            parse_netdev(spec)
        assert message in str(e.value), str(e.value)


def _children(pid: int) -> list[int]:
    # the spawner starts each smbd from a thread of its own: every task's children
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return out


def test_a_guest_opening_connections_without_end_gets_a_bounded_number_of_smbds(tmp_path):
    """Every connection to 10.0.2.4:445 costs a host smbd: a guest that opens them
    without end gets MAX_SMBDS at once, the rest are closed."""
    import socket
    from kvmpy.net.smb import MAX_SMBDS, SmbServer, find_smbd
    if find_smbd() is None:
        pytest.skip("no smbd on this host (Debian: apt-get install samba)")
    server = SmbServer(str(tmp_path), runas="nobody")
    conns = []
    try:
        for _ in range(MAX_SMBDS + 8):
            c = socket.socket(socket.AF_UNIX)
            c.connect(server.socket_path)
            conns.append(c)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_children(server.proc.pid)) < MAX_SMBDS:
            time.sleep(0.2)
        time.sleep(1)
        assert len(_children(server.proc.pid)) == MAX_SMBDS
        refused = 0
        for c in conns:
            c.settimeout(0)
            try:
                refused += c.recv(1) == b""
            except BlockingIOError:
                pass
        assert refused == 8
    finally:
        for c in conns:
            c.close()
        server.close()
    assert not os.path.exists(server.private_dir)
