"""`kvmpy guest build`: the default Linux guest, made from Debian packages only.

Kernel: the versioned package `linux-image-cloud-amd64` depends on, fetched with
`apt-get download` and unpacked with `dpkg-deb -x`. Initramfs: a newc cpio written
here (no cpio tool or root needed, so device nodes and uid 0 come for free) holding
busybox-static, the virtio/ext4 modules with their dependencies, and an /init that
can run a command from the kernel command line (`kvmpy.run="..."`) and power off,
which is what scripted tests need. Disk: `mke2fs -d`, again without root.

Everything is cached under $XDG_CACHE_HOME/kvmpy/guest and rebuilt only when the
kernel package, busybox or this recipe changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import time
from typing import Callable

from ..errors import UserError

log = logging.getLogger(__name__)

# Bump when the initramfs layout or /init changes in a way the source hash would miss.
RECIPE_VERSION = 1
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX_PATH = "/bin/busybox"
DEFAULT_DISK_SIZE = "256M"
DEFAULT_CMDLINE = "console=ttyS0 panic=-1 quiet"
DEFAULT_MEMORY = "512M"
BANNER = "kvmpy guest: init"

# What the guest needs to see a virtio disk and NIC and mount ext4. The first group
# must exist (as module or built in); the rest are loaded when the kernel has them.
REQUIRED_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "ext4")
OPTIONAL_MODULES = ("virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_ring", "virtio",
                    "net_failover", "failover", "jbd2", "mbcache", "crc16", "crc32c_generic", "libcrc32c", "virtio_rng", "virtio_console",
                    "button", "evdev",   # the ACPI power button, as an input device for acpid
                    "fuse", "virtiofs",  # [[share]]: mount -t virtiofs TAG /mnt
                    # --net user,smb=DIR: mount -t cifs //10.0.2.4/qemu /mnt; SMB3 signs and
                    # encrypts with what cifs only names as soft dependencies
                    "cifs", "cmac", "ccm", "gcm", "ctr", "ghash_generic", "sha512_generic", "ecb")

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


class GuestBuildError(UserError):
    """The guest cannot be built here: a tool, package or input is missing or wrong."""


class CpioError(UserError):
    """A cpio archive is malformed."""


# --------------------------------------------------------------------------- cpio

_NEWC_MAGIC = b"070701"
_NEWC_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
                "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check")
_NEWC_HEADER_LEN = 6 + 8 * len(_NEWC_FIELDS)
_TRAILER = "TRAILER!!!"


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


@dataclasses.dataclass
class CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    mtime: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0
    ino: int = 0


class CpioWriter:
    """Writes a newc ("070701") archive, the format the kernel unpacks as initramfs.

    Entries are owned by root and dated ``mtime`` so the archive is reproducible.
    """

    def __init__(self, fileobj, mtime: int = 0):
        self._f = fileobj
        self._mtime = mtime
        self._ino = 0
        self._names: set[str] = set()
        self._closed = False

    @staticmethod
    def _check_name(name: str) -> str:
        name = name.lstrip("/")
        parts = name.split("/")
        if not name or "\0" in name or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"cpio: bad member name {name!r}")
        return name

    def _emit(self, name: str, mode: int, data: bytes = b"", nlink: int = 1,
              rdev: tuple[int, int] = (0, 0)) -> None:
        if self._closed:
            raise ValueError("cpio: archive already closed")
        if name != _TRAILER:
            name = self._check_name(name)
            if name in self._names:
                raise ValueError(f"cpio: duplicate member {name!r}")
            self._names.add(name)
            self._ino += 1
        encoded = name.encode() + b"\0"
        values = (self._ino if name != _TRAILER else 0, mode, 0, 0, nlink,
                  self._mtime if name != _TRAILER else 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(encoded), 0)
        header = _NEWC_MAGIC + b"".join(b"%08X" % v for v in values)
        self._f.write(header + encoded + b"\0" * _pad4(len(header) + len(encoded)))
        if data:
            self._f.write(data)
            self._f.write(b"\0" * _pad4(len(data)))

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        self._emit(name, stat.S_IFDIR | (mode & 0o7777), nlink=2)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._emit(name, stat.S_IFREG | (mode & 0o7777), bytes(data))

    def add_symlink(self, name: str, target: str) -> None:
        if not target or "\0" in target:
            raise ValueError(f"cpio: bad symlink target {target!r}")
        self._emit(name, stat.S_IFLNK | 0o777, target.encode())

    def add_device(self, name: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        fmt = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}[kind]
        self._emit(name, fmt | (mode & 0o7777), rdev=(major, minor))

    def close(self) -> None:
        if not self._closed:
            self._emit(_TRAILER, 0)
            self._closed = True


def read_cpio(data: bytes) -> list[CpioEntry]:
    """Parses a newc archive up to its trailer; any inconsistency is a CpioError."""
    view = memoryview(data)
    entries = []
    pos = 0
    while True:
        if pos + _NEWC_HEADER_LEN > len(view):
            raise CpioError(f"cpio: truncated header at offset {pos}")
        header = bytes(view[pos:pos + _NEWC_HEADER_LEN])
        if header[:6] != _NEWC_MAGIC:
            raise CpioError(f"cpio: bad magic {header[:6]!r} at offset {pos}")
        try:
            fields = {k: int(header[6 + 8 * i:14 + 8 * i], 16) for i, k in enumerate(_NEWC_FIELDS)}
        except ValueError:
            raise CpioError(f"cpio: non-hex header field at offset {pos}") from None
        namesize = fields["namesize"]
        name_start = pos + _NEWC_HEADER_LEN
        if namesize == 0 or name_start + namesize > len(view):
            raise CpioError(f"cpio: bad name size {namesize} at offset {pos}")
        raw_name = bytes(view[name_start:name_start + namesize])
        if raw_name[-1:] != b"\0" or b"\0" in raw_name[:-1]:
            raise CpioError(f"cpio: name not NUL-terminated at offset {pos}")
        try:
            name = raw_name[:-1].decode()
        except UnicodeDecodeError:
            raise CpioError(f"cpio: name is not UTF-8 at offset {pos}") from None
        data_start = name_start + namesize + _pad4(_NEWC_HEADER_LEN + namesize)
        size = fields["filesize"]
        if data_start + size > len(view):
            raise CpioError(f"cpio: member {name!r} runs past the end ({size} bytes)")
        if name == _TRAILER:
            return entries
        entries.append(CpioEntry(name=name, mode=fields["mode"], data=bytes(view[data_start:data_start + size]),
                                 uid=fields["uid"], gid=fields["gid"], nlink=fields["nlink"],
                                 mtime=fields["mtime"], rdevmajor=fields["rdevmajor"],
                                 rdevminor=fields["rdevminor"], ino=fields["ino"]))
        pos = data_start + size + _pad4(size)


# --------------------------------------------------------------------- modules

def module_name(path: str) -> str:
    """kernel/drivers/net/virtio_net.ko.xz -> virtio_net (the kernel treats '-' as '_')."""
    base = os.path.basename(path)
    for suffix in sorted(_MODULE_SUFFIXES, key=len, reverse=True):
        if base.endswith(suffix):
            base = base[:-len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str, source: str = "modules.dep") -> dict[str, list[str]]:
    """modules.dep ("path: dep dep ...") -> {path: [dep paths]}."""
    deps: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, sep, rest = line.partition(":")
        path = path.strip()
        if not sep or not path or any(c.isspace() for c in path):
            raise GuestBuildError(f"{source}:{lineno}: expected 'module.ko: deps...', got {line[:60]!r}")
        deps[path] = rest.split()
    return deps


def format_modules_dep(deps: dict[str, list[str]]) -> str:
    return "".join(f"{path}: {' '.join(d)}".rstrip() + "\n" for path, d in deps.items())


def parse_modules_builtin(text: str) -> set[str]:
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def resolve_modules(deps: dict[str, list[str]], wanted, builtin: set[str] = frozenset(),
                    optional=()) -> list[str]:
    """Module paths to insmod, every module after the ones it needs.

    ``wanted`` names must be a module in ``deps`` or built in; ``optional`` names are
    loaded only if they are modules. A dependency cycle or a dependency missing from
    ``deps`` is an error: the guest would fail to load it.
    """
    by_name = {module_name(p): p for p in deps}
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(path: str, chain: tuple[str, ...]) -> None:
        if state.get(path) == "done":
            return
        if state.get(path) == "active":
            raise GuestBuildError(f"modules.dep: dependency cycle {' -> '.join(chain + (path,))}")
        if path not in deps:
            raise GuestBuildError(f"modules.dep: {chain[-1] if chain else '?'} needs {path}, which has no entry")
        state[path] = "active"
        for dep in deps[path]:
            visit(dep, chain + (path,))
        state[path] = "done"
        order.append(path)

    for name in list(wanted) + list(optional):
        norm = name.replace("-", "_")
        if norm in by_name:
            visit(by_name[norm], ())
        elif norm not in builtin and name not in optional:
            raise GuestBuildError(f"kernel module {name} is neither a module nor built in")
    return order


def read_module(path: str) -> bytes:
    """A module file's plain ELF bytes; busybox insmod does not decompress."""
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".ko"):
        return data
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        return _zstd_decompress(data, path)
    raise GuestBuildError(f"{path}: unknown module compression")


