"""A FUSE protocol server over one host directory: requests in as bytes, replies out.

virtio-fs (kvmpy.devices.virtio.fs) carries FUSE requests in its queues; this
module answers them and knows nothing of virtio, so it is tested on its own.
The design follows virtiofsd's passthrough file system:

* every inode the guest knows (a node id) is an ``O_PATH`` descriptor held here,
  looked up relative to its parent's descriptor, one path component at a time;
  node ids are counted (LOOKUP adds one, FORGET removes them) and the table is
  bounded (``max_inodes``): a guest that never forgets gets ENFILE, the host
  does not grow without bound. Open files and directories (file handles) are
  bounded the same way (``max_handles``).
* names from the guest are single components: empty, ".", "..", anything with
  '/' or NUL, or longer than 255 bytes is EINVAL before any system call. Lookups
  use openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) with O_NOFOLLOW where the
  kernel has it (and O_NOFOLLOW alone where it has not): a symlink is an inode
  of its own, never followed by the server; the guest resolves symlinks itself,
  through READLINK, in its own name space. So ``..``, absolute symlinks and links
  pointing out of the tree lead nowhere outside the share.
* LINK takes its source from the inode table: only a file already inside the
  share can get a second name.
* ownership: files are created as the VMM's user. The guest sees a file the VMM's
  user owns as owned by root (uid/gid 0), every other owner as it is on the host;
  a chown to 0 is a chown to the VMM's user, to anything else EPERM (unless the
  VMM runs as root, when the ids pass through). This is virtiofsd's
  ``--translate-uid`` with one mapping, enough for a guest whose root works in
  the share.
* a read-only share answers EROFS to everything that would change it and opens
  files read-only.

Everything a request carries is checked (header length against the buffer, each
structure's size, names' terminators and lengths, write size against payload,
read size capped at ``max_read``); a malformed request gets an error reply,
never an exception out of ``handle``.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import struct
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

FUSE_KERNEL_VERSION = 7
FUSE_KERNEL_MINOR_VERSION = 31     # what we speak; the guest's minor decides downwards
FUSE_ROOT_ID = 1

# opcodes (include/uapi/linux/fuse.h)
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS = 8, 9, 10, 11, 12, 13, 14, 15, 16, 17
RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = 18, 20, 21, 22, 23, 24, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, ACCESS, CREATE, INTERRUPT = 27, 28, 29, 30, 34, 35, 36
DESTROY, BATCH_FORGET, FALLOCATE, READDIRPLUS, RENAME2, LSEEK = 38, 42, 43, 44, 45, 46
SYNCFS = 50

# INIT flags offered (and only those the guest asked for are answered)
FUSE_ASYNC_READ = 1 << 0
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_BIG_WRITES = 1 << 5
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_MAX_PAGES = 1 << 22
SUPPORTED_INIT_FLAGS = FUSE_ASYNC_READ | FUSE_ATOMIC_O_TRUNC | FUSE_BIG_WRITES | FUSE_PARALLEL_DIROPS | FUSE_MAX_PAGES

# SETATTR valid bits
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FATTR_ATIME, FATTR_MTIME, FATTR_FH, FATTR_ATIME_NOW, FATTR_MTIME_NOW = 16, 32, 64, 128, 256
FUSE_GETATTR_FH = 1
FUSE_FSYNC_FDATASYNC = 1

RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4

# openat2 (include/uapi/linux/openat2.h)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
SYS_openat2 = 437
SYS_renameat2 = 316

IN_HEADER = struct.Struct("<IIQQIIIHH")     # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")          # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")   # fuse_attr, 88 bytes
ENTRY_OUT = struct.Struct("<QQQQII")        # nodeid generation entry_valid attr_valid (+nsec) then ATTR
ATTR_OUT = struct.Struct("<QII")            # attr_valid attr_valid_nsec dummy then ATTR
INIT_IN = struct.Struct("<IIII")            # major minor max_readahead flags
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # 64 bytes
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
OPEN_IN = struct.Struct("<II")
OPEN_OUT = struct.Struct("<QII")
CREATE_IN = struct.Struct("<IIII")
READ_IN = struct.Struct("<QQIIQII")
WRITE_IN = struct.Struct("<QQIIQII")
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<QIIQ")
FSYNC_IN = struct.Struct("<QII")
ACCESS_IN = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
DIRENT = struct.Struct("<QQII")

NAME_MAX = 255
PATH_MAX = 4096
ENTRY_TIMEOUT = 1           # seconds the guest may cache a name and attributes
NO_REPLY = b""              # FORGET and BATCH_FORGET are not answered

# Requests that change the share: EROFS on a read-only one.
MODIFYING = frozenset({SETATTR, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, WRITE, SETXATTR,
                       REMOVEXATTR, CREATE, FALLOCATE, RENAME2})


class _Reply(Exception):
    """An error answer: FUSE carries -errno in the reply header."""

    def __init__(self, err: int, why: str = "") -> None:
        super().__init__(why or os.strerror(err))
        self.errno = err


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_openat2_works = True


def open_beneath(dir_fd: int, name: str, flags: int, mode: int = 0) -> int:
    """open ``name`` (one checked component) under ``dir_fd`` without following a
    symlink, with openat2's RESOLVE_BENEATH where the kernel (and the sandbox) let us."""
    global _openat2_works
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if _openat2_works:
        how = _OpenHow(flags, mode if flags & (os.O_CREAT | getattr(os, "O_TMPFILE", 0)) else 0,
                       RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
        fd = _libc.syscall(ctypes.c_long(SYS_openat2), ctypes.c_int(dir_fd), os.fsencode(name),
                           ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EPERM):
            raise OSError(err, os.strerror(err), name)
        # No openat2 (kernel < 5.6, or a seccomp filter refusing it): the name is a
        # single checked component and O_NOFOLLOW stops at a symlink, which is what
        # RESOLVE_BENEATH guards here.
        _openat2_works = False
    return os.open(name, flags, mode, dir_fd=dir_fd)


def openat2_available() -> bool:
    """Whether this kernel (and any seccomp filter) lets us use openat2."""
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_BENEATH)
    fd = _libc.syscall(ctypes.c_long(SYS_openat2), ctypes.c_int(-100), b".", ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        return False
    os.close(fd)
    return True


def renameat2(olddir: int, oldname: str, newdir: int, newname: str, flags: int) -> None:
    if not flags:
        os.rename(oldname, newname, src_dir_fd=olddir, dst_dir_fd=newdir)
        return
    r = _libc.syscall(ctypes.c_long(SYS_renameat2), ctypes.c_int(olddir), os.fsencode(oldname),
                      ctypes.c_int(newdir), os.fsencode(newname), ctypes.c_uint(flags))
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def check_name(raw: bytes) -> str:
    """A guest name as one path component, or EINVAL."""
    if not raw or raw in (b".", b"..") or b"/" in raw or b"\0" in raw or len(raw) > NAME_MAX:
        raise _Reply(errno.EINVAL, f"bad name {raw[:64]!r}")
    return os.fsdecode(raw)


@dataclass
class _Inode:
    fd: int                 # O_PATH, O_NOFOLLOW
    key: tuple[int, int]    # (st_dev, st_ino): one node id per host inode
    lookups: int


@dataclass
class _Handle:
    fd: int
    is_dir: bool
    entries: list | None = None    # a directory's listing, taken at offset 0


@dataclass(frozen=True)
class FuseSessionState:
    """What the guest negotiated with FUSE_INIT. Open files, directories and the
    node ids the guest holds are host descriptors: they cannot be saved, and a
    restored device starts a fresh session (the guest must mount again)."""

    initialized: bool
    minor: int
    flags: int
    max_write: int


class FuseServer:
    """Answers FUSE requests over ``root`` (a host directory).

    ``handle(request) -> reply`` (bytes; ``b""`` for FORGET/BATCH_FORGET, which
    get no reply). ``close()`` releases every descriptor.
    """

    def __init__(self, root: str, readonly: bool = False, max_write: int = 1 << 17, max_read: int = 1 << 17,
                 max_inodes: int = 1 << 16, max_handles: int = 1 << 12, max_listed: int = 1 << 18,
                 name: str = "virtio-fs") -> None:
        self.name = name
        self.readonly = readonly
        self.max_write = max_write
        self.max_read = max_read
        self.max_inodes = max_inodes
        self.max_handles = max_handles
        # Directory listings the open directories keep, in entries, all together: a
        # guest opening max_handles directories of a big one must not multiply it.
        # Past it older listings are dropped and read again if the guest resumes one.
        self.max_listed = max_listed
        self._listed = 0
        self.root_path = root
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(root_fd)
        self._inodes: dict[int, _Inode] = {FUSE_ROOT_ID: _Inode(root_fd, (st.st_dev, st.st_ino), 2)}
        self._by_key: dict[tuple[int, int], int] = {(st.st_dev, st.st_ino): FUSE_ROOT_ID}
        self._next_node = FUSE_ROOT_ID + 1
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        # syncfs needs a descriptor of the file system that is not O_PATH
        self._sync_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.initialized = False
        self.minor = 0
        self.flags = 0
        # close() must not pull descriptors from under a request (their numbers would be reused)
        self._lock = threading.Lock()
        self._closed = False

    # state -----------------------------------------------------------------------
    def state(self) -> FuseSessionState:
        return FuseSessionState(self.initialized, self.minor, self.flags, self.max_write)

    @property
    def inode_count(self) -> int:
        return len(self._inodes)

    @property
    def handle_count(self) -> int:
        return len(self._handles)

    @property
    def listed_count(self) -> int:
        return self._listed

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._close_all()

    def _close_all(self) -> None:
        self._drop_session()
        root = self._inodes.pop(FUSE_ROOT_ID, None)
        if root is not None:
            os.close(root.fd)
            os.close(self._proc_fd)
            os.close(self._sync_fd)

    def _drop_session(self) -> None:
        for h in self._handles.values():
            os.close(h.fd)
        self._handles.clear()
        self._listed = 0
        for nodeid in [n for n in self._inodes if n != FUSE_ROOT_ID]:
            os.close(self._inodes.pop(nodeid).fd)
        self._by_key = {k: n for k, n in self._by_key.items() if n == FUSE_ROOT_ID}

    # the request loop ------------------------------------------------------------
    def handle(self, request: bytes) -> bytes:
        with self._lock:
            if self._closed:
                unique = IN_HEADER.unpack_from(request)[2] if len(request) >= IN_HEADER.size else 0
                return self._error(unique, errno.EIO)
            return self._handle_request(request)

    def _handle_request(self, request: bytes) -> bytes:
        if len(request) < IN_HEADER.size:
            log.warning("%s: request of %d bytes, shorter than its header", self.name, len(request))
            return OUT_HEADER.pack(OUT_HEADER.size, -errno.EINVAL, 0)
        length, opcode, unique, nodeid, uid, gid, pid, _, _ = IN_HEADER.unpack_from(request)
        if length < IN_HEADER.size or length > len(request):
            log.warning("%s: request says %d bytes, carries %d", self.name, length, len(request))
            return self._error(unique, errno.EINVAL)
        body = memoryview(request)[IN_HEADER.size:length]
        try:
            if opcode != INIT and not self.initialized:
                raise _Reply(errno.EIO, "request before FUSE_INIT")
            if self.readonly and opcode in MODIFYING:
                raise _Reply(errno.EROFS)
            method = self._OPS.get(opcode)
            if method is None:
                raise _Reply(errno.ENOSYS, f"opcode {opcode}")
            payload = method(self, nodeid, body)
        except _Reply as e:
            if e.errno not in (errno.ENOENT, errno.ENOSYS):
                log.debug("%s: opcode %d node %d: %s", self.name, opcode, nodeid, e)
            return self._error(unique, e.errno)
        except OSError as e:
            return self._error(unique, e.errno or errno.EIO)
        except (struct.error, ValueError, UnicodeError, OverflowError) as e:
            log.warning("%s: malformed request (opcode %d): %s", self.name, opcode, e)
            return self._error(unique, errno.EINVAL)
        except Exception:   # a bug here must not take the device (or the VM) down
            log.exception("%s: opcode %d failed", self.name, opcode)
            return self._error(unique, errno.EIO)
        if payload is None:
            return NO_REPLY
        return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload

    @staticmethod
    def _error(unique: int, err: int) -> bytes:
        return OUT_HEADER.pack(OUT_HEADER.size, -err, unique)

    # helpers ---------------------------------------------------------------------
    def _inode(self, nodeid: int) -> _Inode:
        inode = self._inodes.get(nodeid)
        if inode is None:
            raise _Reply(errno.ESTALE, f"unknown node id {nodeid}")
        return inode

    def _handle(self, fh: int, is_dir: bool) -> _Handle:
        h = self._handles.get(fh)
        if h is None or h.is_dir != is_dir:
            raise _Reply(errno.EBADF, f"unknown file handle {fh}")
        return h

    @staticmethod
    def _struct(body: memoryview, s: struct.Struct) -> tuple:
        if len(body) < s.size:
            raise _Reply(errno.EINVAL, f"{len(body)} bytes, expected {s.size}")
        return s.unpack_from(body)

    @staticmethod
    def _names(raw: memoryview, count: int) -> list[bytes]:
        """``count`` NUL-terminated strings, each terminated within the request."""
        out = []
        rest = bytes(raw)
        for _ in range(count):
            end = rest.find(b"\0")
            if end < 0:
                raise _Reply(errno.EINVAL, "name without its NUL")
            out.append(rest[:end])
            rest = rest[end + 1:]
        return out

    # Asked each time, not at start: ``--runas`` drops the VMM's ids after the
    # share is opened, and the guest's root is then that user.
    @property
    def _euid(self) -> int:
        return os.geteuid()

    @property
    def _egid(self) -> int:
        return os.getegid()

    def _guest_id(self, host_id: int, own: int) -> int:
        return 0 if host_id == own else host_id

    def _attr(self, st: os.stat_result) -> bytes:
        return ATTR.pack(st.st_ino, st.st_size, st.st_blocks, int(st.st_atime), int(st.st_mtime),
                         int(st.st_ctime), st.st_atime_ns % 10**9, st.st_mtime_ns % 10**9,
                         st.st_ctime_ns % 10**9, st.st_mode, st.st_nlink,
                         self._guest_id(st.st_uid, self._euid), self._guest_id(st.st_gid, self._egid),
                         0, st.st_blksize, 0)

    def _entry(self, nodeid: int, st: os.stat_result) -> bytes:
        return ENTRY_OUT.pack(nodeid, 0, ENTRY_TIMEOUT, ENTRY_TIMEOUT, 0, 0) + self._attr(st)

    def _adopt(self, fd: int) -> tuple[int, os.stat_result]:
        """Count one more lookup of the inode ``fd`` (an O_PATH fd now owned here)."""
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            nodeid = self._by_key.get(key)
            if nodeid is not None:
                self._inodes[nodeid].lookups += 1
                os.close(fd)
                return nodeid, st
            if len(self._inodes) >= self.max_inodes:
                raise _Reply(errno.ENFILE, f"{self.max_inodes} inodes held: the guest forgets none")
        except BaseException:
            os.close(fd)
            raise
        nodeid = self._next_node
        self._next_node += 1
        self._inodes[nodeid] = _Inode(fd, key, 1)
        self._by_key[key] = nodeid
        return nodeid, st

    def _lookup(self, parent: int, name: str) -> bytes:
        fd = open_beneath(self._inode(parent).fd, name, os.O_PATH)
        return self._entry(*self._adopt(fd))

    def _new_handle(self, fd: int, is_dir: bool) -> int:
        if len(self._handles) >= self.max_handles:
            os.close(fd)
            raise _Reply(errno.ENFILE, f"{self.max_handles} files open")
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(fd, is_dir)
        return fh

    @staticmethod
    def _proc(fd: int) -> str:
        # The one way to reach the inode an O_PATH fd holds for chmod, utimes,
        # linking and reopening: its entry in /proc/self/fd (held open as
        # ``_proc_fd``, used as dir_fd, so every call is an *at call). The fd is
        # ours: the name is nothing the guest chose.
        return str(fd)

    def _reopen(self, inode: _Inode, flags: int) -> int:
        st = os.fstat(inode.fd)
        if stat.S_ISLNK(st.st_mode):
            raise _Reply(errno.ELOOP, "open of a symlink")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise _Reply(errno.EACCES, "open of a device, fifo or socket")
        return os.open(self._proc(inode.fd), flags | os.O_CLOEXEC, dir_fd=self._proc_fd)

    def _open_flags(self, flags: int) -> int:
        accmode = flags & os.O_ACCMODE
        if self.readonly and (accmode != os.O_RDONLY or flags & os.O_TRUNC):
            raise _Reply(errno.EROFS)
        # The guest's kernel computes append offsets itself and owns creation; the
        # host open keeps only the access mode, truncation and sync semantics.
        keep = os.O_ACCMODE | os.O_TRUNC | os.O_SYNC | os.O_DSYNC
        return flags & keep

    # operations --------------------------------------------------------------------
    def op_init(self, nodeid: int, body: memoryview) -> bytes:
        major, minor, readahead, flags = self._struct(body, INIT_IN)
        if major < FUSE_KERNEL_VERSION:
            raise _Reply(errno.EPROTO, f"FUSE {major}.{minor}")
        if major > FUSE_KERNEL_VERSION:
            # The guest then asks again in our major version.
            return INIT_OUT.pack(FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        if self.initialized:
            self._drop_session()
        self.minor = min(minor, FUSE_KERNEL_MINOR_VERSION)
        self.flags = flags & SUPPORTED_INIT_FLAGS
        self.initialized = True
        max_pages = self.max_write // 4096
        reply = INIT_OUT.pack(FUSE_KERNEL_VERSION, self.minor, readahead, self.flags, 16, 12,
                              self.max_write, 1, max_pages, 0, 0)
        # A guest before 7.23 expects the 24-byte reply of its time.
        return reply if minor >= 23 else reply[:24]

    def op_destroy(self, nodeid: int, body: memoryview) -> bytes:
        self._drop_session()
        self.initialized = False
        return b""

    def op_lookup(self, nodeid: int, body: memoryview) -> bytes:
        (raw,) = self._names(body, 1)
        return self._lookup(nodeid, check_name(raw))

    def _forget(self, nodeid: int, count: int) -> None:
        inode = self._inodes.get(nodeid)
        if inode is None or nodeid == FUSE_ROOT_ID:
            return
        inode.lookups -= min(count, inode.lookups)
        if inode.lookups == 0:
            del self._inodes[nodeid]
            self._by_key.pop(inode.key, None)
            os.close(inode.fd)

    def op_forget(self, nodeid: int, body: memoryview) -> None:
        (count,) = self._struct(body, FORGET_IN)
        self._forget(nodeid, count)
        return None

    def op_batch_forget(self, nodeid: int, body: memoryview) -> None:
        count, _ = self._struct(body, BATCH_FORGET_IN)
        room = (len(body) - BATCH_FORGET_IN.size) // FORGET_ONE.size
        for i in range(min(count, room)):
            self._forget(*FORGET_ONE.unpack_from(body, BATCH_FORGET_IN.size + i * FORGET_ONE.size))
        return None

    def op_getattr(self, nodeid: int, body: memoryview) -> bytes:
        inode = self._inode(nodeid)
        st = os.fstat(inode.fd)
        return ATTR_OUT.pack(ENTRY_TIMEOUT, 0, 0) + self._attr(st)

    def op_setattr(self, nodeid: int, body: memoryview) -> bytes:
        inode = self._inode(nodeid)
        (valid, _, fh, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _, uid, gid,
         _) = self._struct(body, SETATTR_IN)
        st = os.fstat(inode.fd)
        is_link = stat.S_ISLNK(st.st_mode)
        handle = self._handles.get(fh) if valid & FATTR_FH else None
        if valid & FATTR_MODE:
            if is_link:
                raise _Reply(errno.EOPNOTSUPP, "chmod of a symlink")
            os.chmod(self._proc(inode.fd), mode & 0o7777, dir_fd=self._proc_fd)
        if valid & (FATTR_UID | FATTR_GID):
            host_uid = self._host_id(uid, self._euid) if valid & FATTR_UID else -1
            host_gid = self._host_id(gid, self._egid) if valid & FATTR_GID else -1
            if is_link:
                raise _Reply(errno.EOPNOTSUPP, "chown of a symlink")
            os.chown(self._proc(inode.fd), host_uid, host_gid, dir_fd=self._proc_fd)
        if valid & FATTR_SIZE:
            if not stat.S_ISREG(st.st_mode):
                raise _Reply(errno.EINVAL if not stat.S_ISDIR(st.st_mode) else errno.EISDIR)
            if handle is not None and not handle.is_dir:
                os.ftruncate(handle.fd, size)
            else:
                fd = self._reopen(inode, os.O_WRONLY)
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
        if valid & (FATTR_ATIME | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW):
            if is_link:
                raise _Reply(errno.EOPNOTSUPP, "utimes of a symlink")
            now = None
            if valid & (FATTR_ATIME_NOW | FATTR_MTIME_NOW):
                now = time.time_ns()
            cur = os.fstat(inode.fd)
            a = now if valid & FATTR_ATIME_NOW else atime * 10**9 + atimensec if valid & FATTR_ATIME \
                else cur.st_atime_ns
            m = now if valid & FATTR_MTIME_NOW else mtime * 10**9 + mtimensec if valid & FATTR_MTIME \
                else cur.st_mtime_ns
            os.utime(self._proc(inode.fd), ns=(a, m), dir_fd=self._proc_fd)
        return ATTR_OUT.pack(ENTRY_TIMEOUT, 0, 0) + self._attr(os.fstat(inode.fd))

    def _host_id(self, guest_id: int, own: int) -> int:
        if guest_id == 0:
            return own
        if self._euid != 0:
            raise _Reply(errno.EPERM, f"chown to guest id {guest_id}")
        return guest_id

    def op_readlink(self, nodeid: int, body: memoryview) -> bytes:
        inode = self._inode(nodeid)
        if not stat.S_ISLNK(os.fstat(inode.fd).st_mode):
            raise _Reply(errno.EINVAL)
        return os.fsencode(os.readlink("", dir_fd=inode.fd))

    def op_symlink(self, nodeid: int, body: memoryview) -> bytes:
        raw_name, target = self._names(body, 2)
        name = check_name(raw_name)
        if not target or len(target) >= PATH_MAX:
            raise _Reply(errno.EINVAL if not target else errno.ENAMETOOLONG)
        # stored as given: the guest resolves it, the server never follows it
        os.symlink(target, name, dir_fd=self._inode(nodeid).fd)
        return self._lookup(nodeid, name)

    def op_mknod(self, nodeid: int, body: memoryview) -> bytes:
        mode, _, umask, _ = self._struct(body, MKNOD_IN)
        (raw,) = self._names(body[MKNOD_IN.size:], 1)
        name = check_name(raw)
        if not stat.S_ISREG(mode):
            raise _Reply(errno.EPERM, "mknod of a device, fifo or socket")
        fd = open_beneath(self._inode(nodeid).fd, name, os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                          mode & 0o7777 & ~umask)
        os.close(fd)
        return self._lookup(nodeid, name)

    def op_mkdir(self, nodeid: int, body: memoryview) -> bytes:
        mode, umask = self._struct(body, MKDIR_IN)
        (raw,) = self._names(body[MKDIR_IN.size:], 1)
        name = check_name(raw)
        os.mkdir(name, mode & 0o7777 & ~umask, dir_fd=self._inode(nodeid).fd)
        return self._lookup(nodeid, name)

    def op_unlink(self, nodeid: int, body: memoryview) -> bytes:
        (raw,) = self._names(body, 1)
        os.unlink(check_name(raw), dir_fd=self._inode(nodeid).fd)
        return b""

    def op_rmdir(self, nodeid: int, body: memoryview) -> bytes:
        (raw,) = self._names(body, 1)
        os.rmdir(check_name(raw), dir_fd=self._inode(nodeid).fd)
        return b""

    def op_rename(self, nodeid: int, body: memoryview) -> bytes:
        (newdir,) = self._struct(body, RENAME_IN)
        return self._rename(nodeid, newdir, 0, body[RENAME_IN.size:])

    def op_rename2(self, nodeid: int, body: memoryview) -> bytes:
        newdir, flags, _ = self._struct(body, RENAME2_IN)
        return self._rename(nodeid, newdir, flags, body[RENAME2_IN.size:])

    def _rename(self, olddir: int, newdir: int, flags: int, names: memoryview) -> bytes:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise _Reply(errno.EINVAL, f"rename flags {flags:#x}")     # whiteouts are overlayfs's
        old, new = self._names(names, 2)
        renameat2(self._inode(olddir).fd, check_name(old), self._inode(newdir).fd, check_name(new), flags)
        return b""

    def op_link(self, nodeid: int, body: memoryview) -> bytes:
        (oldnode,) = self._struct(body, LINK_IN)
        (raw,) = self._names(body[LINK_IN.size:], 1)
        name = check_name(raw)
        source = self._inode(oldnode)
        if stat.S_ISDIR(os.fstat(source.fd).st_mode):
            raise _Reply(errno.EPERM, "hard link to a directory")
        # The source is an inode the guest looked up inside the share; /proc/self/fd
        # names exactly it (linkat's AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH).
        os.link(self._proc(source.fd), name, src_dir_fd=self._proc_fd, dst_dir_fd=self._inode(nodeid).fd,
                follow_symlinks=True)
        return self._lookup(nodeid, name)

    def op_open(self, nodeid: int, body: memoryview) -> bytes:
        flags, _ = self._struct(body, OPEN_IN)
        inode = self._inode(nodeid)
        if stat.S_ISDIR(os.fstat(inode.fd).st_mode) and flags & os.O_ACCMODE != os.O_RDONLY:
            raise _Reply(errno.EISDIR)
        fd = self._reopen(inode, self._open_flags(flags))
        return OPEN_OUT.pack(self._new_handle(fd, False), 0, 0)

    def op_create(self, nodeid: int, body: memoryview) -> bytes:
        flags, mode, umask, _ = self._struct(body, CREATE_IN)
        (raw,) = self._names(body[CREATE_IN.size:], 1)
        name = check_name(raw)
        host_flags = self._open_flags(flags) | os.O_CREAT | (flags & os.O_EXCL)
        fd = open_beneath(self._inode(nodeid).fd, name, host_flags, mode & 0o7777 & ~umask)
        try:
            path_fd = os.open(self._proc(fd), os.O_PATH | os.O_CLOEXEC, dir_fd=self._proc_fd)
        except BaseException:
            os.close(fd)
            raise
        try:
            node, st = self._adopt(path_fd)
        except BaseException:
            os.close(fd)
            raise
        try:
            fh = self._new_handle(fd, False)
        except _Reply:
            self._forget(node, 1)
            raise
        return self._entry(node, st) + OPEN_OUT.pack(fh, 0, 0)

    def op_read(self, nodeid: int, body: memoryview) -> bytes:
        fh, offset, size, _, _, _, _ = self._struct(body, READ_IN)
        h = self._handle(fh, False)
        if offset >= 1 << 63:
            raise _Reply(errno.EINVAL, f"offset {offset}")
        return os.pread(h.fd, min(size, self.max_read), offset)

    def op_write(self, nodeid: int, body: memoryview) -> bytes:
        fh, offset, size, _, _, _, _ = self._struct(body, WRITE_IN)
        data = body[WRITE_IN.size:]
        if size > len(data) or size > self.max_write:
            raise _Reply(errno.EINVAL, f"write of {size} bytes with {len(data)} carried")
        if offset >= 1 << 63:
            raise _Reply(errno.EINVAL, f"offset {offset}")
        h = self._handle(fh, False)
        written = os.pwrite(h.fd, data[:size], offset)
        return WRITE_OUT.pack(written, 0)

    def op_statfs(self, nodeid: int, body: memoryview) -> bytes:
        s = os.fstatvfs(self._inode(nodeid).fd)
        return STATFS_OUT.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize,
                               s.f_namemax, s.f_frsize, 0)

    def op_release(self, nodeid: int, body: memoryview) -> bytes:
        fh = self._struct(body, RELEASE_IN)[0]
        self._handle(fh, False)
        os.close(self._handles.pop(fh).fd)
        return b""

    def op_releasedir(self, nodeid: int, body: memoryview) -> bytes:
        fh = self._struct(body, RELEASE_IN)[0]
        self._handle(fh, True)
        h = self._handles.pop(fh)
        self._forget_listing(h)
        os.close(h.fd)
        return b""

    def op_flush(self, nodeid: int, body: memoryview) -> bytes:
        self._handle(self._struct(body, RELEASE_IN)[0], False)
        return b""

    def _fsync(self, body: memoryview, is_dir: bool) -> bytes:
        fh, flags, _ = self._struct(body, FSYNC_IN)
        h = self._handle(fh, is_dir)
        (os.fdatasync if flags & FUSE_FSYNC_FDATASYNC else os.fsync)(h.fd)
        return b""

    def op_fsync(self, nodeid: int, body: memoryview) -> bytes:
        return self._fsync(body, False)

    def op_fsyncdir(self, nodeid: int, body: memoryview) -> bytes:
        return self._fsync(body, True)

    def op_syncfs(self, nodeid: int, body: memoryview) -> bytes:
        # The guest's sync(1): what it wrote is on the host's disk, not in its page cache.
        if _libc.syncfs(self._sync_fd) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return b""

    def op_opendir(self, nodeid: int, body: memoryview) -> bytes:
        inode = self._inode(nodeid)
        if not stat.S_ISDIR(os.fstat(inode.fd).st_mode):
            raise _Reply(errno.ENOTDIR)
        fd = self._reopen(inode, os.O_RDONLY | os.O_DIRECTORY)
        return OPEN_OUT.pack(self._new_handle(fd, True), 0, 0)

    def op_readdir(self, nodeid: int, body: memoryview) -> bytes:
        fh, offset, size, _, _, _, _ = self._struct(body, READ_IN)
        h = self._handle(fh, True)
        if offset == 0 or h.entries is None:
            entries = [(b".", os.fstat(h.fd).st_ino, stat.S_IFDIR), (b"..", 1, stat.S_IFDIR)]
            with os.scandir(h.fd) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    entries.append((os.fsencode(e.name), st.st_ino, stat.S_IFMT(st.st_mode)))
            self._forget_listing(h)
            for other in self._handles.values():
                if self._listed + len(entries) <= self.max_listed:
                    break
                self._forget_listing(other)
            h.entries = entries
            self._listed += len(entries)
        size = min(size, self.max_read)
        out = bytearray()
        for index in range(offset, len(h.entries)):
            name, ino, fmt = h.entries[index]
            rec = DIRENT.pack(ino, index + 1, len(name), fmt >> 12) + name
            rec += b"\0" * (-len(rec) % 8)
            if len(out) + len(rec) > size:
                break
            out += rec
        return bytes(out)

    def _forget_listing(self, h: _Handle) -> None:
        if h.entries is not None:
            self._listed -= len(h.entries)
            h.entries = None

    def op_access(self, nodeid: int, body: memoryview) -> bytes:
        mask, _ = self._struct(body, ACCESS_IN)
        inode = self._inode(nodeid)
        if mask & os.W_OK and self.readonly:
            raise _Reply(errno.EROFS)
        st = os.fstat(inode.fd)
        if stat.S_ISLNK(st.st_mode):
            return b""
        if not os.access(self._proc(inode.fd), mask & (os.R_OK | os.W_OK | os.X_OK), dir_fd=self._proc_fd):
            raise _Reply(errno.EACCES)
        return b""

    def op_xattr(self, nodeid: int, body: memoryview) -> bytes:
        # Extended attributes are not passed through: ENOSYS makes the guest stop asking.
        raise _Reply(errno.ENOSYS)

    def op_interrupt(self, nodeid: int, body: memoryview) -> None:
        return None     # every request is answered at once: nothing to interrupt

    _OPS = {
        INIT: op_init, DESTROY: op_destroy, LOOKUP: op_lookup, FORGET: op_forget,
        BATCH_FORGET: op_batch_forget, GETATTR: op_getattr, SETATTR: op_setattr, READLINK: op_readlink,
        SYMLINK: op_symlink, MKNOD: op_mknod, MKDIR: op_mkdir, UNLINK: op_unlink, RMDIR: op_rmdir,
        RENAME: op_rename, RENAME2: op_rename2, LINK: op_link, OPEN: op_open, CREATE: op_create,
        READ: op_read, WRITE: op_write, STATFS: op_statfs, RELEASE: op_release, RELEASEDIR: op_releasedir,
        FLUSH: op_flush, FSYNC: op_fsync, FSYNCDIR: op_fsyncdir, OPENDIR: op_opendir, READDIR: op_readdir,
        ACCESS: op_access, GETXATTR: op_xattr, LISTXATTR: op_xattr, SETXATTR: op_xattr,
        REMOVEXATTR: op_xattr, INTERRUPT: op_interrupt, SYNCFS: op_syncfs,
    }
