"""The blk I/O engines and the asynchronous request path.

:class:`ThreadEngine` with real threads (jobs really in flight together,
finished out of order, every completion wakes the loop, errors come back);
the dispatcher with a hand-driven engine (FLUSH held behind earlier writes,
in-flight entries cleared only when published, bad requests answered at
once); and the whole backend in a daemon thread behind real vhost-user:
out-of-order completions reach the driver, and GET_VRING_BASE waits for the
requests in flight.
"""

from __future__ import annotations

import random
import select
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dvmm_blk.device import BlkDevice
from dvmm_blk.disk import RawDisk
from dvmm_blk.engine import EngineError, Job, ThreadEngine, make_engine
from dvmm_shared.driver import Buf
from dvmm_shared.eventfd import EventFd
from dvmm_shared.synthetic import SyntheticVM
from dvmm_shared.virtio import VirtioBlkReqType as T

from .blk_engine_rig import SECTOR, EngineRig
from .helpers import ECHO_FEATURES, DaemonThread, make_image, run_blk
from .inflight_rig import InflightVM, echo_backend
from .test_blk_e2e import ALL_FEATURES, complete, post, status

OK, IOERR, UNSUPP = 0, 1, 2
DEADLINE = 20.0  # seconds: only bounds a failing test, never judged


def reap_all(engine: ThreadEngine, count: int) -> list[Job]:
    """Wait on the engine's fd (as the daemon's selector does) for ``count`` jobs."""
    out: list[Job] = []
    deadline = time.monotonic() + DEADLINE
    while len(out) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(out)} of {count} jobs came back"
        ready, _, _ = select.select([engine.fd], [], [], left)
        if ready:
            out.extend(engine.reap())
    return out


@pytest.fixture
def engine() -> Iterator[ThreadEngine]:
    e = ThreadEngine(4)
    yield e
    e.close()


# -- ThreadEngine --------------------------------------------------------------------
def test_jobs_are_in_flight_together(engine: ThreadEngine) -> None:
    barrier = threading.Barrier(4, timeout=DEADLINE)  # passes only with 4 running at once
    results: list[int] = []
    for _ in range(4):
        engine.submit(Job(lambda: results.append(barrier.wait()), ()))
    assert len(reap_all(engine, 4)) == 4
    assert sorted(results) == [0, 1, 2, 3]


def test_jobs_finish_out_of_order(engine: ThreadEngine) -> None:
    gate = threading.Event()
    slow = Job(gate.wait, (DEADLINE,), head=1)
    fast = Job(lambda: None, (), head=2)
    engine.submit(slow)
    engine.submit(fast)
    assert [j.head for j in reap_all(engine, 1)] == [2]
    gate.set()
    assert [j.head for j in reap_all(engine, 1)] == [1]


class YieldingEventFd(EventFd):
    """Gives the GIL away inside signal/consume: the windows between the
    engine's flag and its eventfd open wide."""

    def signal(self) -> None:
        time.sleep(0)
        super().signal()

    def consume(self) -> int:
        time.sleep(0)
        return super().consume()


def test_every_completion_wakes_the_loop() -> None:
    """Bursts of tiny jobs from many threads: none is left without a wake-up
    (a lost one would leave jobs on the deque and the fd quiet)."""
    engine = ThreadEngine(4, wakeup=YieldingEventFd())
    try:
        _bursts(engine)
    finally:
        engine.close()


def _bursts(engine: ThreadEngine) -> None:
    rng = random.Random(9)
    for _ in range(400):
        burst = rng.randrange(2, 12)
        for i in range(burst):  # spread the finishes so they race with the reaps
            engine.submit(Job(time.sleep, (rng.random() / 2000,), head=i))
        assert sorted(j.head for j in reap_all(engine, burst)) == list(range(burst))


def test_an_oserror_is_returned_with_the_job(engine: ThreadEngine) -> None:
    def fail() -> None:
        raise OSError(5, "boom")

    engine.submit(Job(fail, ()))
    (job,) = reap_all(engine, 1)
    assert isinstance(job.error, OSError) and job.error.errno == 5


def test_close_finishes_what_was_submitted_and_refuses_more() -> None:
    e = ThreadEngine(2)
    done: list[int] = []
    for i in range(10):
        e.submit(Job(done.append, (i,)))
    e.close()
    assert sorted(done) == list(range(10))
    with pytest.raises(EngineError):
        e.submit(Job(done.append, (0,)))


def test_make_engine_checks_its_arguments() -> None:
    assert make_engine("sync") is None
    with pytest.raises(EngineError, match="engine must be one of"):
        make_engine("aio")
    with pytest.raises(EngineError, match=r"1\.\.256"):
        ThreadEngine(0)


