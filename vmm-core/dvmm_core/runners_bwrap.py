"""The bubblewrap runner: each backend in its own unprivileged sandbox.

Owns the ``bwrap`` command line of a backend and the handle on the
sandboxed process.  The sandbox has new user, pid, network, IPC, UTS (and,
where the kernel allows, cgroup) namespaces; ``--cap-drop ALL``; a new
session (no controlling terminal to type into); read-only system
directories (``/usr`` and the merged-/usr links); the interpreter, the
virtual environment and the backend's own source directories read-only; a
private ``/proc``, ``/dev`` and ``/tmp``; and, writable, only the
backend's private socket directory.  No home directory, no other host
file: the image and the TAP arrive as inherited fds (bwrap passes fds
without ``FD_CLOEXEC`` through to the sandboxed program).

Process tree: the core -> ``bwrap`` (monitor; ``--die-with-parent`` ties
the sandbox to it) -> bwrap's init, pid 1 of the new pid namespace ->
the backend, pid 2.  The backend is deliberately *not* pid 1
(``--as-pid-1``): the kernel ignores signals a namespace's init sends
itself, and the fault hooks and crash points end a backend with
``kill(getpid(), SIGKILL)``.  ``--info-fd`` tells the host pid of bwrap's
init; the backend is its only child, found through psutil.  bwrap exits
with ``128 + n`` when the backend dies of signal n (see
:func:`.runners.signal_status`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .runners import Child, Preexec, Runner, RunnerError, RunnerKind, popen, signal_status

if TYPE_CHECKING:
    import subprocess

BWRAP = "bwrap"
#: How long bwrap may take to start the backend inside its sandbox.
START_TIMEOUT = 10.0
SYSTEM_LINKS = (("usr/lib", "/lib"), ("usr/lib64", "/lib64"), ("usr/bin", "/bin"),
                ("usr/sbin", "/sbin"))


class BwrapRunner(Runner):
    kind = RunnerKind.BWRAP
    by_fd = True

    def __init__(self, fds: Mapping[str, Sequence[int]] | None = None) -> None:
        super().__init__(fds)
        self.bwrap = shutil.which(BWRAP)
        if self.bwrap is None:
            raise RunnerError("--backend-runner bwrap needs bubblewrap (apt-get install "
                              "bubblewrap)")

    def prepare(self, runtime_dir: str, name: str) -> tuple[str, str]:
        return self._private_dir(runtime_dir, name)

    def sandbox_args(self, info_fd: int) -> list[str]:
        assert self.bwrap is not None
        args = [self.bwrap, "--unshare-user", "--unshare-pid", "--unshare-net",
                "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                "--ro-bind", "/usr", "/usr"]
        for target, link in SYSTEM_LINKS:
            if os.path.islink(link):
                args += ["--symlink", target, link]
            elif os.path.isdir(link):
                args += ["--ro-bind", link, link]
        args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
                 "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        # After the /tmp tmpfs (bwrap mounts in order): a checkout or venv under
        # /tmp must stay visible, e.g. a CI clone in /tmp/ci.
        for path in read_only_paths():
            args += ["--ro-bind", path, path]
        args += ["--bind", self.workdir, self.workdir, "--chdir", "/",
                 "--info-fd", str(info_fd), "--"]
        return args

    def launch(self, argv: list[str], pass_fds: tuple[int, ...], preexec: Preexec) -> Child:
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            proc = popen([*self.sandbox_args(w), *argv], (*pass_fds, w), preexec)
        finally:
            os.close(w)
        try:
            init_pid = _read_info(r, proc)
        finally:
            os.close(r)
        return SandboxedChild(proc, _only_child(init_pid, proc))


def read_only_paths() -> list[str]:
    """The interpreter, the venv and the dvmm packages' source directories
    (outside /usr, which is bound anyway), without duplicates."""
    import dvmm_shared

    paths = [sys.base_prefix, sys.prefix, os.path.dirname(os.path.abspath(sys.executable))]
    here = os.path.dirname(os.path.dirname(os.path.abspath(dvmm_shared.__file__)))
    backends = os.path.join(os.path.dirname(here), "backends")
    paths += [here, backends if os.path.isdir(backends) else here]
    out: list[str] = []
    for p in sorted({os.path.realpath(p) for p in paths}):
        if p.startswith("/usr/") or p == "/usr" or any(p.startswith(q + "/") for q in out):
            continue
        out.append(p)
    return out


def _read_info(fd: int, proc: subprocess.Popen[bytes]) -> int:
    data = b""
    while True:
        chunk = os.read(fd, 4096)  # EOF once bwrap exec'd or failed (the fd is CLOEXEC)
        if not chunk:
            break
        data += chunk
        try:
            info = json.loads(data)
        except ValueError:
            continue
        if isinstance(info, dict) and isinstance(info.get("child-pid"), int):
            return int(info["child-pid"])
    rc = proc.wait()
    raise RunnerError(f"bwrap exited with status {rc} before starting the backend "
                      "(see its message above)")


def _only_child(init_pid: int, proc: subprocess.Popen[bytes]) -> int:
    """The backend: the one child of bwrap's init (pid 2 inside)."""
    import psutil

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            children = psutil.Process(init_pid).children()
        except psutil.Error:
            children = []
        if children:
            return int(children[0].pid)
        if proc.poll() is not None:
            raise RunnerError(f"the sandboxed backend exited with status {proc.returncode} "
                              "at once (see its log above)")
        time.sleep(0.002)
    proc.kill()
    raise RunnerError(f"bwrap did not start the backend within {START_TIMEOUT:.0f} s")


class SandboxedChild:
    """A backend behind a wrapper process that reports its exit: watched
    through the wrapper, signalled by its own pid."""

    def __init__(self, wrapper: subprocess.Popen[bytes], pid: int) -> None:
        self.wrapper = wrapper
        self.pid = pid

    @property
    def returncode(self) -> int | None:
        rc = self.wrapper.returncode
        return None if rc is None else signal_status(rc)

    def poll(self) -> int | None:
        self.wrapper.poll()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        return signal_status(self.wrapper.wait(timeout))

    def send_signal(self, sig: int) -> None:
        if self.wrapper.poll() is None:  # the backend (pid) is not reaped before bwrap exits
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)
        self.wrapper.kill()  # and the sandbox with it (--die-with-parent)
