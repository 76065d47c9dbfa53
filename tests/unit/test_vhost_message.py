"""The vhost-user wire codec: round trips and strict refusal of bad payloads."""

from __future__ import annotations

import struct

import pytest
from dvmm_shared.vhost_user.message import (
    HEADER,
    MAX_PAYLOAD,
    VHOST_MEMORY_BASELINE_NREGIONS,
    VHOST_USER_MAX_CONFIG_SIZE,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VRING_NOFD_MASK,
    ConfigSpace,
    Header,
    MemRegion,
    MessageError,
    Request,
    VringAddr,
    VringState,
    decode_mem_table,
    decode_single_region,
    decode_u64,
    decode_vring_fd_index,
    encode,
    encode_mem_table,
    encode_single_region,
    encode_u64,
    request_name,
)
from hypothesis import given, settings
from hypothesis import strategies as st

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
regions = st.builds(MemRegion, u64, u64, u64, u64)


# -- header ----------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(request=u32, payload=st.binary(max_size=300), reply=st.booleans(),
       need_reply=st.booleans())
def test_header_round_trip(request: int, payload: bytes, reply: bool, need_reply: bool) -> None:
    raw = encode(request, payload, reply=reply, need_reply=need_reply)
    header = Header.decode(raw[:HEADER.size])
    assert (header.request, header.size) == (request, len(payload))
    assert (header.is_reply, header.need_reply) == (reply, need_reply)
    assert header.flags & 3 == 1
    assert raw[HEADER.size:] == payload


def test_header_wire_layout() -> None:
    # u32 request, u32 flags (version 1 | reply 0x4 | need_reply 0x8), u32 size
    assert encode(Request.GET_FEATURES) == bytes.fromhex("01000000" "01000000" "00000000")
    assert encode(Request.SET_VRING_NUM, b"12345678", need_reply=True) == (
        bytes.fromhex("08000000" "09000000" "08000000") + b"12345678")
    assert encode(1, reply=True)[4:8] == (1 | VHOST_USER_REPLY_MASK).to_bytes(4, "little")
    assert VHOST_USER_NEED_REPLY_MASK == 8


@pytest.mark.parametrize("length", [0, 1, 11, 13, 24])
def test_truncated_or_overlong_header_refused(length: int) -> None:
    with pytest.raises(MessageError, match="truncated header"):
        Header.decode(bytes(length))


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x4, 0xC, 0x6])
def test_wrong_version_refused(flags: int) -> None:
    with pytest.raises(MessageError, match="version"):
        Header.decode(HEADER.pack(Request.GET_FEATURES, flags, 0))


@pytest.mark.parametrize("size", [MAX_PAYLOAD + 1, 1 << 20, 0xFFFFFFFF])
def test_oversized_payload_refused(size: int) -> None:
    with pytest.raises(MessageError, match=f"payload of {size} bytes"):
        Header.decode(HEADER.pack(Request.SET_MEM_TABLE, 1, size))


def test_largest_payload_accepted() -> None:
    assert Header.decode(HEADER.pack(Request.SET_MEM_TABLE, 1, MAX_PAYLOAD)).size == MAX_PAYLOAD


def test_unknown_request_numbers_decode_and_have_a_clear_name() -> None:
    # The codec frames any request number; refusing unknown ones is the
    # dispatcher's job (it answers NEED_REPLY with a failure ack).
    assert Header.decode(HEADER.pack(999, 1, 0)).request == 999
    assert request_name(999) == "request 999"
    assert request_name(0) == "request 0"
    assert request_name(Request.SET_VRING_KICK) == "SET_VRING_KICK"
    assert (int(Request.GET_STATUS), int(Request.VRING_KICK)) == (40, 35)


# -- fixed-size payloads -------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(value=u64)
def test_u64_round_trip(value: int) -> None:
    assert decode_u64(encode_u64(value)) == value


def test_u64_masks_and_checks_length() -> None:
    assert encode_u64(-1) == b"\xff" * 8
    for bad in (b"", b"1234567", b"123456789"):
        with pytest.raises(MessageError, match=f"features: payload of {len(bad)} bytes"):
            decode_u64(bad, "features")


@settings(max_examples=100, deadline=None)
@given(index=u32, num=u32)
def test_vring_state_round_trip(index: int, num: int) -> None:
    raw = VringState(index, num).encode()
    assert len(raw) == 8 and VringState.decode(raw) == VringState(index, num)


@settings(max_examples=100, deadline=None)
@given(index=u32, flags=u32, desc=u64, used=u64, avail=u64, log=u64)
def test_vring_addr_round_trip(index: int, flags: int, desc: int, used: int, avail: int,
                               log: int) -> None:
    addr = VringAddr(index, flags, desc, used, avail, log)
    raw = addr.encode()
    assert len(raw) == 40 and VringAddr.decode(raw) == addr
    # the wire order is desc, used, avail (vhost_vring_addr)
    assert struct.unpack_from("<QQQ", raw, 8) == (desc, used, avail)


