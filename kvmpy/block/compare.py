"""`kvmpy img compare` and `kvmpy img measure`, with qemu-img's output and exit codes.

compare: 0 identical, 1 different, 2 an image cannot be opened, 3 the allocation of
a range cannot be read, 4 data cannot be read. Contents are compared as the guest
sees them (through backing chains); sizes may differ when the larger image's extra
area reads as zeroes, unless -s (strict: sizes and allocation must match too).

measure: the file size a conversion to qcow2 or raw needs, by qemu-img's formula
(qcow2_calc_prealloc_size and qcow2_measure in QEMU 7.2), so that both tools agree
on the byte.
"""

from __future__ import annotations

import json
import os
import sys

from ..errors import ImageError, UserError
from . import FORMATS, READ_ONLY_FORMATS, open_image, readable_format
from .options import parse_options, parse_size
from .raw import RawDriver

SECTOR = 512
IO_BUF_SIZE = 2 << 20


class ChainStatus:
    """How a run of guest bytes reads, as QEMU's block status above the whole chain.

    allocated: some image of the chain decides the content (a raw file always does);
    zero: it reads as zeroes without reading data; data: it is stored data;
    offset_valid: it lies uncompressed at a known place of a file (strict compare
    tells a compressed grain from a plain one by this, as qemu-img does)."""
    __slots__ = ("allocated", "zero", "data", "offset_valid")

    def __init__(self, allocated: bool, zero: bool, data: bool, offset_valid: bool = True):
        self.allocated, self.zero, self.data, self.offset_valid = allocated, zero, data, offset_valid

    def key(self):
        return self.allocated, self.zero, self.data, self.offset_valid


def chain_status(drv, off: int, length: int) -> tuple[ChainStatus, int]:
    if isinstance(drv, RawDriver):
        data, zero, run = drv.block_status(off, length)
        return ChainStatus(True, not data, data), max(1, min(run, length))
    from .qcow2_format import COMPRESSED, DATA, ZERO
    kind, host, run = drv.host_mapping(off, length)
    run = max(1, min(run, length))
    if kind == DATA:
        if drv.holes_are_zero:
            # As QEMU asks the file under a preallocated format (a static vdi): stored
            # data over a hole of the file reads as zeroes too.
            hole, run = file_hole(drv.fd, host, run)
            return ChainStatus(True, hole, True), run
        return ChainStatus(True, False, True), run
    if kind == COMPRESSED:
        return ChainStatus(True, False, True, offset_valid=False), run
    if kind == ZERO:
        return ChainStatus(True, True, False, offset_valid=bool(host)), run
    b = drv.backing
    if b is None or off >= b.size:
        return ChainStatus(False, True, False, offset_valid=False), run
    return chain_status(b, off, min(run, b.size - off))


def file_hole(fd: int, host: int, run: int) -> tuple[bool, int]:
    """(whether [host, host+run) starts in a hole of the file, how far that lasts)."""
    try:
        data = os.lseek(fd, host, os.SEEK_DATA)
    except OSError:
        return True, run            # ENXIO: only a hole from here to the end
    if data > host:
        return True, min(run, data - host)
    try:
        hole = os.lseek(fd, host, os.SEEK_HOLE)
    except OSError:
        return False, run
    return False, max(1, min(run, hole - host))


# ------------------------------------------------------------------ compare

class _CompareError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _read(drv, off: int, n: int, name: str) -> bytes:
    try:
        return drv.pread(n, off)
    except (OSError, ImageError) as e:
        raise _CompareError(4, f"Error while reading offset {off} of {name}: {e}") from None


def _status(drv, off: int, n: int, name: str):
    try:
        return chain_status(drv, off, n)
    except (OSError, ImageError) as e:
        raise _CompareError(3, f"Sector allocation test failed for {name}: {e}") from None


def _first_nonzero_sector(buf: bytes) -> int:
    """Offset of the first 512-byte sector holding a non-zero byte, or -1."""
    stripped = buf.lstrip(b"\0")
    if not stripped:
        return -1
    return (len(buf) - len(stripped)) // SECTOR * SECTOR


def _first_different_sector(a: bytes, b: bytes) -> int:
    if a == b:
        return -1
    lo, hi = 0, len(a)
    # Bisect to the first differing byte: bytes compare in C, never a Python loop per byte.
    while hi - lo > SECTOR:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i // SECTOR * SECTOR
    return -1


