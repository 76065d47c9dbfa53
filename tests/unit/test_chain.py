"""ChainReader / ChainWriter: byte streams over a chain's buffers.

Buffers here are plain ``bytearray`` memoryviews; the property tests split one
reference byte string at random points and check every operation against it.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
from dvmm_shared.chain import ChainReader, ChainShortError, ChainWriter, write_views
from hypothesis import given, settings
from hypothesis import strategies as st


def split(data: bytes | bytearray, cuts: list[int]) -> list[memoryview]:
    """``data`` as writable views cut at ``cuts`` (empty pieces included)."""
    backing = bytearray(data)
    points = sorted(min(c, len(backing)) for c in cuts)
    bounds = [0, *points, len(backing)]
    return [memoryview(backing)[a:b] for a, b in pairwise(bounds)]


def joined(views: list[memoryview]) -> bytes:
    return b"".join(bytes(v) for v in views)


# -- reader ------------------------------------------------------------------------
def test_read_across_buffer_boundaries() -> None:
    r = ChainReader(split(b"abcdefghij", [3, 3, 7]))
    assert r.total == 10
    assert r.read(2) == b"ab"
    assert r.read(5) == b"cdefg"  # spans three buffers
    assert (r.consumed, r.remaining) == (7, 3)
    assert r.read(3) == b"hij"
    assert r.read(0) == b"" and r.remaining == 0


def test_take_returns_views_of_the_buffers_not_copies() -> None:
    backing = bytearray(b"0123456789")
    r = ChainReader([memoryview(backing)[:4], memoryview(backing)[4:]])
    views = r.take(6)
    assert [len(v) for v in views] == [4, 2]
    views[1][0] = ord("X")
    assert backing == bytearray(b"0123X56789")


def test_empty_buffers_are_skipped() -> None:
    r = ChainReader([memoryview(b""), memoryview(b"ab"), memoryview(b""), memoryview(b"c")])
    assert r.total == 3
    assert [bytes(v) for v in r.take(3)] == [b"ab", b"c"]


@pytest.mark.parametrize("n", [-1, 11, 1 << 40])
def test_take_more_than_remaining_or_negative_is_refused(n: int) -> None:
    r = ChainReader(split(b"abcdefghij", [5]))
    r.read(0)
    with pytest.raises(ChainShortError):
        r.take(n)
    assert r.consumed == 0 and r.read(10) == b"abcdefghij"  # nothing was consumed


def test_short_read_after_partial_consumption() -> None:
    r = ChainReader(split(b"abcdef", [2]))
    r.read(4)
    with pytest.raises(ChainShortError, match="need 3 bytes, chain has 2 left"):
        r.read(3)


def test_take_tail_hides_the_tail_from_take() -> None:
    r = ChainReader(split(b"header-data-ST", [6, 12]))
    tail = r.take_tail(2)
    assert joined(tail) == b"ST"
    assert r.remaining == 12 and r.total == 12
    assert r.read(12) == b"header-data-"
    with pytest.raises(ChainShortError):
        r.take(1)


def test_take_tail_spanning_buffers_and_after_partial_take() -> None:
    r = ChainReader(split(b"0123456789", [4, 8, 9]))
    assert r.read(3) == b"012"
    tail = r.take_tail(4)  # 6789 spans three buffers
    assert [bytes(v) for v in tail] == [b"67", b"8", b"9"]
    assert r.read(3) == b"345" and r.remaining == 0


def test_take_tail_too_long_is_refused() -> None:
    r = ChainReader(split(b"abc", []))
    r.read(1)
    with pytest.raises(ChainShortError, match="trailing"):
        r.take_tail(3)
    with pytest.raises(ChainShortError):
        r.take_tail(-1)
    assert r.read(2) == b"bc"


def test_take_rest() -> None:
    r = ChainReader(split(b"abcdef", [1, 4]))
    r.read(2)
    assert joined(r.take_rest()) == b"cdef" and r.remaining == 0
    assert r.take_rest() == []


# -- writer ------------------------------------------------------------------------
def test_write_spans_buffers() -> None:
    backing = bytearray(10)
    w = ChainWriter([memoryview(backing)[:3], memoryview(backing)[3:5], memoryview(backing)[5:]])
    w.write(b"hello")
    w.write(memoryview(b"world"))
    assert backing == bytearray(b"helloworld") and w.remaining == 0


def test_write_too_much_writes_nothing() -> None:
    backing = bytearray(4)
    w = ChainWriter([memoryview(backing)])
    with pytest.raises(ChainShortError):
        w.write(b"12345")
    assert backing == bytearray(4) and w.consumed == 0


def test_status_byte_via_take_tail_then_data() -> None:
    # The virtio-blk layout: data then a status byte, which may share a buffer.
    backing = bytearray(9)
    w = ChainWriter([memoryview(backing)[:4], memoryview(backing)[4:]])
    status = w.take_tail(1)[0]
    w.write(b"DATADATA")
    status[0] = 0x5A
    assert backing == bytearray(b"DATADATA\x5a")
    with pytest.raises(ChainShortError):
        w.write(b"x")


def test_write_views() -> None:
    backing = bytearray(6)
    write_views([memoryview(backing)[:1], memoryview(backing)[1:6]], b"abcdef")
    assert backing == bytearray(b"abcdef")


# -- properties ----------------------------------------------------------------------
data_and_cuts = st.binary(max_size=200).flatmap(
    lambda d: st.tuples(st.just(d), st.lists(st.integers(0, len(d)), max_size=8)))


@settings(max_examples=200, deadline=None)
@given(dc=data_and_cuts, steps=st.lists(st.integers(0, 60), max_size=10))
def test_reads_match_the_reference(dc: tuple[bytes, list[int]], steps: list[int]) -> None:
    data, cuts = dc
    r = ChainReader(split(data, cuts))
    pos = 0
    for n in steps:
        if pos + n > len(data):
            with pytest.raises(ChainShortError):
                r.read(n)
            continue
        views = r.take(n)
        assert joined(views) == data[pos:pos + n]
        assert all(len(v) for v in views)  # no empty slices handed out
        pos += n
        assert r.consumed == pos and r.remaining == len(data) - pos
    assert joined(r.take_rest()) == data[pos:]


@settings(max_examples=200, deadline=None)
@given(dc=data_and_cuts, head=st.integers(0, 200), tail=st.integers(0, 200))
def test_take_tail_matches_the_reference(dc: tuple[bytes, list[int]], head: int,
                                         tail: int) -> None:
    data, cuts = dc
    r = ChainReader(split(data, cuts))
    head = min(head, len(data))
    assert r.read(head) == data[:head]
    if tail > len(data) - head:
        with pytest.raises(ChainShortError):
            r.take_tail(tail)
        return
    assert joined(r.take_tail(tail)) == data[len(data) - tail:]
    assert r.read(r.remaining) == data[head:len(data) - tail]
    with pytest.raises(ChainShortError):
        r.take(1)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), max_size=8), payload=st.binary(max_size=200),
       status=st.booleans())
def test_writes_land_in_order(sizes: list[int], payload: bytes, status: bool) -> None:
    backing = bytearray(sum(sizes))
    views, pos = [], 0
    for size in sizes:
        views.append(memoryview(backing)[pos:pos + size])
        pos += size
    w = ChainWriter(views)
    room = len(backing) - (1 if status and backing else 0)
    tail = w.take_tail(1) if status and backing else []
    if len(payload) > room:
        with pytest.raises(ChainShortError):
            w.write(payload)
        assert backing == bytearray(len(backing))
        return
    w.write(payload)
    for view in tail:
        view[0] = 0xEE
    assert backing[:len(payload)] == payload
    assert backing[len(payload):room] == bytearray(room - len(payload))
    if tail:
        assert backing[-1] == 0xEE
