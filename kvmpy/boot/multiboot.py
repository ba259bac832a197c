"""Multiboot (version 1) kernels, as QEMU's ``-kernel`` loads them: the header in the
first 8 KiB, the kernel placed by its a.out kludge fields or its ELF32 program
headers, the modules of ``-initrd "mod1 arg,mod2"`` page-aligned after the kernel
(each with its own command line, the module's whole spelling as QEMU gives it), and
the boot information structure: memory sizes, the e820 memory map, the command line
(the kernel's file name, a space, ``-append``'s text, as QEMU writes it), the modules
and the boot loader's name. The kernel starts as the specification says: EAX
0x2BADB002, EBX the information's address, 32-bit protected mode with flat segments,
paging and interrupts off.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import BootError
from ..hv.regs import Regs
from ..memory import GuestMemory
from . import layout
from .common import BootState, protected_mode_sregs, write_gdt32

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
HEADER_SEARCH = 8192

# header flags: bits 0-15 are requirements a loader must meet or refuse the kernel
FLAG_PAGE_ALIGN = 1 << 0           # modules on 4 KiB boundaries
FLAG_MEMORY_INFO = 1 << 1          # mem_lower/mem_upper (and the map) wanted
FLAG_VIDEO_MODE = 1 << 2           # a video mode: kvmpy has no display; ignored, as QEMU does
FLAG_AOUT_KLUDGE = 1 << 16         # load addresses in the header, not the ELF headers
KNOWN_REQUIREMENTS = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE

# boot information flags
INFO_MEMORY = 1 << 0
INFO_BOOT_DEVICE = 1 << 1
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_MMAP = 1 << 6
INFO_BOOT_LOADER_NAME = 1 << 9
INFO_SIZE = 88                     # up to and including the VBE fields (left zero)
NO_BOOT_DEVICE = 0xFFFFFFFF

# Where the information goes: the low pages PVH's start_info would use (a multiboot
# kernel gets no start_info), below the 1 MiB every kernel loads above.
INFO_ADDR = layout.PVH_START_INFO_ADDR            # 0x6000: the structure, then the loader name
LOADER_NAME_ADDR = INFO_ADDR + 0xC0
MMAP_ADDR = layout.PVH_MEMMAP_ADDR                # 0x6100: 24-byte entries, 64 at most
MODS_ADDR = layout.PVH_MODLIST_ADDR               # 0x6800: 16-byte entries
MAX_MODULES = (layout.ZERO_PAGE_ADDR - MODS_ADDR) // 16
STRINGS_ADDR = layout.CMDLINE_ADDR                # the command line, then each module's
STRINGS_SIZE = layout.CMDLINE_MAX
LOADER_NAME = b"kvmpy\0"
PAGE = 0x1000


@dataclass(frozen=True)
class MultibootHeader:
    """A multiboot (v1) header found in a kernel image: where it is and what it asks for."""

    offset: int
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


def find_header(image: bytes) -> MultibootHeader | None:
    """The multiboot header: 32-bit aligned in the first 8 KiB, its checksum right."""
    limit = min(len(image), HEADER_SEARCH) - 12
    offset = 0
    while offset <= limit:
        offset = image.find(struct.pack("<I", HEADER_MAGIC), offset, limit + 4)
        if offset < 0:
            return None
        if offset % 4 == 0:
            magic, flags, checksum = struct.unpack_from("<III", image, offset)
            if (magic + flags + checksum) & 0xFFFFFFFF == 0:
                if flags & FLAG_AOUT_KLUDGE and offset + 32 <= len(image):
                    return MultibootHeader(offset, flags, *struct.unpack_from("<5I", image, offset + 12))
                return MultibootHeader(offset, flags)
        offset += 1
    return None


def _load_aout(memory: GuestMemory, path: str, image: bytes, h: MultibootHeader) -> tuple[int, int]:
    """The a.out kludge: the file from the header's load_addr on, as the header places it."""
    if h.offset + 32 > len(image):
        raise BootError(f"kernel {path}: multiboot header truncated (the address fields are missing)")
    if not h.load_addr <= h.header_addr:
        raise BootError(f"kernel {path}: multiboot header_addr {h.header_addr:#x} is below load_addr "
                        f"{h.load_addr:#x}")
    file_start = h.offset - (h.header_addr - h.load_addr)
    if file_start < 0:
        raise BootError(f"kernel {path}: multiboot load_addr {h.load_addr:#x} lies before the file's start")
    if h.load_end_addr:
        if h.load_end_addr < h.load_addr:
            raise BootError(f"kernel {path}: multiboot load_end_addr {h.load_end_addr:#x} is below load_addr")
        size = h.load_end_addr - h.load_addr
        if file_start + size > len(image):
            raise BootError(f"kernel {path}: multiboot load_end_addr {h.load_end_addr:#x} lies past the "
                            "file's end")
    else:
        size = len(image) - file_start
    end = h.load_addr + size
    bss_end = h.bss_end_addr or end
    if bss_end < end:
        raise BootError(f"kernel {path}: multiboot bss_end_addr {h.bss_end_addr:#x} is below the image's end")
    _check_placement(memory, path, h.load_addr, bss_end - h.load_addr)
    memory.write(h.load_addr, image[file_start:file_start + size])
    memory.view(end, bss_end - end)[:] = bytes(bss_end - end)
    return h.entry_addr, bss_end


