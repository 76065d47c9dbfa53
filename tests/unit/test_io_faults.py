"""Block-engine and notification faults, in process: short transfers on a real
file through every path that makes the system calls (vector I/O, an image
format's metadata writes, io_uring), a torn write, the arguments of the new
``fault`` kinds, and the channel faults' bookkeeping.

A short transfer is made real: the armed call is issued over the head of
its buffers only, so the kernel returns a short count and the engine must
carry on from there; each test checks the bytes on the file or in memory,
so a continuation that stopped early or restarted at the wrong offset fails.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dvmm_blk import disk as disk_mod
from dvmm_blk.disk import FaultyDisk, RawDisk
from dvmm_blk.engine import Job
from dvmm_blk.formats.base import ImageFile
from dvmm_blk.iofaults import IO, BlkFaults, head, short_length
from dvmm_shared.control import ControlError
from dvmm_shared.vhost_user.channel import ChannelFaults

from .helpers import make_image

SECTOR = 512


@pytest.fixture(autouse=True)
def clear_io() -> Iterator[None]:
    IO.clear()
    yield
    IO.clear()


@pytest.fixture
def raw(tmp_path: Path) -> Iterator[RawDisk]:
    d = RawDisk(str(make_image(tmp_path / "d.img", 64 * SECTOR)))
    yield d
    d.close()


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def test_head_and_short_length() -> None:
    a, b = memoryview(bytearray(10)), memoryview(bytearray(6))
    assert [len(v) for v in head([a, b], 12)] == [10, 2]
    assert [len(v) for v in head([a, b], 3)] == [3]
    assert 0 < short_length(4096) < 2048 and short_length(4096) % SECTOR
    assert short_length(2) == 1


@pytest.mark.parametrize("count", [1, 3])
def test_short_reads_are_carried_on(raw: RawDisk, count: int) -> None:
    expected = bytes(os.pread(raw.fd, 4 * SECTOR, 8 * SECTOR))
    bufs = [memoryview(bytearray(SECTOR)), memoryview(bytearray(3 * SECTOR))]
    before = IO.shortened
    IO.arm_short("read", count)
    raw.read(8 * SECTOR, bufs)
    assert b"".join(bytes(b) for b in bufs) == expected
    assert IO.short["read"] == 0 and IO.describe() is None
    assert IO.shortened - before == count


def test_short_writes_are_carried_on(raw: RawDisk) -> None:
    data = pattern(5 * SECTOR, 3)
    IO.arm_short("write", 2)
    raw.write(2 * SECTOR, [memoryview(data[:SECTOR]), memoryview(data[SECTOR:])])
    assert os.pread(raw.fd, len(data), 2 * SECTOR) == data
    assert IO.short["write"] == 0


def test_an_image_formats_metadata_write_is_carried_on(tmp_path: Path) -> None:
    """ImageFile.write (qcow2 tables, headers) took a short pwrite for EIO."""
    path = make_image(tmp_path / "f.img", 8 * SECTOR)
    f = ImageFile(str(path), read_only=False)
    try:
        data = pattern(3 * SECTOR, 9)
        IO.arm_short("write", 1)
        f.write(SECTOR, data)
        assert os.pread(f.fd, len(data), SECTOR) == data
        assert f.read(SECTOR, len(data), "check") == data
    finally:
        f.close()


def test_an_image_formats_metadata_reads_carry_on_after_a_short_pread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ImageFile.read took a short pread for a truncated file, read_upto
    (compressed clusters) returned the short piece."""
    path = make_image(tmp_path / "f.img", 8 * SECTOR)
    expected = path.read_bytes()[SECTOR:4 * SECTOR]
    real, calls = os.pread, []

    def short_first(fd: int, n: int, offset: int) -> bytes:
        calls.append(n)
        return real(fd, max(1, n // 3 - 5) if len(calls) % 2 else n, offset)

    f = ImageFile(str(path), read_only=True)
    try:
        monkeypatch.setattr(os, "pread", short_first)
        assert f.read(SECTOR, 3 * SECTOR, "check") == expected
        assert f.read_upto(SECTOR, 3 * SECTOR) == expected
        assert f.read_upto(7 * SECTOR, 4 * SECTOR) == path.read_bytes()[7 * SECTOR:]
    finally:
        monkeypatch.undo()
        f.close()
    assert len(calls) >= 5


def test_the_armed_short_read_skips_the_cached_path(raw: RawDisk) -> None:
    faulty = FaultyDisk(raw)
    IO.arm_short("read", 1)
    assert faulty.try_read(0, [memoryview(bytearray(SECTOR))]) is False
    assert faulty.native("read", 0, [memoryview(bytearray(SECTOR))]) is not None


def test_a_torn_write_stores_the_head_then_crashes(raw: RawDisk,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    class Crashed(Exception):
        pass

    def crash(where: str) -> None:
        raise Crashed(where)

    monkeypatch.setattr(disk_mod, "crash_process", crash)
    before = os.pread(raw.fd, 4 * SECTOR, 0)
    faulty = FaultyDisk(raw)
    IO.arm_torn(30)
    assert faulty.native("write", 0, [memoryview(bytearray(SECTOR))]) is None
    assert faulty.native("read", 0, [memoryview(bytearray(SECTOR))]) is not None
    data = pattern(4 * SECTOR, 1)
    with pytest.raises(Crashed, match="torn write"):
        faulty.write(0, [memoryview(data)])
    keep = 4 * SECTOR * 30 // 100
    assert os.pread(raw.fd, 4 * SECTOR, 0) == data[:keep] + before[keep:]
    assert not IO.armed
    faulty.write(0, [memoryview(data)])  # disarmed: the replay writes it all
    assert os.pread(raw.fd, 4 * SECTOR, 0) == data


def test_io_uring_short_completions_are_finished(raw: RawDisk) -> None:
    uring = pytest.importorskip("dvmm_blk.uring")
    if not uring.probe():
        pytest.skip("io_uring_setup is refused on this machine")
    engine = uring.UringEngine(fallback_threads=2)
    try:
        data = pattern(6 * SECTOR, 5)
        wbufs = [memoryview(bytearray(data))]
        rbufs = [memoryview(bytearray(2 * SECTOR)), memoryview(bytearray(4 * SECTOR))]
        before = IO.shortened
        IO.arm_short("write", 1)
        run(engine, Job(raw.write, (4 * SECTOR, wbufs), native=raw.native(
            "write", 4 * SECTOR, wbufs)))
        IO.arm_short("read", 2)  # the ring's READV, then the fallback's preadv
        run(engine, Job(raw.read, (4 * SECTOR, rbufs), native=raw.native(
            "read", 4 * SECTOR, rbufs)))
        assert b"".join(bytes(b) for b in rbufs) == data
        assert IO.shortened - before == 3
    finally:
        engine.close()


def run(engine: object, job: Job) -> None:
    engine.submit(job)  # type: ignore[attr-defined]
    engine.push()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 20
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "the job never came back"
        select.select([engine.fd], [], [], left)  # type: ignore[attr-defined]
        if engine.reap():  # type: ignore[attr-defined]
            assert job.error is None
            return


@pytest.mark.parametrize(("kind", "args", "text"), [
    ("short-read", {"count": 0}, "count must be an integer 1.."),
    ("short-write", {"count": "3"}, "count must be an integer"),
    ("short-write", {"count": True}, "count must be an integer"),
    ("torn-write", {"percent": 100}, "percent must be an integer 1..99"),
    ("torn-write", {"percent": 0}, "percent must be an integer 1..99"),
    ("melt", {}, "fault kind must be one of short-read"),
])
def test_blk_fault_arguments_are_checked(kind: str, args: dict[str, object],
                                         text: str) -> None:
    with pytest.raises(ControlError, match=text):
        BlkFaults().apply(kind, args)
    assert not IO.armed


def test_blk_faults_arm_describe_and_clear() -> None:
    f = BlkFaults()
    assert f.apply("short-read", {}) == {"count": 1}
    assert f.apply("torn-write", {"percent": 40}) == {"percent": 40}
    assert f.describe() == {"short_read": 1, "short_write": 0, "torn_write": 40}
    f.clear()
    assert f.describe() is None


@pytest.mark.parametrize(("kind", "args", "text"), [
    ("drop-kick", {"count": 0}, "count must be an integer"),
    ("delay-kick", {}, "ms must be an integer 1..60000"),
    ("delay-call", {"ms": 60_001}, "ms must be an integer"),
    ("drop-call", {"count": None}, "count must be an integer"),
])
def test_channel_fault_arguments_are_checked(kind: str, args: dict[str, object],
                                            text: str) -> None:
    c = ChannelFaults()
    with pytest.raises(ValueError, match=text):
        c.apply(kind, args)
    assert not c.armed


def test_channel_faults_are_one_shot_and_cleared() -> None:
    c = ChannelFaults()
    c.apply("drop-kick", {"count": 2})
    c.apply("delay-call", {"ms": 30})
    assert c.describe()["drop_kicks"] == 2 and c.describe()["call_delay_ms"] == 30
    assert c.take_kick() == 0.0 and c.take_kick() == 0.0 and c.take_kick() is None
    assert c.take_call() == 0.03 and c.take_call() is None
    assert c.describe()["delayed"] == 1
    c.apply("delay-kick", {"ms": 5})
    c.clear()
    assert not c.armed and c.take_kick() is None
