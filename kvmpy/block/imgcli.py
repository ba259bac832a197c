"""`kvmpy img`: qemu-img's everyday jobs with qemu-img's spelling.

create, info, check, resize, rebase, convert (-c -p -n -B -S), commit, map, snapshot (-l -c -a -d).
Bad input (options, sizes, images) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys

from ..errors import ImageError, UserError
from . import READ_ONLY_FORMATS, compare, open_image, readable_format
from .driver import create_image_file
from .grains import GrainDriver
from .qcow2 import Qcow2Driver, create_qcow2
from .qcow2_format import COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY
from .raw import RawDriver

from .options import _onoff, human_size, parse_options, parse_size  # noqa: F401  (re-exported)


def _format_arg(fmt: str | None, what: str) -> str | None:
    # Images kvmpy only reads may be named as a source; what it writes is raw or qcow2.
    readable = ("raw", "qcow2") + (READ_ONLY_FORMATS if what in ("image", "source") else ())
    if fmt is not None and fmt not in readable:
        raise UserError(f"unknown {what} format {fmt!r} (supported: {', '.join(readable)})")
    return fmt


def _resolve_backing(overlay: str, backing: str) -> str:
    if os.path.isabs(backing):
        return backing
    return os.path.join(os.path.dirname(os.path.abspath(overlay)), backing)


# ------------------------------------------------------------------ create

def create_image(path: str, fmt: str, size: int | None, opts: dict | None = None,
                 backing: str | None = None, backing_fmt: str | None = None, quiet: bool = True) -> None:
    opts = dict(opts or {})
    backing = opts.pop("backing_file", backing)
    backing_fmt = _format_arg(opts.pop("backing_fmt", backing_fmt), "backing")
    if "size" in opts:
        size = parse_size(opts.pop("size"))
    if fmt == "raw":
        prealloc = opts.pop("preallocation", "off")
        if opts:
            raise UserError(f"{path}: unknown option(s) for raw: {', '.join(opts)}")
        if backing:
            raise UserError(f"{path}: raw images cannot have a backing file")
        if size is None:
            raise UserError(f"{path}: image size is required for raw images")
        fd = create_image_file(path)
        try:
            os.ftruncate(fd, size)
            if prealloc in ("falloc", "full") and size:
                os.posix_fallocate(fd, 0, size)
            elif prealloc != "off":
                raise UserError(f"{path}: preallocation={prealloc} unsupported (off, falloc, full)")
        finally:
            os.close(fd)
        if not quiet:
            print(f"Formatting '{path}', fmt=raw size={size}")
        return
    if fmt != "qcow2":
        raise UserError(f"{path}: unknown format {fmt!r} (supported: raw, qcow2)")
    cluster_size = parse_size(opts.pop("cluster_size", "65536"), "cluster_size")
    compat = opts.pop("compat", "1.1")
    version = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}.get(compat)
    if version is None:
        raise UserError(f"{path}: invalid compat={compat} (0.10 or 1.1)")
    refcount_bits = int(opts.pop("refcount_bits", "16") or 0)
    lazy = _onoff("lazy_refcounts", opts.pop("lazy_refcounts", "off"))
    if lazy:
        raise UserError(f"{path}: lazy_refcounts=on is unsupported (kvmpy keeps refcounts exact)")
    prealloc = opts.pop("preallocation", "off")
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise UserError(f"{path}: preallocation={prealloc} unsupported for qcow2 (off, metadata, falloc, full)")
    if prealloc != "off" and backing:
        raise UserError(f"{path}: preallocation and a backing file exclude each other "
                        f"(preallocated clusters would hide the backing file's data)")
    if _onoff("extended_l2", opts.pop("extended_l2", "off")):
        raise UserError(f"{path}: extended_l2=on is unsupported")
    ctype = opts.pop("compression_type", "zlib")
    if ctype != "zlib":
        raise UserError(f"{path}: compression_type={ctype} unsupported (zlib)")
    if opts:
        raise UserError(f"{path}: unknown option(s) for qcow2: {', '.join(opts)}")
    if backing:
        bpath = _resolve_backing(path, backing)
        if backing_fmt is None:
            backing_fmt = readable_format(bpath)
        with open_image(bpath, backing_fmt, read_only=True) as b:
            if size is None:
                size = b.size
    if size is None:
        raise UserError(f"{path}: image size is required (or a backing file to take it from)")
    create_qcow2(path, size, cluster_size=cluster_size, backing_file=backing or None,
                 backing_format=backing_fmt if backing else None, version=version,
                 refcount_bits=refcount_bits)
    if prealloc != "off":
        with Qcow2Driver(path) as drv:
            drv.preallocate(prealloc)
    if not quiet:
        extra = f" backing_file={backing} backing_fmt={backing_fmt}" if backing else ""
        print(f"Formatting '{path}', fmt=qcow2 cluster_size={cluster_size} "
              f"compression_type=zlib size={size}{extra} lazy_refcounts=off refcount_bits={refcount_bits}")


def cmd_create(args) -> int:
    fmt = _format_arg(args.format or "raw", "image")
    opts = parse_options(args.options)
    size = parse_size(args.size) if args.size is not None else None
    create_image(args.filename, fmt, size, opts, backing=args.backing, backing_fmt=args.backing_format,
                 quiet=args.quiet)
    return 0


# -------------------------------------------------------------------- info

def image_info(drv) -> dict:
    st = os.stat(drv.path)
    d = {"virtual-size": drv.size, "filename": drv.path, "format": drv.format,
         "actual-size": st.st_blocks * 512, "dirty-flag": False}
    if isinstance(drv, Qcow2Driver):
        h = drv.header
        d["cluster-size"] = drv.cluster_size
        d["dirty-flag"] = bool(h.incompatible & INCOMPAT_DIRTY)
        # qemu-img's order of the fields
        data = {"compat": "1.1" if h.version >= 3 else "0.10", "compression-type": "zlib"}
        if h.version >= 3:
            data["lazy-refcounts"] = bool(h.compatible & COMPAT_LAZY_REFCOUNTS)
        data["refcount-bits"] = drv.refcount_bits
        if h.version >= 3:
            data.update({"corrupt": bool(h.incompatible & INCOMPAT_CORRUPT), "extended-l2": False})
        d["format-specific"] = {"type": "qcow2", "data": data}
        if h.backing_file is not None:
            d["backing-filename"] = h.backing_file
            d["full-backing-filename"] = drv.backing_path()
            if h.backing_format:
                d["backing-filename-format"] = h.backing_format
        if drv.snapshots:
            d["snapshots"] = [_snap_dict(s) for s in drv.snapshots]
    elif isinstance(drv, GrainDriver):
        d["cluster-size"] = drv.grain_size
        specific = drv.format_specific()
        if specific is not None:
            d["format-specific"] = {"type": drv.format, "data": specific}
    return d


def _snap_dict(s) -> dict:
    return {"id": s.id, "name": s.name, "vm-state-size": s.vm_state_size, "date-sec": s.date_sec,
            "date-nsec": s.date_nsec, "vm-clock-sec": s.vm_clock_nsec // 10**9,
            "vm-clock-nsec": s.vm_clock_nsec % 10**9, "icount": None}


def _print_info(d: dict) -> None:
    print(f"image: {d['filename']}")
    print(f"file format: {d['format']}")
    print(f"virtual size: {human_size(d['virtual-size'])} ({d['virtual-size']} bytes)")
    print(f"disk size: {human_size(d['actual-size'])}")
    if "cluster-size" in d:
        print(f"cluster_size: {d['cluster-size']}")
    if "backing-filename" in d:
        bf = d["backing-filename"]
        full = d["full-backing-filename"]
        print(f"backing file: {bf}" + (f" (actual path: {full})" if full != bf else ""))
        if "backing-filename-format" in d:
            print(f"backing file format: {d['backing-filename-format']}")
    if d.get("snapshots"):
        print("Snapshot list:")
        _print_snapshots_from_dicts(d["snapshots"])
    fs = d.get("format-specific")
    if fs:
        print("Format specific information:")
        names = {"compat": "compat", "compression-type": "compression type",
                 "lazy-refcounts": "lazy refcounts", "refcount-bits": "refcount bits",
                 "corrupt": "corrupt", "extended-l2": "extended l2"}
        _print_fields(fs["data"], names, "    ")
    if d.get("dirty-flag"):
        print("dirty flag: true")


def _print_fields(data: dict, names: dict, indent: str) -> None:
    """qemu-img's human dump of a format's details: nested lists as "[i]:" blocks."""
    for k, v in data.items():
        name = names.get(k, k.replace("-", " "))
        if isinstance(v, list):
            print(f"{indent}{name}:")
            for i, item in enumerate(v):
                print(f"{indent}    [{i}]:")
                _print_fields(item, names, indent + "        ")
            continue
        if isinstance(v, bool):
            v = "true" if v else "false"
        print(f"{indent}{name}: {v}")


def cmd_info(args) -> int:
    fmt = _format_arg(args.format, "image")
    chain = []
    path, pfmt = args.filename, fmt
    seen = set()
    while path:
        real = os.path.realpath(path)
        if real in seen:
            raise ImageError(f"{path}: backing chain loops back to {path}")
        seen.add(real)
        # Opening the top alone keeps info usable on images whose backing file is missing.
        drv = _open_for_info(path, pfmt, args.force_share)
        try:
            d = image_info(drv)
        finally:
            drv.close()
        chain.append(d)
        if not args.backing_chain or "full-backing-filename" not in d:
            break
        path, pfmt = d["full-backing-filename"], d.get("backing-filename-format")
    if args.output == "json":
        print(json.dumps(chain if args.backing_chain else chain[0], indent=4))
    else:
        for i, d in enumerate(chain):
            if i:
                print()
            _print_info(d)
    return 0


def _open_for_info(path, fmt, force_share=False):
    fmt = readable_format(path, fmt)
    if fmt == "qcow2":
        return _Qcow2NoBacking(path, read_only=True, force_share=force_share)
    return open_image(path, fmt, read_only=True, force_share=force_share)


class _Qcow2NoBacking(Qcow2Driver):
    """Opens a qcow2 image without its backing chain (info, rebase -u)."""

    def _open_backing(self, chain):
        return None


# ------------------------------------------------------------------- check

def cmd_check(args) -> int:
    from .check import check_image
    fmt = _format_arg(args.format, "image") or readable_format(args.filename)
    if fmt != "qcow2":
        # Opened all the same: a kind of image kvmpy cannot read is refused by name.
        open_image(args.filename, fmt, read_only=True, force_share=args.force_share).close()
        print("This image format does not support checks", file=sys.stderr)
        return 63
    repair = args.repair
    if repair and args.force_share:
        raise UserError(f"{args.filename}: -U (force-share) is only for read-only checks, not -r")
    drv = _Qcow2NoBacking(args.filename, read_only=not repair, _repairing=bool(repair),
                          force_share=args.force_share)
    try:
        res = check_image(drv, repair=repair)
        if repair and (res.leaks_fixed or res.corruptions_fixed):
            fixed = (res.leaks_fixed, res.corruptions_fixed)
            res = check_image(drv)
            res.leaks_fixed, res.corruptions_fixed = fixed
    finally:
        drv.close()
    if args.output == "json":
        print(json.dumps(res.as_dict(args.filename), indent=4))
    else:
        for m in res.messages:
            print(m, file=sys.stderr)
        if res.leaks_fixed or res.corruptions_fixed:
            print(f"The following inconsistencies were found and repaired:\n\n"
                  f"    {res.leaks_fixed} leaked clusters\n    {res.corruptions_fixed} corruptions\n\n"
                  f"Double checking the fixed image now...")
        if not res.corruptions and not res.leaks:
            print("No errors were found on the image.")
        if res.corruptions:
            print(f"\n{res.corruptions} errors were found on the image.\n"
                  f"Data may be corrupted, or further writes to the image may corrupt it.")
        if res.leaks:
            print(f"\n{res.leaks} leaked clusters were found on the image.\n"
                  f"This means waste of disk space, but no harm to data.")
        if res.total_clusters:
            t = res.total_clusters
            a = res.allocated_clusters or 1     # qemu-img relates these two to allocated clusters
            print(f"{res.allocated_clusters}/{t} = {100 * res.allocated_clusters / t:.2f}% allocated, "
                  f"{100 * res.fragmented_clusters / a:.2f}% fragmented, "
                  f"{100 * res.compressed_clusters / a:.2f}% compressed clusters")
        print(f"Image end offset: {res.image_end_offset}")
    if res.corruptions:
        return 2
    if res.leaks:
        return 3
    return 0


# ------------------------------------------------------------------ resize

def _refuse_force_share(args, what: str) -> None:
    if args.force_share:
        raise UserError(f"{args.filename}: -U (force-share) is only for read-only use, not {what}")


def cmd_resize(args) -> int:
    _refuse_force_share(args, "resize")
    sign, amount = parse_size(args.size, "size", allow_sign=True)
    fmt = _format_arg(args.format, "image")
    with open_image(args.filename, fmt) as drv:
        old = drv.size
        new = old + amount if sign == "+" else old - amount if sign == "-" else amount
        if new < 0:
            raise UserError(f"{args.filename}: new size would be negative")
        if new < old and not args.shrink:
            raise UserError(f"{args.filename}: shrinking from {old} to {new} bytes needs --shrink; "
                            f"shrink the guest's partitions and file systems first")
        if new < old:
            print(f"warning: shrinking {args.filename}: data past {new} bytes is lost; the guest "
                  f"file system must already have been shrunk", file=sys.stderr)
        if isinstance(drv, RawDriver):
            drv.truncate(new)
            drv.flush()
        else:
            drv.resize(new)
    if not args.quiet:
        print("Image resized.")
    return 0


# ---------------------------------------------------------------- helpers

def chain_reads_zero(drv, off: int, length: int):
    """(known_zero, run): whether [off, off+run) reads as zeroes through the chain."""
    alloc, zero, run = drv.block_status(off, length)
    run = max(1, min(run, length))
    if zero:
        return True, run
    if alloc:
        return False, run
    b = drv.backing
    if b is None or off >= b.size:
        return True, run
    return chain_reads_zero(b, off, min(run, b.size - off))


class Progress:
    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled
        self.total = max(total, 1)
        self.last = -1.0

    def update(self, done: int):
        if not self.enabled:
            return
        pct = 100.0 * done / self.total
        if pct - self.last >= 1.0 or done >= self.total:
            self.last = pct
            sys.stdout.write(f"    ({pct:.2f}/100%)\r")
            sys.stdout.flush()

    def finish(self):
        if self.enabled:
            sys.stdout.write("    (100.00/100%)\n")
            sys.stdout.flush()


_ZERO_CHUNK = bytes(2 << 20)


# What convert does with a granule that reads as zeroes in the source.
ZERO_SKIP = "skip"        # a fresh target already reads zero there: leave it unallocated
ZERO_MARK = "mark"        # the target may hold data (-n, -B): write_zeroes (a hole/zero flag)
ZERO_WRITE = "write"      # -S 0: allocate and write real zero bytes


def copy_image(src, dst, compress: bool = False, progress: Progress | None = None,
               granularity: int = 65536, chunk: int = 2 << 20, zeroes: str = ZERO_SKIP,
               base=None) -> None:
    """Copy src's guest contents into dst.

    `granularity` is the sparse-detection unit (qemu-img's -S): a granule of zeroes
    is handled as `zeroes` says. With `base` (the -B backing file of dst), granules
    that already read the same through the base are left unallocated, so dst's
    guest view equals src's whatever the base holds."""
    size = src.size
    buf = bytearray(chunk)
    basebuf = bytearray(chunk) if base is not None else None
    pos = 0
    while pos < size:
        n = min(chunk, size - pos)
        zero, run = chain_reads_zero(src, pos, n)
        # End on a granule boundary, so a granule is never split between a zero run and
        # data (a split qcow2 cluster would be allocated for a few bytes).
        end = pos + min(n, run)
        if end != size and end % granularity:
            if end - end % granularity > pos:
                end -= end % granularity
            else:                                   # a mixed granule: read it whole
                end = min(pos - pos % granularity + granularity, size)
                zero = False
        run = end - pos
        if zero and zeroes != ZERO_WRITE and base is None:
            if zeroes == ZERO_MARK:
                dst.write_zeroes(pos, run, may_unmap=True)
            pos += run
            if progress:
                progress.update(pos)
            continue
        n = min(n, run)
        view = memoryview(buf)[:n]
        if zero:
            view[:] = _ZERO_CHUNK[:n]
        else:
            src.preadv([view], pos)
        bview = None
        if base is not None:
            bview = memoryview(basebuf)[:n]
            _read_or_zero(base, bview, pos)
        _write_granules(dst, pos, view, bview, granularity, zeroes, compress)
        pos += n
        if progress:
            progress.update(pos)


def _write_granules(dst, pos, view, bview, granularity, zeroes, compress) -> None:
    """Write one chunk as runs of like granules: data, zeroes, or unchanged-from-base."""
    n = len(view)
    # Comparisons on bytes run as one memcmp; on memoryviews CPython compares
    # element by element, which dominated a whole convert.
    data = view.tobytes()
    base = bview.tobytes() if bview is not None else None
    zero = _ZERO_CHUNK if granularity > len(_ZERO_CHUNK) else _ZERO_CHUNK[:granularity]

    def kind(g, k):
        chunk = data[g:g + k]
        if base is not None and chunk == base[g:g + k]:
            return "same"
        if zeroes != ZERO_WRITE and chunk == (zero if k == len(zero) else bytes(k)):
            return "zero"
        return "data"

    g = 0
    while g < n:
        k = min(granularity - (pos + g) % granularity, n - g)
        what = kind(g, k)
        e = g + k
        while e < n:
            k2 = min(granularity, n - e)
            if kind(e, k2) != what:
                break
            e += k2
        if what == "data":
            if compress:
                dst.write_compressed(pos + g, view[g:e])
            else:
                dst.pwritev([view[g:e]], pos + g)
        elif what == "zero" and (zeroes == ZERO_MARK or bview is not None):
            dst.write_zeroes(pos + g, e - g, may_unmap=True)
        g = e


# ------------------------------------------------------------------ convert

def cmd_convert(args) -> int:
    src_fmt = _format_arg(args.format, "source")
    out_fmt = _format_arg(args.output_format or "raw", "output")
    opts = parse_options(args.options)
    if args.compress and out_fmt != "qcow2":
        raise UserError("compression (-c) needs -O qcow2")
    if os.path.abspath(args.source) == os.path.abspath(args.dest):
        raise UserError(f"{args.dest}: source and destination are the same file")
    sparse = 4096 if args.sparse_size is None else parse_size(args.sparse_size, "-S sparse size")
    if sparse % 512:
        raise UserError(f"invalid -S {args.sparse_size!r}: a multiple of 512 (or 0 for no sparse detection)")
    backing = args.backing or opts.get("backing_file")
    option_fmt = opts.pop("backing_fmt", None)      # -F wins over -o backing_fmt=
    backing_fmt = _format_arg(args.backing_format or option_fmt, "backing")
    opts.pop("backing_file", None)
    if backing and out_fmt != "qcow2":
        raise UserError("a backing file (-B) needs -O qcow2")
    if backing and args.no_create:
        raise UserError("-B and -n together: the existing target keeps its own backing file")
    if args.compress and (backing or sparse == 0):
        raise UserError("compression (-c) cannot be combined with -B or -S 0")
    with open_image(args.source, src_fmt, read_only=True, force_share=args.force_share) as src:
        if args.no_create:
            if opts:
                raise UserError(f"-o {','.join(opts)}: no image is created with -n")
            if not os.path.exists(args.dest):
                raise ImageError(f"{args.dest}: target image not found (-n uses an existing image)")
            if readable_format(args.dest) != out_fmt:
                raise ImageError(f"{args.dest}: target is not a {out_fmt} image (give its format with -O)")
        else:
            if backing:
                bpath = _resolve_backing(args.dest, backing)
                if not os.path.exists(bpath):
                    raise ImageError(f"{bpath}: backing file not found")
                backing_fmt = backing_fmt or readable_format(bpath)
            create_image(args.dest, out_fmt, src.size, opts, backing=backing, backing_fmt=backing_fmt, quiet=True)
        with open_image(args.dest, out_fmt) as dst:
            if dst.size < src.size:
                raise ImageError(f"{args.dest}: target is smaller ({dst.size} bytes) than the source "
                                 f"({src.size} bytes)")
            cluster = dst.cluster_size if isinstance(dst, Qcow2Driver) else 4096
            if sparse == 0:
                zeroes, gran = ZERO_WRITE, cluster
            else:
                zeroes = ZERO_MARK if args.no_create else ZERO_SKIP
                # a qcow2 target can only leave whole clusters unallocated
                gran = max(sparse, cluster) if isinstance(dst, Qcow2Driver) else sparse
            prog = Progress(args.progress, src.size)
            copy_image(src, dst, compress=args.compress, progress=prog, granularity=gran,
                       chunk=max(2 << 20, gran), zeroes=zeroes,
                       base=dst.backing if backing else None)
            dst.flush()
            prog.finish()
    return 0


# ------------------------------------------------------------------- rebase

def cmd_rebase(args) -> int:
    fmt = _format_arg(args.format, "image") or readable_format(args.filename)
    if fmt != "qcow2":
        raise UserError(f"{args.filename}: only qcow2 images have a backing file to rebase")
    new = args.backing
    new_fmt = _format_arg(args.backing_format, "backing")
    if new:
        new_path = _resolve_backing(args.filename, new)
        if not os.path.exists(new_path):
            if not args.unsafe:
                raise ImageError(f"{new_path}: new backing file not found")
        elif new_fmt is None:
            new_fmt = readable_format(new_path)
    if args.unsafe:
        drv = _Qcow2NoBacking(args.filename)
        try:
            drv.set_backing(new or None, new_fmt)
        finally:
            drv.close()
        return 0
    with open_image(args.filename, "qcow2") as drv:
        newb = open_image(new_path, new_fmt, read_only=True, force_share=args.force_share) if new else None
        try:
            _safe_rebase(drv, newb, args.progress)
        finally:
            if newb is not None:
                newb.close()
        drv.set_backing(new or None, new_fmt)
    return 0


def _safe_rebase(drv: Qcow2Driver, newb, progress: bool) -> None:
    """Copy into the overlay every unallocated cluster whose old and new backing differ."""
    cs = drv.cluster_size
    old = drv.backing
    prog = Progress(progress, drv.size)
    a = bytearray(cs)
    b = bytearray(cs)
    pos = 0
    while pos < drv.size:
        n = min(cs - pos % cs, drv.size - pos)
        alloc, _zero, run = drv.block_status(pos, max(n, min(drv.size - pos, 256 * cs)))
        if alloc:
            pos += run
            prog.update(pos)
            continue
        n = min(cs, drv.size - pos)
        va, vb = memoryview(a)[:n], memoryview(b)[:n]
        _read_or_zero(old, va, pos)
        _read_or_zero(newb, vb, pos)
        if va != vb:
            drv.pwritev([va], pos)
        pos += n
        prog.update(pos)
    drv.flush()
    prog.finish() if progress else None


def _read_or_zero(drv, view, pos):
    n = len(view)
    if drv is None or pos >= drv.size:
        view[:] = _ZERO_CHUNK[:n] if n <= len(_ZERO_CHUNK) else bytes(n)
        return
    avail = min(n, drv.size - pos)
    drv.preadv([view[:avail]], pos)
    if avail < n:
        view[avail:] = bytes(n - avail)


# ------------------------------------------------------------------- commit

def cmd_commit(args) -> int:
    _refuse_force_share(args, "commit")
    fmt = _format_arg(args.format, "image") or readable_format(args.filename)
    if fmt != "qcow2":
        raise UserError(f"{args.filename}: only qcow2 images can be committed into a backing file")
    with open_image(args.filename, "qcow2") as top:
        if top.backing is None:
            raise UserError(f"{args.filename}: image has no backing file to commit into")
        # The overlay holds its backing file read-only, with the reader's locks that
        # keep writers out (this one too): hand the overlay the writable open instead.
        top.backing.close()
        top.backing = None
        base = open_image(top.backing_path(), top.header.backing_format, read_only=False)
        top.backing = base
        try:
            if base.size < top.size:
                if isinstance(base, RawDriver):
                    base.truncate(top.size)
                else:
                    base.resize(top.size)
            buf = bytearray(2 << 20)
            pos = 0
            prog = Progress(args.progress, top.size)
            while pos < top.size:
                alloc, zero, run = top.block_status(pos, min(len(buf), top.size - pos))
                if alloc and zero:
                    base.write_zeroes(pos, run)
                elif alloc:
                    v = memoryview(buf)[:run]
                    top.preadv([v], pos)
                    base.pwritev([v], pos)
                pos += run
                prog.update(pos)
            base.flush()
            prog.finish()
        finally:
            base.close()
        if not args.skip_empty:
            top.make_empty()
    print("Image committed.")
    return 0


# ---------------------------------------------------------------------- map

def map_image(drv) -> list[dict]:
    out = []
    pos = 0
    while pos < drv.size:
        entry, run = _map_one(drv, pos, drv.size - pos, 0)
        last = out[-1] if out else None
        if (last and all(last[k] == entry[k] for k in ("depth", "present", "zero", "data"))
                and (("offset" not in last and "offset" not in entry) or
                     ("offset" in last and "offset" in entry and last["offset"] + last["length"] == entry["offset"]))
                and last.get("_file") == entry.get("_file")):
            last["length"] += run
        else:
            entry.update(start=pos, length=run)
            out.append(entry)
        pos += run
    for e in out:
        e.pop("_file", None)
    return [{k: e[k] for k in ("start", "length", "depth", "present", "zero", "data", "offset") if k in e}
            for e in out]


def _map_one(drv, pos, length, depth):
    if isinstance(drv, RawDriver):
        data, zero, run = drv.block_status(pos, length)
        e = {"depth": depth, "present": True, "zero": not data, "data": data, "_file": drv.path}
        if data:
            e["offset"] = pos
        return e, run
    from .qcow2_format import COMPRESSED, DATA, ZERO
    kind, host, run = drv.host_mapping(pos, length)
    if kind == DATA:
        hole = False
        if drv.holes_are_zero:     # preallocated: the file knows better
            hole, run = compare.file_hole(drv.fd, host, run)
        return {"depth": depth, "present": True, "zero": hole, "data": True, "offset": host,
                "_file": drv.path}, run
    if kind == COMPRESSED:
        return {"depth": depth, "present": True, "zero": False, "data": True, "_file": drv.path}, run
    if kind == ZERO:
        return {"depth": depth, "present": True, "zero": True, "data": False}, run
    b = drv.backing
    if b is None or pos >= b.size:
        return {"depth": depth, "present": False, "zero": True, "data": False}, run
    return _map_one(b, pos, min(run, b.size - pos), depth + 1)


def cmd_map(args) -> int:
    fmt = _format_arg(args.format, "image")
    with open_image(args.filename, fmt, read_only=True, force_share=args.force_share) as drv:
        entries = map_image(drv)
        # Human output needs the file each mapped run comes from.
        if args.output != "json":
            rows = []
            for e in entries:
                if e["data"] and not e["zero"] and "offset" in e:
                    rows.append((e["start"], e["length"], e["offset"], _file_at_depth(drv, e["depth"])))
            print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
            for start, length, off, f in rows:
                print(f"{_c_hex(start):<16}{_c_hex(length):<16}{_c_hex(off):<16}{f}")
            return 0
    print("[" + ",\n".join(json.dumps(e) for e in entries) + "]")
    return 0


def _c_hex(n: int) -> str:
    """C's %#x, which qemu-img prints: no 0x before a zero."""
    return f"{n:#x}" if n else "0"


def _file_at_depth(drv, depth):
    while depth and drv.backing is not None:
        drv = drv.backing
        depth -= 1
    return drv.path


# ---------------------------------------------------------------- snapshot

def _print_snapshots_from_dicts(snaps):
    print(f"{'ID':<8}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>16}     ICOUNT")
    for s in snaps:
        date = datetime.datetime.fromtimestamp(s["date-sec"]).strftime("%Y-%m-%d %H:%M:%S")
        secs = s["vm-clock-sec"]
        clock = f"{secs // 3600:04d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{s['vm-clock-nsec'] // 10**6:03d}"
        print(f"{s['id']:<8}{s['name']:<17}{human_size(s['vm-state-size']):>8}{date:>20}{clock:>16}")


def cmd_snapshot(args) -> int:
    from .snapshot import apply_snapshot, create_snapshot, delete_snapshot
    actions = [(flag, value) for flag, value in (("-c", args.create), ("-a", args.apply),
                                                   ("-d", args.delete)) if value is not None]
    if len(actions) + bool(args.list) != 1:
        raise UserError("snapshot: give exactly one of -l, -c NAME, -a NAME, -d NAME")
    fmt = _format_arg(args.format, "image") or readable_format(args.filename)
    if fmt != "qcow2":
        raise UserError(f"{args.filename}: {fmt} images have no internal snapshots")
    if args.list:
        drv = _Qcow2NoBacking(args.filename, read_only=True, force_share=args.force_share)
        try:
            snaps = [_snap_dict(s) for s in drv.snapshots]
        finally:
            drv.close()
        if snaps:
            print("Snapshot list:")
            _print_snapshots_from_dicts(snaps)
        return 0
    flag, key = actions[0]
    if args.force_share:
        raise UserError(f"{args.filename}: -U (force-share) is only for read-only use (snapshot -l)")
    # The backing chain is not needed: snapshots only move references within this file.
    drv = _Qcow2NoBacking(args.filename)
    try:
        if flag == "-c":
            create_snapshot(drv, key)
        elif flag == "-a":
            apply_snapshot(drv, key)
        else:
            delete_snapshot(drv, key)
    finally:
        drv.close()
    return 0


# ------------------------------------------------------------ registration

def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Bad command lines are one line and status 2, as for any other bad input."""
    prog = parser.prog

    def error(message):
        sys.stderr.write(f"{prog}: {message}\n")
        sys.exit(2)

    original = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extras = original(args, namespace)
        if extras:
            error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras

    parser.error = error
    parser.parse_known_args = parse_known_args
    return parser


def _wrap(handler):
    @functools.wraps(handler)
    def run(args):
        try:
            return handler(args)
        except UserError:
            raise
        except BrokenPipeError:
            return 0
        except OSError as e:
            name = e.filename or args.filename
            raise ImageError(f"{name}: {e.strerror or e}") from None
    return run


def _no_subcommand(args) -> int:
    print("kvmpy img: a subcommand is required (create, info, check, resize, rebase, convert, "
          "commit, map, snapshot)", file=sys.stderr)
    return 2


def register(subparsers) -> None:
    img = _one_line_errors(subparsers.add_parser("img", help="create, inspect and convert disk images"))
    img.set_defaults(func=_no_subcommand)
    sub = img.add_subparsers(dest="img_command", metavar="SUBCOMMAND")

    def add(name, handler, help_):
        p = _one_line_errors(sub.add_parser(name, help=help_))
        # filename: what a host error names when the OSError does not (a subcommand
        # with another positional, as convert's source and dest, leaves it empty).
        p.set_defaults(func=_wrap(handler), filename="")
        return p

    p = add("create", cmd_create, "create a new image")
    p.add_argument("-f", dest="format", default="raw")
    p.add_argument("-o", dest="options", action="append")
    p.add_argument("-b", dest="backing")
    p.add_argument("-F", dest="backing_format")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-u", dest="unsafe", action="store_true", help="accepted for compatibility")
    p.add_argument("filename")
    p.add_argument("size", nargs="?")

    p = add("info", cmd_info, "show image information")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true")
    p.add_argument("-f", dest="format")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("--json", dest="output", action="store_const", const="json")
    p.add_argument("--backing-chain", action="store_true")
    p.add_argument("filename")

    p = add("check", cmd_check, "check (and repair) qcow2 refcounts")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true")
    p.add_argument("-f", dest="format")
    p.add_argument("-r", dest="repair", choices=("leaks", "all"))
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("filename")

    p = add("resize", cmd_resize, "grow or shrink an image")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true")
    p.add_argument("-f", dest="format")
    p.add_argument("--shrink", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("filename")
    p.add_argument("size", help="[+-]SIZE")

    p = add("rebase", cmd_rebase, "change an image's backing file")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true")
    p.add_argument("-f", dest="format")
    p.add_argument("-b", dest="backing", required=True)
    p.add_argument("-F", dest="backing_format")
    p.add_argument("-u", dest="unsafe", action="store_true")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("filename")

    p = add("convert", cmd_convert, "copy an image, possibly to another format")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true")
    p.add_argument("-f", dest="format")
    p.add_argument("-O", dest="output_format")
    p.add_argument("-o", dest="options", action="append")
    p.add_argument("-c", dest="compress", action="store_true")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-n", dest="no_create", action="store_true", help="write into an existing target image")
    p.add_argument("-B", dest="backing", help="create the target as an overlay of this backing file (clusters that read the same through it are not copied)")
    p.add_argument("-F", dest="backing_format", help="format of the -B backing file")
    p.add_argument("-S", dest="sparse_size", help="zero run that stays sparse (default 4k; 0 allocates all)")
    p.add_argument("source")
    p.add_argument("dest")

    p = add("commit", cmd_commit, "write an overlay's changes into its backing file")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true")
    p.add_argument("-f", dest="format")
    p.add_argument("-d", dest="skip_empty", action="store_true")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("filename")

    compare.register(add)

    p = add("map", cmd_map, "show where guest data lives")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true")
    p.add_argument("-f", dest="format")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("filename")

    p = add("snapshot", cmd_snapshot, "list, create, apply or delete internal snapshots")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true")
    p.add_argument("-f", dest="format")
    p.add_argument("-l", dest="list", action="store_true")
    p.add_argument("-c", dest="create", metavar="NAME")
    p.add_argument("-a", dest="apply", metavar="NAME")
    p.add_argument("-d", dest="delete", metavar="NAME")
    p.add_argument("filename")
