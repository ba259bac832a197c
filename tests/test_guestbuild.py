"""`kvmpy guest build`: the cpio writer, module dependencies, /init, and the real thing.

The end-to-end case downloads Debian's cloud kernel through apt (CI has the
mirror), builds the guest in a private cache, boots it under QEMU TCG with a
scripted `kvmpy.run=` command line and reads back from the host what the guest
wrote to its virtio disk.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import threading
import time
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import run_kvmpy, tool_required
from kvmpy.tools import guestbuild as gb

BUSYBOX = shutil.which("busybox") or ("/bin/busybox" if os.path.exists("/bin/busybox") else None)


# ------------------------------------------------------------------ cpio

def _sample_archive() -> bytes:
    buf = io.BytesIO()
    w = gb.CpioWriter(buf, mtime=1_700_000_000)
    w.add_dir("bin")
    w.add_dir("etc", 0o700)
    w.add_file("bin/busybox", b"\x7fELF" + bytes(range(256)) * 3, 0o755)
    w.add_file("etc/empty", b"")
    w.add_file("etc/odd", b"abc")          # length not a multiple of 4: padding
    w.add_symlink("bin/sh", "/bin/busybox")
    w.add_device("console", "c", 5, 1)
    w.add_file("init", b"#!/bin/sh\necho hi\n", 0o755)
    w.close()
    return buf.getvalue()


def test_cpio_round_trip_python():
    entries = {e.name: e for e in gb.read_cpio(_sample_archive())}
    assert list(entries) == ["bin", "etc", "bin/busybox", "etc/empty", "etc/odd", "bin/sh", "console", "init"]
    assert stat.S_ISDIR(entries["etc"].mode) and stat.S_IMODE(entries["etc"].mode) == 0o700
    assert entries["bin/busybox"].data == b"\x7fELF" + bytes(range(256)) * 3
    assert stat.S_IMODE(entries["bin/busybox"].mode) == 0o755
    assert entries["etc/odd"].data == b"abc"
    assert stat.S_ISLNK(entries["bin/sh"].mode) and entries["bin/sh"].data == b"/bin/busybox"
    assert stat.S_ISCHR(entries["console"].mode)
    assert (entries["console"].rdevmajor, entries["console"].rdevminor) == (5, 1)
    assert all(e.uid == 0 and e.gid == 0 and e.mtime == 1_700_000_000 for e in entries.values())
    assert len({e.ino for e in entries.values()}) == len(entries)


def _cpio_tool() -> list[str] | None:
    for name in ("cpio", "bsdcpio"):
        if shutil.which(name):
            return [shutil.which(name)]
    if BUSYBOX:
        return [BUSYBOX, "cpio"]
    return None


def test_cpio_against_real_tool(tmp_path):
    tool = _cpio_tool()
    if tool is None:
        pytest.skip("no cpio, bsdcpio or busybox to read the archive with")
    data = _sample_archive()
    listing = subprocess.run([*tool, "-t"], input=data, capture_output=True, check=True).stdout.decode().split()
    assert listing == ["bin", "etc", "bin/busybox", "etc/empty", "etc/odd", "bin/sh", "console", "init"]
    # Extract everything but the device node (that would need CAP_MKNOD and adds nothing).
    buf = io.BytesIO()
    w = gb.CpioWriter(buf)
    for e in gb.read_cpio(data):
        if stat.S_ISDIR(e.mode):
            w.add_dir(e.name, stat.S_IMODE(e.mode) | 0o700)
        elif stat.S_ISREG(e.mode):
            w.add_file(e.name, e.data, stat.S_IMODE(e.mode))
        elif stat.S_ISLNK(e.mode):
            w.add_symlink(e.name, e.data.decode())
    w.close()
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run([*tool, "-i", "-d"], input=buf.getvalue(), cwd=out, capture_output=True, check=True)
    assert (out / "bin/busybox").read_bytes() == b"\x7fELF" + bytes(range(256)) * 3
    assert (out / "etc/odd").read_bytes() == b"abc"
    assert (out / "etc/empty").read_bytes() == b""
    assert os.readlink(out / "bin/sh") == "/bin/busybox"
    assert os.stat(out / "init").st_mode & 0o111


@pytest.mark.parametrize("name", ["", "/", "a//b", "../etc", "a/./b", "a\0b", "x/.."])
def test_cpio_rejects_bad_names(name):
    with pytest.raises(ValueError):
        gb.CpioWriter(io.BytesIO()).add_file(name, b"")


def test_cpio_rejects_duplicates():
    w = gb.CpioWriter(io.BytesIO())
    w.add_dir("etc")
    with pytest.raises(ValueError):
        w.add_file("/etc", b"")


_names = st.lists(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e, blacklist_characters="/"),
                          min_size=1, max_size=12).filter(lambda s: s not in (".", "..")),
                  min_size=1, max_size=8, unique=True)


@settings(max_examples=60, deadline=None)
@given(_names, st.data())
def test_cpio_round_trip_any(names, data):
    buf = io.BytesIO()
    w = gb.CpioWriter(buf)
    expect = {}
    for name in names:
        payload = data.draw(st.binary(max_size=70))
        w.add_file(name, payload, 0o640)
        expect[name] = payload
    w.close()
    raw = buf.getvalue()
    assert len(raw) % 4 == 0
    assert {e.name: e.data for e in gb.read_cpio(raw)} == expect


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_cpio_reader_hostile_input(data):
    raw = bytearray(_sample_archive())
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        gb.read_cpio(bytes(raw[:cut]))
    except gb.CpioError:
        pass


# --------------------------------------------------------------- modules

SYNTHETIC_DEP = """\
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.zst kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko.zst: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/sound/unrelated.ko:
"""


def _check_order(deps, order):
    seen = set()
    for path in order:
        assert all(d in seen for d in deps[path]), f"{path} loaded before its dependencies"
        seen.add(path)
    assert len(order) == len(set(order))


def test_resolve_synthetic_modules_dep():
    deps = gb.parse_modules_dep(SYNTHETIC_DEP)
    order = gb.resolve_modules(deps, gb.REQUIRED_MODULES, set(), gb.OPTIONAL_MODULES)
    _check_order(deps, order)
    names = [gb.module_name(p) for p in order]
    assert set(names) == {"virtio_blk", "virtio", "virtio_ring", "virtio_pci", "virtio_pci_modern_dev",
                          "virtio_net", "net_failover", "failover", "ext4", "jbd2", "mbcache", "crc16"}
    assert "unrelated" not in names
    assert names.index("failover") < names.index("net_failover") < names.index("virtio_net")


def test_resolve_builtin_and_missing():
    deps = gb.parse_modules_dep("kernel/a/virtio_blk.ko: kernel/a/virtio.ko\nkernel/a/virtio.ko:\n")
    order = gb.resolve_modules(deps, ["virtio_blk", "ext4"], builtin={"ext4"}, optional=["virtio_pci_legacy_dev"])
    assert order == ["kernel/a/virtio.ko", "kernel/a/virtio_blk.ko"]
    with pytest.raises(gb.GuestBuildError, match="ext4"):
        gb.resolve_modules(deps, ["virtio_blk", "ext4"])
    with pytest.raises(gb.GuestBuildError, match="no entry"):
        gb.resolve_modules(gb.parse_modules_dep("a.ko: b.ko\n"), ["a"])
    with pytest.raises(gb.GuestBuildError, match="cycle"):
        gb.resolve_modules(gb.parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n"), ["a"])


def test_module_names():
    assert gb.module_name("kernel/arch/x86/crypto/crc32c-intel.ko.zst") == "crc32c_intel"
    assert gb.module_name("virtio_net.ko.xz") == "virtio_net"
    assert gb.module_name("a/b/ext4.ko") == "ext4"
    assert gb.parse_modules_builtin("kernel/fs/ext4/ext4.ko\nkernel/lib/crc-t10dif.ko\n") == {"ext4", "crc_t10dif"}


@pytest.mark.parametrize("line", ["no colon here", ": x.ko", "a b.ko: c.ko"])
def test_modules_dep_malformed(line):
    with pytest.raises(gb.GuestBuildError, match=r"modules.dep:1"):
        gb.parse_modules_dep(line + "\n")


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 14).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=40))))
def test_resolve_any_dag(graph):
    n, edges = graph
    # Edges only from higher to lower index: acyclic by construction.
    deps = {f"m{i}.ko": sorted({f"m{b}.ko" for a, b in edges if a == i and b < i}) for i in range(n)}
    text = gb.format_modules_dep(deps)
    assert gb.parse_modules_dep(text) == deps
    order = gb.resolve_modules(deps, [f"m{n - 1}"], optional=[f"m{i}" for i in range(n)])
    _check_order(deps, order)
    assert sorted(order) == sorted(deps)


def _fake_module(depends: str, softdep: str | None = None) -> bytes:
    """A minimal ELF64 relocatable with a .modinfo section, as modpost writes it."""
    modinfo = b"license=GPL\0" + f"depends={depends}\0".encode()
    if softdep:
        modinfo += f"softdep={softdep}\0".encode()
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    body_off = 64
    modinfo_off = body_off
    shstr_off = modinfo_off + len(modinfo)
    shoff = (shstr_off + len(shstrtab) + 7) & ~7
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    sections = [bytes(64),
                struct.pack("<IIQQQQIIQQ", 1, 1, 2, 0, modinfo_off, len(modinfo), 0, 0, 1, 0),
                struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, shstr_off, len(shstrtab), 0, 0, 1, 0)]
    blob = header + modinfo + shstrtab
    return blob + bytes(shoff - len(blob)) + b"".join(sections)


def test_module_tree_without_modules_dep(tmp_path):
    """Debian's packages ship no modules.dep: the graph comes from .modinfo, compressed or not."""
    root = tmp_path / "6.1.0-test"
    files = {
        "kernel/drivers/virtio/virtio_ring.ko": _fake_module(""),
        "kernel/drivers/virtio/virtio.ko.xz": lzma.compress(_fake_module("virtio_ring")),
        "kernel/drivers/virtio/virtio_pci.ko.gz": gzip.compress(_fake_module("virtio,virtio_ring")),
        "kernel/drivers/block/virtio_blk.ko": _fake_module("virtio,virtio_ring"),
        "kernel/drivers/net/virtio_net.ko": _fake_module("net_failover,virtio,virtio_ring"),
        "kernel/drivers/net/net_failover.ko": _fake_module("failover"),
        "kernel/net/core/failover.ko": _fake_module(""),
        "kernel/lib/libcrc32c.ko": _fake_module("", softdep="pre: crc32c"),
        "kernel/crypto/crc32c_generic.ko": _fake_module(""),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n")
    tree = gb.ModuleTree(str(root))
    deps = tree.deps_for(gb.REQUIRED_MODULES + gb.OPTIONAL_MODULES)
    order = gb.resolve_modules(deps, gb.REQUIRED_MODULES, tree.builtin, gb.OPTIONAL_MODULES)
    _check_order(deps, order)
    assert deps["kernel/drivers/virtio/virtio_pci.ko.gz"] == ["kernel/drivers/virtio/virtio.ko.xz",
                                                             "kernel/drivers/virtio/virtio_ring.ko"]
    assert gb.read_module(str(root / "kernel/drivers/virtio/virtio.ko.xz")) == _fake_module("virtio_ring")
    assert {gb.module_name(p) for p in order} == {"virtio_ring", "virtio", "virtio_pci", "virtio_blk",
                                                  "virtio_net", "net_failover", "failover", "libcrc32c",
                                                  "crc32c_generic"}
    (root / "kernel/drivers/net/net_failover.ko").write_bytes(_fake_module("failover,nonexistent"))
    with pytest.raises(gb.GuestBuildError, match="nonexistent"):
        gb.ModuleTree(str(root)).deps_for(["virtio_net"])


def test_zstd_module(tmp_path):
    zstd = tool_required("zstd")
    plain = _fake_module("virtio")
    path = tmp_path / "m.ko.zst"
    path.write_bytes(subprocess.run([zstd, "-q", "-c"], input=plain, capture_output=True, check=True).stdout)
    assert gb.read_module(str(path)) == plain
    assert gb.elf_modinfo(plain)["depends"] == ["virtio"]


@pytest.mark.parametrize("blob", [b"", b"\x7fELF", b"MZ" + bytes(100), b"\x7fELF\x02\x01" + bytes(58) + bytes(10)])
def test_elf_modinfo_rejects_garbage(blob):
    with pytest.raises(gb.GuestBuildError):
        gb.elf_modinfo(blob)


# ------------------------------------------------------------------ /init

def _awk_arg(cmdline: str, name: str) -> tuple[int, str]:
    proc = subprocess.run([BUSYBOX, "awk", "-v", f"want=kvmpy.{name}=", gb.CMDLINE_AWK],
                          input=cmdline + "\n", capture_output=True, text=True)
    return proc.returncode, proc.stdout.rstrip("\n")


needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed")


@needs_busybox
def test_cmdline_parsing_in_guest_awk():
    line = 'console=ttyS0 panic=-1 kvmpy.run="uname -r; echo data > /mnt/f; sync" quiet kvmpy.hostname=vm1'
    assert _awk_arg(line, "run") == (0, "uname -r; echo data > /mnt/f; sync")
    assert _awk_arg(line, "hostname") == (0, "vm1")
    assert _awk_arg(line, "ip")[0] == 1
    assert _awk_arg('"kvmpy.run=echo a  b" x', "run") == (0, "echo a  b")
    assert _awk_arg("xkvmpy.run=no kvmpy.runx=no", "run")[0] == 1
    assert _awk_arg("kvmpy.run=", "run") == (0, "")


@needs_busybox
@settings(max_examples=25, deadline=None)
@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e, blacklist_characters='"'),
               max_size=60))
