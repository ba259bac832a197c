"""The FUSE server of virtio-fs on its own: every opcode, hostile requests, bounded tables,
and virtio-fs itself on a split queue in plain memory (no guest)."""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.devices.virtio import fuse_server as F
from kvmpy.devices.virtio.fs import VirtioFs, check_tag
from support.fuse_client import FuseClient, FuseError, errno_of

FUZZ = bool(os.environ.get("KVMPY_FUZZ"))
ROOT = F.FUSE_ROOT_ID


@pytest.fixture
def tree(tmp_path):
    """share/ with a file, a subdirectory, and outside/ with a sentinel next to it."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_bytes(b"hello from the host\n")
    (share / "sub").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"SECRET")
    (share / "up").symlink_to("../outside/secret")
    (share / "abs").symlink_to(str(outside / "secret"))
    return share, outside


@pytest.fixture(params=["openat2", "nofollow"])
def client(tree, request, monkeypatch):
    """A client, with lookups through openat2 and through the fallback a kernel
    without it (or a seccomp filter refusing it) gets."""
    if request.param == "openat2":
        if not F.openat2_available():
            pytest.skip("this kernel has no openat2 (Linux < 5.6)")
    else:
        monkeypatch.setattr(F, "_openat2_works", False)
    server = F.FuseServer(str(tree[0]))
    c = FuseClient(server)
    c.init()
    yield c
    server.close()


def expect_errno(err: int, fn, *args, **kw):
    with pytest.raises(FuseError) as e:
        fn(*args, **kw)
    assert e.value.errno == err, os.strerror(e.value.errno)


def test_init_negotiates_and_requests_before_it_fail(tree):
    server = F.FuseServer(str(tree[0]))
    c = FuseClient(server)
    expect_errno(errno.EIO, c.lookup, ROOT, b"hello.txt")
    out = F.INIT_OUT.unpack(c.init(minor=37, flags=0xFFFFFFFF))
    major, minor, _, flags, _, _, max_write, _, max_pages, _, _ = out
    assert (major, minor) == (7, F.FUSE_KERNEL_MINOR_VERSION)
    assert flags == F.SUPPORTED_INIT_FLAGS and max_write == server.max_write
    assert max_pages * 4096 == server.max_write
    # an old guest gets the short reply of its protocol version
    assert len(c.init(minor=22)) == 24
    expect_errno(errno.EPROTO, c.call, F.INIT, 0, F.INIT_IN.pack(6, 0, 0, 0))
    # a newer major: our major back, the guest asks again
    assert F.INIT_OUT.unpack(c.call(F.INIT, 0, F.INIT_IN.pack(8, 0, 0, 0)))[0] == 7
    server.close()


def test_lookup_getattr_read(client, tree):
    node, attr = client.lookup(ROOT, b"hello.txt")
    st_ = os.stat(tree[0] / "hello.txt")
    assert attr[0] == st_.st_ino and attr[1] == st_.st_size and stat.S_ISREG(attr[9])
    assert attr[11] == 0      # the VMM's user appears as root
    assert client.lookup(ROOT, b"hello.txt")[0] == node     # one node id per inode
    assert client.getattr(node)[1] == st_.st_size
    fh = client.open(node)
    assert client.read(node, fh, 0, 4096) == b"hello from the host\n"
    assert client.read(node, fh, 6, 4) == b"from"
    client.call(F.FLUSH, node, F.RELEASE_IN.pack(fh, 0, 0, 0))
    client.release(node, fh)
    expect_errno(errno.EBADF, client.read, node, fh, 0, 10)
    expect_errno(errno.ENOENT, client.lookup, ROOT, b"missing")


def test_create_write_fsync_setattr(client, tree):
    node, fh = client.create(ROOT, b"new.bin")
    assert client.write(node, fh, 0, b"abcdef") == 6
    assert client.write(node, fh, 10, b"XY") == 2
    client.call(F.FSYNC, node, F.FSYNC_IN.pack(fh, 0, 0))
    client.call(F.FSYNC, node, F.FSYNC_IN.pack(fh, F.FUSE_FSYNC_FDATASYNC, 0))
    client.call(F.SYNCFS, ROOT, bytes(8))
    client.release(node, fh)
    assert (tree[0] / "new.bin").read_bytes() == b"abcdef\0\0\0\0XY"
    attr = client.setattr(node, F.FATTR_SIZE | F.FATTR_MODE, size=3, mode=0o600)
    assert attr[1] == 3 and attr[9] & 0o777 == 0o600
    assert os.stat(tree[0] / "new.bin").st_size == 3
    attr = client.setattr(node, F.FATTR_ATIME | F.FATTR_MTIME, atime=1000, mtime=2000)
    assert os.stat(tree[0] / "new.bin").st_mtime == 2000 and attr[4] == 2000
    client.setattr(node, F.FATTR_UID | F.FATTR_GID, uid=0, gid=0)      # guest root = the VMM's user
    assert os.stat(tree[0] / "new.bin").st_uid == os.geteuid()
    # O_TRUNC through OPEN (ATOMIC_O_TRUNC)
    fh = client.open(node, os.O_WRONLY | os.O_TRUNC)
    client.release(node, fh)
    assert (tree[0] / "new.bin").read_bytes() == b""
    expect_errno(errno.EEXIST, client.create, ROOT, b"new.bin", flags=os.O_RDWR | os.O_CREAT | os.O_EXCL)


def test_directories_readdir_rename_unlink(client, tree):
    d = client.mkdir(ROOT, b"dir")
    assert (tree[0] / "dir").is_dir()
    node, fh = client.create(d, b"f")
    client.release(node, fh)
    dh = client.opendir(ROOT)
    names = {n for n, _, _ in client.readdir(ROOT, dh)}
    assert names == {b".", b"..", b"hello.txt", b"sub", b"up", b"abs", b"dir"}
    # resuming at an offset continues the listing
    first = client.readdir(ROOT, dh, 0, 64)
    rest = client.readdir(ROOT, dh, first[-1][1])
    assert {n for n, _, _ in first + rest} == names
    client.call(F.FSYNCDIR, ROOT, F.FSYNC_IN.pack(dh, 0, 0))
    client.release(ROOT, dh, F.RELEASEDIR)
    client.rename(d, b"f", ROOT, b"g")
    assert (tree[0] / "g").exists() and not (tree[0] / "dir" / "f").exists()
    expect_errno(errno.EEXIST, client.rename, ROOT, b"g", ROOT, b"hello.txt", F.RENAME_NOREPLACE)
    client.rename(ROOT, b"g", ROOT, b"hello.txt", F.RENAME_EXCHANGE)
    assert (tree[0] / "g").read_bytes() == b"hello from the host\n"
    expect_errno(errno.EINVAL, client.rename, ROOT, b"g", ROOT, b"h", F.RENAME_WHITEOUT)
    node, fh = client.create(d, b"keep")
    client.release(node, fh)
    expect_errno(errno.ENOTEMPTY, client.call, F.RMDIR, ROOT, b"dir\0")
    client.call(F.UNLINK, d, b"keep\0")
    client.call(F.RMDIR, ROOT, b"dir\0")
    client.call(F.UNLINK, ROOT, b"g\0")
    assert not (tree[0] / "dir").exists() and not (tree[0] / "g").exists()


def test_symlink_readlink_link_mknod_statfs_access(client, tree):
    s = client.symlink(ROOT, b"ln", b"/etc/passwd")
    assert os.readlink(tree[0] / "ln") == "/etc/passwd"          # stored as given
    assert client.call(F.READLINK, s) == b"/etc/passwd"
    expect_errno(errno.ELOOP, client.open, s)                     # never followed by the server
    node, _ = client.lookup(ROOT, b"hello.txt")
    client.link(node, ROOT, b"hard")
    assert os.stat(tree[0] / "hard").st_ino == os.stat(tree[0] / "hello.txt").st_ino
    sub, _ = client.lookup(ROOT, b"sub")
    expect_errno(errno.EPERM, client.link, sub, ROOT, b"dirlink")
    f = client.entry(client.call(F.MKNOD, ROOT, F.MKNOD_IN.pack(stat.S_IFREG | 0o644, 0, 0, 0) + b"plain\0"))[0]
    assert (tree[0] / "plain").is_file() and f
    for kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
        expect_errno(errno.EPERM, client.call, F.MKNOD, ROOT,
                     F.MKNOD_IN.pack(kind | 0o666, os.makedev(1, 3), 0, 0) + b"dev\0")
    assert not (tree[0] / "dev").exists()
    out = F.STATFS_OUT.unpack(client.call(F.STATFS, ROOT))
    assert out[0] == os.statvfs(tree[0]).f_blocks
    client.call(F.ACCESS, node, F.ACCESS_IN.pack(os.R_OK, 0))
    for op in (F.GETXATTR, F.LISTXATTR, F.SETXATTR, F.REMOVEXATTR, 1234, F.READDIRPLUS, F.LSEEK):
        expect_errno(errno.ENOSYS, client.call, op, node, bytes(16))


def test_escapes_are_refused(client, tree):
    share, outside = tree
    for bad in (b"..", b".", b"a/b", b"../outside", b"/etc", b"", b"x" * 256):
        expect_errno(errno.EINVAL, client.lookup, ROOT, bad)
        expect_errno(errno.EINVAL, client.create, ROOT, bad)
        expect_errno(errno.EINVAL, client.mkdir, ROOT, bad)
        expect_errno(errno.EINVAL, client.symlink, ROOT, bad, b"t")
    # a symlink pointing out is an inode of its own; opening it does not follow
    for link in (b"up", b"abs"):
        node, attr = client.lookup(ROOT, link)
        assert stat.S_ISLNK(attr[9])
        expect_errno(errno.ELOOP, client.open, node)
        expect_errno(errno.EOPNOTSUPP, client.setattr, node, F.FATTR_MODE, mode=0o777)
        expect_errno(errno.ENOTDIR, client.lookup, node, b"secret")
        expect_errno(errno.ENOTDIR, client.create, node, b"x")
    # a symlink to a directory outside: no lookup goes through it
    os.symlink(str(outside), share / "outdir")
    node, _ = client.lookup(ROOT, b"outdir")
    expect_errno(errno.ENOTDIR, client.lookup, node, b"secret")
    expect_errno(errno.ENOTDIR, client.mkdir, node, b"x")
    # hard links take their source from the node table: no name for an outside file;
    # linking a symlink that points out links the symlink, not its target
    expect_errno(errno.ESTALE, client.link, 9999, ROOT, b"h")
    up, _ = client.lookup(ROOT, b"up")
    client.link(up, ROOT, b"uplink")
    assert os.path.islink(share / "uplink") and os.lstat(share / "uplink").st_ino == os.lstat(share / "up").st_ino
    assert os.stat(outside / "secret").st_nlink == 1
    # unknown node ids and handles
    expect_errno(errno.ESTALE, client.getattr, 4242)
    expect_errno(errno.EBADF, client.read, ROOT, 77, 0, 10)
    assert sorted(os.listdir(outside)) == ["secret"] and (outside / "secret").read_bytes() == b"SECRET"


def test_readonly_share(tree):
    server = F.FuseServer(str(tree[0]), readonly=True)
    c = FuseClient(server)
    c.init()
    node, _ = c.lookup(ROOT, b"hello.txt")
    fh = c.open(node)
    assert c.read(node, fh, 0, 5) == b"hello"
    expect_errno(errno.EROFS, c.write, node, fh, 0, b"x")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        expect_errno(errno.EROFS, c.open, node, flags)
    expect_errno(errno.EROFS, c.create, ROOT, b"n")
    expect_errno(errno.EROFS, c.mkdir, ROOT, b"d")
    expect_errno(errno.EROFS, c.symlink, ROOT, b"s", b"t")
    expect_errno(errno.EROFS, c.link, node, ROOT, b"h")
    expect_errno(errno.EROFS, c.rename, ROOT, b"hello.txt", ROOT, b"x")
    expect_errno(errno.EROFS, c.setattr, node, F.FATTR_SIZE, size=0)
    expect_errno(errno.EROFS, c.call, F.UNLINK, ROOT, b"hello.txt\0")
    expect_errno(errno.EROFS, c.call, F.RMDIR, ROOT, b"sub\0")
    expect_errno(errno.EROFS, c.call, F.ACCESS, node, F.ACCESS_IN.pack(os.W_OK, 0))
    assert sorted(os.listdir(tree[0])) == ["abs", "hello.txt", "sub", "up"]
    assert (tree[0] / "hello.txt").read_bytes() == b"hello from the host\n"
    server.close()


def test_forget_and_bounded_tables(tree):
    server = F.FuseServer(str(tree[0]), max_inodes=4, max_handles=2)
    c = FuseClient(server)
    c.init()
    for i in range(6):
        (tree[0] / f"f{i}").write_bytes(b"x")
    nodes = [c.lookup(ROOT, f"f{i}".encode())[0] for i in range(3)]
    assert server.inode_count == 4
    expect_errno(errno.ENFILE, c.lookup, ROOT, b"f3")
    assert server.inode_count == 4
    assert c.forget(nodes[0], 1) == b""          # no reply
    c.lookup(ROOT, b"f3")
    assert c.batch_forget([(nodes[1], 1), (nodes[2], 5), (12345, 1)]) == b""
    assert server.inode_count == 2
    f4 = c.lookup(ROOT, b"f4")[0]
    fhs = [c.open(f4) for _ in range(2)]
    expect_errno(errno.ENFILE, c.open, f4)
    assert server.handle_count == 2
    c.release(f4, fhs[0])
    c.release(f4, c.open(f4))
    # the root is never forgotten; DESTROY drops the session
    c.forget(ROOT, 100)
    c.lookup(ROOT, b"f5")
    c.call(F.DESTROY, 0)
    assert server.inode_count == 1 and server.handle_count == 0
    server.close()



def test_listings_of_many_open_directories_are_bounded_together(tree):
    """A guest opening the same big directory max_handles times and reading each
    must not make the server hold max_handles copies of its listing; a listing
    dropped for room is read again when the guest resumes it, and is whole."""
    for i in range(200):
        (tree[0] / f"f{i:03d}").write_bytes(b"")
    names = {b".", b"..", b"hello.txt", b"sub", b"up", b"abs"} | {f"f{i:03d}".encode() for i in range(200)}
    server = F.FuseServer(str(tree[0]), max_handles=64, max_listed=1000)
    c = FuseClient(server)
    c.init()
    handles = [c.opendir(ROOT) for _ in range(64)]
    firsts = [c.readdir(ROOT, dh, 0, 256) for dh in handles]
    assert server.listed_count <= 1000
    for dh, first in zip(handles, firsts):
        rest, offset = [], first[-1][1]
        while True:
            page = c.readdir(ROOT, dh, offset)
            if not page:
                break
            rest += page
            offset = page[-1][1]
        assert {n for n, _, _ in first + rest} == names
        assert server.listed_count <= 1000
    for dh in handles:
        c.release(ROOT, dh, F.RELEASEDIR)
    assert server.listed_count == 0
    server.close()

def test_malformed_requests_get_error_replies(client):
    server = client.server
    assert errno_of(server.handle(b"")) == errno.EINVAL
    assert errno_of(server.handle(b"\x01" * 39)) == errno.EINVAL
    # header length beyond the buffer, and below the header
    assert errno_of(client.raw(F.GETATTR, ROOT, bytes(16), length=4096)) == errno.EINVAL
    assert errno_of(client.raw(F.GETATTR, ROOT, bytes(16), length=8)) == errno.EINVAL
    # names without their NUL, structures cut short
    expect_errno(errno.EINVAL, client.call, F.LOOKUP, ROOT, b"hello.txt")
    expect_errno(errno.EINVAL, client.call, F.MKDIR, ROOT, b"\0\0")
    expect_errno(errno.EINVAL, client.call, F.RENAME, ROOT, struct.pack("<Q", ROOT) + b"a\0")
    node, _ = client.lookup(ROOT, b"hello.txt")
    fh = client.open(node, os.O_RDWR)
    # a WRITE claiming more than it carries, or more than max_write
    expect_errno(errno.EINVAL, client.call, F.WRITE, node, F.WRITE_IN.pack(fh, 0, 100, 0, 0, 0, 0) + b"abc")
    big = client.server.max_write + 1
    expect_errno(errno.EINVAL, client.call, F.WRITE, node,
                 F.WRITE_IN.pack(fh, 0, big, 0, 0, 0, 0) + bytes(big))
    # a read is capped at max_read
    assert len(client.read(node, fh, 0, 1 << 30)) <= client.server.max_read
    expect_errno(errno.EINVAL, client.read, node, fh, 1 << 63, 10)


REQUEST_OPS = sorted(F.FuseServer._OPS) + [0, 7, 19, 99, 0xFFFFFFFF]


@settings(max_examples=2000 if FUZZ else 200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(requests=st.lists(st.tuples(st.sampled_from(REQUEST_OPS), st.integers(0, 8), st.binary(max_size=200),
                                   st.sampled_from([None, 0, 39, 40, 1 << 20])), max_size=25))
def test_random_requests_never_raise_nor_touch_outside(tmp_path_factory, requests):
    base = tmp_path_factory.mktemp("fuzz")
    share, outside = base / "share", base / "outside"
    share.mkdir()
    outside.mkdir()
    (outside / "sentinel").write_bytes(b"keep")
    (share / "a").write_bytes(b"data")
    (share / "d").mkdir()
    (share / "out").symlink_to(str(outside))
    (share / "sentinel").symlink_to("../outside/sentinel")
    before = os.stat(outside / "sentinel")
    server = F.FuseServer(str(share), max_inodes=16, max_handles=8)
    c = FuseClient(server)
    c.init()
    names = [b"a", b"d", b"out", b"sentinel", b"..", b"x"]
    try:
        for opcode, node, body, length in requests:
            # mix structured prefixes (a fh, a name) into the random bytes, so requests get past parsing
            body = body.replace(b"@", names[len(body) % len(names)] + b"\0")
            reply = c.raw(opcode, node, body, length=length)
            if reply:
                rlen, err, _ = F.OUT_HEADER.unpack_from(reply)
                assert rlen == len(reply) and err <= 0
            assert server.inode_count <= 16 and server.handle_count <= 8
    finally:
        server.close()
    assert sorted(os.listdir(outside)) == ["sentinel"]
    after = os.stat(outside / "sentinel")
    assert (after.st_mtime_ns, after.st_size, after.st_mode, after.st_nlink) == \
        (before.st_mtime_ns, before.st_size, before.st_mode, before.st_nlink)
    assert (outside / "sentinel").read_bytes() == b"keep"


# --- the virtio device over a ring in plain memory --------------------------------------
def test_tag_and_config():
    assert check_tag("host") == b"host"
    for bad in ("", "x" * 37, "a\0b"):
        with pytest.raises(ValueError):
            check_tag(bad)


class FsRig:
    """virtio-fs behind its PCI transport, driven as Linux's virtiofs driver would."""

    REQ, REPLY = 0x200000, 0x300000

    def __init__(self, share, readonly=False, worker=True):
        from support.virtio_driver import SoftMachine, VirtioPciDriver
        self.m = SoftMachine()
        self.server = F.FuseServer(str(share), readonly=readonly)
        self.fs = VirtioFs(self.server, "hostshare", events=self.m.events if worker else None)
        self.dev = self.m.virtio_pci(self.fs)
        self.d = VirtioPciDriver(self.m, self.m.pci.add(self.dev))
        self.d.negotiate(1 << 32)
        self.hiprio = self.d.setup_queue(0, 16)
        self.q = self.d.setup_queue(1, 16)
        self.d.driver_ok()
        self.unique = 0

    def request(self, opcode, nodeid, body=b"", reply_room=4096, split=False, queue=1):
        self.unique += 1
        req = F.IN_HEADER.pack(F.IN_HEADER.size + len(body), opcode, self.unique, nodeid, 0, 0, 1, 0, 0) + body
        self.m.memory.write(self.REQ, req)
        readable = [(self.REQ, 8), (self.REQ + 8, len(req) - 8)] if split else [(self.REQ, len(req))]
        writable = [(self.REPLY, reply_room)] if reply_room else []
        self.m.memory.write(self.REPLY, bytes(max(reply_room, 16)))
        dq = self.hiprio if queue == 0 else self.q
        dq.add(readable, writable)
        self.d.kick(queue)
        (_, used), = self.d.wait_used(queue)
        return self.m.memory.read(self.REPLY, used)

    def close(self):
        self.dev.close()
        self.fs.close()
        self.server.close()
        self.m.close()


