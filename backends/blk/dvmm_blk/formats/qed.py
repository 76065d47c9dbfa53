"""QED images, read-only (QEMU ``docs/interop/qed_spec.txt``).

Owns the QED header (little-endian), its two-level tables (L1 and L2 tables
of ``table_size`` clusters, entries are cluster offsets: 0 unallocated, 1
a zero cluster) and the backing file.  Every field is checked against the
spec's ranges and the file's size; a bad one is an :class:`ImageCorrupt`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from .base import BlockImage, Extent, ImageCorrupt, ImageFile, ImageUnsupported
from .qcow2_tables import TableCache

HEADER = struct.Struct("<4sIIIQQQQQII")  # 64 bytes
MAGIC = b"QED\0"
F_BACKING_FILE, F_NEED_CHECK, F_BACKING_FORMAT_NO_PROBE = 1, 2, 4
KNOWN_FEATURES = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE
MIN_CLUSTER, MAX_CLUSTER = 4096, 64 << 20
MIN_TABLE, MAX_TABLE = 1, 16
ZERO_CLUSTER = 1


class QedImage(BlockImage):
    format_name = "qed"

    def __init__(self, file: ImageFile) -> None:
        raw = file.read(0, HEADER.size, "QED header")
        (magic, cs, table_size, header_size, features, _compat, _autoclear, l1_offset,
         size, name_off, name_size) = HEADER.unpack(raw)
        if magic != MAGIC:
            raise ImageCorrupt("not a QED image (bad magic)")
        if not MIN_CLUSTER <= cs <= MAX_CLUSTER or cs & (cs - 1):
            raise ImageCorrupt(f"QED cluster size {cs} is invalid")
        if not MIN_TABLE <= table_size <= MAX_TABLE or table_size & (table_size - 1):
            raise ImageCorrupt(f"QED table size {table_size} is invalid")
        if features & ~KNOWN_FEATURES:
            raise ImageUnsupported(f"QED image uses unknown features {features:#x}")
        if header_size == 0 or header_size * cs > 1 << 32:
            raise ImageCorrupt(f"QED header size {header_size} is invalid")
        self.cluster_size, self.table_size = cs, table_size
        self.entries = table_size * cs // 8
        if size % 512 or size > self.entries * self.entries * cs:
            raise ImageCorrupt(f"QED image size {size} is invalid for its tables")
        if l1_offset % cs or l1_offset == 0:
            raise ImageCorrupt(f"QED L1 table offset {l1_offset:#x} is invalid")
        super().__init__(file, size)
        self.l1 = self._table(l1_offset, "L1 table")
        self.cache: TableCache[list[int]] = TableCache(32)
        self.need_check = bool(features & F_NEED_CHECK)
        if features & F_BACKING_FILE:
            if name_size == 0 or name_size > 1023 or name_off + name_size > header_size * cs:
                raise ImageCorrupt("QED backing file name lies outside the header")
            self.backing_name = file.read(name_off, name_size, "QED backing file name") \
                .decode("utf-8", "replace")
            if features & F_BACKING_FORMAT_NO_PROBE:
                self.backing_format = "raw"

    def _table(self, offset: int, what: str) -> list[int]:
        if offset % self.cluster_size:
            raise ImageCorrupt(f"QED {what} offset {offset:#x} is not cluster-aligned")
        data = self.file.read(offset, self.table_size * self.cluster_size, f"QED {what}")
        return list(struct.unpack(f"<{self.entries}Q", data))

    def _entry(self, cluster: int) -> int:
        l1e = self.l1[cluster // self.entries]
        if not l1e:
            return 0
        table = self.cache.get(l1e)
        if table is None:
            table = self._table(l1e, "L2 table")
            self.cache.put(l1e, table)
        return int(table[cluster % self.entries])

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        cs = self.cluster_size
        while length:
            cluster, within = divmod(offset, cs)
            n = min(cs - within, length)
            e = self._entry(cluster)
            if e == ZERO_CLUSTER:
                yield Extent(n, "zero")
            elif e == 0:
                yield Extent(n, "backing" if self.backing is not None else "zero")
            else:
                if e % cs or e >= self.file.size:
                    raise ImageCorrupt(f"QED data cluster offset {e:#x} of guest cluster "
                                       f"{cluster} is invalid")
                yield Extent(n, "data", e + within)
            offset += n
            length -= n
