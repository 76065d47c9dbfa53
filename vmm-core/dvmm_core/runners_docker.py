"""The Docker runner: each backend in its own container.

Owns the ``docker run`` command line of a backend and the handle on the
containerised process.  Every container runs with ``--network none
--read-only --cap-drop ALL --security-opt no-new-privileges``, a private
``/tmp`` (tmpfs), a pid limit, and one bind mount: the backend's private
socket directory ``RUNTIME/NAME/``, at the same path inside so the socket
and control endpoint names mean the same on both sides.  The image is the
device model's (``dvmm-blk``, ``dvmm-net``; ``dvmm docker build`` makes
them, see :mod:`.docker_build`).

A container's process is not the core's child, so it cannot inherit fds:
the runner serves them over ``RUNTIME/NAME/fds.sock`` with SCM_RIGHTS
(:class:`dvmm_shared.sandbox_fds.FdOffer`) and the backend fetches them
with ``--fds-from``.  That connection is also the container's lifeline: if
the core dies, the backend sees it close and stops, and ``--rm`` removes
the container (the ``docker run`` client dies with the core, the container
would not).

The supervisor watches the attached ``docker run`` client, which exits
with the container's status (``128 + n`` for signal n, as ``docker kill``
gives).  The container's init is Docker's ``--init`` (tini), not the
backend: a namespace's pid 1 cannot be killed by signals it sends itself,
and the fault hooks and crash points end a backend with ``kill(getpid(),
SIGKILL)``; nor would it die of a SIGTERM that arrives before its handler
is installed.  The backend is the init's only child; its host pid comes
from ``docker inspect`` (the init's) and psutil, and signals go to it
directly, as under bubblewrap.  Every start
is a new container with a new name (``dvmm-<runtime>-<backend>-<n>``), so
a restart never waits for ``--rm`` to remove the dead one.  No warm
standby: the activation pipe cannot reach a container.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .runners import Child, Preexec, Runner, RunnerError, RunnerKind, popen
from .runners_bwrap import SandboxedChild, _only_child

if TYPE_CHECKING:
    from dvmm_shared.sandbox_fds import FdOffer

DOCKER = "docker"
START_TIMEOUT = 60.0
PIDS_LIMIT = 128
IMAGE_PREFIX = "dvmm-"
LABEL = "dvmm.backend"


def image_for(module: str) -> str:
    """``dvmm_blk`` -> ``dvmm-blk:latest`` (one image per device model)."""
    return f"{IMAGE_PREFIX}{module.removeprefix('dvmm_')}:latest"


def container_prefix(runtime_dir: str, name: str) -> str:
    return f"{os.path.basename(runtime_dir.rstrip('/'))}-{name}"


class DockerRunner(Runner):
    kind = RunnerKind.DOCKER
    by_fd = True
    standby = False

    def __init__(self, fds: Mapping[str, Sequence[int]] | None = None,
                 image: str | None = None) -> None:
        super().__init__(fds)
        self.image = image
        self.docker = shutil.which(DOCKER)
        if self.docker is None:
            raise RunnerError("--backend-runner docker needs the docker command "
                              "(apt-get install docker.io)")
        self.offer: FdOffer | None = None
        self.prefix = ""
        self.starts = 0

    def prepare(self, runtime_dir: str, name: str) -> tuple[str, str]:
        paths = self._private_dir(runtime_dir, name)
        self.prefix = container_prefix(runtime_dir, name)
        return paths

    def program(self, module: str) -> list[str]:
        self.image = self.image or image_for(module)
        return ["python3", "-m", module]

    def resource_args(self) -> tuple[list[str], tuple[int, ...]]:
        if self.offer is None:
            from dvmm_shared.sandbox_fds import FdOffer

            self.offer = FdOffer(os.path.join(self.workdir, "fds.sock"), self.fds)
        return ["--fds-from", self.offer.path], ()

    def run_args(self, container: str) -> list[str]:
        assert self.docker is not None and self.image is not None
        return [self.docker, "run", "--rm", "--name", container, "--label",
                f"{LABEL}={self.prefix}", "--network", "none", "--read-only",
                "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "--tmpfs", "/tmp", "--pids-limit", str(PIDS_LIMIT), "--init",
                "--volume", f"{self.workdir}:{self.workdir}"]

    def launch(self, argv: list[str], pass_fds: tuple[int, ...], preexec: Preexec) -> Child:
        self.starts += 1
        container = f"{self.prefix}-{self.starts}"
        entry, *rest = argv
        proc = popen([*self.run_args(container), "--entrypoint", entry, self.image or "",
                      *rest], (), preexec)
        return SandboxedChild(proc, _only_child(self._host_pid(container, proc), proc))

    def _host_pid(self, container: str, proc: subprocess.Popen[bytes]) -> int:
        """The container's init as the host sees it, once it runs."""
        assert self.docker is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            out = subprocess.run([self.docker, "inspect", "-f", "{{.State.Pid}}", container],
                                 capture_output=True, text=True, check=False)
            pid = int(out.stdout.strip() or 0) if out.returncode == 0 else 0
            if pid > 0:
                return pid
            if proc.poll() is not None:
                raise RunnerError(f"docker run exited with status {proc.returncode} before "
                                  "the container ran (see its message above)")
            time.sleep(0.02)
        proc.kill()
        raise RunnerError(f"container {container} did not start within {START_TIMEOUT:.0f} s")

    def close(self) -> None:
        if self.offer is not None:
            self.offer.close()  # the lifelines close: any container left stops itself
            self.offer = None
        super().close()


def docker_kill(container: str, sig: int = signal.SIGKILL) -> None:
    """``docker kill -s SIG container`` (what a test or an operator does)."""
    subprocess.run([DOCKER, "kill", "-s", signal.Signals(sig).name, container],
                   check=True, capture_output=True)