def _zstd_decompress(data: bytes, where: str) -> bytes:
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError:
        zstandard = None
    if zstandard is not None:
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    tool = shutil.which("zstd")
    if not tool:
        raise GuestBuildError(f"{where}: zstd-compressed module; install the zstd tool (apt-get install zstd) "
                              "or the zstandard Python package")
    proc = subprocess.run([tool, "-dcq"], input=data, capture_output=True)
    if proc.returncode != 0:
        raise GuestBuildError(f"{where}: zstd -d failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def elf_modinfo(data: bytes, where: str = "module") -> dict[str, list[str]]:
    """The key=value strings of a module's .modinfo section (64-bit little-endian ELF)."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise GuestBuildError(f"{where}: not a 64-bit little-endian ELF module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shentsize < 64 or shstrndx >= shnum or shoff + shnum * shentsize > len(data):
        raise GuestBuildError(f"{where}: bad ELF section table")
    sections = []
    for i in range(shnum):
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        if offset + size > len(data) and _type != 8:  # SHT_NOBITS has no file data
            raise GuestBuildError(f"{where}: ELF section {i} runs past the end")
        sections.append((name, _type, offset, size))
    _, _, stroff, strsize = sections[shstrndx]
    strtab = data[stroff:stroff + strsize]
    info: dict[str, list[str]] = {}
    for name, _type, offset, size in sections:
        end = strtab.find(b"\0", name)
        if strtab[name:end if end >= 0 else None] == b".modinfo":
            for item in data[offset:offset + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
    return info


class ModuleTree:
    """A /lib/modules/RELEASE directory, with or without depmod's modules.dep."""

    def __init__(self, root: str):
        self.root = root
        self.paths: dict[str, str] = {}
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                if f.endswith(_MODULE_SUFFIXES):
                    rel = os.path.relpath(os.path.join(dirpath, f), root)
                    self.paths.setdefault(module_name(rel), rel)
        builtin = os.path.join(root, "modules.builtin")
        self.builtin = parse_modules_builtin(_read_text(builtin)) if os.path.exists(builtin) else set()

    def deps_for(self, names) -> dict[str, list[str]]:
        """Dependency entries covering ``names`` and everything they need.

        Debian ships no modules.dep (depmod runs at install time), so without one the
        graph comes from each module's own ``depends=`` field, which modpost computed
        from the same symbol references depmod would use.
        """
        dep_file = os.path.join(self.root, "modules.dep")
        if os.path.exists(dep_file):
            return parse_modules_dep(_read_text(dep_file), dep_file)
        deps: dict[str, list[str]] = {}
        todo = [self.paths[n] for n in names if n in self.paths]
        while todo:
            rel = todo.pop()
            if rel in deps:
                continue
            info = elf_modinfo(read_module(os.path.join(self.root, rel)), rel)
            needed = [d.replace("-", "_") for v in info.get("depends", []) for d in v.split(",") if d]
            # softdep "pre:" modules (libcrc32c wants crc32c) load first when they exist.
            for soft in info.get("softdep", []):
                m = re.match(r"\s*pre:\s*([^:]*?)(\s+post:.*)?$", soft)
                if m:
                    needed += [d.replace("-", "_") for d in m.group(1).split() if d.replace("-", "_") in self.paths]
            resolved = []
            for dep in needed:
                if dep in self.paths:
                    resolved.append(self.paths[dep])
                elif dep not in self.builtin:
                    raise GuestBuildError(f"{rel}: depends on {dep}, which is not in {self.root}")
            deps[rel] = list(dict.fromkeys(resolved))
            todo.extend(resolved)
        return deps


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


# ------------------------------------------------------------------------ init

# Parses /proc/cmdline as the kernel does (spaces split, double quotes group and are
# dropped) and prints the last value of `want`; exit 1 when absent.
CMDLINE_AWK = r"""
{
  line = $0; n = length(line); tok = ""; have = 0; inq = 0
  for (i = 1; i <= n + 1; i++) {
    c = (i <= n) ? substr(line, i, 1) : " "
    if (c == "\"") { inq = !inq; have = 1; continue }
    if (!inq && (c == " " || c == "\t")) {
      if (have && index(tok, want) == 1) { val = substr(tok, length(want) + 1); found = 1 }
      tok = ""; have = 0; continue
    }
    tok = tok c; have = 1
  }
}
END { if (found) { print val; exit 0 } exit 1 }
"""

INIT_SCRIPT = r"""#!/bin/sh
# kvmpy default guest: made by `kvmpy guest build`.
# Kernel command line: kvmpy.run="cmd; cmd" runs the commands and powers off;
# kvmpy.hostname=NAME; kvmpy.ip=ADDR/PREFIX or kvmpy.ip=dhcp for eth0.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=${TERM:-vt100}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
exec </dev/console >/dev/console 2>&1
echo "@BANNER@ $(uname -r)"

kvmpy_arg() {
  awk -v want="kvmpy.$1=" '@AWK@' /proc/cmdline
}

# "poweroff -f" does not wait for the serial port's output queue: the last lines
# (a command's output) would be lost on a slow host. Wait until the port's
# transmit count stops moving for two samples (at most about 10 s).
kvmpy_drain_console() {
  last=; still=0; i=0
  while [ $i -lt 50 ] && [ $still -lt 2 ]; do
    now=$(grep -o 'tx:[0-9]*' /proc/tty/driver/serial 2>/dev/null | head -n 1)
    [ -z "$now" ] && return
    if [ "$now" = "$last" ]; then still=$((still + 1)); else still=0; fi
    last=$now; i=$((i + 1))
    sleep 0.2
  done
}

kvmpy_shutdown() {
  sync
  umount /mnt 2>/dev/null
  echo "kvmpy guest: $1"
  kvmpy_drain_console
  $1 -f
}
# busybox poweroff/halt/reboot without -f signal pid 1: USR2/USR1/TERM.
trap 'kvmpy_shutdown poweroff' USR1 USR2
trap 'kvmpy_shutdown reboot' TERM

kver=$(uname -r)
while read -r m; do
  [ -n "$m" ] || continue
  insmod "/lib/modules/$kver/$m" || echo "kvmpy guest: insmod $m failed"
done < /etc/kvmpy/modules
# The ACPI power button (QMP system_powerdown, SIGTERM to kvmpy) powers off.
[ -d /dev/input ] && acpid -c /etc/acpi -l /var/log/acpid.log

if [ -e /sys/class/block/vda ]; then
  i=0
  while [ ! -b /dev/vda ] && [ $i -lt 20 ]; do sleep 0.1; i=$((i + 1)); done
  if mount -t ext4 /dev/vda /mnt; then
    echo "kvmpy guest: /dev/vda mounted on /mnt"
  elif [ -b /dev/vda1 ] && mount -t ext4 /dev/vda1 /mnt; then
    echo "kvmpy guest: /dev/vda1 mounted on /mnt"
  else
    echo "kvmpy guest: /dev/vda has no ext4 file system; not mounted"
  fi
fi

ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up
  addr=$(kvmpy_arg ip)
  case "$addr" in
    "") ;;
    dhcp) udhcpc -i eth0 -q -n -t 3 -s /etc/kvmpy/udhcpc.script ;;
    *) ip addr add "$addr" dev eth0 ;;
  esac
  echo "kvmpy guest: eth0 up"
fi

name=$(kvmpy_arg hostname) || name=kvmpy
hostname "$name"
echo "$name" > /etc/hostname

if cmd=$(kvmpy_arg run); then
  echo "kvmpy guest: run: $cmd"
  (cd /root && sh -c "$cmd")
  echo "kvmpy guest: run exit $?"
  kvmpy_shutdown poweroff
fi

echo "kvmpy guest: shell on the console; 'poweroff' or leaving the shell powers off"
setsid cttyhack sh -l &
wait $!
kvmpy_shutdown poweroff
"""

POWER_BUTTON_ACTION = """#!/bin/sh
echo "kvmpy guest: power button"
poweroff
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface" ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done ;;
esac
"""

PROFILE = r"""export PS1='\h:\w\$ '
alias ll='ls -l'
"""


def render_init() -> str:
    if "'" in CMDLINE_AWK:
        raise AssertionError("CMDLINE_AWK is embedded in single quotes")
    return INIT_SCRIPT.replace("@BANNER@", BANNER).replace("@AWK@", CMDLINE_AWK.strip())


# ---------------------------------------------------------------- host tools

def _run(argv: list[str], what: str, cwd: str | None = None, env: dict | None = None) -> str:
    log.debug("running %s", shlex.join(argv))
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env)
    except OSError as e:
        raise GuestBuildError(f"{what}: cannot run {argv[0]}: {e.strerror}") from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise GuestBuildError(f"{what}: {shlex.join(argv)} failed: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


def _is_root() -> bool:
    return os.geteuid() == 0


DEBIAN_TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "dpkg-query")


