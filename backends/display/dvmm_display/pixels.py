"""Pixel conversion: XRGB8888 (the scanout's format) to a client's PIXEL_FORMAT.

Owns turning packed little-endian XRGB8888 pixels (bytes B, G, R, X in
memory, DRM_FORMAT_XRGB8888) into the true-colour format a client chose with
SetPixelFormat (RFC 6143 7.4: 8, 16 or 32 bits, either byte order, any
``2**n - 1`` channel maximum at any shift), and into ZRLE's compressed
pixels (CPIXEL, 7.7.6).

No per-pixel Python loop: each output byte of a pixel is the OR of the
channel planes (``src[2::4]`` is every red byte) run through 256-entry
``bytes.translate`` tables, and the planes are interleaved with extended
slice assignment.  Everything runs at C speed, with the standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .rfb import PixelFormat

#: Byte offset of each channel in an XRGB8888 pixel in memory.
SRC_OFFSETS = {"red": 2, "green": 1, "blue": 0}


def _or_bytes(planes: list[bytes], length: int) -> bytes:
    if not planes:
        return bytes(length)
    if len(planes) == 1:
        return planes[0]
    acc = 0
    for plane in planes:
        acc |= int.from_bytes(plane, "little")
    return acc.to_bytes(length, "little")


def _tables(fmt: PixelFormat) -> list[list[tuple[int, bytes]]]:
    """Per output byte (least significant first): (source offset, table) pairs."""
    out: list[list[tuple[int, bytes]]] = [[] for _ in range(fmt.bytes_per_pixel)]
    for name, off in SRC_OFFSETS.items():
        mx = getattr(fmt, f"{name}_max")
        shift = getattr(fmt, f"{name}_shift")
        scaled = [(v * mx // 255) << shift for v in range(256)]
        for k in range(fmt.bytes_per_pixel):
            table = bytes((s >> (8 * k)) & 0xFF for s in scaled)
            if any(table):
                out[k].append((off, table))
    return out


def is_native(fmt: PixelFormat) -> bool:
    """XRGB8888 little endian already: conversion is the identity."""
    return (fmt.bits_per_pixel == 32 and not fmt.big_endian
            and (fmt.red_max, fmt.green_max, fmt.blue_max) == (255, 255, 255)
            and (fmt.red_shift, fmt.green_shift, fmt.blue_shift) == (16, 8, 0))


@dataclass
class PixelConverter:
    """Converts XRGB8888 pixel runs to one client's pixel format."""

    fmt: PixelFormat
    native: bool = field(init=False)
    cpixel_size: int = field(init=False)
    _tables: list[list[tuple[int, bytes]]] = field(init=False, repr=False)
    _cpixel_drop: int | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.native = is_native(self.fmt)
        self._tables = _tables(self.fmt)
        self._cpixel_drop = _cpixel_drop(self.fmt)
        self.cpixel_size = self.fmt.bytes_per_pixel - (self._cpixel_drop is not None)

    @property
    def bytes_per_pixel(self) -> int:
        return self.fmt.bytes_per_pixel

    def convert(self, src: bytes) -> bytes:
        """``len(src) // 4`` XRGB8888 pixels in the client's format."""
        if self.native:
            return src
        n = len(src) // 4
        bpp = self.fmt.bytes_per_pixel
        channel = {off: src[off::4] for off in SRC_OFFSETS.values()}
        out = bytearray(n * bpp)
        for k, pairs in enumerate(self._tables):
            plane = _or_bytes([channel[off].translate(table) for off, table in pairs], n)
            pos = bpp - 1 - k if self.fmt.big_endian else k
            out[pos::bpp] = plane
        return bytes(out)

    def to_cpixels(self, converted: bytes) -> bytes:
        """Already converted pixels as ZRLE CPIXELs (3 bytes where 7.7.6 allows)."""
        drop = self._cpixel_drop
        if drop is None:
            return converted
        n = len(converted) // 4
        out = bytearray(n * 3)
        keep = [i for i in range(4) if i != drop]
        for j, i in enumerate(keep):
            out[j::3] = converted[i::4]
        return bytes(out)

    def cpixels(self, src: bytes) -> bytes:
        return self.to_cpixels(self.convert(src))


def _cpixel_drop(fmt: PixelFormat) -> int | None:
    """The byte offset ZRLE leaves out of a 32-bit pixel, or None (7.7.6: true
    colour, 32 bpp, depth <= 24, all colour bits in the least or the most
    significant three bytes — checked in that order, as TigerVNC does)."""
    if fmt.bits_per_pixel != 32 or fmt.depth > 24:
        return None
    max_pixel = ((fmt.red_max << fmt.red_shift) | (fmt.green_max << fmt.green_shift)
                 | (fmt.blue_max << fmt.blue_shift))
    if max_pixel < 1 << 24:  # the most significant byte is unused
        return 0 if fmt.big_endian else 3
    if max_pixel & 0xFF == 0:  # the least significant byte is unused
        return 3 if fmt.big_endian else 0
    return None


def pixel_value(fmt: PixelFormat, r: int, g: int, b: int) -> int:
    """One 8-bit-per-channel colour as a pixel value of ``fmt`` (tests, cursors)."""
    return ((r * fmt.red_max // 255) << fmt.red_shift
            | (g * fmt.green_max // 255) << fmt.green_shift
            | (b * fmt.blue_max // 255) << fmt.blue_shift)
