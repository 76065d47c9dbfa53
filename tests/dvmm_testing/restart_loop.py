"""A tiny supervisor for crash-recovery tests: keep one backend process alive.

Owns one backend's process across its restarts: it starts the backend,
waits for it to exit (a SIGKILL from the test, or a crash), and starts it
again with the same command line on the same socket path, until the test
stops it.  Each run (a *generation*) logs to its own file
(``NAME.GEN.log``), so a failure can be traced to the run that saw it.

It is not the core's supervisor (``dvmm_core.supervisor``): no back-off
and no give-up cap, because here the test itself decides when a backend
dies and must see every restart happen.

The watcher thread forks the children, and ``PR_SET_PDEATHSIG`` follows the
forking *thread* (see :func:`dvmm_shared.procs.die_with_parent`): so the
thread lives until :meth:`RestartLoop.stop` has ended the last child, and a
child never outlives the test process.

Usage::

    with RestartLoop(argv, sock, log_dir, "blk") as loop:
        pid = loop.kill()                 # SIGKILL the running backend
        loop.wait_listening(1, timeout)   # generation 1 is up on the socket
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from dvmm_testing import procs

_POLL = 0.02  # seconds between checks for a socket file or a log line


class LoopState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class RestartLoopError(Exception):
    """The backend did not come up (or a log line did not appear) in time."""


@dataclass(frozen=True)
class Exit:
    """One run of the backend that ended: its generation, pid, status, when."""

    generation: int
    pid: int
    status: int  # negative: killed by that signal (subprocess convention)
    at: float  # time.monotonic()

    @property
    def signal(self) -> signal.Signals | None:
        return signal.Signals(-self.status) if self.status < 0 else None


class RestartLoop:
    """Run *argv* and restart it whenever it exits; a context manager.

    *socket_path* is the backend's listening socket: it is removed before
    each start, so its appearance means the new run listens (dvmm backends
    bind under a temporary name and rename it into place).
    """

    def __init__(self, argv: Sequence[str], socket_path: Path, log_dir: Path,
                 name: str) -> None:
        self.argv = list(argv)
        self.socket_path = socket_path
        self.log_dir = log_dir
        self.name = name
        self.state = LoopState.NEW
        self.exits: list[Exit] = []
        self.generation = -1  # of the current (or last) run
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"restart-{name}", daemon=True)
        self._error: BaseException | None = None

    # -- lifecycle --------------------------------------------------------------
    def __enter__(self) -> RestartLoop:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        """Start the first run and wait until it listens."""
        if self.state is not LoopState.NEW:
            raise RuntimeError(f"RestartLoop.start() in state {self.state.value}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.state = LoopState.RUNNING
        self._thread.start()
        self.wait_listening(0, timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """End the current run with SIGTERM (SIGKILL if it lingers); its status. Idempotent."""
        if self.state is not LoopState.RUNNING:
            return None
        self.state = LoopState.STOPPED
        self._stopping.set()
        self._thread.join(timeout)
        with self._lock:
            proc = self._proc
        if proc is None:
            return None
        return procs.stop(proc)  # normally done by the thread already; idempotent

    # -- what the test does -------------------------------------------------------
    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._proc.pid if self._proc is not None else None

    @property
    def restarts(self) -> int:
        return max(self.generation, 0)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send *sig* to the running backend; its pid (the loop will restart it)."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                raise RestartLoopError(f"{self.name}: no running backend to kill")
            proc.send_signal(sig)
            return proc.pid

    def wait_listening(self, generation: int, timeout: float) -> None:
        """Until run *generation* (or a later one) exists and its socket is there."""
        deadline = time.monotonic() + timeout
        while not (self.generation >= generation and self.socket_path.exists()):
            self._check(deadline, f"generation {generation} to listen on {self.socket_path}")
            time.sleep(_POLL)

    def io_bytes(self) -> int:
        """Bytes the current run has read and written through syscalls (``/proc/PID/io``).

        rchar + wchar: disk I/O (``preadv``/``pwritev``) and, a little, socket
        and eventfd traffic.  0 once the run has ended."""
        pid = self.pid
        try:
            text = Path(f"/proc/{pid}/io").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return 0
        fields = dict(line.split(": ") for line in text.splitlines())
        return int(fields["rchar"]) + int(fields["wchar"])

    def wait_io(self, generation: int, min_bytes: int, timeout: float,
                after: str = "frontend connected") -> int:
        """Until run *generation* has moved *min_bytes* since its log said *after*.

        The count starts at that log line so that reading Python's modules at
        start-up is not taken for I/O.  Returns the bytes moved so far."""
        deadline = time.monotonic() + timeout
        self.wait_log(after, generation, timeout)
        base = self.io_bytes()
        while (moved := self.io_bytes() - base) < min_bytes:
            self._check(deadline, f"generation {generation} to move {min_bytes} bytes")
            time.sleep(_POLL)
        return moved

    def wait_running(self, timeout: float) -> bool:
        """Until the current run is on a CPU (state R in ``/proc/PID/stat``); False on timeout.

        A backend waiting for a kick sleeps (S); one seen running is most
        likely in the middle of a request, the moment a crash test wants.
        Polls every 0.2 ms (a request takes about a millisecond)."""
        deadline = time.monotonic() + timeout
        path = Path(f"/proc/{self.pid}/stat")
        while time.monotonic() < deadline:
            try:
                stat = path.read_text()
            except (FileNotFoundError, ProcessLookupError):
                return False
            if stat[stat.rindex(")") + 2] == "R":  # the name in () may hold spaces
                return True
            time.sleep(0.0002)
        return False

    def log_path(self, generation: int | None = None) -> Path:
        gen = self.generation if generation is None else generation
        return self.log_dir / f"{self.name}.{gen}.log"

    def wait_log(self, pattern: str, generation: int, timeout: float) -> re.Match[str]:
        """Until run *generation*'s log has a line matching *pattern*; the match."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.M)
        while True:
            path = self.log_path(generation)
            text = path.read_text(errors="replace") if path.exists() else ""
            if (m := regex.search(text)) is not None:
                return m
            self._check(deadline, f"/{pattern}/ in {path}")
            time.sleep(_POLL)

    def _check(self, deadline: float, what: str) -> None:
        if self._error is not None:
            raise RestartLoopError(f"{self.name}: the restart thread failed: {self._error}")
        if time.monotonic() > deadline:
            tail = procs.log_tail(self.log_path())
            raise RestartLoopError(f"{self.name}: timed out waiting for {what}; "
                                   f"{self.log_path()}:\n{tail}")

    # -- the watcher thread ---------------------------------------------------------
    def _watch(self) -> None:
        try:
            while not self._stopping.is_set():
                proc = self._spawn_next()
                if proc is None:
                    return
                while (status := procs.wait_exit(proc, 0.05)) is None:
                    if self._stopping.is_set():
                        procs.stop(proc)  # SIGTERM: a clean end, logged stats
                        return
                self.exits.append(Exit(self.generation, proc.pid, status, time.monotonic()))
        except BaseException as exc:  # reported to the test by _check
            self._error = exc

    def _spawn_next(self) -> subprocess.Popen[bytes] | None:
        with self._lock:
            if self._stopping.is_set():
                return None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)  # so its appearance means "listening"
            gen = self.generation + 1
            self._proc = procs.spawn(self.argv, self.log_dir / f"{self.name}.{gen}.log")
            self.generation = gen
            return self._proc
