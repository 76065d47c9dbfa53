"""The asynchronous blk request path: chains to engine jobs and back.

Owns what happens between taking a chain from a ring and returning it used
when an engine (:mod:`.engine`) does the I/O: the request is parsed and
turned into a disk call on the loop thread (:class:`RequestServer`, the
device), submitted, and when the engine hands the job back — in any order —
its status byte is set, it is counted, and it is published through the
daemon (:meth:`BackendHost.complete`: one put per chain, one call-eventfd
signal per batch, EVENT_IDX respected).  Everything here runs on the daemon's
loop thread; only ``Job.run`` runs on a worker.  Which request waits for
which (overlapping ranges, FLUSH behind the writes issued before it) is
:mod:`.ordering`'s.

Some requests are served at once, on the loop thread, with no hand-off:
requests without I/O, reads the page cache holds (``RWF_NOWAIT``), writes
(into the page cache: a copy, like a cached read) that overlap nothing in
flight, and any request when it is the only one (nothing in flight, nothing
more available: at queue depth 1 a hand-off would only add its latency).
What goes to the engine is what waits for the device: reads that miss the
cache, FLUSH, discard and write-zeroes, and requests that must wait for
others.  (Measured: a worker hand-off costs more than a 4-128 KiB copy on
these 2-CPU machines, where the GIL keeps a worker's Python from running
beside the loop's.)  Whole passes skip
this path when nothing is in flight and a hand-off cannot win (a tmpfs
image, a single request: :meth:`~dvmm_blk.device.BlkDevice.inline_is_faster`).

In-flight tracking stays exact because nothing here touches the ring: the
chain was marked in flight when popped, and it is retired by the daemon
after its used entry is published.  A ring is stopped (GET_VRING_BASE, a
disable, the frontend leaving) only after :meth:`Dispatcher.drain` has
returned every chain taken from it, so the position read back is final.
"""

from __future__ import annotations

import logging
import selectors
from collections.abc import Callable
from typing import Any, Protocol

from dvmm_shared.vhost_user.backend import BackendHost
from dvmm_shared.virtio import VIRTIO_BLK_SECTOR_SIZE, VirtioBlkStatus
from dvmm_shared.virtqueue import DescriptorChain, SplitQueue

from .engine import Engine, Job
from .ordering import FlushBarrier, Overlaps, Pending, span
from .request import (
    BlkRequest,
    Discard,
    DiskLimits,
    Flush,
    Read,
    Write,
    WriteZeroes,
    parse_simple,
)

log = logging.getLogger("dvmm.blk")

#: Seconds between "still waiting" lines while a stopping ring drains.
DRAIN_REPORT = 5.0


class RequestServer(Protocol):
    """The device side of a request (:class:`dvmm_blk.device.BlkDevice`)."""

    limits: DiskLimits

    def serve_simple(self, req: Read | Write, status: memoryview) -> int:
        """Serve a plain read or write now; the bytes written."""
    def serve(self, req: BlkRequest, status: memoryview, ok_written: int) -> int:
        """Serve any parsed request now; the bytes written."""

    def parse(self, queue_index: int, chain: DescriptorChain
              ) -> tuple[BlkRequest, memoryview, int] | int: ...
    def operation(self, req: BlkRequest) -> tuple[Callable[..., Any], tuple[Any, ...]] | int: ...
    def read_cached(self, req: BlkRequest) -> bool: ...
    def native(self, req: BlkRequest) -> tuple[str, int, int, list[memoryview]] | None: ...
    #: Whether ``native`` may be asked before the request's turn (a raw
    #: file: the call never changes; a format: its mapping may).
    native_is_stable: bool
    def account(self, req: BlkRequest) -> None: ...
    def failed(self, req: BlkRequest, exc: OSError) -> int: ...


_WRITE_LIKE = (Write, Discard, WriteZeroes)
DiskOp = tuple[Callable[..., Any], tuple[Any, ...]]


