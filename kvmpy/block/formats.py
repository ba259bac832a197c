"""Which format an image file is, by its own bytes, as QEMU's probes decide.

kvmpy reads raw and qcow2. Every other format a user may hand it (a vmdk from a
cloud image, a VirtualBox vdi, a Hyper-V vhdx...) must be recognised and refused
by name: opened as raw it would "work" and give the guest (or `img convert`) the
container's bytes instead of the disk's, which is silent data corruption.
"""

from __future__ import annotations

import os
import struct

READABLE = ("raw", "qcow2")

# The first bytes QEMU reads to probe (BLOCK_PROBE_BUF_SIZE).
PROBE_SPAN = 2048

CLOOP_MAGIC = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
_VDI_SIGNATURE_OFFSET = 0x40
_VDI_SIGNATURE = struct.pack("<I", 0xBEDA107F)


def _vmdk_descriptor(head: bytes) -> bool:
    """A text descriptor (vmdk's "monolithicFlat", "twoGbMaxExtentSparse" ... forms).

    QEMU's rule: skipping blank lines and '#' comments, the first line that says
    anything is "version=1", "version=2" or "version=3"."""
    for line in head.split(b"\n"):
        line = line.strip(b" \t\r")
        if not line or line.startswith(b"#"):
            continue
        return line in (b"version=1", b"version=2", b"version=3")
    return False


def probe_head(head: bytes) -> str | None:
    """The format the first bytes of a file name, or None (raw) for none.

    This is what guards raw disks too: a guest write to block 0 that would make
    this return a format is refused (RawDriver.restrict_block0)."""
    if head[:4] == b"QFI\xfb" and len(head) >= 8:
        version = struct.unpack_from(">I", head, 4)[0]
        return "qcow" if version == 1 else "qcow2"
    if head[:4] == b"QED\x00":
        return "qed"
    if head[:4] in (b"KDMV", b"COWD"):
        return "vmdk"
    if head.startswith(b"# Disk DescriptorFile") or _vmdk_descriptor(head[:PROBE_SPAN]):
        return "vmdk"
    if head[:8] == b"conectix":
        return "vpc"
    if head[:8] == b"vhdxfile":
        return "vhdx"
    if head[:6] == b"LUKS\xba\xbe":
        return "luks"
    if head[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt"):
        return "parallels"
    if head.startswith(b"Bochs Virtual HD Image"):
        return "bochs"
    if head.startswith(CLOOP_MAGIC):
        return "cloop"
    if head[_VDI_SIGNATURE_OFFSET:_VDI_SIGNATURE_OFFSET + 4] == _VDI_SIGNATURE:
        return "vdi"
    return None


def probe_tail(tail: bytes) -> str | None:
    """Formats that put their identity at the end of the file: a fixed VHD (a raw
    disk followed by a 512-byte "conectix" footer) and Apple's dmg (a "koly"
    trailer). Only for images a user names; a guest writes the last sector of its
    own raw disk at will, so a VM's probed disk never looks here."""
    if len(tail) < 512:
        return None
    last = tail[-512:]
    if last[:8] == b"conectix":
        return "vpc"
    if last[:4] == b"koly" and struct.unpack_from(">II", last, 4) == (4, 512):
        return "dmg"
    return None


def probe_file(fd: int, with_tail: bool = True) -> str:
    head = os.pread(fd, PROBE_SPAN, 0)
    fmt = probe_head(head)
    if fmt is None and with_tail:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size >= 1024:
            fmt = probe_tail(os.pread(fd, 512, size - 512))
    return fmt or "raw"


def unreadable_message(path: str, fmt: str) -> str:
    return (f"{path}: a {fmt} image; kvmpy reads raw and qcow2 "
            f"(convert it with: qemu-img convert -O qcow2 {path} out.qcow2)")
