"""A qcow2 image: open, map guest offsets to file extents, read, flush, close.

Owns the state of one open qcow2 file: the checked header, the active L1
table (or a snapshot's, read-only), the L2 table cache, the cache of
decompressed clusters, the backing image, and the image's lock.  Writes,
discard and write-zeroes are :mod:`.qcow2_write`'s (built only for a
read-write open); refcounts are :mod:`.qcow2_tables`' and the allocator
:mod:`.qcow2_alloc`'s.

Concurrency: the blk engines call ``read``/``write`` from several threads.
Every look-up and every metadata change holds ``self.lock``; the data
transfer of a read, and of a write into clusters already owned by the
active L1 (refcount 1), runs outside it.  Requests that overlap are ordered
by the dispatcher (:mod:`dvmm_blk.ordering`), so a cluster is never freed
while a transfer into it is in flight (only a write covering the whole
cluster frees it: discard, write-zeroes, and those overlap).

The dirty bit (version 3, incompatible bit 0) is set while the image is open
read-write and cleared on a clean close: a crash leaves it set and the next
read-write open reclaims what the crash leaked (:mod:`.qcow2_check`), as
qemu does for an image left dirty.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..disk import IOV_MAX
from .base import BlockImage, Extent, ImageCorrupt, ImageError, ImageFile, ImageUnsupported
from .compress import inflate_raw, unzstd
from .qcow2_header import (
    AUTOCLEAR_BITMAPS,
    COMPRESSION_ZSTD,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    OFF_INCOMPAT,
    parse_header,
)
from .qcow2_snapshot import Snapshot, find_snapshot, read_snapshots
from .qcow2_tables import (
    L1_RESERVED,
    L2_RESERVED,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Compressed,
    Refcounts,
    TableCache,
    decode_u64,
)

if TYPE_CHECKING:
    from .qcow2_write import Qcow2Writer

log = logging.getLogger("dvmm.blk")
_NOT_PLAIN = OFLAG_COMPRESSED | OFLAG_ZERO | L2_RESERVED

#: How an L2 entry reads (``classify``).
UNALLOCATED, ZERO, DATA, COMPRESSED = "unallocated", "zero", "data", "compressed"


class Qcow2Image(BlockImage):
    """One qcow2 file (and, through ``backing``, its chain)."""

    format_name = "qcow2"

    def __init__(self, file: ImageFile, *, snapshot: str | None = None,
                 cache_tables: int = 32, sync_metadata: bool | None = None) -> None:
        head = file.read_upto(0, 1 << 21)
        self.header = h = parse_header(head, file.size)
        super().__init__(file, h.size)
        self.cluster_bits = h.cluster_bits
        self.cluster_size = h.cluster_size
        self.l2_entries = h.l2_entries
        self.backing_name = h.backing_file
        self.backing_format = h.backing_format
        self.lock = threading.RLock()
        self.l2_cache: TableCache[list[int]] = TableCache(cache_tables)
        self._inflated: TableCache[bytes] = TableCache(4)  # decompressed clusters, by host offset
        self.snapshots: list[Snapshot] = read_snapshots(file, h) if h.nb_snapshots else []
        self.l1_offset, l1_size = h.l1_table_offset, h.l1_size
        if snapshot is not None:
            snap = find_snapshot(self.snapshots, snapshot)
            self.l1_offset, l1_size = snap.l1_table_offset, snap.l1_size
            self.size = snap.disk_size if snap.disk_size is not None else h.size
            if -(-self.size // (self.cluster_size * self.l2_entries)) > l1_size:
                raise ImageCorrupt(f"qcow2 snapshot {snapshot!r} L1 table is too small")
        self.l1 = self._load_l1(self.l1_offset, l1_size)
        #: fdatasync between a refcount and the entry that uses it (not on tmpfs,
        #: whose files do not outlive a power loss anyway).
        self.sync_metadata = (not file.memory_backed) if sync_metadata is None else sync_metadata
        self.refs: Refcounts | None = None
        self._writer: Qcow2Writer | None = None
        self._set_dirty = False
        self._nowait_ok = hasattr(os, "RWF_NOWAIT") and not file.memory_backed
        if not self.read_only:
            self._open_writable(cache_tables, snapshot)

    # -- opening -----------------------------------------------------------------------
    def _load_l1(self, offset: int, size: int) -> list[int]:
        l1 = decode_u64(self.file.read(offset, 8 * size, "qcow2 L1 table")) if size else []
        for i, e in enumerate(l1):
            if e & L1_RESERVED or (e & OFFSET_MASK) % self.cluster_size:
                raise ImageCorrupt(f"qcow2 L1 entry {i} ({e:#x}) is invalid (reserved bits "
                                   "or an unaligned L2 table offset)")
        return l1

    def _open_writable(self, cache_tables: int, snapshot: str | None) -> None:
        h = self.header
        if snapshot is not None:
            raise ImageUnsupported("a qcow2 snapshot can only be opened read-only")
        if h.incompatible & INCOMPAT_CORRUPT:
            raise ImageCorrupt("qcow2 image is marked corrupt: open it read-only, or repair "
                               "it with 'qemu-img check -r all'")
        if h.bitmaps is not None or h.autoclear & AUTOCLEAR_BITMAPS:
            raise ImageUnsupported("qcow2 images with persistent bitmaps are read-only in dvmm")
        self.refs = Refcounts(self.file, h.cluster_bits, h.refcount_order,
                              h.refcount_table_offset, h.refcount_table_clusters,
                              cache_tables)
        if h.autoclear:  # unknown auto-clear features must be cleared before writing
            self.file.write(88, struct.pack(">Q", 0))
            h.autoclear = 0
        from .qcow2_write import Qcow2Writer

        if h.version == 3 and h.incompatible & INCOMPAT_DIRTY:
            from .qcow2_check import repair_after_crash

            repair_after_crash(self)
        self._writer = Qcow2Writer(self)
        if h.version == 3:
            self.set_incompatible(h.incompatible | INCOMPAT_DIRTY)
            self._set_dirty = True

    def set_incompatible(self, bits: int) -> None:
        """Rewrite incompatible_features, made durable before and after."""
        self.file.flush()
        self.file.write(OFF_INCOMPAT, struct.pack(">Q", bits))
        self.file.flush()
        self.header.incompatible = bits

    def barrier(self) -> None:
        """Order two metadata writes across a power loss (see :attr:`sync_metadata`)."""
        if self.sync_metadata:
            self.file.flush()

    # -- looking up ----------------------------------------------------------------------
    def l2_table(self, l1_index: int) -> list[int] | None:
        """The L2 table of L1 entry ``l1_index`` (None: unallocated). Lock held."""
        if l1_index >= len(self.l1):
            raise ImageCorrupt(f"qcow2 guest offset needs L1 entry {l1_index}, the table has "
                               f"{len(self.l1)}")
        offset = self.l1[l1_index] & OFFSET_MASK
        if not offset:
            return None
        table = self.l2_cache.get(offset)
        if table is None:
            table = decode_u64(self.file.read(offset, self.cluster_size,
                                              f"qcow2 L2 table (L1 entry {l1_index})"))
            self.l2_cache.put(offset, table)
        return table

    def entry(self, cluster: int) -> int:
        table = self.l2_table(cluster // self.l2_entries)
        return 0 if table is None else table[cluster % self.l2_entries]

    def classify(self, entry: int, cluster: int) -> tuple[str, int]:
        """What an L2 entry means: (kind, host offset), each field checked."""
        if entry & OFLAG_COMPRESSED:
            return COMPRESSED, 0
        if entry & L2_RESERVED:
            raise ImageCorrupt(f"qcow2 L2 entry of guest cluster {cluster} ({entry:#x}) has "
                               "reserved bits set")
        host = entry & OFFSET_MASK
        if entry & OFLAG_ZERO:
            if self.header.version < 3:
                raise ImageCorrupt(f"qcow2 version 2 L2 entry of guest cluster {cluster} has "
                                   "the zero flag")
            return ZERO, host
        if not host:
            if entry & OFLAG_COPIED:
                raise ImageCorrupt(f"qcow2 L2 entry of guest cluster {cluster} has offset 0 "
                                   "with the copied flag")
            return UNALLOCATED, 0
        if host % self.cluster_size:
            raise ImageCorrupt(f"qcow2 data cluster offset {host:#x} of guest cluster "
                               f"{cluster} is not aligned")
        if host >= self.file.size:
            raise ImageCorrupt(f"qcow2 data cluster offset {host:#x} of guest cluster "
                               f"{cluster} lies beyond the end of the file")
        return DATA, host

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        with self.lock:
            found = list(self._extents(offset, length))
        return iter(found)

    def _extents(self, offset: int, length: int) -> Iterator[Extent]:
        cs, cb = self.cluster_size, self.cluster_bits
        run: Extent | None = None
        while length:
            cluster, within = offset >> cb, offset & (cs - 1)
            n = min(cs - within, length)
            entry = self.entry(cluster)
            kind, host = self.classify(entry, cluster)
            if kind == DATA:
                ext = Extent(n, "data", host + within)
            elif kind == COMPRESSED:
                ext = Extent(n, "bytes", self.inflate(entry, cluster), within)
            elif kind == ZERO or self.backing is None:
                ext = Extent(n, "zero")
            else:
                ext = Extent(n, "backing")
            if run is not None and _joins(run, ext):
                run = run._replace(length=run.length + n)
            else:
                if run is not None:
                    yield run
                run = ext
            offset += n
            length -= n
        if run is not None:
            yield run

    def inflate(self, entry: int, cluster: int) -> bytes:
        """The contents of a compressed cluster (cached)."""
        c = Compressed(entry, self.cluster_bits)
        data = self._inflated.get(c.offset)
        if data is not None:
            return data
        if c.offset >= self.file.size:
            raise ImageCorrupt(f"qcow2 compressed cluster of guest cluster {cluster} lies "
                               "beyond the end of the file")
        raw = self.file.read_upto(c.offset, c.length)
        if self.header.compression_type == COMPRESSION_ZSTD:
            out = unzstd(raw, self.cluster_size)
        else:
            out = inflate_raw(raw, self.cluster_size)
        self._inflated.put(c.offset, out)
        return out

    def read(self, offset: int, bufs: list[memoryview]) -> None:
        """The common case first: a read inside one data cluster is one
        ``preadv`` (after a look-up under the lock); anything else walks
        the extents."""
        total = sum(map(len, bufs))
        host = self.single_cluster(offset, total, 0)
        if host >= 0:
            self.file.readv(host, bufs)
            return
        super().read(offset, bufs)

    #: The file extent of a request changes when the guest discards or
    #: rewrites its cluster: ask :meth:`native` only when it may start now.
    native_is_stable = False

    def native(self, op: str, offset: int, bufs: list[memoryview]
               ) -> tuple[str, int, int, list[memoryview]] | None:
        """A read, an in-place write or a flush as one system call an engine
        can make itself (io_uring); None when the format has work to do."""
        if op == "flush":
            return op, self.file.fd, 0, []
        bufs = [b for b in bufs if len(b)]
        if len(bufs) > IOV_MAX or (op == "write" and (
                self._writer is None or self._writer.broken is not None)):
            return None
        host = self.single_cluster(offset, sum(map(len, bufs)),
                                   OFLAG_COPIED if op == "write" else 0)
        return (op, self.file.fd, host, bufs) if host >= 0 else None

    def try_read(self, offset: int, bufs: list[memoryview]) -> bool:
        """A read inside one data cluster, if the page cache holds it
        (``RWF_NOWAIT``, :class:`dvmm_blk.disk.CachedReads`); False: the
        engine reads it."""
        if not self._nowait_ok or len(bufs) > IOV_MAX:
            return False
        total = sum(map(len, bufs))
        host = self.single_cluster(offset, total, 0)
        if host < 0:
            return False
        try:
            done = os.preadv(self.file.fd, bufs, host, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                self._nowait_ok = False
                return False
            raise
        return done == total

    def single_cluster(self, offset: int, total: int, need: int) -> int:
        """The file offset of ``[offset, offset+total)`` if it lies in data
        clusters that follow each other in the file, each L2 entry with
        every flag of ``need`` (and neither compressed nor zero); -1
        otherwise (the slow path decides).  Most requests: one or two
        clusters, one look-up each."""
        cb, cs = self.cluster_bits, self.cluster_size
        if total <= 0 or offset < 0 or offset + total > self.size:
            return -1
        first, last = offset >> cb, (offset + total - 1) >> cb
        if last - first > 16:
            return -1
        start = -1
        with self.lock:
            for cluster in range(first, last + 1):
                try:
                    entry = self.entry(cluster)
                except ImageError:
                    return -1
                host = entry & OFFSET_MASK
                if entry & _NOT_PLAIN or entry & need != need or not host \
                        or host & (cs - 1) or host >= self.file.size:
                    return -1
                if start < 0:
                    start = host
                elif host != start + ((cluster - first) << cb):
                    return -1
        return start + (offset & (cs - 1))

    # -- writing: the writer's -----------------------------------------------------------
    def write(self, offset: int, bufs: list[memoryview]) -> None:
        if self._writer is None:
            return super().write(offset, bufs)
        self._writer.write(offset, bufs)

    def discard(self, offset: int, length: int) -> None:
        if self._writer is None:
            return super().discard(offset, length)
        self._writer.discard(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if self._writer is None:
            return super().write_zeroes(offset, length, unmap)
        self._writer.write_zeroes(offset, length, unmap)

    def flush(self) -> None:
        if not self.read_only:
            self.file.flush()

    def close(self) -> None:
        """Give back reserved clusters and clear the dirty bit; an image
        whose metadata turned out bad, or a failing disk, stays dirty."""
        with self.lock:
            try:
                if self.file.fd >= 0 and self._writer is not None \
                        and self._writer.broken is None:
                    self._writer.alloc.release()
                    if self._set_dirty:
                        self.set_incompatible(self.header.incompatible & ~INCOMPAT_DIRTY)
                        self._set_dirty = False
            except (ImageError, OSError) as exc:
                log.warning("%s left marked dirty: %s", self.path, exc)
            finally:
                super().close()


def _joins(run: Extent, ext: Extent) -> bool:
    if run.kind != ext.kind:
        return False
    if run.kind == "data":
        assert isinstance(run.arg, int)
        return run.arg + run.length == ext.arg
    return run.kind in ("zero", "backing")


def open_qcow2(path: str, read_only: bool, **kw: object) -> Qcow2Image:
    file = ImageFile(path, read_only)
    try:
        return Qcow2Image(file, **kw)  # type: ignore[arg-type]
    except (ImageError, OSError):
        file.close()
        raise