def _check_placement(memory: GuestMemory, path: str, addr: int, size: int) -> None:
    if addr < layout.HIGH_MEMORY:
        raise BootError(f"kernel {path}: multiboot image at {addr:#x} overlaps the boot area below 1 MiB")
    if addr + size > 1 << 32 or not memory.contains(addr, size):
        raise BootError(f"kernel {path}: multiboot image {addr:#x}+{size:#x} is outside guest RAM")


PT_LOAD = 1


def _load_elf32(memory: GuestMemory, path: str, image: bytes) -> tuple[int, int]:
    if len(image) < 52 or image[:4] != b"\x7fELF":
        raise BootError(f"kernel {path}: multiboot kernel without the a.out kludge must be an ELF file")
    if image[4] == 2:
        raise BootError(f"kernel {path}: a 64-bit ELF multiboot kernel (multiboot loads 32-bit ELF only; "
                        "set the a.out kludge flag or link it as elf32)")
    if image[4] != 1 or image[5] != 1:
        raise BootError(f"kernel {path}: multiboot ELF is not 32-bit little-endian")
    entry, = struct.unpack_from("<I", image, 0x18)
    phoff, = struct.unpack_from("<I", image, 0x1C)
    phentsize, phnum = struct.unpack_from("<HH", image, 0x2A)
    if phentsize < 32 or phnum > 256 or phoff + phnum * phentsize > len(image):
        raise BootError(f"kernel {path}: ELF program headers out of range (e_phoff {phoff:#x}, e_phnum {phnum})")
    end = 0
    physical_entry = None
    for i in range(phnum):
        ptype, offset, vaddr, paddr, filesz, memsz = struct.unpack_from("<6I", image, phoff + i * phentsize)
        if ptype != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz or offset + filesz > len(image):
            raise BootError(f"kernel {path}: program header {i} lies outside the file")
        _check_placement(memory, path, paddr, memsz)
        memory.write(paddr, image[offset:offset + filesz])
        memory.view(paddr + filesz, memsz - filesz)[:] = bytes(memsz - filesz)
        end = max(end, paddr + memsz)
        if vaddr <= entry < vaddr + memsz:      # a higher-half kernel's entry is virtual
            physical_entry = paddr + (entry - vaddr)
    if end == 0:
        raise BootError(f"kernel {path}: ELF has nothing to load")
    return (physical_entry if physical_entry is not None else entry), end


