"""Disk images: raw and qcow2 (read and write), vmdk and vdi (read-only) behind one
BlockDriver interface; every other format qemu-img knows is recognised and refused.

    drv = open_image("disk.qcow2")          # format probed by its magic (formats.py)
    n = drv.preadv([memoryview(buf)], 4096)  # straight into guest RAM slices
    drv.pwritev([...], off); drv.flush(); drv.close()

Opening locks the image as QEMU does (locking.py), so kvmpy and QEMU keep out of
each other's images; force_share=True (qemu-img -U) inspects a busy image read-only.
"""

from __future__ import annotations

import os

from ..errors import ImageError
from ..pathcheck import refuse_special_file
from .driver import BlockDriver
from .formats import probe_file, unreadable_message

__all__ = ["BlockDriver", "ImageError", "open_image", "probe_format", "readable_format", "FORMATS",
           "READ_ONLY_FORMATS"]

FORMATS = ("raw", "qcow2")
# Formats kvmpy reads but never writes: what cloud images and other hypervisors ship.
READ_ONLY_FORMATS = ("vmdk", "vdi")


def _refuse_non_image(path: str) -> None:
    """Before any open: a FIFO would block the open (and a read) forever, a character
    device or socket is no disk. A block device is a legitimate raw disk."""
    refuse_special_file(path, path, ImageError, allow_block_device=True)


def probe_format(path: str, with_tail: bool = True) -> str:
    """The image's format by its magic, as qemu-img probes it: "raw" when nothing
    matches; a name outside FORMATS for formats kvmpy recognises but does not read.
    with_tail=False leaves out the trailer probes (fixed VHD, dmg): a guest owns the
    last sector of its raw disk."""
    _refuse_non_image(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot open image: {e.strerror}") from None
    try:
        return probe_file(fd, with_tail=with_tail)
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read image: {e.strerror}") from None
    finally:
        os.close(fd)


def readable_format(path: str, format: str | None = None) -> str:
    """probe_format, refusing (one line naming the format) what kvmpy cannot read."""
    fmt = format or probe_format(path)
    if fmt not in FORMATS + READ_ONLY_FORMATS:
        raise ImageError(unreadable_message(path, fmt))
    return fmt


def open_image(path: str, format: str | None = None, read_only: bool = False,
               _chain: tuple = (), guard_probe: bool = False, force_share: bool = False,
               l2_cache_size: int | None = None, cache_clean_interval: float | None = None,
               cache: str | None = None) -> BlockDriver:
    """Open a disk image; format None probes it by its magic (see formats.py).

    guard_probe (for disks a guest writes to): when the format is probed, a raw
    image refuses writes that would make block 0 probe as another format, and a
    qcow2 image (and its backing chain) must name each backing file's format, so
    that neither a guest nor a planted header can make the VMM open a host file of
    its choosing. Raises ImageError naming the file for a missing file, an unknown
    format or a malformed image.

    The image and each file of its backing chain are locked as QEMU locks them
    (locking.py) for as long as the driver is open: a writer keeps everyone else
    from writing, a reader keeps writers away. force_share (qemu-img's -U) takes
    no locks and is for read-only opens only.

    l2_cache_size (bytes) and cache_clean_interval (seconds, 0 never) are QEMU's
    qcow2 options of the same names, with QEMU's defaults; a raw image has no
    tables to cache and ignores them.

    cache is QEMU's cache= mode of the image itself (direct.py: "none" and
    "directsync" open it O_DIRECT, "writethrough" and "directsync" O_DSYNC);
    None is "writeback". Backing files inherit O_DIRECT, as QEMU's cache.direct.
    """
    path = os.fspath(path)
    _refuse_non_image(path)
    if force_share and not read_only:
        raise ImageError(f"{path}: force-share (-U) is only for read-only opens")
    probed = format is None
    if probed:
        format = probe_format(path, with_tail=not guard_probe)
    elif not os.path.exists(path):
        raise ImageError(f"{path}: image file not found")
    if format == "raw":
        from .raw import RawDriver
        if os.path.isdir(path):
            raise ImageError(f"{path}: is a directory, not an image")
        return RawDriver(path, read_only=read_only, restrict_block0=guard_probe and probed,
                         force_share=force_share, cache=cache)
    if format == "qcow2":
        from .qcow2 import Qcow2Driver
        return Qcow2Driver(path, read_only=read_only, _chain=_chain,
                           require_backing_format=guard_probe and probed, force_share=force_share,
                           l2_cache_size=l2_cache_size, cache_clean_interval=cache_clean_interval,
                           cache=cache)
    if format == "vmdk":
        from .vmdk import VmdkDriver
        return VmdkDriver(path, read_only=read_only, force_share=force_share, cache=cache)
    if format == "vdi":
        from .vdi import VdiDriver
        return VdiDriver(path, read_only=read_only, force_share=force_share, cache=cache)
    if probed:
        raise ImageError(unreadable_message(path, format))
    raise ImageError(f"{path}: unknown image format {format!r} (supported: {', '.join(FORMATS)})")
