"""Consistency check (and repair) of qcow2 refcounts, as `qemu-img check` does.

Every host cluster's expected reference count is rebuilt by walking what points
at it (header, L1/L2 tables, data and compressed clusters, snapshots, the
refcount structures themselves) and compared with the stored count. Stored
higher than expected is a leak (wasted space); lower is a corruption (a later
allocation could overwrite live data).
"""

from __future__ import annotations

import array

from ..errors import ImageError
from .driver import BlockDriver
from .qcow2_format import (INCOMPAT_CORRUPT, INCOMPAT_DIRTY, L1E_OFFSET_MASK, L1E_RESERVED,
                           L2E_OFFSET_MASK, L2E_STD_RESERVED, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
                           be_array)


class CheckResult:
    def __init__(self):
        self.corruptions = 0
        self.leaks = 0
        self.check_errors = 0
        self.corruptions_fixed = 0
        self.leaks_fixed = 0
        self.messages = []
        self.allocated_clusters = 0
        self.total_clusters = 0
        self.fragmented_clusters = 0
        self.compressed_clusters = 0
        self.image_end_offset = 0

    def as_dict(self, path) -> dict:
        d = {"filename": path, "format": "qcow2", "check-errors": self.check_errors,
             "image-end-offset": self.image_end_offset,
             "total-clusters": self.total_clusters, "allocated-clusters": self.allocated_clusters,
             "fragmented-clusters": self.fragmented_clusters,
             "compressed-clusters": self.compressed_clusters}
        if self.corruptions:
            d["corruptions"] = self.corruptions
        if self.leaks:
            d["leaks"] = self.leaks
        if self.corruptions_fixed:
            d["corruptions-fixed"] = self.corruptions_fixed
        if self.leaks_fixed:
            d["leaks-fixed"] = self.leaks_fixed
        return d