@pytest.mark.parametrize("worker", [True, False], ids=["worker-thread", "inline"])
def test_device_config_and_requests(tree, worker):
    rig = FsRig(tree[0], worker=worker)
    try:
        assert rig.dev.device.device_type == 26
        tag = bytes(rig.d.device_cfg(i, 1) for i in range(36))
        assert tag.rstrip(b"\0") == b"hostshare" and rig.d.device_cfg(36, 4) == 1
        reply = rig.request(F.INIT, 0, F.INIT_IN.pack(7, 37, 0, F.SUPPORTED_INIT_FLAGS) + bytes(48), split=True)
        assert F.OUT_HEADER.unpack_from(reply)[:2] == (len(reply), 0)
        reply = rig.request(F.LOOKUP, ROOT, b"hello.txt\0")
        _, err, unique = F.OUT_HEADER.unpack_from(reply)
        assert err == 0 and unique == rig.unique
        node = F.ENTRY_OUT.unpack_from(reply, 16)[0]
        # FORGET on hiprio: used with no reply written
        assert rig.request(F.FORGET, node, F.FORGET_IN.pack(1), reply_room=0, queue=0) == b""
        # a reply that does not fit becomes EIO; one with no room at all is dropped
        reply = rig.request(F.LOOKUP, ROOT, b"hello.txt\0", reply_room=20)
        assert F.OUT_HEADER.unpack_from(reply)[:2] == (16, -errno.EIO)
        assert rig.request(F.GETATTR, ROOT, bytes(16), reply_room=0) == b""
        # a request longer than any valid one is cut and refused, the device keeps serving
        huge = rig.dev.device.max_request + 4096
        rig.m.memory.write(rig.REQ, F.IN_HEADER.pack(F.IN_HEADER.size + huge, F.WRITE, 99, ROOT, 0, 0, 0, 0, 0))
        rig.q.add([(rig.REQ, F.IN_HEADER.size + huge)], [(rig.REPLY, 64)])
        rig.d.kick(1)
        (_, used), = rig.d.wait_used(1)
        assert F.OUT_HEADER.unpack_from(rig.m.memory.read(rig.REPLY, used))[1] == -errno.EINVAL
        reply = rig.request(F.GETATTR, ROOT, bytes(16))
        assert F.OUT_HEADER.unpack_from(reply)[1] == 0
        assert rig.dev.device.state().tag == b"hostshare"
        if worker:
            # many requests in flight at once: every one answered, in order
            heads = []
            for i in range(6):
                base = rig.REQ + 0x1000 * i
                req = F.IN_HEADER.pack(F.IN_HEADER.size + 16, F.GETATTR, 1000 + i, ROOT, 0, 0, 1, 0, 0) + bytes(16)
                rig.m.memory.write(base, req)
                heads.append(rig.q.add([(base, len(req))], [(rig.REPLY + 0x1000 * i, 256)]))
            rig.d.kick(1)
            used = rig.d.wait_used(1, count=6)
            assert [h for h, _ in used] == heads
            uniques = [F.OUT_HEADER.unpack_from(rig.m.memory.read(rig.REPLY + 0x1000 * i, 16))[2] for i in range(6)]
            assert uniques == list(range(1000, 1006))
    finally:
        rig.close()



