"""qcow2 images, per QEMU's docs/interop/qcow2.txt (versions 2 and 3).

Layout in one paragraph: cluster 0 holds the header, header extensions and the
backing file name. Guest offsets map through a two-level table (L1 -> L2 ->
host cluster); host clusters are reference counted through another two-level
table (refcount table -> refcount blocks). Unallocated guest clusters read from
the backing file, or zeroes.

Crash safety: metadata is cached and written back in dependency order on
flush(): refcount blocks (so every cluster a table will point at is already
counted), then L2 tables, then L1 entries, with fdatasync between. Guest data is
written before the L2 entry that points at it. A cluster that loses its last
reference is only decremented after the table update dropping it is durable.
A crash at any point therefore leaves an image `qemu-img check` calls clean or
merely leaking clusters, never one with a table pointing at a reused cluster.
"""

from __future__ import annotations

import array
import bisect
import functools
import os
import threading
import time
import struct
import zlib
from collections import OrderedDict

from ..errors import ImageError
from . import direct
from .driver import BlockDriver, create_image_file, full_preadv, full_pwritev, write_zero_bytes
from .locking import lock_image, mode_for
from .qcow2_format import (MAGIC, L1E_OFFSET_MASK, L1E_RESERVED, L2E_OFFSET_MASK, L2E_STD_RESERVED,
                           RT_RESERVED, OFLAG_COPIED, OFLAG_COMPRESSED, OFLAG_ZERO, INCOMPAT_DIRTY,
                           INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_COMPRESSION,
                           INCOMPAT_EXTL2, KNOWN_INCOMPAT, COMPAT_LAZY_REFCOUNTS, EXT_END,
                           EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_BITMAPS, EXT_DATA_FILE,
                           MAX_L1_BYTES, MAX_REFTABLE_BYTES, MAX_SNAPSHOTS, MAX_BACKING_NAME,
                           MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, MAX_CHAIN_DEPTH, be_array, UNALLOC,
                           ZERO, DATA, COMPRESSED, to_be)

_ZEROS = memoryview(bytes(2 << 20))


def _zero_fill(views) -> None:
    for v in views:
        n = len(v)
        pos = 0
        while pos < n:
            k = min(n - pos, len(_ZEROS))
            v[pos:pos + k] = _ZEROS[:k]
            pos += k


class _Cursor:
    """Maps request-relative byte ranges to slices of the caller's buffers."""

    def __init__(self, buffers):
        self.views = []
        self.starts = []
        pos = 0
        for b in buffers:
            v = memoryview(b)
            if v.format != "B" or v.ndim != 1:
                v = v.cast("B")
            if len(v):
                self.views.append(v)
                self.starts.append(pos)
                pos += len(v)
        self.length = pos

    def slices(self, start: int, length: int) -> list:
        out = []
        if length <= 0:
            return out
        import bisect
        i = bisect.bisect_right(self.starts, start) - 1
        end = start + length
        while start < end:
            v = self.views[i]
            vs = self.starts[i]
            a = start - vs
            b = min(len(v), end - vs)
            out.append(v[a:b])
            start = vs + b
            i += 1
        return out


class Header:
    """The parsed, validated qcow2 header (plus extensions)."""

    def __init__(self):
        self.version = 3
        self.backing_file_offset = 0
        self.backing_file_size = 0
        self.cluster_bits = 16
        self.size = 0
        self.crypt_method = 0
        self.l1_size = 0
        self.l1_table_offset = 0
        self.refcount_table_offset = 0
        self.refcount_table_clusters = 0
        self.nb_snapshots = 0
        self.snapshots_offset = 0
        self.incompatible = 0
        self.compatible = 0
        self.autoclear = 0
        self.refcount_order = 4
        self.header_length = 112
        self.compression_type = 0
        self.extra_fields = b""        # unknown v3 fields beyond what we parse, preserved
        self.backing_file = None
        self.backing_format = None
        self.feature_names = {}        # (type, bit) -> name
        self.unknown_extensions = []   # (type, data) preserved on header rewrite

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def pack(self) -> bytes:
        """Header + extensions + backing name, to fit in cluster 0."""
        cs = self.cluster_size
        fixed = struct.pack(">4sIQIIQIIQQIIQ", MAGIC, self.version, 0, 0, self.cluster_bits,
                            self.size, self.crypt_method, self.l1_size, self.l1_table_offset,
                            self.refcount_table_offset, self.refcount_table_clusters,
                            self.nb_snapshots, self.snapshots_offset)
        if self.version >= 3:
            hlen = max(self.header_length, 104)
            v3 = struct.pack(">QQQII", self.incompatible, self.compatible, self.autoclear,
                             self.refcount_order, hlen)
            rest = bytearray(hlen - 104)
            tail = struct.pack(">B", self.compression_type) + self.extra_fields[1:]
            rest[:min(len(rest), len(tail))] = tail[:len(rest)]
            fixed += v3 + bytes(rest)
        exts = b""

        def ext(t, data):
            pad = (-len(data)) % 8
            return struct.pack(">II", t, len(data)) + data + bytes(pad)

        if self.backing_file is not None and self.backing_format:
            exts += ext(EXT_BACKING_FORMAT, self.backing_format.encode())
        if self.version >= 3:
            table = b""
            names = dict(self.feature_names)
            names.setdefault((0, 0), "dirty bit")
            names.setdefault((0, 1), "corrupt bit")
            names.setdefault((0, 3), "compression type")
            names.setdefault((1, 0), "lazy refcounts")
            for (t, bit), name in sorted(names.items()):
                table += struct.pack(">BB46s", t, bit, name.encode()[:46])
            exts += ext(EXT_FEATURE_TABLE, table)
        for t, data in self.unknown_extensions:
            exts += ext(t, data)
        exts += struct.pack(">II", EXT_END, 0)
        out = bytearray(fixed + exts)
        if self.backing_file is not None:
            name = self.backing_file.encode()
            struct.pack_into(">QI", out, 8, len(out), len(name))
            out += name
        if len(out) > cs:
            raise ImageError("header, extensions and backing file name do not fit in one cluster")
        return bytes(out)


def _field_error(path, field, msg) -> ImageError:
    return ImageError(f"{path}: invalid qcow2 header field {field}: {msg}")


