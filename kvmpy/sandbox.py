"""The VMM's sandbox: NO_NEW_PRIVS and a seccomp filter for the running VM.

``kvmpy run`` sets the machine up with the whole of Python at hand (opening
/dev/kvm, images, taps, sockets, importing plug-ins), then, before the first
guest instruction, calls ``install()``: from then on every thread of the process,
and every thread it starts, may make only the system calls a running VM needs, as
Firecracker's and crosvm's per-process filters do. A guest that takes over a
device model (hostile input parsed in Python) can then neither start a program,
nor fork, nor open a file, nor make a socket, nor ptrace or mount anything.

The filter is a classic BPF program assembled here (no libseccomp):

  1. the architecture must be AUDIT_ARCH_X86_64 (an i386 ``int 0x80`` call has
     other numbers), and the number must not carry the x32 bit (x32 calls share
     the architecture but are other entry points): else the process is killed;
  2. an allow-list (``policy()``): a call is allowed, allowed only with certain
     arguments (``ioctl`` requests, ``clone`` of threads, signals to ourselves),
     or refused with an errno where Python and glibc cope with the refusal (file
     opens and path lookups: a traceback then lacks its source lines, glibc's
     malloc skips its overcommit probe; ``clone3``: ENOSYS makes glibc fall back
     to ``clone``, whose flags BPF can read);
  3. anything else kills the whole process (SECCOMP_RET_KILL_PROCESS: SIGSYS,
     exit status 159 in a shell, -31 for subprocess).

A killed process cannot say which call it made. To find out:
  * the kernel logs each kill to the audit log (``dmesg`` or
    ``journalctl -k``: ``audit: type=1326 ... syscall=59``; the number is the
    x86-64 system call number, ``ausyscall 59`` names it);
  * ``KVMPY_SANDBOX_AUDIT=1`` in the environment makes every call outside the
    list succeed and be logged there instead (SECCOMP_RET_LOG), for finding what
    a new device or plug-in needs;
  * ``--sandbox off`` runs without the filter.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from dataclasses import dataclass

from .errors import HostError
from .threadname import PR_SET_NAME

log = logging.getLogger(__name__)

AUDIT_ENV = "KVMPY_SANDBOX_AUDIT"

# <linux/audit.h>: EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

# <linux/seccomp.h>
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_LOG = 2
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000

# <linux/prctl.h>
PR_GET_SECCOMP = 21
PR_SET_NO_NEW_PRIVS = 38

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
_OFF_NR = 0
_OFF_ARCH = 4
_OFF_ARGS = 16

# Classic BPF opcodes (<linux/filter.h>)
_BPF_LD_W_ABS = 0x20
_BPF_ALU_AND_K = 0x54
_BPF_JEQ_K = 0x15
_BPF_JGE_K = 0x35
_BPF_RET_K = 0x06
BPF_MAXINSNS = 4096

# x86-64 system call numbers of the calls the policy names (arch/x86/entry/syscalls/
# syscall_64.tbl; tests check them against <asm/unistd_64.h> where it is installed).
SYSCALLS = {
    "read": 0, "write": 1, "open": 2, "close": 3, "stat": 4, "fstat": 5, "lstat": 6,
    "poll": 7, "lseek": 8, "mmap": 9, "mprotect": 10, "munmap": 11, "brk": 12,
    "rt_sigaction": 13, "rt_sigprocmask": 14, "rt_sigreturn": 15, "ioctl": 16,
    "pread64": 17, "pwrite64": 18, "readv": 19, "writev": 20, "access": 21,
    "sched_yield": 24, "mremap": 25, "madvise": 28, "dup": 32, "dup2": 33, "nanosleep": 35,
    "getpid": 39, "prctl": 157, "socket": 41, "connect": 42, "accept": 43, "sendto": 44, "recvfrom": 45,
    "sendmsg": 46, "recvmsg": 47, "shutdown": 48, "bind": 49, "listen": 50,
    "getsockname": 51, "getpeername": 52, "setsockopt": 54, "getsockopt": 55, "clone": 56, "execve": 59,
    "exit": 60, "wait4": 61, "kill": 62, "fcntl": 72, "fsync": 74, "fdatasync": 75,
    "ftruncate": 77, "getcwd": 79, "fchdir": 81, "unlink": 87, "readlink": 89,
    "gettimeofday": 96, "ptrace": 101, "sigaltstack": 131, "gettid": 186, "time": 201,
    "futex": 202, "restart_syscall": 219, "clock_gettime": 228, "clock_getres": 229,
    "clock_nanosleep": 230, "exit_group": 231, "epoll_wait": 232, "epoll_ctl": 233,
    "tgkill": 234, "openat": 257, "newfstatat": 262, "readlinkat": 267, "faccessat": 269,
    "ppoll": 271, "set_robust_list": 273, "epoll_pwait": 281, "timerfd_create": 283,
    "fallocate": 285, "timerfd_settime": 286, "timerfd_gettime": 287, "accept4": 288,
    "eventfd2": 290, "epoll_create1": 291, "dup3": 292, "pipe2": 293, "preadv": 295,
    "pwritev": 296, "seccomp": 317, "getrandom": 318, "preadv2": 327, "pwritev2": 328,
    "statx": 332, "rseq": 334, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "clone3": 435, "openat2": 437, "faccessat2": 439,
    # virtio-fs shares (FILE_SHARE_CALLS)
    "fstatfs": 138, "getdents64": 217, "mkdirat": 258, "fchownat": 260, "unlinkat": 263, "renameat": 264,
    "linkat": 265, "symlinkat": 266, "fchmodat": 268, "utimensat": 280, "renameat2": 316,
    "geteuid": 107, "getegid": 108, "syncfs": 306,
}

# ioctl requests outside KVM's own (type 0xAE, <linux/kvm.h>) a running VM makes.
KVMIO = 0xAE
IOCTLS = {
    # the stdio console: raw mode on, the terminal's state restored at exit
    "TCGETS": 0x5401, "TCSETS": 0x5402, "TCSETSW": 0x5403, "TCSETSF": 0x5404,
    "TIOCGWINSZ": 0x5413,
    # Python's socket.setblocking, available bytes
    "FIONBIO": 0x5421, "FIONREAD": 0x541B, "FIOCLEX": 0x5451, "FIONCLEX": 0x5450,
    # virtio-net: offloads follow what the guest's driver negotiates
    "TUNSETOFFLOAD": 0x400454D0, "TUNSETVNETHDRSZ": 0x400454D8, "TUNGETVNETHDRSZ": 0x800454D7,
    # virtio-net multiqueue: a pair the guest stops using has its tap queue detached
    "TUNSETQUEUE": 0x400454D9,
    # vhost-net (kvmpy/devices/virtio/vhost.py VHOST_IOCTLS): rings handed to the
    # kernel and taken back at every DRIVER_OK, reset, pause and state()
    "VHOST_GET_FEATURES": 0x8008AF00, "VHOST_SET_FEATURES": 0x4008AF00, "VHOST_SET_MEM_TABLE": 0x4008AF03,
    "VHOST_SET_VRING_NUM": 0x4008AF10, "VHOST_SET_VRING_ADDR": 0x4028AF11, "VHOST_SET_VRING_BASE": 0x4008AF12,
    "VHOST_GET_VRING_BASE": 0xC008AF12, "VHOST_SET_VRING_KICK": 0x4008AF20, "VHOST_SET_VRING_CALL": 0x4008AF21,
    "VHOST_SET_VRING_ERR": 0x4008AF22, "VHOST_NET_SET_BACKEND": 0x4008AF30,
}
# Deliberately absent: TIOCSTI (0x5412) pushes characters into the controlling
# terminal's input, a way out of any sandbox whose stdin is the user's shell.

CLONE_THREAD = 0x00010000
AT_EMPTY_PATH = 0x1000


@dataclass(frozen=True)
class Arg:
    """A condition on the low 32 bits of argument ``index``: ``(arg & mask) == value``.
    Only the low half is read: every argument checked here is an int or unsigned
    int in the kernel (ioctl's request, clone's flags as used, a pid, fstatat's
    flags), so the kernel ignores the high half as well."""
    index: int
    value: int
    mask: int = 0xFFFFFFFF


@dataclass(frozen=True)
class Rule:
    """How one system call is treated: ``allow`` (any arguments), or allowed when
    one of ``when`` matches (each a tuple of Args, all of which must hold), else
    refused with ``errno`` (None: the filter's default action, death). ``errno``
    without ``when``: always refused with it."""
    allow: bool = False
    when: tuple[tuple[Arg, ...], ...] = ()
    errno: int | None = None


ALLOW = Rule(allow=True)


def _refuse(code: int) -> Rule:
    return Rule(errno=code)


def _own_process(pid: int) -> Rule:
    return Rule(when=((Arg(0, pid),),))


def _ioctl_rule() -> Rule:
    kvm = (Arg(1, KVMIO << 8, 0xFF00),)
    return Rule(when=(kvm,) + tuple((Arg(1, req),) for req in IOCTLS.values()))


# User-mode networking (libslirp, kvmpy.net) makes a host socket for each guest
# connection, UDP flow and forwarded port while the VM runs: these are allowed
# only in a VM with a user NIC. Files stay closed: the guest's DNS is relayed by
# kvmpy.net.slirp to the nameserver /etc/resolv.conf named before the filter.
USER_NETWORK_CALLS = ("socket", "connect", "accept", "bind", "listen", "getpeername", "sendmsg", "recvmsg")


# A virtio-fs share (kvmpy.devices.virtio.fuse_server) opens, creates, renames and
# removes files under its directory for the guest while the VM runs: a VM with a
# [[share]] gets the file system calls back. The server confines itself (one name
# component at a time under O_PATH descriptors, openat2 RESOLVE_BENEATH); the
# filter cannot check paths, so for such a VM it keeps only the rest of its
# guarantees (no exec, no fork, no ptrace, no mount).
FILE_SHARE_CALLS = ("openat", "openat2", "newfstatat", "readlinkat", "faccessat", "faccessat2", "fstatfs",
                    "getdents64", "mkdirat", "fchownat", "unlinkat", "renameat", "renameat2", "linkat",
                    "symlinkat", "fchmodat", "utimensat", "syncfs",
                    "geteuid", "getegid")     # whose files the guest's root owns (after --runas too)


def policy(pid: int, user_network: bool = False, file_share: bool = False) -> dict[str, Rule]:
    """The allow-list for the VM process ``pid``. Order matters only for speed: the
    hot calls (ioctl for KVM_RUN, futex, reads and writes, the loop's wait) come
    first; kernels from 5.11 skip the filter for calls allowed whatever their
    arguments."""
    p: dict[str, Rule] = {
        # KVM (KVM_RUN, registers, interrupts, GSI routes, irqfds and ioeventfds a
        # guest's virtio driver sets up), the terminal and the tap: by request.
        "ioctl": _ioctl_rule(),
        "futex": ALLOW,
        # data: consoles, taps, sockets, eventfds, disk images
        "read": ALLOW, "write": ALLOW, "readv": ALLOW, "writev": ALLOW,
        "pread64": ALLOW, "pwrite64": ALLOW, "preadv": ALLOW, "pwritev": ALLOW,
        "preadv2": ALLOW, "pwritev2": ALLOW, "lseek": ALLOW,
        # flush is durable (fsync/fdatasync); discard and write-zeroes (fallocate);
        # qcow2 growth and raw resize (ftruncate)
        "fsync": ALLOW, "fdatasync": ALLOW, "fallocate": ALLOW, "ftruncate": ALLOW,
        # the event loop and what Python waits with (socket timeouts use poll)
        "epoll_wait": ALLOW, "epoll_pwait": ALLOW, "epoll_ctl": ALLOW, "epoll_create1": ALLOW,
        "poll": ALLOW, "ppoll": ALLOW,
        "eventfd2": ALLOW, "timerfd_create": ALLOW, "timerfd_settime": ALLOW,
        "timerfd_gettime": ALLOW, "pipe2": ALLOW,
        # monitors and the unix console accept clients on sockets made before start
        "accept4": ALLOW, "recvfrom": ALLOW, "sendto": ALLOW, "shutdown": ALLOW,
        "getsockopt": ALLOW, "setsockopt": ALLOW, "getsockname": ALLOW,
        # descriptors
        "close": ALLOW, "fcntl": ALLOW, "dup": ALLOW, "dup2": ALLOW, "dup3": ALLOW,
        "fstat": ALLOW,
        # glibc's fstat(fd) is newfstatat(fd, "", AT_EMPTY_PATH); a path lookup is not
        "newfstatat": Rule(when=((Arg(3, AT_EMPTY_PATH, AT_EMPTY_PATH),),), errno=errno.EACCES),
        # memory: Python's allocator, glibc's malloc and thread stacks, the translator
        "mmap": ALLOW, "munmap": ALLOW, "mprotect": ALLOW, "mremap": ALLOW,
        "madvise": ALLOW, "brk": ALLOW,
        # threads (vCPUs, workers) but no processes; clone3's flags are in memory
        # BPF cannot read: ENOSYS sends glibc to clone
        "clone": Rule(when=((Arg(0, CLONE_THREAD, CLONE_THREAD),),)),
        "clone3": _refuse(errno.ENOSYS),
        "set_robust_list": ALLOW, "rseq": ALLOW, "sched_yield": ALLOW,
        # threads name themselves as they start (ps, gdb; kvmpy.threadname, the data planes)
        "prctl": Rule(when=((Arg(0, PR_SET_NAME),),)),
        "exit": ALLOW, "exit_group": ALLOW, "getpid": ALLOW, "gettid": ALLOW,
        # virtio-rng's os.urandom; importlib asks for the working directory
        "getrandom": ALLOW, "getcwd": ALLOW,
        # signals: handlers, masks, the vCPU kick (SIGUSR1) and re-raising a fatal
        # signal, to ourselves only
        "rt_sigaction": ALLOW, "rt_sigprocmask": ALLOW, "rt_sigreturn": ALLOW,
        "sigaltstack": ALLOW, "restart_syscall": ALLOW,
        "tgkill": _own_process(pid), "kill": _own_process(pid),
        # time
        "clock_gettime": ALLOW, "clock_getres": ALLOW, "gettimeofday": ALLOW, "time": ALLOW,
        "nanosleep": ALLOW, "clock_nanosleep": ALLOW,
        # the --runas/sandbox cleanup helper is reaped on the way out; daemonize's
        # chdir("/") goes through a directory opened before the filter
        "wait4": ALLOW, "fchdir": ALLOW,
        # Refused, not fatal: files are opened before the filter, and what asks
        # later copes with a refusal (a traceback's source lines, glibc's malloc
        # probing /proc/sys/vm/overcommit_memory, a lazy import fails as an
        # ImportError in its handler instead of ending the VM).
        # The virtio-blk data plane's rings are made and restricted (reads, writes,
        # fsync, fallocate) before the filter; a new ring, or lifting a ring's
        # restrictions, would let its operations (an open, a connect) bypass the
        # filter, so only submitting to the existing ones stays. Refused, the data
        # plane uses its worker threads.
        "io_uring_enter": ALLOW,
        "io_uring_setup": _refuse(errno.EPERM), "io_uring_register": _refuse(errno.EPERM),
        "openat": _refuse(errno.EACCES), "open": _refuse(errno.EACCES),
        "openat2": _refuse(errno.ENOSYS),
        "stat": _refuse(errno.EACCES), "lstat": _refuse(errno.EACCES),
        "statx": _refuse(errno.ENOSYS), "access": _refuse(errno.EACCES),
        "faccessat": _refuse(errno.EACCES), "faccessat2": _refuse(errno.EACCES),
        "readlink": _refuse(errno.EACCES), "readlinkat": _refuse(errno.EACCES),
    }
    if user_network:
        p.update((name, ALLOW) for name in USER_NETWORK_CALLS)
    if file_share:
        p.update((name, ALLOW) for name in FILE_SHARE_CALLS)
    return p


# --------------------------------------------------------------------- assembler

def _insn(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> tuple[int, int, int, int]:
    return (code, jt, jf, k & 0xFFFFFFFF)


def _rule_block(rule: Rule, default: int) -> list[tuple[int, int, int, int]]:
    """The instructions for one call once its number matched: each ends in a return,
    so no block falls into the next."""
    if rule.allow:
        return [_insn(_BPF_RET_K, SECCOMP_RET_ALLOW)]
    refuse = SECCOMP_RET_ERRNO | rule.errno if rule.errno is not None else default
    if not rule.when:
        return [_insn(_BPF_RET_K, refuse)]
    block: list[tuple[int, int, int, int]] = []
    for alternative in rule.when:
        # Each check: load, (mask), jump to the next alternative when unequal.
        size = sum(3 if a.mask != 0xFFFFFFFF else 2 for a in alternative) + 1
        pos = 0
        for a in alternative:
            block.append(_insn(_BPF_LD_W_ABS, _OFF_ARGS + 8 * a.index))
            pos += 1
            if a.mask != 0xFFFFFFFF:
                block.append(_insn(_BPF_ALU_AND_K, a.mask))
                pos += 1
            pos += 1
            # jf skips the rest of this alternative (its checks and the return)
            block.append(_insn(_BPF_JEQ_K, a.value, 0, size - pos))
        block.append(_insn(_BPF_RET_K, SECCOMP_RET_ALLOW))
    block.append(_insn(_BPF_RET_K, refuse))
    return block


def assemble(rules: dict[str, Rule], default: int) -> list[tuple[int, int, int, int]]:
    """The whole program: architecture, x32, the rules in order, then ``default``."""
    prog = [
        _insn(_BPF_LD_W_ABS, _OFF_ARCH),
        _insn(_BPF_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        _insn(_BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
        _insn(_BPF_LD_W_ABS, _OFF_NR),
        _insn(_BPF_JGE_K, X32_SYSCALL_BIT, 0, 1),
        _insn(_BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
    ]
    for name, rule in rules.items():
        block = _rule_block(rule, default)
        if len(block) > 255:
            raise ValueError(f"sandbox: the rule for {name} is too long for a BPF jump")
        # A block's argument checks overwrite A, but every block ends in a return:
        # the next test is reached only by jumping over the block, with A still
        # holding the number.
        prog.append(_insn(_BPF_JEQ_K, SYSCALLS[name], 0, len(block)))
        prog.extend(block)
    prog.append(_insn(_BPF_RET_K, default))
    if len(prog) > BPF_MAXINSNS:
        raise ValueError(f"sandbox: {len(prog)} BPF instructions, the kernel takes {BPF_MAXINSNS}")
    return prog


# ------------------------------------------------------------------ the kernel

class SandboxUnavailable(HostError):
    """The host cannot sandbox this process (no seccomp filters, or an outer
    sandbox forbids installing one): exit status 1, a host fault."""


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
        _libc.prctl.restype = ctypes.c_int
    return _libc


def _seccomp(op: int, flags: int, arg) -> int:
    libc = _c()
    rc = libc.syscall(ctypes.c_long(SYSCALLS["seccomp"]), ctypes.c_uint(op), ctypes.c_uint(flags), arg)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def _prctl(option: int, arg2: int = 0) -> int:
    libc = _c()
    rc = libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0),
                    ctypes.c_ulong(0))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def unavailable_reason() -> str | None:
    """Why this process cannot be sandboxed, or None when it can (as far as can be
    told without installing: an outer filter may still refuse the install)."""
    machine = os.uname().machine
    if machine != "x86_64":
        return f"the filter is written for x86-64 system calls, this host is {machine}"
    try:
        _prctl(PR_GET_SECCOMP)
    except OSError as e:
        return f"the kernel has no seccomp (prctl PR_GET_SECCOMP: {e.strerror})"
    action = ctypes.c_uint32(SECCOMP_RET_KILL_PROCESS)
    try:
        _seccomp(SECCOMP_GET_ACTION_AVAIL, 0, ctypes.byref(action))
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            return "the kernel cannot kill a whole process from a seccomp filter (before Linux 4.14)"
        if e.errno == errno.EINVAL:
            return "the kernel has no seccomp filters (CONFIG_SECCOMP_FILTER)"
        return f"seccomp() is refused here ({e.strerror}; inside another sandbox?)"
    return None


def audit_mode() -> bool:
    return os.environ.get(AUDIT_ENV, "") not in ("", "0")


def _preload_unwinder() -> None:
    """glibc opens libgcc_s the first time a thread exits through pthread_exit or is
    cancelled (its unwinder); under the filter that open fails and glibc aborts the
    process ("libgcc_s.so.1 must be installed for pthread_exit to work"), as a
    native thread ending at VM exit did. Loaded now, the later dlopen finds it."""
    try:
        ctypes.CDLL("libgcc_s.so.1", mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    except OSError as e:     # a static or musl build: nothing to load, nothing to abort
        log.debug("sandbox: libgcc_s not preloaded: %s", e)


def install(audit: bool | None = None, user_network: bool = False, file_share: bool = False) -> int:
    """Set NO_NEW_PRIVS and install the filter on every thread of this process
    (threads started later inherit it). Returns the program's length.
    ``audit`` (default: $KVMPY_SANDBOX_AUDIT): log calls outside the list instead
    of killing the process. ``user_network``: the VM has a user-mode NIC (see
    USER_NETWORK_CALLS). ``file_share``: the VM has a virtio-fs share (FILE_SHARE_CALLS).
    SandboxUnavailable when the kernel refuses."""
    if audit is None:
        audit = audit_mode()
    reason = unavailable_reason()
    if reason is not None:
        raise SandboxUnavailable(reason)
    _preload_unwinder()
    default = SECCOMP_RET_LOG if audit else SECCOMP_RET_KILL_PROCESS
    prog = assemble(policy(os.getpid(), user_network, file_share), default)
    filters = (_SockFilter * len(prog))(*[_SockFilter(code, jt, jf, k) for code, jt, jf, k in prog])
    fprog = _SockFprog(len(prog), ctypes.cast(filters, ctypes.POINTER(_SockFilter)))
    try:
        # Without it an unprivileged process may not install a filter, and with it
        # no exec could ever gain privileges (set-uid binaries, file capabilities).
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        flags = SECCOMP_FILTER_FLAG_TSYNC | (SECCOMP_FILTER_FLAG_LOG if audit else 0)
        rc = _seccomp(SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(fprog))
    except OSError as e:
        raise SandboxUnavailable(f"the kernel refused the seccomp filter ({e.strerror})") from None
    if rc > 0:
        # TSYNC names a thread that could not take the filter: the others have it.
        raise SandboxUnavailable(f"thread {rc} could not take the seccomp filter")
    log.debug("sandbox: %d BPF instructions installed%s", len(prog),
              " (audit mode: calls outside the list are logged, not fatal)" if audit else "")
    return len(prog)


def status(pid: int | str = "self") -> dict[str, str]:
    """``Seccomp``, ``Seccomp_filters`` and ``NoNewPrivs`` from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Seccomp", "Seccomp_filters", "NoNewPrivs"):
                out[key] = value.strip()
    return out
