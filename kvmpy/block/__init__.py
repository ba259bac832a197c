"""Disk images: raw and qcow2 behind one BlockDriver interface.

    drv = open_image("disk.qcow2")          # format probed: qcow2 magic, else raw
    n = drv.preadv([memoryview(buf)], 4096)  # straight into guest RAM slices
    drv.pwritev([...], off); drv.flush(); drv.close()
"""

from __future__ import annotations

import os

from ..errors import ImageError
from ..pathcheck import refuse_special_file
from .driver import BlockDriver

__all__ = ["BlockDriver", "ImageError", "open_image", "probe_format", "FORMATS"]

FORMATS = ("raw", "qcow2")
QCOW2_MAGIC = b"QFI\xfb"


def _refuse_non_image(path: str) -> None:
    """Before any open: a FIFO would block the open (and a read) forever, a character
    device or socket is no disk. A block device is a legitimate raw disk."""
    refuse_special_file(path, path, ImageError, allow_block_device=True)


def probe_format(path: str) -> str:
    _refuse_non_image(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise ImageError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot open image: {e.strerror}") from None
    return "qcow2" if head == QCOW2_MAGIC else "raw"


def open_image(path: str, format: str | None = None, read_only: bool = False,
               _chain: tuple = (), guard_probe: bool = False) -> BlockDriver:
    """Open a disk image; format None probes (qcow2 magic, else raw).

    guard_probe (for disks a guest writes to): when the format is probed, a raw
    image refuses writes that would make block 0 probe as another format, and a
    qcow2 image (and its backing chain) must name each backing file's format, so
    that neither a guest nor a planted header can make the VMM open a host file of
    its choosing. Raises ImageError naming the file for a missing file, an unknown
    format or a malformed image.
    """
    path = os.fspath(path)
    _refuse_non_image(path)
    probed = format is None
    if probed:
        format = probe_format(path)
    elif not os.path.exists(path):
        raise ImageError(f"{path}: image file not found")
    if format == "raw":
        from .raw import RawDriver
        if os.path.isdir(path):
            raise ImageError(f"{path}: is a directory, not an image")
        return RawDriver(path, read_only=read_only, restrict_block0=guard_probe and probed)
    if format == "qcow2":
        from .qcow2 import Qcow2Driver
        return Qcow2Driver(path, read_only=read_only, _chain=_chain,
                           require_backing_format=guard_probe and probed)
    raise ImageError(f"{path}: unknown image format {format!r} (supported: {', '.join(FORMATS)})")