# -- the dispatcher, by hand -------------------------------------------------------
def test_flush_waits_for_the_writes_issued_before_it() -> None:
    """w1 has to wait for the read before it (so it is in flight when the
    flush comes); w3, after the flush, overlaps nothing and is written at once."""
    rig = EngineRig()
    r1, w1, f, w3 = rig.post("R", 1), rig.post("W", 1), rig.post("F"), rig.post("W", 3)
    rig.service()
    assert [j.head for j in rig.engine.queued] == [r1.head]  # w1 waits, the flush is held
    assert rig.rp.driver.get_used() == [(w3.head, 1)]
    rig.engine.run(0)  # r1: w1 may go, the flush still waits for it
    rig.device.dispatcher.on_ready()  # type: ignore[union-attr]
    assert [j.head for j in rig.engine.queued] == [w1.head]
    rig.engine.run(0)  # w1: now the flush
    rig.device.dispatcher.on_ready()  # type: ignore[union-attr]
    assert [j.head for j in rig.engine.queued] == [f.head]
    rig.engine.run(0)
    rig.device.dispatcher.on_ready()  # type: ignore[union-attr]
    assert [h for h, _ in rig.rp.driver.get_used()] == [r1.head, w1.head, f.head]
    assert rig.disk.calls == [("write", 3), ("read", 1), ("write", 1),
                              ("flush", frozenset({1, 3}))]
    assert rig.rp.mem.read(r1.data, SECTOR) == bytes([1]) * SECTOR  # before w1


def test_overlapping_requests_keep_their_order() -> None:
    """Write after read, read after write, write after write of one sector:
    each waits for the one before; other sectors do not wait."""
    rig = EngineRig()
    r1, w1, r1b, w1b, other = (rig.post("R", 1), rig.post("W", 1), rig.post("R", 1),
                               rig.post("W", 1), rig.post("R", 2))
    rig.service()
    assert [j.head for j in rig.engine.queued] == [r1.head, other.head]
    rig.engine.run(0)  # r1: then w1 (only w1: r1b and w1b wait for it)
    rig.device.dispatcher.on_ready()  # type: ignore[union-attr]
    assert [j.head for j in rig.engine.queued] == [other.head, w1.head]
    rig.engine.run(1)  # w1: then r1b; w1b still waits for r1b
    rig.device.dispatcher.on_ready()  # type: ignore[union-attr]
    assert [j.head for j in rig.engine.queued] == [other.head, r1b.head]
    assert w1b.head not in {j.head for j in rig.engine.queued}
    rig.engine.wait(0)
    rig.device.dispatcher.on_ready()  # type: ignore[union-attr]
    rig.engine.wait(0)
    rig.device.dispatcher.on_ready()  # type: ignore[union-attr]
    assert rig.rp.mem.read(r1.data, SECTOR) == bytes([1]) * SECTOR
    assert rig.rp.mem.read(r1b.data, SECTOR) == bytes([0xA1]) * SECTOR
    assert [c for c in rig.disk.calls if c[1] == 1] == [
        ("read", 1), ("write", 1), ("read", 1), ("write", 1)]
    assert len(rig.rp.driver.get_used()) == 5


def test_a_memory_backed_image_is_served_on_the_loop_thread() -> None:
    """tmpfs: every request is a copy; workers would only fight the loop
    for the GIL, so the pass is served inline, in order."""
    rig = EngineRig(memory_backed=True)
    reads = [rig.post("R", s) for s in range(6)]
    rig.service()
    assert not rig.engine.queued
    assert [h for h, _ in rig.rp.driver.get_used()] == [p.head for p in reads]


def test_completions_are_published_in_the_order_they_finish() -> None:
    rig = EngineRig()
    reads = [rig.post("R", s) for s in (3, 4, 5)]
    rig.service()
    assert set(rig.tracker.inflight_heads()) == {p.head for p in reads}
    rig.engine.run(2)
    rig.engine.run(0)
    rig.device.dispatcher.on_ready()  # type: ignore[union-attr]
    assert rig.rp.driver.get_used() == [(reads[2].head, SECTOR + 1), (reads[0].head, SECTOR + 1)]
    assert rig.tracker.inflight_heads() == [reads[1].head]  # still held: still marked
    assert rig.host.notifications == 1  # one signal for the batch of two
    assert rig.rp.mem.read(reads[2].data, SECTOR) == bytes([5]) * SECTOR


