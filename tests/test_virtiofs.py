"""virtio-fs with a real guest: the default Linux guest (Debian's cloud kernel, its
virtiofs module) on the translator, booted once for the module with two shares:

  --share path=SHARE,tag=host              (writable)
  --share path=RO,tag=ro,readonly=on

and driven over its serial console: mount -t virtiofs, a host file read with the
same md5, a guest file the host sees after sync, rename, mkdir/rmdir, hard and
symbolic links, symlinks that point out of the share (the guest resolves them in
its own name space: the host file outside is never shown), and EROFS on the
read-only share. The VM runs under its seccomp filter, as a user would run it, and
when the tests run as root, ``--runas nobody``: what the guest creates is nobody's
on the host and root's in the guest.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import sys

import pytest

from conftest import ROOT
from support.serial_shell import booted_shell

pytestmark = pytest.mark.xdist_group("virtiofs-guest")


class FsGuest:
    def __init__(self, shell, proc, share, ro, outside, token, owner):
        self.owner = owner      # the VMM's uid once running: what guest-made files belong to
        self.shell, self.proc, self.share, self.ro, self.outside, self.token = shell, proc, share, ro, outside, token

    def run(self, command: str) -> tuple[int, str]:
        return self.shell.run(command)

    def ok(self, command: str) -> str:
        rc, out = self.shell.run(command)
        assert rc == 0, out
        return out


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    from kvmpy.tools import guestbuild
    if not all(map(shutil.which, ("apt-get", "dpkg-deb"))):
        pytest.skip("not a Debian host: no apt-get/dpkg-deb to build the guest")
    tmp = tmp_path_factory.mktemp("virtiofs")
    built = guestbuild.build(out_dir=str(tmp / "guest"), with_disk=False)
    share, ro, outside = tmp / "share", tmp / "ro", tmp / "outside"
    for d in (share, ro, outside):
        d.mkdir()
    (share / "big.bin").write_bytes(os.urandom(300 << 10))
    (share / "sub").mkdir()
    runas = os.geteuid() == 0
    if runas:       # nobody creates in the share and its subdirectory
        share.chmod(0o777)
        (share / "sub").chmod(0o777)
    (ro / "r.txt").write_bytes(b"read-only content\n")
    token = os.urandom(12).hex()
    (outside / "secret").write_text(token + "\n")
    (share / "abs").symlink_to(outside / "secret")      # made by the host, pointing out
    argv = [sys.executable, "-m", "kvmpy", "run", "--accel", "tcg", "-m", "256",
            "--kernel", built.kernel, "--initrd", built.initrd, "--no-reboot",
            "--append", "console=ttyS0 panic=-1 quiet",
            "--share", f"path={share},tag=host", "--share", f"path={ro},tag=ro,readonly=on"]
    if runas:
        argv += ["--runas", "nobody"]
    owner = pwd.getpwnam("nobody").pw_uid if runas else os.geteuid()
    with booted_shell(argv, ROOT, dict(os.environ, PYTHONPATH=ROOT)) as shell:
        g = FsGuest(shell, shell.proc, share, ro, outside, token, owner)
        g.ok("mkdir -p /mnt/h /mnt/r && mount -t virtiofs host /mnt/h && mount -t virtiofs ro /mnt/r")
        yield g


def md5(path) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def test_mounted_and_sandboxed(guest):
    out = guest.ok("grep virtiofs /proc/mounts")
    assert re.search(r"^host /mnt/h virtiofs rw", out, re.M) and re.search(r"^ro /mnt/r virtiofs", out, re.M), out
    from kvmpy.sandbox import unavailable_reason
    if unavailable_reason() is None:
        status = open(f"/proc/{guest.proc.pid}/status").read()
        assert re.search(r"^Seccomp:\s+2$", status, re.M), status


def test_guest_reads_a_host_file(guest):
    out = guest.ok("md5sum /mnt/h/big.bin; ls -ln /mnt/h/big.bin")
    assert md5(guest.share / "big.bin") in out
    # owned by the test (root, or the VMM's user when not root): the guest sees root
    assert re.search(r"-rw\S*\s+\d+\s+0\s+0\s+307200 ", out), out


def test_guest_writes_the_host_sees_after_sync(guest):
    out = guest.ok("dd if=/dev/urandom of=/mnt/h/made.bin bs=4096 count=37 2>/dev/null && sync "
                   "&& md5sum /mnt/h/made.bin")
    assert md5(guest.share / "made.bin") in out
    assert os.path.getsize(guest.share / "made.bin") == 37 * 4096
    assert os.stat(guest.share / "made.bin").st_uid == guest.owner
    assert re.search(r"\s0\s+0\s+151552 ", guest.ok("ls -ln /mnt/h/made.bin")), "the VMM's user is the guest's root"
    guest.ok("echo appended >> /mnt/h/made.bin && sync")
    assert open(guest.share / "made.bin", "rb").read()[-9:] == b"appended\n"


def test_rename_mkdir_rmdir_links(guest):
    guest.ok("echo one > /mnt/h/a.txt && mv /mnt/h/a.txt /mnt/h/sub/b.txt && mkdir /mnt/h/newdir "
             "&& ln /mnt/h/sub/b.txt /mnt/h/hard && ln -s sub/b.txt /mnt/h/soft && cat /mnt/h/soft && sync")
    assert not (guest.share / "a.txt").exists() and (guest.share / "sub" / "b.txt").read_text() == "one\n"
    assert (guest.share / "newdir").is_dir()
    assert os.stat(guest.share / "hard").st_ino == os.stat(guest.share / "sub" / "b.txt").st_ino
    assert os.readlink(guest.share / "soft") == "sub/b.txt"
    guest.ok("rmdir /mnt/h/newdir && rm /mnt/h/hard /mnt/h/soft && ls /mnt/h")
    assert not (guest.share / "newdir").exists() and not (guest.share / "hard").exists()
    rc, out = guest.run("rmdir /mnt/h/sub")
    assert rc != 0 and "not empty" in out.lower(), out


def test_symlinks_out_of_the_share_do_not_reach_the_host(guest):
    rc, out = guest.run("ln -s /etc/passwd /mnt/h/x; ln -s ../outside/secret /mnt/h/up; "
                        "cat /mnt/h/abs; cat /mnt/h/up; cat /mnt/h/../outside/secret; readlink /mnt/h/x")
    assert guest.token not in out, out
    assert "/etc/passwd" in out
    # the links are stored as given, pointing where the guest said
    assert os.readlink(guest.share / "x") == "/etc/passwd"
    assert os.readlink(guest.share / "up") == "../outside/secret"
    # what /mnt/h/x shows is the guest's own /etc/passwd (or nothing), never the host's
    host_passwd = open("/etc/passwd").read()
    rc, out = guest.run("cat /mnt/h/x")
    assert rc != 0 or out.strip() not in host_passwd or not out.strip()
    assert sorted(os.listdir(guest.outside)) == ["secret"]
    # nothing outside the share is held open by the VMM (the server's inodes are O_PATH fds)
    fds = os.listdir(f"/proc/{guest.proc.pid}/fd")
    targets = []
    for fd in fds:
        try:
            targets.append(os.readlink(f"/proc/{guest.proc.pid}/fd/{fd}"))
        except OSError:
            pass
    assert any(t.startswith(str(guest.share)) for t in targets), targets
    assert not [t for t in targets if t.startswith(str(guest.outside))], targets


def test_readonly_share_refuses_writes(guest):
    assert "read-only content" in guest.ok("cat /mnt/r/r.txt")
    for command in ("touch /mnt/r/new", "echo x >> /mnt/r/r.txt", "mkdir /mnt/r/d", "rm /mnt/r/r.txt",
                    "mv /mnt/r/r.txt /mnt/r/s.txt"):
        rc, out = guest.run(command)
        assert rc != 0 and "Read-only file system" in out, (command, out)
    assert sorted(os.listdir(guest.ro)) == ["r.txt"] and (guest.ro / "r.txt").read_bytes() == b"read-only content\n"


def test_umount_and_remount(guest):
    guest.ok("umount /mnt/h && mount -t virtiofs host /mnt/h && md5sum /mnt/h/big.bin")
    rc, out = guest.run("mount -t virtiofs nosuchtag /mnt/r")
    assert rc != 0, out
