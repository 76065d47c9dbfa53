"""Which blk requests in flight must wait for which: overlaps and FLUSH.

Owns the two ordering rules of the asynchronous request path (the engine
may otherwise run and finish requests in any order):

* **Overlaps** (:class:`Overlaps`): a request waits for every earlier request
  still in flight whose sectors overlap its own when either of the two
  writes (read after write, write after write, write after read).  virtio
  does not promise any order between requests in flight, but serving them
  one at a time did, and a driver that posts a write and a read of the same
  block together keeps getting what it wrote.  Reads never wait for reads,
  so a read-only workload pays nothing.
* **FLUSH** (:class:`FlushBarrier`): a flush is held until every write-like
  request (write, discard, write-zeroes) *issued* before it has finished —
  stricter than virtio 1.2 5.2.6.1 ("writes completed before the flush"),
  so drivers that count on either are served.

Loop thread only; no I/O.  :mod:`.dispatch` submits what these release.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dvmm_shared.virtio import VIRTIO_BLK_SECTOR_SIZE

from .engine import Job
from .request import BlkRequest, Discard, Read, Write, WriteZeroes


@dataclass(slots=True, eq=False)
class Pending:
    """A request the engine has (or will have): what its completion needs
    (status byte, bytes written on success) and its place in the ordering."""

    req: BlkRequest
    status: memoryview
    ok_written: int
    seq: int = -1  # write-like requests: issue order; others -1
    lo: int = 0  # sectors [lo, hi); hi == lo: not ordered by overlap
    hi: int = 0
    writes: bool = False
    blockers: int = 0  # earlier overlapping requests still in flight
    waiters: list[Job] = field(default_factory=list)


def span(req: BlkRequest) -> tuple[int, int, bool]:
    """The sectors ``req`` touches (a bounding range) and whether it writes."""
    if isinstance(req, Read | Write):
        return req.sector, req.sector + req.nbytes // VIRTIO_BLK_SECTOR_SIZE, \
            isinstance(req, Write)
    if isinstance(req, Discard | WriteZeroes) and req.segments:
        return (min(s.sector for s in req.segments),
                max(s.sector + s.num_sectors for s in req.segments), True)
    return 0, 0, False


class Overlaps:
    """Requests in flight by sector range; the waits between them."""

    def __init__(self) -> None:
        self._reads: set[Pending] = set()
        self._writes: set[Pending] = set()

    def admit(self, p: Pending, job: Job) -> bool:
        """Record ``p`` (carried by ``job``); True if it may start now, False
        if it waits for earlier overlapping ones (:meth:`finished` returns it)."""
        lo, hi = p.lo, p.hi
        if lo == hi:
            return True
        earlier = [q for q in self._writes if q.lo < hi and lo < q.hi]
        if p.writes:
            earlier += [q for q in self._reads if q.lo < hi and lo < q.hi]
            self._writes.add(p)
        else:
            self._reads.add(p)
        for q in earlier:
            q.waiters.append(job)
        p.blockers = len(earlier)
        return not earlier

    def conflicts(self, lo: int, hi: int, writes: bool = False) -> bool:
        """Whether a request on ``[lo, hi)`` would have to wait: it overlaps a
        write in flight, or (if it ``writes``) any request in flight."""
        if self._writes and any(q.lo < hi and lo < q.hi for q in self._writes):
            return True
        return writes and bool(self._reads) and any(
            q.lo < hi and lo < q.hi for q in self._reads)

    def waiting(self) -> list[Job]:
        """The jobs held behind earlier overlapping ones."""
        jobs = {id(j): j for q in (*self._reads, *self._writes) for j in q.waiters}
        return list(jobs.values())

    def finished(self, p: Pending) -> list[Job]:
        """``p`` is done: the jobs that waited only for it and may start."""
        if p.lo == p.hi:
            return []
        (self._writes if p.writes else self._reads).discard(p)
        ready = []
        for job in p.waiters:
            w: Pending = job.tag
            w.blockers -= 1
            if not w.blockers:
                ready.append(job)
        p.waiters.clear()
        return ready


class FlushBarrier:
    """Write-like requests by issue number; flushes held behind them."""

    def __init__(self) -> None:
        self._next = 0
        self._writes: set[int] = set()  # not finished
        self._held: deque[tuple[int, Job]] = deque()  # (barrier, flush), in issue order

    def write(self, p: Pending) -> None:
        p.seq = self._next
        self._next += 1
        self._writes.add(p.seq)

    def flush(self, job: Job) -> bool:
        """True if the flush may start now; else it is held."""
        if not self._writes:
            return True
        self._held.append((self._next, job))  # every write so far is below
        return False

    def finished(self, p: Pending) -> list[Job]:
        """A write-like request is done: the flushes that may start."""
        self._writes.discard(p.seq)
        held = self._held
        if not held:
            return []
        oldest = min(self._writes) if self._writes else None
        ready = []
        while held and (oldest is None or oldest >= held[0][0]):
            ready.append(held.popleft()[1])
        return ready

    def held_jobs(self) -> list[Job]:
        return [job for _, job in self._held]
