"""Pixel conversion, ZRLE, pseudo-encodings and damage (dvmm_display.pixels,
.encoders, .damage), checked against per-pixel references and the test
client's ZRLE decoder written from RFC 6143 7.7.6."""

from __future__ import annotations

import random
import struct
import zlib

import pytest
from dvmm_display.damage import TILE, Rect, damaged
from dvmm_display.encoders import (
    ZrleEncoder,
    choose_encoding,
    cursor_rect,
    desktop_size_rect,
    encode_raw,
    encode_tile,
    pack_indices,
)
from dvmm_display.framebuffer import Frame, default_cursor
from dvmm_display.pixels import PixelConverter, pixel_value
from dvmm_display.rfb import Encoding, PixelFormat
from dvmm_testing.rfbclient import Format, decode_zrle
from hypothesis import given, settings
from hypothesis import strategies as st

from .test_vnc_rfb import valid_formats


def ref_pixels(fmt: PixelFormat, src: bytes) -> list[int]:
    return [pixel_value(fmt, src[i + 2], src[i + 1], src[i]) for i in range(0, len(src), 4)]


def values(fmt: PixelFormat, data: bytes) -> list[int]:
    n, order = fmt.bytes_per_pixel, "big" if fmt.big_endian else "little"
    return [int.from_bytes(data[i:i + n], order) for i in range(0, len(data), n)]


def client_format(fmt: PixelFormat) -> Format:
    return Format(fmt.bits_per_pixel, fmt.depth, fmt.big_endian, fmt.red_max, fmt.green_max,
                  fmt.blue_max, fmt.red_shift, fmt.green_shift, fmt.blue_shift)


def picture(width: int, height: int, colours: int, seed: int) -> Frame:
    rnd = random.Random(seed)
    palette = [rnd.randbytes(3) + b"\0" for _ in range(colours)]
    return Frame(width, height, b"".join(rnd.choice(palette) for _ in range(width * height)))


