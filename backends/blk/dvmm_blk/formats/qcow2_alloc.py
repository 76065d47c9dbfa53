"""qcow2 cluster allocation: free clusters, new refcount blocks, a bigger table.

Owns how host clusters are found and counted (qcow2.txt, "Host cluster
management").  The rule that keeps an image consistent across a crash:
*a cluster's refcount is written before anything points at it*, and a
pointer is removed before the refcount drops.  A crash in between leaves a
cluster counted but unused — a leak, which ``qemu-img check`` reports and
``check -r leaks`` (or the next read-write open of a dirty image) reclaims —
never a cluster used but counted as free, which a later allocation would
hand out twice.  Where the order must also survive a power loss the caller's
``barrier`` (``fdatasync``) sits between the two writes.

A new refcount block describes itself: it is put at the first cluster of
the range it counts (free, since the whole range was unallocated).  When
the refcount table itself is full, a larger copy is written after the end
of the file with the blocks it needs, then the header is switched to it in
one 12-byte write, then the old table's clusters are freed.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable

from .base import ImageCorrupt, ImageFile
from .qcow2_header import OFF_REFTABLE
from .qcow2_tables import Refcounts, encode_refblock_range, encode_u64

#: Clusters counted ahead of use, one barrier for the lot: from this many
#: the reservation doubles while allocation goes on, up to the maximum.
FIRST_BATCH, MAX_BATCH = 8, 256


class Allocator:
    """Hands out clusters whose refcount of 1 is already durable.

    Counting a cluster and making that durable (a barrier) before each use
    would cost an ``fdatasync`` per allocating write (measured: 110 writes/s
    on a disk).  So clusters are *reserved* in batches — counted, then one
    barrier — and handed out from the reservation with no barrier of their
    own.  What a crash leaves reserved is a leak (reclaimed by the next
    read-write open of the dirty image); a clean close gives it back."""

    def __init__(self, refs: Refcounts, file: ImageFile, barrier: Callable[[], None]) -> None:
        self.refs = refs
        self.file = file
        self.barrier = barrier
        self.cluster_bits = refs.cluster_bits
        self.hint = 0  # no free cluster below this index
        self.pool: deque[list[int]] = deque()  # reserved runs [first cluster, count]
        self.batch = FIRST_BATCH
        #: Called with each run about to be counted: raises if the run
        #: holds metadata (a refcount of 0 that lies; qemu's overlap check).
        self.guard: Callable[[int, int], None] = lambda first, count: None

    def alloc(self, count: int = 1) -> list[tuple[int, int]]:
        """``count`` clusters, counted durably: runs of (file offset,
        clusters) in file order (contiguous where the free space allows)."""
        if sum(n for _, n in self.pool) < count:
            self._reserve(max(count, self.batch))
            self.batch = min(MAX_BATCH, self.batch * 2)
        runs: list[tuple[int, int]] = []
        while count:
            run = self.pool[0]
            n = min(count, run[1])
            if runs and (runs[-1][0] >> self.cluster_bits) + runs[-1][1] == run[0]:
                runs[-1] = (runs[-1][0], runs[-1][1] + n)
            else:
                runs.append((run[0] << self.cluster_bits, n))
            run[0] += n
            run[1] -= n
            if not run[1]:
                self.pool.popleft()
            count -= n
        return runs

    def alloc_one(self) -> int:
        return self.alloc(1)[0][0]

    def _reserve(self, count: int) -> None:
        """Count ``count`` free clusters into the pool, then one barrier."""
        refs = self.refs
        while count:
            start, n = refs.find_free(self.hint, count, refs.covered)
            n = self._ensure_blocks(start, n)
            if not n:
                continue
            self.guard(start, n)
            refs.change(start, n, +1)
            self.hint = start + n
            if self.pool and self.pool[-1][0] + self.pool[-1][1] == start:
                self.pool[-1][1] += n
            else:
                self.pool.append([start, n])
            count -= n
        self.barrier()  # counted before anything can point at them

    def release(self) -> None:
        """Give back what is reserved and unused (a clean close)."""
        while self.pool:
            first, n = self.pool.popleft()
            self.refs.change(first, n, -1)
            self.hint = min(self.hint, first)
        self.batch = FIRST_BATCH

    def free(self, offset: int, length: int, punch: Callable[[int, int], None] | None = None
             ) -> None:
        """Drop one reference to every cluster of ``[offset, offset+length)``."""
        cb = self.cluster_bits
        first, last = offset >> cb, (offset + length - 1) >> cb
        for c in range(first, last + 1):
            self.refs.change(c, 1, -1)
            if self.refs.get(c) == 0:
                self.hint = min(self.hint, c)
                if punch is not None:
                    punch(c << cb, 1 << cb)

    def _ensure_blocks(self, start: int, count: int) -> int:
        """How many clusters of the run from ``start`` have a refcount block
        (at least 1, or 0 after making a block: the caller searches again,
        since the block may have taken a cluster of the run)."""
        refs = self.refs
        per = refs.block_entries
        end = start + count
        for index in range(start // per, (end - 1) // per + 1):
            if index >= len(refs.table):
                if index > start // per:
                    return index * per - start
                self._grow_table(index)
                return 0
            if not refs.table[index]:
                if index > start // per:
                    return index * per - start
                self._new_block(index)
                return 0
        return count

    def _new_block(self, index: int) -> None:
        refs = self.refs
        cluster = index * refs.block_entries
        if cluster == 0:
            raise ImageCorrupt("qcow2 refcount table has no block for the header cluster")
        self.guard(cluster, 1)
        blk = [0] * refs.block_entries
        blk[0] = 1  # the block counts itself
        refs.install_block(index, cluster << self.cluster_bits, blk, self.barrier)

    def _grow_table(self, need_index: int) -> None:
        """A refcount table with room for block ``need_index`` and more."""
        refs, cb = self.refs, self.cluster_bits
        per = refs.block_entries
        old = refs.table
        start = max(-(-self.file.size >> cb), self._last_counted() + 1)
        entries = max(need_index + 1, len(old) * 3 // 2 + 1)
        while True:
            tclusters = -(-entries * 8 >> cb)
            blocks: list[int] = []
            while True:  # the blocks the new table and the blocks themselves need
                end = start + tclusters + len(blocks)
                need = [i for i in range(start // per, (end - 1) // per + 1)
                        if i >= len(old) or not old[i]]
                if len(need) == len(blocks):
                    break
                blocks = need
            if (end - 1) // per < entries:
                break
            entries = (end - 1) // per + 1 + entries // 2
        self._write_new_table(start, tclusters, entries, blocks)

    def _last_counted(self) -> int:
        refs = self.refs
        for index in range(len(refs.table) - 1, -1, -1):
            blk = refs.block(index)
            if blk is None:
                continue
            for i in range(len(blk) - 1, -1, -1):
                if blk[i]:
                    return index * refs.block_entries + i
        return 0

    def _write_new_table(self, start: int, tclusters: int, entries: int,
                         blocks: list[int]) -> None:
        refs, cb = self.refs, self.cluster_bits
        per = refs.block_entries
        table = refs.table + [0] * (entries - len(refs.table))
        new_clusters = range(start, start + tclusters + len(blocks))
        self.guard(start, len(new_clusters))
        for k, index in enumerate(blocks):
            table[index] = (start + tclusters + k) << cb
        contents = {i: [0] * per for i in blocks}
        for c in new_clusters:  # count the new table and blocks
            index = c // per
            if index in contents:
                contents[index][c % per] += 1
            else:
                refs.change(c, 1, +1)
        for index, blk in contents.items():
            self.file.write(table[index], encode_refblock_range(blk, 0, per, refs.order)[1])
            refs.cache.put(table[index], blk)
        table_bytes = encode_u64(table)
        self.file.write(start << cb, table_bytes + bytes((tclusters << cb) - len(table_bytes)))
        self.barrier()
        old_offset, old_clusters = refs.table_offset, refs.table_clusters
        self.file.write(OFF_REFTABLE, struct.pack(">QI", start << cb, tclusters))
        self.barrier()
        refs.table, refs.table_offset, refs.table_clusters = table, start << cb, tclusters
        self.free(old_offset, old_clusters << cb)
