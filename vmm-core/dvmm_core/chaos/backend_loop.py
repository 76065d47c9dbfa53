"""Keeping one dvmm backend alive under QEMU, where no dvmm core supervises it.

Owns one backend's processes across restarts for the QEMU VM kind
(:mod:`.vm_qemu`): a watcher thread starts the backend (with ``--control``
on an ipc endpoint in the work directory), waits for it to end — a SIGKILL
from a fault, a crash at a point, a clean restart — and starts the next one
at once on the same socket path (QEMU's ``reconnect=1`` finds it).  It
synthesizes the core's events for the campaign: ``backend-exited`` when a
run ended, ``device-restored`` when a new run's ``health`` reports a
connected frontend.  Process faults are signals to the backend's pid.

The watcher thread forks the children and lives until :meth:`stop`: the
children's ``PR_SET_PDEATHSIG`` follows the forking thread.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dvmm_shared.control import ControlError, command
from dvmm_shared.procs import spawn, stop, wait_exit

from .vmbase import VmError

POLL = 0.02


class LoopState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class BackendLoop:
    """One backend, restarted whenever it ends, until :meth:`stop`.

    ``argv(control)`` builds the command line for the control endpoint."""

    def __init__(self, name: str, argv: Callable[[str], list[str]], sock: Path,
                 work: Path) -> None:
        self.name, self.argv, self.sock, self.work = name, argv, sock, work
        self.control = f"ipc://{work / (name + '.ctl')}"
        self.state = LoopState.NEW
        self.generation = -1
        self.exits: list[tuple[float, int]] = []   # (wall time, status)
        self.events: list[dict[str, Any]] = []
        self.base_requests = 0      # requests the ended runs served
        self._last_requests = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._watch, name=f"loop-{name}", daemon=True)

    # -- lifecycle ------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        self.state = LoopState.RUNNING
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not (self.generation >= 0 and self.sock.exists()):
            self.check()
            if time.monotonic() > deadline:
                raise VmError(f"{self.name}: the backend did not listen on {self.sock}:\n"
                              f"{self.log_tail()}")
            time.sleep(POLL)

    def stop(self) -> None:
        """End the current run (SIGCONT first: it may be stopped) and the watcher."""
        if self.state is not LoopState.RUNNING:
            return
        self.state = LoopState.STOPPED
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
        self._thread.join(20)
        if proc is not None:
            stop(proc)

    def check(self) -> None:
        if self._error is not None:
            raise VmError(f"{self.name}: the restart thread failed: {self._error}")

    def log_path(self, generation: int | None = None) -> Path:
        gen = self.generation if generation is None else generation
        return self.work / f"{self.name}.{gen}.log"

    def log_tail(self) -> str:
        from dvmm_shared.procs import log_tail
        return log_tail(self.log_path())

    # -- what faults do -------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        with self._lock:
            proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def signal(self, action: str) -> dict[str, Any]:
        """``kill`` (SIGKILL), ``restart`` (SIGTERM: a clean end), ``stop``, ``cont``."""
        sig = {"kill": signal.SIGKILL, "restart": signal.SIGTERM, "stop": signal.SIGSTOP,
               "cont": signal.SIGCONT}.get(action)
        if sig is None:
            raise VmError(f"unknown process fault {action!r}")
        deadline = time.monotonic() + 30
        while (pid := self.pid) is None:  # between two runs: wait for the next
            self.check()
            if time.monotonic() > deadline:
                raise VmError(f"{self.name}: no running backend to {action}")
            time.sleep(POLL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        return {"name": self.name, "action": action, "pid": pid}

    def command(self, cmd: str, timeout: float = 5.0, retry: float = 30.0,
                **args: Any) -> dict[str, Any]:
        """A command to the running backend's endpoint, retried while it restarts."""
        deadline = time.monotonic() + retry
        while True:
            try:
                return command(self.control, cmd, timeout=timeout, **args)
            except ControlError as exc:
                unreachable = "no answer" in str(exc) or "no control endpoint" in str(exc)
                if not unreachable or time.monotonic() > deadline:  # refused: no retry
                    raise VmError(f"{self.name}: {cmd} failed: {exc}") from None
            self.check()
            time.sleep(POLL)

    def requests(self) -> int:
        """Requests served over all runs (the runs' ``stats`` queue counters)."""
        try:
            if self.pid is None:
                raise ControlError("between two runs")
            st = command(self.control, "stats", timeout=0.3)
        except ControlError:
            return self.base_requests + self._last_requests
        now = sum(int(q.get("requests", 0)) for q in st.get("queues", []))
        with self._lock:
            self._last_requests = now
            return self.base_requests + now

    # -- the watcher thread ---------------------------------------------------------
    def _watch(self) -> None:
        try:
            while not self._stopping.is_set():
                proc = self._spawn_next()
                if proc is None:
                    return
                connections = 0   # sessions of this run seen connected
                while (status := wait_exit(proc, POLL)) is None:
                    if self._stopping.is_set():
                        return
                    connections = self._restored(connections)
                self._exited(status)
        except BaseException as exc:  # reported by check()
            self._error = exc

    def _restored(self, seen: int) -> int:
        """A ``device-restored`` event for each new session of this run (a new
        run's first one, and the frontend's reconnect after the backend closed
        its socket); the sessions seen so far."""
        try:
            health = command(self.control, "health", timeout=0.5)
        except ControlError:
            return seen
        connections = int(health.get("connections", 0))
        if not health.get("frontend") or connections <= seen:
            return seen
        self.events.append({"event": "device-restored", "name": self.name, "ts": time.time(),
                            "generation": self.generation})
        return connections

    def _exited(self, status: int) -> None:
        ts = time.time()
        with self._lock:
            self.base_requests += self._last_requests
            self._last_requests = 0
        self.exits.append((ts, status))
        self.events.append({"event": "backend-exited", "name": self.name, "ts": ts,
                            "status": status, "generation": self.generation})

    def _spawn_next(self) -> subprocess.Popen[bytes] | None:
        with self._lock:
            if self._stopping.is_set():
                return None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.sock)  # so its appearance means "listening"
            gen = self.generation + 1
            self._proc = spawn(self.argv(self.control), self.work / f"{self.name}.{gen}.log")
            self.generation = gen
            return self._proc
