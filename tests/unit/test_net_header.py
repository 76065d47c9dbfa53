"""The virtio-net header (5.1.6): layout, transmit checks, chain splitting.

Pure functions, so hypothesis throws arbitrary bytes and feature sets at
them: the answer is always a typed header or a :class:`NetHeaderError`.
"""

from __future__ import annotations

import pytest
from dvmm_net.header import (
    HDR_LEN,
    HDR_LEN_LEGACY,
    ChecksumRangeError,
    GsoTypeError,
    HeaderFlagsError,
    NetHeaderError,
    RuntFrameError,
    ShortHeaderError,
    TxChainError,
    VirtioNetHdr,
    check_tx,
    header_size,
    parse_header,
    rx_header,
    split_tx_chain,
)
from dvmm_shared.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
    bit,
)
from hypothesis import given
from hypothesis import strategies as st

OFFLOADS = bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6)
TSO4 = VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=VIRTIO_NET_HDR_GSO_TCPV4,
                    hdr_len=54, gso_size=1448, csum_start=34, csum_offset=16)


def test_header_size_follows_version_1_and_mrg_rxbuf() -> None:
    assert header_size(0) == HDR_LEN_LEGACY == 10
    assert header_size(bit(VIRTIO_F_VERSION_1)) == HDR_LEN == 12
    assert header_size(bit(VIRTIO_NET_F_MRG_RXBUF)) == 12


def test_pack_and_parse_round_trip() -> None:
    hdr = VirtioNetHdr(1, 4, 66, 1428, 54, 16, 3)
    assert parse_header(hdr.pack()) == hdr
    legacy = parse_header(hdr.pack(HDR_LEN_LEGACY))
    assert legacy == VirtioNetHdr(1, 4, 66, 1428, 54, 16, 0)
    assert rx_header(5) == bytes(10) + b"\x05\x00"


@pytest.mark.parametrize("size", [0, 9, 11, 13])
def test_wrong_header_sizes(size: int) -> None:
    with pytest.raises(ShortHeaderError):
        parse_header(bytes(size))


def test_plain_frame_needs_no_feature() -> None:
    check_tx(VirtioNetHdr(), 60, 0)


def test_tso_needs_its_host_feature_and_csum() -> None:
    check_tx(TSO4, 9000, OFFLOADS)
    with pytest.raises(GsoTypeError):
        check_tx(TSO4, 9000, bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO6))
    with pytest.raises(HeaderFlagsError):
        check_tx(TSO4, 9000, bit(VIRTIO_NET_F_HOST_TSO4))  # NEEDS_CSUM without CSUM
    tso6 = VirtioNetHdr(**{**TSO4.__dict__, "gso_type": VIRTIO_NET_HDR_GSO_TCPV6})
    check_tx(tso6, 9000, OFFLOADS)


@pytest.mark.parametrize("hdr, error", [
    (VirtioNetHdr(flags=VIRTIO_NET_HDR_F_DATA_VALID), HeaderFlagsError),
    (VirtioNetHdr(flags=0x80), HeaderFlagsError),
    (VirtioNetHdr(gso_type=2), GsoTypeError),
    (VirtioNetHdr(gso_type=VIRTIO_NET_HDR_GSO_ECN), GsoTypeError),
    (VirtioNetHdr(flags=1, gso_type=VIRTIO_NET_HDR_GSO_UDP, gso_size=1400), GsoTypeError),
    (VirtioNetHdr(flags=1, gso_type=VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN,
                  gso_size=1448), GsoTypeError),
    (VirtioNetHdr(flags=1, gso_type=VIRTIO_NET_HDR_GSO_TCPV4), GsoTypeError),  # gso_size 0
    (VirtioNetHdr(gso_type=VIRTIO_NET_HDR_GSO_TCPV4, gso_size=1448), GsoTypeError),  # no csum
    (VirtioNetHdr(flags=1, csum_start=50, csum_offset=9), ChecksumRangeError),
])
def test_refused_transmit_headers(hdr: VirtioNetHdr, error: type[Exception]) -> None:
    with pytest.raises(error):
        check_tx(hdr, 60, OFFLOADS)


def test_ecn_with_host_ecn() -> None:
    hdr = VirtioNetHdr(**{**TSO4.__dict__, "gso_type": TSO4.gso_type | VIRTIO_NET_HDR_GSO_ECN})
    check_tx(hdr, 9000, OFFLOADS | bit(VIRTIO_NET_F_HOST_ECN))


def test_split_tx_chain_header_across_buffers() -> None:
    raw = TSO4.pack() + bytes(range(100))
    pieces = [memoryview(bytearray(raw[:5])), memoryview(bytearray(raw[5:40])),
              memoryview(bytearray(raw[40:]))]
    frame = split_tx_chain(pieces, [], HDR_LEN, OFFLOADS)
    assert frame.hdr == TSO4
    assert b"".join(frame.hdr_bufs) == TSO4.pack()
    assert b"".join(frame.data) == bytes(range(100)) and frame.data_len == 100


def test_split_tx_chain_refusals() -> None:
    frame = memoryview(bytearray(VirtioNetHdr().pack() + bytes(60)))
    with pytest.raises(TxChainError):
        split_tx_chain([frame], [memoryview(bytearray(4))], HDR_LEN, 0)
    with pytest.raises(ShortHeaderError):
        split_tx_chain([frame[:11]], [], HDR_LEN, 0)
    with pytest.raises(RuntFrameError):
        split_tx_chain([frame[:HDR_LEN + 13]], [], HDR_LEN, 0)


# -- hostile input ----------------------------------------------------------------
@given(st.binary(max_size=16))
def test_any_bytes_parse_or_raise_typed(data: bytes) -> None:
    try:
        hdr = parse_header(data)
    except NetHeaderError:
        assert len(data) not in (10, 12)
        return
    assert hdr.pack(len(data)) == data


@given(st.binary(min_size=12, max_size=12), st.integers(0, 70000),
       st.integers(0, (1 << 64) - 1))
def test_any_header_checks_or_raises_typed(data: bytes, frame_len: int, features: int) -> None:
    hdr = parse_header(data)
    try:
        check_tx(hdr, frame_len, features)
    except NetHeaderError:
        return
    # What passes is something the negotiated features allow.
    assert hdr.flags in (0, VIRTIO_NET_HDR_F_NEEDS_CSUM)
    if hdr.needs_csum:
        assert features & bit(VIRTIO_NET_F_CSUM)
        assert hdr.csum_start + hdr.csum_offset + 2 <= frame_len
    if hdr.gso:
        assert hdr.needs_csum and hdr.gso_size


@given(st.lists(st.binary(max_size=40), max_size=6), st.booleans(),
       st.integers(0, (1 << 64) - 1))
def test_any_chain_splits_or_raises_typed(pieces: list[bytes], writable: bool,
                                          features: int) -> None:
    readable = [memoryview(bytearray(p)) for p in pieces]
    try:
        frame = split_tx_chain(readable, [memoryview(bytearray(1))] if writable else [],
                               HDR_LEN, features)
    except NetHeaderError:
        return
    assert not writable
    assert HDR_LEN + frame.data_len == sum(len(p) for p in pieces)