def compare_images(drv1, drv2, name1: str, name2: str, strict: bool, say) -> int:
    """qemu-img compare's walk; say(line) prints unless quiet. Returns the exit status."""
    size1, size2 = drv1.size, drv2.size
    if size1 != size2 and strict:
        say("Strict mode: Image size mismatch!")
        return 1
    common = min(size1, size2)
    off = 0
    while off < common:
        n = min(common - off, IO_BUF_SIZE)
        st1, run1 = _status(drv1, off, n, name1)
        st2, run2 = _status(drv2, off, n, name2)
        chunk = min(run1, run2)
        if strict and st1.key() != st2.key():
            say(f"Strict mode: Offset {off} block status mismatch!")
            return 1
        if st1.zero and st2.zero:
            pass
        elif st1.allocated == st2.allocated:
            if st1.allocated:
                idx = _first_different_sector(_read(drv1, off, chunk, name1), _read(drv2, off, chunk, name2))
                if idx >= 0:
                    say(f"Content mismatch at offset {off + idx}!")
                    return 1
        else:
            drv, name = (drv1, name1) if st1.allocated else (drv2, name2)
            idx = _first_nonzero_sector(_read(drv, off, chunk, name))
            if idx >= 0:
                say(f"Content mismatch at offset {off + idx}!")
                return 1
        off += chunk
    if size1 != size2:
        # qemu-img warns only once the common part compared equal
        say("Warning: Image size mismatch!")
        drv, name, end = (drv1, name1, size1) if size1 > size2 else (drv2, name2, size2)
        while off < end:
            n = min(end - off, IO_BUF_SIZE)
            st, run = _status(drv, off, n, name)
            if not st.zero:
                idx = _first_nonzero_sector(_read(drv, off, run, name))
                if idx >= 0:
                    say(f"Content mismatch at offset {off + idx}!")
                    return 1
            off += run
    say("Images are identical.")
    return 0


def cmd_compare(args) -> int:
    def say(line):
        if not args.quiet:
            print(line)

    drivers = []
    try:
        for name, fmt in ((args.image1, args.format1), (args.image2, args.format2)):
            try:
                if fmt is not None and fmt not in FORMATS + READ_ONLY_FORMATS:
                    raise ImageError(f"{name}: unknown image format {fmt!r}")
                drivers.append(open_image(name, readable_format(name, fmt), read_only=True,
                                          force_share=args.force_share))
            except UserError as e:
                print(f"kvmpy img compare: {e}", file=sys.stderr)
                return 2
        try:
            return compare_images(drivers[0], drivers[1], args.image1, args.image2, args.strict, say)
        except _CompareError as e:
            print(f"kvmpy img compare: {e}", file=sys.stderr)
            return e.status
    finally:
        for d in drivers:
            d.close()


# ------------------------------------------------------------------ measure

