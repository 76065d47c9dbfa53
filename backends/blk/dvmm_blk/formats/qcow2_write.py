"""qcow2 writes: in place, with allocation and copy-on-write; discard; zeroes.

Owns every change a guest makes to a qcow2 image.  The order of writes is
what keeps the image consistent if the process is killed (or, with
``sync_metadata``, the machine loses power) at any point — qcow2.txt's
refcount rule, as qemu's cache dependencies enforce it:

1. new clusters are counted (refcount 1) — then a barrier (the allocator
   counts a batch ahead, so one barrier serves many writes);
2. their data is written (a partial cluster is completed from what it held
   before: the backing image, zeros, a compressed or shared cluster);
3. the L2 entries are switched to them (write-through);
4. a barrier, then the clusters they replaced lose their reference.

A crash between 1 and 3 leaks the new clusters; between 3 and 4 it leaks the
old ones.  Neither loses data or hands a cluster out twice.  Every step is
in the file (``pwrite``) before the request completes, so an acknowledged
write survives the death of the backend process.

A cluster whose L2 entry has the copied flag (refcount exactly 1) is
written in place with no metadata change, outside the image lock.  Any
other cluster — unallocated, zero, compressed, or shared with a snapshot —
gets a new one; an L2 table shared with a snapshot is copied first.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from typing import NamedTuple

from ..disk import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from .base import ImageCorrupt, ImageError, corrupt_io, split_views
from .qcow2_alloc import Allocator
from .qcow2_image import COMPRESSED, DATA, UNALLOCATED, ZERO, Qcow2Image
from .qcow2_tables import (
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Compressed,
    encode_u64,
)


class Segment(NamedTuple):
    """The part of a request inside one guest cluster."""

    cluster: int
    within: int
    length: int
    views: list[memoryview]
    entry: int


class Qcow2Writer:
    """The write side of a read-write :class:`Qcow2Image`."""

    def __init__(self, img: Qcow2Image) -> None:
        assert img.refs is not None
        self.img = img
        self.alloc = Allocator(img.refs, img.file, img.barrier)
        self.alloc.guard = self._guard
        self.cs, self.cb = img.cluster_size, img.cluster_bits
        self._punch_ok = True
        self._fixed = self._fixed_metadata()
        #: Set when a refcount was found to lie: no more writes (qemu marks
        #: such an image corrupt; 'qemu-img check -r all' is the way out).
        self.broken: str | None = None

    # -- metadata that must never be handed out ---------------------------------------------
    def _fixed_metadata(self) -> list[tuple[int, int]]:
        """Cluster ranges of the header and snapshot tables (unchanging here)."""
        img, cs = self.img, self.cs
        out = [(0, 1)]
        if img.header.nb_snapshots:
            from .qcow2_snapshot import table_length

            length = table_length(img.file, img.header)
            out.append((img.header.snapshots_offset // cs,
                        -(-(img.header.snapshots_offset + length) // cs)))
            for snap in img.snapshots:
                out.append((snap.l1_table_offset // cs,
                            -(-(snap.l1_table_offset + 8 * snap.l1_size) // cs)))
        return out

    def _guard(self, first: int, count: int) -> None:
        """Refuse to hand out clusters the active metadata uses (their refcount
        said 0: the image is corrupt).  qemu's "overlap check", for the
        structures dvmm knows without reading more of the file."""
        img, cs = self.img, self.cs
        assert img.refs is not None
        end = first + count
        ranges = [*self._fixed, (img.l1_offset // cs, -(-(img.l1_offset + 8 * len(img.l1)) // cs)),
                  (img.refs.table_offset // cs,
                   img.refs.table_offset // cs + img.refs.table_clusters)]
        hit = any(a < end and first < b for a, b in ranges) or any(
            first <= (e & OFFSET_MASK) // cs < end for e in (*img.l1, *img.refs.table)
            if e & OFFSET_MASK)
        if hit:
            self.broken = (f"qcow2 refcounts say clusters {first}..{end - 1} are free but "
                           "metadata uses them: the image is corrupt (repair it with "
                           "'qemu-img check -r all')")
            raise ImageCorrupt(self.broken)

    # -- the Disk calls ------------------------------------------------------------------
    def write(self, offset: int, bufs: list[memoryview]) -> None:
        total = sum(map(len, bufs))
        img = self.img
        host = img.single_cluster(offset, total, OFLAG_COPIED) if self.broken is None else -1
        if host >= 0:  # the common case: inside one cluster this image owns
            img.file.writev(host, bufs)
            return
        self._bounds(offset, total)
        try:
            with img.lock:
                runs = self._in_place(offset, total)
                if runs is None:
                    self._write_allocating(offset, total, bufs)
                    return
        except ImageError as exc:
            raise corrupt_io(exc) from None
        for host, n in runs:  # clusters this image owns: no metadata, no lock
            part, bufs = split_views(bufs, n)
            img.file.writev(host, part)

    def discard(self, offset: int, length: int) -> None:
        """Unmap whole clusters of the range (a hint: partial ones stay)."""
        self._bounds(offset, length)
        img = self.img
        keep_zero = img.header.version == 3 and img.backing is not None
        try:
            with img.lock:
                self._unmap(self._whole_clusters(offset, length),
                            OFLAG_ZERO if keep_zero else 0, skip_unallocated=not keep_zero)
        except ImageError as exc:
            raise corrupt_io(exc) from None

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._bounds(offset, length)
        img = self.img
        try:
            with img.lock:
                whole = self._whole_clusters(offset, length)
                if whole:
                    head = (whole[0] << self.cb) - offset
                    tail_start = min((whole[-1] + 1) << self.cb, img.size)
                    self._zero_partial(offset, head)
                    self._zero_partial(tail_start, offset + length - tail_start)
                    self._zero_whole(whole, unmap)
                else:
                    self._zero_partial(offset, length)
        except ImageError as exc:
            raise corrupt_io(exc) from None

    def _bounds(self, offset: int, length: int) -> None:
        if self.broken is not None:
            raise OSError(errno.EIO, self.broken)
        if offset < 0 or length < 0 or offset + length > self.img.size:
            raise OSError(errno.EINVAL, f"{length} bytes at {offset} lie past the end of the "
                          f"disk ({self.img.size})")

    # -- writing -------------------------------------------------------------------------
    def _clusters(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        cs, cb = self.cs, self.cb
        while length:
            within = offset & (cs - 1)
            n = min(cs - within, length)
            yield offset >> cb, within, n
            offset += n
            length -= n

    def _in_place(self, offset: int, total: int) -> list[tuple[int, int]] | None:
        """Host runs for a write into owned clusters only; None if any is not."""
        img = self.img
        runs: list[tuple[int, int]] = []
        for cluster, within, n in self._clusters(offset, total):
            entry = img.entry(cluster)
            if not _owned(entry):
                return None
            _, host = img.classify(entry, cluster)
            if runs and runs[-1][0] + runs[-1][1] == host + within:
                runs[-1] = (runs[-1][0], runs[-1][1] + n)
            else:
                runs.append((host + within, n))
        return runs

    def _write_allocating(self, offset: int, total: int, bufs: list[memoryview]) -> None:
        img, file = self.img, self.img.file
        segs: list[Segment] = []
        for cluster, within, n in self._clusters(offset, total):
            part, bufs = split_views(bufs, n)
            segs.append(Segment(cluster, within, n, part, 0))
        for l1_index in sorted({s.cluster // img.l2_entries for s in segs}):
            if any(not _owned(img.entry(s.cluster)) for s in segs
                   if s.cluster // img.l2_entries == l1_index):
                self.l2_writable(l1_index)
        segs = [s._replace(entry=img.entry(s.cluster)) for s in segs]
        for s in segs:
            if _owned(s.entry):
                img.classify(s.entry, s.cluster)  # a hostile offset stops the request here
        need = [s for s in segs if not _owned(s.entry)]
        iov: list[memoryview] = []
        for s in need:
            iov += self._whole_cluster(s)
        hosts = self._hosts(self.alloc.alloc(len(need)))  # 1: counted, durably
        for host, n in _runs(hosts, self.cs):  # 2: the data
            part, iov = split_views(iov, n * self.cs)
            file.writev(host, part)
        for s in segs:
            if _owned(s.entry):
                file.writev((s.entry & OFFSET_MASK) + s.within, s.views)
        self.set_entries([(s.cluster, hosts[i] | OFLAG_COPIED)
                          for i, s in enumerate(need)])  # 3
        self._release([s.entry for s in need])  # 4

    def _hosts(self, runs: list[tuple[int, int]]) -> list[int]:
        return [off + k * self.cs for off, n in runs for k in range(n)]

    def _whole_cluster(self, s: Segment) -> list[memoryview]:
        """A new cluster's contents: the request's bytes, completed from the old ones."""
        if s.within == 0 and s.length == self.cs:
            return list(s.views)
        old = memoryview(self.old_contents(s.entry, s.cluster))
        return [old[:s.within], *s.views, old[s.within + s.length:]]

    def old_contents(self, entry: int, cluster: int) -> bytes:
        img = self.img
        kind, host = img.classify(entry, cluster)
        if kind == DATA:
            data = img.file.read_upto(host, self.cs)
            return data + bytes(self.cs - len(data))
        if kind == COMPRESSED:
            return img.inflate(entry, cluster)
        buf = bytearray(self.cs)
        if kind == UNALLOCATED and img.backing is not None:
            start = cluster << self.cb
            n = min(self.cs, img.size - start)
            img.read_backing(start, [memoryview(buf)[:n]], n)
        return bytes(buf)

    # -- metadata ------------------------------------------------------------------------
    def l2_writable(self, l1_index: int) -> None:
        """Make L1 entry ``l1_index`` point at an L2 table this image owns."""
        img, file = self.img, self.img.file
        e = img.l1[l1_index]
        old = e & OFFSET_MASK
        if old and e & OFLAG_COPIED:
            return
        old_table = img.l2_table(l1_index) if old else None
        new = self.alloc.alloc_one()
        table = [self._copied_flag(x) for x in old_table] if old_table else \
            [0] * img.l2_entries
        file.write(new, encode_u64(table))
        img.barrier()  # the table is complete before the L1 entry points at it
        img.l1[l1_index] = new | OFLAG_COPIED
        file.write(img.l1_offset + 8 * l1_index, struct.pack(">Q", new | OFLAG_COPIED))
        img.l2_cache.put(new, table)
        if old:
            img.l2_cache.drop(old)
            img.barrier()
            self.alloc.free(old, self.cs)

    def _copied_flag(self, entry: int) -> int:
        """An entry copied out of a shared table, its copied flag recomputed."""
        host = entry & OFFSET_MASK
        if entry & OFLAG_COMPRESSED or not host:
            return entry & ~OFLAG_COPIED
        assert self.img.refs is not None
        if self.img.refs.get(host >> self.cb) == 1:
            return entry | OFLAG_COPIED
        return entry & ~OFLAG_COPIED

    def set_entries(self, updates: list[tuple[int, int]]) -> None:
        """Write L2 entries (their tables owned already), contiguous ones together."""
        img = self.img
        per = img.l2_entries
        updates.sort()
        i = 0
        while i < len(updates):
            l1_index = updates[i][0] // per
            table = img.l2_table(l1_index)
            assert table is not None
            j = i
            while j < len(updates) and updates[j][0] == updates[i][0] + (j - i) \
                    and updates[j][0] // per == l1_index:
                table[updates[j][0] % per] = updates[j][1]
                j += 1
            first = updates[i][0] % per
            img.file.write((img.l1[l1_index] & OFFSET_MASK) + 8 * first,
                           encode_u64(table[first:first + j - i]))
            i = j

    def _release(self, entries: list[int]) -> None:
        """Drop the references the replaced entries held (after a barrier)."""
        freeing = [e for e in entries if e & OFLAG_COMPRESSED or e & OFFSET_MASK]
        if not freeing:
            return
        self.img.barrier()  # 4: the entries no longer point there, durably
        for e in freeing:
            if e & OFLAG_COMPRESSED:
                start, length = Compressed(e, self.cb).host_range()
                self.alloc.free(start, length)
            else:
                self.alloc.free(e & OFFSET_MASK, self.cs, self._punch)

    def _punch(self, offset: int, length: int) -> None:
        """Give a freed cluster's space back to the filesystem (a hint)."""
        if self._punch_ok and offset < self.img.file.size:
            try:
                fallocate(self.img.file.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          offset, length)
            except OSError:
                self._punch_ok = False

    # -- discard and zeroes --------------------------------------------------------------
    def _whole_clusters(self, offset: int, length: int) -> list[int]:
        """Guest clusters the range covers entirely (the last cluster of the
        disk counts as whole when the range reaches the end of the disk)."""
        cs = self.cs
        first = -(-offset // cs)
        end = offset + length
        last = (end // cs) if end < self.img.size else -(-end // cs)
        return list(range(first, last))

    def _unmap(self, clusters: list[int], new: int, skip_unallocated: bool) -> None:
        img = self.img
        updates, old = [], []
        for c in clusters:
            e = img.entry(c)
            kind, host = img.classify(e, c)
            if kind == UNALLOCATED and skip_unallocated:
                continue
            if kind == ZERO and not host and new == OFLAG_ZERO:
                continue
            if e & OFFSET_MASK or e & OFLAG_COMPRESSED or e != new:
                updates.append((c, new))
                old.append(e)
        for l1_index in sorted({c // img.l2_entries for c, _ in updates}):
            self.l2_writable(l1_index)
        self.set_entries(updates)
        self._release(old)

    def _zero_whole(self, clusters: list[int], unmap: bool) -> None:
        img = self.img
        if img.header.version < 3:
            if img.backing is None:
                self._unmap(clusters, 0, skip_unallocated=True)
                return
            for c in clusters:
                start = c << self.cb
                self._zero_partial(start, min(self.cs, img.size - start))
            return
        keep = [c for c in clusters if not unmap and _owned(img.entry(c))]
        drop = [c for c in clusters if c not in set(keep)]
        if keep:
            for l1_index in sorted({c // img.l2_entries for c in keep}):
                self.l2_writable(l1_index)
            self.set_entries([(c, img.entry(c) | OFLAG_ZERO) for c in keep])
        self._unmap([c for c in drop if not self.reads_zero(c)], OFLAG_ZERO,
                    skip_unallocated=False)

    def _zero_partial(self, offset: int, length: int) -> None:
        if length <= 0 or self.reads_zero(offset >> self.cb):
            return
        self.write(offset, [memoryview(bytes(length))])

    def reads_zero(self, cluster: int) -> bool:
        img = self.img
        kind, _ = img.classify(img.entry(cluster), cluster)
        return kind == ZERO or (kind == UNALLOCATED and (
            img.backing is None or (cluster << self.cb) >= img.backing.size))


def _runs(hosts: list[int], cs: int) -> Iterator[tuple[int, int]]:
    """Consecutive host clusters merged: (offset, clusters)."""
    i = 0
    while i < len(hosts):
        j = i + 1
        while j < len(hosts) and hosts[j] == hosts[j - 1] + cs:
            j += 1
        yield hosts[i], j - i
        i = j


def _owned(entry: int) -> bool:
    """A data cluster with refcount 1 (copied flag), neither zero nor compressed."""
    return bool(entry & OFLAG_COPIED) and not entry & (OFLAG_COMPRESSED | OFLAG_ZERO) \
        and bool(entry & OFFSET_MASK)
