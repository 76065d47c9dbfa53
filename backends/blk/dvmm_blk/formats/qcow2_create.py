"""Creating qcow2 images (``dvmm img create -f qcow2``, convert's target).

Owns the layout of a new, empty image: the header cluster (header, header
extensions, backing file name), then the refcount table, the refcount
blocks that count the metadata, and the L1 table — qemu-img's layout, sized
for any cluster size (a table or block may take several clusters).  The
options are qemu-img's: ``cluster_size``, ``compat`` (0.10/v2 or 1.1/v3),
``refcount_bits``, ``lazy_refcounts``, ``compression_type``, and a
backing file with its format.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .base import ImageError, ImageUnsupported
from .qcow2_header import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    INCOMPAT_COMPRESSION,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MAX_SIZE,
    MIN_CLUSTER_BITS,
    V3_LENGTH,
    Qcow2Header,
    encode_extensions,
)
from .qcow2_tables import encode_refblock_range, encode_u64


@dataclass
class Qcow2Options:
    size: int
    cluster_size: int = 65536
    version: int = 3
    refcount_bits: int = 16
    lazy_refcounts: bool = False
    compression_type: str = "zlib"
    backing_file: str | None = None
    backing_format: str | None = None

    def check(self) -> None:
        cb = self.cluster_size.bit_length() - 1
        if self.cluster_size != 1 << cb or not MIN_CLUSTER_BITS <= cb <= MAX_CLUSTER_BITS:
            raise ImageError(f"cluster size {self.cluster_size} must be a power of two "
                             "between 512 and 2M")
        rb = self.refcount_bits
        if rb & (rb - 1) or not 1 <= rb <= 64 or (self.version == 2 and rb != 16):
            raise ImageError(f"refcount_bits {rb} is invalid (1..64, a power of two; "
                             "16 with compat=0.10)")
        if not 0 <= self.size <= MAX_SIZE:
            raise ImageError(f"image size {self.size} is out of range")
        if self.compression_type not in COMPRESSION_NAMES.values():
            raise ImageError(f"compression_type {self.compression_type!r} is not zlib or zstd")
        if self.version == 2 and (self.lazy_refcounts or self.compression_type != "zlib"):
            raise ImageError("lazy_refcounts and compression_type need compat=1.1")
        if self.backing_file and len(self.backing_file.encode()) > 1023:
            raise ImageError("backing file name is longer than 1023 bytes")


def layout(opts: Qcow2Options) -> tuple[int, int, int, int]:
    """(refcount table clusters, refcount blocks, L1 entries, L1 clusters)."""
    cs = opts.cluster_size
    l1_entries = -(-opts.size // (cs * (cs // 8)))
    if l1_entries * 8 > MAX_L1_BYTES:
        raise ImageUnsupported(f"size {opts.size} needs an L1 table larger than 32 MiB "
                               "(use a larger cluster_size)")
    l1_clusters = -(-l1_entries * 8 // cs)
    per_block = cs * 8 // opts.refcount_bits
    rt, blocks = 1, 1
    while True:
        total = 1 + rt + blocks + l1_clusters
        need_blocks = -(-total // per_block)
        need_rt = -(-need_blocks * 8 // cs)
        if (need_blocks, need_rt) == (blocks, rt):
            return rt, blocks, l1_entries, l1_clusters
        blocks, rt = max(blocks, need_blocks), max(rt, need_rt)


def create_qcow2(path: str, opts: Qcow2Options) -> None:
    """Write a new empty image at ``path`` (replacing a file there)."""
    opts.check()
    cs = opts.cluster_size
    cb = cs.bit_length() - 1
    rt, blocks, l1_entries, l1_clusters = layout(opts)
    order = opts.refcount_bits.bit_length() - 1
    h = Qcow2Header(
        version=opts.version, backing_file_offset=0, backing_file_size=0, cluster_bits=cb,
        size=opts.size, crypt_method=0, l1_size=l1_entries,
        l1_table_offset=(1 + rt + blocks) * cs, refcount_table_offset=cs,
        refcount_table_clusters=rt, nb_snapshots=0, snapshots_offset=0,
        refcount_order=order, header_length=V3_LENGTH if opts.version == 3 else 72)
    if opts.version == 3:
        h.compatible = COMPAT_LAZY_REFCOUNTS if opts.lazy_refcounts else 0
        if opts.compression_type == "zstd":
            h.header_length = V3_LENGTH + 8
            h.compression_type = 1
            h.incompatible |= INCOMPAT_COMPRESSION
    h.backing_format = opts.backing_format if opts.backing_file else None
    head = h.encode() + encode_extensions(h)
    if opts.backing_file:
        name = opts.backing_file.encode()
        h.backing_file_offset, h.backing_file_size = len(head), len(name)
        head = h.encode() + encode_extensions(h) + name
    if len(head) > cs:
        raise ImageError("the header does not fit in one cluster (backing file name too long?)")
    meta = 1 + rt + blocks + l1_clusters
    per_block = cs * 8 // opts.refcount_bits
    counts = [1 if c < meta else 0 for c in range(blocks * per_block)]
    table = [(1 + rt + b) * cs for b in range(blocks)]
    body = bytearray(head.ljust(cs, b"\0"))
    body += encode_u64(table).ljust(rt * cs, b"\0")
    for b in range(blocks):
        body += encode_refblock_range(counts[b * per_block:(b + 1) * per_block], 0,
                                      per_block, order)[1]
    body += bytes(l1_clusters * cs)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, bytes(body))
        os.fsync(fd)
    finally:
        os.close(fd)
