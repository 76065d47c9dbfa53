"""The io_uring engine (raw system calls): jobs on a real file, the thread
fallback, short transfers, a full ring, and the backend end to end with
``--engine io_uring``.  Skipped, with the reason, where io_uring cannot be
set up."""

from __future__ import annotations

import errno
import mmap
import os
import select
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dvmm_blk.disk import FaultyDisk, RawDisk
from dvmm_blk.engine import Job, make_engine
from dvmm_blk.uring import UringEngine, probe
from dvmm_shared.synthetic import SyntheticVM
from dvmm_shared.virtio import VirtioBlkReqType as T

from .helpers import blk_backend, make_image
from .test_blk_e2e import ALL_FEATURES, complete, post, status

if not probe():
    pytest.skip("io_uring_setup is refused on this machine", allow_module_level=True)

DEADLINE = 20.0
SECTOR = 512


def reap_all(engine: UringEngine, count: int) -> list[Job]:
    out: list[Job] = []
    deadline = time.monotonic() + DEADLINE
    while len(out) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(out)} of {count} jobs came back"
        if select.select([engine.fd], [], [], left)[0]:
            out.extend(engine.reap())
    return out


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[RawDisk]:
    d = RawDisk(str(make_image(tmp_path / "d.img", 64 * SECTOR)))
    yield d
    d.close()


def job(disk: RawDisk, op: str, offset: int, bufs: list[memoryview], head: int = 0) -> Job:
    calls: dict[str, Callable[..., Any]] = {
        "read": disk.read, "write": disk.write, "flush": disk.flush}
    fn = calls[op]
    j = Job(fn, (offset, bufs) if op != "flush" else (), head=head)
    j.native = disk.native(op, offset, bufs)
    return j


def guest_buffer(size: int) -> memoryview:
    return memoryview(mmap.mmap(-1, size))


def test_reads_writes_and_flush_through_the_ring(disk: RawDisk) -> None:
    e = UringEngine(entries=8)
    try:
        data = guest_buffer(2 * SECTOR)
        data[:] = b"\xab" * SECTOR + b"\xcd" * SECTOR
        e.submit(job(disk, "write", 4 * SECTOR, [data[:SECTOR], data[SECTOR:]], head=1))
        e.push()
        assert [j.error for j in reap_all(e, 1)] == [None]
        e.submit(job(disk, "flush", 0, [], head=2))
        back = guest_buffer(3 * SECTOR)
        e.submit(job(disk, "read", 3 * SECTOR, [back[:SECTOR], back[SECTOR:]], head=3))
        e.push()
        done = reap_all(e, 2)
        assert sorted(j.head for j in done) == [2, 3] and all(j.error is None for j in done)
        assert bytes(back[:8]) == (3).to_bytes(8, "little")  # the image's own sector 3
        assert bytes(back[SECTOR:]) == bytes(data)
    finally:
        e.close()


def test_jobs_without_a_native_form_run_on_the_fallback_threads(disk: RawDisk) -> None:
    e = UringEngine(entries=8)
    try:
        ran: list[int] = []
        e.submit(Job(ran.append, (7,), head=7))
        e.push()
        assert [j.head for j in reap_all(e, 1)] == [7] and ran == [7]
    finally:
        e.close()


def test_a_short_read_is_finished_or_reported_by_the_thread_path(disk: RawDisk) -> None:
    e = UringEngine(entries=8)
    try:
        buf = guest_buffer(2 * SECTOR)
        e.submit(job(disk, "read", 63 * SECTOR, [buf]))  # half of it is past the end
        e.push()
        (j,) = reap_all(e, 1)
        assert isinstance(j.error, OSError) and j.error.errno == errno.EIO
    finally:
        e.close()


def test_more_jobs_than_ring_entries(disk: RawDisk) -> None:
    e = UringEngine(entries=4)
    try:
        bufs = [guest_buffer(SECTOR) for _ in range(40)]
        for i, b in enumerate(bufs):
            e.submit(job(disk, "read", (i % 64) * SECTOR, [b], head=i))
        e.push()
        done = reap_all(e, 40)
        assert sorted(j.head for j in done) == list(range(40))
        assert all(bytes(b[:8]) == (i % 64).to_bytes(8, "little") for i, b in enumerate(bufs))
    finally:
        e.close()


def test_auto_picks_io_uring_here() -> None:
    engine = make_engine("auto")
    try:
        assert isinstance(engine, UringEngine)
    finally:
        assert engine is not None
        engine.close()


def test_a_disk_with_an_armed_error_goes_through_the_threads(disk: RawDisk) -> None:
    faulty = FaultyDisk(disk)
    assert faulty.native("read", 0, []) is not None
    faulty.inject_error(errno.EIO, "read", 1)
    assert faulty.native("read", 0, []) is None  # so the injected error is raised


def test_backend_with_the_io_uring_engine(tmp_path: Path) -> None:
    image = make_image(tmp_path / "d.img", 256 * SECTOR)
    with blk_backend(tmp_path, image, "--engine", "io_uring") as b, \
            SyntheticVM(mem_size=4 << 20) as vm:
        vm.connect(str(b.socket), ALL_FEATURES)
        ring = vm.rings[0]
        writes = [post(vm, ring, T.OUT, s, out=bytes([s]) * SECTOR) for s in range(0, 32, 2)]
        writes.append(post(vm, ring, T.FLUSH))
        complete(ring, len(writes))
        assert [status(vm, p) for p in writes] == [0] * len(writes)
        reads = [post(vm, ring, T.IN, s, in_len=SECTOR) for s in range(32)]
        complete(ring, len(reads))
        for s, p in enumerate(reads):
            want = bytes([s]) * SECTOR if s % 2 == 0 else None
            got = vm.mem.read(p.data_addr, SECTOR)
            assert status(vm, p) == 0
            assert got == want if want else got[:8] == s.to_bytes(8, "little")
    assert os.path.getsize(image) == 256 * SECTOR