def missing_debian_tool() -> str | None:
    """The first of apt's and dpkg's tools this host lacks (the kernels come from Debian's archive)."""
    return next((tool for tool in DEBIAN_TOOLS if not shutil.which(tool)), None)


def non_debian_hint() -> str:
    release = os.uname().release
    kernel = next((p for p in (f"/boot/vmlinuz-{release}", "/boot/vmlinuz") if os.path.exists(p)),
                  "/boot/vmlinuz-VERSION")
    initrd = next((p for p in (f"/boot/initramfs-{release}.img", f"/boot/initrd.img-{release}",
                               "/boot/initramfs-virt", "/boot/initrd.img") if os.path.exists(p)),
                  "/boot/initramfs-VERSION.img")
    return ("kvmpy guest build needs Debian's apt-get and dpkg-deb, which this host lacks; pass a kernel and "
            f"initramfs instead: kvmpy run --kernel {kernel} --initrd {initrd} --append console=ttyS0 "
            "(or see examples/alpine-virt.toml)")


class Apt:
    """apt-cache/apt-get/dpkg-deb, with one `apt-get update` when the lists are missing or stale."""

    def __init__(self):
        self.updated = False

    def update(self, why: str) -> None:
        if self.updated:
            raise GuestBuildError(f"{why}, even after apt-get update")
        if not _is_root():
            raise GuestBuildError(f"{why}; run `apt-get update` as root, then try again")
        print("kvmpy guest: running apt-get update", file=sys.stderr)
        _run(["apt-get", "update", "-qq"], "apt-get update")
        self.updated = True

    def kernel_package(self, meta: str) -> tuple[str, str | None]:
        """The versioned kernel package ``meta`` depends on, and the version it pins.

        One `apt-cache show` answers both (each apt-cache call re-reads the lists,
        about a second); `apt-cache depends` is the fallback for an unpinned dependency.
        """
        while True:
            proc = subprocess.run(["apt-cache", "show", "--no-all-versions", meta], capture_output=True, text=True)
            m = re.search(r"^Depends:.*?\b(linux-image-[a-z0-9.+-]+)(?:\s*\(=\s*([^)\s]+)\))?", proc.stdout, re.M)
            if m:
                return m.group(1), m.group(2)
            proc = subprocess.run(["apt-cache", "depends", meta], capture_output=True, text=True)
            for line in proc.stdout.splitlines():
                m = re.match(r"\s*\|?Depends:\s*(linux-image-\S+)\s*$", line)
                if m:
                    return m.group(1), None
            self.update(f"apt-cache knows no kernel that {meta} depends on")

    def candidate(self, package: str) -> str:
        while True:
            out = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True).stdout
            m = re.search(r"^\s*Candidate:\s*(\S+)", out, re.M)
            if m and m.group(1) != "(none)":
                return m.group(1)
            self.update(f"apt-cache has no candidate version of {package}")

    def download(self, package: str, version: str, dest: str) -> str:
        """Fetches package=version into dest unless there already; returns the .deb path."""
        existing = self._find_deb(package, version, dest)
        if existing:
            return existing
        argv = ["apt-get", "download", "-q", f"{package}={version}"]
        if _is_root():
            # The cache is private to root; apt's _apt sandbox user could not write there.
            argv[2:2] = ["-o", "APT::Sandbox::User=root"]
        proc = subprocess.run(argv, cwd=dest, capture_output=True, text=True)
        if proc.returncode != 0:
            raise GuestBuildError(f"apt-get download {package}={version} failed: "
                                  f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        found = self._find_deb(package, version, dest)
        if not found:
            raise GuestBuildError(f"apt-get download {package}={version} left no .deb in {dest}")
        return found

    @staticmethod
    def _find_deb(package: str, version: str, dest: str) -> str | None:
        quoted = version.replace(":", "%3a")
        for f in os.listdir(dest):
            if f.startswith(f"{package}_") and f.endswith(".deb") and f.split("_")[1] in (version, quoted):
                return os.path.join(dest, f)
        return None


def busybox_info(apt: Apt) -> tuple[str, str]:
    """(busybox path, version string); installs busybox-static when root and missing."""
    def version() -> str | None:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", BUSYBOX_PACKAGE],
                              capture_output=True, text=True)
        parts = proc.stdout.split()
        return parts[-1] if proc.returncode == 0 and "installed" in parts[:3] else None

    ver = version()
    if ver is None or not os.path.exists(BUSYBOX_PATH):
        if not _is_root():
            raise GuestBuildError(f"{BUSYBOX_PACKAGE} is not installed; as root: apt-get install {BUSYBOX_PACKAGE}")
        print(f"kvmpy guest: installing {BUSYBOX_PACKAGE}", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            _run(["apt-get", "install", "-y", "-qq", BUSYBOX_PACKAGE], "apt-get install", env=env)
        except GuestBuildError:
            apt.update(f"apt-get install {BUSYBOX_PACKAGE} failed")
            _run(["apt-get", "install", "-y", "-qq", BUSYBOX_PACKAGE], "apt-get install", env=env)
        ver = version()
        if ver is None:
            raise GuestBuildError(f"{BUSYBOX_PACKAGE} is still not installed after apt-get install")
    with open(BUSYBOX_PATH, "rb") as f:
        head = f.read(4096)
    if _elf_has_interp(head):
        raise GuestBuildError(f"{BUSYBOX_PATH} is dynamically linked; install {BUSYBOX_PACKAGE}")
    return BUSYBOX_PATH, ver


def _elf_has_interp(head: bytes) -> bool:
    if head[:4] != b"\x7fELF" or head[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(head):
            break
        if struct.unpack_from("<I", head, off)[0] == 3:  # PT_INTERP
            return True
    return False


def busybox_applets(busybox: str) -> list[str]:
    """Applet paths (bin/sh, usr/sbin/...) as busybox itself lists them."""
    proc = subprocess.run([busybox, "--list-full"], capture_output=True, text=True)
    if proc.returncode == 0 and proc.stdout.strip():
        return [p.strip().lstrip("/") for p in proc.stdout.split() if p.strip()]
    out = _run([busybox, "--list"], "busybox --list")
    return [f"bin/{a}" for a in out.split()]


# ------------------------------------------------------------------- the build

@dataclasses.dataclass
class Kernel:
    package: str
    version: str
    release: str
    vmlinuz: str
    modules: str


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kvmpy", "guest")


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def recipe_hash(source: str = __file__, version: int = RECIPE_VERSION) -> str:
    """What a build's cache key takes from its recipe: the recipe module's source and
    its RECIPE_VERSION (for a change the source alone would not show)."""
    with open(source, "rb") as f:
        return hashlib.sha256(f.read() + str(version).encode()).hexdigest()


def unpack_kernel(deb: str, package: str, version: str, kernels_dir: str) -> Kernel:
    """dpkg-deb -x into kernels/PACKAGE_VERSION, keeping vmlinuz and the modules tree."""
    target = os.path.join(kernels_dir, f"{package}_{version.replace(':', '%3a')}")
    stamp = os.path.join(target, "kernel.json")
    if not os.path.exists(stamp):
        tmp = target + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        _run(["dpkg-deb", "-x", deb, tmp], f"unpacking {os.path.basename(deb)}")
        releases = sorted(os.listdir(os.path.join(tmp, "lib", "modules"))) \
            if os.path.isdir(os.path.join(tmp, "lib", "modules")) else []
        if len(releases) != 1:
            raise GuestBuildError(f"{deb}: expected one lib/modules/RELEASE directory, found {releases}")
        release = releases[0]
        vmlinuz = os.path.join(tmp, "boot", f"vmlinuz-{release}")
        if not os.path.exists(vmlinuz):
            raise GuestBuildError(f"{deb}: no boot/vmlinuz-{release}")
        os.rename(vmlinuz, os.path.join(tmp, "vmlinuz"))
        os.rename(os.path.join(tmp, "lib", "modules", release), os.path.join(tmp, "modules"))
        for extra in ("boot", "lib", "usr", "etc"):
            shutil.rmtree(os.path.join(tmp, extra), ignore_errors=True)
        with open(os.path.join(tmp, "kernel.json"), "w") as f:
            json.dump({"package": package, "version": version, "release": release}, f)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
    with open(stamp) as f:
        meta = json.load(f)
    return Kernel(package, version, meta["release"], os.path.join(target, "vmlinuz"),
                  os.path.join(target, "modules"))


def write_gzip(data, out_path: str) -> None:
    """An initramfs image, gzip'd, replacing out_path only once it is complete;
    mtime=0, so the same inputs give the same bytes."""
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=6, mtime=0, filename="") as gz:
            gz.write(data)
    os.replace(tmp, out_path)


def add_busybox_system(cpio: CpioWriter, busybox: str, dirs: set[str]) -> int:
    """The console and null devices, /bin/busybox and a link per applet into ``cpio``,
    whose directories ``dirs`` already holds (an applet's missing one is added to both).
    Returns how many applets were linked."""
    cpio.add_device("dev/console", "c", 5, 1)
    cpio.add_device("dev/null", "c", 1, 3, 0o666)
    with open(busybox, "rb") as f:
        cpio.add_file("bin/busybox", f.read(), 0o755)
    applets = sorted(set(busybox_applets(busybox)) - {"bin/busybox"})
    for applet in applets:
        parent = os.path.dirname(applet)
        if parent and parent not in dirs:
            dirs.add(parent)
            cpio.add_dir(parent)
        cpio.add_symlink(applet, "/bin/busybox")
    return len(applets)


def build_initramfs(kernel: Kernel, busybox: str, out_path: str) -> dict:
    """Writes the gzip'd newc initramfs; returns what went in (for the manifest)."""
    tree = ModuleTree(kernel.modules)
    wanted = REQUIRED_MODULES + tuple(n for n in OPTIONAL_MODULES if n not in REQUIRED_MODULES)
    deps = tree.deps_for(wanted)
    order = resolve_modules(deps, REQUIRED_MODULES, tree.builtin, OPTIONAL_MODULES)

    buf = io.BytesIO()
    cpio = CpioWriter(buf)
    dirs = {"bin", "sbin", "usr", "usr/bin", "usr/sbin", "proc", "sys", "dev", "mnt", "tmp", "etc",
            "etc/kvmpy", "root", "run", "var", "var/log", "lib", "lib/modules", f"lib/modules/{kernel.release}"}
    plain = [p.rsplit(".ko", 1)[0] + ".ko" for p in order]
    for p in plain:
        parts = p.split("/")
        dirs.update("/".join([f"lib/modules/{kernel.release}"] + parts[:i]) for i in range(1, len(parts)))
    for d in sorted(dirs):
        cpio.add_dir(d, 0o1777 if d == "tmp" else 0o755)
    applets = add_busybox_system(cpio, busybox, dirs)
    for src, dst in zip(order, plain):
        cpio.add_file(f"lib/modules/{kernel.release}/{dst}", read_module(os.path.join(kernel.modules, src)))
    # For busybox modprobe/modinfo in the guest: the same graph, with plain .ko names.
    rename = dict(zip(order, plain))
    cpio.add_file(f"lib/modules/{kernel.release}/modules.dep",
                  format_modules_dep({rename[p]: [rename[d] for d in deps[p]] for p in order}).encode())
    cpio.add_file("etc/kvmpy/modules", "".join(p + "\n" for p in plain).encode())
    cpio.add_file("etc/kvmpy/udhcpc.script", UDHCPC_SCRIPT.encode(), 0o755)
    # busybox acpid runs /etc/acpi/<ACTION>: a power-button press powers off cleanly
    # (busybox versions name the action PWRF/00000080 or PWRF/button).
    for d in ("etc/acpi", "etc/acpi/PWRF"):
        cpio.add_dir(d)
    for action in ("00000080", "button"):
        cpio.add_file(f"etc/acpi/PWRF/{action}", POWER_BUTTON_ACTION.encode(), 0o755)
    cpio.add_file("etc/profile", PROFILE.encode())
    cpio.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.add_file("etc/group", b"root:x:0:\n")
    cpio.add_file("etc/hostname", b"kvmpy\n")
    cpio.add_file("init", render_init().encode(), 0o755)
    cpio.close()

    write_gzip(buf.getbuffer(), out_path)
    return {"modules": plain, "builtin_used": sorted(n for n in wanted if n in tree.builtin),
            "applets": applets, "cpio_bytes": buf.tell()}


def find_mke2fs() -> str | None:
    # Debian keeps it in /sbin, which a normal user's PATH often lacks.
    return shutil.which("mke2fs") or next((p for p in ("/sbin/mke2fs", "/usr/sbin/mke2fs")
                                           if os.path.exists(p)), None)


def make_disk(path: str, size: int) -> None:
    """An empty ext4 image with a README; mke2fs -d fills it without root or loop devices."""
    mke2fs = find_mke2fs()
    if not mke2fs:
        raise GuestBuildError("mke2fs is missing (apt-get install e2fsprogs), or pass --no-disk")
    seed = path + ".seed"
    shutil.rmtree(seed, ignore_errors=True)
    os.makedirs(seed)
    with open(os.path.join(seed, "README"), "w") as f:
        f.write("kvmpy default guest data disk: /dev/vda, mounted on /mnt in the guest.\n")
    tmp = path + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        _run([mke2fs, "-q", "-F", "-t", "ext4", "-L", "kvmpy-data", "-d", seed, tmp, f"{size // 1024}k"],
             "making the disk image")
    finally:
        shutil.rmtree(seed, ignore_errors=True)
    os.replace(tmp, path)


def place_file(src: str, dst: str) -> None:
    """dst becomes src's content: a hard link when possible (read-only artefacts), else a copy."""
    # rename() between two links of one inode is a no-op that would leave tmp behind.
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return
    tmp = dst + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def vm_toml(with_disk: bool) -> str:
    text = (
        "# The kvmpy default guest (kvmpy guest build). Paths are relative to this file.\n"
        "# kvmpy run vm.toml   -- Ctrl-A x quits; 'poweroff' in the guest ends it cleanly.\n"
        'name = "kvmpy-guest"\n'
        'accel = "auto"\n'
        f'memory = "{DEFAULT_MEMORY}"\n'
        "cpus = 1\n"
        'kernel = "vmlinuz"\n'
        'initrd = "initrd.img"\n'
        f'cmdline = "{DEFAULT_CMDLINE}"\n'
        'serial = "stdio"\n'
        "no_reboot = true\n")
    if with_disk:
        text += '\n[[disk]]\npath = "disk.img"\nformat = "raw"\n'
    return text


def _parse_disk_size(text: str) -> int:
    from ..config import parse_size
    size = parse_size(text, "--disk-size", "M")
    if size < 16 << 20:
        raise GuestBuildError(f"--disk-size: {text} is too small for ext4 with a journal (at least 16M)")
    if size % 1024:
        raise GuestBuildError(f"--disk-size: {text} is not a whole number of KiB")
    return size


def fetch_kernel(apt: Apt, package: str, version: str, dest: str) -> tuple[str, str]:
    """The .deb of package=version in dest, and the version it is: a stale list names a
    version the mirror no longer has, so a failed download refreshes the lists once and
    takes the new candidate."""
    try:
        return apt.download(package, version, dest), version
    except GuestBuildError as first:
        apt.update(str(first))
        version = apt.candidate(package)
        return apt.download(package, version, dest), version


class BuildCache:
    """A cache root shared by the builds of one kind (the default guest, the nested L1):
    debs/ (downloaded kernel packages), kernels/ (unpacked, ~100 MB each) and
    builds/KEY/ (vmlinuz, initrd.img, manifest.json), KEY a hash of the build's inputs.
    Only the newest build's inputs are kept. Hold ``locked()`` across a lookup and the
    build it leads to: two processes must not build into one directory."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.debs, self.kernels, self.builds = (os.path.join(root, d) for d in ("debs", "kernels", "builds"))
        for d in (self.debs, self.kernels, self.builds):
            os.makedirs(d, exist_ok=True)

    @contextlib.contextmanager
    def locked(self):
        with open(os.path.join(self.root, ".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def build_dir(self, inputs: dict) -> str:
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
        return os.path.join(self.builds, key)

    def has(self, build_dir: str) -> bool:
        # The manifest is written last: a build dir without one is a crashed build.
        return os.path.exists(os.path.join(build_dir, "manifest.json"))

    @staticmethod
    def manifest(build_dir: str) -> dict:
        with open(os.path.join(build_dir, "manifest.json")) as f:
            return json.load(f)

    def make(self, inputs: dict, deb: str, package: str, version: str,
             make_initramfs: Callable[[Kernel, str], dict]) -> str:
        """Unpacks the kernel, has ``make_initramfs(kernel, path)`` write the initramfs
        (returning what went in, for the manifest), and publishes the build directory
        whole; then drops what older inputs left. Returns the build directory."""
        build_dir = self.build_dir(inputs)
        kernel = unpack_kernel(deb, package, version, self.kernels)
        tmp_dir = build_dir + ".tmp"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
        place_file(kernel.vmlinuz, os.path.join(tmp_dir, "vmlinuz"))
        contents = make_initramfs(kernel, os.path.join(tmp_dir, "initrd.img"))
        with open(os.path.join(tmp_dir, "manifest.json"), "w") as f:
            json.dump({**inputs, "release": kernel.release, **contents}, f, indent=1)
        shutil.rmtree(build_dir, ignore_errors=True)
        os.rename(tmp_dir, build_dir)
        self._prune(keep={os.path.basename(deb), os.path.basename(os.path.dirname(kernel.vmlinuz)),
                          os.path.basename(build_dir)})
        return build_dir

    def _prune(self, keep: set[str]) -> None:
        for d in (self.debs, self.kernels, self.builds):
            for entry in os.listdir(d):
                if entry in keep or entry.endswith(".tmp"):
                    continue
                path = os.path.join(d, entry)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(path)


@dataclasses.dataclass
class BuildResult:
    out_dir: str
    kernel: str
    initrd: str
    disk: str | None
    config: str
    release: str
    package: str
    version: str
    busybox_version: str
    cached: bool
    seconds: float


def build(out_dir: str | None = None, disk_size: str = DEFAULT_DISK_SIZE, with_disk: bool = True,
          force: bool = False) -> BuildResult:
    start = time.monotonic()
    if missing_debian_tool():
        raise GuestBuildError(non_debian_hint())
    size = _parse_disk_size(disk_size) if with_disk else 0
    root = cache_root()
    cache = BuildCache(root)
    out_dir = os.path.abspath(out_dir or os.path.join(root, "default"))
    os.makedirs(out_dir, exist_ok=True)

    with cache.locked():
        apt = Apt()
        busybox, bb_version = busybox_info(apt)
        package, version = apt.kernel_package(KERNEL_META_PACKAGE)
        version = version or apt.candidate(package)
        inputs = {"kernel_package": package, "kernel_version": version, "busybox_version": bb_version,
                  "busybox_sha256": file_sha256(busybox), "recipe": recipe_hash()}
        build_dir = cache.build_dir(inputs)
        cached = cache.has(build_dir) and not force
        if not cached:
            deb, version = fetch_kernel(apt, package, version, cache.debs)
            inputs["kernel_version"] = version
            build_dir = cache.make(inputs, deb, package, version,
                                   lambda kernel, path: build_initramfs(kernel, busybox, path))
        manifest = cache.manifest(build_dir)

        for name in ("vmlinuz", "initrd.img", "manifest.json"):
            place_file(os.path.join(build_dir, name), os.path.join(out_dir, name))
        disk = os.path.join(out_dir, "disk.img") if with_disk else None
        if disk:
            # The disk holds the user's data: made once, remade only on --force or a new size.
            if force or not os.path.exists(disk) or os.path.getsize(disk) != size:
                make_disk(disk, size)
        config = os.path.join(out_dir, "vm.toml")
        with open(config + ".tmp", "w") as f:
            f.write(vm_toml(disk is not None))
        os.replace(config + ".tmp", config)

    return BuildResult(out_dir, os.path.join(out_dir, "vmlinuz"), os.path.join(out_dir, "initrd.img"), disk,
                       config, manifest["release"], package, manifest["kernel_version"], bb_version, cached,
                       time.monotonic() - start)


def _program() -> list[str]:
    """How the user can run this kvmpy again: the command when it was used, else the
    venv's own command (a plain `python3` there is the system one, without kvmpy)."""
    if os.path.basename(sys.argv[0]) != "__main__.py":
        return ["kvmpy"]
    if sys.prefix != sys.base_prefix:
        script = os.path.join(sys.prefix, "bin", "kvmpy")
        return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "kvmpy"]
    return ["python3", "-m", "kvmpy"]