def test_errors_and_bad_requests() -> None:
    rig = EngineRig(fail=frozenset({7}))
    bad, gid, r, w = rig.post("X"), rig.post("G"), rig.post("R", 1), rig.post("W", 7)
    rig.service()
    # answered at once, without the engine: the write (a page-cache copy) too
    assert rig.rp.driver.get_used() == [(bad.head, 1), (gid.head, 21), (w.head, 1)]
    assert (rig.status(bad), rig.status(gid), rig.status(w)) == (UNSUPP, OK, IOERR)
    assert rig.device.stats.errors == 1 and rig.device.stats.writes == 0
    rig.engine.run(0)
    rig.device.dispatcher.on_ready()  # type: ignore[union-attr]
    assert rig.rp.driver.get_used() == [(r.head, SECTOR + 1)] and rig.status(r) == OK


def test_a_lone_request_is_served_at_once() -> None:
    """Queue depth 1: nothing in flight and nothing more available, so no
    hand-off to the engine (it would only add its latency)."""
    rig = EngineRig(fail=frozenset({7}))
    for kind, sector, want in (("R", 2, OK), ("W", 3, OK), ("F", 0, OK), ("W", 7, IOERR)):
        p = rig.post(kind, sector)
        rig.service()
        assert not rig.engine.queued
        (used,) = rig.rp.driver.get_used()
        assert used[0] == p.head and rig.status(p) == want
    assert rig.tracker.inflight_heads() == []
    assert rig.disk.calls == [("read", 2), ("write", 3), ("flush", frozenset({3})),
                              ("write", 7)]


def test_cached_reads_are_served_at_once_while_others_are_in_flight() -> None:
    rig = EngineRig()
    hits: list[int] = []

    def try_read(offset: int, bufs: list[memoryview]) -> bool:
        if offset // SECTOR == 9:  # "in the page cache"
            rig.disk.read(offset, bufs)
            hits.append(9)
            return True
        return False

    rig.device._try_read = try_read
    miss, w, hit = rig.post("R", 4), rig.post("W", 1), rig.post("R", 9)
    rig.service()
    assert rig.rp.driver.get_used() == [(w.head, 1), (hit.head, SECTOR + 1)] and hits == [9]
    assert [j.head for j in rig.engine.queued] == [miss.head]
    assert rig.rp.mem.read(hit.data, SECTOR) == bytes([9]) * SECTOR


def test_stopping_a_ring_drains_it() -> None:
    rig = EngineRig()
    for s in range(5):
        rig.post("W" if s % 2 else "R", s)
    rig.post("F")
    rig.service()
    rig.device.queue_stopped(0)
    assert len(rig.rp.driver.get_used()) == 6
    assert rig.tracker.inflight_heads() == [] and not rig.engine.queued
    assert rig.device.dispatcher is not None and rig.device.dispatcher.outstanding[0] == 0


# -- through the daemon ---------------------------------------------------------------
class GatedDisk(RawDisk):
    """Reads of sector 0 wait for :attr:`gate`."""

    gate = threading.Event()

    def read(self, offset: int, bufs: list[memoryview]) -> None:
        if offset == 0:
            assert self.gate.wait(DEADLINE)
        super().read(offset, bufs)

    def try_read(self, offset: int, bufs: list[memoryview]) -> bool:
        return offset != 0 and super().try_read(offset, bufs)


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[DaemonThread, threading.Event, threading.Event]]:
    """The backend in a daemon thread; its reads of sector 0 wait for the
    first event, and the second is set when a ring starts draining."""
    disk = GatedDisk(str(make_image(tmp_path / "d.img", 64 * SECTOR)))
    disk.gate = threading.Event()
    device = BlkDevice(disk, engine=ThreadEngine(4))
    draining = threading.Event()
    dispatcher = device.dispatcher
    assert dispatcher is not None
    drain = dispatcher.drain

    def traced_drain(index: int) -> None:
        draining.set()
        drain(index)

    dispatcher.drain = traced_drain  # type: ignore[method-assign]
    with DaemonThread(device, tmp_path / "blk.sock") as dt:
        yield dt, disk.gate, draining
        disk.gate.set()


def test_a_slow_request_does_not_hold_back_the_others(
        gated: tuple[DaemonThread, threading.Event, threading.Event]) -> None:
    dt, gate, _ = gated
    with SyntheticVM(mem_size=1 << 20) as vm:
        vm.connect(dt.path, ALL_FEATURES)
        ring = vm.rings[0]
        slow = post(vm, ring, T.IN, 0, in_len=SECTOR)
        fast = [post(vm, ring, T.IN, s, in_len=SECTOR) for s in (1, 2)]
        ring.kick_if_needed()
        first: list[int] = []
        while len(first) < 2:
            first += [h for h, _ in ring.wait_used(DEADLINE)]
        assert sorted(first) == sorted(p.head for p in fast)
        gate.set()
        assert ring.wait_used(DEADLINE) == [(slow.head, SECTOR + 1)]
        assert status(vm, slow) == OK
        assert vm.mem.read(slow.data_addr, 8) == (0).to_bytes(8, "little")


