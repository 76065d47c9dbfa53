"""Disk I/O engines: run disk calls concurrently and hand back the finished ones.

Owns the concurrency of the blk data path and nothing about virtio: an
engine takes :class:`Job` objects (a disk call and its arguments), runs
several at once, in any order, and makes the finished ones available on the
daemon's loop thread.  Completion wakes the loop through an eventfd
(:attr:`Engine.fd`) that the device watches on the daemon's selector — no
polling.  What a job means (status byte, ordering, used ring) is
:mod:`.dispatch`'s; what the call does to the image is :mod:`.disk`'s.

:class:`ThreadEngine` is a small pool of worker threads.  The disk calls it
makes (``os.preadv``/``os.pwritev``/``fdatasync``/``fallocate`` through
ctypes) release the GIL, so the copies between the page cache and guest
memory run on the other CPU while the loop parses the next requests, and the
disk sees as many requests as there are busy workers.  It is the fallback
of :class:`~.uring.UringEngine` (the default where io_uring can be set up,
measured against it in BENCHMARKS.md, "blk I/O engines") and what that
engine uses for the calls io_uring does not take.
"""

from __future__ import annotations

import queue
import select
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from dvmm_shared.eventfd import EventFd

#: Default worker threads: enough for the queue depth a disk benefits from
#: (threads block in the kernel, not on the CPU); idle ones cost nothing.
DEFAULT_THREADS = 8
MAX_THREADS = 256


class EngineError(Exception):
    """An engine that cannot be built as asked."""


@dataclass(slots=True, eq=False)
class Job:
    """One disk call in flight, and what to do with its result.

    ``fn(*args)`` runs on a worker; ``error`` is its OSError, if any.  The
    other fields belong to the submitter (:mod:`.dispatch`)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    queue: int = 0
    head: int = 0
    tag: Any = None
    error: OSError | None = None
    #: The same call as ``("read"|"write"|"flush", fd, offset, buffers)``
    #: for engines that make the system call themselves (io_uring, when it
    #: ``wants_native``); None: only ``fn`` will do.
    native: tuple[str, int, int, list[memoryview]] | None = None

    def run(self) -> None:
        try:
            self.fn(*self.args)
        except OSError as exc:
            self.error = exc


class Engine(Protocol):
    """What the dispatcher needs from an engine (all calls on the loop thread)."""

    #: Readable while finished jobs wait to be reaped.
    fd: int
    #: Whether jobs should carry ``native`` (the submitter fills it in).
    wants_native: bool

    def submit(self, job: Job) -> None: ...
    def push(self) -> None:
        """Start what was submitted since the last push (io_uring: one
        ``io_uring_enter`` for the batch; threads start at once)."""
    def reap(self) -> list[Job]:
        """The jobs finished since the last reap (clears the fd's readiness)."""
    def wait(self, timeout: float) -> None:
        """Block until a job finishes (or ``timeout`` seconds)."""
    def close(self) -> None: ...


class ThreadEngine:
    """Worker threads taking jobs from one queue, finished jobs on a deque.

    The completion eventfd is written once per burst, not per job: a worker
    signals only when no wake-up is pending (``_signalled``).  The loop first
    reads the eventfd, then clears the flag, then empties the deque: a job
    finished after the loop looked finds the flag clear and signals, and a
    signal is never consumed while the flag stays set (clearing first would
    let a worker's set-and-signal land in between: its signal eaten, the flag
    left set, and every later completion waiting for a wake-up that never
    comes)."""

    wants_native = False

    def __init__(self, threads: int = DEFAULT_THREADS, name: str = "blk-io",
                 wakeup: EventFd | None = None) -> None:
        if not 1 <= threads <= MAX_THREADS:
            raise EngineError(f"worker threads must be 1..{MAX_THREADS}, not {threads}")
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._done: deque[Job] = deque()
        self._efd = wakeup if wakeup is not None else EventFd()  # owned from here on
        self.fd = self._efd.fd
        self._signalled = False
        self._closed = False
        self._workers = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._workers:
            t.start()

    @property
    def threads(self) -> int:
        return len(self._workers)

    def submit(self, job: Job) -> None:
        if self._closed:
            raise EngineError("the engine is closed")
        self._jobs.put(job)

    def push(self) -> None:
        pass  # the workers took the jobs already

    def _work(self) -> None:
        get, done, efd = self._jobs.get, self._done, self._efd
        while True:
            job = get()
            if job is None:
                return
            job.run()
            done.append(job)
            if not self._signalled:
                self._signalled = True
                efd.signal()

    def reap(self) -> list[Job]:
        self._efd.consume()
        self._signalled = False
        done = self._done
        out = []
        while done:
            out.append(done.popleft())
        return out

    def wait(self, timeout: float) -> None:
        select.select([self.fd], [], [], timeout)

    def close(self) -> None:
        """Let the workers finish what was submitted, then stop them."""
        if self._closed:
            return
        self._closed = True
        for _ in self._workers:
            self._jobs.put(None)
        for t in self._workers:
            t.join()
        self._efd.close()


ENGINES = ("auto", "io_uring", "threads", "sync")


def make_engine(kind: str, threads: int = DEFAULT_THREADS) -> Engine | None:
    """The engine called ``kind``; None for ``sync`` (requests served inline,
    one at a time, on the loop thread).  ``auto``: io_uring where the kernel
    allows it (measured ahead on cache-missing reads: BENCHMARKS.md), else
    the thread pool."""
    if kind == "threads":
        return ThreadEngine(threads)
    if kind in ("io_uring", "auto"):
        from .uring import UringEngine

        try:
            return UringEngine(fallback_threads=threads)
        except EngineError:
            if kind == "io_uring":
                raise
            return ThreadEngine(threads)
    if kind == "sync":
        return None
    raise EngineError(f"engine must be one of {', '.join(ENGINES)}, not {kind!r}")
