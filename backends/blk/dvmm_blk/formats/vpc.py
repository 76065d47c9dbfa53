"""VHD (vpc) images, fixed and dynamic, read-only.

Owns the Virtual Hard Disk format (Microsoft's "Virtual Hard Disk Image
Format Specification"): the 512-byte footer (at the end of every image,
copied to the start of a dynamic one), the dynamic disk header and its
block allocation table (BAT), and the blocks (a sector bitmap, then the
data; like qemu, allocated blocks are read without consulting the bitmap).
The disk size follows qemu's ``vpc_open``: from the CHS geometry, unless
the creator application is one known to use the footer's current size or
the geometry is the maximum.  Differencing disks are refused.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from .base import BlockImage, Extent, ImageCorrupt, ImageFile, ImageUnsupported

FOOTER = struct.Struct(">8sIIQI4sIIQQHBBII16sB")  # 85 bytes of 512
DYNAMIC = struct.Struct(">8sQQIIII")  # 40 bytes of 1024
COOKIE, DYN_COOKIE = b"conectix", b"cxsparse"
TYPE_FIXED, TYPE_DYNAMIC, TYPE_DIFFERENCING = 2, 3, 4
MAX_GEOMETRY = 65535 * 16 * 255
#: Creator applications that size the disk by current_size, not by CHS.
SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
UNALLOCATED = 0xFFFFFFFF
MAX_BAT = 1 << 24
MAX_BLOCK = 1 << 28


class VpcImage(BlockImage):
    format_name = "vpc"

    def __init__(self, file: ImageFile) -> None:
        head = file.read_upto(0, 512)
        if head[:8] != COOKIE or len(head) < 512:
            head = file.read(max(0, file.size - 512), 512, "VHD footer")
            if head[:8] != COOKIE:
                raise ImageCorrupt("not a VHD image (no 'conectix' footer)")
        f = FOOTER.unpack_from(head)
        data_offset, creator, current = f[3], f[5], f[9]
        cyls, heads, secs, disk_type = f[10], f[11], f[12], f[13]
        if disk_type == TYPE_DIFFERENCING:
            raise ImageUnsupported("differencing VHD images are not supported")
        if disk_type not in (TYPE_FIXED, TYPE_DYNAMIC):
            raise ImageCorrupt(f"VHD disk type {disk_type} is invalid")
        sectors = cyls * heads * secs
        if creator not in SIZE_CREATORS and sectors != MAX_GEOMETRY:
            size = sectors * 512
        else:
            size = current - current % 512
        self.dynamic = disk_type == TYPE_DYNAMIC
        if not self.dynamic:
            if size > file.size - 512:
                raise ImageCorrupt(f"fixed VHD size {size} is larger than its file")
            super().__init__(file, size)
            return
        self._open_dynamic(file, data_offset, size)

    def _open_dynamic(self, file: ImageFile, offset: int, size: int) -> None:
        raw = file.read(offset, DYNAMIC.size, "VHD dynamic disk header")
        cookie, _, table_offset, _, entries, block_size, _ = DYNAMIC.unpack(raw)
        if cookie != DYN_COOKIE:
            raise ImageCorrupt("VHD dynamic disk header has a bad cookie")
        if not 512 <= block_size <= MAX_BLOCK or block_size & (block_size - 1):
            raise ImageCorrupt(f"VHD block size {block_size} is invalid")
        if entries > MAX_BAT or entries * block_size < size:
            raise ImageCorrupt(f"VHD block table of {entries} entries does not cover the disk")
        bat = file.read(table_offset, 4 * entries, "VHD block allocation table")
        self.bat = list(struct.unpack(f">{entries}I", bat))
        self.block_size = block_size
        bitmap_bytes = -(-(block_size // 512) // 8)  # one bit per sector
        self.bitmap_size = -(-bitmap_bytes // 512) * 512
        super().__init__(file, size)

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        if not self.dynamic:
            yield Extent(length, "data", offset)
            return
        bs = self.block_size
        while length:
            block, within = divmod(offset, bs)
            n = min(bs - within, length)
            entry = self.bat[block]
            if entry == UNALLOCATED:
                yield Extent(n, "zero")
            else:
                start = entry * 512 + self.bitmap_size
                if start + within >= self.file.size:
                    raise ImageCorrupt(f"VHD block {block} at sector {entry} lies beyond the "
                                       "end of the file")
                yield Extent(n, "data", start + within)
            offset += n
            length -= n
