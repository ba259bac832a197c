"""What a Linux kernel is told about the screen when kvmpy loads it itself.

A BIOS leaves the VGA in text mode 3 and Linux reads that from boot_params'
screen_info; kvmpy boots Linux without a BIOS, so with a VGA in the machine it
writes the same description (80x25 colour text at 0xB8000, 16-line font): vgacon
then drives the screen (``console=tty0``). Without a VGA the zero page keeps
screen_info empty and Linux uses no VGA console.
"""

from __future__ import annotations

import struct

from ..memory import GuestMemory
from . import layout

SCREEN_INFO_SIZE = 0x40
LINUX_HEADER_MAGIC_OFFSET = 0x202     # "HdrS" in the zero page's setup header
VIDEO_MODE_TEXT_80X25 = 3
VIDEO_TYPE_VGA = 1                    # orig_video_isVGA for a VGA in text mode


def announce_vga_text(memory: GuestMemory, columns: int = 80, rows: int = 25) -> bool:
    """Describe VGA text mode in the zero page of a loaded bzImage; False (and no
    change) where the loaded kernel has no zero page (a PVH ELF)."""
    zero_page = layout.ZERO_PAGE_ADDR
    if memory.read(zero_page + LINUX_HEADER_MAGIC_OFFSET, 4) != b"HdrS":
        return False
    info = bytearray(SCREEN_INFO_SIZE)
    info[0] = 0                     # orig_x: the cursor at the top left
    info[1] = 0                     # orig_y
    info[6] = VIDEO_MODE_TEXT_80X25
    info[7] = columns
    struct.pack_into("<H", info, 0x0A, 0x0003)   # orig_video_ega_bx: not CGA (0x10)
    info[0x0E] = rows
    info[0x0F] = VIDEO_TYPE_VGA
    struct.pack_into("<H", info, 0x10, 16)       # orig_video_points: font height
    # ext_mem_k (bytes 2-3) is the loader's business; keep what it wrote.
    info[2:4] = memory.read(zero_page + 2, 2)
    memory.write(zero_page, bytes(info))
    return True
