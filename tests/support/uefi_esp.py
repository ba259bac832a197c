"""An EFI system partition image as a distribution's installer makes one: a FAT file
system with GRUB's EFI image at the removable-media path EFI/BOOT/BOOTX64.EFI
(grub-mkstandalone, its grub.cfg built in), written with mtools, no root needed.

The built-in grub.cfg is the guest side of tests/test_uefi_virtio.py: on the serial
console it prints a token read back from the same disk through the firmware's block
I/O, asks for an address by DHCP on every network card the firmware drives, lists
what it got, and leaves through the debug-exit port, so both the VMM's and QEMU's
runs end on their own."""

from __future__ import annotations

import os
import shutil
import subprocess

ESP_TOOLS = ("grub-mkstandalone", "mformat", "mmd", "mcopy")
GRUB_EFI_MODULES = "/usr/lib/grub/x86_64-efi"
# Only what grub.cfg uses: the image stays under a megabyte.
GRUB_MODULES = "part_msdos fat serial terminal echo ls cat net efinet iorw normal"
BEGIN = "kvmpy uefi: begin"
DONE = "kvmpy uefi: done"
TOKEN_FILE = "TOKEN.TXT"
EXIT_PORT = 0xF4
EXIT_VALUE = 0x2A
ESP_SIZE = 32 << 20

GRUB_CFG = f"""serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
echo "{BEGIN}"
cat (hd0)/{TOKEN_FILE}
net_bootp
net_ls_addr
echo "{DONE}"
outb {EXIT_PORT:#x} {EXIT_VALUE:#x}
"""


def missing_esp_tool() -> str | None:
    for tool in ESP_TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is missing (Debian packages grub-efi-amd64-bin, grub-common, mtools)"
    if not os.path.isdir(GRUB_EFI_MODULES):
        return f"GRUB's EFI modules are missing ({GRUB_EFI_MODULES}; Debian grub-efi-amd64-bin)"
    return None


def make_esp(work_dir: str, token: str) -> str:
    """The ESP image (raw, FAT without a partition table, as a USB stick may hold it)
    holding GRUB and ``token`` in TOKEN.TXT; returns its path."""
    cfg = os.path.join(work_dir, "grub.cfg")
    with open(cfg, "w") as f:
        f.write(GRUB_CFG)
    efi = os.path.join(work_dir, "BOOTX64.EFI")
    subprocess.run(["grub-mkstandalone", "-O", "x86_64-efi", "-o", efi, f"--install-modules={GRUB_MODULES}",
                    f"--modules={GRUB_MODULES}", "--locales=", "--fonts=", "--themes=",
                    f"boot/grub/grub.cfg={cfg}"], check=True, capture_output=True)
    token_path = os.path.join(work_dir, TOKEN_FILE)
    with open(token_path, "w") as f:
        f.write(token + "\n")
    image = os.path.join(work_dir, "esp.img")
    with open(image, "wb") as f:
        f.truncate(ESP_SIZE)
    for cmd in (["mformat", "-i", image, "::"],
                ["mmd", "-i", image, "::/EFI", "::/EFI/BOOT"],
                ["mcopy", "-i", image, efi, "::/EFI/BOOT/BOOTX64.EFI"],
                ["mcopy", "-i", image, token_path, f"::/{TOKEN_FILE}"]):
        subprocess.run(cmd, check=True, capture_output=True)
    return image
