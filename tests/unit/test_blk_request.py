"""virtio-blk request parsing (5.2.6), pure: fake chains built from bytearrays."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from itertools import pairwise

import pytest
from dvmm_blk.request import (
    HEADER,
    SEGMENT,
    BlkRequestError,
    DataLayoutError,
    Discard,
    DiskLimits,
    Flush,
    GetId,
    NoStatusByteError,
    Read,
    SectorRangeError,
    Segment,
    SegmentError,
    ShortHeaderError,
    UnsupportedRequestError,
    Write,
    WriteZeroes,
    parse_request,
    parse_simple,
    take_status,
)
from dvmm_shared.chain import ChainReader, ChainWriter
from dvmm_shared.virtio import VirtioBlkReqType as T
from hypothesis import event, given, settings
from hypothesis import strategies as st

CAPACITY = 64  # sectors
LIMITS = DiskLimits(capacity=CAPACITY)


def views(chunks: Sequence[bytes | int]) -> list[memoryview]:
    """Writable views: bytes are copied in, an int is a zeroed buffer of that size."""
    return [memoryview(bytearray(c)) for c in chunks]


def hdr(rtype: int, sector: int = 0) -> bytes:
    return HEADER.pack(rtype, 0, sector)


def seg(sector: int, num: int, flags: int = 0) -> bytes:
    return SEGMENT.pack(sector, num, flags)


def parse(readable: Sequence[bytes | int], writable: Sequence[bytes | int],
          limits: DiskLimits = LIMITS) -> tuple[object, memoryview]:
    writer = ChainWriter(views(writable))
    status = take_status(writer)
    return parse_request(ChainReader(views(readable)), writer, limits), status


# -- the status byte ---------------------------------------------------------------
def test_status_is_the_last_writable_byte() -> None:
    bufs = views([4, 3])
    status = take_status(ChainWriter(bufs))
    status[0] = 0xAB
    assert bytes(bufs[1]) == b"\0\0\xab" and bytes(bufs[0]) == bytes(4)


@pytest.mark.parametrize("writable", [[], [0], [0, 0]])
def test_no_writable_byte_means_no_status(writable: list[int]) -> None:
    with pytest.raises(NoStatusByteError):
        take_status(ChainWriter(views(writable)))


# -- each request type ----------------------------------------------------------------
def test_read() -> None:
    req, _ = parse([hdr(T.IN, 5)], [1024, 1])
    assert isinstance(req, Read) and req.sector == 5
    assert [len(b) for b in req.bufs] == [1024]


def test_read_data_and_status_share_a_buffer() -> None:
    req, status = parse([hdr(T.IN, 0)], [512, 513])
    assert isinstance(req, Read) and sum(len(b) for b in req.bufs) == 1024
    assert len(status) == 1


def test_read_up_to_the_last_sector() -> None:
    req, _ = parse([hdr(T.IN, CAPACITY - 2)], [1024, 1])
    assert isinstance(req, Read) and req.sector == CAPACITY - 2


def test_write_with_a_header_split_across_buffers() -> None:
    raw = hdr(T.OUT, 7)
    req, _ = parse([raw[:3], raw[3:11], raw[11:] + b"A" * 100, b"B" * 412], [1])
    assert isinstance(req, Write) and req.sector == 7
    assert b"".join(bytes(b) for b in req.bufs) == b"A" * 100 + b"B" * 412


def test_flush() -> None:
    req, _ = parse([hdr(T.FLUSH, 999)], [1])
    assert req == Flush()


@pytest.mark.parametrize(("room", "expected"), [(20, 20), (8, 8), (64, 20), (0, 0)])
def test_get_id_takes_at_most_20_bytes(room: int, expected: int) -> None:
    req, _ = parse([hdr(T.GET_ID)], [room, 1])
    assert isinstance(req, GetId) and sum(len(b) for b in req.buf) == expected


def test_discard_and_write_zeroes_segments() -> None:
    req, _ = parse([hdr(T.DISCARD), seg(8, 16)], [1])
    assert req == Discard([Segment(8, 16, False)])
    req, _ = parse([hdr(T.WRITE_ZEROES), seg(0, CAPACITY, 1)], [1])
    assert req == WriteZeroes([Segment(0, CAPACITY, True)])
    many = DiskLimits(CAPACITY, max_discard_seg=4, max_write_zeroes_seg=4)
    req, _ = parse([hdr(T.DISCARD), seg(0, 1) + seg(10, 2), seg(20, 3)], [1], many)
    assert req == Discard([Segment(0, 1, False), Segment(10, 2, False), Segment(20, 3, False)])


# -- refused requests ------------------------------------------------------------------
BAD: dict[str, tuple[list[bytes | int], list[bytes | int], type[BlkRequestError], str]] = {
    "no-header": ([], [1], ShortHeaderError, "has 0"),
    "short-header": ([hdr(T.IN)[:15]], [1], ShortHeaderError, "has 15"),
    "read-with-readable-data": ([hdr(T.IN), 512], [512, 1], DataLayoutError, "readable"),
    "read-partial-sector": ([hdr(T.IN)], [513, 1], DataLayoutError, "513 bytes"),
    "write-partial-sector": ([hdr(T.OUT), 100], [1], DataLayoutError, "100 bytes"),
    "get-id-with-data": ([hdr(T.GET_ID), 4], [20, 1], DataLayoutError, "get-id"),
    "read-past-end": ([hdr(T.IN, CAPACITY - 1)], [1024, 1], SectorRangeError, "past"),
    "write-past-end": ([hdr(T.OUT, CAPACITY), 512], [1], SectorRangeError, "past"),
    "empty-read-beyond-end": ([hdr(T.IN, CAPACITY + 1)], [1], SectorRangeError, "past"),
    "huge-sector": ([hdr(T.OUT, (1 << 64) - 1), 512], [1], SectorRangeError, "past"),
    "sector-wraps-u64": ([hdr(T.IN, (1 << 64) - 2)], [2048, 1], SectorRangeError, "past"),
    "discard-no-segment": ([hdr(T.DISCARD)], [1], SegmentError, "0 bytes"),
    "discard-partial-segment": ([hdr(T.DISCARD), seg(0, 1)[:15]], [1], SegmentError, "15"),
    "discard-too-many": ([hdr(T.DISCARD), seg(0, 1) * 2], [1], SegmentError, "2 segments"),
    "discard-unmap-flag": ([hdr(T.DISCARD), seg(0, 1, 1)], [1], SegmentError, "flags"),
    "discard-reserved-flag": ([hdr(T.DISCARD), seg(0, 1, 2)], [1], SegmentError, "flags"),
    "discard-past-end": ([hdr(T.DISCARD), seg(CAPACITY - 1, 2)], [1], SectorRangeError, "past"),
    "discard-huge-sector": ([hdr(T.DISCARD), seg((1 << 64) - 1, 1)], [1], SectorRangeError,
                            "past"),
    "discard-too-long": ([hdr(T.DISCARD), seg(0, (1 << 22) + 1)], [1], SegmentError, "allows"),
    "zeroes-reserved-flag": ([hdr(T.WRITE_ZEROES), seg(0, 1, 0x80000001)], [1], SegmentError,
                             "flags"),
    "zeroes-too-many": ([hdr(T.WRITE_ZEROES), seg(0, 1) * 3], [1], SegmentError, "3 segments"),
    "zeroes-past-end": ([hdr(T.WRITE_ZEROES), seg(CAPACITY, 1)], [1], SectorRangeError, "past"),
}


@pytest.mark.parametrize(("readable", "writable", "error", "fragment"), BAD.values(),
                         ids=BAD.keys())
def test_bad_request_refused(readable: list[bytes | int], writable: list[bytes | int],
                             error: type[BlkRequestError], fragment: str) -> None:
    with pytest.raises(error, match=fragment) as info:
        parse(readable, writable)
    assert not info.value.status_unsupported


@pytest.mark.parametrize("rtype", [2, 3, 5, T.GET_LIFETIME, T.SECURE_ERASE, 0xFFFFFFFF])
def test_unknown_or_unimplemented_type_is_unsupported(rtype: int) -> None:
    with pytest.raises(UnsupportedRequestError, match=f"type {rtype}") as info:
        parse([hdr(rtype)], [1])
    assert info.value.status_unsupported


def test_reserved_header_field_is_ignored() -> None:
    req, _ = parse([struct.pack("<IIQ", T.IN, 0xDEADBEEF, 1)], [512, 1])
    assert isinstance(req, Read) and req.sector == 1


def test_limits_are_the_advertised_ones() -> None:
    small = DiskLimits(capacity=8, max_discard_sectors=4, max_write_zeroes_sectors=2)
    assert parse([hdr(T.DISCARD), seg(0, 4)], [1], small)[0] == Discard([Segment(0, 4, False)])
    with pytest.raises(SegmentError):
        parse([hdr(T.DISCARD), seg(0, 5)], [1], small)
    with pytest.raises(SegmentError):
        parse([hdr(T.WRITE_ZEROES), seg(0, 3)], [1], small)


# -- property: random headers and chain shapes ------------------------------------------
TYPES = st.one_of(st.sampled_from([0, 1, 11, 13]), st.sampled_from([0, 1, 4, 8, 10, 11, 13, 14]),
                  st.integers(0, 0xFFFFFFFF))
SECTORS = st.one_of(st.integers(0, CAPACITY + 2), st.integers(0, (1 << 64) - 1))
SIZES = st.one_of(st.sampled_from([512, 1024, 1536]), st.integers(0, 3),
                  st.sampled_from([1, 15, 16, 17, 20, 511, 512, 513, 1024]), st.integers(0, 2048))
WRITABLE = st.tuples(st.lists(SIZES, max_size=4), st.integers(0, 4)).map(
    lambda t: t[0] if t[1] == 4 else t[0] + [1])  # usually a status byte of its own


@st.composite
def readable_part(draw: st.DrawFn) -> list[bytes]:
    raw = HEADER.pack(draw(TYPES), draw(st.integers(0, 0xFFFFFFFF)), draw(SECTORS))
    raw = raw[:draw(st.integers(0, 16))] if draw(st.integers(0, 9)) == 0 else raw
    if draw(st.booleans()):  # segments with random fields
        raw += b"".join(SEGMENT.pack(draw(SECTORS), draw(st.integers(0, 0xFFFFFFFF)),
                                     draw(st.integers(0, 3)))
                        for _ in range(draw(st.integers(0, 3))))
    raw += bytes(draw(SIZES)) if draw(st.integers(0, 2)) == 0 else b""
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=4)))
    bounds = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in pairwise(bounds)]


@settings(max_examples=400, deadline=None)
@given(readable=readable_part(), writable=WRITABLE)
def test_random_requests_parse_or_raise_a_blk_error(readable: list[bytes],
                                                    writable: list[int]) -> None:
    try:
        req, _status = parse(readable, writable)
    except BlkRequestError as exc:
        event(type(exc).__name__)
        return
    event(type(req).__name__)
    if isinstance(req, (Read, Write)):
        total = sum(len(b) for b in req.bufs)
        assert total % 512 == 0 and req.sector + total // 512 <= CAPACITY
    elif isinstance(req, (Discard, WriteZeroes)):
        assert 1 <= len(req.segments) <= 1
        assert all(s.sector + s.num_sectors <= CAPACITY for s in req.segments)
        assert isinstance(req, WriteZeroes) or not any(s.unmap for s in req.segments)
    elif isinstance(req, GetId):
        assert sum(len(b) for b in req.buf) <= 20
    else:
        assert req == Flush()


@given(readable=readable_part(), writable=WRITABLE)
def test_the_fast_path_agrees_with_the_general_parser(readable: list[bytes],
                                                      writable: list[int]) -> None:
    """parse_simple is a shortcut: whenever it answers, parse_request gives the
    same request (same type, sector, byte count and buffers) and status byte."""
    fast = parse_simple(views(readable), views(writable), LIMITS)
    if fast is None:
        event("general path")
        return
    event(f"fast {type(fast[0]).__name__}")
    req, status = parse(readable, writable)
    fast_req, fast_status = fast
    assert type(fast_req) is type(req)
    assert isinstance(req, (Read, Write)) and isinstance(fast_req, (Read, Write))
    assert (fast_req.sector, fast_req.nbytes) == (req.sector, req.nbytes)
    assert b"".join(fast_req.bufs) == b"".join(req.bufs)
    assert len(fast_status) == len(status) == 1


def test_fast_path_takes_the_common_layouts() -> None:
    read = parse_simple(views([hdr(T.IN, 2)]), views([1024, 1]), LIMITS)
    assert read is not None and isinstance(read[0], Read)
    assert (read[0].sector, read[0].nbytes) == (2, 1024)
    write = parse_simple(views([hdr(T.OUT, 3), b"x" * 512]), views([1]), LIMITS)
    assert write is not None and isinstance(write[0], Write) and write[0].nbytes == 512
    assert parse_simple(views([hdr(T.IN, CAPACITY)]), views([512, 1]), LIMITS) is None
    assert parse_simple(views([hdr(T.FLUSH)]), views([1]), LIMITS) is None
