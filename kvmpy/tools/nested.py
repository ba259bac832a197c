"""`kvmpy selftest nested`: run a command where real KVM can run Linux, on any host.

Some hosts' /dev/kvm cannot boot an unmodified Linux kernel (the software-nested
kvm_pvm backend), yet real KVM is one level down: QEMU's TCG with ``-cpu max``
emulates AMD SVM with nested paging, and Debian's standard kernel loads kvm-amd in
it. This module boots that kernel (the "L1") under QEMU with a busybox initramfs
written here, shares the host's root file system into it read-only over 9p, and
runs one command in a chroot of it, so the host's Python and this checkout run
unchanged against a real /dev/kvm.

What the command sees inside the L1:

* the host's root, read-only; /proc, /sys, /dev (with /dev/kvm, /dev/net/tun) of the L1;
* /tmp: a writable ext4 scratch disk (a sparse file on the host, virtio-blk), so
  guest images live on a real block device (QEMU's cache=none needs O_DIRECT);
* $KVMPY_NESTED_SHARE (/tmp/kvmpy-share): a host directory, read-write, for
  inputs prepared on the host and results read back after the L1 ended;
* KVMPY_NESTED_L1=1, HOME=/tmp, PYTHONDONTWRITEBYTECODE=1, pytest's cache plugin
  off and Hypothesis' database under /tmp: nothing tries to write the read-only tree.

The command's exit status comes back through a file in the share (the console's
marker line is the fallback). The kernel package is fetched with `apt-get
download`, cached under the same cache root as `kvmpy guest build`, and the
initramfs is rebuilt only when the kernel, busybox or this recipe change.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import dataclasses
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import kvmpy

from . import guestbuild
from ..errors import UserError
from ..threadname import NamedThread

# Bump when the initramfs or /init changes in a way the source hash would miss.
RECIPE_VERSION = 2
# The standard kernel, not the cloud one: the cloud kernel has no 9p.
KERNEL_META_PACKAGE = "linux-image-amd64"
QEMU = "qemu-system-x86_64"
DEFAULT_TIMEOUT = 900.0
DEFAULT_MEMORY = "2G"
DEFAULT_SCRATCH_SIZE = "4G"
# One vCPU: with two, QEMU's vCPU threads and its main loop (the 9p server every file
# access waits on) compete for a 2-core host; the inner suite took 127 s with -smp 1
# and 259 s with -smp 2 (both on a loaded host; guests' own --smp 2/4 still work).
DEFAULT_SMP = 1
SHARE_TAG = "kvmpyshare"
ROOT_TAG = "hostroot"
SHARE_IN_L1 = "/tmp/kvmpy-share"
# In the share: the host paths under /tmp (relative to it) that the L1 shows over its
# scratch disk, e.g. a checkout CI cloned under /tmp.
HOST_TMP_PATHS = "host-tmp-paths"
L1_CMDLINE = "console=ttyS0 panic=-1 quiet mitigations=off tsc=reliable"
# The directory holding the kvmpy package: the command in the L1 imports this very tree.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(kvmpy.__file__)))

# What the L1 needs: virtio-pci, 9p for the host's root and the share, virtio-blk and
# ext4 for the scratch disk, KVM on SVM, and tap + bridge for guests' networks.
# Dependencies (ccp for kvm-amd, netfs/fscache for 9p, ...) come from modinfo.
REQUIRED_MODULES = ("virtio_pci", "virtio_blk", "9pnet_virtio", "9p", "ext4", "kvm_amd", "tun", "bridge")
OPTIONAL_MODULES = ("virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_ring", "virtio",
                    "crc32c_generic", "libcrc32c", "virtio_rng",
                    "nbd",          # kvmpy nbd -c /dev/nbd0 (tests/nested/test_l1_nbd.py)
                    # /dev/vhost-net for vhost=on (tests/nested/test_l1_vhost_net.py); modinfo
                    # brings vhost, vhost_iotlb and tap with it
                    "vhost_net")

MARK = "kvmpy-nested:"
BEGIN_MARK = f"{MARK} run begin"
EXIT_RE = re.compile(rf"^{MARK} run exit (\d+)\s*$", re.M)
FAIL_RE = re.compile(rf"^{MARK} failed: (.*)$", re.M)


class NestedUnavailable(UserError):
    """A tool or package the L1 needs is missing here; the message says how to get it."""


class NestedError(Exception):
    """The L1 did not boot, did not run the command, or ran out of time."""

    exit_status = 1

    def __init__(self, message: str, console: str = ""):
        super().__init__(message)
        self.console = console


class NestedTimeout(NestedError):
    exit_status = 124


class NestedStalled(NestedTimeout):
    """The L1 printed nothing for the idle limit. QEMU 7.2's TCG has been seen to park
    its vCPU threads for good in the middle of an L2 boot (0% CPU, no progress), and
    during bench.kvm's exit loops: in the L1 the LAPIC timer stops (QEMU's next timer
    deadline 21 hours away, no interrupt arrives), with the vCPU parked in HLT or, under
    idle=poll, spinning without progress. A caller may boot a new L1 and go on; the
    report carries QEMU's view of the vCPU (l1_cpu_state)."""


