"""A raw disk image whose MBR is a real 16-bit boot sector, assembled with binutils.

The boot sector does what any boot loader does first: it reads the disk's second
sector through the BIOS (int 13h, CHS 0/0/2, into 0x7E00), prints the text found
there on COM1 (polling the line status register, as a boot loader's serial
console does), then writes EXIT_VALUE to the debug-exit port 0xF4 (kvmpy exits
with it; QEMU's isa-debug-exit with 2*value+1). Should int 13h fail it prints
FAIL_TEXT and exits with FAIL_VALUE, so a broken disk service cannot pass.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

SECOND_SECTOR_TEXT = b"kvmpy-mbr: second sector read through int 13h\r\n"
GREETING = b"kvmpy-mbr: boot sector running\r\n"
FAIL_TEXT = b"kvmpy-mbr: int 13h failed\r\n"
EXIT_VALUE = 0x10
FAIL_VALUE = 0x20

SOURCE = r"""
.code16
.globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7c00, %sp
    sti
    mov %dl, boot_drive
    mov $greeting, %si
    call puts
    mov $0x0201, %ax        /* read one sector */
    mov $0x7e00, %bx
    mov $0x0002, %cx        /* cylinder 0, sector 2 */
    xor %dh, %dh
    mov boot_drive, %dl
    int $0x13
    jc failed
    mov $0x7e00, %si
    call puts
    mov $EXIT_VALUE, %al
    jmp leave
failed:
    mov $fail, %si
    call puts
    mov $FAIL_VALUE, %al
leave:
    mov $0xf4, %dx
    out %al, %dx
halt:
    cli
    hlt
    jmp halt

puts:                       /* %si: NUL-terminated text, to COM1 */
    lodsb
    test %al, %al
    jz 2f
    mov %al, %bl
    mov $0x3fd, %dx
1:  in %dx, %al
    test $0x20, %al
    jz 1b
    mov $0x3f8, %dx
    mov %bl, %al
    out %al, %dx
    jmp puts
2:  ret

boot_drive: .byte 0
greeting: .asciz "GREETING"
fail: .asciz "FAIL"
.org 510
.byte 0x55, 0xaa
"""


def _c_string(text: bytes) -> str:
    return text.decode().replace("\r", "\\r").replace("\n", "\\n")


def assemble_boot_sector() -> bytes:
    """The 512-byte MBR; needs `as` and `ld` (binutils)."""
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(tool)
    source = (SOURCE.replace('"GREETING"', f'"{_c_string(GREETING)}"')
              .replace('"FAIL"', f'"{_c_string(FAIL_TEXT)}"')
              .replace("$EXIT_VALUE", f"${EXIT_VALUE:#x}").replace("$FAIL_VALUE", f"${FAIL_VALUE:#x}"))
    with tempfile.TemporaryDirectory() as tmp:
        src, obj, out = (os.path.join(tmp, n) for n in ("mbr.S", "mbr.o", "mbr.bin"))
        with open(src, "w") as f:
            f.write(source)
        subprocess.run(["as", "--32", "-o", obj, src], check=True, capture_output=True)
        subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary", "-o", out, obj],
                       check=True, capture_output=True)
        with open(out, "rb") as f:
            data = f.read()
    if len(data) != 512 or data[510:] != b"\x55\xaa":
        raise AssertionError(f"boot sector is {len(data)} bytes, signature {data[510:]!r}")
    return data


def write_boot_disk(path: str, size: int = 1 << 20) -> None:
    """A raw image: the boot sector, then the text of the second sector, zeros after."""
    mbr = assemble_boot_sector()
    second = (SECOND_SECTOR_TEXT + b"\0").ljust(512, b"\0")
    with open(path, "wb") as f:
        f.write(mbr + second)
        f.truncate(size)