def check_image(drv: BlockDriver, repair: str | None = None) -> CheckResult:
    """Check an open qcow2 image (a Qcow2Driver); repair: None, "leaks" or "all"."""
    res = CheckResult()
    cs = drv.cluster_size
    h = drv.header
    nclusters = max(drv._end_cluster(), 1)
    expected = array.array("Q", bytes(8 * nclusters))
    beyond = []

    def inc(off, length, what):
        if length <= 0:
            return
        first = off // cs
        last = (off + length - 1) // cs
        for c in range(first, last + 1):
            if c >= nclusters:
                beyond.append((what, c * cs))
                return
            expected[c] += 1

    def err(msg):
        res.corruptions += 1
        res.messages.append("ERROR " + msg)

    inc(0, cs, "header")
    copied_fixes = []   # (kind, location, new_value)

    def walk_l1(l1, l1_off, l1_size, active):
        inc(l1_off, l1_size * 8, "L1 table")
        prev_host = None
        for l1i, e in enumerate(l1):
            if e & L1E_RESERVED:
                err(f"L1 entry {l1i} has reserved bits set: 0x{e:016x}")
                continue
            l2off = e & L1E_OFFSET_MASK
            if not l2off:
                continue
            if l2off % cs:
                err(f"L2 table offset {l2off:#x} unaligned (L1 index {l1i})")
                continue
            if l2off + cs > drv.file_size:
                err(f"L2 table offset {l2off:#x} beyond end of file (L1 index {l1i})")
                continue
            inc(l2off, cs, "L2 table")
            t = drv._load_l2(l2off) if active else be_array(drv_pread(l2off, cs))
            for i, le in enumerate(t):
                if not le:
                    continue
                ci = (l1i << drv.l2_bits) + i
                if le & OFLAG_COMPRESSED:
                    off = le & drv.coffset_mask
                    nsect = ((le >> drv.csize_shift) & drv.csize_mask) + 1
                    length = nsect * 512 - (off & 511)
                    end = min(off + length, drv.file_size)
                    if off >= drv.file_size:
                        err(f"compressed cluster {ci} offset {off:#x} beyond end of file")
                        continue
                    if active:
                        res.compressed_clusters += 1
                        res.allocated_clusters += 1
                    inc(off, end - off, "compressed cluster")
                    continue
                if le & L2E_STD_RESERVED:
                    err(f"L2 entry for cluster {ci} has reserved bits set: 0x{le:016x}")
                    continue
                host = le & L2E_OFFSET_MASK
                if le & OFLAG_ZERO and h.version < 3:
                    err(f"zero flag in version 2 image (cluster {ci})")
                    continue
                if host:
                    if host % cs:
                        err(f"cluster {ci} host offset {host:#x} unaligned")
                        continue
                    if host >= drv.file_size:
                        err(f"cluster {ci} host offset {host:#x} beyond end of file")
                        continue
                    inc(host, cs, "data cluster")
                    if active and not le & OFLAG_ZERO:
                        res.allocated_clusters += 1
                        if prev_host is not None and host != prev_host + cs:
                            res.fragmented_clusters += 1
                        prev_host = host

    def drv_pread(off, n):
        import os
        return os.pread(drv.fd, n, off)

    walk_l1(drv.l1, h.l1_table_offset, h.l1_size, True)
    for s in drv.snapshots:
        if s.l1_table_offset % cs or s.l1_table_offset + s.l1_size * 8 > drv.file_size:
            err(f"snapshot {s.id} L1 table at {s.l1_table_offset:#x} invalid")
            continue
        walk_l1(be_array(drv_pread(s.l1_table_offset, s.l1_size * 8)), s.l1_table_offset,
                s.l1_size, False)
    if drv.snapshots:
        last = drv.snapshots[-1]
        end = last.entry_offset + 40 + 16
        import os
        import struct
        _, _, id_len, name_len, *_rest, extra_len = struct.unpack(">QIHHIIQII", os.pread(drv.fd, 40, last.entry_offset))
        end = last.entry_offset + 40 + extra_len + id_len + name_len
        inc(h.snapshots_offset, end - h.snapshots_offset, "snapshot table")
    inc(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
    for t, off in enumerate(drv.refcount_table):
        if off:
            inc(off, cs, "refcount block")
    for what, off in beyond:
        err(f"{what} at {off:#x} lies beyond the end of the file")

    res.total_clusters = -(-drv.size // cs)
    # Compare stored with expected.
    mismatches = []
    covered = len(drv.refcount_table) * drv.rb_entries
    for c in range(max(nclusters, 0)):
        stored = drv.get_refcount(c) if c < covered else 0
        exp = expected[c]
        if stored != exp:
            mismatches.append((c, stored, exp))
    # Clusters with refcounts past the end of the file are leaks too.
    for t, off in enumerate(drv.refcount_table):
        if not off:
            continue
        base = t * drv.rb_entries
        if base + drv.rb_entries <= nclusters:
            continue
        blk = drv._rb_load(t)
        for i in range(max(0, nclusters - base), drv.rb_entries):
            v = drv._rc_get_in(blk, i)
            if v:
                mismatches.append((base + i, v, 0))

    for c, stored, exp in mismatches:
        if stored > exp:
            res.leaks += 1
            res.messages.append(f"Leaked cluster {c} refcount={stored} reference={exp}")
        else:
            res.corruptions += 1
            res.messages.append(f"ERROR cluster {c} refcount={stored} reference={exp}")

    # OFLAG_COPIED must be set exactly when the refcount is 1 (active tables only).
    for l1i, e in enumerate(drv.l1):
        l2off = e & L1E_OFFSET_MASK
        if not l2off or l2off % cs or l2off + cs > drv.file_size or e & L1E_RESERVED:
            continue
        c = l2off // cs
        want = expected[c] == 1 if c < nclusters else False
        if bool(e & OFLAG_COPIED) != want:
            res.corruptions += 1
            res.messages.append(f"ERROR OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={e:x} "
                                f"refcount={expected[c] if c < nclusters else 0}")
            copied_fixes.append(("l1", l1i, (e | OFLAG_COPIED) if want else (e & ~OFLAG_COPIED)))
        t = drv._load_l2(l2off)
        for i, le in enumerate(t):
            if not le or le & OFLAG_COMPRESSED or le & L2E_STD_RESERVED:
                if le & OFLAG_COMPRESSED and le & OFLAG_COPIED:
                    res.corruptions += 1
                    copied_fixes.append(("l2", (l2off, i), le & ~OFLAG_COPIED))
                continue
            host = le & L2E_OFFSET_MASK
            if not host or host >= drv.file_size or host % cs:
                continue
            want = expected[host // cs] == 1
            if bool(le & OFLAG_COPIED) != want:
                res.corruptions += 1
                res.messages.append(f"ERROR OFLAG_COPIED data cluster: l2_entry={le:x} "
                                    f"refcount={expected[host // cs]}")
                copied_fixes.append(("l2", (l2off, i), (le | OFLAG_COPIED) if want else (le & ~OFLAG_COPIED)))

    res.image_end_offset = drv.file_size
    last_used = max((c for c in range(nclusters - 1, -1, -1) if expected[c]), default=0)
    res.image_end_offset = (last_used + 1) * cs

    if repair and (mismatches or copied_fixes or h.incompatible & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)):
        _repair(drv, res, mismatches, copied_fixes, repair)
    return res


def _repair(drv: BlockDriver, res: CheckResult, mismatches, copied_fixes, mode):
    if drv.read_only:
        raise ImageError(f"{drv.path}: cannot repair an image opened read-only")
    fix_errors = mode == "all"
    structural = [m for m in res.messages if m.startswith("ERROR") and "refcount=" not in m
                  and "OFLAG_COPIED" not in m]
    if structural and fix_errors:
        raise ImageError(f"{drv.path}: cannot repair: {structural[0][6:]}")
    drv._prepare_write()
    drv._metadata_changed()   # the tables as they are now, not as when the driver opened
    # Missing refcount blocks go at the end of the file, which is certainly free.
    drv.free_hint = drv._end_cluster()
    for c, stored, exp in mismatches:
        if stored > exp or fix_errors:
            t = c // drv.rb_entries
            if drv._rb_load(t) is None:
                if exp == 0:
                    continue
                drv._new_refcount_block(t, drv._find_free(1, drv.free_hint))
                if drv._rb_load(t) is None:
                    drv._new_refcount_block(t, drv._find_free(1, drv.free_hint))
            drv._set_refcount(c, exp)
            if stored > exp:
                res.leaks_fixed += 1
            else:
                res.corruptions_fixed += 1
    if fix_errors:
        for kind, where, value in copied_fixes:
            if kind == "l1":
                drv.l1[where] = value
                drv.dirty_l1.add(where)
            else:
                l2off, i = where
                drv._load_l2(l2off)[i] = value
                drv.dirty_l2.add(l2off)
            res.corruptions_fixed += 1
        drv._mapping_changed()
    drv.free_hint = 0
    drv._writeback()
    h = drv.header
    if h.incompatible & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT) and (fix_errors or not res.corruptions):
        drv.set_incompatible_bits(h.incompatible & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT))
