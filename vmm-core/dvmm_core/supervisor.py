"""The backend supervisor: starts device backend processes and watches them.

Owns the private runtime directory (sockets live there), the child
processes and their lifecycle (:class:`BackendState`).  A backend that dies
is reported on the log (and to ``on_exit``) with its exit status; the core
keeps running.  Children get ``PR_SET_PDEATHSIG`` so they never outlive the
core, and are stopped with SIGTERM (then SIGKILL after a grace period) when
the core shuts down.  psutil reports their RSS and CPU time.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import psutil
from dvmm_shared.procs import die_with_parent

log = logging.getLogger("dvmm.supervisor")

STOP_GRACE = 5.0


class BackendState(Enum):
    STARTING = "starting"
    RUNNING = "running"
    EXITED = "exited"
    STOPPED = "stopped"


class SupervisorError(Exception):
    """A backend could not be started."""


@dataclass
class Backend:
    name: str
    argv: list[str]
    socket: str
    proc: subprocess.Popen[bytes] | None = None
    state: BackendState = BackendState.STARTING
    returncode: int | None = None
    _watcher: threading.Thread | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else -1

    def describe_exit(self) -> str:
        rc = self.returncode
        if rc is None:
            return "still running"
        if rc < 0:
            return f"killed by {signal.Signals(-rc).name}"
        return f"exited with status {rc}"

    def usage(self) -> dict[str, float]:
        """RSS (bytes) and CPU seconds of the running process."""
        try:
            p = psutil.Process(self.pid)
            cpu = p.cpu_times()
            return {"rss": float(p.memory_info().rss), "cpu": cpu.user + cpu.system}
        except (psutil.Error, ValueError):
            return {}


class Supervisor:
    """Spawns backends with sockets in a private runtime directory."""

    def __init__(self, on_exit: Callable[[Backend], None] | None = None,
                 runtime_dir: str | None = None) -> None:
        base = os.environ.get("XDG_RUNTIME_DIR") or None
        self.runtime_dir = runtime_dir or tempfile.mkdtemp(prefix="dvmm-", dir=base)
        os.chmod(self.runtime_dir, 0o700)
        self._own_dir = runtime_dir is None
        self.backends: list[Backend] = []
        self.on_exit = on_exit
        self._stopping = False

    def socket_path(self, name: str) -> str:
        return os.path.join(self.runtime_dir, f"{name}.sock")

    def spawn_python(self, name: str, module: str, args: Sequence[str]) -> Backend:
        """Start ``python -m module --socket <runtime>/<name>.sock args...``."""
        sock = self.socket_path(name)
        argv = [sys.executable, "-m", module, "--socket", sock, *args]
        return self.spawn(name, argv, sock)

    def spawn(self, name: str, argv: list[str], socket: str) -> Backend:
        backend = Backend(name, argv, socket)
        try:
            backend.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                            preexec_fn=die_with_parent(signal.SIGTERM))
        except OSError as exc:
            raise SupervisorError(f"cannot start backend {name}: {exc.strerror}") from None
        backend.state = BackendState.RUNNING
        log.info("started backend %s (pid %d)", name, backend.pid)
        backend._watcher = threading.Thread(target=self._watch, args=(backend,),
                                            name=f"watch-{name}", daemon=True)
        backend._watcher.start()
        self.backends.append(backend)
        return backend

    def wait_for_socket(self, backend: Backend, timeout: float = 15.0) -> None:
        """Wait until the backend listens, or fail if it exits first."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(backend.socket):
            if backend.proc is not None and backend.proc.poll() is not None:
                backend.returncode = backend.proc.returncode
                raise SupervisorError(f"backend {backend.name} {backend.describe_exit()} "
                                      "before listening (see its log above)")
            if time.monotonic() > deadline:
                raise SupervisorError(f"backend {backend.name} did not listen on "
                                      f"{backend.socket} within {timeout:.0f} s")
            time.sleep(0.02)

    def _watch(self, backend: Backend) -> None:
        assert backend.proc is not None
        backend.returncode = backend.proc.wait()
        if self._stopping:
            backend.state = BackendState.STOPPED
            return
        backend.state = BackendState.EXITED
        log.error("backend %s (pid %d) %s; its device is offline, the VM keeps running",
                  backend.name, backend.pid, backend.describe_exit())
        if self.on_exit is not None:
            self.on_exit(backend)

    def stop_all(self) -> None:
        self._stopping = True
        live = [b for b in self.backends if b.proc and b.proc.poll() is None]
        for b in live:
            assert b.proc is not None
            b.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for b in live:
            assert b.proc is not None
            try:
                b.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("backend %s ignored SIGTERM; killing it", b.name)
                b.proc.kill()
                b.proc.wait()
        if self._own_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
