"""The blk backend end to end: ``python -m dvmm_blk`` driven by a SyntheticVM.

Real subprocess, real vhost-user, real rings in a memfd, real image file:
two queues, EVENT_IDX on and off, direct and indirect descriptors, and bad
chains mixed between good ones.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dvmm_blk.request import HEADER, SEGMENT
from dvmm_shared.driver import Buf
from dvmm_shared.synthetic import DriverRing, SyntheticVM
from dvmm_shared.virtio import (
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTQ_DESC_F_NEXT,
    bit,
)
from dvmm_shared.virtio import VirtioBlkReqType as T

from .helpers import BlkProcess, blk_backend, make_image

OK, IOERR, UNSUPP = 0, 1, 2
SECTORS = 256
ALL_FEATURES = (1 << 40) - 1


@dataclass
class Pending:
    head: int
    status_addr: int
    data_addr: int
    in_len: int


def post(vm: SyntheticVM, ring: DriverRing, rtype: int, sector: int = 0, *, out: bytes = b"",
         in_len: int = 0, indirect: bool = False, pieces: int = 1) -> Pending:
    """Post one virtio-blk request; ``out`` is split into ``pieces`` buffers."""
    hdr = vm.alloc(16, align=16)
    vm.mem.write(hdr, HEADER.pack(rtype, 0, sector))
    bufs = [Buf(hdr, 16)]
    step = max(1, -(-len(out) // pieces))
    for i in range(0, len(out), step):
        addr = vm.alloc(len(out[i:i + step]), align=16)
        vm.mem.write(addr, out[i:i + step])
        bufs.append(Buf(addr, len(out[i:i + step])))
    data = vm.alloc(in_len, align=16) if in_len else 0
    if in_len:
        bufs.append(Buf(data, in_len, write=True))
    status = vm.alloc(1, align=16)
    vm.mem.write(status, b"\xff")
    bufs.append(Buf(status, 1, write=True))
    table = vm.alloc(16 * len(bufs), align=16) if indirect else None
    return Pending(ring.queue.add(bufs, indirect_at=table), status, data, in_len)


def complete(ring: DriverRing, count: int) -> dict[int, int]:
    """Kick (if the device wants it) and collect ``count`` completions by head."""
    ring.kick_if_needed()
    done: dict[int, int] = {}
    while len(done) < count:
        done.update(ring.wait_used())
    return done


def status(vm: SyntheticVM, p: Pending) -> int:
    return vm.mem.read(p.status_addr, 1)[0]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img", SECTORS * 512)


@pytest.fixture
def blk(tmp_path: Path, image: Path) -> Iterator[BlkProcess]:
    with blk_backend(tmp_path, image, "--queues", "2") as b:
        yield b
    assert "Traceback" not in b.stderr()
    assert b.proc.returncode == 0  # SIGTERM is a clean exit


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["no-event-idx", "event-idx"])
def test_two_queues_write_and_read_back(blk: BlkProcess, image: Path, event_idx: bool,
                                        indirect: bool) -> None:
    with SyntheticVM(mem_size=8 << 20) as vm:
        acked = vm.connect(str(blk.socket), ALL_FEATURES, num_queues=2, queue_size=32,
                           event_idx=event_idx)
        assert bool(acked & bit(VIRTIO_F_RING_EVENT_IDX)) == event_idx
        assert acked & bit(VIRTIO_BLK_F_MQ) and acked & bit(VIRTIO_F_RING_INDIRECT_DESC)
        q0, q1 = vm.rings
        payloads = {s: bytes([s]) * 512 + bytes([0xFF - s]) * 512 for s in (4, 9, 100)}
        writes = [post(vm, q0, T.OUT, s, out=d, indirect=indirect, pieces=3)
                  for s, d in payloads.items()]
        done = complete(q0, len(writes))
        assert all(done[p.head] == 1 and status(vm, p) == OK for p in writes)
        flush = post(vm, q1, T.FLUSH, indirect=indirect)
        reads = {s: post(vm, q1, T.IN, s, in_len=1024, indirect=indirect) for s in payloads}
        done = complete(q1, 1 + len(reads))
        assert done[flush.head] == 1 and status(vm, flush) == OK
        for s, p in reads.items():
            assert done[p.head] == 1025 and status(vm, p) == OK
            assert vm.mem.read(p.data_addr, 1024) == payloads[s]
    disk = image.read_bytes()
    for s, d in payloads.items():
        assert disk[s * 512:s * 512 + 1024] == d


def test_get_id_and_config_over_vhost_user(blk: BlkProcess) -> None:
    with SyntheticVM(mem_size=1 << 20) as vm:
        vm.connect(str(blk.socket), ALL_FEATURES, num_queues=2)
        fe = vm.frontend
        assert fe is not None
        cfg = fe.get_config(0, 60)
        assert struct.unpack_from("<Q", cfg, 0)[0] == SECTORS
        assert struct.unpack_from("<H", cfg, 34)[0] == 2
        assert fe.get_queue_num() == 2
        p = post(vm, vm.rings[1], T.GET_ID, in_len=20)
        assert complete(vm.rings[1], 1) == {p.head: 21}
        assert vm.mem.read(p.data_addr, 20) == b"dvmm-disk.img".ljust(20, b"\0")


def test_bad_chains_between_good_ones(blk: BlkProcess, image: Path) -> None:
    with SyntheticVM(mem_size=2 << 20) as vm:
        vm.connect(str(blk.socket), ALL_FEATURES, num_queues=1, queue_size=32)
        ring = vm.rings[0]  # raw descriptors at 31 and 30, beyond what add() uses
        good_w = post(vm, ring, T.OUT, 1, out=b"G" * 512)
        ring.queue.write_desc(31, 0x1000, 16, VIRTQ_DESC_F_NEXT, 31)  # loop
        ring.queue.publish(31)
        past_end = post(vm, ring, T.IN, SECTORS, in_len=512)
        unknown = post(vm, ring, 99)
        partial = post(vm, ring, T.OUT, 0, out=b"x" * 100)
        bad_seg = post(vm, ring, T.DISCARD, out=SEGMENT.pack(0, 8, 1))  # unmap on discard
        ring.queue.write_desc(30, 1 << 40, 16, 0, 0)  # outside guest memory
        ring.queue.publish(30)
        good_r = post(vm, ring, T.IN, 1, in_len=512)
        done = complete(ring, 8)
        assert done[31] == 0 and done[30] == 0  # returned with nothing written
        assert [status(vm, p) for p in (past_end, unknown, partial, bad_seg)] == [
            IOERR, UNSUPP, IOERR, IOERR]
        assert all(done[p.head] == 1 for p in (past_end, unknown, partial, bad_seg))
        assert vm.mem.read(past_end.data_addr, 512) == bytes(512)
        assert status(vm, good_w) == OK and status(vm, good_r) == OK
        assert vm.mem.read(good_r.data_addr, 512) == b"G" * 512
    assert image.read_bytes()[512:1024] == b"G" * 512
    assert image.read_bytes()[:512] == make_image(image.parent / "ref.img", 512).read_bytes()


def test_many_requests_wrap_a_small_ring(blk: BlkProcess) -> None:
    with SyntheticVM(mem_size=4 << 20) as vm:
        vm.connect(str(blk.socket), ALL_FEATURES, num_queues=1, queue_size=8, event_idx=True)
        ring = vm.rings[0]
        for batch in range(12):
            reads = [post(vm, ring, T.IN, (batch * 2 + i) % SECTORS, in_len=512)
                     for i in range(2)]  # 3 descriptors each: 2 fit in 8
            done = complete(ring, 2)
            for i, p in enumerate(reads):
                sector = (batch * 2 + i) % SECTORS
                assert done[p.head] == 513
                assert vm.mem.read(p.data_addr, 8) == sector.to_bytes(8, "little")


def test_read_only_backend(tmp_path: Path, image: Path) -> None:
    before = image.read_bytes()
    with blk_backend(tmp_path, image, "--read-only") as b, \
            SyntheticVM(mem_size=1 << 20) as vm:
        acked = vm.connect(str(b.socket), ALL_FEATURES)
        assert acked & bit(VIRTIO_BLK_F_RO)
        ring = vm.rings[0]
        w = post(vm, ring, T.OUT, 0, out=b"W" * 512)
        z = post(vm, ring, T.WRITE_ZEROES, out=SEGMENT.pack(0, 8, 0))
        r = post(vm, ring, T.IN, 0, in_len=512)
        complete(ring, 3)
        assert (status(vm, w), status(vm, z), status(vm, r)) == (IOERR, IOERR, OK)
        assert vm.mem.read(r.data_addr, 512) == before[:512]
    assert image.read_bytes() == before


def test_reconnect_to_the_backend(blk: BlkProcess) -> None:
    for n in range(3):
        with SyntheticVM(mem_size=1 << 20) as vm:
            vm.connect(str(blk.socket), ALL_FEATURES, num_queues=2)
            p = post(vm, vm.rings[n % 2], T.IN, n, in_len=512)
            assert complete(vm.rings[n % 2], 1) == {p.head: 513}
            assert vm.mem.read(p.data_addr, 8) == n.to_bytes(8, "little")
