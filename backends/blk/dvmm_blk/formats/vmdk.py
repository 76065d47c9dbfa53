"""VMDK images, monolithicSparse and streamOptimized, read-only.

Owns VMware's hosted sparse extent (the "Virtual Disk Format 1.1"
specification, "Hosted Sparse Extents" and "Stream-Optimized Compressed
Sparse Extents"): the little-endian ``KDMV`` header, the embedded text
descriptor (its ``createType`` must be one of the two single-extent kinds,
and a parent link is refused), the grain directory and grain tables (entries
are sector offsets: 0 unallocated, 1 a zero grain), and compressed grains
(a 12-byte marker — LBA and size — then a zlib stream).  A streamOptimized
image written as a stream keeps its grain directory at the end: the header
says ``gdOffset = -1`` and the real one is in the footer, two sectors before
the end-of-stream marker.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator

from .base import BlockImage, Extent, ImageCorrupt, ImageFile, ImageUnsupported
from .compress import inflate_zlib
from .qcow2_tables import TableCache

HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")  # 79 bytes of 512
MAGIC = b"KDMV"
GD_AT_END = 0xFFFFFFFFFFFFFFFF
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
SECTOR = 512
MAX_GRAIN = 1 << 17  # sectors (64 MiB): beyond what any writer uses
MAX_GTES = 1 << 16
MAX_DESCRIPTOR = 1 << 20
SUPPORTED = ("monolithicSparse", "streamOptimized")


class VmdkImage(BlockImage):
    format_name = "vmdk"

    def __init__(self, file: ImageFile) -> None:
        head = file.read(0, SECTOR, "VMDK header")
        if head[:21] == b"# Disk DescriptorFile":
            raise ImageUnsupported("VMDK descriptor files with separate extents are not "
                                   "supported (only monolithicSparse and streamOptimized)")
        h = HEADER.unpack_from(head)
        if h[0] != MAGIC:
            raise ImageCorrupt("not a VMDK sparse extent (bad magic)")
        (_, version, flags, capacity, grain, desc_off, desc_size, gtes, _rgd, gd,
         _overhead, _unclean, _eol, compress) = h
        if version not in (1, 2, 3):
            raise ImageUnsupported(f"VMDK version {version} is not supported")
        if gd == GD_AT_END:
            flags, capacity, grain, gtes, gd, compress = self._footer(file)
        if not 1 <= grain <= MAX_GRAIN or grain & (grain - 1):
            raise ImageCorrupt(f"VMDK grain size {grain} sectors is invalid")
        if not 1 <= gtes <= MAX_GTES:
            raise ImageCorrupt(f"VMDK grain table size {gtes} is invalid")
        if capacity > (1 << 53) // SECTOR:
            raise ImageCorrupt(f"VMDK capacity {capacity} sectors is too large")
        self._descriptor(file, desc_off, desc_size)
        self.grain = grain * SECTOR
        self.gtes = gtes
        self.flags = flags
        self.compressed = bool(flags & FLAG_COMPRESSED)
        if self.compressed and compress != 1:
            raise ImageUnsupported(f"VMDK compression algorithm {compress} is not supported")
        coverage = gtes * self.grain
        size = capacity * SECTOR
        entries = -(-size // coverage)
        raw = file.read(gd * SECTOR, 4 * entries, "VMDK grain directory")
        self.gd = list(struct.unpack(f"<{entries}I", raw))
        self.cache: TableCache[list[int]] = TableCache(32)
        self._grains: TableCache[bytes] = TableCache(4)
        super().__init__(file, size)

    @staticmethod
    def _footer(file: ImageFile) -> tuple[int, int, int, int, int, int]:
        # footer marker, footer (a header whose gdOffset is real), end-of-stream marker
        raw = file.read(file.size - 2 * SECTOR, SECTOR, "VMDK footer")
        h = HEADER.unpack_from(raw)
        if h[0] != MAGIC or h[9] == GD_AT_END:
            raise ImageCorrupt("VMDK streamOptimized footer is missing or invalid")
        return h[2], h[3], h[4], h[7], h[9], h[13]

    def _descriptor(self, file: ImageFile, offset: int, size: int) -> None:
        if not offset or not size:
            return
        if size * SECTOR > MAX_DESCRIPTOR:
            raise ImageCorrupt(f"VMDK descriptor of {size} sectors is too large")
        text = file.read(offset * SECTOR, size * SECTOR, "VMDK descriptor")
        text = text.split(b"\0", 1)[0]
        m = re.search(rb'^\s*createType\s*=\s*"([^"]*)"', text, re.M)
        kind = m.group(1).decode("ascii", "replace") if m else "monolithicSparse"
        if kind not in SUPPORTED:
            raise ImageUnsupported(f"VMDK createType {kind!r} is not supported "
                                   f"(only {' and '.join(SUPPORTED)})")
        if re.search(rb"^\s*parentFileNameHint\s*=", text, re.M):
            raise ImageUnsupported("VMDK images with a parent are not supported")

    def _grain_entry(self, grain: int) -> int:
        gt_index, i = divmod(grain, self.gtes)
        sector = self.gd[gt_index]
        if not sector:
            return 0
        table = self.cache.get(sector)
        if table is None:
            raw = self.file.read(sector * SECTOR, 4 * self.gtes, "VMDK grain table")
            table = list(struct.unpack(f"<{self.gtes}I", raw))
            self.cache.put(sector, table)
        return int(table[i])

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        gs = self.grain
        while length:
            grain, within = divmod(offset, gs)
            n = min(gs - within, length)
            entry = self._grain_entry(grain)
            if entry == 0 or (entry == 1 and self.flags & FLAG_ZERO_GRAIN):
                yield Extent(n, "zero")
            elif self.compressed:
                yield Extent(n, "bytes", self._inflate(entry, grain), within)
            else:
                if entry * SECTOR >= self.file.size:
                    raise ImageCorrupt(f"VMDK grain {grain} at sector {entry} lies beyond "
                                       "the end of the file")
                yield Extent(n, "data", entry * SECTOR + within)
            offset += n
            length -= n

    def _inflate(self, sector: int, grain: int) -> bytes:
        data = self._grains.get(sector)
        if data is not None:
            return data
        pos = sector * SECTOR
        if self.flags & FLAG_MARKERS:
            lba, size = struct.unpack("<QI", self.file.read(pos, 12, "VMDK grain marker"))
            if lba != grain * (self.grain // SECTOR):
                raise ImageCorrupt(f"VMDK grain {grain} marker names LBA {lba}")
            if size > 2 * self.grain + 4096:
                raise ImageCorrupt(f"VMDK grain {grain} has {size} compressed bytes")
            raw = self.file.read(pos + 12, size, "VMDK compressed grain")
        else:
            raw = self.file.read_upto(pos, 2 * self.grain + 4096)
        data = inflate_zlib(raw, self.grain)
        self._grains.put(sector, data)
        return data
