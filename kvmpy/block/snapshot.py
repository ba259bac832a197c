"""Internal qcow2 snapshots: create, apply, delete (qemu-img snapshot -c/-a/-d).

A snapshot is a copy of the L1 table plus one more reference to every L2 table
and data cluster that L1 reaches (QEMU's convention: a cluster's refcount counts
the L1 tables it is reachable from, and `qemu-img check` walks every snapshot's
L1 the same way). Shared tables and clusters lose their COPIED flag, so the
driver copies them before writing (Qcow2Driver._copy_shared_l2, allocating
writes). Each operation orders its writes so that a crash at any point leaves
only leaked clusters: references are added before anything points at them and
dropped only after nothing does.
"""

from __future__ import annotations

import array
import collections
import os
import struct
import time

from ..errors import ImageError, UserError
from . import direct
from .qcow2 import Qcow2Driver, read_snapshots
from .qcow2_format import COMPRESSED, DATA, L1E_OFFSET_MASK, OFLAG_COPIED, ZERO, be_array, to_be

HEADER_NB_SNAPSHOTS = 60          # u32 nb_snapshots, then u64 snapshots_offset: one write
MAX_NAME = 1024


def find_snapshot(drv: Qcow2Driver, key: str):
    """By ID first, then by name, as qemu-img does."""
    for s in drv.snapshots:
        if s.id == key:
            return s
    for s in drv.snapshots:
        if s.name == key:
            return s
    raise UserError(f"{drv.path}: no snapshot with ID or name {key!r}")


def _read_l1(drv: Qcow2Driver, snap) -> array.array:
    cs = drv.cluster_size
    if snap.l1_size and (snap.l1_table_offset % cs or
                         snap.l1_table_offset + snap.l1_size * 8 > drv.file_size):
        raise ImageError(f"{drv.path}: snapshot {snap.id} L1 table at offset {snap.l1_table_offset} "
                         f"is invalid")
    return be_array(direct.pread(drv.fd, snap.l1_size * 8, snap.l1_table_offset)) if snap.l1_size \
        else array.array("Q")


