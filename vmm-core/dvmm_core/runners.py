"""How the supervisor starts a backend: as a plain process, in a bubblewrap
sandbox, or in a Docker container (issue 12).

Owns the :class:`Runner` abstraction the supervisor starts every backend
through, one instance per backend:

* where the backend's sockets live (:meth:`Runner.prepare`): the plain
  runner keeps them in the VM's runtime directory (``RUNTIME/NAME.sock``,
  ``ipc://RUNTIME/NAME.ctl``); a sandboxed runner gives each backend a
  private directory ``RUNTIME/NAME/``, the only host directory its sandbox
  sees, so one backend cannot reach another's sockets or the core's;
* how it receives its resources: the core opens the image or the TAP
  (:mod:`.runners_resources`) and the runner hands the fds over, inherited
  (``--image-fd N``, ``--tap-fd N``: plain and bubblewrap) or over a Unix
  socket with SCM_RIGHTS (``--fds-from PATH``: Docker, whose container is
  not a child of the core);
* the command that starts it (:meth:`Runner.launch`) and the :class:`Child`
  handle the supervisor watches: ``pid`` is the backend's own (host) pid,
  so ``dvmm status``, ``dvmm fault`` and psutil see the backend and not a
  wrapper, and a status a wrapper reports as ``128 + signal`` reads as the
  signal, so restart policies decide the same way under every runner.

Everything else -- restart policy, back-off, reconnect, in-flight replay,
events -- is the supervisor's and the frontend's, and does not know which
runner started the process.  The sandboxed runners are in
:mod:`.runners_bwrap` and :mod:`.runners_docker`.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import subprocess


class RunnerKind(Enum):
    PROCESS = "process"
    BWRAP = "bwrap"
    DOCKER = "docker"

    @classmethod
    def parse(cls, text: str) -> RunnerKind:
        try:
            return cls(text)
        except ValueError:
            known = ", ".join(k.value for k in cls)
            raise ValueError(f"unknown backend runner {text!r} (known: {known})") from None


class RunnerError(Exception):
    """A backend could not be started by its runner (one line)."""


class Child(Protocol):
    """What the supervisor needs of a started backend (``subprocess.Popen``
    fits: the plain runner returns one)."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


Preexec = Callable[[], None]


class Runner:
    """The plain process runner, and the base of the sandboxed ones."""

    kind = RunnerKind.PROCESS
    #: Whether a warm standby (a twin waiting on an inherited pipe) works here.
    standby = True
    #: Whether the core opens the backend's image/TAP and hands it fds
    #: (:mod:`.runners_resources`); the plain runner leaves that to the backend.
    by_fd = False

    def __init__(self, fds: Mapping[str, Sequence[int]] | None = None) -> None:
        self.fds = {k: list(v) for k, v in (fds or {}).items()}
        self.name = ""
        self.workdir = ""

    # -- layout -----------------------------------------------------------------
    def prepare(self, runtime_dir: str, name: str) -> tuple[str, str]:
        """Create what the backend needs on the host; its socket path and
        control endpoint."""
        self.name, self.workdir = name, runtime_dir
        base = os.path.join(runtime_dir, name)
        return f"{base}.sock", f"ipc://{base}.ctl"

    def _private_dir(self, runtime_dir: str, name: str) -> tuple[str, str]:
        """A sandboxed runner's layout: ``RUNTIME/NAME/{vhost.sock,control}``."""
        self.name, self.workdir = name, os.path.join(runtime_dir, name)
        os.makedirs(self.workdir, mode=0o700, exist_ok=True)
        return (os.path.join(self.workdir, "vhost.sock"),
                f"ipc://{os.path.join(self.workdir, 'control')}")

    # -- the command ------------------------------------------------------------
    def program(self, module: str) -> list[str]:
        """The backend's interpreter and module, as this runner starts it."""
        return [sys.executable, "-m", module]

    def resource_args(self) -> tuple[list[str], tuple[int, ...]]:
        """Options naming the handed fds, and the fds to inherit."""
        args: list[str] = []
        for option, fds in self.fds.items():
            args += [f"--{option}", ",".join(map(str, fds))]
        return args, tuple(fd for fds in self.fds.values() for fd in fds)

    def launch(self, argv: list[str], pass_fds: tuple[int, ...], preexec: Preexec) -> Child:
        """Start ``argv`` (the backend's whole command line)."""
        return popen(argv, pass_fds, preexec)

    def close(self) -> None:
        """The VM stops: release what :meth:`prepare` made and the handed fds."""
        for fds in self.fds.values():
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fds = {}


def popen(argv: list[str], pass_fds: tuple[int, ...], preexec: Preexec
          ) -> subprocess.Popen[bytes]:
    import subprocess

    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=pass_fds,
                                preexec_fn=preexec)
    except OSError as exc:
        raise RunnerError(f"cannot start {argv[0]}: {exc.strerror}") from None


def signal_status(rc: int) -> int:
    """A wrapper's ``128 + n`` exit status as ``-n`` (the backend died of
    signal n), as ``subprocess`` reports a direct child's death."""
    if 128 < rc < 128 + signal.NSIG:
        return -(rc - 128)
    return rc


def make_runner(kind: RunnerKind, fds: Mapping[str, Sequence[int]] | None = None,
                image: str | None = None) -> Runner:
    """A runner of ``kind`` for one backend (``image``: Docker's, else the default)."""
    if kind is RunnerKind.BWRAP:
        from .runners_bwrap import BwrapRunner

        return BwrapRunner(fds)
    if kind is RunnerKind.DOCKER:
        from .runners_docker import DockerRunner

        return DockerRunner(fds, image=image)
    return Runner(fds)
