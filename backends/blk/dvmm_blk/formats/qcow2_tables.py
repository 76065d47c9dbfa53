"""qcow2 tables: L1/L2 entry layout, the bounded table cache, refcounts.

Owns the two-level structures of ``docs/interop/qcow2.txt`` ("Cluster
mapping", "Host cluster management"): decoding and checking L1/L2 entries,
an LRU cache of decoded L2 tables and refcount blocks (bounded: a disk of
any size costs the same memory), and :class:`Refcounts`, which reads and
changes reference counts of any width (1..64 bits, refcount_order 0..6).

Tables are *write-through*: a change is written to the file (``pwrite``)
before the call returns, so what the cache holds is never newer than the
file and an evicted entry needs no write-back.  Ordering between writes
(refcount before the L2 entry that uses the cluster) is the caller's.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from .base import ImageCorrupt, ImageFile

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9..55 of L1/L2 entries
L1_RESERVED = 0x7F00_0000_0000_01FF
L2_RESERVED = 0x3F00_0000_0000_01FE  # standard clusters: bits 1..8, 56..61
REFT_RESERVED = 0x1FF
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
DEFAULT_CACHE_TABLES = 32
T = TypeVar("T")


class TableCache(Generic[T]):
    """Decoded tables by file offset, least recently used dropped first."""

    def __init__(self, capacity: int = DEFAULT_CACHE_TABLES) -> None:
        self.capacity = max(1, capacity)
        self._tables: OrderedDict[int, T] = OrderedDict()

    def get(self, offset: int) -> T | None:
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
        return table

    def put(self, offset: int, table: T) -> None:
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        while len(self._tables) > self.capacity:
            self._tables.popitem(last=False)

    def drop(self, offset: int) -> None:
        self._tables.pop(offset, None)

    def clear(self) -> None:
        self._tables.clear()

    def __len__(self) -> int:
        return len(self._tables)


def decode_u64(data: bytes) -> list[int]:
    return list(struct.unpack(f">{len(data) // 8}Q", data))


def encode_u64(values: list[int]) -> bytes:
    return struct.pack(f">{len(values)}Q", *values)


class Compressed:
    """Where a compressed cluster's bytes are (qcow2.txt, "Compressed
    Clusters Descriptor"): ``offset`` and the bytes to read (``length``)."""

    __slots__ = ("length", "offset")

    def __init__(self, entry: int, cluster_bits: int) -> None:
        shift = 62 - (cluster_bits - 8)
        self.offset = entry & ((1 << shift) - 1)
        sectors = ((entry & ~OFLAG_COPIED & ~OFLAG_COMPRESSED) >> shift) + 1
        self.length = sectors * 512 - (self.offset & 511)

    def host_range(self) -> tuple[int, int]:
        """The bytes whose clusters the compressed data holds a reference to
        (sector-aligned, as qemu counts them)."""
        start = self.offset & ~511
        return start, (self.offset & 511) + self.length


# -- refcount blocks of any width ---------------------------------------------------
_FMT = {3: "B", 4: "H", 5: "I", 6: "Q"}


def decode_refblock(data: bytes, order: int) -> list[int]:
    if order >= 3:
        width = 1 << (order - 3)
        return list(struct.unpack(f">{len(data) // width}{_FMT[order]}", data))
    bits = 1 << order
    mask = (1 << bits) - 1
    per = 8 // bits
    return [(byte >> (bits * k)) & mask for byte in data for k in range(per)]


def encode_refblock_range(block: list[int], start: int, end: int, order: int
                          ) -> tuple[int, bytes]:
    """The bytes holding entries ``[start, end)``: (byte offset in the block, bytes)."""
    if order >= 3:
        width = 1 << (order - 3)
        return start * width, struct.pack(f">{end - start}{_FMT[order]}", *block[start:end])
    bits = 1 << order
    per = 8 // bits
    first, last = start // per, -(-end // per)
    out = bytearray()
    for byte in range(first, last):
        v = 0
        for k in range(per):
            v |= block[byte * per + k] << (bits * k)
        out.append(v)
    return first, bytes(out)