class Dispatcher:
    """Requests of every queue of one device through one engine."""

    def __init__(self, device: RequestServer, engine: Engine, *, inline: bool = True) -> None:
        self.device = device
        self.engine = engine
        #: Serve on the loop thread what does not wait for a device (False:
        #: every request with I/O goes to the engine).
        self.inline = inline
        self.host: BackendHost | None = None
        #: Chains taken from each queue and not yet handed back.
        self.outstanding: dict[int, int] = {}
        self.overlaps = Overlaps()
        self.flushes = FlushBarrier()
        self._busy = 0  # chains taken from any queue and not handed back
        self._queue: SplitQueue | None = None  # the one being served, for peeking
        self._pass: list[Job] | None = None  # jobs ready to start, while serving

    # -- the daemon's side ------------------------------------------------------
    def attach(self, host: BackendHost) -> None:
        self.host = host

    def watch(self) -> None:
        """Have finished jobs wake the loop (idempotent; after every ring start,
        since a reset of the connection drops the backend's watches)."""
        if self.host is not None:
            self.host.watch(self.engine.fd, selectors.EVENT_READ, self.on_ready)

    def serve(self, host: BackendHost, index: int, queue: SplitQueue) -> bool:
        """Take every available chain of a kicked queue (``process_queue``)."""
        self._queue, self._pass = queue, []
        try:
            return host.submit_chains(index, queue, self.start)
        finally:
            jobs, self._queue, self._pass = self._pass, None, None
            self._launch(jobs)

    def _launch(self, jobs: list[Job]) -> None:
        """Start the jobs a service pass made ready, one per worker, so the
        device sees them all at once; one ``push`` for the pass."""
        engine = self.engine
        for job in jobs:
            engine.submit(job)
        engine.push()

    # -- taking requests ------------------------------------------------------------
    def start(self, index: int, chain: DescriptorChain) -> int | None:
        """A chain just taken from ring ``index``: answered now (the bytes
        written) or taken (None; published when the engine is done)."""
        device = self.device
        simple = parse_simple(chain.readable, chain.writable, device.limits)
        if simple is None:
            return self._start_other(index, chain)
        rw, status = simple  # the hot path: a plain read or write
        lo = rw.sector
        hi = lo + rw.nbytes // VIRTIO_BLK_SECTOR_SIZE
        if not self.inline:
            return self._take(index, chain.head, rw, status,
                              1 if type(rw) is Write else rw.nbytes + 1, lo, hi, type(rw) is Write)
        if type(rw) is Write:
            if self.overlaps.conflicts(lo, hi, True):
                return self._take(index, chain.head, rw, status, 1, lo, hi, True)
            return device.serve_simple(rw, status)
        if self._alone():
            return device.serve_simple(rw, status)
        if not self.overlaps.conflicts(lo, hi) and device.read_cached(rw):
            device.account(rw)
            status[0] = VirtioBlkStatus.OK
            return rw.nbytes + 1
        return self._take(index, chain.head, rw, status, rw.nbytes + 1, lo, hi, False)

    def _start_other(self, index: int, chain: DescriptorChain) -> int | None:
        """Any other request: FLUSH, discard, write-zeroes, GET_ID, bad ones."""
        device = self.device
        parsed = device.parse(index, chain)
        if isinstance(parsed, int):
            return parsed
        req, status, ok_written = parsed
        if self._alone():
            return device.serve(req, status, ok_written)
        lo, hi, writes = span(req)
        return self._take(index, chain.head, req, status, ok_written, lo, hi, writes)

    def _take(self, index: int, head: int, req: BlkRequest, status: memoryview,
              ok_written: int, lo: int, hi: int, writes: bool) -> int | None:
        """Hand ``req`` to the engine, now or once what it waits for is done."""
        device = self.device
        op = device.operation(req)
        if isinstance(op, int):  # answered without I/O (GET_ID, a refusal)
            status[0] = op
            return ok_written if op == VirtioBlkStatus.OK else 1
        p = Pending(req, status, ok_written, lo=lo, hi=hi, writes=writes)
        job = Job(op[0], op[1], index, head, p)
        native = self.engine.wants_native
        if native and (device.native_is_stable or isinstance(req, Flush)):
            job.native = device.native(req)
        self._busy += 1
        self.outstanding[index] = self.outstanding.get(index, 0) + 1
        if isinstance(req, _WRITE_LIKE):
            self.flushes.write(p)
        elif isinstance(req, Flush) and not self.flushes.flush(job):
            return None
        if self.overlaps.admit(p, job):
            if native and job.native is None and not isinstance(req, Flush):
                # An image format maps offsets to file extents: take the
                # mapping now, when nothing issued earlier overlaps (a
                # request held back runs through job.fn, which maps then).
                job.native = device.native(req)
            if self._pass is not None:
                self._pass.append(job)
            else:
                self.engine.submit(job)
        return None

    @property
    def idle(self) -> bool:
        """Nothing taken and not handed back, on any queue."""
        return not self._busy

    def _alone(self) -> bool:
        q = self._queue
        return (self.inline and not self._busy and q is not None
                and q.avail_idx() == q.last_avail_idx)

    # -- handing them back ------------------------------------------------------------
    def on_ready(self) -> None:
        """The engine's fd is readable: publish what finished."""
        self.finish(self.engine.reap())

    def finish(self, jobs: list[Job]) -> None:
        """Status bytes and counters of finished jobs, publish them per queue,
        then start what waited for them."""
        if not jobs:
            return
        device = self.device
        done: dict[int, list[tuple[int, int]]] = {}
        ready: list[Job] = []
        for job in jobs:
            p: Pending = job.tag
            if job.error is None:
                device.account(p.req)
                p.status[0] = VirtioBlkStatus.OK
                written = p.ok_written
            else:
                p.status[0] = device.failed(p.req, job.error)
                written = 1
            if p.hi != p.lo:
                ready += self.overlaps.finished(p)
            if p.seq >= 0:
                ready += self.flushes.finished(p)
            self.outstanding[job.queue] -= 1
            self._busy -= 1
            batch = done.get(job.queue)
            if batch is None:
                done[job.queue] = [(job.head, written)]
            else:
                batch.append((job.head, written))
        self._publish(done)
        if ready:
            for job in ready:
                self.engine.submit(job)
            self.engine.push()

    def _publish(self, done: dict[int, list[tuple[int, int]]]) -> None:
        host = self.host
        if host is None:  # no frontend: the chains stay in flight in its region
            log.warning("%d completions with no frontend; dropped",
                        sum(map(len, done.values())))
            return
        for index, batch in done.items():
            host.complete(index, batch)

    def drain(self, index: int) -> None:
        """Wait until every chain taken from queue ``index`` is handed back
        (a ring is about to stop; completions of other queues publish too)."""
        waited = 0.0
        while self.outstanding.get(index, 0) > 0:
            self.engine.wait(DRAIN_REPORT)
            jobs = self.engine.reap()
            if jobs:
                self.finish(jobs)
                waited = 0.0
                continue
            waited += DRAIN_REPORT
            log.warning("queue %d: still waiting for %d requests after %.0f s",
                        index, self.outstanding[index], waited)

    def close(self) -> None:
        self.engine.close()