def run_command_line(result: BuildResult) -> str:
    argv = [*_program(), "run", "--accel", "auto", "--kernel", result.kernel, "--initrd", result.initrd,
            "--append", DEFAULT_CMDLINE, "-m", DEFAULT_MEMORY, "--no-reboot"]
    if result.disk:
        argv += ["--drive", f"file={result.disk},format=raw"]
    return shlex.join(argv)


def _cmd_build(args) -> int:
    result = build(args.out, args.disk_size, not args.no_disk, args.force)
    how = "cached" if result.cached else "built"
    print(f"kvmpy guest: {how} in {result.seconds:.1f} s: kernel {result.release} "
          f"({result.package} {result.version}), busybox {result.busybox_version}")
    print(f"  kernel: {result.kernel}")
    print(f"  initrd: {result.initrd}")
    if result.disk:
        print(f"  disk:   {result.disk}")
    print(f"  config: {result.config}")
    print(f"run it:  {run_command_line(result)}")
    print(f"    or:  {shlex.join([*_program(), 'run', result.config])}")
    print('scripted: add kvmpy.run="cmd; cmd" to --append; the guest runs it and powers off')
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("guest", help="the default Linux guest (Debian kernel + busybox initramfs)")
    sub = p.add_subparsers(dest="guest_command", metavar="ACTION")
    b = sub.add_parser("build", help="build (or reuse from the cache) the default guest",
                       description="Builds a kernel, initramfs and ext4 disk from Debian packages "
                                   f"({KERNEL_META_PACKAGE}, {BUSYBOX_PACKAGE}); cached under {cache_root()}.")
    b.add_argument("--out", metavar="DIR", help="also place vmlinuz, initrd.img, disk.img and vm.toml in DIR "
                                                "(default: the cache's default/ directory)")
    b.add_argument("--disk-size", default=DEFAULT_DISK_SIZE, metavar="SIZE",
                   help=f"ext4 data disk size (default {DEFAULT_DISK_SIZE})")
    b.add_argument("--no-disk", action="store_true", help="no disk image")
    b.add_argument("--force", action="store_true", help="rebuild even when cached; remake the disk image")
    b.set_defaults(func=_cmd_build)
    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 2)[1])