def test_cmdline_any_command(command):
    assert _awk_arg(f'console=ttyS0 kvmpy.run="{command}" quiet', "run") == (0, command)


@needs_busybox
def test_init_script_parses():
    proc = subprocess.run([BUSYBOX, "sh", "-n", "-c", gb.render_init()], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert gb.BANNER in gb.render_init()


# --------------------------------------------------------------- CLI edges

def test_non_debian_host_says_what_to_pass(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    r = run_kvmpy(["guest", "build", "--out", str(tmp_path / "out")],
                  env={"PATH": str(empty), "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "--kernel" in lines[0] and "--initrd" in lines[0], lines


def test_bad_disk_size(tmp_path):
    if not shutil.which("apt-get"):
        pytest.skip("apt-get is not installed")
    for size in ("1M", "lots"):
        r = run_kvmpy(["guest", "build", "--out", str(tmp_path), "--disk-size", size],
                      env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
        assert r.returncode == 2 and b"--disk-size" in r.stderr, r.stderr
        assert len(r.stderr.decode().strip().splitlines()) == 1


def test_vm_toml_loads(tmp_path):
    from kvmpy.config import load_config
    (tmp_path / "vm.toml").write_text(gb.vm_toml(with_disk=True))
    cfg = load_config(str(tmp_path / "vm.toml"))
    assert cfg.accel == "auto" and cfg.kernel == str(tmp_path / "vmlinuz")
    assert cfg.initrd == str(tmp_path / "initrd.img") and cfg.disks[0].path == str(tmp_path / "disk.img")
    assert "console=ttyS0" in cfg.cmdline


def test_examples_load():
    from kvmpy.config import load_config
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    for name in ("debian-cloud.toml", "alpine-virt.toml"):
        cfg = load_config(os.path.join(examples, name))
        assert cfg.kernel and cfg.initrd and "console=ttyS0" in cfg.cmdline


# ------------------------------------------------------------- end to end

def _need_tools():
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "qemu-system-x86_64"):
        tool_required(tool)
    for tool in ("mke2fs", "debugfs"):
        if not (shutil.which(tool) or os.path.exists(f"/sbin/{tool}")):
            pytest.skip(f"{tool} is not installed (e2fsprogs)")


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    """A guest built from scratch in a private cache (apt download included)."""
    _need_tools()
    base = tmp_path_factory.mktemp("guest")
    env = {"XDG_CACHE_HOME": str(base / "cache")}
    out = base / "out"
    t0 = time.monotonic()
    r = run_kvmpy(["guest", "build", "--out", str(out), "--disk-size", "64M"], timeout=600, env=env)
    build_s = time.monotonic() - t0
    assert r.returncode == 0, r.stderr.decode()
    t0 = time.monotonic()
    again = run_kvmpy(["guest", "build", "--out", str(out), "--disk-size", "64M"], timeout=120, env=env)
    cached_s = time.monotonic() - t0
    assert again.returncode == 0, again.stderr.decode()
    print(f"\nguest build: {build_s:.1f} s from scratch, {cached_s:.1f} s cached")
    return {"out": out, "env": env, "first": r.stdout.decode(), "again": again.stdout.decode()}


def test_build_outputs(guest):
    out = guest["out"]
    assert "built in" in guest["first"] and "cached in" in guest["again"]
    assert f"--initrd {out}/initrd.img" in guest["first"] and "run it:" in guest["first"]
    import json
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kernel_package"] == f"linux-image-{manifest['release']}"
    plain = [gb.module_name(p) for p in manifest["modules"]]
    for name in ("virtio_pci", "virtio_blk", "virtio_net"):
        assert name in plain or name in manifest["builtin_used"], name
    assert "ext4" in plain or "ext4" in manifest["builtin_used"]
    entries = {e.name: e for e in gb.read_cpio(gzip.decompress((out / "initrd.img").read_bytes()))}
    assert stat.S_IMODE(entries["init"].mode) == 0o755
    assert entries["bin/sh"].data == b"/bin/busybox" and "sbin/insmod" in entries
    for m in manifest["modules"]:
        data = entries[f"lib/modules/{manifest['release']}/{m}"].data
        assert data[:4] == b"\x7fELF", m
    cfg = tomllib.loads((out / "vm.toml").read_text())
    assert cfg["accel"] == "auto" and cfg["disk"][0]["path"] == "disk.img"
    assert (out / "disk.img").stat().st_size == 64 << 20


def _debugfs() -> str:
    return shutil.which("debugfs") or "/sbin/debugfs"


class _Console:
    """QEMU's serial on stdio, line by line with arrival times."""

    def __init__(self, argv):
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for raw in self.proc.stdout:
            with self.cond:
                self.lines.append((time.monotonic() - self.t0, raw.decode(errors="replace").rstrip("\r\n")))
                self.cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, line in self.lines:
                    if re.search(pattern, line):
                        return t
                left = deadline - time.monotonic()
                if left <= 0:
                    self.proc.kill()
                    raise AssertionError(f"no {pattern!r} on the console:\n" + self.text())
                self.cond.wait(left)

    def finish(self, timeout: float) -> float:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("QEMU did not power off:\n" + self.text()) from None
        return time.monotonic() - self.t0

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _qemu(out, append: str, disk) -> list[str]:
    return ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-kernel", str(out / "vmlinuz"),
            "-initrd", str(out / "initrd.img"), "-append", append,
            "-drive", f"file={disk},if=virtio,format=raw",
            # A NIC so virtio_net has a device; restrict=on keeps it off every network.
            "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0",
            "-nographic", "-no-reboot"]


def test_boot_under_qemu_tcg(guest, tmp_path):
    import json
    out = guest["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    disk = tmp_path / "disk.img"
    shutil.copyfile(out / "disk.img", disk)
    run = "uname -r; grep -c ^processor /proc/cpuinfo; cat /proc/version; echo data > /mnt/f; sync"
    con = _Console(_qemu(out, f'console=ttyS0 panic=-1 quiet kvmpy.run="{run}"', disk))
    t_init = con.wait_for(re.escape(gb.BANNER), 120)
    t_run = con.wait_for("kvmpy guest: run exit", 120)
    t_off = con.finish(60)
    text = con.text()
    print(f"\nQEMU TCG: banner at {t_init:.1f} s, command done at {t_run:.1f} s, powered off at {t_off:.1f} s")
    assert con.proc.returncode == 0, text
    lines = text.splitlines()
    run_at = next(i for i, line in enumerate(lines) if line.startswith("kvmpy guest: run: "))
    assert lines[run_at + 1] == manifest["release"], text
    assert lines[run_at + 2].isdigit() and int(lines[run_at + 2]) >= 1, text
    assert f" {manifest['kernel_version']} " in lines[run_at + 3], text
    assert "kvmpy guest: /dev/vda mounted on /mnt" in text
    assert "kvmpy guest: eth0 up" in text
    assert "kvmpy guest: run exit 0" in text and "insmod" not in text, text
    got = subprocess.run([_debugfs(), "-R", "cat /f", str(disk)], capture_output=True, text=True, check=True)
    assert got.stdout == "data\n"


def test_interactive_shell_poweroff(guest, tmp_path):
    out = guest["out"]
    disk = tmp_path / "disk.img"
    shutil.copyfile(out / "disk.img", disk)
    con = _Console(_qemu(out, "console=ttyS0 panic=-1 quiet kvmpy.hostname=testvm", disk))
    con.wait_for("kvmpy guest: shell on the console", 120)
    time.sleep(0.5)  # let the shell reach its prompt
    con.proc.stdin.write(b"echo host=$(hostname) > /mnt/h; cat /mnt/README; poweroff\n")
    con.proc.stdin.flush()
    con.wait_for("kvmpy guest: poweroff", 60)
    con.finish(30)
    assert con.proc.returncode == 0, con.text()
    assert "data disk" in con.text()
    got = subprocess.run([_debugfs(), "-R", "cat /h", str(disk)], capture_output=True, text=True, check=True)
    assert got.stdout == "host=testvm\n"


def test_no_disk_reuses_cache(guest, tmp_path):
    out = tmp_path / "nodisk"
    r = run_kvmpy(["guest", "build", "--out", str(out), "--no-disk"], timeout=120, env=guest["env"])
    assert r.returncode == 0, r.stderr.decode()
    assert "cached in" in r.stdout.decode() and "--drive" not in r.stdout.decode()
    assert not (out / "disk.img").exists()
    assert "disk" not in tomllib.loads((out / "vm.toml").read_text())
    assert (out / "initrd.img").read_bytes() == (guest["out"] / "initrd.img").read_bytes()
