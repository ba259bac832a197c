"""Direct kernel boot: the Linux x86 boot protocol (bzImage) and PVH ELF kernels.

``load_kernel`` looks at the file, loads it, its initrd and command line into guest
RAM, writes the boot structures (zero page / hvm_start_info, e820, GDT, page
tables) and returns the bootstrap vCPU's initial state.
"""

from __future__ import annotations

import os
import stat
import struct

from ..errors import BootError, GuestMemoryError
from ..memory import GuestMemory
from ..hv.regs import Regs
from . import layout
from .common import (BootState, long_mode_sregs, place_initrd, protected_mode_sregs,
                     write_cmdline, write_gdt, write_gdt32, write_identity_page_tables)
from .multiboot import HEADER_SEARCH, find_header, load_multiboot

XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
PT_LOAD = 1
PT_NOTE = 4

# struct setup_header offsets within the first sector(s) of a bzImage
HDR_SETUP_SECTS = 0x1F1
HDR_VID_MODE = 0x1FA
HDR_BOOT_FLAG = 0x1FE
HDR_JUMP = 0x200
HDR_MAGIC = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
HDR_INITRD_ADDR_MAX = 0x22C
HDR_XLOADFLAGS = 0x236
HDR_CMDLINE_SIZE = 0x238
HDR_INIT_SIZE = 0x260
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128
XLF_KERNEL_64 = 1 << 0
LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
# A bzImage's real-mode part: the boot sector and up to 255 setup sectors. Only this
# much of a regular file is read into Python; the protected-mode kernel after it
# (megabytes) is read straight into guest RAM.
BZIMAGE_SETUP_MAX = (1 + 255) * 512


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BootError(f"{what} {path}: {e.strerror}") from None


