"""Raw images as a format: a backing file, or a source/target of ``dvmm img``.

Owns the identity mapping (guest offset = file offset) for the format
layer.  The blk backend serves a raw image with :class:`dvmm_blk.disk.RawDisk`
directly (the zero-copy fast path, io_uring's native calls); this class is
for raw files that sit under another format, and for ``dvmm img``.
"""

from __future__ import annotations

import errno

from .base import BlockImage, ImageFile


class RawImage(BlockImage):
    format_name = "raw"

    def __init__(self, file: ImageFile) -> None:
        super().__init__(file, file.size)

    def read(self, offset: int, bufs: list[memoryview]) -> None:
        total = sum(map(len, bufs))
        if offset < 0 or offset + total > self.size:
            raise OSError(errno.EINVAL, f"read of {total} bytes at {offset} is past the end")
        self.file.readv(offset, bufs)

    def write(self, offset: int, bufs: list[memoryview]) -> None:
        if self.read_only:
            super().write(offset, bufs)
        self.file.writev(offset, bufs)
        self.size = max(self.size, self.file.size)

    def discard(self, offset: int, length: int) -> None:
        """Nothing: a raw file under ``dvmm img`` keeps its bytes."""

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        chunk = bytes(min(length, 1 << 20))
        while length > 0:
            n = min(length, len(chunk))
            self.file.write(offset, chunk[:n])  # (carries on after a short write)
            offset += n
            length -= n
