"""Carrying out one planned fault on a running :class:`~.vm.ChaosVm`.

Owns how each fault type of :data:`.scenario.FAULTS` reaches dvmm — only
through its own interfaces, the ones ``dvmm fault`` uses: process faults
(SIGKILL, SIGSTOP/SIGCONT) through the core's supervisor (``core.ctl``
``fault``), the others through the backend's command endpoint (``crash-at``
a named point, ``error`` EIO, ``delay`` for latency, ``close-socket``) —
and when the fault is *lifted*: the moment from which recovery is timed.
For a kill, a clean restart, a hang and a closed socket that is when the action ends; for a
crash at a point, the core's ``backend-exited`` event (the crash happens at
the backend's next request); for EIO, when the armed error is consumed; for
latency and a memory limit, when the delay or limit is switched off again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from .schedule import Planned
from .vm import ChaosVm, VmError

ARM_TIMEOUT = 30.0   # an armed crash or error the guest's requests never reach


@dataclass
class Applied:
    """What injecting did: when the fault was lifted (monotonic clock)."""

    lifted: float
    note: str = ""


def _sigkill(vm: ChaosVm, p: Planned) -> Applied:
    vm.core_fault("kill")
    return Applied(time.monotonic())


def _restart(vm: ChaosVm, p: Planned) -> Applied:
    vm.core_fault("restart")
    return Applied(time.monotonic())


def _hang(vm: ChaosVm, p: Planned) -> Applied:
    vm.core_fault("stop")
    try:
        time.sleep(int(p.arg["ms"]) / 1000)
    finally:
        vm.core_fault("cont")
    return Applied(time.monotonic())


def _crash_at(vm: ChaosVm, p: Planned) -> Applied:
    armed = time.time()
    vm.backend_fault(kind="crash-at", point=str(p.arg["point"]))

    def exited() -> bool:
        vm.poll_events()
        return any(e.get("event") == "backend-exited" and float(e.get("ts", 0)) >= armed
                   for e in vm.events)
    vm.wait("the armed crash", exited, ARM_TIMEOUT)
    return Applied(time.monotonic(), f"crashed at {p.arg['point']}")


def _eio(vm: ChaosVm, p: Planned) -> Applied:
    vm.backend_fault(kind="error", errno="EIO", op=str(p.arg["op"]),
                     count=int(p.arg["count"]))

    def consumed() -> bool:
        b = vm.backend()
        if b["state"] != "running" or not b["control"]:
            return False
        from dvmm_shared.control import command
        return command(b["control"], "stats", timeout=5)["faults"]["error"] is None
    vm.wait("the armed EIO to be consumed", consumed, ARM_TIMEOUT)
    return Applied(time.monotonic())


def _latency(vm: ChaosVm, p: Planned) -> Applied:
    vm.backend_fault(kind="delay", ms=int(p.arg["ms"]))
    try:
        time.sleep(int(p.arg["hold_ms"]) / 1000)
    finally:
        vm.backend_fault(kind="delay", ms=0)
    return Applied(time.monotonic())


def _close_socket(vm: ChaosVm, p: Planned) -> Applied:
    vm.backend_fault(kind="close-socket")
    return Applied(time.monotonic())


def _memlimit(vm: ChaosVm, p: Planned) -> Applied:
    """RLIMIT_AS (soft) at the backend's current size: a limit reached, not a kill.
    cgroup v2 ``memory.max`` would need the backend in its own cgroup, which the
    plain runner does not make; the hard limit stays, so the soft one can be
    raised again (prlimit(2) on another process: CAP_SYS_RESOURCE or same uid)."""
    pid = int(vm.backend()["pid"])
    proc = psutil.Process(pid)
    old = proc.rlimit(psutil.RLIMIT_AS)
    proc.rlimit(psutil.RLIMIT_AS, (proc.memory_info().vms, old[1]))
    try:
        time.sleep(int(p.arg["hold_ms"]) / 1000)
    finally:
        try:
            proc.rlimit(psutil.RLIMIT_AS, old)
            note = ""
        except psutil.NoSuchProcess:
            note = "the backend died under the limit"
    return Applied(time.monotonic(), note)


INJECT: dict[str, Callable[[ChaosVm, Planned], Applied]] = {
    "sigkill": _sigkill, "restart": _restart, "hang": _hang, "crash-at": _crash_at, "eio": _eio,
    "latency": _latency, "close-socket": _close_socket, "memlimit": _memlimit,
}


def inject(vm: ChaosVm, p: Planned) -> Applied:
    """Carry out ``p``; :class:`VmError` if the VM died or never took it."""
    try:
        action = INJECT[p.fault]
    except KeyError:
        raise VmError(f"no injector for fault type {p.fault!r}") from None
    return action(vm, p)