def test_get_vring_base_waits_for_the_requests_in_flight(
        gated: tuple[DaemonThread, threading.Event, threading.Event]) -> None:
    dt, gate, draining = gated
    with SyntheticVM(mem_size=1 << 20) as vm:
        vm.connect(dt.path, ALL_FEATURES)
        ring = vm.rings[0]
        slow = post(vm, ring, T.IN, 0, in_len=SECTOR)
        fast = post(vm, ring, T.IN, 1, in_len=SECTOR)
        ring.kick_if_needed()
        assert ring.wait_used(DEADLINE) == [(fast.head, SECTOR + 1)]
        base: list[int] = []
        assert vm.frontend is not None
        fe = vm.frontend
        stopper = threading.Thread(target=lambda: base.append(fe.get_vring_base(0)))
        stopper.start()
        assert draining.wait(DEADLINE)  # the stop arrived while the read is held
        assert ring.queue.get_used() == [] and not base
        gate.set()
        stopper.join(DEADLINE)
        assert base == [2]  # both taken; the reply came once both were returned
        assert ring.queue.get_used() == [(slow.head, SECTOR + 1)]


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm (tmpfs) here")
def test_a_tmpfs_image_through_the_daemon(tmp_path: Path) -> None:
    """Writes, overlapping reads and a flush in one batch on a memory-backed
    image (served on the loop thread, in order)."""
    shm = Path(tempfile.mkdtemp(prefix="dvmm-blk-engine-", dir="/dev/shm"))
    try:
        disk = RawDisk(str(make_image(shm / "d.img", 256 * SECTOR)))
        device = BlkDevice(disk, engine=ThreadEngine(4))
        assert device.memory_backed
        with DaemonThread(device, tmp_path / "blk.sock") as dt, \
                SyntheticVM(mem_size=4 << 20) as vm:
            vm.connect(dt.path, ALL_FEATURES)
            ring = vm.rings[0]
            writes = [post(vm, ring, T.OUT, s, out=bytes([s + 1]) * SECTOR)
                      for s in range(0, 40, 2)]
            reads = [post(vm, ring, T.IN, s, in_len=SECTOR) for s in range(20)]
            flush = post(vm, ring, T.FLUSH)
            done = complete(ring, len(writes) + len(reads) + 1)
            assert all(status(vm, p) == OK for p in (*writes, *reads, flush))
            assert [done[p.head] for p in reads] == [SECTOR + 1] * len(reads)
            for s, p in enumerate(reads):  # each read comes after the write before it
                got = vm.mem.read(p.data_addr, SECTOR)
                assert got == bytes([s + 1]) * SECTOR if s % 2 == 0 else \
                    got[:8] == s.to_bytes(8, "little")
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_a_restarted_backend_signals_the_driver_once(tmp_path: Path) -> None:
    """The dead backend published a used entry and died before signalling
    it (crash point after-used): the next one signals the call eventfd when
    the ring starts, with nothing to serve, or the driver would wait forever
    for a request the device already completed."""
    sock, log = tmp_path / "echo.sock", tmp_path / "echo.log"
    with InflightVM(mem_size=4 << 20) as ivm:
        src, dst = ivm.alloc(16, align=16), ivm.alloc(16, align=16)
        with echo_backend(sock, "after-used", log) as proc:
            ivm.connect(str(sock), ECHO_FEATURES, num_queues=1, queue_size=16)
            ring = ivm.rings[0]
            ring.queue.add([Buf(src, 4), Buf(dst, 4, write=True)])
            ring.kick.signal()
            assert proc.wait(DEADLINE) == -signal.SIGKILL
        assert ring.queue.used_idx() == 1 and ring.call.consume() == 0  # never signalled
        with echo_backend(sock, None, log):
            ivm.connect(str(sock), ECHO_FEATURES, num_queues=1, queue_size=16)
            assert select.select([ring.call.fd], [], [], DEADLINE)[0], log.read_text()
            assert len(ring.queue.get_used()) == 1


# -- the command line ---------------------------------------------------------------
def test_engine_options(tmp_path: Path) -> None:
    image = make_image(tmp_path / "d.img", 64 * SECTOR)
    out = run_blk("--socket", str(tmp_path / "s.sock"), "--image", str(image),
                  "--io-threads", "0")
    assert out.returncode != 0 and "--io-threads must be 1..256" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = run_blk("--socket", str(tmp_path / "s.sock"), "--image", str(image),
                  "--engine", "nope")
    assert out.returncode != 0 and "invalid choice" in out.stderr
    assert "--engine" in run_blk("--help").stdout
