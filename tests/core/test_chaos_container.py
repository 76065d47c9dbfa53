"""Container and cgroup faults (dvmm_core.chaos.faults_container) on real VMs.

The chaos core VM (``dvmm run`` + SeaBIOS + the re-reading boot program)
with its blk backend under ``--backend-runner docker`` (the session's
private dockerd, images from ``dvmm docker build``): ``docker kill`` of the
backend's container is survived (a new container, the guest's reads go on,
nothing read differs), so is ``docker pause``/``unpause`` (the same
container, no restart), and ``cgroup-memlimit`` on the container's own
cgroup.  Without docker, ``cgroup-memlimit`` moves the backend into a
fresh child cgroup and back, and removes the child; and on a process that
does allocate, the limit is reached and the kernel's OOM killer ends it.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from corevm import wait_until
from dvmm_core.chaos.faults import Applied
from dvmm_core.chaos.faults_container import (
    ARGS,
    INJECT,
    NEEDS,
    TYPES,
    CgroupError,
    MemoryCgroup,
    container_of,
)
from dvmm_core.chaos.schedule import Planned
from dvmm_core.chaos.vm import ChaosVm
from dvmm_core.runners_docker import LABEL
from dvmm_testing.dockerd import docker_host, docker_images  # noqa: F401 - fixtures


def inject(vm: ChaosVm, fault: str, index: int, **arg: int) -> Applied:
    return INJECT[fault](vm, Planned(index, 0.0, "blk0", fault, arg))


def reads_go_on(vm: ChaosVm) -> None:
    """The guest verifies another batch of reads (after the fault was lifted)."""
    before = vm.view().progress["blk0"]
    wait_until(lambda: vm.view().progress["blk0"] > before, 90,
               "the guest's reads to go on", vm.proc, lambda: vm.log.read_text()[-3000:])
    view = vm.view()
    assert view.mismatches == 0 and view.stopped is None, view
    assert view.errors["blk0"] == 0, view  # none of these faults may surface


def containers() -> list[str]:
    out = subprocess.run(["docker", "ps", "-q", "--filter", f"label={LABEL}"],
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_fault_catalogue_entries() -> None:
    assert set(INJECT) == set(ARGS) == {name for name, *_ in TYPES}
    assert set(NEEDS) == {"docker-kill", "docker-pause"}
    args = ARGS["docker-pause"](random.Random(1))
    assert 100 <= args["ms"] <= 800
    assert 300 <= ARGS["cgroup-memlimit"](random.Random(1))["hold_ms"] <= 1000


@pytest.mark.usefixtures("docker_host")
def test_docker_faults_on_the_core_blk_backend(tmp_path: Path) -> None:
    with ChaosVm(tmp_path, 5, "blk", runner="docker") as vm:
        reads_go_on(vm)
        pid = vm.backend_pid("blk0")
        assert pid is not None
        first = container_of(pid)
        assert first is not None and containers() == [first[:12]]
        for i in range(2):  # killed twice: each time a new container
            restarts = vm.backend("blk0")["restarts"]
            applied = inject(vm, "docker-kill", i)
            assert "killed container" in applied.note
            wait_until(lambda r=restarts: vm.backend("blk0")["restarts"] == r + 1, 90,
                       "a new container", vm.proc)
            reads_go_on(vm)
        pid = vm.backend_pid("blk0")
        assert pid is not None and container_of(pid) not in (None, first)
        restarts = vm.backend("blk0")["restarts"]
        applied = inject(vm, "docker-pause", 2, ms=500)
        assert "paused container" in applied.note
        reads_go_on(vm)
        assert vm.backend("blk0")["restarts"] == restarts  # paused, not restarted
        assert vm.backend_pid("blk0") == pid
        applied = inject(vm, "cgroup-memlimit", 3, hold_ms=500)
        assert "container" in applied.note and "memory limit" in applied.note, applied.note
        reads_go_on(vm)
        assert vm.alive()
        assert len(containers()) == 1
    wait_until(lambda: containers() == [], 60, "the containers to go")


def test_cgroup_memlimit_moves_the_backend_and_back(tmp_path: Path) -> None:
    with ChaosVm(tmp_path, 6, "blk") as vm:
        reads_go_on(vm)
        pid = vm.backend_pid("blk0")
        assert pid is not None
        cgroup_before = Path(f"/proc/{pid}/cgroup").read_text()
        applied = inject(vm, "cgroup-memlimit", 0, hold_ms=400)
        if "RLIMIT_AS instead" in applied.note:
            pytest.skip(f"no writable memory cgroup here: {applied.note}")
        assert "memory limit" in applied.note and "not removed" not in applied.note, \
            applied.note
        assert Path(f"/proc/{pid}/cgroup").read_text() == cgroup_before
        group = MemoryCgroup.of(pid)
        assert not (group.path / f"dvmm-chaos-{pid}-0").exists()
        reads_go_on(vm)
        assert vm.backend_pid("blk0") == pid


class OneProcess:
    """The part of the VM face the cgroup fault uses, around one plain process."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def backend_pid(self, target: str) -> int | None:
        return self.proc.pid if self.proc.poll() is None else None

    def check(self) -> None:
        pass


def test_cgroup_memlimit_is_reached_by_a_process_that_allocates() -> None:
    """A process that allocates 2 MiB every 10 ms: 1 MiB of headroom is soon
    gone, anonymous memory cannot be reclaimed without swap, the OOM killer
    ends it — the fault the campaign's supervisor then recovers from."""
    code = ("import time\nheld = []\nprint('ready', flush=True)\nwhile True:\n"
            "    held.append(bytearray(2 << 20))\n    time.sleep(0.01)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        try:
            own = MemoryCgroup.of(proc.pid)
        except CgroupError as exc:
            pytest.skip(f"no memory cgroup: {exc}")
        vm: Any = OneProcess(proc)
        applied = INJECT["cgroup-memlimit"](vm, Planned(0, 0.0, "blk0", "cgroup-memlimit",
                                                        {"hold_ms": 1000, "headroom_kib": 1024}))
        if "RLIMIT_AS instead" in applied.note:
            pytest.skip(applied.note)
        assert "OOM-killed" in applied.note, applied.note
        reached = int(applied.note.split("reached ")[1].split()[0])
        assert reached > 0, applied.note
        assert proc.wait(timeout=10) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (own.path / f"dvmm-chaos-{proc.pid}-0").exists()  # removed by the fault
