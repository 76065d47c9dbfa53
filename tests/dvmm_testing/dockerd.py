"""A private Docker daemon for the container tests (issue 12).

No Docker engine runs on the development and CI machines; Debian's
``docker.io`` does when started by hand.  :class:`Dockerd` starts one with
its own data root, exec root, pid file and Unix socket in a fresh
directory (no iptables, no bridge: the containers run with ``--network
none``), and stops it by pid -- SIGTERM, a bounded wait, SIGKILL -- then
unmounts what it left and removes the directory, also when the test
failed.  :func:`docker_images` is the pytest fixture: a daemon with the
backend images built by ``dvmm docker build`` (its base comes from the
cached debootstrap tarball, see ``dvmm_core.runners_docker_build``).  One
daemon serves the whole test session (every module that asks for the
fixture), and is stopped when the session's process exits; it also gets
``PR_SET_PDEATHSIG``, so a killed test run does not leave it behind.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dvmm_shared.procs import die_with_parent

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


class Dockerd:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.sock = base / "docker.sock"
        self.log = base / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host}

    def start(self) -> Dockerd:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["dockerd", "--iptables=false", "--ip-masq=false", "--bridge=none",
                 "--storage-driver=overlay2", "--data-root", str(self.base / "data"),
                 "--exec-root", str(self.base / "exec"), "-H", self.host,
                 "--pidfile", str(self.base / "dockerd.pid")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(signal.SIGTERM))
        deadline = time.monotonic() + START_TIMEOUT
        while subprocess.run(["docker", "version"], env=self.env(), capture_output=True,
                             check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dockerd did not come up:\n{self.tail()}")
            time.sleep(0.2)
        return self

    def tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Whatever the daemon left mounted (overlays, the exec root's netns files).
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(self.base))]
        for mnt in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def docker_unavailable() -> str | None:
    for tool in ("dockerd", "docker", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (setup.sh installs docker.io and debootstrap)"
    if os.geteuid() != 0:
        return "a private dockerd needs root"
    return None


_shared: list[Dockerd] = []


def shared_daemon() -> Dockerd:
    """The session's daemon with the images built, started on first use."""
    if _shared:
        return _shared[0]
    reason = docker_unavailable()
    if reason is not None:
        pytest.fail(reason)
    daemon = Dockerd(Path(tempfile.mkdtemp(prefix="dvmm-dockerd-")))
    atexit.register(daemon.stop)  # also when a test failed or the run was interrupted
    daemon.start()
    _shared.append(daemon)
    build = subprocess.run([sys.executable, "-m", "dvmm_core.cli", "docker", "build"],
                           env=daemon.env(), capture_output=True, text=True, check=False)
    assert build.returncode == 0, f"dvmm docker build failed:\n{build.stderr[-3000:]}"
    return daemon


@pytest.fixture(scope="module")
def docker_images() -> Iterator[Dockerd]:
    """A private daemon with ``dvmm-blk``, ``dvmm-net`` and ``dvmm-display`` built."""
    daemon = shared_daemon()
    yield daemon
    # No container may outlive the module that started it.
    left = subprocess.run(["docker", "ps", "-aq"], env=daemon.env(), capture_output=True,
                          text=True, check=False).stdout.split()
    if left:
        subprocess.run(["docker", "rm", "-f", *left], env=daemon.env(), capture_output=True,
                       check=False)


@pytest.fixture
def docker_host(docker_images: Dockerd, monkeypatch: pytest.MonkeyPatch) -> Iterator[Dockerd]:
    """:func:`docker_images` with ``DOCKER_HOST`` pointing at it for the test (the
    core's docker runner and the test's own ``docker`` commands)."""
    monkeypatch.setenv("DOCKER_HOST", docker_images.host)
    yield docker_images
