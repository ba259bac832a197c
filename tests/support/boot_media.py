"""Boot media made the way a distribution makes them: a GRUB rescue ISO
(grub-mkrescue: El Torito for BIOS, an EFI system partition image for UEFI, and an
MBR so the same file boots as a hard disk) holding Debian's cloud kernel and the
default guest's busybox initramfs.

The ISO is also an installer: booted from the CD-ROM, GRUB passes the kernel a
command that copies the hybrid image from /dev/sr0 to /dev/sda (the "copied hybrid
image" form of an installation), syncs and powers off; booted from the disk, GRUB
passes one that prints INSTALLED_MARKER. GRUB tells the two apart by its root
device: the first hard disk (hd0) when booted from it; from the CD, the BIOS's
El Torito drive number (SeaBIOS gives 0xE0: GRUB's hd96) or UEFI's cd0.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess

ISO_TOOLS = ("grub-mkrescue", "xorriso", "mformat")
GRUB_BIOS_MODULES = "/usr/lib/grub/i386-pc"
GRUB_EFI_MODULES = "/usr/lib/grub/x86_64-efi"
GRUB_MENU_TITLE = "kvmpy boot media"
INSTALL_DONE = "kvmpy install: done"
INSTALLED_MARKER = "kvmpy installed system: up"
GRUB_ROOT_LINE = "kvmpy grub: root="

# Both scripts run as the default guest's kvmpy.run command (after its init loaded
# the IDE modules); busybox's dd writes the whole CD then fsyncs, so the disk holds
# the image before the init's poweroff.
INSTALL_SCRIPT = f"""#!/bin/sh
i=0
while [ ! -b /dev/sr0 ] || [ ! -b /dev/sda ]; do
  [ $i -ge 50 ] && {{ echo "kvmpy install: no /dev/sr0 or /dev/sda"; exit 1; }}
  sleep 0.1; i=$((i + 1))
done
dd if=/dev/sr0 of=/dev/sda bs=1M conv=fsync || exit 1
sync
echo "{INSTALL_DONE}"
"""

INSTALLED_SCRIPT = f"""#!/bin/sh
echo "{INSTALLED_MARKER} $(uname -r)"
"""

GRUB_CFG = f"""serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
set default=0
echo "kvmpy grub: root=$root"
if [ "$root" = "hd0" ]; then
  set job=/bin/kvmpy-installed
else
  set job=/bin/kvmpy-install
fi
menuentry "{GRUB_MENU_TITLE}" {{
  linux /boot/vmlinuz console=ttyS0 panic=-1 kvmpy.run=$job
  initrd /boot/initrd.img
}}
"""


def missing_iso_tool() -> str | None:
    for tool in ISO_TOOLS:
        if not shutil.which(tool):
            return f"{tool} is missing (Debian packages grub-pc-bin, grub-efi-amd64-bin, xorriso, mtools)"
    if not os.path.isdir(GRUB_BIOS_MODULES):
        return f"GRUB's BIOS modules are missing ({GRUB_BIOS_MODULES}; Debian grub-pc-bin)"
    return None


def initrd_with_scripts(base_initrd: str, path: str) -> None:
    """``base_initrd`` and one more archive with the two job scripts (the kernel
    unpacks concatenated archives in order)."""
    from kvmpy.tools import guestbuild
    buf = io.BytesIO()
    cpio = guestbuild.CpioWriter(buf)
    cpio.add_file("bin/kvmpy-install", INSTALL_SCRIPT.encode(), mode=0o755)
    cpio.add_file("bin/kvmpy-installed", INSTALLED_SCRIPT.encode(), mode=0o755)
    cpio.close()
    with open(base_initrd, "rb") as f:
        base = f.read()
    with open(path, "wb") as f:
        f.write(base)
        f.write(gzip.compress(buf.getvalue(), mtime=0))


def make_iso(kernel: str, initrd: str, work_dir: str) -> str:
    """grub-mkrescue's hybrid ISO of ``kernel`` and ``initrd`` (with the job
    scripts added) under ``work_dir``; returns its path."""
    tree = os.path.join(work_dir, "iso-root")
    os.makedirs(os.path.join(tree, "boot", "grub"), exist_ok=True)
    shutil.copyfile(kernel, os.path.join(tree, "boot", "vmlinuz"))
    initrd_with_scripts(initrd, os.path.join(tree, "boot", "initrd.img"))
    with open(os.path.join(tree, "boot", "grub", "grub.cfg"), "w") as f:
        f.write(GRUB_CFG)
    iso = os.path.join(work_dir, "inst.iso")
    subprocess.run(["grub-mkrescue", "-o", iso, tree, "--", "-volid", "KVMPY_INST"],
                   check=True, capture_output=True)
    return iso
