"""The asynchronous blk request path: chains to engine jobs and back, FLUSH ordered.

Owns what happens between taking a chain from a ring and returning it used
when an engine (:mod:`.engine`) does the I/O: the request is parsed and
turned into a disk call on the loop thread (:class:`RequestServer`, the
device), submitted, and when the engine hands the job back — in any order —
its status byte is set, it is counted, and it is published through the
daemon (:meth:`BackendHost.complete`: one put per chain, one call-eventfd
signal per batch, EVENT_IDX respected).  Everything here runs on the daemon's
loop thread; only ``Job.run`` runs on a worker.

Ordering (virtio 1.2 section 5.2.6.1: "a flush covers the writes completed
before it"): a FLUSH is held back until every write-like request (write,
discard, write-zeroes) *issued* before it has finished, then submitted — a
stricter rule than the spec's, so a driver that counts on either is served.
Other requests are not ordered: virtio-blk gives no order between requests
in flight, and drivers do not issue overlapping ones.

In-flight tracking stays exact because nothing here touches the ring: the
chain was marked in flight when popped, and it is retired by the daemon
after its used entry is published.  A ring is stopped (GET_VRING_BASE, a
disable, the frontend leaving) only after :meth:`Dispatcher.drain` has
returned every chain taken from it, so the position read back is final.
"""

from __future__ import annotations

import logging
import selectors
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from dvmm_shared.vhost_user.backend import BackendHost
from dvmm_shared.virtio import VirtioBlkStatus
from dvmm_shared.virtqueue import DescriptorChain

from .engine import Engine, Job
from .request import BlkRequest, Discard, Flush, Write, WriteZeroes

log = logging.getLogger("dvmm.blk")

#: Seconds between "still waiting" lines while a stopping ring drains.
DRAIN_REPORT = 5.0


class RequestServer(Protocol):
    """The device side of a request (:class:`dvmm_blk.device.BlkDevice`)."""

    def parse(self, queue_index: int, chain: DescriptorChain
              ) -> tuple[BlkRequest, memoryview, int] | int: ...
    def operation(self, req: BlkRequest) -> tuple[Callable[..., Any], tuple[Any, ...]] | int: ...
    def account(self, req: BlkRequest) -> None: ...
    def failed(self, req: BlkRequest, exc: OSError) -> int: ...


@dataclass(slots=True, eq=False)
class Pending:
    """What a job needs at completion: the request, its status byte, the
    bytes written on success, and its place in the write order."""

    req: BlkRequest
    status: memoryview
    ok_written: int
    seq: int = -1  # write-like requests: issue order; others -1


_WRITE_LIKE = (Write, Discard, WriteZeroes)


class Dispatcher:
    """Requests of every queue of one device through one engine."""

    def __init__(self, device: RequestServer, engine: Engine) -> None:
        self.device = device
        self.engine = engine
        self.host: BackendHost | None = None
        #: Chains taken from each queue and not yet handed back.
        self.outstanding: dict[int, int] = {}
        self._next_seq = 0
        self._writes: set[int] = set()  # write-like requests not finished, by seq
        self._held: deque[tuple[int, Job]] = deque()  # (barrier, flush) in issue order

    # -- the daemon's side ------------------------------------------------------
    def attach(self, host: BackendHost) -> None:
        self.host = host

    def watch(self) -> None:
        """Have finished jobs wake the loop (idempotent; after every ring start,
        since a reset of the connection drops the backend's watches)."""
        if self.host is not None:
            self.host.watch(self.engine.fd, selectors.EVENT_READ, self.on_ready)

    def start(self, index: int, chain: DescriptorChain) -> int | None:
        """A chain just taken from ring ``index``: answered now (the bytes
        written) or submitted (None)."""
        device = self.device
        parsed = device.parse(index, chain)
        if isinstance(parsed, int):
            return parsed
        req, status, ok_written = parsed
        op = device.operation(req)
        if isinstance(op, int):  # answered without I/O (GET_ID, a refusal)
            status[0] = op
            return ok_written if op == VirtioBlkStatus.OK else 1
        pending = Pending(req, status, ok_written)
        job = Job(op[0], op[1], index, chain.head, pending)
        self.outstanding[index] = self.outstanding.get(index, 0) + 1
        if isinstance(req, _WRITE_LIKE):
            pending.seq = self._next_seq
            self._next_seq += 1
            self._writes.add(pending.seq)
        elif isinstance(req, Flush) and self._writes:
            # Every write issued so far has a seq below this barrier.
            self._held.append((self._next_seq, job))
            return None
        self.engine.submit(job)
        return None

    def on_ready(self) -> None:
        """The engine's fd is readable: publish what finished."""
        self.finish(self.engine.reap())

    def finish(self, jobs: list[Job]) -> None:
        """Status bytes and counters of finished jobs, then publish them per queue."""
        if not jobs:
            return
        device = self.device
        done: dict[int, list[tuple[int, int]]] = {}
        wrote = False
        for job in jobs:
            p: Pending = job.tag
            if job.error is None:
                device.account(p.req)
                p.status[0] = VirtioBlkStatus.OK
                written = p.ok_written
            else:
                p.status[0] = device.failed(p.req, job.error)
                written = 1
            if p.seq >= 0:
                self._writes.discard(p.seq)
                wrote = True
            self.outstanding[job.queue] -= 1
            batch = done.get(job.queue)
            if batch is None:
                done[job.queue] = [(job.head, written)]
            else:
                batch.append((job.head, written))
        self._publish(done)
        if wrote and self._held:
            self._release_flushes()

    def _publish(self, done: dict[int, list[tuple[int, int]]]) -> None:
        host = self.host
        if host is None:  # no frontend: the chains stay in flight in its region
            log.warning("%d completions with no frontend; dropped",
                        sum(map(len, done.values())))
            return
        for index, batch in done.items():
            host.complete(index, batch)

    def _release_flushes(self) -> None:
        """Submit the held flushes whose earlier writes have all finished."""
        oldest = min(self._writes) if self._writes else None
        held = self._held
        while held and (oldest is None or oldest >= held[0][0]):
            self.engine.submit(held.popleft()[1])

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
