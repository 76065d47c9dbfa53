"""The virtio-blk device over a real RawDisk (tmp file) and over a fake Disk.

Requests are fed to ``handle_chain`` as chains of bytearray views, so this
covers request -> disk operation -> status byte without any ring.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dvmm_blk.device import BlkDevice
from dvmm_blk.disk import DiskError, RawDisk
from dvmm_blk.request import HEADER, SEGMENT
from dvmm_shared.virtio import (
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    bit,
)
from dvmm_shared.virtio import VirtioBlkReqType as T
from dvmm_shared.virtqueue import DescriptorChain

from .helpers import make_image

OK, IOERR, UNSUPP = 0, 1, 2
SECTORS = 64


@dataclass
class Result:
    status: int
    written: int
    data: bytes


def request(dev: BlkDevice, rtype: int, sector: int = 0, *, out: bytes = b"",
            in_len: int = 0, status: bool = True) -> Result:
    """Serve one request; ``out`` is readable payload, ``in_len`` writable room."""
    readable = [memoryview(bytearray(HEADER.pack(rtype, 0, sector)))]
    if out:
        readable.append(memoryview(bytearray(out)))
    data = memoryview(bytearray(in_len))
    st = memoryview(bytearray(b"\xff"))
    writable = [data] + ([st] if status else [])
    written = dev.handle_chain(0, DescriptorChain(3, readable, writable))
    return Result(st[0], written, bytes(data))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img", SECTORS * 512)


@pytest.fixture
def dev(image: Path) -> Iterator[BlkDevice]:
    d = BlkDevice(RawDisk(str(image)), queues=2, serial="serial-0123")
    yield d
    d.close()


# -- requests on a real file ------------------------------------------------------------
def test_read(dev: BlkDevice, image: Path) -> None:
    r = request(dev, T.IN, 3, in_len=1024)
    assert (r.status, r.written) == (OK, 1025)
    assert r.data == image.read_bytes()[3 * 512:5 * 512]
    assert dev.stats.reads == 1 and dev.stats.bytes_read == 1024


def test_write_then_read_back(dev: BlkDevice, image: Path) -> None:
    payload = bytes(range(256)) * 4
    r = request(dev, T.OUT, 10, out=payload)
    assert (r.status, r.written) == (OK, 1)
    assert image.read_bytes()[10 * 512:12 * 512] == payload
    assert request(dev, T.IN, 10, in_len=1024).data == payload
    assert dev.stats.writes == 1 and dev.stats.bytes_written == 1024


def test_flush(dev: BlkDevice) -> None:
    assert request(dev, T.FLUSH).status == OK
    assert dev.stats.flushes == 1


def test_get_id_returns_the_serial(dev: BlkDevice) -> None:
    r = request(dev, T.GET_ID, in_len=20)
    assert r.status == OK and r.data == b"serial-0123".ljust(20, b"\0")
    assert r.written == 21
    assert request(dev, T.GET_ID, in_len=4).data == b"seri"


def test_long_serial_is_cut_to_20_bytes(image: Path) -> None:
    d = BlkDevice(RawDisk(str(image)), serial="x" * 30)
    try:
        assert request(d, T.GET_ID, in_len=20).data == b"x" * 20
    finally:
        d.close()


@pytest.mark.parametrize(
    ("rtype", "sector", "out", "in_len", "status"),
    [
        (T.IN, SECTORS - 1, b"", 1024, IOERR),  # past the end
        (T.OUT, SECTORS, bytes(512), 0, IOERR),
        (T.OUT, 0, bytes(100), 0, IOERR),  # not whole sectors
        (T.IN, 0, bytes(4), 512, IOERR),  # data in the wrong direction
        (T.GET_LIFETIME, 0, b"", 0, UNSUPP),
        (77, 0, b"", 0, UNSUPP),
    ],
)
def test_bad_request_gets_a_status_and_no_data(dev: BlkDevice, image: Path, rtype: int,
                                               sector: int, out: bytes, in_len: int,
                                               status: int) -> None:
    before = image.read_bytes()
    r = request(dev, rtype, sector, out=out, in_len=in_len)
    assert (r.status, r.written) == (status, 1)
    assert r.data == bytes(in_len)
    assert image.read_bytes() == before
    assert (dev.stats.unsupported, dev.stats.errors) == ((1, 0) if status == UNSUPP else (0, 1))


def test_request_without_a_status_byte_is_dropped(dev: BlkDevice, image: Path) -> None:
    before = image.read_bytes()
    assert request(dev, T.OUT, 0, out=b"Z" * 512, status=False).written == 0
    assert image.read_bytes() == before  # not executed


def _st_blocks(path: Path) -> int:
    return os.stat(path).st_blocks


def test_discard_punches_a_hole(tmp_path: Path) -> None:
    path = make_image(tmp_path / "big.img", 1 << 20)
    d = BlkDevice(RawDisk(str(path)))
    try:
        blocks = _st_blocks(path)
        r = request(d, T.DISCARD, out=SEGMENT.pack(256, 512, 0))  # 256 KiB at 128 KiB
        assert r.status == OK and d.stats.discards == 1
        assert _st_blocks(path) <= blocks - 512
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 256 * 512
            assert os.lseek(fd, 256 * 512, os.SEEK_DATA) == 768 * 512
        finally:
            os.close(fd)
        assert path.read_bytes()[256 * 512:768 * 512] == bytes(512 * 512)
        assert path.stat().st_size == 1 << 20  # KEEP_SIZE
    finally:
        d.close()


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes(tmp_path: Path, unmap: bool) -> None:
    path = make_image(tmp_path / "z.img", 1 << 20)
    original = path.read_bytes()
    d = BlkDevice(RawDisk(str(path)))
    try:
        blocks = _st_blocks(path)
        r = request(d, T.WRITE_ZEROES, out=SEGMENT.pack(3, 1000, int(unmap)))
        assert r.status == OK and d.stats.write_zeroes == 1
        data = path.read_bytes()
        assert data[3 * 512:1003 * 512] == bytes(1000 * 512)
        assert data[:3 * 512] == original[:3 * 512] and data[1003 * 512:] == original[1003 * 512:]
        if unmap:
            assert _st_blocks(path) < blocks
    finally:
        d.close()


# -- read-only ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rtype", "out"),
    [(T.OUT, b"W" * 512), (T.DISCARD, SEGMENT.pack(0, 8, 0)),
     (T.WRITE_ZEROES, SEGMENT.pack(0, 8, 1))],
)
def test_read_only_refuses_changes(image: Path, rtype: int, out: bytes) -> None:
    before, mtime = image.read_bytes(), image.stat().st_mtime_ns
    d = BlkDevice(RawDisk(str(image), read_only=True))
    try:
        assert d.features() & bit(VIRTIO_BLK_F_RO)
        assert not d.features() & (bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES))
        assert request(d, rtype, 0, out=out).status == IOERR
        assert request(d, T.FLUSH).status == OK
        assert request(d, T.IN, 0, in_len=512).data == before[:512]
    finally:
        d.close()
    assert image.read_bytes() == before and image.stat().st_mtime_ns == mtime


# -- a fake disk ------------------------------------------------------------------------
@dataclass
class FakeDisk:
    size: int = SECTORS * 512
    read_only: bool = False
    fail: bool = False
    calls: list[tuple[object, ...]] = field(default_factory=list)
    closed: bool = False

    def _op(self, *call: object) -> None:
        self.calls.append(call)
        if self.fail:
            raise OSError(5, "Input/output error")

    def read(self, offset: int, bufs: list[memoryview]) -> None:
        self._op("read", offset, sum(len(b) for b in bufs))
        for b in bufs:
            b[:] = b"r" * len(b)

    def write(self, offset: int, bufs: list[memoryview]) -> None:
        self._op("write", offset, b"".join(bytes(b) for b in bufs))

    def flush(self) -> None:
        self._op("flush")

    def discard(self, offset: int, length: int) -> None:
        self._op("discard", offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._op("write_zeroes", offset, length, unmap)

    def close(self) -> None:
        self.closed = True


def test_requests_map_to_disk_calls() -> None:
    disk = FakeDisk()
    d = BlkDevice(disk)
    assert request(d, T.IN, 2, in_len=512).data == b"r" * 512
    assert request(d, T.OUT, 4, out=b"w" * 1024).status == OK
    assert request(d, T.FLUSH).status == OK
    assert request(d, T.DISCARD, out=SEGMENT.pack(8, 16, 0)).status == OK
    assert request(d, T.WRITE_ZEROES, out=SEGMENT.pack(1, 2, 1)).status == OK
    assert disk.calls == [("read", 1024, 512), ("write", 2048, b"w" * 1024), ("flush",),
                          ("discard", 4096, 8192), ("write_zeroes", 512, 1024, True)]
    d.close()
    assert disk.closed


def test_read_only_device_never_asks_the_disk_to_change() -> None:
    disk = FakeDisk(read_only=True)  # a disk that would happily write
    d = BlkDevice(disk)
    assert request(d, T.OUT, 0, out=bytes(512)).status == IOERR
    assert request(d, T.DISCARD, out=SEGMENT.pack(0, 1, 0)).status == IOERR
    assert request(d, T.WRITE_ZEROES, out=SEGMENT.pack(0, 1, 0)).status == IOERR
    assert request(d, T.FLUSH).status == OK
    assert request(d, T.IN, 0, in_len=512).status == OK
    assert disk.calls == [("flush",), ("read", 0, 512)]
    assert d.stats.errors == 3


@pytest.mark.parametrize(
    ("rtype", "out", "in_len"),
    [(T.IN, b"", 512), (T.OUT, bytes(512), 0), (T.FLUSH, b"", 0),
     (T.DISCARD, SEGMENT.pack(0, 1, 0), 0), (T.WRITE_ZEROES, SEGMENT.pack(0, 1, 0), 0)],
)
def test_disk_oserror_becomes_ioerr(rtype: int, out: bytes, in_len: int) -> None:
    d = BlkDevice(FakeDisk(fail=True))
    r = request(d, rtype, out=out, in_len=in_len)
    assert (r.status, r.written) == (IOERR, 1)
    assert d.stats.errors == 1
    assert request(d, T.GET_ID, in_len=20).status == OK  # and the device still serves


def test_shrunk_image_gives_ioerr_not_short_data(image: Path) -> None:
    d = BlkDevice(RawDisk(str(image)))
    try:
        os.truncate(image, 4 * 512)  # someone shrank the file under us
        r = request(d, T.IN, 8, in_len=512)
        assert (r.status, r.written) == (IOERR, 1)
    finally:
        d.close()


def test_vector_io_beyond_iov_max(dev: BlkDevice, image: Path) -> None:
    # 2048 one-byte buffers: more than IOV_MAX (1024) in one request.
    readable = [memoryview(bytearray(HEADER.pack(T.OUT, 1, 1)))]
    readable += [memoryview(bytearray([i & 0xFF])) for i in range(1024)]
    chain = DescriptorChain(0, readable, [memoryview(bytearray(1))])
    assert dev.handle_chain(0, chain) == 1
    assert image.read_bytes()[512:1536] == bytes(i & 0xFF for i in range(1024))


# -- what the device advertises -----------------------------------------------------------
def test_features(dev: BlkDevice) -> None:
    want = [VIRTIO_F_VERSION_1, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC,
            VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]
    assert dev.features() == sum(bit(b) for b in want)
    assert dev.num_queues == 2


def test_config_space_at_the_spec_offsets(dev: BlkDevice) -> None:
    # virtio 1.2 5.2.4 struct virtio_blk_config, offsets written out by hand.
    cfg = dev.get_config(0, 60)
    assert len(cfg) == 60

    def u(fmt: str, off: int) -> int:
        return int(struct.unpack_from("<" + fmt, cfg, off)[0])

    assert u("Q", 0) == SECTORS  # capacity
    assert u("I", 12) == 126  # seg_max: queue size 128 minus header and status
    assert u("I", 20) == 512  # blk_size
    assert u("H", 34) == 2  # num_queues
    assert u("I", 36) == 1 << 22  # max_discard_sectors
    assert u("I", 40) == 1  # max_discard_seg
    assert u("I", 44) == 8  # discard_sector_alignment
    assert u("I", 48) == 1 << 22  # max_write_zeroes_sectors
    assert u("I", 52) == 1  # max_write_zeroes_seg
    assert u("B", 56) == 1  # write_zeroes_may_unmap
    assert dev.get_config(34, 2) == b"\x02\x00"
    assert dev.get_config(56, 8) == b"\x01\0\0\0"  # cut at the end of the struct


def test_capacity_rounds_down_to_whole_sectors(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(5 * 512 + 100))
    d = BlkDevice(RawDisk(str(path)))
    try:
        assert struct.unpack_from("<Q", d.get_config(0, 8))[0] == 5
        assert request(d, T.IN, 5, in_len=512).status == IOERR
    finally:
        d.close()


def test_zero_queues_refused(image: Path) -> None:
    disk = RawDisk(str(image))
    try:
        with pytest.raises(ValueError, match="at least one queue"):
            BlkDevice(disk, queues=0)
    finally:
        disk.close()


def test_image_errors(tmp_path: Path, image: Path) -> None:
    with pytest.raises(DiskError, match="cannot open image"):
        RawDisk(str(tmp_path / "missing.img"))
    first = RawDisk(str(image))
    try:
        with pytest.raises(DiskError, match="in use"):
            RawDisk(str(image))
        with pytest.raises(DiskError, match="in use"):
            RawDisk(str(image), read_only=True)
    finally:
        first.close()
    readers = [RawDisk(str(image), read_only=True) for _ in range(2)]  # shared is fine
    for r in readers:
        r.close()