def test_a_driver_reusing_a_head_in_flight_is_a_device_error(tree):
    """A driver has at most a queue's worth of requests out; one that makes the same
    head available again and again while the worker is busy would queue requests
    without bound: that is DEVICE_NEEDS_RESET, and the worker holds no more."""
    from kvmpy.devices.virtio.pci import DEVICE_NEEDS_RESET
    rig = FsRig(tree[0])
    try:
        rig.request(F.INIT, 0, F.INIT_IN.pack(7, 37, 0, 0) + bytes(48))
        req = F.IN_HEADER.pack(F.IN_HEADER.size + 16, F.GETATTR, 7, ROOT, 0, 0, 1, 0, 0) + bytes(16)
        rig.m.memory.write(rig.REQ, req)
        head = rig.q.add([(rig.REQ, len(req))], [(rig.REPLY, 4096)], publish=False)
        with rig.server._lock:          # the worker stalls on the first request
            for _ in range(4):
                for _ in range(16):
                    rig.q.publish(head)
                rig.d.kick(1)
                time.sleep(0.2)
            waiting = rig.fs._worker._jobs.qsize()
        assert waiting < 16, f"{waiting} requests wait for the worker, from a queue of 16"
        assert rig.d.status & DEVICE_NEEDS_RESET
    finally:
        rig.close()

