"""Image locking that QEMU sees and honours (and that honours QEMU's).

QEMU's file-posix driver marks what each opener of an image does with OFD
byte-range read locks: a lock on byte 100+P says "I use permission P", a lock on
byte 200+P says "I do not let others have permission P". Before it relies on its
locks, an opener tests the opposite bytes: for each permission it uses, that nobody
locks 200+P (refuses to share it); for each permission it refuses to share, that
nobody locks 100+P (uses it). Only read locks are ever placed, so placing never
blocks; the test is an F_OFD_GETLK for a write lock, which conflicts with any other
open file description's read lock on that byte.

OFD locks belong to the open file description, not the process: two opens of one
image in the same kvmpy process see each other (two VMs, or a VM and its own
`img` job, are refused as two processes would be), and the locks go away when the
driver closes its descriptor, never earlier (POSIX process locks would vanish when
any descriptor of the file is closed).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ..errors import ImageError

# QEMU's BLK_PERM_* bits by position (include/block/block-common.h in 7.2).
PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
PERM_GRAPH_MOD = 4
PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write",
              PERM_WRITE_UNCHANGED: "write unchanged", PERM_RESIZE: "resize",
              PERM_GRAPH_MOD: "change children"}

LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200

# Linux's fcntl commands for open-file-description locks (not in Python's fcntl
# module on every version).
F_OFD_GETLK = 36
F_OFD_SETLK = 37

# struct flock on Linux/x86-64 and aarch64: short l_type, short l_whence, (pad),
# off_t l_start, off_t l_len, pid_t l_pid, (pad).
_FLOCK = struct.Struct("@hhqqi4x")


class LockMode:
    """What an opener uses (perm) and what it keeps from others (unshared)."""

    def __init__(self, name: str, perm: tuple, unshared: tuple):
        self.name = name
        self.perm = perm
        self.unshared = unshared


# A writer is what qemu-img or a VM's qcow2 node takes on the file: read, write and
# resize (metadata grows the file), sharing neither writes nor resizes.
WRITER = LockMode("read-write", (PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE),
                  (PERM_WRITE, PERM_RESIZE))
# A reader (qemu-img info, a read-only disk, every backing file of a chain): reads
# that must stay consistent, so nobody else may write or resize meanwhile. Readers
# coexist with each other.
READER = LockMode("read-only", (PERM_CONSISTENT_READ,), (PERM_WRITE, PERM_RESIZE))


def _flock(kind: int, start: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, start, 1, 0)


def _set_read_lock(fd: int, byte: int) -> None:
    fcntl.fcntl(fd, F_OFD_SETLK, _flock(fcntl.F_RDLCK, byte))


def _conflicting_lock(fd: int, byte: int) -> bool:
    """Whether another open file description holds a lock on ``byte``."""
    got = fcntl.fcntl(fd, F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
    return _FLOCK.unpack(got)[0] != fcntl.F_UNLCK


def _holder_pid(fd: int, byte: int) -> int | None:
    """The process holding a lock on ``byte`` of this file, where /proc tells.

    F_OFD_GETLK and /proc/locks report pid -1 for OFD locks (they belong to an open
    file description, not a process); each process's /proc/PID/fdinfo still lists
    the locks of its descriptors. Only on the refusal path, and only the processes
    this user may inspect."""
    st = os.fstat(fd)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    own = os.getpid()
    try:
        pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return None
    for pid in pids:
        if pid == own:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in fds:
            try:
                other = os.stat(f"/proc/{pid}/fd/{name}")
                if (other.st_dev, other.st_ino) != (st.st_dev, st.st_ino):
                    continue        # another file: its lock list is not read at all
                with open(f"/proc/{pid}/fdinfo/{name}") as f:
                    text = f.read()
            except OSError:
                continue
            for line in text.splitlines():
                # "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:2195528 100 101"
                parts = line.split()
                if not parts or parts[0] != "lock:" or len(parts) < 8 or parts[-3] != ident:
                    continue
                start, end = parts[-2], parts[-1]
                if start.isdigit() and int(start) <= byte and (end == "EOF" or (end.isdigit() and int(end) >= byte)):
                    return pid
    return None


def lock_image(fd: int, path: str, mode: LockMode) -> None:
    """Take QEMU's locks for ``mode`` on ``fd`` and check that nobody conflicts.

    Raises ImageError (one line naming the image, the permission and the holder)
    when another opener's locks forbid this one; the caller closes ``fd`` then,
    which drops whatever was placed here. A file system without OFD locks (some
    network file systems) is used unlocked, as QEMU does with locking=auto."""
    try:
        for p in mode.perm:
            _set_read_lock(fd, LOCK_PERM_BASE + p)
        for p in mode.unshared:
            _set_read_lock(fd, LOCK_SHARED_BASE + p)
        for p in mode.perm:
            if _conflicting_lock(fd, LOCK_SHARED_BASE + p):
                _refuse(path, fd, LOCK_SHARED_BASE + p, f'"{PERM_NAMES[p]}"')
        for p in mode.unshared:
            if _conflicting_lock(fd, LOCK_PERM_BASE + p):
                _refuse(path, fd, LOCK_PERM_BASE + p, f'shared "{PERM_NAMES[p]}"')
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EINVAL, errno.ENOLCK):
            return
        raise ImageError(f"{path}: cannot lock image: {e.strerror}") from None


def _refuse(path: str, fd: int, byte: int, what: str) -> None:
    pid = _holder_pid(fd, byte)
    holder = f" (pid {pid})" if pid else ""
    raise ImageError(f"{path}: locked by another process{holder}: failed to get {what} lock; "
                     f"stop the process that uses it, or use -U to inspect it read-only")


def mode_for(read_only: bool) -> LockMode:
    return READER if read_only else WRITER
