"""qcow2 consistency check and repair (what ``qemu-img check`` does).

Owns the recount: every cluster the image references — header, L1 tables
(active and snapshots'), L2 tables, data and compressed clusters, refcount
table and blocks, snapshot table, bitmap directory and tables — is counted,
and the counts are compared with the stored refcounts.  Stored below
counted is an *error* (a cluster in use that the allocator could hand out
again); stored above counted is a *leak* (wasted space).  Entries that
point outside the file or are misaligned are errors too, as are copied
flags in the active tables that disagree with the refcounts.

Repair sets stored refcounts to the counted ones (``leaks``: only where
stored is higher).  It is what a read-write open does to an image left
dirty by a crash (:func:`repair_after_crash`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .base import ImageCorrupt, ImageError
from .qcow2_image import COMPRESSED, DATA, ZERO, Qcow2Image
from .qcow2_snapshot import table_length
from .qcow2_tables import OFFSET_MASK, OFLAG_COPIED, Compressed, Refcounts, decode_u64


@dataclass
class CheckResult:
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    messages: list[str] = field(default_factory=list)


class _Counter:
    """Counted references per host cluster (within the file)."""

    def __init__(self, img: Qcow2Image, result: CheckResult) -> None:
        self.img = img
        self.result = result
        self.cb = img.cluster_bits
        self.file_clusters = -(-img.file.size >> self.cb)
        self.counts = [0] * self.file_clusters

    def add(self, offset: int, length: int, what: str) -> None:
        if length <= 0:
            return
        first, last = offset >> self.cb, (offset + length - 1) >> self.cb
        if last >= self.file_clusters:
            self.error(f"ERROR {what} at {offset:#x} lies beyond the end of the image file")
            return
        for c in range(first, last + 1):
            self.counts[c] += 1

    def error(self, message: str) -> None:
        self.result.messages.append(message)
        self.result.corruptions += 1


def check(img: Qcow2Image) -> tuple[CheckResult, list[int], Refcounts]:
    """Recount ``img``; the result, the counted references and the stored refcounts."""
    h = img.header
    result = CheckResult(total_clusters=-(-h.size // img.cluster_size))
    counter = _Counter(img, result)
    cs = img.cluster_size
    counter.add(0, cs, "header")
    _count_l1(counter, img, img.l1_offset, img.l1, active=True)
    if h.nb_snapshots:
        counter.add(h.snapshots_offset, table_length(img.file, h), "snapshot table")
        for snap in img.snapshots:
            l1 = img._load_l1(snap.l1_table_offset, snap.l1_size)
            _count_l1(counter, img, snap.l1_table_offset, l1, active=False)
    refs = img.refs or Refcounts(img.file, h.cluster_bits, h.refcount_order,
                                 h.refcount_table_offset, h.refcount_table_clusters)
    counter.add(refs.table_offset, refs.table_clusters * cs, "refcount table")
    for i, off in enumerate(refs.table):
        if off:
            counter.add(off, cs, f"refcount block {i}")
    if h.bitmaps is not None:
        _count_bitmaps(counter, img)
    _compare(counter, refs, img, result)
    return result, counter.counts, refs


def _count_l1(counter: _Counter, img: Qcow2Image, offset: int, l1: list[int],
              active: bool) -> None:
    counter.add(offset, 8 * len(l1), "L1 table")
    last_host = 0
    for i, e in enumerate(l1):
        l2_off = e & OFFSET_MASK
        if not l2_off:
            continue
        counter.add(l2_off, img.cluster_size, f"L2 table (L1 entry {i})")
        if l2_off + img.cluster_size > img.file.size:
            continue
        table = decode_u64(img.file.read(l2_off, img.cluster_size, "qcow2 L2 table"))
        for j, entry in enumerate(table):
            last_host = _count_entry(counter, img, entry, i * img.l2_entries + j, active,
                                     last_host)


def _count_entry(counter: _Counter, img: Qcow2Image, entry: int, cluster: int,
                 active: bool, last_host: int) -> int:
    res = counter.result
    try:
        kind, host = img.classify(entry, cluster)
    except ImageCorrupt as exc:
        counter.error(f"ERROR {exc}")
        return last_host
    if kind == COMPRESSED:
        start, length = Compressed(entry, img.cluster_bits).host_range()
        counter.add(start, length, f"compressed cluster of guest cluster {cluster}")
        if active:
            res.allocated_clusters += 1
            res.compressed_clusters += 1
            res.fragmented_clusters += 1
        return 0
    if kind in (DATA, ZERO) and host:
        counter.add(host, img.cluster_size, f"data cluster of guest cluster {cluster}")
        if active:
            res.allocated_clusters += 1
            if last_host and host != last_host:
                res.fragmented_clusters += 1
            return host + img.cluster_size
    return last_host


def _count_bitmaps(counter: _Counter, img: Qcow2Image) -> None:
    assert img.header.bitmaps is not None
    nb, size, offset = img.header.bitmaps
    if size > 64 << 20:
        counter.error("ERROR bitmap directory is too large")
        return
    counter.add(offset, size, "bitmap directory")
    data = img.file.read(offset, size, "qcow2 bitmap directory")
    pos = 0
    for _ in range(nb):
        if pos + 24 > len(data):
            counter.error("ERROR bitmap directory is truncated")
            return
        t_off, t_size, _, name_len, _, _, extra = struct.unpack_from(">QIIHBBI", data, pos)
        counter.add(t_off, 8 * t_size, "bitmap table")
        if t_off + 8 * t_size <= img.file.size:
            for e in decode_u64(img.file.read(t_off, 8 * t_size, "bitmap table")):
                if e & OFFSET_MASK:
                    counter.add(e & OFFSET_MASK, img.cluster_size, "bitmap data")
        length = 24 + extra + name_len
        pos += length + (-length % 8)


def _compare(counter: _Counter, refs: Refcounts, img: Qcow2Image,
             result: CheckResult) -> None:
    highest = -1
    for c in range(counter.file_clusters):
        try:
            stored = refs.get(c)
        except ImageError as exc:
            result.messages.append(f"ERROR {exc}")
            result.check_errors += 1
            return
        counted = counter.counts[c]
        if stored or counted:
            highest = c
        if stored < counted:
            counter.error(f"ERROR cluster {c} refcount={stored} reference={counted}")
        elif stored > counted:
            result.messages.append(f"Leaked cluster {c} refcount={stored} reference={counted}")
            result.leaks += 1
    result.image_end_offset = (highest + 1) * img.cluster_size
    _check_copied(img, refs, result)


def _check_copied(img: Qcow2Image, refs: Refcounts, result: CheckResult) -> None:
    """The copied flag of the active tables must say "refcount is 1"."""
    cb = img.cluster_bits
    for i, e in enumerate(img.l1):
        off = e & OFFSET_MASK
        if not off or off + img.cluster_size > img.file.size:
            continue
        if bool(e & OFLAG_COPIED) != (refs.get(off >> cb) == 1):
            result.messages.append(f"ERROR OFLAG_COPIED L2 cluster: l1_index={i} "
                                   f"l1_entry={e:x} refcount={refs.get(off >> cb)}")
            result.corruptions += 1
        for j, entry in enumerate(decode_u64(img.file.read(off, img.cluster_size, "L2"))):
            host = entry & OFFSET_MASK
            if not host or entry & (1 << 62) or host >= img.file.size:
                continue
            if bool(entry & OFLAG_COPIED) != (refs.get(host >> cb) == 1):
                result.messages.append(f"ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} "
                                       f"refcount={refs.get(host >> cb)}")
                result.corruptions += 1
                del j


def repair(img: Qcow2Image, fix_errors: bool) -> CheckResult:
    """Check, then set stored refcounts to the counted ones (leaks only, or all)."""
    result, counts, refs = check(img)
    if result.corruptions and not fix_errors:
        return result
    for c, counted in enumerate(counts):
        stored = refs.get(c)
        if stored > counted or (fix_errors and stored < counted):
            if refs.block(c // refs.block_entries) is None:
                raise ImageError(f"cannot repair cluster {c}: its refcount block is missing "
                                 "(try 'qemu-img check -r all')")
            refs.change(c, 1, counted - stored)
            if stored > counted:
                result.leaks_fixed += 1
            else:
                result.corruptions_fixed += 1
    _reclaim_past_end(refs, len(counts))
    img.file.flush()
    return result


def _reclaim_past_end(refs: Refcounts, first: int) -> None:
    """Counts of clusters past the end of the file: what a crash left
    reserved and never wrote (qemu-img check does not look there; nothing
    there can be in use)."""
    per = refs.block_entries
    for index in range(first // per, len(refs.table)):
        blk = refs.block(index)
        if blk is None:
            continue
        for i in range(max(0, first - index * per), per):
            if blk[i]:
                refs.change(index * per + i, 1, -blk[i])


def repair_after_crash(img: Qcow2Image) -> CheckResult:
    """A dirty image opened read-write: reclaim leaks (and fix any under-count
    that lazy refcounts left) before the first allocation."""
    return repair(img, fix_errors=True)
