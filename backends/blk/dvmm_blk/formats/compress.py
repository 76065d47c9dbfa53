"""Decompressing clusters and grains: deflate (zlib) and zstd.

Owns the two codecs images use: qcow2's compressed clusters are raw
deflate streams (no zlib header, 4 KiB window: qemu's
``qcow2_zlib_decompress``) or, with compression_type 1, one zstd frame;
vmdk's streamOptimized grains are zlib streams with a header.  The input
is hostile: output is capped at the size the format expects and anything
that does not inflate to exactly that size is an :class:`ImageCorrupt`.
"""

from __future__ import annotations

import io
import zlib

import zstandard

from .base import ImageCorrupt


def inflate_raw(data: bytes, size: int) -> bytes:
    """A raw deflate stream that must produce ``size`` bytes (qcow2 zlib)."""
    return _zlib(zlib.decompressobj(-12), data, size, "deflate")


def inflate_zlib(data: bytes, size: int) -> bytes:
    """A zlib stream (with header) that must produce ``size`` bytes (vmdk)."""
    return _zlib(zlib.decompressobj(), data, size, "zlib")


def _zlib(d: zlib._Decompress, data: bytes, size: int, what: str) -> bytes:
    try:
        out = d.decompress(data, size)
    except zlib.error as exc:
        raise ImageCorrupt(f"{what} data does not decompress: {exc}") from None
    if len(out) != size:
        raise ImageCorrupt(f"{what} data decompresses to {len(out)} bytes, not {size}")
    return out


def unzstd(data: bytes, size: int) -> bytes:
    """One zstd frame that must produce ``size`` bytes (qcow2 zstd); bytes
    after the frame (the rest of the last sector) are ignored."""
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data),
                                                       read_across_frames=False)
    try:
        out = reader.read(size + 1)  # one byte more: too long shows
    except zstandard.ZstdError as exc:
        raise ImageCorrupt(f"zstd data does not decompress: {exc}") from None
    if len(out) != size:
        raise ImageCorrupt(f"zstd data decompresses to {len(out)} bytes, not {size}")
    return out
