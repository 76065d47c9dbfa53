"""qcow2 under the real blk device, dispatcher and I/O engines.

The blk backend opens images through :func:`dvmm_blk.main.open_disk`: a raw
file stays a :class:`~dvmm_blk.disk.RawDisk`, anything else is a format
image (read-only formats served read-only, bad images refused in one line).
Then the real :class:`~dvmm_blk.device.BlkDevice` serves a driver-side ring
of virtio-blk requests (reads, writes, write-zeroes, discards, flushes, many
in flight at once) from a qcow2 image with each engine — worker threads
calling into the format concurrently, io_uring, and sync — and afterwards
the image reads back as the requests left it and ``qemu-img check`` finds it
clean.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import time
from pathlib import Path

import pytest
from dvmm_blk.device import BlkDevice
from dvmm_blk.disk import RawDisk
from dvmm_blk.engine import EngineError, make_engine
from dvmm_blk.formats import BlockImage
from dvmm_blk.formats.qcow2_image import Qcow2Image
from dvmm_blk.main import open_disk
from dvmm_blk.request import HEADER
from dvmm_shared.cli import UsageError
from dvmm_shared.driver import Buf
from dvmm_shared.inflight import InflightRegion
from dvmm_shared.vhost_user.vring import serve_chains
from dvmm_shared.virtio import VirtioBlkReqType as T
from dvmm_shared.virtqueue import SplitQueue

from .blk_engine_rig import RingHost
from .helpers import ring_pair
from .test_format_qemu import make_image

SECTOR = 512
SLOTS = 12
SLOT_SECTORS = 4
DISK_SECTORS = 512  # 256 KiB: requests overlap often
SEGMENT = struct.Struct("<QII")


def test_open_disk_picks_the_format(tmp_path: Path) -> None:
    raw = make_image(tmp_path / "r.img", "raw", "1M")
    q = make_image(tmp_path / "q.qcow2", "qcow2", "1M")
    v = make_image(tmp_path / "v.vmdk", "vmdk", "1M")
    disk = open_disk(str(raw), "auto", False)
    assert isinstance(disk, RawDisk)
    disk.close()
    disk = open_disk(str(q), "auto", False)
    assert isinstance(disk, Qcow2Image) and not disk.read_only
    disk.close()
    disk = open_disk(str(v), "auto", False)  # vmdk is read-only in dvmm
    assert isinstance(disk, BlockImage) and disk.read_only
    disk.close()
    with pytest.raises(UsageError, match="not a qcow2 image"):
        open_disk(str(raw), "qcow2", False)
    (tmp_path / "bad.qcow2").write_bytes(b"QFI\xfb" + bytes(60))
    with pytest.raises(UsageError) as info:
        open_disk(str(tmp_path / "bad.qcow2"), "auto", False)
    assert "\n" not in str(info.value)


class Host(RingHost):
    def config_changed(self) -> bool:
        """No config space changes here."""
        return False


class Driver:
    """Virtio-blk requests on a driver-side ring, in fixed buffer slots."""

    def __init__(self, device: BlkDevice) -> None:
        self.rp = ring_pair(64, event_idx=True)
        fd, region = InflightRegion.allocate(1, 64, 1)
        os.close(fd)
        tracker = region.queue(0)
        assert tracker is not None
        self.rp.device.recover_inflight(tracker)
        self.device = device
        self.host = Host(self.rp.device)
        device.attach(self.host)
        device.queue_started(0)
        self.slots = [(self.rp.alloc(16), self.rp.alloc(SLOT_SECTORS * SECTOR),
                       self.rp.alloc(1)) for _ in range(SLOTS)]
        self.free = list(range(SLOTS))
        self.pending: dict[int, tuple[int, str, bytes | None]] = {}  # head -> slot, kind, expect

    def post(self, kind: str, sector: int, count: int, data: bytes = b"",
             expect: bytes | None = None) -> None:
        slot = self.free.pop()
        hdr, buf, status = self.slots[slot]
        rtype = {"R": T.IN, "W": T.OUT, "F": T.FLUSH, "Z": T.WRITE_ZEROES, "D": T.DISCARD}[kind]
        self.rp.mem.write(hdr, HEADER.pack(rtype, 0, 0 if kind in "ZD" else sector))
        self.rp.mem.write(status, b"\xff")
        bufs = [Buf(hdr, 16)]
        if kind == "W":
            self.rp.mem.write(buf, data)
            bufs.append(Buf(buf, len(data)))
        elif kind == "R":
            bufs.append(Buf(buf, count * SECTOR, write=True))
        elif kind in "ZD":
            self.rp.mem.write(buf, SEGMENT.pack(sector, count, 1 if kind == "Z" else 0))
            bufs.append(Buf(buf, SEGMENT.size))
        bufs.append(Buf(status, 1, write=True))
        self.pending[self.rp.driver.add(bufs)] = (slot, kind, expect)

    def kick(self) -> None:
        def serve(index: int, queue: SplitQueue) -> bool:
            return serve_chains(self.device, index, queue, self.host.stats)

        self.device.process_queue(0, self.rp.device, serve)

    def complete_all(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        d = self.device.dispatcher
        while self.pending:
            assert time.monotonic() < deadline, f"{len(self.pending)} requests never completed"
            if d is not None:
                d.engine.wait(0.05)
                d.on_ready()
            for head, _ in self.rp.driver.get_used():
                slot, kind, expect = self.pending.pop(head)
                _, buf, status = self.slots[slot]
                assert self.rp.mem.read(status, 1) == b"\x00", kind
                if expect is not None:
                    assert self.rp.mem.read(buf, len(expect)) == expect
                self.free.append(slot)


@pytest.mark.parametrize("engine_kind", ["threads", "io_uring", "sync"])
def test_qcow2_served_through_each_engine(tmp_path: Path, engine_kind: str) -> None:
    path = make_image(tmp_path / "d.qcow2", "qcow2", str(DISK_SECTORS * SECTOR),
                      "cluster_size=512", ["write -P 0x33 0 64k"])
    image = open_disk(str(path), "auto", False)
    assert isinstance(image, Qcow2Image)
    try:
        engine = make_engine(engine_kind, 4)
    except EngineError as exc:
        image.close()
        pytest.skip(f"{engine_kind}: {exc}")
    device = BlkDevice(image, engine=engine)
    drv = Driver(device)
    model = bytearray(b"\x33" * 65536 + bytes(DISK_SECTORS * SECTOR - 65536))
    rng = random.Random(engine_kind)
    for _ in range(60):
        for _ in range(rng.randrange(1, SLOTS + 1)):  # a batch in flight at once
            kind = rng.choice("RRWWWWZDF")
            count = rng.randrange(1, SLOT_SECTORS + 1)
            sector = rng.randrange(DISK_SECTORS - count)
            lo, hi = sector * SECTOR, (sector + count) * SECTOR
            if kind == "W":
                data = rng.randbytes(hi - lo)
                model[lo:hi] = data
                drv.post("W", sector, count, data)
            elif kind == "R":
                drv.post("R", sector, count, expect=bytes(model[lo:hi]))
            elif kind in "ZD":  # 512-byte clusters, no backing file: discard zeroes too
                model[lo:hi] = bytes(hi - lo)
                drv.post(kind, sector, count)
            else:
                drv.post("F", 0, 0)
        drv.kick()
        drv.complete_all()
    assert image.read_bytes(0, image.size) == model
    device.queue_stopped(0)
    device.close()
    done = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