def parse_header(path: str, fd: int, file_size: int) -> Header:
    h = Header()
    if file_size < 72:
        raise ImageError(f"{path}: file is {file_size} bytes, too short for a qcow2 header (72)")
    raw = direct.pread(fd, 104, 0)
    (magic, h.version, h.backing_file_offset, h.backing_file_size, h.cluster_bits, h.size,
     h.crypt_method, h.l1_size, h.l1_table_offset, h.refcount_table_offset,
     h.refcount_table_clusters, h.nb_snapshots, h.snapshots_offset) = struct.unpack_from(
        ">4sIQIIQIIQQIIQ", raw, 0)
    if magic != MAGIC:
        raise ImageError(f"{path}: not a qcow2 image (bad magic)")
    if h.version not in (2, 3):
        raise _field_error(path, "version", f"{h.version} (supported: 2, 3)")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise _field_error(path, "cluster_bits", f"{h.cluster_bits} (must be 9..21: 512 B to 2 MiB)")
    cs = h.cluster_size
    if h.version == 2:
        h.header_length = 72
        h.refcount_order = 4
    else:
        if len(raw) < 104 or file_size < 104:
            raise ImageError(f"{path}: file too short for a version 3 qcow2 header (104)")
        (h.incompatible, h.compatible, h.autoclear, h.refcount_order,
         h.header_length) = struct.unpack_from(">QQQII", raw, 72)
        if h.header_length < 104 or h.header_length % 8:
            raise _field_error(path, "header_length", f"{h.header_length} (must be >= 104, multiple of 8)")
        if h.header_length > cs or h.header_length > file_size:
            raise _field_error(path, "header_length", f"{h.header_length} exceeds the first cluster/file")
        if h.header_length > 104:
            extra = direct.pread(fd, h.header_length - 104, 104)
            h.compression_type = extra[0]
            h.extra_fields = bytes(extra)
        if h.refcount_order > 6:
            raise _field_error(path, "refcount_order", f"{h.refcount_order} (must be 0..6)")
    if h.crypt_method:
        raise ImageError(f"{path}: encrypted qcow2 images (crypt_method {h.crypt_method}) are unsupported")
    # Backing file name.
    if h.backing_file_offset:
        if h.backing_file_size > MAX_BACKING_NAME or h.backing_file_size == 0:
            raise _field_error(path, "backing_file_size", f"{h.backing_file_size} (must be 1..1023)")
        if h.backing_file_offset + h.backing_file_size > min(cs, file_size):
            raise _field_error(path, "backing_file_offset",
                               f"{h.backing_file_offset}+{h.backing_file_size} outside the first cluster")
        h.backing_file = direct.pread(fd, h.backing_file_size, h.backing_file_offset).decode(
            "utf-8", "surrogateescape")
    # Header extensions come before feature checks so errors can name features.
    ext_start = h.header_length
    ext_end = min(cs, file_size)
    if h.backing_file_offset:
        ext_end = min(ext_end, h.backing_file_offset)
    pos = ext_start
    seen = set()
    while pos + 8 <= ext_end:
        etype, elen = struct.unpack(">II", direct.pread(fd, 8, pos))
        if etype == EXT_END:
            break
        if pos + 8 + elen > ext_end:
            raise ImageError(f"{path}: header extension 0x{etype:08x} at offset {pos} "
                             f"(length {elen}) runs past the header area")
        data = direct.pread(fd, elen, pos + 8)
        if etype in seen and etype in (EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_DATA_FILE):
            raise ImageError(f"{path}: duplicate header extension 0x{etype:08x} at offset {pos}")
        seen.add(etype)
        if etype == EXT_BACKING_FORMAT:
            h.backing_format = data.decode("utf-8", "replace")
        elif etype == EXT_FEATURE_TABLE:
            for i in range(0, len(data) - 47, 48):
                ftype, bit = data[i], data[i + 1]
                name = data[i + 2:i + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
                h.feature_names[(ftype, bit)] = name
        elif etype == EXT_BITMAPS:
            # Bitmaps are not maintained; the autoclear bit is cleared before writing,
            # which is how the spec lets an implementation invalidate them.
            h.unknown_extensions.append((etype, data))
        else:
            h.unknown_extensions.append((etype, data))
        pos += 8 + elen + ((-elen) % 8)
    unknown = h.incompatible & ~KNOWN_INCOMPAT
    if h.incompatible & INCOMPAT_EXTL2:
        raise ImageError(f"{path}: qcow2 extended L2 entries (subclusters) are unsupported; "
                         f"convert with `qemu-img convert -O qcow2 -o extended_l2=off`")
    if h.incompatible & INCOMPAT_DATA_FILE:
        raise ImageError(f"{path}: qcow2 external data files are unsupported")
    if unknown:
        names = []
        for bit in range(64):
            if unknown >> bit & 1:
                names.append(h.feature_names.get((0, bit), f"unknown feature bit {bit}"))
        raise ImageError(f"{path}: unsupported qcow2 incompatible features: {', '.join(names)}")
    if h.incompatible & INCOMPAT_COMPRESSION or h.compression_type:
        if h.compression_type != 0:
            kind = {1: "zstd"}.get(h.compression_type, f"type {h.compression_type}")
            raise ImageError(f"{path}: qcow2 compression {kind} is unsupported (only zlib)")
    # Tables.
    l2_entries = cs // 8
    if h.l1_size > MAX_L1_BYTES // 8:
        raise _field_error(path, "l1_size", f"{h.l1_size} entries exceeds the 32 MiB L1 limit")
    if h.size > (1 << 63) - 1 or h.size % 512 and False:
        raise _field_error(path, "size", f"{h.size}")
    needed_l1 = -(-h.size // (l2_entries * cs))
    if h.l1_size < needed_l1:
        raise _field_error(path, "l1_size", f"{h.l1_size} entries cannot cover the virtual size {h.size} "
                                            f"(needs {needed_l1})")
    _check_table(path, "l1_table_offset", h.l1_table_offset, h.l1_size * 8, cs, file_size)
    if h.refcount_table_clusters == 0:
        raise _field_error(path, "refcount_table_clusters", "0")
    if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise _field_error(path, "refcount_table_clusters",
                           f"{h.refcount_table_clusters} exceeds the 8 MiB refcount table limit")
    _check_table(path, "refcount_table_offset", h.refcount_table_offset,
                 h.refcount_table_clusters * cs, cs, file_size)
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise _field_error(path, "nb_snapshots", f"{h.nb_snapshots} exceeds {MAX_SNAPSHOTS}")
    if h.nb_snapshots:
        _check_table(path, "snapshots_offset", h.snapshots_offset, 40 * h.nb_snapshots, cs, file_size)
    return h


def _check_table(path, field, offset, length, cs, file_size):
    if offset % cs:
        raise _field_error(path, field, f"{offset} is not cluster aligned")
    if length and (offset == 0 or offset + length > file_size):
        raise _field_error(path, field, f"table [{offset}, {offset + length}) lies outside the "
                                        f"file ({file_size} bytes)")


class Snapshot:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def read_snapshots(path, fd, h: Header, file_size: int) -> list:
    out = []
    pos = h.snapshots_offset
    for i in range(h.nb_snapshots):
        if pos + 40 > file_size:
            raise ImageError(f"{path}: snapshot table entry {i} at offset {pos} lies outside the file")
        (l1_off, l1_size, id_len, name_len, date_s, date_ns, vm_clock, vm_state32,
         extra_len) = struct.unpack(">QIHHIIQII", direct.pread(fd, 40, pos))
        total = 40 + extra_len + id_len + name_len
        if pos + total > file_size or extra_len > 1024:
            raise ImageError(f"{path}: snapshot table entry {i} at offset {pos} is malformed")
        blob = direct.pread(fd, total - 40, pos + 40)
        extra = blob[:extra_len]
        vm_state = vm_state32
        disk_size = None
        if extra_len >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
        if extra_len >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        sid = blob[extra_len:extra_len + id_len].decode("utf-8", "replace")
        name = blob[extra_len + id_len:].decode("utf-8", "replace")
        out.append(Snapshot(id=sid, name=name, l1_table_offset=l1_off, l1_size=l1_size,
                            date_sec=date_s, date_nsec=date_ns, vm_clock_nsec=vm_clock,
                            vm_state_size=vm_state, disk_size=disk_size, entry_offset=pos,
                            entry_length=total))
        pos += total + ((-total) % 8)
    return out


# The kinds of metadata the overlap check protects (QEMU's overlap-check=all names).
META_HEADER = "qcow2 header"
META_ACTIVE_L1 = "active L1 table"
META_ACTIVE_L2 = "active L2 table"
META_REFCOUNT_TABLE = "refcount table"
META_REFCOUNT_BLOCK = "refcount block"
META_SNAPSHOT_TABLE = "snapshot table"
META_INACTIVE_L1 = "inactive L1 table"
META_INACTIVE_L2 = "inactive L2 table"
_L2_KINDS = (META_ACTIVE_L2, META_INACTIVE_L2)


class MetadataMap:
    """Which host clusters hold metadata, so that every write can be checked
    against them in O(log n) rather than by walking the tables (QEMU's overlap
    check). A sorted list of cluster indices answers range queries by bisection;
    per cluster a count per kind, because one cluster is legitimately several
    things at once (an L2 table shared by the active L1 and a snapshot's) and
    must stay protected until the last of them lets go of it."""

    def __init__(self):
        self.clusters = []       # sorted cluster indices
        self.kinds = {}          # cluster index -> {kind: count}

    def add(self, first: int, n: int, kind: str) -> None:
        for c in range(first, first + n):
            k = self.kinds.get(c)
            if k is None:
                bisect.insort(self.clusters, c)
                k = self.kinds[c] = {}
            k[kind] = k.get(kind, 0) + 1

    def remove(self, first: int, n: int, kind: str) -> None:
        for c in range(first, first + n):
            k = self.kinds.get(c)
            if k is None or kind not in k:
                continue
            k[kind] -= 1
            if not k[kind]:
                del k[kind]
            if not k:
                del self.kinds[c]
                del self.clusters[bisect.bisect_left(self.clusters, c)]

    def hit(self, first: int, end: int, ignore=()):
        """(cluster, kind) of the first metadata cluster in [first, end) not of an
        ignored kind, or None."""
        i = bisect.bisect_left(self.clusters, first)
        while i < len(self.clusters) and self.clusters[i] < end:
            c = self.clusters[i]
            for kind in self.kinds[c]:
                if kind not in ignore:
                    return c, kind
            i += 1
        return None


def _locked(method):
    """Metadata caches are shared state: one request at a time per image (vCPU/iothreads)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


class Qcow2Driver(BlockDriver):
    format = "qcow2"
    # QEMU 7.2 on Linux: the L2 cache covers the whole image up to 32 MiB of tables
    # (DEFAULT_L2_CACHE_MAX_SIZE), at least 2 tables; tables unused for
    # cache-clean-interval seconds (600) are dropped.
    L2_CACHE_MAX_BYTES = 32 << 20
    MIN_L2_CACHE_TABLES = 2
    CACHE_CLEAN_INTERVAL = 600.0
    METADATA_DIRTY_LIMIT = 512

    def __init__(self, path: str, read_only: bool = False, _chain: tuple = (), _repairing=False,
                 require_backing_format: bool = False, force_share: bool = False,
                 l2_cache_size: int | None = None, cache_clean_interval: float | None = None,
                 cache: str | None = None):
        self.path = path
        self.cache = direct.cache_mode(cache)
        if l2_cache_size is not None and l2_cache_size < 0:
            raise ImageError(f"{path}: l2-cache-size {l2_cache_size} must not be negative")
        if cache_clean_interval is not None and cache_clean_interval < 0:
            raise ImageError(f"{path}: cache-clean-interval {cache_clean_interval} must not be negative")
        self._l2_cache_request = l2_cache_size
        self.cache_clean_interval = (self.CACHE_CLEAN_INTERVAL if cache_clean_interval is None
                                     else cache_clean_interval)
        # -U: no locks here nor down the chain (read-only inspection of a busy image).
        self.force_share = force_share
        self.read_only = read_only
        # Set for a probed image: its backing chain is only followed where each
        # image names its backing file's format (never probe a file it points at).
        self.require_backing_format = require_backing_format
        self.fd = -1
        self.backing = None
        self.write_prepared = False
        self._lock = threading.RLock()
        # Whoever caches where guest clusters live outside this driver (the virtio-blk
        # data plane's cluster map) is called with the new generation, under the
        # driver's lock, whenever a mapping changes; see in_place_clusters.
        self.mapping_listeners: list = []
        self.mapping_generation = 0
        real = os.path.realpath(path)
        if real in _chain:
            raise ImageError(f"{path}: backing chain loops back to {path}")
        if len(_chain) >= MAX_CHAIN_DEPTH:
            raise ImageError(f"{path}: backing chain deeper than {MAX_CHAIN_DEPTH} images")
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if not os.path.exists(path):
            raise ImageError(f"{path}: image file not found")
        self.fd = direct.open_image_file(path, flags, self.cache)
        try:
            if self.cache.direct:
                direct.register(self.fd)
            if not force_share:
                lock_image(self.fd, path, mode_for(read_only))
            self._open(_chain + (real,), _repairing)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ open

    def _open(self, chain, repairing):
        path = self.path
        self.file_size = os.fstat(self.fd).st_size
        h = self.header = parse_header(path, self.fd, self.file_size)
        self.cluster_bits = h.cluster_bits
        self.cluster_size = cs = h.cluster_size
        self.l2_entries = cs // 8
        self.l2_bits = self.cluster_bits - 3
        self.size = h.size
        self.refcount_bits = 1 << h.refcount_order
        self.rb_entries = cs * 8 // self.refcount_bits
        self.refcount_max = (1 << self.refcount_bits) - 1
        self.csize_shift = 62 - (self.cluster_bits - 8)
        self.csize_mask = (1 << (self.cluster_bits - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1
        self.snapshots = read_snapshots(path, self.fd, h, self.file_size) if h.nb_snapshots else []
        self.l1 = be_array(direct.pread(self.fd, h.l1_size * 8, h.l1_table_offset)) if h.l1_size else array.array("Q")
        for i, e in enumerate(self.l1):
            if e & L1E_RESERVED:
                raise ImageError(f"{path}: L1 entry {i} (0x{e:016x}) has reserved bits set")
            off = e & L1E_OFFSET_MASK
            if off and (off % cs or off + cs > self.file_size):
                raise ImageError(f"{path}: L1 entry {i}: L2 table offset {off} is "
                                 f"{'not cluster aligned' if off % cs else 'outside the file'}")
        self.refcount_table = be_array(direct.pread(self.fd, h.refcount_table_clusters * cs,
                                                 h.refcount_table_offset))
        for i, e in enumerate(self.refcount_table):
            if e & RT_RESERVED:
                raise ImageError(f"{path}: refcount table entry {i} (0x{e:016x}) has reserved bits set")
            if e and (e % cs or e + cs > self.file_size):
                raise ImageError(f"{path}: refcount table entry {i}: refcount block offset {e} is "
                                 f"{'not cluster aligned' if e % cs else 'outside the file'}")
        self.l2_cache = OrderedDict()
        # Enough tables to map the whole image, capped as QEMU caps it.
        whole = -(-(-(-h.size // cs) * 8) // cs) * cs
        request = self._l2_cache_request
        wanted = min(whole, self.L2_CACHE_MAX_BYTES) if request is None else request
        self.l2_cache_tables = max(self.MIN_L2_CACHE_TABLES, wanted // cs)
        self.l2_used = set()          # tables used since the last clean
        self.next_clean = time.monotonic() + self.cache_clean_interval
        self.dirty_l2 = set()
        self.dirty_l1 = set()
        self.rb_cache = {}
        self.dirty_rb = set()
        self.dirty_rt = set()
        self.pending_frees = []       # host cluster indices to decrement after tables are durable
        self.free_hint = 0
        self.first_free_seen = None
        self.compressed_cursor = 0    # byte offset inside a cluster holding compressed data
        self.decompressed = (None, None)
        self.write_prepared = False
        self.closed = False
        self.corrupt = False          # set by a refused metadata overwrite: no more writes
        self._meta = None             # MetadataMap, built on the first write
        # Writers.
        if not self.read_only:
            if h.incompatible & INCOMPAT_CORRUPT and not repairing:
                raise ImageError(f"{path}: image is marked corrupt; open it read-only or repair it "
                                 f"with `kvmpy img check -r all {path}`")
            if h.refcount_order > 6:
                raise ImageError(f"{path}: refcount_order {h.refcount_order} unsupported for writing")
        # Backing chain.
        if h.backing_file:
            self.backing = self._open_backing(chain)
        # Dirty images may have wrong refcounts: rebuild before any allocation.
        if h.incompatible & INCOMPAT_DIRTY and not self.read_only and not repairing:
            from .check import check_image
            check_image(self, repair="all")

    def backing_path(self) -> str | None:
        b = self.header.backing_file
        if b is None:
            return None
        if b.startswith(("json:", "nbd:", "http:", "https:")) or "://" in b:
            return b
        if os.path.isabs(b):
            return b
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), b)

    def _open_backing(self, chain):
        bpath = self.backing_path()
        name = self.header.backing_file
        if self.require_backing_format and self.header.backing_format is None:
            raise ImageError(f"{self.path}: image format was probed and its backing file {name!r} has no "
                             f"backing format; give format= for the disk and record the backing format with "
                             f"`kvmpy img rebase -u -b {name} -F raw|qcow2 {self.path}`")
        if "://" in bpath or bpath.startswith("json:"):
            raise ImageError(f"{self.path}: backing file {name!r} is not a local file; use "
                             f"`kvmpy img rebase -u -b NEW {self.path}`")
        if not os.path.exists(bpath):
            raise ImageError(f"{self.path}: backing file {name!r} not found (looked for {bpath}); "
                             f"point it at the right file with `kvmpy img rebase -u -b NEW -F FMT {self.path}`")
        fmt = self.header.backing_format
        if fmt is not None and fmt not in ("raw", "qcow2"):
            raise ImageError(f"{self.path}: backing format {fmt!r} is unsupported (raw, qcow2)")
        if os.path.realpath(bpath) in chain:
            raise ImageError(f"{self.path}: backing chain loops back to {bpath}")
        from . import open_image
        # QEMU's backing files inherit cache.direct: a cache=none disk's reads of its
        # base image bypass the page cache too (O_DSYNC means nothing to a reader).
        cache = "none" if self.cache.direct else None
        if self.require_backing_format and fmt == "qcow2":
            # The rule holds down the whole chain.
            return Qcow2Driver(bpath, read_only=True, _chain=chain, require_backing_format=True,
                               force_share=self.force_share, cache=cache)
        return open_image(bpath, format=fmt, read_only=True, _chain=chain, force_share=self.force_share,
                          cache=cache)

    # ------------------------------------------------------------- L1 / L2

    def _l2_offset(self, l1_index: int) -> int:
        if l1_index >= len(self.l1):
            return 0
        return self.l1[l1_index] & L1E_OFFSET_MASK

    def _load_l2(self, off: int) -> array.array:
        if self.cache_clean_interval:
            self.l2_used.add(off)
            if time.monotonic() >= self.next_clean:
                self._clean_l2_cache()
        t = self.l2_cache.get(off)
        if t is not None:
            self.l2_cache.move_to_end(off)
            return t
        if off + self.cluster_size > self.file_size:
            raise ImageError(f"{self.path}: L2 table at offset {off} lies outside the file")
        raw = direct.pread(self.fd, self.cluster_size, off)
        if len(raw) != self.cluster_size:
            raise ImageError(f"{self.path}: L2 table at offset {off} is truncated")
        t = be_array(raw)
        self.l2_cache[off] = t
        self._evict_l2()
        return t

    def _clean_l2_cache(self) -> None:
        """Drop the clean tables nobody used for a whole interval (QEMU's
        cache-clean-interval): a VM that once read its whole disk does not keep
        32 MiB of tables forever. Dirty tables stay until they are written."""
        for off in [o for o in self.l2_cache if o not in self.l2_used and o not in self.dirty_l2]:
            del self.l2_cache[off]
        self.l2_used.clear()
        self.next_clean = time.monotonic() + self.cache_clean_interval

    def _evict_l2(self):
        limit = self.l2_cache_tables
        if len(self.l2_cache) <= limit:
            return
        for off in list(self.l2_cache):
            if len(self.l2_cache) <= limit:
                break
            if off not in self.dirty_l2:
                del self.l2_cache[off]

    def _entry(self, ci: int) -> int:
        l2off = self._l2_offset(ci >> self.l2_bits)
        if not l2off:
            return 0
        return self._load_l2(l2off)[ci & (self.l2_entries - 1)]

    def _classify(self, e: int, ci: int):
        """(kind, host_offset) for an L2 entry; validates it against the file."""
        if e & OFLAG_COMPRESSED:
            off = e & self.coffset_mask
            if off >= self.file_size:
                raise ImageError(f"{self.path}: compressed cluster {ci}: data offset {off} "
                                 f"lies outside the file")
            return COMPRESSED, off
        if e & L2E_STD_RESERVED:
            raise ImageError(f"{self.path}: L2 entry for guest cluster {ci} (0x{e:016x}) has "
                             f"reserved bits set")
        off = e & L2E_OFFSET_MASK
        if off and off % self.cluster_size:
            raise ImageError(f"{self.path}: guest cluster {ci}: host offset {off} is not cluster aligned")
        if e & OFLAG_ZERO:
            if self.header.version < 3:
                raise ImageError(f"{self.path}: guest cluster {ci}: zero flag in a version 2 image")
            return ZERO, off
        if off:
            if off >= self.file_size:
                raise ImageError(f"{self.path}: guest cluster {ci}: host offset {off} lies outside the file")
            return DATA, off
        return UNALLOC, 0

    def _map(self, pos: int, length: int):
        """(kind, host_offset_of_pos, run_length) for the run at guest offset pos."""
        cs = self.cluster_size
        ci = pos // cs
        in_cl = pos % cs
        kind, host = self._classify(self._entry(ci), ci)
        run = min(cs - in_cl, length)
        if kind == COMPRESSED:
            return kind, host, run
        start_host = host + in_cl if kind == DATA else host
        next_host = host + cs
        # Within one L2 table the common continuations (the next data cluster right
        # behind this one, another unallocated one) are recognised from the raw
        # entry: no per-cluster method calls on sequential I/O. Anything else goes
        # through _classify, which validates it.
        mask = self.l2_entries - 1
        table = None
        file_size = self.file_size
        while run < length:
            ci += 1
            i = ci & mask
            if i == 0 or table is None:
                l2off = self._l2_offset(ci >> self.l2_bits)
                table = self._load_l2(l2off) if l2off else None
                if table is None:
                    if kind != UNALLOC:
                        break
                    run = min(run + (self.l2_entries - i) * cs, length)   # the whole table is unallocated
                    ci += self.l2_entries - i - 1
                    continue
            e = table[i]
            if kind == DATA and e & ~OFLAG_COPIED == next_host and next_host < file_size:
                pass
            elif kind == UNALLOC and e == 0:
                pass
            else:
                k2, h2 = self._classify(e, ci)
                if k2 != kind or (kind == DATA and h2 != next_host):
                    break
            next_host += cs
            run = min(run + cs, length)
        return kind, start_host, run

    # ------------------------------------------------------------------ read

    @_locked
    def preadv(self, buffers, offset):
        cur = _Cursor(buffers)
        self._check_range(offset, cur.length)
        pos = 0
        while pos < cur.length:
            kind, host, run = self._map(offset + pos, cur.length - pos)
            views = cur.slices(pos, run)
            if kind == DATA:
                full_preadv(self.fd, views, host)
            elif kind == ZERO:
                _zero_fill(views)
            elif kind == UNALLOC:
                self._read_backing(views, offset + pos, run)
            else:
                data = self._decompress(host, (offset + pos) // self.cluster_size)
                a = (offset + pos) % self.cluster_size
                self._copy_into(views, memoryview(data)[a:a + run])
            pos += run
        return cur.length

    @staticmethod
    def _copy_into(views, src):
        p = 0
        for v in views:
            v[:] = src[p:p + len(v)]
            p += len(v)

    def _read_backing(self, views, guest_off, length):
        b = self.backing
        if b is None or guest_off >= b.size:
            _zero_fill(views)
            return
        avail = min(length, b.size - guest_off)
        if avail == length:
            b.preadv(views, guest_off)
            return
        cur = _Cursor(views)
        b.preadv(cur.slices(0, avail), guest_off)
        _zero_fill(cur.slices(avail, length - avail))

    def _decompress(self, entry_off: int, ci: int) -> bytes:
        e = self._entry(ci)
        if self.decompressed[0] == e:
            return self.decompressed[1]
        off = e & self.coffset_mask
        nsect = ((e >> self.csize_shift) & self.csize_mask) + 1
        clen = nsect * 512 - (off & 511)
        raw = direct.pread(self.fd, clen, off)
        try:
            d = zlib.decompressobj(-15)
            data = d.decompress(raw, self.cluster_size)
        except zlib.error as ex:
            raise ImageError(f"{self.path}: compressed cluster {ci} at offset {off} is corrupt: {ex}") from None
        if len(data) != self.cluster_size:
            raise ImageError(f"{self.path}: compressed cluster {ci} at offset {off} decompresses to "
                             f"{len(data)} bytes, not {self.cluster_size}")
        self.decompressed = (e, data)
        return data

    def _cluster_content(self, ci: int, e: int) -> bytes:
        """Full current content of guest cluster ci (for copy-on-write)."""
        cs = self.cluster_size
        kind, host = self._classify(e, ci)
        if kind == DATA:
            buf = bytearray(cs)
            full_preadv(self.fd, [memoryview(buf)], host)
            return buf
        if kind == COMPRESSED:
            return self._decompress(host, ci)
        if kind == ZERO:
            return bytes(cs)
        buf = bytearray(cs)
        self._read_backing([memoryview(buf)], ci * cs, cs)
        return buf

    # -------------------------------------------------------------- refcounts

    def _rb_load(self, t: int):
        """Refcount block for table index t, or None when unallocated."""
        if t >= len(self.refcount_table):
            return None
        off = self.refcount_table[t]
        if not off:
            return None
        b = self.rb_cache.get(off)
        if b is None:
            raw = direct.pread(self.fd, self.cluster_size, off)
            if len(raw) != self.cluster_size:
                raise ImageError(f"{self.path}: refcount block at offset {off} is truncated")
            b = self.rb_cache[off] = bytearray(raw)
        return b

    def _rc_get_in(self, block, i: int) -> int:
        bits = self.refcount_bits
        if bits >= 8:
            n = bits >> 3
            return int.from_bytes(block[i * n:(i + 1) * n], "big")
        per = 8 // bits
        return (block[i // per] >> ((i % per) * bits)) & ((1 << bits) - 1)

    def _rc_set_in(self, block, i: int, value: int) -> None:
        bits = self.refcount_bits
        if bits >= 8:
            n = bits >> 3
            block[i * n:(i + 1) * n] = value.to_bytes(n, "big")
            return
        per = 8 // bits
        shift = (i % per) * bits
        mask = ((1 << bits) - 1) << shift
        block[i // per] = (block[i // per] & ~mask) | (value << shift)

    def get_refcount(self, cluster: int) -> int:
        b = self._rb_load(cluster // self.rb_entries)
        if b is None:
            return 0
        return self._rc_get_in(b, cluster % self.rb_entries)

    def _set_refcount(self, cluster: int, value: int) -> None:
        t = cluster // self.rb_entries
        b = self._rb_load(t)
        if b is None:
            raise AssertionError("refcount block must exist before setting")
        if value < 0 or value > self.refcount_max:
            raise ImageError(f"{self.path}: refcount of host cluster {cluster} would "
                             f"{'underflow' if value < 0 else 'overflow'}")
        self._rc_set_in(b, cluster % self.rb_entries, value)
        self.dirty_rb.add(self.refcount_table[t])

    def _end_cluster(self) -> int:
        return -(-self.file_size // self.cluster_size)

    def _find_free(self, n: int, start: int) -> int:
        """First run of n free clusters at or after ``start``.

        Also leaves in self.first_free_seen the first free cluster it met, so that
        the allocator can move its hint past a region it just filled (a hint left
        behind makes every later search rescan the whole image: quadratic)."""
        c = start
        run = 0
        self.first_free_seen = None
        rb_entries = self.rb_entries
        bits = self.refcount_bits
        width = bits >> 3
        zero = bytes(width) if width else b""
        while True:
            t = c // rb_entries
            b = self._rb_load(t)
            if b is None:
                # A whole unallocated block: every cluster in it is free.
                if self.first_free_seen is None:
                    self.first_free_seen = c
                step = (t + 1) * rb_entries - c
                run += step
                if run >= n:
                    return c + step - run
                c += step
                continue
            i = c % rb_entries
            if width and run == 0:
                # Skip the allocated stretch in C: the next all-zero, aligned entry.
                pos = b.find(zero, i * width)
                while pos >= 0 and pos % width:
                    pos = b.find(zero, pos + width - pos % width)
                if pos < 0:
                    c = (t + 1) * rb_entries
                    continue
                c = t * rb_entries + pos // width
                i = pos // width
            if self._rc_get_in(b, i) == 0:
                if self.first_free_seen is None:
                    self.first_free_seen = c
                run += 1
                if run >= n:
                    return c - n + 1
            else:
                run = 0
            c += 1

    def _alloc_clusters(self, n: int) -> int:
        """Allocate n contiguous host clusters (refcount 1); returns the byte offset."""
        self._prepare_write()
        while True:
            start = self._find_free(n, self.free_hint)
            t_first = start // self.rb_entries
            t_last = (start + n - 1) // self.rb_entries
            missing = [t for t in range(t_first, t_last + 1) if self._rb_load(t) is None]
            if not missing:
                break
            # Put the new refcount block in the first free cluster and search again.
            self._new_refcount_block(missing[0], start)
        # Refcounts that call a table free are the classic way a table gets
        # overwritten: whatever this allocation is for, it must not be metadata.
        self.check_overlap(start * self.cluster_size, n * self.cluster_size)
        for c in range(start, start + n):
            self._set_refcount(c, 1)
        first = self.first_free_seen
        # No free cluster lies between the old hint and the first free one seen.
        self.free_hint = start + n if first is None or first >= start else first
        self.file_size = max(self.file_size, (start + n) * self.cluster_size)
        return start * self.cluster_size

    def _new_refcount_block(self, t: int, at_cluster: int) -> None:
        cs = self.cluster_size
        if t >= len(self.refcount_table):
            self._grow_refcount_table(t + 1)
            return
        own_t = at_cluster // self.rb_entries
        off = at_cluster * cs
        self.check_overlap(off, cs)
        block = bytearray(cs)
        self.rb_cache[off] = block
        self.refcount_table[t] = off
        self._meta_add(off, 1, META_REFCOUNT_BLOCK)
        self.dirty_rt.add(t)
        self.dirty_rb.add(off)
        if own_t == t:
            self._rc_set_in(block, at_cluster % self.rb_entries, 1)
        else:
            if self._rb_load(own_t) is None:
                raise AssertionError("refcount block placement")
            self._set_refcount(at_cluster, 1)
        self.file_size = max(self.file_size, off + cs)

    def _grow_refcount_table(self, min_entries: int) -> None:
        """Move the refcount table to the end of the file with room to spare.

        The new table and the refcount blocks covering it are placed together
        at the end of the file, counted by those new blocks, written, synced,
        and only then does the header switch to them.
        """
        cs = self.cluster_size
        self._writeback_refcounts()
        E = self.rb_entries
        per_cluster = cs // 8
        start = self._end_cluster()
        new_entries = max(min_entries, len(self.refcount_table) * 2)
        while True:
            table_clusters = -(-new_entries // per_cluster)
            nblocks = 0
            while True:
                total = table_clusters + nblocks
                first_t = start // E
                last_t = (start + total - 1) // E
                need = [t for t in range(first_t, last_t + 1)
                        if t >= len(self.refcount_table) or not self.refcount_table[t]]
                if len(need) <= nblocks:
                    break
                nblocks = len(need)
            if last_t < new_entries:
                break
            new_entries = last_t + 1
        table_clusters = -(-new_entries // per_cluster)
        table_off = start * cs
        new_table = array.array("Q", self.refcount_table)
        new_table.extend([0] * (table_clusters * per_cluster - len(new_table)))
        new_blocks = {}
        for k, t in enumerate(need):
            boff = (start + table_clusters + k) * cs
            new_table[t] = boff
            new_blocks[t] = bytearray(cs)
        used = list(range(start, start + table_clusters + len(need)))
        for c in used:
            t = c // E
            if t in new_blocks:
                self._rc_set_in(new_blocks[t], c % E, 1)
            else:
                self._rc_set_in(self._rb_load(t), c % E, 1)
                self.dirty_rb.add(self.refcount_table[t])
        for t, blk in new_blocks.items():
            direct.pwrite(self.fd, blk, new_table[t])
            self.rb_cache[new_table[t]] = blk
        direct.pwrite(self.fd, to_be(new_table), table_off)
        self.file_size = max(self.file_size, (start + len(used)) * cs)
        self._writeback_refcounts()  # blocks that count the new table
        os.fdatasync(self.fd)
        old_off = self.header.refcount_table_offset
        old_clusters = self.header.refcount_table_clusters
        direct.pwrite(self.fd, struct.pack(">QI", table_off, table_clusters), 48)
        os.fdatasync(self.fd)
        self.header.refcount_table_offset = table_off
        self.header.refcount_table_clusters = table_clusters
        self.refcount_table = new_table
        self.dirty_rt.clear()
        self._metadata_changed()
        for c in range(old_off // cs, old_off // cs + old_clusters):
            self._decref(c)
        self._writeback_refcounts()
        os.fdatasync(self.fd)

    def _decref(self, cluster: int) -> None:
        v = self.get_refcount(cluster)
        if v == 0:
            raise ImageError(f"{self.path}: refcount of host cluster {cluster} would underflow")
        self._set_refcount(cluster, v - 1)
        if v == 1 and cluster < self.free_hint:
            self.free_hint = cluster

    def entry_clusters(self, e: int, ci: int) -> range:
        """The host clusters an L2 entry holds a reference to."""
        kind, host = self._classify(e, ci)
        if kind == DATA or (kind == ZERO and host):
            return range(host // self.cluster_size, host // self.cluster_size + 1)
        if kind == COMPRESSED:
            nsect = ((e >> self.csize_shift) & self.csize_mask) + 1
            first = host // self.cluster_size
            last = (host + nsect * 512 - (host & 511) - 1) // self.cluster_size
            last = min(last, (self.file_size - 1) // self.cluster_size)
            return range(first, last + 1)
        return range(0)

    def _free_entry_later(self, e: int, ci: int) -> None:
        """Queue the host clusters an old L2 entry held, freed after tables are durable."""
        self._mapping_changed()
        self.pending_frees.extend(self.entry_clusters(e, ci))

    # ------------------------------------------------------- overlap check

    def _metadata(self) -> MetadataMap:
        """The metadata map, (re)built from the tables when missing: on the first
        write, and after the rare operations that move tables wholesale (snapshots,
        L1 or refcount table growth, resize, repair) and drop it."""
        m = self._meta
        if m is not None:
            return m
        m = MetadataMap()
        cs = self.cluster_size
        h = self.header
        m.add(0, 1, META_HEADER)
        if h.l1_size:
            m.add(h.l1_table_offset // cs, -(-h.l1_size * 8 // cs), META_ACTIVE_L1)
        for e in self.l1:
            if e & L1E_OFFSET_MASK:
                m.add((e & L1E_OFFSET_MASK) // cs, 1, META_ACTIVE_L2)
        m.add(h.refcount_table_offset // cs, h.refcount_table_clusters, META_REFCOUNT_TABLE)
        for e in self.refcount_table:
            if e:
                m.add(e // cs, 1, META_REFCOUNT_BLOCK)
        if self.snapshots:
            end = max(s.entry_offset + s.entry_length for s in self.snapshots)
            m.add(h.snapshots_offset // cs, -(-end // cs) - h.snapshots_offset // cs, META_SNAPSHOT_TABLE)
        for snap in self.snapshots:
            if not snap.l1_size or snap.l1_table_offset % cs or \
                    snap.l1_table_offset + snap.l1_size * 8 > self.file_size:
                continue   # a broken snapshot L1 is img check's to report; nothing to protect
            m.add(snap.l1_table_offset // cs, -(-snap.l1_size * 8 // cs), META_INACTIVE_L1)
            # One read per snapshot, once: cheap, and its L2 tables are what a stray
            # write would destroy without anyone noticing until the snapshot is applied.
            for e in be_array(direct.pread(self.fd, snap.l1_size * 8, snap.l1_table_offset)):
                off = e & L1E_OFFSET_MASK
                if off and not off % cs:
                    m.add(off // cs, 1, META_INACTIVE_L2)
        self._meta = m
        return m

    def _metadata_changed(self) -> None:
        self._meta = None
        self._mapping_changed()

    def _mapping_changed(self) -> None:
        """A guest cluster may map elsewhere now, read differently, or no longer be
        writable in place: caches of in_place_clusters' answers are dropped before
        the change can be acted on (the listeners return once nobody does I/O
        through an old answer)."""
        self.mapping_generation += 1
        for listener in self.mapping_listeners:
            listener(self.mapping_generation)

    @_locked
    def in_place_clusters(self, first: int, count: int) -> tuple[int, list[tuple[int, int]]]:
        """(mapping generation, [(guest cluster, host offset)]) for the guest clusters
        in [first, first + count) whose data lies in this file and that a read, and
        for a writable image a write, may reach directly: allocated data clusters
        (not zero, compressed or in a backing file), for a writable image only those
        held by the active table alone (an overwrite needs no copy) and clear of
        every metadata cluster. Valid until the generation changes."""
        if self.fd < 0 or self.corrupt:
            return self.mapping_generation, []
        first = max(first, 0)
        end = min(first + count, -(-self.size // self.cluster_size))
        cs, mask = self.cluster_size, self.l2_entries - 1
        out = []
        meta = None if self.read_only else self._metadata()
        ci = first
        while ci < end:
            stop = min(end, (ci | mask) + 1)
            l2off = self._l2_offset(ci >> self.l2_bits)
            if not l2off:
                ci = stop
                continue
            table = self._load_l2(l2off)
            for c in range(ci, stop):
                e = table[c & mask]
                if not e or e & (OFLAG_COMPRESSED | OFLAG_ZERO):
                    continue
                try:
                    host = (self._classify(e, c)[1] if self.read_only else self._writable_in_place(e, c))
                except ImageError:
                    continue     # a corrupt entry is the model's to report
                if not host or (meta is not None and meta.hit(host // cs, host // cs + 1) is not None):
                    continue
                out.append((c, host))
            ci = stop
        return self.mapping_generation, out

    def _meta_add(self, off: int, nclusters: int, kind: str) -> None:
        if self._meta is not None:
            self._meta.add(off // self.cluster_size, nclusters, kind)

    def _meta_remove(self, off: int, nclusters: int, kind: str) -> None:
        if self._meta is not None:
            self._meta.remove(off // self.cluster_size, nclusters, kind)

    def check_overlap(self, off: int, length: int, ignore=()) -> None:
        """Refuse a write to host bytes [off, off+length) that would land on metadata.

        Only corrupt tables lead here (refcounts calling a table free, an L2 entry
        pointing at a table), so a hit marks the image corrupt, as QEMU does, and
        stops all further writes through this driver rather than trusting its
        tables any longer."""
        if length <= 0:
            return
        cs = self.cluster_size
        hit = self._metadata().hit(off // cs, -(-(off + length) // cs), ignore)
        if hit is None:
            return
        cluster, kind = hit
        self._mark_corrupt()
        raise ImageError(f"{self.path}: preventing invalid write on metadata: host offset {off} "
                         f"(length {length}) overlaps the {kind} at offset {cluster * cs}; image "
                         f"marked corrupt, repair it with `kvmpy img check -r all {self.path}`")

    def _mark_corrupt(self) -> None:
        # Cached metadata may already point at the wrong place: drop it unwritten
        # (what the tables say on disk is the last consistent state we know).
        self.corrupt = True
        self._mapping_changed()
        self.dirty_l2.clear()
        self.dirty_l1.clear()
        self.dirty_rb.clear()
        self.dirty_rt.clear()
        self.pending_frees = []
        self.l2_cache.clear()
        self.rb_cache.clear()
        if not self.read_only and self.header.version >= 3:
            self.set_incompatible_bits(self.header.incompatible | INCOMPAT_CORRUPT)

    # ------------------------------------------------------------- writeback

    def _writeback_refcounts(self):
        if self.corrupt:
            return
        cs = self.cluster_size
        for off in sorted(self.dirty_rb):
            self.check_overlap(off, cs, (META_REFCOUNT_BLOCK,))
        for off in sorted(self.dirty_rb):
            direct.pwrite(self.fd, self.rb_cache[off], off)
        self.dirty_rb.clear()
        if self.dirty_rt:
            os.fdatasync(self.fd)  # blocks before the table points at them
            for t in self._refcount_table_waves():
                if t is None:
                    os.fdatasync(self.fd)
                    continue
                at = self.header.refcount_table_offset + t * 8
                self.check_overlap(at, 8, (META_REFCOUNT_TABLE,))
                direct.pwrite(self.fd, struct.pack(">Q", self.refcount_table[t]), at)
            self.dirty_rt.clear()

    def _refcount_table_waves(self):
        """The dirty refcount table indices in a safe order, None between waves.

        A new refcount block placed inside another block's range has its own
        refcount in that block, and that block may be new too (its table entry
        dirty in the same writeback). Then its table entry must not become durable
        before the entry that makes its refcount visible: a power loss in between
        leaves a table pointing at a block whose cluster is free (QEMU's
        alloc_refcount_block orders them the same way). So entries go out in
        waves, synced in between: first those counted by a block already in the
        durable table."""
        pending = set(self.dirty_rt)
        first = True
        while pending:
            wave = sorted(t for t in pending
                          if (self.refcount_table[t] // self.cluster_size // self.rb_entries) not in pending - {t})
            if not wave:      # cannot happen (a block is counted by an older one), but never loop forever
                wave = sorted(pending)
            if not first:
                yield None
            first = False
            yield from wave
            pending.difference_update(wave)

    def _writeback(self, sync: bool = True):
        if self.read_only or not self.write_prepared or self.corrupt:
            return
        if not (self.dirty_rb or self.dirty_rt or self.dirty_l2 or self.dirty_l1 or self.pending_frees):
            if sync:
                os.fdatasync(self.fd)
            return
        self._writeback_refcounts()
        os.fdatasync(self.fd)
        if self.dirty_l2:
            for off in sorted(self.dirty_l2):
                # Shared tables are rewritten too (COPIED flags), hence both L2 kinds.
                self.check_overlap(off, self.cluster_size, _L2_KINDS)
                direct.pwrite(self.fd, to_be(self.l2_cache[off]), off)
            self.dirty_l2.clear()
            if self.dirty_l1:
                os.fdatasync(self.fd)
        if self.dirty_l1:
            for i in sorted(self.dirty_l1):
                at = self.header.l1_table_offset + i * 8
                self.check_overlap(at, 8, (META_ACTIVE_L1,))
                direct.pwrite(self.fd, struct.pack(">Q", self.l1[i]), at)
            self.dirty_l1.clear()
        if self.pending_frees:
            os.fdatasync(self.fd)
            frees, self.pending_frees = self.pending_frees, []
            for c in frees:
                self._decref(c)
            self._writeback_refcounts()
        os.fdatasync(self.fd)
        self._evict_l2()

    @_locked
    def flush(self):
        if self.read_only:
            return
        # cache=unsafe: dirty tables still go out (in their safe order), but the
        # guest's flush waits for no disk when there are none.
        self._writeback(sync=not self.cache.flush_ignored)

    def _maybe_writeback(self):
        # Between requests only: mid-request a table may be half updated. Dirty
        # tables the cache has no room for go out so that they can be evicted.
        if (len(self.dirty_l2) + len(self.dirty_rb) > self.METADATA_DIRTY_LIMIT
                or (self.dirty_l2 and len(self.l2_cache) > self.l2_cache_tables)):
            self._writeback()

    def _prepare_write(self):
        self._check_writable()
        if self.corrupt:
            raise ImageError(f"{self.path}: image is marked corrupt after a refused write on "
                             f"metadata; repair it with `kvmpy img check -r all {self.path}`")
        if self.write_prepared:
            return
        h = self.header
        if h.version >= 3 and h.autoclear:
            # Clearing unknown autoclear bits is how the spec lets us write without
            # maintaining the features they guard (bitmaps).
            h.autoclear = 0
            direct.pwrite(self.fd, struct.pack(">Q", 0), 88)
            os.fdatasync(self.fd)
        self.write_prepared = True

    # ----------------------------------------------------------------- write

    def _l2_for_write(self, ci: int):
        """(table, index) for guest cluster ci, allocating the L2 table if needed."""
        l1i = ci >> self.l2_bits
        if l1i >= len(self.l1):
            raise ImageError(f"{self.path}: guest cluster {ci} beyond the L1 table")
        e = self.l1[l1i]
        off = e & L1E_OFFSET_MASK
        if off:
            if not e & OFLAG_COPIED and self.get_refcount(off // self.cluster_size) != 1:
                return self._copy_shared_l2(l1i, off), ci & (self.l2_entries - 1), self.l1[l1i] & L1E_OFFSET_MASK
            return self._load_l2(off), ci & (self.l2_entries - 1), off
        off = self._alloc_clusters(1)
        self._meta_add(off, 1, META_ACTIVE_L2)
        t = array.array("Q", bytes(self.cluster_size))
        self.l2_cache[off] = t
        self.dirty_l2.add(off)
        self.l1[l1i] = off | OFLAG_COPIED
        self.dirty_l1.add(l1i)
        return t, ci & (self.l2_entries - 1), off

    def _copy_shared_l2(self, l1i: int, off: int) -> array.array:
        """An internal snapshot shares this L2 table: give the active L1 its own copy.

        The data clusters keep their refcounts (they are now reached through two
        tables instead of one shared one); their entries carry no COPIED flag, so
        writes to them allocate. The old table loses the active L1's reference
        after the new L1 entry is durable."""
        self._mapping_changed()
        t = array.array("Q", self._load_l2(off))
        new_off = self._alloc_clusters(1)
        self._meta_add(new_off, 1, META_ACTIVE_L2)
        self._meta_remove(off, 1, META_ACTIVE_L2)     # still the snapshot's until it goes
        self.l2_cache[new_off] = t
        self.dirty_l2.add(new_off)
        self.l1[l1i] = new_off | OFLAG_COPIED
        self.dirty_l1.add(l1i)
        self.pending_frees.append(off // self.cluster_size)
        return t

    def _writable_in_place(self, e: int, ci: int) -> int:
        """Host offset if the cluster can be overwritten in place, else 0."""
        if e & (OFLAG_COMPRESSED | OFLAG_ZERO):
            return 0
        kind, host = self._classify(e, ci)
        if kind != DATA:
            return 0
        # With snapshots, trust the refcount over a COPIED flag another tool may have left.
        if (e & OFLAG_COPIED and not self.snapshots) or self.get_refcount(host // self.cluster_size) == 1:
            return host
        return 0

    @_locked
    def pwritev(self, buffers, offset):
        cur = _Cursor(buffers)
        self._check_range(offset, cur.length)
        self._prepare_write()
        self._write(cur, offset, 0, cur.length)
        self._maybe_writeback()
        return cur.length

    def _write(self, cur: _Cursor, offset: int, rel: int, length: int, compress: bool = False):
        """Write cur[rel:rel+length] at guest offset offset+rel."""
        cs = self.cluster_size
        end = rel + length
        pos = rel
        while pos < end:
            g = offset + pos
            ci = g // cs
            in_cl = g % cs
            n = min(cs - in_cl, end - pos)
            table, idx, _ = self._l2_for_write(ci)
            e = table[idx]
            host = self._writable_in_place(e, ci)
            if host:
                # Merge a run of in-place clusters with contiguous host offsets.
                run = n
                nxt = host + cs
                while pos + run < end and (in_cl + run) % cs == 0:
                    c2 = ci + (in_cl + run) // cs
                    t2, i2, _ = self._l2_for_write(c2)
                    h2 = self._writable_in_place(t2[i2], c2)
                    if h2 != nxt:
                        break
                    run = min(run + cs, end - pos)
                    nxt += cs
                # The host offset comes from an L2 entry, which a corrupt image may
                # point at a table.
                self.check_overlap(host + in_cl, run)
                full_pwritev(self.fd, cur.slices(pos, run), host + in_cl)
                pos += run
                continue
            if compress and in_cl == 0 and n == cs and not e:
                self._write_compressed(ci, table, idx, bytes(b"".join(cur.slices(pos, n))))
                pos += n
                continue
            # Allocate a run of clusters that all need fresh storage. An entry of 0
            # (never written) needs it for certain: no method calls for those.
            k = 1
            mask = self.l2_entries - 1
            t2 = None
            while pos + (k * cs - in_cl) < end and k < 256:
                c2 = ci + k
                if t2 is None or not c2 & mask:
                    t2, i2, _ = self._l2_for_write(c2)
                else:
                    i2 = c2 & mask
                e2 = t2[i2]
                if e2 and self._writable_in_place(e2, c2):
                    break
                k += 1
            run_end = min(end, pos + k * cs - in_cl)
            self._allocating_write(cur, offset, ci, k, pos, run_end)
            pos = run_end

    def _allocating_write(self, cur, offset, ci, k, pos, run_end):
        cs = self.cluster_size
        file_size, free_hint = self.file_size, self.free_hint
        host = self._alloc_clusters(k)
        g0 = offset + pos
        head = g0 - ci * cs
        tail = (ci + k) * cs - (offset + run_end)
        iov = []
        if head:
            old = self._cluster_content(ci, self._entry(ci))
            iov.append(memoryview(old)[:head])
        iov.extend(cur.slices(pos, run_end - pos))
        if tail:
            last = ci + k - 1
            old = self._cluster_content(last, self._entry(last))
            iov.append(memoryview(old)[cs - tail:])
        try:
            full_pwritev(self.fd, iov, host)
        except OSError:
            # Nothing refers to the new clusters yet: give them back, as QEMU's
            # qcow2_alloc_cluster_abort does, so that a failed request (a full host
            # disk, which `cont` retries) leaves no leak behind.
            for c in range(host // cs, host // cs + k):
                self._set_refcount(c, 0)
            self.file_size, self.free_hint = file_size, free_hint
            raise
        mask = self.l2_entries - 1
        t = None
        for j in range(k):
            c = ci + j
            if t is None or not c & mask:
                # Once per table: _l2_for_write made this one the active L1's own.
                t, i, l2off = self._l2_for_write(c)
            else:
                i = c & mask
            old_e = t[i]
            if old_e:
                self._free_entry_later(old_e, ci + j)
            t[i] = (host + j * cs) | OFLAG_COPIED
            self.dirty_l2.add(l2off)
        self.decompressed = (None, None)

    def _write_compressed(self, ci, table, idx, data: bytes):
        cs = self.cluster_size
        co = zlib.compressobj(6, zlib.DEFLATED, -15)
        comp = co.compress(data) + co.flush()
        if len(comp) >= cs - 512:
            cur = _Cursor([memoryview(data)])
            self._allocating_write(cur, ci * cs, ci, 1, 0, cs)
            return
        # Pack compressed clusters back to back inside a host cluster; each
        # cluster they touch holds one reference per compressed guest cluster.
        pos = self.compressed_cursor
        if not pos or (pos % cs) + len(comp) > cs:
            pos = self._alloc_clusters(1)
        else:
            self._set_refcount(pos // cs, self.get_refcount(pos // cs) + 1)
        self.check_overlap(pos, len(comp))
        direct.pwrite(self.fd, comp, pos)
        self.compressed_cursor = pos + len(comp) if (pos + len(comp)) % cs else 0
        nsect = ((pos + len(comp) - 1) >> 9) - (pos >> 9)
        table[idx] = OFLAG_COMPRESSED | (nsect << self.csize_shift) | pos
        l2off = self.l1[ci >> self.l2_bits] & L1E_OFFSET_MASK
        self.dirty_l2.add(l2off)

    @_locked
    def write_compressed(self, offset: int, data) -> None:
        """Write whole clusters compressed (img convert -c); offset cluster aligned."""
        cur = _Cursor([memoryview(data)])
        self._check_range(offset, cur.length)
        self._prepare_write()
        self._write(cur, offset, 0, cur.length, compress=True)
        self._maybe_writeback()

    @_locked
    def write_zeroes(self, offset, length, may_unmap=False):
        self._check_range(offset, length)
        self._prepare_write()
        cs = self.cluster_size
        end = offset + length
        pos = offset
        while pos < end:
            ci = pos // cs
            in_cl = pos % cs
            n = min(cs - in_cl, end - pos)
            # A partial cluster at the very end of the disk counts as whole.
            whole = in_cl == 0 and (n == cs or pos + n == self.size)
            if whole:
                self._zero_cluster(ci, may_unmap)
            else:
                e = self._entry(ci)
                kind, _ = self._classify(e, ci)
                if not (kind == ZERO or (kind == UNALLOC and self._backing_reads_zero(ci))):
                    cur = _Cursor([_ZEROS[:n]])
                    self._write(cur, pos, 0, n)
            pos += n
        self._maybe_writeback()

    def _backing_reads_zero(self, ci: int) -> bool:
        return self.backing is None or ci * self.cluster_size >= self.backing.size

    def _zero_cluster(self, ci: int, may_unmap: bool):
        table, idx, l2off = self._l2_for_write(ci)
        e = table[idx]
        kind, host = self._classify(e, ci)
        cs = self.cluster_size
        if self.header.version >= 3:
            backing_zero = self._backing_reads_zero(ci)
            if may_unmap:
                new = 0 if backing_zero else OFLAG_ZERO
                if e == new:
                    return
                if e:
                    self._free_entry_later(e, ci)
            else:
                if kind == ZERO or (kind == UNALLOC and backing_zero):
                    return
                host = self._writable_in_place(e, ci)
                if host:
                    # Keep the allocation (the guest asked not to unmap); it reads
                    # as zeroes from now on.
                    self._mapping_changed()
                    new = host | OFLAG_COPIED | OFLAG_ZERO
                else:
                    if e:
                        self._free_entry_later(e, ci)
                    new = OFLAG_ZERO
            table[idx] = new
            self.dirty_l2.add(l2off)
            return
        # Version 2 has no zero flag.
        if kind == UNALLOC and self._backing_reads_zero(ci):
            return
        if self._backing_reads_zero(ci) and may_unmap:
            self._free_entry_later(e, ci)
            table[idx] = 0
            self.dirty_l2.add(l2off)
            return
        host = self._writable_in_place(e, ci)
        if host:
            self.check_overlap(host, cs)
            write_zero_bytes(self.fd, host, cs)
        else:
            self._allocating_write(_Cursor([_ZEROS[:cs]]), ci * cs, ci, 1, 0, cs)

    @_locked
    def discard(self, offset, length):
        # Guests expect discarded ranges to read back as zeroes (as with raw).
        self.write_zeroes(offset, length, may_unmap=True)

    @_locked
    def make_empty(self) -> None:
        """Drop every guest cluster (reads then come from the backing file)."""
        self._prepare_write()
        for l1i in range(len(self.l1)):
            off = self.l1[l1i] & L1E_OFFSET_MASK
            if not off:
                continue
            t, _, off = self._l2_for_write(l1i << self.l2_bits)   # a snapshot's table stays intact
            for i, e in enumerate(t):
                if e:
                    self._free_entry_later(e, (l1i << self.l2_bits) + i)
                    t[i] = 0
            self.dirty_l2.add(off)
        self._writeback()

    @_locked
    def preallocate(self, mode: str) -> None:
        """Map every guest cluster to host storage (qemu-img create -o preallocation=).

        metadata: tables and refcounts only, the data area stays a hole in a file as
        long as the disk; falloc: the data area is fallocated; full: written with zeroes.
        Reads still return zeroes: the host clusters are fresh."""
        if mode not in ("metadata", "falloc", "full"):
            raise ImageError(f"{self.path}: preallocation={mode} unsupported (off, metadata, falloc, full)")
        self._prepare_write()
        cs = self.cluster_size
        nclusters = -(-self.size // cs)
        ci = 0
        while ci < nclusters:
            table, idx, l2off = self._l2_for_write(ci)
            k = min(self.l2_entries - idx, nclusters - ci)
            host = self._alloc_clusters(k)
            for j in range(k):
                table[idx + j] = (host + j * cs) | OFLAG_COPIED
            self.dirty_l2.add(l2off)
            if mode != "metadata":
                try:
                    os.posix_fallocate(self.fd, host, k * cs)
                except OSError as e:
                    raise ImageError(f"{self.path}: cannot preallocate: {e.strerror}") from None
            if mode == "full":
                write_zero_bytes(self.fd, host, k * cs)
            ci += k
            self._maybe_writeback()
        if self.file_size > os.fstat(self.fd).st_size:
            os.ftruncate(self.fd, self.file_size)
        self._writeback()

    # ---------------------------------------------------------------- status

    @_locked
    def block_status(self, offset, length):
        """(allocated_here, reads_zero, run) at guest offset; UNALLOC = not here."""
        length = min(length, self.size - offset)
        kind, _, run = self._map(offset, length)
        if kind == DATA or kind == COMPRESSED:
            return True, False, run
        if kind == ZERO:
            return True, True, run
        return False, self.backing is None, run

    @_locked
    def host_mapping(self, offset, length):
        """(kind, host_offset, run) for img map."""
        length = min(length, self.size - offset)
        return self._map(offset, length)

    # ---------------------------------------------------------------- resize

    @_locked
    def resize(self, new_size: int) -> None:
        self._prepare_write()
        self._metadata_changed()     # L2 tables past the new end are dropped below
        # A v3 snapshot records its own disk size (applying it restores that size), so
        # the active layer may change size freely, as in QEMU 7.2; a v2 snapshot does
        # not, and applying it after a resize would give its tables the wrong size.
        if self.snapshots and self.header.version < 3:
            raise ImageError(f"{self.path}: can't resize a v2 (compat=0.10) image which has snapshots")
        cs = self.cluster_size
        if new_size % 512:
            raise ImageError(f"{self.path}: new size {new_size} is not a multiple of 512")
        old = self.size
        if new_size < old:
            first = -(-new_size // cs)
            if first * cs < old:
                for ci in range(first, -(-old // cs)):
                    l2off = self._l2_offset(ci >> self.l2_bits)
                    if not l2off or not self._load_l2(l2off)[ci & (self.l2_entries - 1)]:
                        continue
                    # A table a snapshot shares is copied first, never cleared in place.
                    t, i, l2off = self._l2_for_write(ci)
                    self._free_entry_later(t[i], ci)
                    t[i] = 0
                    self.dirty_l2.add(l2off)
            self._writeback()
            # L2 tables wholly past the end are dropped from the L1 table.
            first_l1 = -(-first // self.l2_entries)
            for l1i in range(first_l1, len(self.l1)):
                off = self.l1[l1i] & L1E_OFFSET_MASK
                if off:
                    self.l1[l1i] = 0
                    self.dirty_l1.add(l1i)
                    self.l2_cache.pop(off, None)
                    self.dirty_l2.discard(off)
                    self.pending_frees.append(off // cs)
            self._metadata_changed()
            self._writeback()
        else:
            need = -(-new_size // (self.l2_entries * cs))
            if need > len(self.l1):
                self._grow_l1(need)
        direct.pwrite(self.fd, struct.pack(">Q", new_size), 24)
        os.fdatasync(self.fd)
        self.header.size = self.size = new_size
        if new_size > old:
            # The grown area must read as zeroes: neither a longer backing file nor
            # stale bytes in the old last cluster may reappear (as QEMU does).
            self.write_zeroes(old, new_size - old)
            self._writeback()

    def _grow_l1(self, entries: int) -> None:
        cs = self.cluster_size
        if entries * 8 > MAX_L1_BYTES:
            raise ImageError(f"{self.path}: size needs an L1 table beyond the 32 MiB limit")
        self._writeback()
        nclusters = -(-entries * 8 // cs)
        entries = nclusters * cs // 8
        new_off = self._alloc_clusters(nclusters)
        new_l1 = array.array("Q", self.l1)
        new_l1.extend([0] * (entries - len(new_l1)))
        self._writeback_refcounts()
        direct.pwrite(self.fd, to_be(new_l1), new_off)
        os.fdatasync(self.fd)
        old_off, old_size = self.header.l1_table_offset, self.header.l1_size
        direct.pwrite(self.fd, struct.pack(">IQ", entries, new_off), 36)
        os.fdatasync(self.fd)
        self.header.l1_table_offset, self.header.l1_size = new_off, entries
        self.l1 = new_l1
        self._metadata_changed()
        if old_size:
            for c in range(old_off // cs, old_off // cs + -(-old_size * 8 // cs)):
                self.pending_frees.append(c)
        self._writeback()

    # -------------------------------------------------------- header rewrite

    @_locked
    def set_backing(self, backing_file: str | None, backing_format: str | None) -> None:
        """Rewrite the header with a new backing file name (rebase)."""
        self._prepare_write()
        self._writeback()
        h = self.header
        h.backing_file = backing_file or None
        h.backing_format = backing_format if backing_file else None
        blob = h.pack()
        pad = max(0, min(self.cluster_size, self.file_size) - len(blob))
        direct.pwrite(self.fd, blob + bytes(pad), 0)
        os.fdatasync(self.fd)

    def set_incompatible_bits(self, value: int) -> None:
        if self.header.version < 3:
            return
        direct.pwrite(self.fd, struct.pack(">Q", value), 72)
        os.fdatasync(self.fd)
        self.header.incompatible = value

    @_locked
    def close(self):
        self._mapping_changed()
        if self.fd >= 0:
            try:
                if not self.read_only and self.write_prepared:
                    self._writeback()
            finally:
                direct.forget(self.fd)
                os.close(self.fd)
                self.fd = -1
        if self.backing is not None:
            self.backing.close()
            self.backing = None

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    @functools.cached_property
    def holes_are_zero(self) -> bool:
        """Whether this is a metadata-preallocated image (clusters allocated that the
        file holds as holes), so that block status must ask the file, as QEMU's
        qcow2_detect_metadata_preallocation decides: more clusters in use than 10/9
        of what the file really stores."""
        cs = self.cluster_size
        st = os.fstat(self.fd)
        threshold = st.st_blocks * 512 // cs * 10 // 9
        count = 0
        for c in range(-(-st.st_size // cs)):
            if count >= threshold:
                break
            count += self.get_refcount(c) != 0
        return count >= threshold


# ------------------------------------------------------------------- create

def create_qcow2(path: str, size: int, cluster_size: int = 65536, backing_file: str | None = None,
                 backing_format: str | None = None, version: int = 3, refcount_bits: int = 16,
                 lazy_refcounts: bool = False) -> None:
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= (2 << 20):
        raise ImageError(f"{path}: cluster_size {cluster_size} must be a power of two, 512 B to 2 MiB")
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise ImageError(f"{path}: refcount_bits {refcount_bits} must be a power of two up to 64")
    if version == 2 and refcount_bits != 16:
        raise ImageError(f"{path}: compat=0.10 images need refcount_bits=16")
    if size < 0 or size % 512:
        raise ImageError(f"{path}: size {size} must be a non-negative multiple of 512")
    cbits = cluster_size.bit_length() - 1
    h = Header()
    h.version = version
    h.cluster_bits = cbits
    h.size = size
    h.refcount_order = refcount_bits.bit_length() - 1
    h.header_length = 112 if version == 3 else 72
    h.compatible = COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0
    h.backing_file = backing_file
    h.backing_format = backing_format
    l2_entries = cluster_size // 8
    l1_size = max(1, -(-size // (l2_entries * cluster_size))) if size else 0
    if l1_size * 8 > MAX_L1_BYTES:
        raise ImageError(f"{path}: size {size} too large for cluster_size {cluster_size}")
    l1_clusters = -(-l1_size * 8 // cluster_size) if l1_size else 0
    rb_entries = cluster_size * 8 // refcount_bits
    nblocks = 1
    while True:
        rt_clusters = -(-nblocks * 8 // cluster_size)
        total = 1 + rt_clusters + nblocks + l1_clusters
        need = -(-total // rb_entries)
        if need <= nblocks:
            break
        nblocks = need
    rt_off = cluster_size
    rb_off = rt_off + rt_clusters * cluster_size
    l1_off = rb_off + nblocks * cluster_size
    h.l1_size = l1_size
    h.l1_table_offset = l1_off if l1_size else 0
    h.refcount_table_offset = rt_off
    h.refcount_table_clusters = rt_clusters
    header = h.pack()
    image = bytearray(l1_off + l1_clusters * cluster_size)
    image[:len(header)] = header
    for k in range(nblocks):
        struct.pack_into(">Q", image, rt_off + 8 * k, rb_off + k * cluster_size)
    bits = refcount_bits
    for c in range(total):
        blk = rb_off + (c // rb_entries) * cluster_size
        i = c % rb_entries
        if bits >= 8:
            nb = bits // 8
            image[blk + i * nb: blk + (i + 1) * nb] = (1).to_bytes(nb, "big")
        else:
            per = 8 // bits
            image[blk + i // per] |= 1 << ((i % per) * bits)
    fd = create_image_file(path)
    try:
        os.write(fd, image)
        os.fsync(fd)
    finally:
        os.close(fd)