REFTABLE_ENTRY = 8
L1E_SIZE = 8
MAX_L1_BYTES = 32 << 20


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount table and blocks that count ``clusters`` and themselves:
    the fixed point where adding them needs no further block or table cluster."""
    per_table_cluster = cluster_size // REFTABLE_ENTRY
    per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return (blocks + table) * cluster_size


def qcow2_full_size(virtual_size: int, cluster_size: int, refcount_order: int, extended_l2: bool) -> int:
    """The file size of a fully allocated qcow2 image: every table and data cluster."""
    aligned = _round_up(virtual_size, cluster_size)
    l2e = 16 if extended_l2 else 8
    meta = cluster_size                                        # header
    nl2e = _round_up(aligned // cluster_size, cluster_size // l2e)
    meta += nl2e * l2e                                         # L2 tables
    nl1e = _round_up(nl2e * l2e // cluster_size, cluster_size // L1E_SIZE)
    meta += nl1e * L1E_SIZE                                    # L1 table
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size, refcount_order)
    return meta + aligned


def _data_bytes(drv, cluster_size: int) -> int:
    """Bytes of whole clusters holding data in a conversion of ``drv`` (zeroes skipped)."""
    required = 0
    off, size = 0, drv.size
    while off < size:
        st, run = chain_status(drv, off, size - off)
        if st.zero:
            off += run
            continue
        if st.allocated and st.data:
            run = _round_up(off + run, cluster_size) - off     # the rest of the last cluster
            required += off % cluster_size + run
        off += run
    return required


def measure(out_fmt: str, opts: dict, size: int | None = None, drv=None) -> dict:
    opts = dict(opts)
    if out_fmt == "raw":
        opts.pop("preallocation", None)
        if opts:
            raise UserError(f"measure: unknown option(s) for raw: {', '.join(opts)}")
        n = drv.size if drv is not None else _round_up(size, SECTOR)
        return {"required": n, "fully-allocated": n}
    cluster_size = parse_size(opts.pop("cluster_size", "65536"), "cluster_size")
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= (2 << 20):
        raise UserError("measure: cluster_size must be a power of two between 512 and 2048k")
    refcount_bits = int(opts.pop("refcount_bits", "16") or 0)
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise UserError("measure: refcount_bits must be a power of two up to 64")
    compat = opts.pop("compat", "1.1")
    version = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}.get(compat)
    if version is None:
        raise UserError(f"measure: invalid compat={compat} (0.10 or 1.1)")
    extended_l2 = opts.pop("extended_l2", "off") in ("on", "true", "yes")
    prealloc = opts.pop("preallocation", "off")
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise UserError(f"measure: preallocation={prealloc} unsupported (off, metadata, falloc, full)")
    has_backing = bool(opts.pop("backing_file", None))
    opts.pop("backing_fmt", None)
    opts.pop("lazy_refcounts", None)
    opts.pop("compression_type", None)
    if opts:
        raise UserError(f"measure: unknown option(s) for qcow2: {', '.join(opts)}")
    virtual = _round_up(drv.size if drv is not None else size, cluster_size)
    l2e = 16 if extended_l2 else 8
    if -(-(virtual // cluster_size) // (cluster_size // l2e)) * L1E_SIZE > MAX_L1_BYTES:
        raise UserError("measure: the image size is too large (try using a larger cluster size)")
    required = 0
    if drv is not None:
        required = virtual if has_backing else _data_bytes(drv, cluster_size)
    if prealloc in ("falloc", "full"):
        required = virtual
    full = qcow2_full_size(virtual, cluster_size, refcount_bits.bit_length() - 1, extended_l2)
    out = {"required": full - virtual + required, "fully-allocated": full}
    # qemu-img names the bitmaps when both ends could carry persistent ones.
    if version >= 3 and drv is not None and drv.format == "qcow2":
        out = {"bitmaps": 0, **out}
    return out


def cmd_measure(args) -> int:
    out_fmt = args.output_format or "raw"
    if out_fmt not in ("raw", "qcow2"):
        raise UserError(f"measure: unsupported output format {out_fmt!r} (raw, qcow2)")
    if args.size is not None and args.filename:
        raise UserError("measure: --size N cannot be used together with a filename")
    if args.size is None and not args.filename:
        raise UserError("measure: either --size N or one filename must be specified")
    opts = parse_options(args.options)
    if args.filename:
        fmt = args.format
        if fmt is not None and fmt not in FORMATS + READ_ONLY_FORMATS:
            raise UserError(f"unknown image format {fmt!r} (supported: {', '.join(FORMATS + READ_ONLY_FORMATS)})")
        with open_image(args.filename, readable_format(args.filename, fmt), read_only=True,
                        force_share=args.force_share) as drv:
            res = measure(out_fmt, opts, drv=drv)
    else:
        res = measure(out_fmt, opts, size=parse_size(args.size))
    if args.output == "json":
        print(json.dumps(res, indent=4))
    else:
        print(f"required size: {res['required']}")
        print(f"fully allocated size: {res['fully-allocated']}")
        if "bitmaps" in res:
            print(f"bitmaps size: {res['bitmaps']}")
    return 0


def register(add) -> None:
    """Adds compare and measure through imgcli's ``add(name, handler, help)``."""
    p = add("compare", cmd_compare, "compare two images' contents")
    p.add_argument("-f", dest="format1")
    p.add_argument("-F", dest="format2")
    p.add_argument("-s", dest="strict", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-p", dest="progress", action="store_true", help="accepted for compatibility")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true")
    p.add_argument("image1")
    p.add_argument("image2")

    p = add("measure", cmd_measure, "the file size a conversion needs")
    p.add_argument("--size")
    p.add_argument("-f", dest="format")
    p.add_argument("-O", dest="output_format")
    p.add_argument("-o", dest="options", action="append")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true")
    p.add_argument("filename", nargs="?")
