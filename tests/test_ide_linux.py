"""Debian's cloud kernel on kvmpy's IDE: ata_piix binds 00:01.1, libata finds the
disk as /dev/sda (read by DMA, compared with what the host wrote) and the CD-ROM as
/dev/sr0 (sr_mod), whose ISO 9660 file system mounts and reads. One boot, on the
translator (Linux under software-nested KVM is out of reach here).

The cloud kernel has ata_piix, libata, scsi_mod, sd_mod, sr_mod, cdrom and isofs as
modules (none built in); the default guest's initramfs does not load them, so this
test appends a second cpio archive to it with those modules and the module list
extended (the kernel unpacks concatenated archives in order; later files win)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import subprocess

import pytest

from conftest import run_kvmpy, tool_required

IDE_MODULES = ("ata_piix", "sd_mod", "sr_mod", "isofs")
BOOT_TIMEOUT = 900
VOLUME = "KVMPY_LINUX_CD"


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    import shutil
    from kvmpy.tools import guestbuild
    if not all(map(shutil.which, ("apt-get", "dpkg-deb"))):
        pytest.skip("not a Debian host: no apt-get/dpkg-deb to build the guest")
    out = tmp_path_factory.mktemp("guest")
    return guestbuild.build(out_dir=str(out), with_disk=False)


def initrd_with_ide_modules(guest, path) -> None:
    from kvmpy.tools import guestbuild
    modules = os.path.join(guestbuild.cache_root(), "kernels", f"{guest.package}_{guest.version}", "modules")
    if not os.path.isdir(modules):
        pytest.skip(f"the guest kernel's modules are not at {modules}")
    tree = guestbuild.ModuleTree(modules)
    missing = [m for m in IDE_MODULES if m not in tree.paths and m not in tree.builtin]
    if missing:
        pytest.skip(f"{guest.package} has no {', '.join(missing)}")
    with open(guest.initrd, "rb") as f:
        base = f.read()
    entries = {e.name: e for e in guestbuild.read_cpio(gzip.decompress(base))}
    prefix = f"lib/modules/{guest.release}/"
    already = entries["etc/kvmpy/modules"].data.decode().split()
    deps = tree.deps_for(IDE_MODULES)
    order = guestbuild.resolve_modules(deps, IDE_MODULES, tree.builtin, ())
    plain = [p.rsplit(".ko", 1)[0] + ".ko" for p in order]
    buf = io.BytesIO()
    cpio = guestbuild.CpioWriter(buf)
    dirs = set()
    for p in plain:
        parts = p.split("/")
        dirs.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
    for d in sorted(dirs):
        cpio.add_dir(d)
    for src, dst in zip(order, plain):
        if prefix + dst not in entries:
            cpio.add_file(prefix + dst, guestbuild.read_module(os.path.join(modules, src)))
    cpio.add_file("etc/kvmpy/modules", "".join(m + "\n" for m in already + [p for p in plain
                                                                          if p not in already]).encode())
    cpio.close()
    with open(path, "wb") as f:
        f.write(base)
        f.write(gzip.compress(buf.getvalue()))


def test_linux_sees_the_ide_disk_and_cdrom(guest, tmp_path):
    xorriso = tool_required("xorriso")
    initrd = tmp_path / "initrd-ide.img"
    initrd_with_ide_modules(guest, initrd)
    disk = tmp_path / "disk.raw"
    pattern = b"".join(hashlib.sha256(str(i).encode()).digest() * 16 for i in range(2048))  # 1 MiB
    disk.write_bytes(pattern)
    tree = tmp_path / "iso-root"
    tree.mkdir()
    (tree / "hello.txt").write_text("hello from the kvmpy cdrom\n")
    iso = tmp_path / "cd.iso"
    subprocess.run([xorriso, "-as", "mkisofs", "-quiet", "-V", VOLUME, "-o", str(iso), str(tree)],
                   check=True, capture_output=True)
    commands = ("cat /sys/block/sda/size; cat /sys/block/sr0/device/model; "
                "dd if=/dev/sda bs=4096 skip=16 count=64 2>/dev/null | md5sum; "
                "mkdir -p /cd; mount -t iso9660 -o ro /dev/sr0 /cd && cat /cd/hello.txt; "
                "grep -E 'ata_piix|ide' /proc/interrupts")
    p = run_kvmpy(["run", "--accel", "tcg", "-m", "512", "--kernel", guest.kernel, "--initrd", str(initrd),
                   "--no-reboot", "--drive", f"file={disk},format=raw,if=ide,index=0",
                   "--drive", f"file={iso},format=raw,media=cdrom,index=2",
                   "--append", f'console=ttyS0 panic=-1 kvmpy.run="{commands}"'], timeout=BOOT_TIMEOUT)
    out = p.stdout.decode(errors="replace").replace("\r\n", "\n")
    assert p.returncode == 0, out[-4000:] + p.stderr.decode()[-2000:]
    assert "kvmpy guest: run exit 0" in out, out[-4000:]
    assert re.search(r"^2048$", out, re.M), "sda is 2048 sectors: " + out[-4000:]
    assert re.search(r"^KVMPY DVD-ROM\s*$", out, re.M), out[-4000:]
    expected = hashlib.md5(pattern[16 * 4096:80 * 4096]).hexdigest()
    assert re.search(rf"^{expected}\s", out, re.M), "sda's bytes differ from the image: " + out[-4000:]
    assert "hello from the kvmpy cdrom" in out, out[-4000:]
    # the disk and the CD-ROM interrupted on IRQ 14 and 15
    assert re.search(r"^\s*14:.*ata_piix", out, re.M) and re.search(r"^\s*15:.*ata_piix", out, re.M), out[-4000:]