def test_closed_server_answers_eio(tree):
    server = F.FuseServer(str(tree[0]))
    c = FuseClient(server)
    c.init()
    server.close()
    assert errno_of(c.raw(F.GETATTR, ROOT, bytes(16))) == errno.EIO
    assert errno_of(server.handle(b"")) == errno.EIO


def test_device_state_round_trip(tree):
    from kvmpy.devices.virtio.fs import VirtioFsState
    server = F.FuseServer(str(tree[0]), readonly=True)
    try:
        dev = VirtioFs(server, "t")
        FuseClient(server).init()
        state = dev.state()
        assert isinstance(state, VirtioFsState) and state.session.initialized
        again = VirtioFs.from_state(state, server)
        assert again.state() == state
        with pytest.raises(dataclasses.FrozenInstanceError):
            state.tag = b"x"
        other = F.FuseServer(str(tree[0]))
        with pytest.raises(ValueError):
            VirtioFs.from_state(state, other)
        other.close()
    finally:
        server.close()



# --- configuration ---------------------------------------------------------------------
def test_share_config_and_pc_entry(tmp_path):
    from kvmpy.config import config_from_dict, parse_share
    from kvmpy.errors import ConfigError
    from kvmpy.pc import pc_devices
    (tmp_path / "d").mkdir()
    src = str(tmp_path / "vm.toml")
    cfg = config_from_dict({"share": [{"path": "d", "tag": "host", "readonly": True}]}, src)
    assert (cfg.shares[0].path, cfg.shares[0].tag, cfg.shares[0].readonly) == (str(tmp_path / "d"), "host", True)
    assert [e.name for e in pc_devices(cfg) if e.name.startswith("virtio-fs")] == ["virtio-fs0"]
    share = parse_share(f"path={tmp_path / 'd'},tag=t2,readonly=on")
    assert share.readonly and share.tag == "t2"
    bad = [
        ({"share": [{"path": "d"}]}, "missing key 'tag'"),
        ({"share": [{"path": "d", "tag": "x" * 37}]}, "tag must be 1-36 bytes"),
        ({"share": [{"path": "d", "tag": ""}]}, "tag must be 1-36 bytes"),
        ({"share": [{"path": "nope", "tag": "a"}]}, "is not a directory"),
        ({"share": [{"path": "d", "tag": "a", "ro": True}]}, "unknown key 'ro'"),
        ({"share": [{"path": "d", "tag": "a", "readonly": "yes"}]}, "key 'readonly'"),
        ({"share": [{"path": "d", "tag": "a"}, {"path": "d", "tag": "a"}]}, "two shares with tag 'a'"),
        ({"share": {"path": "d"}}, "[[share]]"),
    ]
    for data, message in bad:
        with pytest.raises(ConfigError) as e:
            config_from_dict(data, src)
        assert message in str(e.value) and "\n" not in str(e.value)
    for spec, message in [("path=/nonexistent-kvmpy,tag=a", "not a directory"),
                          (f"path={tmp_path},x=1", "unknown option"),
                          ("tag=a", "missing path="), (f"path={tmp_path},tag=a,readonly=maybe", "readonly")]:
        with pytest.raises(ConfigError) as e:
            parse_share(spec)
        assert message in str(e.value) and str(e.value).startswith("--share ")


