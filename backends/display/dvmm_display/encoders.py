"""Rectangle encodings: Raw, ZRLE, and the Cursor / DesktopSize pseudo-encodings.

Owns turning a rectangle of a :class:`Frame` into the bytes that follow its
rectangle header (RFC 6143 7.7 and 7.8).  Pure apart from the per-client
zlib stream ZRLE keeps (7.7.6: one zlib stream for the whole connection,
each rectangle's data ending at a sync flush).

ZRLE tiles (64x64, left to right, top to bottom) are sent as *solid* (one
colour), *packed palette* (2..16 colours, 1, 2 or 4 bits per pixel, rows
padded to a byte) or *raw*; the palette is found on the source pixels, so
only palette entries and raw tiles go through the pixel converter.
"""

from __future__ import annotations

import struct
import zlib
from itertools import product

from .damage import TILE, Rect
from .framebuffer import Cursor, Frame
from .pixels import PixelConverter
from .rfb import Encoding, rect_header

ZLIB_LEVEL = 3  # ZRLE leaves the level to the server; 3 keeps full frames cheap
SUPPORTED = (Encoding.ZRLE, Encoding.RAW)  # in our order of preference when tied

ZRLE_RAW, ZRLE_SOLID = 0, 1


def choose_encoding(client_order: tuple[int, ...]) -> Encoding:
    """The first encoding in the client's list that we implement (7.5.2: the
    list is in the client's order of preference); Raw if none (always legal)."""
    for enc in client_order:
        if enc in SUPPORTED:
            return Encoding(enc)
    return Encoding.RAW


def encode_raw(frame: Frame, r: Rect, conv: PixelConverter) -> bytes:
    return conv.convert(frame.rect(r.x, r.y, r.width, r.height))


class ZrleEncoder:
    """ZRLE for one client connection (it owns that connection's zlib stream)."""

    def __init__(self, level: int = ZLIB_LEVEL) -> None:
        self._z = zlib.compressobj(level)

    def encode(self, frame: Frame, r: Rect, conv: PixelConverter) -> bytes:
        parts = []
        for ty, tx in product(range(r.y, r.y + r.height, TILE), range(r.x, r.x + r.width, TILE)):
            w = min(TILE, r.x + r.width - tx)
            h = min(TILE, r.y + r.height - ty)
            parts.append(encode_tile(frame.rect(tx, ty, w, h), w, h, conv))
        data = self._z.compress(b"".join(parts)) + self._z.flush(zlib.Z_SYNC_FLUSH)
        return struct.pack(">I", len(data)) + data


def encode_tile(src: bytes, width: int, height: int, conv: PixelConverter) -> bytes:
    """One ZRLE tile (before compression) of XRGB8888 ``src``."""
    first = src[:4]
    if src == first * (width * height):
        return bytes([ZRLE_SOLID]) + conv.cpixels(first)
    colours = set(memoryview(src).cast("I"))
    if len(colours) <= 16:
        return _packed_palette(src, width, height, sorted(colours), conv)
    return bytes([ZRLE_RAW]) + conv.cpixels(src)


def _packed_palette(src: bytes, width: int, height: int, palette: list[int],
                    conv: PixelConverter) -> bytes:
    index = {colour: i for i, colour in enumerate(palette)}
    indices = bytes(map(index.__getitem__, memoryview(src).cast("I")))
    bits = 1 if len(palette) == 2 else 2 if len(palette) <= 4 else 4
    entries = b"".join(c.to_bytes(4, "little") for c in palette)
    rows = b"".join(pack_indices(indices[y * width:(y + 1) * width], bits)
                    for y in range(height))
    return bytes([len(palette)]) + conv.cpixels(entries) + rows


_SHIFT_TABLES = {(bits, t): bytes((v << (8 - bits * (t + 1))) & 0xFF for v in range(256))
                 for bits in (1, 2, 4) for t in range(8 // bits)}


def pack_indices(row: bytes, bits: int) -> bytes:
    """Palette indices of one row, ``bits`` each, most significant first,
    the row padded to a whole byte (7.7.6 "packed palette")."""
    per = 8 // bits
    padded = row + bytes(-len(row) % per)
    n = len(padded) // per
    acc = 0
    for t in range(per):
        acc |= int.from_bytes(padded[t::per].translate(_SHIFT_TABLES[(bits, t)]), "little")
    return acc.to_bytes(n, "little")


def cursor_rect(cursor: Cursor, conv: PixelConverter) -> bytes:
    """The Cursor pseudo-rectangle (7.8.1): header at the hotspot, pixels, mask."""
    return (rect_header(cursor.hot_x, cursor.hot_y, cursor.width, cursor.height,
                        Encoding.CURSOR)
            + conv.convert(cursor.pixels) + cursor.mask)


def desktop_size_rect(width: int, height: int) -> bytes:
    """The DesktopSize pseudo-rectangle (7.8.2): the new size, no data."""
    return rect_header(0, 0, width, height, Encoding.DESKTOP_SIZE)