@pytest.mark.parametrize("decode", [VringState.decode, VringAddr.decode])
@pytest.mark.parametrize("length", [0, 7, 9, 39, 41])
def test_vring_payloads_of_the_wrong_size_refused(decode: object, length: int) -> None:
    assert callable(decode)
    with pytest.raises(MessageError, match="expected"):
        decode(bytes(length))


def test_vring_fd_index() -> None:
    assert decode_vring_fd_index(encode_u64(3)) == (3, True)
    assert decode_vring_fd_index(encode_u64(3 | VHOST_USER_VRING_NOFD_MASK)) == (3, False)
    assert decode_vring_fd_index(encode_u64(0x1FF)) == (0xFF, False)
    assert decode_vring_fd_index(encode_u64(0x1234_0005)) == (5, True)
    with pytest.raises(MessageError):
        decode_vring_fd_index(b"\0" * 4)


# -- memory tables ---------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(table=st.lists(regions, min_size=1, max_size=VHOST_MEMORY_BASELINE_NREGIONS))
def test_mem_table_round_trip(table: list[MemRegion]) -> None:
    raw = encode_mem_table(table)
    assert len(raw) == 8 + 32 * VHOST_MEMORY_BASELINE_NREGIONS  # QEMU's fixed layout
    assert struct.unpack_from("<I", raw)[0] == len(table)
    assert decode_mem_table(raw) == table


def test_mem_table_exactly_sized_payload_accepted() -> None:
    table = [MemRegion(0, 0x1000, 0x7F00_0000, 0), MemRegion(0x100000, 0x2000, 0x7F10_0000, 8)]
    raw = struct.pack("<II", 2, 0) + b"".join(r.encode() for r in table)
    assert decode_mem_table(raw) == table


@pytest.mark.parametrize("count", [0, VHOST_MEMORY_BASELINE_NREGIONS + 1, 0xFFFFFFFF])
def test_mem_table_region_count_out_of_range(count: int) -> None:
    raw = struct.pack("<II", count, 0) + bytes(32 * 9)
    with pytest.raises(MessageError, match=f"{count} regions"):
        decode_mem_table(raw)


@pytest.mark.parametrize("length", [0, 4, 7])
def test_mem_table_truncated_header(length: int) -> None:
    with pytest.raises(MessageError, match="truncated"):
        decode_mem_table(struct.pack("<II", 1, 0)[:length])


@pytest.mark.parametrize(("count", "body"), [(1, 0), (1, 31), (3, 64), (3, 95), (8, 224)])
def test_mem_table_shorter_than_its_count(count: int, body: int) -> None:
    raw = struct.pack("<II", count, 0) + bytes(body)
    with pytest.raises(MessageError, match=f"{8 + body} bytes for {count} regions"):
        decode_mem_table(raw)


@settings(max_examples=100, deadline=None)
@given(region=regions)
def test_single_region_round_trip(region: MemRegion) -> None:
    raw = encode_single_region(region)
    assert len(raw) == 40 and raw[:8] == bytes(8)
    assert decode_single_region(raw) == region
    spec = region.spec(42)
    assert (spec.guest_addr, spec.size, spec.user_addr, spec.mmap_offset, spec.fd) == (
        region.guest_addr, region.size, region.user_addr, region.mmap_offset, 42)


@pytest.mark.parametrize("length", [0, 32, 39, 41])
def test_single_region_wrong_size(length: int) -> None:
    with pytest.raises(MessageError, match="memory region"):
        decode_single_region(bytes(length))


# -- config space ------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(offset=st.integers(0, VHOST_USER_MAX_CONFIG_SIZE),
       data=st.binary(max_size=VHOST_USER_MAX_CONFIG_SIZE), flags=u32)
def test_config_round_trip(offset: int, data: bytes, flags: int) -> None:
    cfg = ConfigSpace(offset, len(data), flags, data)
    raw = cfg.encode()
    assert raw[:12] == struct.pack("<III", offset, len(data), flags)
    assert ConfigSpace.decode(raw) == cfg


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "truncated"),
        (struct.pack("<II", 0, 4), "truncated"),
        (struct.pack("<III", 0, 257, 0) + bytes(257), "too large"),
        (struct.pack("<III", 257, 4, 0) + bytes(4), "too large"),
        (struct.pack("<III", 0, 0xFFFFFFFF, 0), "too large"),
        (struct.pack("<III", 0, 8, 0) + bytes(7), "7 data bytes, header says 8"),
        (struct.pack("<III", 0, 8, 0) + bytes(9), "9 data bytes, header says 8"),
        (struct.pack("<III", 0, 0, 0) + b"x", "1 data bytes, header says 0"),
    ],
)
def test_config_with_bad_sizes_refused(raw: bytes, fragment: str) -> None:
    with pytest.raises(MessageError, match=fragment):
        ConfigSpace.decode(raw)


# -- arbitrary bytes ------------------------------------------------------------------------
DECODERS = [decode_mem_table, decode_single_region, ConfigSpace.decode, VringAddr.decode,
            VringState.decode, decode_u64, decode_vring_fd_index, Header.decode]


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300), which=st.sampled_from(DECODERS))
def test_decoders_raise_only_message_error(raw: bytes, which: object) -> None:
    assert callable(which)
    try:
        which(raw)
    except MessageError as exc:
        assert str(exc)
