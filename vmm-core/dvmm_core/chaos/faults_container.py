"""Container and cgroup faults: ``docker-kill``, ``docker-pause``, ``cgroup-memlimit``.

Owns three fault types of the catalogue's container family, injected from
outside the backend as an operator (or the kernel) would, through the
:class:`~.vmbase.ChaosVmKind` face only:

* ``docker-kill`` — ``docker kill`` of the backend's container (the backend
  runs under ``--backend-runner docker``).  The ``docker run`` client the
  supervisor watches exits with 137, the supervisor starts a new container
  (:mod:`dvmm_core.runners_docker`: every start is a new name) and the link
  reconnects: lifted when ``docker kill`` returns, recovered when the
  target completes work again.
* ``docker-pause`` — ``docker pause`` (the freezer cgroup stops every task
  of the container), ``docker unpause`` ``ms`` milliseconds later: a hang
  the backend does not see coming; lifted at the unpause.
* ``cgroup-memlimit`` — a memory limit reached, for ``hold_ms``: the
  backend's memory cgroup gets a limit :data:`HEADROOM` bytes above what it
  is charged now, then the old limit back.  Under the docker runner that is
  the container's own cgroup (what ``docker update --memory`` writes);
  otherwise the backend is moved into a fresh child of its own cgroup, made
  for the fault and removed after it.  The kernel reclaims (page cache
  first) and, if that is not enough, its OOM killer ends the backend, which
  the supervisor restarts (then the fault is noted as an OOM kill).
  cgroup v2 (``memory.max``) is used where the backend's cgroup has the
  memory controller, else the v1 memory hierarchy (``memory.limit_in_bytes``,
  same semantics for this purpose); v1 cannot move a process's existing
  charges into a new group (``memory.move_charge_at_immigrate`` is gone
  from current kernels), so in a fresh child the limit bounds what the
  backend allocates from then on.  Where neither hierarchy is writable the
  fault falls back to ``memlimit`` (RLIMIT_AS) and says so in its note.

The container of a backend is found from the backend's host pid
(``backend_pid``): its cgroup path names the container id (cgroupfs
``/docker/<id>``, systemd ``docker-<id>.scope``), so no runtime directory
or container name has to be known.  ``docker`` runs with the campaign's
environment (``DOCKER_HOST`` names the daemon the core's runner uses).
"""

from __future__ import annotations

import random
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .faults import INJECT as PROCESS_FAULTS
from .faults import Applied, Injector
from .schedule import Planned
from .vmbase import ChaosVmKind, VmError

DOCKER = "docker"
DOCKER_TIMEOUT = 30.0
START_TIMEOUT = 60.0         # a backend restarting (a new container) before a fault
CGROUP_ROOT = Path("/sys/fs/cgroup")
HEADROOM = 1 << 20           # bytes above the current charge: a limit soon reached
REMOVE_TIMEOUT = 10.0        # a child cgroup empties once its OOM-killed task is reaped
_CONTAINER_ID = re.compile(r"docker[-/]([0-9a-f]{64})")


class CgroupError(RuntimeError):
    """No writable memory cgroup for the backend (the reason, one line)."""