# ------------------------------------------------------------------ the L1 build

INIT_SCRIPT = r"""#!/bin/sh
# The kvmpy nested-KVM L1: made by kvmpy/tools/nested.py. Mounts the host's root (9p,
# read-only), the scratch disk on its /tmp and the share, then runs the share's
# run.sh in a chroot of it and powers off.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/null >/dev/console 2>&1
echo "@MARK@ init $(uname -r)"

fail() {
  echo "@MARK@ failed: $*"
  poweroff -f
}

kver=$(uname -r)
while read -r m; do
  [ -n "$m" ] || continue
  insmod "/lib/modules/$kver/$m" || echo "@MARK@ insmod $m failed"
done < /etc/kvmpy/modules
[ -e /dev/kvm ] || fail "no /dev/kvm after loading kvm-amd: $(dmesg | grep -i -E 'svm|kvm' | tail -n 3)"

h=/host
mkdir -p $h
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose @ROOT_TAG@ $h || fail "cannot mount the host root (9p)"
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
# The scratch disk hides the host's /tmp; keep a view of it for the paths the
# command needs from there (a checkout or venv under /tmp), listed in the share.
mkdir -p /hosttmp
mount -o bind $h/tmp /hosttmp || fail "cannot keep a view of the host's /tmp"
mount -t ext4 /dev/vda $h/tmp || fail "cannot mount the scratch disk on /tmp"
chmod 1777 $h/tmp
mkdir -p $h@SHARE@
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 @SHARE_TAG@ $h@SHARE@ || fail "cannot mount the share"
while read -r p; do
  [ -n "$p" ] || continue
  mkdir -p "$h/tmp/$p" && mount -o bind "/hosttmp/$p" "$h/tmp/$p" || fail "cannot show the host's /tmp/$p"
done < $h@SHARE@/@HOST_TMP_PATHS@
mount -o bind /proc $h/proc
mount -o bind /sys $h/sys
mount -o bind /dev $h/dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts $h/dev/pts
mount -t tmpfs tmpfs $h/dev/shm
mount -t tmpfs tmpfs $h/run
ip link set lo up
hostname kvmpy-l1
echo "@MARK@ ready"
echo "@BEGIN@"
chroot $h /bin/sh @SHARE@/run.sh
status=$?
echo $status > $h@SHARE@/status
sync
echo "@MARK@ run exit $status"
umount $h@SHARE@ $h/tmp 2>/dev/null
poweroff -f
"""


def render_init() -> str:
    return (INIT_SCRIPT.replace("@MARK@", MARK).replace("@BEGIN@", BEGIN_MARK).replace("@ROOT_TAG@", ROOT_TAG)
            .replace("@SHARE_TAG@", SHARE_TAG).replace("@SHARE@", SHARE_IN_L1).replace("@HOST_TMP_PATHS@", HOST_TMP_PATHS))


@dataclasses.dataclass
class L1Image:
    kernel: str
    initrd: str
    release: str
    package: str
    version: str
    cached: bool


def cache_root() -> str:
    return os.path.join(os.path.dirname(guestbuild.cache_root()), "nested")


def recipe_hash() -> str:
    return guestbuild.recipe_hash(__file__, RECIPE_VERSION)


