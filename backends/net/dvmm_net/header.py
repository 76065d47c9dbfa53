"""The virtio-net packet header (virtio 1.2 section 5.1.6), parsed and built.

Pure: bytes in, a typed header or a typed error out; nothing here touches
a link.  Every frame on the rings starts with ``struct virtio_net_hdr``:
12 bytes when VERSION_1 or MRG_RXBUF is negotiated (``num_buffers``
included), 10 bytes for a legacy driver without MRG_RXBUF (5.1.6.1).

A transmitted header is checked against what was negotiated
(5.1.6.2.1): checksum offload needs CSUM, each GSO type its HOST_* feature,
and the checksum position must lie inside the frame.  The device passes a
valid header to the TAP unchanged, which then does the checksum and the
segmentation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dvmm_shared.chain import ChainReader
from dvmm_shared.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_F_RSC_INFO,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    bit,
)

HDR_LEN_LEGACY = 10
HDR_LEN = 12
_HDR = struct.Struct("<BBHHHH")  # the 10 bytes every header starts with
_NUM_BUFFERS = struct.Struct("<H")
NUM_BUFFERS_OFFSET = 10
ETH_HLEN = 14
VLAN_HLEN = 4
#: Largest frame a TAP hands over with GUEST_TSO4/6: a 64 KiB GSO packet
#: (the kernel's default gso_max_size) plus the link-layer header.
MAX_GSO_FRAME = 65536 + ETH_HLEN + VLAN_HLEN

#: GSO type -> the feature that lets the driver send it (5.1.6.2.1).
_GSO_FEATURE = {
    VIRTIO_NET_HDR_GSO_TCPV4: VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_HDR_GSO_TCPV6: VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_HDR_GSO_UDP: VIRTIO_NET_F_HOST_UFO,
}
_KNOWN_GSO = {VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_UDP,
              VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4}


class NetHeaderError(Exception):
    """A header the device cannot pass on; the frame is dropped."""


class ShortHeaderError(NetHeaderError):
    """Fewer bytes than the negotiated header size."""


class HeaderFlagsError(NetHeaderError):
    """Flags a driver must not set, or NEEDS_CSUM without CSUM negotiated."""


class GsoTypeError(NetHeaderError):
    """An unknown GSO type, or one whose HOST_* feature was not negotiated."""


class ChecksumRangeError(NetHeaderError):
    """csum_start/csum_offset point outside the frame."""


class TxChainError(NetHeaderError):
    """A transmit chain with device-writable buffers (the wrong direction)."""


class RuntFrameError(NetHeaderError):
    """A frame shorter than an Ethernet header."""


@dataclass(frozen=True)
class VirtioNetHdr:
    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    @property
    def gso(self) -> int:
        """The GSO type without the ECN bit."""
        return self.gso_type & ~VIRTIO_NET_HDR_GSO_ECN

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)

    @property
    def is_plain(self) -> bool:
        """No offload asked for: the frame is complete as it stands."""
        return not self.needs_csum and self.gso_type == VIRTIO_NET_HDR_GSO_NONE

    def pack(self, size: int = HDR_LEN) -> bytes:
        head = _HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                         self.csum_start, self.csum_offset)
        return head + _NUM_BUFFERS.pack(self.num_buffers) if size == HDR_LEN else head


def header_size(features: int) -> int:
    """5.1.6.1: 12 bytes with VERSION_1 or MRG_RXBUF, else the legacy 10."""
    if features & (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF)):
        return HDR_LEN
    return HDR_LEN_LEGACY


def parse_header(data: bytes) -> VirtioNetHdr:
    """Decode a 10- or 12-byte header (the layout only; see :func:`check_tx`)."""
    if len(data) not in (HDR_LEN_LEGACY, HDR_LEN):
        raise ShortHeaderError(f"a virtio-net header is 10 or 12 bytes, not {len(data)}")
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = _HDR.unpack_from(data)
    num = _NUM_BUFFERS.unpack_from(data, NUM_BUFFERS_OFFSET)[0] if len(data) == HDR_LEN else 0
    return VirtioNetHdr(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num)


def check_tx(hdr: VirtioNetHdr, frame_len: int, features: int) -> None:
    """Refuse a transmit header the negotiated ``features`` do not allow."""
    if hdr.flags & (VIRTIO_NET_HDR_F_DATA_VALID | VIRTIO_NET_HDR_F_RSC_INFO):
        raise HeaderFlagsError(f"driver set receive-only flags {hdr.flags:#x}")
    if hdr.flags & ~VIRTIO_NET_HDR_F_NEEDS_CSUM:
        raise HeaderFlagsError(f"unknown header flags {hdr.flags:#x}")
    if hdr.needs_csum:
        if not features & bit(VIRTIO_NET_F_CSUM):
            raise HeaderFlagsError("NEEDS_CSUM without VIRTIO_NET_F_CSUM")
        if hdr.csum_start + hdr.csum_offset + 2 > frame_len:
            raise ChecksumRangeError(
                f"checksum at {hdr.csum_start}+{hdr.csum_offset} is outside the "
                f"{frame_len}-byte frame")
    _check_gso(hdr, features)


def _check_gso(hdr: VirtioNetHdr, features: int) -> None:
    gso = hdr.gso
    if gso not in _KNOWN_GSO:
        raise GsoTypeError(f"unknown GSO type {hdr.gso_type:#x}")
    if gso == VIRTIO_NET_HDR_GSO_NONE:
        if hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN:
            raise GsoTypeError("ECN bit without a GSO type")
        return
    feature = _GSO_FEATURE.get(gso)
    if feature is None or not features & bit(feature):
        raise GsoTypeError(f"GSO type {gso} was not negotiated")
    if hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN and not features & bit(VIRTIO_NET_F_HOST_ECN):
        raise GsoTypeError("GSO with ECN without VIRTIO_NET_F_HOST_ECN")
    if hdr.gso_size == 0:
        raise GsoTypeError("GSO frame with gso_size 0")
    if not hdr.needs_csum:
        raise GsoTypeError("GSO frame without NEEDS_CSUM")


def rx_header(num_buffers: int, size: int = HDR_LEN) -> bytes:
    """The header of a received frame that carries no offload information."""
    return VirtioNetHdr(num_buffers=num_buffers).pack(size)


def num_buffers_bytes(count: int) -> bytes:
    return _NUM_BUFFERS.pack(count)


def max_frame(mtu: int) -> int:
    """Largest Ethernet frame (VLAN tag included) for an MTU, without GSO."""
    return mtu + ETH_HLEN + VLAN_HLEN


@dataclass(frozen=True)
class TxFrame:
    """A transmit chain split into its checked header and the frame bytes."""

    hdr: VirtioNetHdr
    hdr_bufs: list[memoryview]
    data: list[memoryview]

    @property
    def data_len(self) -> int:
        return sum(len(b) for b in self.data)


def split_tx_chain(readable: list[memoryview], writable: list[memoryview], size: int,
                   features: int) -> TxFrame:
    """5.1.6.2: a transmit chain is the header then the frame, all device-readable."""
    if writable:
        raise TxChainError(f"transmit chain with {len(writable)} device-writable buffers")
    reader = ChainReader(readable)
    if reader.remaining < size:
        raise ShortHeaderError(f"transmit chain of {reader.remaining} bytes has no "
                               f"{size}-byte header")
    hdr_bufs = reader.take(size)
    hdr = parse_header(b"".join(hdr_bufs))
    frame_len = reader.remaining
    if frame_len < ETH_HLEN:
        raise RuntFrameError(f"frame of {frame_len} bytes")
    check_tx(hdr, frame_len, features)
    return TxFrame(hdr, hdr_bufs, reader.take_rest())