def docker(*args: str) -> str:
    """Run ``docker ARGS``; its stdout.  :class:`VmError` with docker's message."""
    try:
        done = subprocess.run([DOCKER, *args], capture_output=True, text=True,
                              timeout=DOCKER_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VmError(f"docker {args[0]}: {exc}") from None
    if done.returncode != 0:
        raise VmError(f"docker {' '.join(args)}: {done.stderr.strip()[-300:]}")
    return done.stdout


def _cgroup_lines(pid: int) -> list[tuple[str, str]]:
    """(controllers, path) of each hierarchy of ``/proc/PID/cgroup``."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError as exc:
        raise VmError(f"backend pid {pid}: {exc.strerror}") from None
    return [(parts[1], parts[2]) for line in text.splitlines()
            if len(parts := line.split(":", 2)) == 3]


def container_of(pid: int) -> str | None:
    """The id of the Docker container ``pid`` runs in (None: not in one)."""
    for _, path in _cgroup_lines(pid):
        if m := _CONTAINER_ID.search(path):
            return m.group(1)
    return None


def _backend(vm: ChaosVmKind, target: str) -> tuple[int, str | None]:
    """The backend's host pid and container, once it runs (it may be restarting)."""
    deadline = time.monotonic() + START_TIMEOUT
    while (pid := vm.backend_pid(target)) is None:
        vm.check()
        if time.monotonic() > deadline:
            raise VmError(f"{target} did not come back within {START_TIMEOUT:.0f} s")
        time.sleep(0.02)
    return pid, container_of(pid)


def _container(vm: ChaosVmKind, target: str) -> str:
    pid, container = _backend(vm, target)
    if container is None:
        raise VmError(f"{target} (pid {pid}) does not run in a container "
                      f"(the fault needs --backend-runner docker)")
    return container


# -- docker ------------------------------------------------------------------------
def _docker_kill(vm: ChaosVmKind, p: Planned) -> Applied:
    container = _container(vm, p.target)
    docker("kill", container)
    return Applied(time.monotonic(), f"killed container {container[:12]}")


def _docker_pause(vm: ChaosVmKind, p: Planned) -> Applied:
    container = _container(vm, p.target)
    docker("pause", container)
    try:
        time.sleep(int(p.arg["ms"]) / 1000)  # the hang itself
    finally:
        docker("unpause", container)
    return Applied(time.monotonic(), f"paused container {container[:12]}")


# -- memory cgroup -----------------------------------------------------------------
class MemoryCgroup:
    """One memory cgroup directory and the names its hierarchy uses."""

    def __init__(self, path: Path, v2: bool) -> None:
        self.path, self.v2 = path, v2
        self.limit_file = path / ("memory.max" if v2 else "memory.limit_in_bytes")
        self.usage_file = path / ("memory.current" if v2 else "memory.usage_in_bytes")
        self.unlimited = "max" if v2 else "-1"

    @classmethod
    def of(cls, pid: int) -> MemoryCgroup:
        """The cgroup that charges ``pid``'s memory: v2 where the memory
        controller is enabled there, else v1's memory hierarchy."""
        reasons = []
        for controllers, rel in _cgroup_lines(pid):
            if controllers == "":
                for root in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
                    path = root / rel.lstrip("/")
                    if (path / "memory.max").exists():
                        return cls(path, True)
                reasons.append("cgroup v2 has no memory controller here "
                               f"(no memory.max in {CGROUP_ROOT} or {CGROUP_ROOT}/unified)")
            elif "memory" in controllers.split(","):
                path = CGROUP_ROOT / "memory" / rel.lstrip("/")
                if (path / "memory.limit_in_bytes").exists():
                    return cls(path, False)
                reasons.append(f"no v1 memory.limit_in_bytes in {path}")
        raise CgroupError("; ".join(reasons) or f"pid {pid} is in no memory cgroup")

    def usage(self) -> int:
        return int(self.usage_file.read_text())

    def hits(self) -> int:
        """How often charges reached the limit (v1 ``memory.failcnt``, v2 the
        ``max`` line of ``memory.events``)."""
        if not self.v2:
            return int((self.path / "memory.failcnt").read_text())
        for line in (self.path / "memory.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "max":
                return int(value)
        return 0

    def limit(self) -> str:
        return self.limit_file.read_text().strip()

    def set_limit(self, value: str) -> None:
        self.limit_file.write_text(value)

    def child(self, name: str) -> MemoryCgroup:
        """A fresh child (v2: the memory controller enabled for children)."""
        if self.v2:
            (self.path / "cgroup.subtree_control").write_text("+memory")
        path = self.path / name
        path.mkdir()
        return MemoryCgroup(path, self.v2)

    def move(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> bool:
        """rmdir once the group is empty (False: still busy at the deadline)."""
        deadline = time.monotonic() + REMOVE_TIMEOUT
        while True:
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)


def _hold_limit(group: MemoryCgroup, hold: float, headroom: int) -> str:
    """Limit ``group`` to its charge + ``headroom`` bytes (at least a page)
    for ``hold`` s; the old limit back.  The note: the limit set, how often
    it was reached."""
    old, hits = group.limit(), group.hits()
    new = max(4096, -(-(group.usage() + headroom) // 4096) * 4096)
    group.set_limit(str(new))
    try:
        time.sleep(hold)  # the fault itself
    finally:
        hits = group.hits() - hits
        group.set_limit(old)
    return f"memory limit {new >> 10} KiB ({'v2' if group.v2 else 'v1'}), reached {hits} times"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cgroup_memlimit(vm: ChaosVmKind, p: Planned) -> Applied:
    pid, container = _backend(vm, p.target)
    hold = int(p.arg["hold_ms"]) / 1000
    headroom = int(p.arg.get("headroom_kib", HEADROOM >> 10)) << 10
    try:
        own = MemoryCgroup.of(pid)
    except CgroupError as exc:
        applied = PROCESS_FAULTS["memlimit"](vm, p)
        applied.note = f"RLIMIT_AS instead: {exc}"
        return applied
    if container is not None:  # the container's own cgroup, as docker update would
        note = _hold_limit(own, hold, headroom)
        lifted = time.monotonic()
        return Applied(lifted, f"container {container[:12]}: {note}"
                       + ("" if _alive(pid) else "; OOM-killed"))
    try:
        group = own.child(f"dvmm-chaos-{pid}-{p.index}")
    except OSError as exc:
        applied = PROCESS_FAULTS["memlimit"](vm, p)
        applied.note = f"RLIMIT_AS instead: cannot make a child of {own.path}: {exc.strerror}"
        return applied
    try:
        group.move(pid)
        note = _hold_limit(group, hold, headroom)
        lifted = time.monotonic()
    finally:
        if _alive(pid):
            try:
                own.move(pid)
            except OSError:
                pass  # it died meanwhile: the group empties when it is reaped
        killed = not _alive(pid)
        removed = group.remove()
    return Applied(lifted, note + ("; OOM-killed" if killed else "")
                   + ("" if removed else f"; {group.path} not removed (busy)"))


INJECT: dict[str, Injector] = {
    "docker-kill": _docker_kill, "docker-pause": _docker_pause,
    "cgroup-memlimit": _cgroup_memlimit,
}

ARGS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "docker-kill": lambda rng: {},
    "docker-pause": lambda rng: {"ms": rng.randrange(100, 801)},
    "cgroup-memlimit": lambda rng: {"hold_ms": rng.randrange(300, 1001)},
}

#: (name, surfaces: the guest may see an error, restores: the link is lost and
#: restored, help) — as :data:`.catalogue.FAULTS` lists them.
TYPES: tuple[tuple[str, bool, bool, str], ...] = (
    ("docker-kill", False, True, "docker kill the backend's container (the supervisor "
     "starts a new one)"),
    ("docker-pause", False, False, "docker pause the backend's container, unpause it "
     "100-800 ms later"),
    ("cgroup-memlimit", False, False, "the backend's memory cgroup limited to 1 MiB above "
     "its charge for 0.3-1 s (reclaim; an OOM kill is restarted)"),
)

NEEDS: dict[str, str] = {"docker-kill": "docker", "docker-pause": "docker"}
