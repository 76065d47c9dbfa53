"""virtio-blk requests (virtio 1.2 section 5.2.6), parsed from a descriptor chain.

Pure: turns the chain's readable and writable streams into a typed request
or raises a typed error.  It touches no file.  The request header is
``{le32 type, le32 reserved, le64 sector}`` in the readable part, the data
follows (readable for writes, writable for reads) and the last writable byte
is the status.  Every length and sector range is checked against the disk.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dvmm_shared.chain import ChainReader, ChainShortError, ChainWriter
from dvmm_shared.virtio import (
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_SECTOR_SIZE,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    VirtioBlkReqType,
)

HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")  # virtio_blk_discard_write_zeroes


class BlkRequestError(Exception):
    """A request that cannot be served; ``status`` is what the driver gets back."""

    status_unsupported = False


class NoStatusByteError(BlkRequestError):
    """No writable byte for the status: nothing can be reported."""


class ShortHeaderError(BlkRequestError):
    """Fewer than 16 readable bytes for the header."""


class DataLayoutError(BlkRequestError):
    """Data in the wrong direction or of a length that is not whole sectors."""


class SectorRangeError(BlkRequestError):
    """The request reaches past the end of the disk."""


class SegmentError(BlkRequestError):
    """A discard/write-zeroes segment list that is malformed or too long."""


class UnsupportedRequestError(BlkRequestError):
    """A request type this device does not implement (VIRTIO_BLK_S_UNSUPP)."""

    status_unsupported = True


@dataclass(frozen=True)
class Read:
    sector: int
    bufs: list[memoryview]
    nbytes: int


@dataclass(frozen=True)
class Write:
    sector: int
    bufs: list[memoryview]
    nbytes: int


@dataclass(frozen=True)
class Flush:
    pass


@dataclass(frozen=True)
class GetId:
    buf: list[memoryview]


@dataclass(frozen=True)
class Segment:
    sector: int
    num_sectors: int
    unmap: bool


@dataclass(frozen=True)
class Discard:
    segments: list[Segment]


@dataclass(frozen=True)
class WriteZeroes:
    segments: list[Segment]


BlkRequest = Read | Write | Flush | GetId | Discard | WriteZeroes


@dataclass(frozen=True)
class DiskLimits:
    """What the device advertised, which requests are checked against."""

    capacity: int  # sectors
    max_discard_sectors: int = 1 << 22
    max_discard_seg: int = 1
    max_write_zeroes_sectors: int = 1 << 22
    max_write_zeroes_seg: int = 1


def take_status(writer: ChainWriter) -> memoryview:
    """The status byte: the chain's last writable byte."""
    try:
        return writer.take_tail(1)[0]
    except ChainShortError:
        raise NoStatusByteError("no writable status byte") from None


def parse_request(reader: ChainReader, writer: ChainWriter, limits: DiskLimits) -> BlkRequest:
    """Build the typed request; the status byte must already be taken off ``writer``."""
    if reader.remaining < HEADER.size:
        raise ShortHeaderError(f"request header needs 16 bytes, chain has {reader.remaining}")
    rtype, _reserved, sector = HEADER.unpack(reader.read(HEADER.size))
    if rtype == VirtioBlkReqType.IN:
        _no_data(reader, "read")
        bufs = writer.take_rest()
        count = _whole_sectors(bufs, "read")
        _check_range(sector, count, limits)
        return Read(sector, bufs, count * VIRTIO_BLK_SECTOR_SIZE)
    if rtype == VirtioBlkReqType.OUT:
        bufs = reader.take_rest()
        count = _whole_sectors(bufs, "write")
        _check_range(sector, count, limits)
        return Write(sector, bufs, count * VIRTIO_BLK_SECTOR_SIZE)
    if rtype == VirtioBlkReqType.FLUSH:
        return Flush()
    if rtype == VirtioBlkReqType.GET_ID:
        _no_data(reader, "get-id")
        return GetId(writer.take(min(VIRTIO_BLK_ID_BYTES, writer.remaining)))
    if rtype == VirtioBlkReqType.DISCARD:
        return Discard(_segments(reader, limits, limits.max_discard_seg,
                                 limits.max_discard_sectors, allow_unmap=False))
    if rtype == VirtioBlkReqType.WRITE_ZEROES:
        return WriteZeroes(_segments(reader, limits, limits.max_write_zeroes_seg,
                                     limits.max_write_zeroes_sectors, allow_unmap=True))
    raise UnsupportedRequestError(f"request type {rtype}")


def parse_simple(readable: list[memoryview], writable: list[memoryview],
                 limits: DiskLimits) -> tuple[Read | Write, memoryview] | None:
    """The layout every driver uses for reads and writes, without stream objects.

    The header is alone in the first readable buffer, the status alone in the
    last writable one, and the data sits between them, in whole sectors
    inside the disk.  Returns the request and the status byte; anything else
    (other request types, other layouts, any error) returns None and goes
    through :func:`parse_request`, which reports it.  A hot-path shortcut:
    the result is exactly what ``parse_request`` gives for the same chain.
    """
    if not readable or not writable or len(readable[0]) != HEADER.size \
            or len(writable[-1]) != 1:
        return None
    rtype, _reserved, sector = HEADER.unpack(readable[0])
    if rtype == VirtioBlkReqType.IN and len(readable) == 1:
        bufs = writable[:-1]
    elif rtype == VirtioBlkReqType.OUT and len(writable) == 1:
        bufs = readable[1:]
    else:
        return None
    nbytes = sum(map(len, bufs))
    if nbytes % VIRTIO_BLK_SECTOR_SIZE or \
            sector + nbytes // VIRTIO_BLK_SECTOR_SIZE > limits.capacity:
        return None
    req = Read(sector, bufs, nbytes) if rtype == VirtioBlkReqType.IN else \
        Write(sector, bufs, nbytes)
    return req, writable[-1]


def _no_data(reader: ChainReader, what: str) -> None:
    if reader.remaining:
        raise DataLayoutError(f"{what} request with {reader.remaining} readable data bytes")


def _whole_sectors(bufs: list[memoryview], what: str) -> int:
    total = sum(len(b) for b in bufs)
    if total % VIRTIO_BLK_SECTOR_SIZE:
        raise DataLayoutError(f"{what} of {total} bytes is not whole sectors")
    return total // VIRTIO_BLK_SECTOR_SIZE


def _check_range(sector: int, count: int, limits: DiskLimits) -> None:
    if sector + count > limits.capacity:
        raise SectorRangeError(
            f"sectors {sector}+{count} reach past the disk end ({limits.capacity} sectors)")


def _segments(reader: ChainReader, limits: DiskLimits, max_seg: int, max_sectors: int,
              *, allow_unmap: bool) -> list[Segment]:
    size = reader.remaining
    if size == 0 or size % SEGMENT.size:
        raise SegmentError(f"segment list of {size} bytes is not whole 16-byte segments")
    count = size // SEGMENT.size
    if count > max_seg:
        raise SegmentError(f"{count} segments, the device allows {max_seg}")
    out: list[Segment] = []
    for _ in range(count):
        sector, num, flags = SEGMENT.unpack(reader.read(SEGMENT.size))
        if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (flags and not allow_unmap):
            raise SegmentError(f"segment flags {flags:#x} not allowed")
        if num > max_sectors:
            raise SegmentError(f"segment of {num} sectors, the device allows {max_sectors}")
        _check_range(sector, num, limits)
        out.append(Segment(sector, num, bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)))
    return out
