"""Model-based test of in-flight tracking: the backend dies at any line.

A driver-side queue (:class:`DriverQueue`) posts write requests; the
backend side (a :class:`SplitQueue` with an :class:`InflightQueue` and a
small block device, served either by the daemon's own request loop
:func:`serve_chains` or by a loop that takes several chains, gives some
back and completes the rest out of order, as an asynchronous device or net
RX does) is interrupted at the k-th executed line of the ring, in-flight and
device code, k drawn by hypothesis: during recovery, after a pop, after the
mark, half way through the data write, after the used element, after the
used index, after the in-flight entry is retired, ...  Everything the
process held is then abandoned; only guest memory, the in-flight memfd and
the "disk" (the image file) survive, and a new process maps the region again
and recovers from it, as a restarted backend does.

Checked, whatever the crashes: every request is completed exactly once (no
lost and no duplicate used entry), every completed write is on the disk, no
request is executed again once its completion was published, and the ring
positions agree with the driver's.
"""

from __future__ import annotations

import os
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import dvmm_shared.inflight as inflight_mod
import dvmm_shared.vhost_user.vring as vring_mod
import dvmm_shared.virtqueue as virtqueue_mod
import pytest
from dvmm_shared.chain import ChainReader, ChainWriter
from dvmm_shared.driver import Buf, DriverQueue, ring_layout
from dvmm_shared.inflight import InflightRegion, region_size
from dvmm_shared.memory import GuestMemory
from dvmm_shared.vhost_user.backend import QueueStats, VhostUserBackend
from dvmm_shared.vhost_user.vring import serve_chains
from dvmm_shared.virtqueue import ChainError, DescriptorChain, SplitQueue
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .helpers import BUF_BASE, REGION_A, RING_BASE, standard_memory

REQ = struct.Struct("<II")  # block, request id
OK = 0
BAD_ADDR = 0x7000_0000  # outside guest memory: a chain the device returns empty


class Crash(BaseException):
    """The process died here (BaseException: no handler in the code under test catches it)."""

    def __init__(self, where: str) -> None:
        super().__init__(where)
        self.where = where


class BlockModel(VhostUserBackend):
    """Writes a request's payload to a block of a disk that survives crashes,
    in two steps so a crash can leave half a write behind."""

    def __init__(self, disk: dict[int, bytearray], executions: Counter[int]) -> None:
        self.disk = disk
        self.executions = executions

    @property
    def num_queues(self) -> int:
        return 1

    def features(self) -> int:
        return 0

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        reader = ChainReader(chain.readable)
        block, rid = REQ.unpack(reader.read(REQ.size))
        data = reader.read(reader.remaining)
        buf = self.disk.setdefault(block, bytearray(len(data)))
        half = len(data) // 2
        buf[:half] = data[:half]
        self.executions[rid] += 1
        buf[half:] = data[half:]
        ChainWriter(chain.writable).write(bytes([OK]))
        return 1


_TRACED_FILES = {m.__file__ for m in (inflight_mod, vring_mod, virtqueue_mod)}


def serve_out_of_order(device: BlockModel, queue: SplitQueue, keys: list[int],
                       give_back: int) -> None:
    """Take up to ``len(keys)`` chains, give the last ``give_back`` back,
    complete the others in the order of ``keys``.  A bad chain is returned
    empty at once, or, behind chains already taken, given back (only the
    last chains taken may be: as net RX does)."""
    chains: list[DescriptorChain] = []
    while len(chains) < len(keys):
        try:
            chain = queue.pop()
        except ChainError as exc:
            if chains:
                queue.undo_pop(exc.head)
                break
            queue.push(exc.head, 0)
            continue
        if chain is None:
            break
        chains.append(chain)
    for _ in range(min(give_back, len(chains))):
        queue.undo_pop(chains.pop().head)
    for _, chain in sorted(zip(keys, chains, strict=False), key=lambda kc: kc[0]):
        queue.push(chain.head, device.handle_chain(0, chain))


_TRACED_CODE = {BlockModel.handle_chain.__code__, serve_out_of_order.__code__}
# Functions that only read (a crash inside one is a crash at its caller's
# line): not counted, so the drawn lines land where state changes.
_READ_ONLY = {"_walk", "_collect", "_indirect_table", "pending", "avail_idx", "avail_flags",
              "inflight_heads", "<listcomp>", "<lambda>", "is_inflight"}


