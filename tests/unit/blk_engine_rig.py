"""A blk device with an engine whose jobs run only when a test says so.

:class:`ManualEngine` is an :class:`~dvmm_blk.engine.Engine` that queues
jobs and runs the one the test picks, so a test (or hypothesis) chooses the
order in which requests finish.  :class:`RingHost` is the daemon's side of
one ring, as the session does it (the real ``start_chains`` and
``publish_completions`` over a real split queue with an in-flight region).
:class:`MemDisk` is a disk in a bytearray that records every call.
:class:`EngineRig` puts them together with the real :class:`BlkDevice` and a
driver-side queue posting real virtio-blk requests.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dvmm_blk.device import BlkDevice
from dvmm_blk.engine import Job
from dvmm_blk.request import HEADER
from dvmm_shared.driver import Buf
from dvmm_shared.inflight import InflightQueue, InflightRegion
from dvmm_shared.vhost_user.backend import QueueStats, StartChain
from dvmm_shared.vhost_user.vring import publish_completions, serve_chains, start_chains
from dvmm_shared.virtio import VirtioBlkReqType as T
from dvmm_shared.virtqueue import SplitQueue

from .helpers import RingPair, ring_pair

SECTOR = 512


class ManualEngine:
    """Jobs wait in :attr:`queued` until :meth:`run` picks one."""

    fd = -1
    wants_native = False

    def __init__(self) -> None:
        self.queued: list[Job] = []
        self.finished: list[Job] = []
        self.closed = False

    def submit(self, job: Job) -> None:
        self.queued.append(job)

    def push(self) -> None:
        pass

    def run(self, i: int = 0) -> Job:
        job = self.queued.pop(i)
        job.run()
        self.finished.append(job)
        return job

    def reap(self) -> list[Job]:
        out, self.finished = self.finished, []
        return out

    def wait(self, timeout: float) -> None:
        while self.queued:  # "the disk got to all of them"
            self.run(0)

    def close(self) -> None:
        self.closed = True


@dataclass
class MemDisk:
    """A Disk in memory; ``calls`` records ``(op, sector)`` in the order made,
    and a flush records the sectors written so far."""

    sectors: int = 64
    fail: frozenset[int] = frozenset()
    read_only: bool = False
    memory_backed: bool = False
    calls: list[tuple[str, object]] = field(default_factory=list)
    written: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.size = self.sectors * SECTOR
        self.data = bytearray(b"".join(bytes([s & 0xFF]) * SECTOR
                                       for s in range(self.sectors)))

    def read(self, offset: int, bufs: list[memoryview]) -> None:
        self.calls.append(("read", offset // SECTOR))
        for b in bufs:
            b[:] = self.data[offset:offset + len(b)]
            offset += len(b)

    def write(self, offset: int, bufs: list[memoryview]) -> None:
        sector = offset // SECTOR
        self.calls.append(("write", sector))
        if sector in self.fail:
            raise OSError(errno.EIO, "injected")
        for b in bufs:
            self.data[offset:offset + len(b)] = b
            offset += len(b)
        self.written.add(sector)

    def flush(self) -> None:
        self.calls.append(("flush", frozenset(self.written)))

    def discard(self, offset: int, length: int) -> None:
        self.calls.append(("discard", offset // SECTOR))

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self.calls.append(("write_zeroes", offset // SECTOR))

    def close(self) -> None:
        pass


class RingHost:
    """The BackendHost of one ring: what the Session does for a device."""

    def __init__(self, queue: SplitQueue) -> None:
        self.queue = queue
        self.stats = QueueStats()
        self.notifications = 0
        self.watched: list[int] = []

    def watch(self, fd: int, events: int, callback: Callable[[], None]) -> None:
        self.watched.append(fd)

    def unwatch(self, fd: int, events: int = 3) -> None:
        pass

    def service_queue(self, index: int) -> None:
        pass

    def submit_chains(self, index: int, queue: SplitQueue, start: StartChain) -> bool:
        return start_chains(index, queue, self.stats, start)

    def complete(self, index: int, done: Sequence[tuple[int, int]]) -> None:
        publish_completions(self.queue, done, self.stats)
        if done and self.queue.needs_notification():
            self.notifications += 1


@dataclass
class Posted:
    kind: str  # "R", "W", "F" (flush), "G" (get id), "X" (a bad request)
    sector: int
    head: int
    data: int
    status: int


class EngineRig:
    """The real BlkDevice over a MemDisk and a ManualEngine, one tracked ring."""

    def __init__(self, ring_size: int = 64, fail: frozenset[int] = frozenset(),
                 memory_backed: bool = False, inline: bool = True) -> None:
        self.rp: RingPair = ring_pair(ring_size, event_idx=True)
        fd, self.region = InflightRegion.allocate(1, ring_size, 1)
        os.close(fd)
        tracker = self.region.queue(0)
        assert tracker is not None
        self.tracker: InflightQueue = tracker
        self.rp.device.recover_inflight(tracker)
        self.engine = ManualEngine()
        self.disk = MemDisk(fail=fail, memory_backed=memory_backed)
        self.device = BlkDevice(self.disk, engine=self.engine, inline=inline)
        self.host = RingHost(self.rp.device)
        self.device.attach(self.host)
        self.device.queue_started(0)
        self.posted: dict[int, Posted] = {}

    def post(self, kind: str, sector: int = 0) -> Posted:
        rp = self.rp
        rtype = {"R": T.IN, "W": T.OUT, "F": T.FLUSH, "G": T.GET_ID, "X": 99}[kind]
        hdr = rp.alloc(16, HEADER.pack(rtype, 0, sector))
        bufs = [Buf(hdr, 16)]
        data = 0
        if kind in "RW":
            data = rp.alloc(SECTOR, bytes([0xA0 + sector % 16]) * SECTOR if kind == "W"
                            else bytes(SECTOR))
            bufs.append(Buf(data, SECTOR, write=kind == "R"))
        elif kind == "G":
            data = rp.alloc(20, bytes(20))
            bufs.append(Buf(data, 20, write=True))
        status = rp.alloc(1, b"\xff")
        bufs.append(Buf(status, 1, write=True))
        p = Posted(kind, sector, rp.driver.add(bufs), data, status)
        self.posted[p.head] = p
        return p

    def service(self) -> None:
        """What a kick does: the device takes every available chain."""
        def serve(index: int, queue: SplitQueue) -> bool:
            return serve_chains(self.device, index, queue, self.host.stats)

        if self.device.process_queue(0, self.rp.device, serve) \
                and self.rp.device.needs_notification():
            self.host.notifications += 1

    def status(self, p: Posted) -> int:
        return self.rp.mem.read(p.status, 1)[0]

    def in_flight_jobs(self) -> set[int]:
        """Heads the device holds: queued or finished in the engine, or held back."""
        assert self.device.dispatcher is not None
        d = self.device.dispatcher
        jobs = [*self.engine.queued, *self.engine.finished, *d.flushes.held_jobs(),
                *d.overlaps.waiting()]
        return {job.head for job in jobs}