def missing_tools() -> str | None:
    """One line naming the first missing host tool and how to get it, or None."""
    if not shutil.which(QEMU):
        return f"{QEMU} is missing (apt-get install qemu-system-x86)"
    tool = guestbuild.missing_debian_tool()
    if tool:
        return (f"{tool} is missing: the L1 kernel ({KERNEL_META_PACKAGE}) comes from Debian's archive, "
                "so this needs a Debian host")
    if not guestbuild.find_mke2fs():
        return "mke2fs is missing (apt-get install e2fsprogs)"
    return None


def build_l1_initramfs(kernel: guestbuild.Kernel, busybox: str, out_path: str) -> dict:
    """The L1's gzip'd newc initramfs: busybox, the modules in load order, /init."""
    tree = guestbuild.ModuleTree(kernel.modules)
    deps = tree.deps_for(REQUIRED_MODULES + OPTIONAL_MODULES)
    order = guestbuild.resolve_modules(deps, REQUIRED_MODULES, tree.builtin, OPTIONAL_MODULES)
    plain = [os.path.basename(p).rsplit(".ko", 1)[0] + ".ko" for p in order]

    buf = io.BytesIO()
    cpio = guestbuild.CpioWriter(buf)
    modules_dir = f"lib/modules/{kernel.release}"
    dirs = ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "etc", "etc/kvmpy",
            "lib", "lib/modules", modules_dir, "host"]
    for d in dirs:
        cpio.add_dir(d, 0o1777 if d == "tmp" else 0o755)
    guestbuild.add_busybox_system(cpio, busybox, set(dirs))
    # Flat: module file names are unique across this set, and insmod takes a path.
    if len(set(plain)) != len(plain):
        raise guestbuild.GuestBuildError(f"L1 modules: two modules share a file name in {plain}")
    for src, dst in zip(order, plain):
        cpio.add_file(f"{modules_dir}/{dst}", guestbuild.read_module(os.path.join(kernel.modules, src)))
    cpio.add_file("etc/kvmpy/modules", "".join(p + "\n" for p in plain).encode())
    cpio.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.add_file("init", render_init().encode(), 0o755)
    cpio.close()
    guestbuild.write_gzip(buf.getbuffer(), out_path)
    return {"modules": plain, "cpio_bytes": buf.tell()}


def build_l1() -> L1Image:
    """The L1 kernel and initramfs, from the cache when the inputs did not change."""
    reason = missing_tools()
    if reason:
        raise NestedUnavailable(reason)
    cache = guestbuild.BuildCache(cache_root())
    with cache.locked():
        apt = guestbuild.Apt()
        try:
            busybox, bb_version = guestbuild.busybox_info(apt)
            package, version = apt.kernel_package(KERNEL_META_PACKAGE)
            version = version or apt.candidate(package)
        except guestbuild.GuestBuildError as e:
            raise NestedUnavailable(f"L1 kernel/busybox: {e}") from None
        inputs = {"kernel_package": package, "kernel_version": version,
                  "busybox_sha256": guestbuild.file_sha256(busybox), "recipe": recipe_hash()}
        build_dir = cache.build_dir(inputs)
        cached = cache.has(build_dir)
        if not cached:
            try:
                deb, version = guestbuild.fetch_kernel(apt, package, version, cache.debs)
            except guestbuild.GuestBuildError as e:
                raise NestedUnavailable(f"the L1 kernel package: {e}") from None
            inputs["kernel_version"] = version
            build_dir = cache.make(inputs, deb, package, version,
                                   lambda kernel, path: build_l1_initramfs(kernel, busybox, path))
        manifest = cache.manifest(build_dir)
    return L1Image(os.path.join(build_dir, "vmlinuz"), os.path.join(build_dir, "initrd.img"),
                   manifest["release"], package, manifest["kernel_version"], cached)


# --------------------------------------------------------------------- the run

@dataclasses.dataclass
class NestedResult:
    status: int
    output: str           # what the command printed (console text between the markers)
    console: str          # the whole L1 console
    seconds: float        # QEMU start to QEMU exit
    ready_seconds: float  # QEMU start to the chroot being ready (the L1's boot time)
    share_dir: str
    kicks: int = 0        # bytes sent to a silent L1's serial port (kick_l1)


