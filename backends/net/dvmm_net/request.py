"""Control virtqueue commands (virtio 1.2 section 5.1.6.5), parsed.

Pure: the chain's readable bytes become a typed command or a typed error;
nothing is applied here.  A command is ``{u8 class, u8 command}``, then
command-specific data (readable), then the ``u8 ack`` the device writes
(the chain's last writable byte).  Lengths are exact: a command with
missing or extra bytes is malformed.  Which commands the device accepts
depends on what was negotiated; that is the device's decision.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dvmm_shared.chain import ChainReader, ChainShortError, ChainWriter
from dvmm_shared.virtio import (
    VIRTIO_NET_CTRL_ANNOUNCE_ACK,
    VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
    VIRTIO_NET_CTRL_MAC_ADDR_SET,
    VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX_NOBCAST,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VirtioNetCtrlClass,
)

MAC_LEN = 6
#: Far above any real command (a MAC table of a few hundred entries); the
#: readable part is not even copied when it is longer.
MAX_CTRL_BYTES = 1 << 16
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class CtrlError(Exception):
    """A command the device answers with VIRTIO_NET_ERR."""


class NoAckByteError(CtrlError):
    """No writable byte for the ack: nothing can be answered."""


class CtrlShortError(CtrlError):
    """Fewer than the 2 header bytes."""


class CtrlUnknownError(CtrlError):
    """A class or command this device does not know."""


class CtrlDataError(CtrlError):
    """Command data of the wrong length or with bad values."""


@dataclass(frozen=True)
class RxMode:
    """VIRTIO_NET_CTRL_RX: PROMISC, ALLMULTI, ALLUNI, NOMULTI, NOUNI, NOBCAST."""

    command: int
    on: bool


@dataclass(frozen=True)
class MacTableSet:
    unicast: tuple[bytes, ...]
    multicast: tuple[bytes, ...]


@dataclass(frozen=True)
class MacAddrSet:
    mac: bytes


@dataclass(frozen=True)
class AnnounceAck:
    pass


@dataclass(frozen=True)
class MqPairsSet:
    pairs: int


@dataclass(frozen=True)
class GuestOffloadsSet:
    offloads: int


CtrlCommand = RxMode | MacTableSet | MacAddrSet | AnnounceAck | MqPairsSet | GuestOffloadsSet


def take_ack(writer: ChainWriter) -> memoryview:
    """The ack byte: the chain's last writable byte."""
    try:
        return writer.take_tail(1)[0]
    except ChainShortError:
        raise NoAckByteError("no writable ack byte") from None


def read_command(reader: ChainReader) -> CtrlCommand:
    """Parse the readable part of a control chain."""
    if reader.remaining > MAX_CTRL_BYTES:
        raise CtrlDataError(f"control command of {reader.remaining} bytes")
    return parse_command(reader.read(reader.remaining))


def parse_command(data: bytes) -> CtrlCommand:
    if len(data) < 2:
        raise CtrlShortError(f"control header needs 2 bytes, got {len(data)}")
    cls, cmd, body = data[0], data[1], data[2:]
    if cls == VirtioNetCtrlClass.RX:
        if not VIRTIO_NET_CTRL_RX_PROMISC <= cmd <= VIRTIO_NET_CTRL_RX_NOBCAST:
            raise CtrlUnknownError(f"RX command {cmd}")
        (on,) = _exact(body, _U8, "RX mode")
        if on > 1:
            raise CtrlDataError(f"RX mode value {on} is not 0 or 1")
        return RxMode(cmd, bool(on))
    if cls == VirtioNetCtrlClass.MAC:
        return _parse_mac(cmd, body)
    if cls == VirtioNetCtrlClass.ANNOUNCE and cmd == VIRTIO_NET_CTRL_ANNOUNCE_ACK:
        _exact(body, None, "ANNOUNCE_ACK")
        return AnnounceAck()
    if cls == VirtioNetCtrlClass.MQ and cmd == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET:
        (pairs,) = _exact(body, _U16, "VQ_PAIRS_SET")
        return MqPairsSet(pairs)
    if cls == VirtioNetCtrlClass.GUEST_OFFLOADS and cmd == VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET:
        (offloads,) = _exact(body, _U64, "GUEST_OFFLOADS_SET")
        return GuestOffloadsSet(offloads)
    raise CtrlUnknownError(f"class {cls} command {cmd}")


def _exact(body: bytes, fmt: struct.Struct | None, what: str) -> tuple[int, ...]:
    size = fmt.size if fmt is not None else 0
    if len(body) != size:
        raise CtrlDataError(f"{what} carries {len(body)} bytes, not {size}")
    return fmt.unpack(body) if fmt is not None else ()


def _parse_mac(cmd: int, body: bytes) -> CtrlCommand:
    if cmd == VIRTIO_NET_CTRL_MAC_ADDR_SET:
        if len(body) != MAC_LEN:
            raise CtrlDataError(f"MAC_ADDR_SET carries {len(body)} bytes, not 6")
        return MacAddrSet(bytes(body))
    if cmd == VIRTIO_NET_CTRL_MAC_TABLE_SET:
        unicast, rest = _mac_table(body, "unicast")
        multicast, rest = _mac_table(rest, "multicast")
        if rest:
            raise CtrlDataError(f"{len(rest)} bytes after the MAC tables")
        return MacTableSet(unicast, multicast)
    raise CtrlUnknownError(f"MAC command {cmd}")


def _mac_table(data: bytes, what: str) -> tuple[tuple[bytes, ...], bytes]:
    """``le32 entries`` then ``entries`` MACs (5.1.6.5.2); returns them and the rest."""
    if len(data) < _U32.size:
        raise CtrlDataError(f"{what} MAC table has no entry count")
    (entries,) = _U32.unpack_from(data)
    end = _U32.size + entries * MAC_LEN
    if end > len(data):
        raise CtrlDataError(f"{what} MAC table of {entries} entries is longer than the command")
    macs = tuple(data[i:i + MAC_LEN] for i in range(_U32.size, end, MAC_LEN))
    return macs, data[end:]