class Refcounts:
    """The refcount table and its blocks (cached, write-through)."""

    def __init__(self, file: ImageFile, cluster_bits: int, order: int, table_offset: int,
                 table_clusters: int, cache_blocks: int = DEFAULT_CACHE_TABLES) -> None:
        self.file = file
        self.cluster_bits = cluster_bits
        self.order = order
        self.max = (1 << (1 << order)) - 1
        self.block_entries = (1 << cluster_bits) * 8 >> order
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        raw = file.read(table_offset, table_clusters << cluster_bits, "refcount table")
        self.table = decode_u64(raw)
        for i, e in enumerate(self.table):
            self._check_entry(i, e)
        self.cache: TableCache[list[int]] = TableCache(cache_blocks)

    def _check_entry(self, index: int, entry: int) -> None:
        if entry & REFT_RESERVED or entry & ((1 << self.cluster_bits) - 1):
            raise ImageCorrupt(f"qcow2 refcount table entry {index} ({entry:#x}) is not "
                               "cluster-aligned")

    @property
    def covered(self) -> int:
        """Clusters the table can describe."""
        return len(self.table) * self.block_entries

    def block(self, index: int) -> list[int] | None:
        """Refcount block ``index`` (None: not allocated, all counts 0)."""
        if index >= len(self.table) or not self.table[index]:
            return None
        offset = self.table[index]
        blk = self.cache.get(offset)
        if blk is None:
            data = self.file.read(offset, 1 << self.cluster_bits,
                                  f"qcow2 refcount block {index}")
            blk = decode_refblock(data, self.order)
            self.cache.put(offset, blk)
        return blk

    def get(self, cluster: int) -> int:
        blk = self.block(cluster // self.block_entries)
        return 0 if blk is None else blk[cluster % self.block_entries]

    def find_free(self, start: int, count: int, limit: int) -> tuple[int, int]:
        """The first run of free clusters (refcount 0) at or after ``start``:
        (first index, length, at most ``count``).  Indices at or past
        ``limit`` (the end of what the table covers) count as free."""
        per = self.block_entries
        c = start
        while c < limit:  # to the first free cluster
            blk = self.block(c // per)
            if blk is None:
                break
            try:
                c = c - c % per + blk.index(0, c % per)
                break
            except ValueError:
                c = (c // per + 1) * per
        first = c
        while c - first < count:  # as far as the run goes
            if c >= limit:
                return first, count
            blk = self.block(c // per)
            if blk is None:
                c = min((c // per + 1) * per, first + count)
            elif blk[c % per]:
                break
            else:
                c += 1
        return first, c - first

    def change(self, first: int, count: int, delta: int) -> None:
        """Add ``delta`` to the refcounts of ``count`` clusters from ``first``
        (their blocks must exist); each block's changed range is written."""
        end = first + count
        while first < end:
            index = first // self.block_entries
            blk = self.block(index)
            if blk is None:
                raise ImageCorrupt(f"qcow2 refcount block for cluster {first} is missing")
            lo = first % self.block_entries
            hi = min(self.block_entries, lo + end - first)
            for i in range(lo, hi):
                v = blk[i] + delta
                if not 0 <= v <= self.max:
                    raise ImageCorrupt(f"qcow2 refcount of cluster "
                                       f"{index * self.block_entries + i} would become {v}")
                blk[i] = v
            self.write_block_range(index, blk, lo, hi)
            first += hi - lo

    def write_block_range(self, index: int, blk: list[int], lo: int, hi: int) -> None:
        pos, data = encode_refblock_range(blk, lo, hi, self.order)
        self.file.write(self.table[index] + pos, data)

    def install_block(self, index: int, offset: int, blk: list[int],
                      barrier: Callable[[], None]) -> None:
        """Write a new refcount block at ``offset``, then point the table at it."""
        _, data = encode_refblock_range(blk, 0, self.block_entries, self.order)
        self.file.write(offset, data)
        barrier()
        self.table[index] = offset
        self.file.write(self.table_offset + 8 * index, struct.pack(">Q", offset))
        self.cache.put(offset, blk)