@given(valid_formats(), st.binary(min_size=4, max_size=400).map(lambda b: b[:len(b) // 4 * 4]))
def test_conversion_matches_per_pixel_reference(fmt: PixelFormat, src: bytes) -> None:
    conv = PixelConverter(fmt)
    out = conv.convert(src)
    assert len(out) == len(src) // 4 * fmt.bytes_per_pixel
    assert values(fmt, out) == ref_pixels(fmt, src)


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize(("shifts", "size"), [((16, 8, 0), 3), ((24, 16, 8), 3), ((0, 8, 16), 3)])
def test_cpixels_are_three_bytes_when_the_colour_fits(big_endian: bool,
                                                      shifts: tuple[int, int, int],
                                                      size: int) -> None:
    fmt = PixelFormat(32, 24, big_endian, True, 255, 255, 255, *shifts)
    conv = PixelConverter(fmt)
    assert conv.cpixel_size == size
    src = bytes(range(4 * 10))
    cps = conv.cpixels(src)
    cf = client_format(fmt)
    got = [cf.cpixel(cps[i:i + 3]) for i in range(0, len(cps), 3)]
    assert got == ref_pixels(fmt, src)


def test_depth_32_keeps_four_byte_cpixels() -> None:
    assert PixelConverter(PixelFormat(32, 32)).cpixel_size == 4


@given(st.lists(st.integers(0, 15), min_size=1, max_size=64), st.sampled_from([1, 2, 4]))
def test_pack_indices(row: list[int], bits: int) -> None:
    row = [i & ((1 << bits) - 1) for i in row]
    packed = pack_indices(bytes(row), bits)
    assert len(packed) == (len(row) * bits + 7) // 8
    acc = int.from_bytes(packed, "big")
    total = len(packed) * 8
    assert [(acc >> (total - bits * (i + 1))) & ((1 << bits) - 1)
            for i in range(len(row))] == row


@settings(deadline=None, max_examples=40)
@given(valid_formats(), st.integers(1, 150), st.integers(1, 100),
       st.sampled_from([1, 2, 3, 5, 16, 17, 300]), st.integers(0, 1000))
def test_zrle_decodes_to_the_picture(fmt: PixelFormat, w: int, h: int, colours: int,
                                     seed: int) -> None:
    frame = picture(w, h, colours, seed)
    enc, inflate = ZrleEncoder(), zlib.decompressobj()
    r = Rect(0, 0, w, h)
    for _ in range(2):  # the zlib stream carries on across rectangles
        data = enc.encode(frame, r, PixelConverter(fmt))
        (n,) = struct.unpack(">I", data[:4])
        assert n == len(data) - 4
        got = decode_zrle(client_format(fmt), inflate.decompress(data[4:]), w, h)
        assert got == ref_pixels(fmt, frame.pixels)


def test_zrle_tile_kinds() -> None:
    conv = PixelConverter(PixelFormat())
    assert encode_tile(b"\1\2\3\0" * 64, 8, 8, conv)[0] == 1  # solid
    assert encode_tile(picture(8, 8, 2, 1).pixels, 8, 8, conv)[0] == 2  # palette
    assert encode_tile(picture(64, 64, 300, 1).pixels, 64, 64, conv)[0] == 0  # raw


def test_raw_of_a_sub_rectangle() -> None:
    frame = picture(10, 6, 300, 3)
    conv = PixelConverter(PixelFormat())
    out = encode_raw(frame, Rect(2, 1, 3, 4), conv)
    assert out == b"".join(frame.pixels[(y * 10 + 2) * 4:(y * 10 + 5) * 4] for y in range(1, 5))


def test_pseudo_rectangles() -> None:
    assert desktop_size_rect(800, 600) == struct.pack(">HHHHi", 0, 0, 800, 600, -223)
    cur = default_cursor()
    data = cursor_rect(cur, PixelConverter(PixelFormat(16, 16, False, True, 31, 63, 31,
                                                       11, 5, 0)))
    assert data[:12] == struct.pack(">HHHHi", cur.hot_x, cur.hot_y, cur.width, cur.height,
                                    -239)
    assert len(data) == 12 + cur.width * cur.height * 2 + (cur.width + 7) // 8 * cur.height


def test_encoding_choice_follows_the_client_order() -> None:
    assert choose_encoding((Encoding.ZRLE, Encoding.RAW)) is Encoding.ZRLE
    assert choose_encoding((5, Encoding.RAW, Encoding.ZRLE)) is Encoding.RAW
    assert choose_encoding((6, 7, -239)) is Encoding.RAW  # nothing known: Raw is always legal


def changed_pixels(a: Frame, b: Frame) -> set[tuple[int, int]]:
    return {(i // 4 % a.width, i // 4 // a.width) for i in range(0, len(a.pixels), 4)
            if a.pixels[i:i + 4] != b.pixels[i:i + 4]}


@settings(deadline=None, max_examples=60)
@given(st.integers(1, 200), st.integers(1, 150),
       st.lists(st.tuples(st.integers(0, 199), st.integers(0, 149)), max_size=12))
def test_damage_covers_every_change_and_only_changed_tiles(w: int, h: int,
                                                           points: list[tuple[int, int]]) -> None:
    a = picture(w, h, 4, 0)
    px = bytearray(a.pixels)
    for x, y in points:
        if x < w and y < h:
            o = (y * w + x) * 4
            px[o] ^= 0xFF
    b = Frame(w, h, bytes(px))
    rects = damaged(a, b)
    changes = changed_pixels(a, b)
    covered = {(x, y) for r in rects for x in range(r.x, r.x + r.width)
               for y in range(r.y, r.y + r.height)}
    assert changes <= covered
    for r in rects:  # every damaged tile holds a change
        for tx in range(r.x, r.x + r.width, TILE):
            assert any(tx <= x < tx + TILE and r.y <= y < r.y + r.height for x, y in changes)
    assert damaged(a, a) == [] and damaged(None, a) == [Rect(0, 0, w, h)]


def test_damage_inside_an_area_and_after_a_resize() -> None:
    a, b = picture(300, 200, 4, 0), picture(300, 200, 4, 1)
    assert damaged(a, b, Rect(10, 20, 30, 40)) == [Rect(10, 20, 30, 40)]
    assert damaged(a, b, Rect(400, 0, 5, 5)) == []
    assert damaged(picture(10, 10, 1, 0), b) == [Rect(0, 0, 300, 200)]


def test_fitted_frames_crop_and_pad() -> None:
    f = picture(4, 3, 300, 0)
    big = f.fitted(6, 5)
    assert big.rect(0, 0, 4, 3) == f.pixels and big.rect(4, 0, 2, 5) == bytes(2 * 5 * 4)
    assert f.fitted(2, 2).pixels == f.rect(0, 0, 2, 2)