def load_multiboot(memory: GuestMemory, path: str, image: bytes, header: MultibootHeader, cmdline: str,
                   modules: list[tuple[str, str, bytes]], mem_size: int) -> BootState:
    """``modules``: (path, command line, contents) in order."""
    unknown = header.flags & 0xFFFF & ~KNOWN_REQUIREMENTS
    if unknown:
        raise BootError(f"kernel {path}: multiboot header asks for features kvmpy does not offer "
                        f"(flags {unknown:#x})")
    if header.flags & FLAG_AOUT_KLUDGE:
        entry, kernel_end = _load_aout(memory, path, image, header)
    else:
        entry, kernel_end = _load_elf32(memory, path, image)
    if len(modules) > MAX_MODULES:
        raise BootError(f"multiboot: {len(modules)} modules (-initrd), at most {MAX_MODULES}")

    strings = bytearray()

    def add_string(text: str, what: str) -> int:
        addr = STRINGS_ADDR + len(strings)
        strings.extend(text.encode() + b"\0")
        if len(strings) > STRINGS_SIZE:
            raise BootError(f"multiboot: the command lines ({what}) exceed {STRINGS_SIZE} bytes")
        return addr

    cmdline_addr = add_string(f"{path} {cmdline}", "-append")
    mod_addr = (kernel_end + PAGE - 1) & ~(PAGE - 1)
    # Modules follow the kernel in the RAM region it was loaded into (low memory has
    # holes: the VGA window and the BIOS area below 1 MiB, the PCI hole below 4 GiB).
    low_ram_end = min(next((r.end for r in memory.regions if r.gpa <= mod_addr < r.end), mod_addr), 1 << 32)
    mod_entries = bytearray()
    for mod_path, mod_cmdline, data in modules:
        if mod_addr + len(data) > low_ram_end:
            raise BootError(f"multiboot module {mod_path}: {len(data)} bytes do not fit in guest RAM after the "
                            f"kernel and the modules before it; give the guest more memory (-m)")
        memory.write(mod_addr, data)
        mod_entries += struct.pack("<IIII", mod_addr, mod_addr + len(data), add_string(mod_cmdline, mod_path), 0)
        mod_addr = (mod_addr + len(data) + PAGE - 1) & ~(PAGE - 1)
    memory.write(STRINGS_ADDR, bytes(strings))
    if mod_entries:
        memory.write(MODS_ADDR, bytes(mod_entries))

    e820 = layout.e820_map(mem_size)
    mmap = b"".join(struct.pack("<IQQI", 20, addr, size, kind) for addr, size, kind in e820)
    memory.write(MMAP_ADDR, mmap)
    memory.write(LOADER_NAME_ADDR, LOADER_NAME)

    below_4g = min(mem_size, layout.PCI_HOLE_START)
    info = bytearray(INFO_SIZE)
    struct.pack_into("<IIIIIII", info, 0,
                     INFO_MEMORY | INFO_BOOT_DEVICE | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_BOOT_LOADER_NAME,
                     layout.EBDA_START // 1024,       # below the EBDA, as the e820 map says
                     (below_4g - layout.HIGH_MEMORY) // 1024, NO_BOOT_DEVICE,
                     cmdline_addr, len(modules), MODS_ADDR)
    struct.pack_into("<II", info, 44, len(mmap), MMAP_ADDR)
    struct.pack_into("<I", info, 64, LOADER_NAME_ADDR)
    memory.write(INFO_ADDR, bytes(info))

    write_gdt32(memory)
    # ESP is undefined by the specification; a kernel that pushes before loading its own
    # stack finds usable memory there, as behind QEMU's option ROM.
    regs = Regs(rip=entry, rax=BOOTLOADER_MAGIC, rbx=INFO_ADDR, rsp=layout.BOOT_STACK_TOP, rflags=0x2)
    return BootState(regs=regs, sregs=protected_mode_sregs(), entry=entry, kernel_end=mod_addr,
                     notes=["multiboot" + (" a.out" if header.flags & FLAG_AOUT_KLUDGE else " elf")])