# --- under the VM's seccomp filter -------------------------------------------------------
def test_server_works_inside_the_sandbox_of_a_vm_with_a_share(tree):
    import subprocess
    import sys
    import textwrap
    from kvmpy import sandbox
    reason = sandbox.unavailable_reason()
    if reason is not None:
        pytest.skip(f"no seccomp filter here: {reason}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = textwrap.dedent(f"""
        import os, errno
        from kvmpy.devices.virtio import fuse_server as F
        from support.fuse_client import FuseClient, FuseError
        server = F.FuseServer({str(tree[0])!r})
        from kvmpy import sandbox
        sandbox.install(file_share=True)
        c = FuseClient(server)
        c.init()
        d = c.mkdir(1, b"made")
        node, fh = c.create(d, b"f")
        c.write(node, fh, 0, b"inside")
        c.call(F.FSYNC, node, F.FSYNC_IN.pack(fh, 0, 0))
        c.call(F.SYNCFS, 1, bytes(8))
        c.release(node, fh)
        c.rename(d, b"f", 1, b"g")
        c.symlink(1, b"s", b"g")
        c.link(node, 1, b"h")
        c.setattr(node, F.FATTR_MODE | F.FATTR_MTIME, mode=0o600, mtime=5)
        dh = c.opendir(1)
        print(sorted(n.decode() for n, _, _ in c.readdir(1, dh)))
        try:
            c.lookup(1, b"..")
        except FuseError as e:
            print("dotdot", errno.errorcode[e.errno])
        os.execv("/bin/true", ["true"])
    """)
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.path.join(root, 'tests')}")
    env.pop(sandbox.AUDIT_ENV, None)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    lines = p.stdout.splitlines()
    assert lines == ["['.', '..', 'abs', 'g', 'h', 'hello.txt', 'made', 's', 'sub', 'up']", "dotdot EINVAL"], p.stderr
    assert p.returncode == -31, "exec must still kill a VM with a share"
    assert (tree[0] / "g").read_bytes() == b"inside" and os.stat(tree[0] / "h").st_mtime == 5


def test_the_example_vm_toml_loads():
    from kvmpy.config import load_config
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "examples", "debian-share.toml"))
    assert [(s.path, s.tag, s.readonly) for s in cfg.shares] == [(os.path.join(root, "examples"), "examples", True)]