def _python_env(cwd: str) -> dict[str, str]:
    """The command's environment in the chroot: only what is known to work there."""
    bindir = os.path.dirname(sys.executable)
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env = {
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        # Not C.UTF-8: gettext (argparse's messages) would look for a catalogue of that
        # name on every call, each a 9p round trip (about 1 s per kvmpy start in the L1).
        # Python still runs in UTF-8 mode in the C locale (PEP 538/540).
        "LANG": "C",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        # The tree is read-only: no .pytest_cache, and Hypothesis' examples go to /tmp.
        "PYTEST_ADDOPTS": "-p no:cacheprovider",
        "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/.hypothesis",
        "KVMPY_NESTED_L1": "1",
        "KVMPY_NESTED_SHARE": SHARE_IN_L1,
    }
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    # `python3` in the command is the caller's interpreter (a venv's, pyenv's, ...):
    # its directory comes first, without the caller's PATH (shims need the real HOME).
    env["PATH"] = f"{bindir}:{path}" if bindir not in path.split(":") else path
    env["PYTHONPATH"] = PACKAGE_PARENT
    for name in ("CI", "TERM", "KVMPY_FUZZ"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def host_tmp_paths(cwd: str, share: str) -> list[str]:
    """What the command needs from under the host's /tmp (its directory, this
    package, the interpreter's prefixes), relative to /tmp, outermost only. The
    share is mounted on its own; a path inside it is not repeated."""
    wanted = {cwd, PACKAGE_PARENT,
              sys.prefix, sys.base_prefix, os.path.dirname(sys.executable)}
    under = sorted(os.path.relpath(os.path.realpath(p), "/tmp") for p in wanted
                   if os.path.realpath(p).startswith("/tmp/"))
    share_rel = os.path.relpath(os.path.realpath(share), "/tmp")
    kept: list[str] = []
    for rel in under:
        if any(rel == k or rel.startswith(k + "/") for k in kept) or rel == share_rel or \
                rel.startswith(share_rel + "/"):
            continue
        kept.append(rel)
    return kept


def _run_script(cmd: list[str], cwd: str, env: dict[str, str]) -> str:
    lines = ["#!/bin/sh", "# written by kvmpy/tools/nested.py; runs in the L1's chroot of the host root"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines.append(f"cd {shlex.quote(cwd)} || exit 125")
    lines.append(f"exec {shlex.join(cmd)} </dev/null")
    return "\n".join(lines) + "\n"


def qemu_argv(l1: L1Image, scratch: str, share: str, memory: str, smp: int, monitor: str | None = None) -> list[str]:
    return [QEMU, "-accel", "tcg", "-cpu", "max", "-m", memory, "-smp", str(smp),
            *(["-monitor", f"unix:{monitor},server=on,wait=off"] if monitor else []),
            "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", l1.kernel, "-initrd", l1.initrd, "-append", L1_CMDLINE,
            "-drive", f"file={scratch},format=raw,if=none,id=scratch,cache=unsafe,discard=unmap",
            "-device", "virtio-blk-pci,drive=scratch",
            "-virtfs", f"local,path=/,mount_tag={ROOT_TAG},security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={share},mount_tag={SHARE_TAG},security_model=none,multidevs=remap",
            "-device", "virtio-rng-pci"]


def _make_scratch(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    # lazy_itable_init: mke2fs writes only what it must, the file stays sparse.
    p = subprocess.run([guestbuild.find_mke2fs(), "-q", "-F", "-t", "ext4", "-L", "kvmpy-scratch",
                        "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", path],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise NestedError(f"mke2fs on the scratch disk {path} failed: {p.stderr.strip()}")


def refresh_bytecode(package_dir: str = os.path.join(PACKAGE_PARENT, "kvmpy"),
                     dataclass_cache: str | None = None) -> None:
    """Bring the checkout's bytecode up to date, as the in-place build does (setup.py).
    The L1 sees the tree read-only and writes no bytecode, so a module edited since
    the last build would be compiled again by every Python started there, and a
    dataclass edited since then would compile its methods (kvmpy/_codecache.py):
    runcmd.py alone takes 11 ms to compile on the host, and Python runs 20 to 50
    times slower in the L1, in each `kvmpy run` a test or a bench row times. A tree we may
    not write (an installed kvmpy, whose bytecode came with it) is left as it is."""
    from .. import _codecache
    if dataclass_cache is None:
        dataclass_cache = _codecache.CACHE_FILE
    if not os.access(package_dir, os.W_OK):
        return
    compileall.compile_dir(package_dir, quiet=2)
    if os.path.exists(dataclass_cache):
        # in a fresh interpreter, as setup.py records it: a class made before build() is missed
        subprocess.run([sys.executable, "-c", "import sys, kvmpy._codecache as c; c.build(sys.argv[1], sys.argv[2])",
                        package_dir, dataclass_cache],
                       cwd=os.path.dirname(package_dir), check=False, capture_output=True,
                       env=dict(os.environ, PYTHONPATH=os.path.dirname(package_dir)))


def run_nested(cmd: list[str], *, cwd: str | None = None, timeout: float = DEFAULT_TIMEOUT,
               memory: str = DEFAULT_MEMORY, scratch_size: str = DEFAULT_SCRATCH_SIZE, smp: int = DEFAULT_SMP,
               share_dir: str | None = None, env: dict[str, str] | None = None, echo=None,
               idle_timeout: float | None = None) -> NestedResult:
    """Boots the L1, runs ``cmd`` in its chroot of the host root (in ``cwd``, default
    the caller's), powers off. ``share_dir`` (a host directory, made temporary if None)
    is the command's $KVMPY_NESTED_SHARE. ``echo`` gets console text as it arrives.
    Raises NestedUnavailable when a tool is missing, NestedTimeout after ``timeout``
    seconds, NestedStalled after ``idle_timeout`` seconds without console output
    (QEMU killed in both cases), NestedError when the L1 did not run the command."""
    from ..config import parse_size
    if not cmd:
        raise UserError("selftest nested: no command given (put it after --)")
    cwd = os.path.abspath(cwd or os.getcwd())
    if cwd == "/tmp":
        raise UserError("selftest nested: the working directory is /tmp itself, which the L1 replaces "
                        "with its scratch disk; run from elsewhere")
    scratch_bytes = parse_size(scratch_size, "--scratch-size", "M")
    memory_mib = parse_size(memory, "--mem", "M") >> 20
    if memory_mib < 512:
        raise UserError(f"--mem: {memory} is too small for the L1 and its guests (at least 512M)")
    l1 = build_l1()
    refresh_bytecode()
    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="kvmpy-nested-"))
        share = share_dir or os.path.join(work, "share")
        os.makedirs(share, exist_ok=True)
        status_file = os.path.join(share, "status")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(status_file)
        script_env = _python_env(cwd)
        script_env.update(env or {})
        with open(os.path.join(share, "run.sh"), "w") as f:
            f.write(_run_script(cmd, cwd, script_env))
        with open(os.path.join(share, HOST_TMP_PATHS), "w") as f:
            f.write("".join(p + "\n" for p in host_tmp_paths(cwd, share)))
        scratch = os.path.join(work, "scratch.img")
        _make_scratch(scratch, scratch_bytes)
        monitor = os.path.join(work, "monitor.sock")
        argv = qemu_argv(l1, scratch, share, f"{memory_mib}M", smp, monitor)
        # stdin: the L1's serial input, for the kicks below
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
        chunks: list[bytes] = []
        ready_at: list[float] = []
        last_output = [time.monotonic()]
        last_kick = [0.0]
        kicks = [0]

        def pump() -> None:
            seen = b""
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    return
                chunks.append(chunk)
                if chunk.strip():       # not the L1's tty echoing a kick (kick_l1)
                    last_output[0] = time.monotonic()
                if not ready_at:
                    seen = (seen + chunk)[-4096:]
                    if BEGIN_MARK.encode() in seen:
                        ready_at.append(time.monotonic() - start)
                if echo:
                    echo(chunk.decode(errors="replace").replace("\r\n", "\n"))

        reader = NamedThread(target=pump, name="nested-console", daemon=True)
        reader.start()
        try:
            while True:
                try:
                    proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    now = time.monotonic()
                    if now - start >= timeout:
                        kind, why = NestedTimeout, f"timed out after {timeout:.0f} s"
                    elif idle_timeout and now - last_output[0] >= idle_timeout:
                        kind, why = NestedStalled, f"no console output for {idle_timeout:.0f} s"
                    else:
                        if now - max(last_output[0], last_kick[0]) >= KICK_AFTER:
                            last_kick[0] = now
                            kicks[0] += kick_l1(proc)
                        continue
                # where the L1's vCPU is, for the report: a stalled L1 cannot tell it
                state = l1_cpu_state(monitor)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                reader.join(5)
                console = _text(chunks)
                where = _where(console)
                if state:
                    state = f"\n--- the L1's CPU when it was killed ---\n{state}\n"
                    console += state
                    if echo:
                        echo(state)
                raise kind(f"selftest nested: {why}; QEMU killed ({where})", console)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reader.join(10)
        seconds = time.monotonic() - start
        console = _text(chunks)
        status = None
        with contextlib.suppress(FileNotFoundError, ValueError):
            with open(status_file) as f:
                status = int(f.read().strip())
        m = EXIT_RE.search(console)
        if status is None and m:
            status = int(m.group(1))
        if status is None:
            failed = FAIL_RE.search(console)
            why = failed.group(1) if failed else f"QEMU exited {proc.returncode}; {_where(console)}"
            raise NestedError(f"selftest nested: the L1 did not run the command: {why}", console)
        begin = console.find(BEGIN_MARK)
        output = console[begin + len(BEGIN_MARK) + 1:m.start() if m else len(console)] if begin >= 0 else ""
        return NestedResult(status, output, console, seconds, ready_at[0] if ready_at else seconds, share,
                            kicks[0])


# QEMU 7.2's TCG (-cpu max, SVM) loses the L1's LAPIC timer interrupt now and then
# while L2s make exits: caught with the vCPU halted, IF=1, vector 236 (the LAPIC
# timer) in the IRR with PPR 0x10, no timer armed, the console silent for good. Any
# other interrupt makes QEMU look at the APIC again and deliver it, so a console
# silent this long gets a byte on the L1's serial port (its RX interrupt); nothing
# in the L1 reads it.
KICK_AFTER = 20.0


def kick_l1(proc: subprocess.Popen) -> bool:
    """One byte to the L1's serial port: its RX interrupt wakes an L1 whose timer
    interrupt QEMU lost (KICK_AFTER). Whether it was sent."""
    try:
        proc.stdin.write(b"\n")
        proc.stdin.flush()
    except (OSError, ValueError):
        return False
    return True


L1_STATE_COMMANDS = ("info registers", "info lapic", "info pic")


def l1_cpu_state(monitor: str, timeout: float = 5.0) -> str:
    """The L1's vCPU registers and interrupt controllers from QEMU's human monitor
    (empty if it does not answer): whether a silent L1 is halted, spinning with
    interrupts off, inside an L2 (SVM guest mode), or has an interrupt waiting."""
    import socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(monitor)
            s.sendall("".join(c + "\n" for c in L1_STATE_COMMANDS).encode())
            received = b""
            deadline = time.monotonic() + timeout
            # HMP answers each command, then prompts again: one prompt per command after the banner's
            while received.count(b"(qemu)") <= len(L1_STATE_COMMANDS) and time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                received += chunk
    except OSError:
        return ""
    text = received.decode(errors="replace")
    # the monitor's line editor repaints each typed command with escape sequences: only the answers
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]|\r", "", text)
    return "\n".join(line for line in text.splitlines()
                     if not line.startswith(("(qemu)", "QEMU "))).strip()


def _die_with_parent() -> None:
    """In the QEMU child: a killed harness (CI's timeout, ^C) must not leave the L1 running."""
    import ctypes
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def _text(chunks: list[bytes]) -> str:
    return b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def _where(console: str) -> str:
    tail = [line for line in console.strip().splitlines() if line.strip()][-3:]
    return "last console lines: " + " | ".join(tail) if tail else "no console output"


# ---------------------------------------------------------------------- the CLI

class CommandOutput:
    """-q: the command's own output from the L1 console, written as it arrives (a long
    command shows its progress, a stuck one shows where it stopped), without the L1's
    boot messages before the begin mark or the harness's lines after it."""

    def __init__(self, out):
        self.out = out
        self.begun = False
        self._pending = ""

    def feed(self, text: str) -> None:
        self._pending += text
        if not self.begun:
            at = self._pending.find(BEGIN_MARK + "\n")
            if at < 0:
                self._pending = self._pending[-len(BEGIN_MARK) - 1:]
                return
            self.begun = True
            self._pending = self._pending[at + len(BEGIN_MARK) + 1:]
        # whole lines only: the last one may be the start of the harness's exit line
        complete, newline, self._pending = self._pending.rpartition("\n")
        if newline:
            self._write(complete + newline)

    def close(self) -> None:
        if self.begun and self._pending:
            self._write(self._pending)
        self._pending = ""

    def _write(self, text: str) -> None:
        kept = "".join(line for line in text.splitlines(keepends=True) if not line.startswith(MARK))
        if kept:
            self.out.write(kept)
            self.out.flush()


def _echo(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _cmd_nested(args) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if args.smp < 1:
        raise UserError(f"--smp: {args.smp} must be at least 1")
    if args.timeout <= 0:
        raise UserError(f"--timeout: {args.timeout} must be positive")
    if args.idle_timeout is not None and args.idle_timeout <= 0:
        raise UserError(f"--idle-timeout: {args.idle_timeout} must be positive")
    command_output = CommandOutput(sys.stdout)
    try:
        result = run_nested(cmd, timeout=args.timeout, memory=args.mem, scratch_size=args.scratch_size,
                            smp=args.smp, share_dir=args.share, idle_timeout=args.idle_timeout,
                            echo=command_output.feed if args.quiet else _echo)
    except NestedError as e:
        if args.quiet and e.console and not command_output.begun:
            sys.stderr.write(e.console[-3000:])
        print(f"kvmpy: {e}", file=sys.stderr)
        return e.exit_status
    if args.quiet:
        command_output.close()
    print(f"kvmpy selftest nested: L1 ready in {result.ready_seconds:.1f} s, done in {result.seconds:.1f} s, "
          f"command exit {result.status}; {result.kicks} bytes sent to its silent console", file=sys.stderr)
    return result.status


def register(subparsers) -> None:
    p = subparsers.add_parser("selftest", help="self-tests that need a special environment")
    sub = p.add_subparsers(dest="selftest_command", metavar="WHAT")
    n = sub.add_parser("nested", help="run a command in an L1 Linux with real KVM (nested SVM under QEMU's TCG)",
                       description="Boots Debian's standard kernel under qemu-system-x86_64 -accel tcg -cpu max "
                                   "(emulated AMD SVM), shares this host's root read-only into it and runs CMD "
                                   "in a chroot with the same working directory; /dev/kvm there is kvm-amd. "
                                   "/tmp is a writable ext4 scratch disk; $KVMPY_NESTED_SHARE is a host "
                                   "directory. Exit status: CMD's; 2 when a tool is missing; 124 on timeout.")
    n.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"kill QEMU after S seconds (default {DEFAULT_TIMEOUT:.0f})")
    n.add_argument("--idle-timeout", type=float, default=None, metavar="S",
                   help="kill QEMU when the L1's console stays silent S seconds (a stalled L1; default: off)")
    n.add_argument("--mem", default=DEFAULT_MEMORY, help=f"L1 RAM (default {DEFAULT_MEMORY})")
    n.add_argument("--smp", type=int, default=DEFAULT_SMP, help=f"L1 vCPUs (default {DEFAULT_SMP})")
    n.add_argument("--scratch-size", default=DEFAULT_SCRATCH_SIZE,
                   help=f"sparse ext4 scratch disk on the L1's /tmp (default {DEFAULT_SCRATCH_SIZE})")
    n.add_argument("--share", metavar="DIR", help="host directory to mount read-write at $KVMPY_NESTED_SHARE "
                                                  "(default: a temporary one)")
    n.add_argument("-q", "--quiet", action="store_true", help="print only the command's output, not the L1 console")
    n.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="the command to run")
    n.set_defaults(func=_cmd_nested)
    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 2)[1])
