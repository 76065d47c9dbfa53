"""The backend supervisor: starts device backend processes, watches them and
restarts them.

Owns the private runtime directory (sockets and control endpoints live
there), the child processes and their lifecycle (:class:`BackendState`), and
the restart policy (:class:`RestartSpec`): ``always``, ``on-failure``
(default: a clean exit status 0 is not restarted) or ``never``; exponential
back-off between attempts for a backend that keeps dying right after start;
and a cap on restarts per window after which the backend is *given up*: its
device stays offline and the event stream says why.  A backend that dies
while the supervisor is stopping is never restarted.

Warm standby: for a backend that supports it (``--standby-fd``, every dvmm
backend), the supervisor keeps a second process that has loaded the program
and waits on a pipe, holding nothing.  A restart then writes one byte to it
instead of starting an interpreter (which costs ~200 ms of imports), and a
new standby is prepared a moment later, once the restarted backend serves.

Children get ``PR_SET_PDEATHSIG`` so they never outlive the core.  The
signal follows the *thread* that forked, so every restart and standby is
spawned by one long-lived timer thread, never by the short-lived watchers.
Children are stopped with SIGTERM (then SIGKILL after a grace period) when
the core shuts down.  psutil reports their RSS and CPU time (imported on
the first ``dvmm status``, not at start-up).

How a backend is started -- plain process, bubblewrap sandbox, Docker
container -- is its :class:`~dvmm_core.runners.Runner`'s (issue 12): the
runner lays out its sockets, hands it its fds and wraps its command line,
and returns a handle whose ``pid`` is the backend's own; everything here
works the same under every runner.

Every change is reported through ``on_event(event, fields)`` (the core
publishes it on the ZeroMQ event stream): ``backend-started``,
``backend-exited``, ``backend-restarted``, ``backend-given-up``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any, NamedTuple

from .runners import Child, Runner, RunnerError

log = logging.getLogger("dvmm.supervisor")

STOP_GRACE = 5.0
#: A new standby is prepared this long after its twin started: the import
#: work (~200 ms of CPU) should not compete with the first moments of the
#: restarted backend, which replays the device and the requests in flight.
STANDBY_DELAY = 0.25

#: How often a starting backend's socket is looked for: the guest may be
#: waiting for the device (its first access waits for its backend).
SOCKET_POLL = 0.002

EventSink = Callable[[str, dict[str, Any]], None]


class BackendState(Enum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"  # dead, a new process is due after the back-off
    EXITED = "exited"          # dead, and the policy does not restart it
    GAVE_UP = "given-up"       # dead too often: the device stays offline
    STOPPED = "stopped"        # stopped by the supervisor


class RestartPolicy(Enum):
    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"

    @classmethod
    def parse(cls, text: str) -> RestartPolicy:
        try:
            return cls(text)
        except ValueError:
            known = ", ".join(p.value for p in cls)
            raise ValueError(f"unknown restart policy {text!r} (known: {known})") from None


class RestartSpec(NamedTuple):
    """When and how fast a dead backend is started again."""

    policy: RestartPolicy = RestartPolicy.ON_FAILURE
    #: At most ``limit`` restarts within ``window`` seconds, then give up.
    limit: int = 10
    window: float = 60.0
    #: Back-off before restart attempt n of a backend that never became
    #: stable: ``backoff_start * 2**(n-1)``, capped.
    backoff_start: float = 0.010
    backoff_cap: float = 2.0
    #: A backend that ran this long was healthy: its next crash restarts
    #: after ``backoff_start`` again.
    stable_after: float = 1.0

    def wants_restart(self, returncode: int) -> bool:
        if self.policy is RestartPolicy.ALWAYS:
            return True
        return self.policy is RestartPolicy.ON_FAILURE and returncode != 0

    def backoff(self, quick_failures: int) -> float:
        return float(min(self.backoff_cap, self.backoff_start * 2.0 ** max(0, quick_failures - 1)))


class SupervisorError(Exception):
    """A backend could not be started."""


class Backend:
    """One supervised backend process (a plain class: no dataclass to create
    at start-up)."""

    def __init__(self, name: str, argv: list[str], socket: str,
                 restart: RestartSpec | None = None, control: str | None = None, *,
                 standby: bool = False, runner: Runner | None = None) -> None:
        self.name = name
        self.runner = runner or Runner()
        self.argv = argv
        self.socket = socket
        self.restart = restart or RestartSpec()
        self.control = control
        self.standby = standby
        self.proc: Child | None = None
        self.state = BackendState.STARTING
        self.returncode: int | None = None
        self.restarts = 0
        self.started_at = 0.0
        self.given_up_reason: str | None = None
        self.last_exit: str | None = None
        self._spare: tuple[Child, int] | None = None
        self._restart_times: deque[float] = deque()
        self._quick_failures = 0
        self._forced = False

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, pid={self.pid}, state={self.state.value})"

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else -1

    @property
    def uptime(self) -> float:
        if self.state is not BackendState.RUNNING:
            return 0.0
        return time.monotonic() - self.started_at

    def describe_exit(self) -> str:
        return describe_returncode(self.returncode)

    def usage(self) -> dict[str, float]:
        """RSS (bytes) and CPU seconds of the running process."""
        import psutil

        try:
            p = psutil.Process(self.pid)
            cpu = p.cpu_times()
            return {"rss": float(p.memory_info().rss), "cpu": cpu.user + cpu.system}
        except (psutil.Error, ValueError):
            return {}

    def info(self) -> dict[str, Any]:
        """What ``dvmm status`` shows of this backend."""
        return {"name": self.name, "pid": self.pid if self.state is BackendState.RUNNING
                else None, "state": self.state.value, "restarts": self.restarts,
                "uptime": round(self.uptime, 3), "policy": self.restart.policy.value,
                "control": self.control, "external": False, "socket": self.socket,
                "runner": self.runner.kind.value,
                "last_exit": self.last_exit, "given_up_reason": self.given_up_reason}


def describe_returncode(rc: int | None) -> str:
    if rc is None:
        return "still running"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with status {rc}"


def make_runtime_dir() -> str:
    """A new private directory ``dvmm-<pid>-<random>`` in ``$XDG_RUNTIME_DIR``
    (else ``$TMPDIR``, else /tmp): the core's pid in the name lets ``dvmm
    status --pid N`` find the VM.  (What ``tempfile.mkdtemp`` does, without
    importing tempfile at start-up.)"""
    base = os.environ.get("XDG_RUNTIME_DIR") or os.environ.get("TMPDIR") or "/tmp"
    for _ in range(100):
        path = os.path.join(base, f"dvmm-{os.getpid()}-{os.urandom(6).hex()}")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free runtime directory name in {base}")


class Supervisor:
    """Spawns backends with sockets in a private runtime directory, restarts
    them by their policy."""

    def __init__(self, on_exit: Callable[[Backend], None] | None = None,
                 runtime_dir: str | None = None, on_event: EventSink | None = None) -> None:
        self.runtime_dir = runtime_dir or make_runtime_dir()
        os.chmod(self.runtime_dir, 0o700)
        self._own_dir = runtime_dir is None
        self.backends: list[Backend] = []
        self.on_exit = on_exit
        self.on_event = on_event
        self._stopping = False
        self._lock = threading.Lock()
        # The timer thread's agenda: (due, tie-break, "restart"|"standby", backend).
        self._agenda: list[tuple[float, int, str, Backend]] = []
        self._tick = itertools.count()
        self._agenda_cond = threading.Condition()
        self._timer: threading.Thread | None = None

    def socket_path(self, name: str) -> str:
        return os.path.join(self.runtime_dir, f"{name}.sock")

    def control_endpoint(self, name: str) -> str:
        return f"ipc://{os.path.join(self.runtime_dir, name)}.ctl"

    def spawn_python(self, name: str, module: str, args: Sequence[str],
                     restart: RestartSpec | None = None, control: bool = False,
                     standby: bool = False, runner: Runner | None = None) -> Backend:
        """Start ``python -m module --socket SOCKET args...`` (with ``--control
        ENDPOINT`` when asked) through ``runner`` (default: a plain process
        with ``<runtime>/<name>.sock`` and ``ipc://<runtime>/<name>.ctl``)."""
        runner = runner or Runner()
        try:
            sock, endpoint = runner.prepare(self.runtime_dir, name)
            resources = runner.resource_args()[0]
        except (RunnerError, OSError) as exc:
            runner.close()
            raise SupervisorError(f"cannot start backend {name}: {exc}") from None
        argv = [*runner.program(module), "--socket", sock, *resources]
        if control:
            argv += ["--control", endpoint]
        return self.spawn(name, [*argv, *args], sock, restart=restart,
                          control=endpoint if control else None,
                          standby=standby and runner.standby, runner=runner)

    def spawn(self, name: str, argv: list[str], socket: str, *,
              restart: RestartSpec | None = None, control: str | None = None,
              standby: bool = False, runner: Runner | None = None) -> Backend:
        """Start a backend; ``standby``: its program takes ``--standby-fd``."""
        backend = Backend(name, argv, socket, restart or RestartSpec(), control, standby=standby,
                          runner=runner)
        try:
            self._start(backend)
        except SupervisorError:
            backend.runner.close()
            raise
        self.backends.append(backend)
        return backend

    def _start(self, backend: Backend) -> None:
        spare, backend._spare = backend._spare, None
        if spare is not None and spare[0].poll() is None:
            proc, go = spare
            try:
                os.write(go, b"g")
            except OSError:
                proc.kill()
                spare = None
            os.close(go)
        elif spare is not None:
            os.close(spare[1])
            spare = None
        if spare is None:
            proc = self._popen(backend, backend.argv)
        backend.proc = proc
        backend.state = BackendState.RUNNING
        backend.returncode = None
        backend.started_at = time.monotonic()
        log.info("started backend %s (pid %d)", backend.name, backend.pid)
        self._emit("backend-started", name=backend.name, pid=backend.pid,
                   restarts=backend.restarts)
        threading.Thread(target=self._watch, args=(backend, backend.proc),
                         name=f"watch-{backend.name}", daemon=True).start()
        if backend.standby:
            self._at(STANDBY_DELAY, "standby", backend)

    def _popen(self, backend: Backend, argv: list[str], pass_fds: tuple[int, ...] = ()
               ) -> Child:
        from dvmm_shared.procs import die_with_parent

        fds = (*backend.runner.resource_args()[1], *pass_fds)
        try:
            return backend.runner.launch(argv, fds, die_with_parent(signal.SIGTERM))
        except RunnerError as exc:
            raise SupervisorError(f"cannot start backend {backend.name}: {exc}") from None

    def _prepare_standby(self, backend: Backend) -> None:
        """(timer thread, lock held) A warm twin waiting on a pipe."""
        if backend._spare is not None or backend.state is not BackendState.RUNNING:
            return
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            proc = self._popen(backend, [*backend.argv, "--standby-fd", str(r)], (r,))
        except SupervisorError as exc:
            os.close(w)
            log.warning("%s; restarts will start a new process", exc)
            return
        finally:
            os.close(r)
        backend._spare = (proc, w)
        log.debug("backend %s: standby ready (pid %d)", backend.name, proc.pid)

    def _drop_standby(self, backend: Backend) -> None:
        spare, backend._spare = backend._spare, None
        if spare is not None:
            os.close(spare[1])  # EOF: the standby exits 0
            spare[0].wait()

    def wait_for_socket(self, backend: Backend, timeout: float = 15.0,
                        cancelled: Callable[[], bool] = lambda: False) -> None:
        """Wait until the backend listens, or fail if it exits first (or
        return early once ``cancelled()``)."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(backend.socket) and not cancelled():
            if backend.proc is not None and backend.proc.poll() is not None:
                backend.returncode = backend.proc.returncode
                raise SupervisorError(f"backend {backend.name} {backend.describe_exit()} "
                                      "before listening (see its log above)")
            if time.monotonic() > deadline:
                raise SupervisorError(f"backend {backend.name} did not listen on "
                                      f"{backend.socket} within {timeout:.0f} s")
            time.sleep(SOCKET_POLL)

    # -- exits and restarts ---------------------------------------------------
    def _watch(self, backend: Backend, proc: Child) -> None:
        rc = proc.wait()
        with self._lock:
            if proc is not backend.proc:
                return
            backend.returncode = rc
            backend.last_exit = describe_returncode(rc)
            if self._stopping:
                backend.state = BackendState.STOPPED
                return
            ran = time.monotonic() - backend.started_at
            delay = self._decide(backend, rc, ran)
        self._emit("backend-exited", name=backend.name, pid=proc.pid, status=rc,
                   how=backend.last_exit, ran_s=round(ran, 3))
        if self.on_exit is not None:
            self.on_exit(backend)
        if delay is not None:
            self._schedule(delay, backend)

    def _decide(self, backend: Backend, rc: int, ran: float) -> float | None:
        """After an exit: the back-off before a restart, or None (state says why)."""
        spec, forced = backend.restart, backend._forced
        backend._forced = False
        if not forced and not spec.wants_restart(rc):
            backend.state = BackendState.EXITED
            log.error("backend %s (pid %d) %s; restart policy %s: its device stays offline",
                      backend.name, backend.pid, backend.last_exit, spec.policy.value)
            return None
        now = time.monotonic()
        times = backend._restart_times
        while times and now - times[0] > spec.window:
            times.popleft()
        if not forced and len(times) >= spec.limit:
            self._drop_standby(backend)
            backend.state = BackendState.GAVE_UP
            backend.given_up_reason = (
                f"restarted {len(times)} times in {spec.window:.0f} s and {backend.last_exit} "
                "again; given up, its device stays offline")
            log.error("backend %s: %s", backend.name, backend.given_up_reason)
            self._emit("backend-given-up", name=backend.name, reason=backend.given_up_reason)
            return None
        backend._quick_failures = 0 if ran >= spec.stable_after else backend._quick_failures + 1
        delay = 0.0 if forced else spec.backoff(backend._quick_failures)
        backend.state = BackendState.RESTARTING
        log.warning("backend %s (pid %d) %s; restarting in %.0f ms", backend.name,
                    backend.pid, backend.last_exit, delay * 1000)
        return delay

    def _schedule(self, delay: float, backend: Backend) -> None:
        self._at(delay, "restart", backend)

    def _at(self, delay: float, what: str, backend: Backend) -> None:
        with self._agenda_cond:
            if self._timer is None:
                self._timer = threading.Thread(target=self._timer_loop, name="restarter",
                                               daemon=True)
                self._timer.start()
            heapq.heappush(self._agenda, (time.monotonic() + delay, next(self._tick), what,
                                          backend))
            self._agenda_cond.notify()

    def _timer_loop(self) -> None:
        """The one thread that forks restarted backends and standbys (see the
        module doc), each when it is due."""
        while True:
            with self._agenda_cond:
                while not self._stopping and (
                        not self._agenda or self._agenda[0][0] > time.monotonic()):
                    wait = self._agenda[0][0] - time.monotonic() if self._agenda else None
                    self._agenda_cond.wait(wait)
                if self._stopping:
                    return
                _, _, what, backend = heapq.heappop(self._agenda)
            if what == "standby":
                with self._lock:
                    if not self._stopping:
                        self._prepare_standby(backend)
                continue
            with self._lock:
                if self._stopping or backend.state is not BackendState.RESTARTING:
                    continue
                backend.restarts += 1
                backend._restart_times.append(time.monotonic())
                try:
                    self._start(backend)
                except SupervisorError as exc:
                    backend.state = BackendState.GAVE_UP
                    backend.given_up_reason = str(exc)
                    log.error("%s", exc)
                    self._emit("backend-given-up", name=backend.name, reason=str(exc))
                    continue
            self._emit("backend-restarted", name=backend.name, pid=backend.pid,
                       restarts=backend.restarts)

    # -- fault injection and management -----------------------------------------
    def find(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        known = ", ".join(b.name for b in self.backends) or "none"
        raise SupervisorError(f"no backend named {name!r} (backends: {known})")

    def signal_backend(self, name: str, action: str) -> Backend:
        """``kill`` (SIGKILL), ``stop`` (SIGSTOP: a hang), ``cont`` (SIGCONT) or
        ``restart`` (SIGTERM, then started again whatever the policy)."""
        sigs = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "cont": signal.SIGCONT,
                "restart": signal.SIGTERM}
        if action not in sigs:
            raise SupervisorError(f"unknown action {action!r} (known: {', '.join(sigs)})")
        backend = self.find(name)
        with self._lock:
            if backend.state is not BackendState.RUNNING or backend.proc is None:
                raise SupervisorError(f"backend {name} is {backend.state.value}, not running")
            if action == "restart":
                backend._forced = True
            backend.proc.send_signal(sigs[action])
        log.warning("fault: sent %s to backend %s (pid %d)", sigs[action].name, name,
                    backend.pid)
        return backend

    def _emit(self, event: str, **fields: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event, fields)
            except Exception:  # an event sink must never break supervision
                log.exception("event sink failed for %s", event)

    def stop_all(self) -> None:
        with self._lock:
            self._stopping = True
            for b in self.backends:
                self._drop_standby(b)
        with self._agenda_cond:
            self._agenda_cond.notify()
        live = [b for b in self.backends if b.proc and b.proc.poll() is None]
        for b in live:
            assert b.proc is not None
            b.proc.send_signal(signal.SIGCONT)  # a stopped (hung) child cannot die
            b.proc.send_signal(signal.SIGTERM)
        import subprocess

        deadline = time.monotonic() + STOP_GRACE
        for b in live:
            assert b.proc is not None
            try:
                b.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("backend %s ignored SIGTERM; killing it", b.name)
                b.proc.kill()
                b.proc.wait()
        for b in self.backends:
            b.runner.close()
        if self._own_dir:
            import shutil

            shutil.rmtree(self.runtime_dir, ignore_errors=True)