def _reachable(drv: Qcow2Driver, l1) -> list[int]:
    """Every host cluster an L1 table holds a reference to (its L2 tables and their data)."""
    cs = drv.cluster_size
    out = []
    for l1i, e in enumerate(l1):
        off = e & L1E_OFFSET_MASK
        if not off:
            continue
        out.append(off // cs)
        table = drv._load_l2(off)
        base = l1i << drv.l2_bits
        for i, le in enumerate(table):
            if le:
                out.extend(drv.entry_clusters(le, base + i))
    return out


def _add_references(drv: Qcow2Driver, clusters) -> None:
    counts = collections.Counter(clusters)
    for c, n in counts.items():            # check all first: fail before changing anything
        if drv.get_refcount(c) + n > drv.refcount_max:
            raise ImageError(f"{drv.path}: refcount of host cluster {c} would overflow "
                             f"(refcount_bits={drv.refcount_bits})")
    for c, n in counts.items():
        drv._set_refcount(c, drv.get_refcount(c) + n)


def _fix_copied_flags(drv: Qcow2Driver) -> None:
    """COPIED on exactly the active entries whose cluster has refcount 1 (the spec's rule,
    which qemu-img check verifies). Shared tables are rewritten too: only flags change,
    and a snapshot reading through them ignores those."""
    cs = drv.cluster_size
    for l1i, e in enumerate(drv.l1):
        off = e & L1E_OFFSET_MASK
        if not off:
            continue
        own = drv.get_refcount(off // cs) == 1
        want = off | (OFLAG_COPIED if own else 0)
        if e != want:
            drv.l1[l1i] = want
            drv.dirty_l1.add(l1i)
        table = drv._load_l2(off)
        base = l1i << drv.l2_bits
        for i, le in enumerate(table):
            if not le:
                continue
            kind, host = drv._classify(le, base + i)
            if kind == COMPRESSED or not (kind == DATA or (kind == ZERO and host)):
                continue
            flagged = le | OFLAG_COPIED if drv.get_refcount(host // cs) == 1 else le & ~OFLAG_COPIED
            if flagged != le:
                table[i] = flagged
                drv.dirty_l2.add(off)


def _entry_bytes(drv: Qcow2Driver, snap) -> bytes:
    """A snapshot table entry as stored, padding included (kept byte for byte)."""
    head = direct.pread(drv.fd, 40, snap.entry_offset)
    _, _, id_len, name_len, _, _, _, _, extra_len = struct.unpack(">QIHHIIQII", head)
    total = 40 + extra_len + id_len + name_len
    return direct.pread(drv.fd, total, snap.entry_offset) + bytes((-total) % 8)


def _new_entry(l1_off: int, l1_size: int, sid: str, name: str, disk_size: int) -> bytes:
    now = time.time_ns()
    ident, tag = sid.encode(), name.encode()
    extra = struct.pack(">QQ", 0, disk_size)          # vm_state_size_large, disk_size (v3 needs both)
    head = struct.pack(">QIHHIIQII", l1_off, l1_size, len(ident), len(tag), now // 10**9, now % 10**9,
                       0, 0, len(extra))
    blob = head + extra + ident + tag
    return blob + bytes((-len(blob)) % 8)


def _write_table(drv: Qcow2Driver, entries: list[bytes]) -> tuple[int, int]:
    """Write a new snapshot table in fresh clusters and switch the header to it.

    Returns the old table's (offset, length) for the caller to free afterwards."""
    cs = drv.cluster_size
    h = drv.header
    old = (h.snapshots_offset, sum(len(_entry_bytes(drv, s)) for s in drv.snapshots))
    blob = b"".join(entries)
    off = 0
    if blob:
        off = drv._alloc_clusters(-(-len(blob) // cs))
        drv._writeback_refcounts()
        os.fdatasync(drv.fd)
        direct.pwrite(drv.fd, blob, off)
        os.fdatasync(drv.fd)
    direct.pwrite(drv.fd, struct.pack(">IQ", len(entries), off), HEADER_NB_SNAPSHOTS)
    os.fdatasync(drv.fd)
    h.nb_snapshots, h.snapshots_offset = len(entries), off
    drv.file_size = max(drv.file_size, os.fstat(drv.fd).st_size)
    drv.snapshots = read_snapshots(drv.path, drv.fd, h, drv.file_size) if entries else []
    return old


def _free_range_later(drv: Qcow2Driver, off: int, length: int) -> None:
    if length > 0:
        cs = drv.cluster_size
        drv.pending_frees.extend(range(off // cs, -(-(off + length) // cs)))


def _begin(drv: Qcow2Driver) -> None:
    drv._mapping_changed()        # refcounts and COPIED flags change below
    drv._prepare_write()
    drv._writeback()


def create_snapshot(drv: Qcow2Driver, name: str) -> str:
    """Take an internal snapshot of the disk as it is now; returns its ID."""
    if not name or len(name.encode()) > MAX_NAME:
        raise UserError(f"{drv.path}: invalid snapshot name {name!r}")
    if any(s.name == name for s in drv.snapshots):
        raise UserError(f"{drv.path}: a snapshot named {name!r} already exists")
    _begin(drv)
    cs = drv.cluster_size
    # 1. every table and cluster the active L1 reaches gets the snapshot's reference
    _add_references(drv, _reachable(drv, drv.l1))
    l1_copy = array.array("Q", (e & ~OFLAG_COPIED for e in drv.l1))
    l1_off = drv._alloc_clusters(-(-len(l1_copy) * 8 // cs)) if len(l1_copy) else 0
    # 2. now shared: the active entries lose COPIED (flags only; the snapshot reads the same)
    _fix_copied_flags(drv)
    drv._writeback_refcounts()
    os.fdatasync(drv.fd)
    if len(l1_copy):
        direct.pwrite(drv.fd, to_be(l1_copy), l1_off)
    drv._writeback()
    # 3. the table that names it, then the header that points at the table
    ids = [int(s.id) for s in drv.snapshots if s.id.isdigit()]
    sid = str(max(ids, default=0) + 1)
    entries = [_entry_bytes(drv, s) for s in drv.snapshots]
    entries.append(_new_entry(l1_off, len(l1_copy), sid, name, drv.size))
    old_off, old_len = _write_table(drv, entries)
    _free_range_later(drv, old_off, old_len)
    drv._writeback()
    drv._metadata_changed()       # a new inactive L1 and snapshot table to protect
    return sid


def apply_snapshot(drv: Qcow2Driver, key: str) -> None:
    """Make the disk read as it did when the snapshot was taken (the snapshot stays)."""
    snap = find_snapshot(drv, key)
    # The image was resized since (v3 only): the snapshot brings its own size back.
    new_size = snap.disk_size if snap.disk_size is not None else drv.size
    _begin(drv)
    snap_l1 = _read_l1(drv, snap)
    if len(snap_l1) > len(drv.l1):
        drv._grow_l1(len(snap_l1))
    # 1. the snapshot's tables and clusters gain the active L1's reference
    _add_references(drv, _reachable(drv, snap_l1))
    drv._writeback_refcounts()
    os.fdatasync(drv.fd)
    # 2. the active L1 becomes the snapshot's (same place, same size)
    old_refs = _reachable(drv, drv.l1)
    new_l1 = array.array("Q", snap_l1)
    new_l1.extend([0] * (len(drv.l1) - len(new_l1)))
    direct.pwrite(drv.fd, to_be(new_l1), drv.header.l1_table_offset)
    os.fdatasync(drv.fd)
    drv.l1 = new_l1
    drv.dirty_l1.clear()
    if new_size != drv.size:
        # After the L1 switch: a crash in between leaves the snapshot's data under the
        # old size (reads past the snapshot's end are zeroes), never a table too short.
        direct.pwrite(drv.fd, struct.pack(">Q", new_size), 24)
        os.fdatasync(drv.fd)
        drv.header.size = drv.size = new_size
    drv._metadata_changed()       # other L2 tables are active now
    # 3. what the old active L1 reached loses its reference
    drv.pending_frees.extend(old_refs)
    drv._writeback()
    drv.l2_cache.clear()               # tables freed above must not be served from the cache
    drv.decompressed = (None, None)
    _fix_copied_flags(drv)
    drv._writeback()


def delete_snapshot(drv: Qcow2Driver, key: str) -> None:
    snap = find_snapshot(drv, key)
    _begin(drv)
    snap_l1 = _read_l1(drv, snap)
    refs = _reachable(drv, snap_l1)
    # 1. forget it: a new table without it, then the header (its clusters leak if we stop here)
    entries = [_entry_bytes(drv, s) for s in drv.snapshots if s is not snap]
    old_off, old_len = _write_table(drv, entries)
    # 2. drop its references, its L1 copy and the old table
    drv.pending_frees.extend(refs)
    if snap.l1_size:
        _free_range_later(drv, snap.l1_table_offset, snap.l1_size * 8)
    _free_range_later(drv, old_off, old_len)
    drv._writeback()
    drv.l2_cache.clear()
    drv._metadata_changed()       # its L1 and L2 tables are free clusters now
    # 3. clusters only the active L1 reaches now are its own again
    _fix_copied_flags(drv)
    drv._writeback()