@dataclass
class Lines:
    """Lines the backend executed under :func:`dying_at`."""

    count: int = 0


@contextmanager
def dying_at(line: int | None) -> Iterator[Lines]:
    """Raise :class:`Crash` at the ``line``-th line executed in the backend's
    code (ring, in-flight region, serve loop, device); None: no crash, count."""
    lines = Lines()

    def local(frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        if event == "line":
            lines.count += 1
            if lines.count == line:
                raise Crash(frame.f_code.co_name)
        return local

    def calls(frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        code = frame.f_code
        if code.co_name in _READ_ONLY:
            return None
        return local if code.co_filename in _TRACED_FILES or code in _TRACED_CODE else None

    sys.settrace(calls)
    try:
        yield lines
    finally:
        sys.settrace(None)


@dataclass
class World:
    """What survives a crash (guest memory, the in-flight memfd, the disk) and
    the driver; plus the current backend process's queue, if it is alive."""

    size: int
    mem: GuestMemory = field(default_factory=standard_memory)
    disk: dict[int, bytearray] = field(default_factory=dict)
    executions: Counter[int] = field(default_factory=Counter)
    queue: SplitQueue | None = None
    outstanding: dict[int, int] = field(default_factory=dict)  # head -> request id
    requests: dict[int, tuple[int, bytes, bool]] = field(default_factory=dict)
    completions: Counter[int] = field(default_factory=Counter)
    executed_when_completed: dict[int, int] = field(default_factory=dict)
    next_buf: int = BUF_BASE
    crashes: int = 0

    def __post_init__(self) -> None:
        self.layout = ring_layout(RING_BASE, self.size)
        self.driver = DriverQueue(self.mem, self.layout)
        self.fd, _ = InflightRegion.allocate(1, self.size, 1)
        self.device = BlockModel(self.disk, self.executions)
        self.stats = QueueStats()

    def close(self) -> None:
        os.close(self.fd)

    # -- the driver --------------------------------------------------------------
    def alloc(self, n: int) -> int:
        addr, self.next_buf = self.next_buf, (self.next_buf + n + 15) & ~15
        assert self.next_buf <= REGION_A[1], "the test ran out of buffer space"
        return addr

    def post(self, rid: int, data: bytes, bad: bool) -> None:
        hdr = self.alloc(REQ.size + len(data))
        self.mem.write(hdr, REQ.pack(rid, rid) + data)
        status = self.alloc(1)
        self.mem.write(status, b"\xff")
        src = BAD_ADDR if bad else hdr
        head = self.driver.add([Buf(src, REQ.size + len(data)), Buf(status, 1, write=True)])
        self.outstanding[head] = rid
        self.requests[rid] = (status, data, bad)

    def reap(self) -> None:
        for head, written in self.driver.get_used():
            assert head in self.outstanding, f"used entry for head {head}, not outstanding"
            rid = self.outstanding.pop(head)
            status, data, bad = self.requests[rid]
            self.completions[rid] += 1
            if bad:
                assert written == 0
                continue
            assert written == 1 and self.mem.read(status, 1) == bytes([OK])
            assert self.disk[rid] == data, f"request {rid} completed but not on the disk"
            self.executed_when_completed[rid] = self.executions[rid]

    # -- the backend process -------------------------------------------------------
    def start(self) -> SplitQueue:
        """A new backend process: map the region again and recover the ring.
        The frontend sends the used index as the base (all it knows)."""
        region = InflightRegion.map(self.fd, region_size(1, self.size), 0, 1, self.size, 1)
        tracker = region.queue(0)
        assert tracker is not None
        queue = SplitQueue(self.mem, self.layout, last_avail_idx=self.driver.used_idx())
        queue.recover_inflight(tracker)
        return queue

    def run(self, crash_at: int | None, plan: Plan | None = None) -> int | str:
        """Start a process if none is alive and serve the ring, maybe dying;
        ``plan``: out of order, else the daemon's loop.  Returns the lines
        run, or where it died."""
        try:
            with dying_at(crash_at) as lines:
                if self.queue is None:
                    self.queue = self.start()
                if plan is None:
                    serve_chains(self.device, 0, self.queue, self.stats)
                else:
                    serve_out_of_order(self.device, self.queue, *plan)
        except Crash as exc:
            self.crashes += 1
            self.queue = None  # everything the process held is gone
            return exc.where
        return lines.count

    def finish_and_check(self, requests: int) -> None:
        """A last process that does not die finishes whatever is left; then
        every request must have completed exactly once."""
        self.run(None)
        self.reap()
        assert self.queue is not None
        assert not self.outstanding, f"never completed: {sorted(self.outstanding.values())}"
        assert set(self.completions) == set(range(1, requests + 1))
        assert all(n == 1 for n in self.completions.values()), self.completions
        for r, n in self.executed_when_completed.items():
            assert self.executions[r] == n, f"request {r} executed again after completion"
        q = self.queue
        assert q.used_idx == q.last_avail_idx == self.driver.avail_idx == self.driver.used_idx()
        assert q.inflight is not None and not q.inflight.inflight_heads()


Plan = tuple[list[int], int]  # completion order keys, chains given back
Round = tuple[int, int | None, int | None, Plan | None]


def rounds(size: int) -> st.SearchStrategy[list[Round]]:
    """Rounds of (requests to post, line to die at or None, which one is a bad
    chain or None, out-of-order plan or None for the daemon's loop)."""
    plan = st.tuples(st.lists(st.integers(0, 99), min_size=1, max_size=size // 2),
                     st.integers(0, 2))
    return st.lists(st.tuples(st.integers(0, size // 2),
                              st.one_of(st.none(), st.integers(1, 25 * size)),
                              st.one_of(st.none(), st.integers(0, size // 2 - 1)),
                              st.one_of(st.none(), plan)),
                    min_size=1, max_size=8)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])
@given(st.sampled_from([4, 8]).flatmap(lambda n: st.tuples(st.just(n), rounds(n))))
def test_every_request_completes_exactly_once(case: tuple[int, list[Round]]) -> None:
    """Random rounds of posting, serving (either loop), dying anywhere
    (recovery included) and reaping, then one clean process."""
    size, plan = case
    world = World(size)
    rid = 0
    try:
        for posted, crash_at, bad, how in plan:
            for i in range(min(posted, world.driver.free_descriptors // 2)):
                rid += 1
                world.post(rid, bytes([rid & 0xFF]) * (4 + rid % 13), i == bad)
            world.run(crash_at, how)
            world.reap()
        world.finish_and_check(rid)
    finally:
        world.close()


SCENARIOS = {  # how the round is served: the daemon's loop, or out of order
    "daemon-loop": None,
    "reversed": ([2, 1, 0, 3], 0),
    "middle-first": ([1, 2, 0, 3], 0),
    "give-back-one": ([2, 0, 1], 1),
    "give-back-two": ([1, 0, 2, 3], 2),
}


def _scenario(plan: Plan | None, crash_at: int | None) -> tuple[World, int | str]:
    """Some history (so indices and heads are reused), then four requests
    (the last a bad chain), served by ``plan`` dying at ``crash_at``."""
    world = World(8)
    for rid in range(1, 6):
        world.post(rid, bytes([rid]) * 8, False)
        world.run(None)
        world.reap()
    for rid in range(6, 10):
        world.post(rid, bytes([rid]) * (5 + rid), rid == 9)
    return world, world.run(crash_at, plan)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_crash_at_every_line_is_recovered(name: str) -> None:
    """Exhaustively: the backend dies at each line of serving a round, and
    the next process recovers; and once more at each line of that recovery."""
    plan = SCENARIOS[name]
    probe, total = _scenario(plan, None)
    probe.close()
    assert isinstance(total, int) and total > 50
    died_in: set[str] = set()
    for line in range(1, total + 1):
        world, where = _scenario(plan, line)
        try:
            assert isinstance(where, str), f"line {line} of {total} did not die"
            died_in.add(where)
            world.reap()
            if line % 3 == 0:  # and again while recovering and resubmitting
                again = world.run(line % 150 + 1)
                died_in.add(str(again))
                world.reap()
            world.finish_and_check(9)
        finally:
            world.close()
    steps = {"recover", "pop", "mark", "handle_chain", "push", "pre_put", "post_put"}
    if plan is not None:
        steps |= {"undo"} if plan[1] else set()
    assert steps <= died_in, f"never died in {sorted(steps - died_in)}"