class BootFiles:
    """The kernel and initrd held open for the machine's life: every reset loads
    them again from the same files (QEMU likewise keeps its -kernel and -initrd
    blobs), also once the process may open nothing (kvmpy.sandbox)."""

    def __init__(self, kernel_path: str, initrd_path: str | None = None,
                 modules: list[tuple[str, str]] | tuple = ()) -> None:
        self.kernel_path, self.initrd_path = kernel_path, initrd_path
        self.modules = list(modules)        # a multiboot kernel's (path, command line)
        self._fds: dict[str, int] = {}
        try:
            self._fds["kernel"] = self._open(kernel_path, "kernel")
            if initrd_path:
                self._fds["initrd"] = self._open(initrd_path, "initrd")
            for i, (path, _) in enumerate(self.modules):
                self._fds[f"module{i}"] = self._open(path, "multiboot module")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _open(path: str, what: str) -> int:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise BootError(f"{what} {path}: {e.strerror}") from None

    def read(self, what: str, limit: int | None = None) -> bytes | None:
        """The whole file as it is now (``what``: "kernel" or "initrd"), or its first
        ``limit`` bytes; None if not given."""
        fd = self._fds.get(what)
        if fd is None:
            return None
        chunks, offset = [], 0
        try:
            while limit is None or offset < limit:
                chunk = os.pread(fd, 1 << 24 if limit is None else min(1 << 24, limit - offset), offset)
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
        except OSError as e:
            raise BootError(f"{what} {self._path(what)}: {e.strerror}") from None
        return b"".join(chunks)

    def regular_size(self, what: str) -> int | None:
        """The size of ``what`` now when it is a regular file; None for anything else
        (a block device's size is not st_size)."""
        try:
            st = os.fstat(self._fds[what])
        except OSError as e:
            raise BootError(f"{what} {self._path(what)}: {e.strerror}") from None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def read_into(self, what: str, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the file's bytes from ``offset`` on, read straight into it."""
        done = 0
        try:
            while done < len(view):
                n = os.preadv(self._fds[what], [view[done:]], offset + done)
                if n == 0:
                    raise BootError(f"{what} {self._path(what)}: shorter than it was a moment ago "
                                    "(changed while being loaded)")
                done += n
        except OSError as e:
            raise BootError(f"{what} {self._path(what)}: {e.strerror}") from None

    def _path(self, what: str) -> str:
        return {"kernel": self.kernel_path, "initrd": self.initrd_path}.get(what, what)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _UnreadFile:
    """An initrd of BootFiles not read yet: its size, for placing it, and its bytes read
    straight into guest RAM where it is placed (a distribution's initrd is tens of MiB)."""

    def __init__(self, files: BootFiles, what: str, size: int) -> None:
        self.files, self.what, self.size = files, what, size

    def __len__(self) -> int:
        return self.size

    def load(self, memory: GuestMemory, gpa: int) -> None:
        self.files.read_into(self.what, 0, memory.view(gpa, self.size))


def _write(memory: GuestMemory, gpa: int, data: bytes | _UnreadFile) -> None:
    if isinstance(data, _UnreadFile):
        data.load(memory, gpa)
    else:
        memory.write(gpa, data)


def load_kernel(memory: GuestMemory, kernel_path: str, cmdline: str = "",
                initrd_path: str | None = None, rsdp_addr: int = 0,
                mem_size: int | None = None, files: BootFiles | None = None,
                modules: list[tuple[str, str]] | tuple = ()) -> BootState:
    """``files``: read the kernel, initrd and modules through these instead of opening the paths.
    ``modules``: a multiboot kernel's (path, command line), QEMU's ``-initrd "a arg,b"``."""
    payload_source = None
    if files is not None:
        modules = modules or files.modules
        size = files.regular_size("kernel") if not modules else None
        image = files.read("kernel", BZIMAGE_SETUP_MAX) if size is not None else None
        if image is not None and size > len(image) and _plain_bzimage(image):
            payload_source = files
        else:
            image = files.read("kernel")
        initrd_size = files.regular_size("initrd") if files.initrd_path else None
        initrd = _UnreadFile(files, "initrd", initrd_size) if initrd_size is not None else files.read("initrd")
        module_data = [files.read(f"module{i}") or b"" for i in range(len(modules))]
    else:
        image = _read_file(kernel_path, "kernel")
        initrd = _read_file(initrd_path, "initrd") if initrd_path else None
        module_data = [_read_file(path, "multiboot module") for path, _ in modules]
    mem_size = mem_size if mem_size is not None else memory.total_size
    try:
        is_linux = len(image) > HDR_MAGIC + 4 and image[HDR_MAGIC:HDR_MAGIC + 4] == b"HdrS"
        # As QEMU: a multiboot header wins over the ELF's PVH note (a multiboot kernel may be ELF).
        header = None if is_linux else find_header(image)
        if header is not None:
            if isinstance(initrd, _UnreadFile):     # a multiboot module is handed over as bytes
                initrd = files.read("initrd")
            if initrd is not None and not modules:    # kvmpy's --initrd: one module, named by its path
                modules, module_data = [(initrd_path, initrd_path)], [initrd]
            return load_multiboot(memory, kernel_path, image, header, cmdline,
                                  [(path, text, data) for (path, text), data in zip(modules, module_data)],
                                  mem_size)
        if modules:
            raise BootError(f"kernel {kernel_path}: multiboot modules (-initrd a,b) for a kernel that is not "
                            "multiboot")
        if image[:4] == b"\x7fELF":
            return _load_pvh(memory, kernel_path, image, cmdline, initrd_path, initrd, rsdp_addr, mem_size)
        if len(image) > HDR_MAGIC + 4 and image[HDR_MAGIC:HDR_MAGIC + 4] == b"HdrS":
            return _load_bzimage(memory, kernel_path, image, cmdline, initrd_path, initrd, rsdp_addr, mem_size,
                                 payload_source)
    except GuestMemoryError as e:
        raise BootError(f"kernel {kernel_path}: does not fit in guest RAM ({e})") from None
    except (struct.error, IndexError) as e:
        raise BootError(f"kernel {kernel_path}: truncated or malformed header ({e})") from None
    raise BootError(f"kernel {kernel_path}: neither a bzImage (no 'HdrS' at offset 0x202) "
                    f"nor an ELF kernel (no ELF magic)")


# --- PVH ---------------------------------------------------------------------

def _elf_segments(path: str, image: bytes):
    if len(image) < 64:
        raise BootError(f"kernel {path}: ELF header truncated")
    ei_class = image[4]
    if image[5] != 1:
        raise BootError(f"kernel {path}: ELF is not little-endian")
    if ei_class == 2:
        e_phoff, = struct.unpack_from("<Q", image, 0x20)
        e_phentsize, e_phnum = struct.unpack_from("<HH", image, 0x36)
        fmt, fields = "<IIQQQQQQ", ("type", "flags", "offset", "vaddr", "paddr", "filesz", "memsz", "align")
    elif ei_class == 1:
        e_phoff, = struct.unpack_from("<I", image, 0x1C)
        e_phentsize, e_phnum = struct.unpack_from("<HH", image, 0x2A)
        fmt, fields = "<IIIIIIII", ("type", "offset", "vaddr", "paddr", "filesz", "memsz", "flags", "align")
    else:
        raise BootError(f"kernel {path}: unknown ELF class {ei_class}")
    size = struct.calcsize(fmt)
    if e_phentsize < size or e_phnum > 256 or e_phoff + e_phnum * e_phentsize > len(image):
        raise BootError(f"kernel {path}: ELF program headers out of range (e_phoff {e_phoff:#x}, e_phnum {e_phnum})")
    for i in range(e_phnum):
        ph = dict(zip(fields, struct.unpack_from(fmt, image, e_phoff + i * e_phentsize)))
        if ph["offset"] + ph["filesz"] > len(image) or ph["filesz"] > ph["memsz"]:
            raise BootError(f"kernel {path}: program header {i} lies outside the file")
        yield ph


def _pvh_entry(path: str, image: bytes, segments) -> int | None:
    for ph in segments:
        if ph["type"] != PT_NOTE:
            continue
        off, end = ph["offset"], ph["offset"] + ph["filesz"]
        while off + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", image, off)
            name_off = off + 12
            desc_off = name_off + ((namesz + 3) & ~3)
            nxt = desc_off + ((descsz + 3) & ~3)
            if nxt > end:
                break
            name = image[name_off:name_off + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and descsz in (4, 8):
                return struct.unpack_from("<I" if descsz == 4 else "<Q", image, desc_off)[0]
            off = nxt
    return None


def _load_pvh(memory, path, image, cmdline, initrd_path, initrd, rsdp_addr, mem_size) -> BootState:
    segments = list(_elf_segments(path, image))
    entry = _pvh_entry(path, image, segments)
    if entry is None:
        raise BootError(f"kernel {path}: ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); "
                        "build the kernel with CONFIG_PVH=y or pass a bzImage")
    kernel_end = layout.HIGH_MEMORY
    for ph in segments:
        if ph["type"] != PT_LOAD or ph["memsz"] == 0:
            continue
        paddr = ph["paddr"]
        if paddr < layout.HIGH_MEMORY:
            raise BootError(f"kernel {path}: segment at {paddr:#x} overlaps the boot area below 1 MiB")
        if not memory.contains(paddr, ph["memsz"]):
            raise BootError(f"kernel {path}: segment {paddr:#x}+{ph['memsz']:#x} is outside guest RAM")
        memory.write(paddr, image[ph["offset"]:ph["offset"] + ph["filesz"]])
        memory.view(paddr + ph["filesz"], ph["memsz"] - ph["filesz"])[:] = bytes(ph["memsz"] - ph["filesz"])
        kernel_end = max(kernel_end, paddr + ph["memsz"])

    write_gdt32(memory)
    cmd_addr = write_cmdline(memory, cmdline)
    nr_modules = 0
    if initrd is not None:
        addr = place_initrd(memory, len(initrd), (kernel_end + 0xFFF) & ~0xFFF, 0xFFFFFFFF, f"initrd {initrd_path}")
        _write(memory, addr, initrd)
        memory.write(layout.PVH_MODLIST_ADDR, struct.pack("<QQQQ", addr, len(initrd), 0, 0))
        nr_modules = 1
    e820 = layout.e820_map(mem_size)
    memory.write(layout.PVH_MEMMAP_ADDR, b"".join(struct.pack("<QQII", a, s, t, 0) for a, s, t in e820))
    start_info = struct.pack("<IIIIQQQQII", HVM_START_MAGIC, 1, 0, nr_modules,
                             layout.PVH_MODLIST_ADDR if nr_modules else 0, cmd_addr, rsdp_addr,
                             layout.PVH_MEMMAP_ADDR, len(e820), 0)
    memory.write(layout.PVH_START_INFO_ADDR, start_info)
    regs = Regs(rip=entry, rbx=layout.PVH_START_INFO_ADDR, rflags=0x2)
    return BootState(regs=regs, sregs=protected_mode_sregs(), entry=entry, kernel_end=kernel_end,
                     notes=["pvh"])


# --- bzImage -------------------------------------------------------------------

def _plain_bzimage(head: bytes) -> bool:
    """Whether load_kernel would take a file starting with ``head`` for a bzImage (an ELF
    with a bzImage's magic is loaded as the ELF)."""
    return head[:4] != b"\x7fELF" and len(head) > HDR_MAGIC + 4 and head[HDR_MAGIC:HDR_MAGIC + 4] == b"HdrS"


def _load_bzimage(memory, path, image, cmdline, initrd_path, initrd, rsdp_addr, mem_size,
                  payload_source: BootFiles | None = None) -> BootState:
    """``image``: the whole file; or, with ``payload_source``, only its first
    BZIMAGE_SETUP_MAX bytes, the rest read from there straight into guest RAM."""
    version, = struct.unpack_from("<H", image, HDR_VERSION)
    if version < 0x20C:
        raise BootError(f"kernel {path}: boot protocol {version >> 8}.{version & 0xFF} is too old "
                        "(kvmpy needs 2.12+ for the 64-bit entry)")
    xloadflags, = struct.unpack_from("<H", image, HDR_XLOADFLAGS)
    if not xloadflags & XLF_KERNEL_64:
        raise BootError(f"kernel {path}: bzImage has no 64-bit entry point (xloadflags {xloadflags:#x})")
    if not image[HDR_LOADFLAGS] & LOADED_HIGH:
        raise BootError(f"kernel {path}: zImage (not loaded high) kernels are not supported")
    setup_sects = image[HDR_SETUP_SECTS] or 4
    kernel_off = (setup_sects + 1) * 512
    file_size = payload_source.regular_size("kernel") if payload_source is not None else len(image)
    if file_size is None or kernel_off >= file_size:
        raise BootError(f"kernel {path}: setup_sects {setup_sects} points past the end of the file")
    payload_size = file_size - kernel_off
    init_size, = struct.unpack_from("<I", image, HDR_INIT_SIZE)
    load_addr = layout.HIGH_MEMORY
    kernel_end = load_addr + max(payload_size, init_size)
    if not memory.contains(load_addr, kernel_end - load_addr):
        raise BootError(f"kernel {path}: needs {kernel_end - load_addr} bytes at 1 MiB, more than guest RAM")
    if payload_source is not None:
        payload_source.read_into("kernel", kernel_off, memory.view(load_addr, payload_size))
    else:
        memory.write(load_addr, memoryview(image)[kernel_off:])   # a view: the kernel is megabytes

    header_end = HDR_JUMP + 2 + image[HDR_JUMP + 1]
    zero_page = bytearray(4096)
    zero_page[HDR_SETUP_SECTS:header_end] = image[HDR_SETUP_SECTS:header_end]
    struct.pack_into("<H", zero_page, HDR_VID_MODE, 0xFFFF)
    zero_page[HDR_TYPE_OF_LOADER] = 0xFF
    zero_page[HDR_LOADFLAGS] |= CAN_USE_HEAP
    struct.pack_into("<H", zero_page, HDR_HEAP_END_PTR, 0xFE00)

    cmdline_size, = struct.unpack_from("<I", image, HDR_CMDLINE_SIZE)
    cmd_addr = write_cmdline(memory, cmdline, min(cmdline_size + 1, layout.CMDLINE_MAX))
    struct.pack_into("<I", zero_page, HDR_CMD_LINE_PTR, cmd_addr)
    struct.pack_into("<I", zero_page, BP_EXT_CMD_LINE_PTR, 0)

    if initrd is not None:
        initrd_max, = struct.unpack_from("<I", image, HDR_INITRD_ADDR_MAX)
        addr = place_initrd(memory, len(initrd), (kernel_end + 0xFFF) & ~0xFFF, initrd_max or 0x37FFFFFF,
                            f"initrd {initrd_path}")
        _write(memory, addr, initrd)
        struct.pack_into("<I", zero_page, HDR_RAMDISK_IMAGE, addr & 0xFFFFFFFF)
        struct.pack_into("<I", zero_page, HDR_RAMDISK_SIZE, len(initrd) & 0xFFFFFFFF)
        struct.pack_into("<I", zero_page, BP_EXT_RAMDISK_IMAGE, addr >> 32)
        struct.pack_into("<I", zero_page, BP_EXT_RAMDISK_SIZE, len(initrd) >> 32)

    e820 = layout.e820_map(mem_size)[:E820_MAX_ENTRIES_ZEROPAGE]
    zero_page[BP_E820_ENTRIES] = len(e820)
    for i, (a, s, t) in enumerate(e820):
        struct.pack_into("<QQI", zero_page, BP_E820_TABLE + 20 * i, a, s, t)
    if version >= 0x20E:
        struct.pack_into("<Q", zero_page, BP_ACPI_RSDP_ADDR, rsdp_addr)
    memory.write(layout.ZERO_PAGE_ADDR, zero_page)

    write_gdt(memory)
    write_identity_page_tables(memory)
    regs = Regs(rip=load_addr + 0x200, rsi=layout.ZERO_PAGE_ADDR, rsp=layout.BOOT_STACK_TOP,
                rbp=layout.BOOT_STACK_TOP, rflags=0x2)
    return BootState(regs=regs, sregs=long_mode_sregs(), entry=regs.rip, kernel_end=kernel_end,
                     notes=[f"bzimage protocol {version >> 8}.{version & 0xFF}"])


def kernel_kind(path: str) -> str:
    """'pvh', 'bzimage', 'multiboot' or 'unknown' without loading anything (for messages and tests)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_SEARCH)
    except OSError:
        return "unknown"
    if head[HDR_MAGIC:HDR_MAGIC + 4] != b"HdrS" and find_header(head) is not None:
        return "multiboot"
    if head[:4] == b"\x7fELF":
        return "pvh"
    if head[HDR_MAGIC:HDR_MAGIC + 4] == b"HdrS":
        return "bzimage"
    return "unknown"


__all__ = ["load_kernel", "kernel_kind", "BootState"]
