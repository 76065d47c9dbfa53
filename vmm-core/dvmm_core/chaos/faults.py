"""Carrying out one planned fault on a running VM (:class:`.vmbase.ChaosVmKind`).

Owns how each fault type of :data:`.scenario.FAULTS` reaches dvmm — only
through its own interfaces, the ones ``dvmm fault`` uses: process faults
(SIGKILL, SIGSTOP/SIGCONT) through the core's supervisor (``core.ctl``
``fault``), the others through the backend's command endpoint (``crash-at``
a named point, ``error`` EIO, ``delay`` for latency, ``close-socket``) —
and when the fault is *lifted*: the moment from which recovery is timed.
For a kill, a clean restart and a hang that is when the action ends; for a
closed socket, when it is asked for (the link may be back before the
answer); for a crash at a point, the core's ``backend-exited`` event (the
crash happens at the backend's next request); for EIO, when the armed error
is consumed; for latency and a memory limit, when the delay or limit is
switched off again.
The other families — block engine and channel (:mod:`.faults_io`), network
(:mod:`.faults_net`), container and cgroup (:mod:`.faults_container`) —
follow the same rule; :func:`injectors` gathers them all.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import psutil
from dvmm_shared.control import ControlError

from .schedule import Planned
from .vmbase import ChaosVmKind, VmError, poll_until

FAMILIES = ("faults_io", "faults_net", "faults_container")

ARM_TIMEOUT = 30.0   # an armed crash or error the guest's requests never reach


@dataclass
class Applied:
    """What injecting did: when the fault was lifted (monotonic clock)."""

    lifted: float
    note: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)  # seen while injecting


def _sigkill(vm: ChaosVmKind, p: Planned) -> Applied:
    lifted = time.monotonic()  # before: the link may be restored before the reply arrives
    vm.core_fault(p.target, "kill")
    return Applied(lifted)


def _restart(vm: ChaosVmKind, p: Planned) -> Applied:
    lifted = time.monotonic()
    vm.core_fault(p.target, "restart")
    return Applied(lifted)


def _hang(vm: ChaosVmKind, p: Planned) -> Applied:
    pid = vm.backend_pid(p.target)
    vm.core_fault(p.target, "stop")
    try:
        time.sleep(int(p.arg["ms"]) / 1000)
    finally:
        try:
            vm.core_fault(p.target, "cont")
        except (ControlError, VmError):
            # The frontend died meanwhile: a stopped backend would not even act
            # on its parent-death signal (SIGTERM waits while it is stopped).
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            raise
    return Applied(time.monotonic())


def _crash_at(vm: ChaosVmKind, p: Planned) -> Applied:
    armed = time.time()
    vm.backend_fault(p.target, kind="crash-at", point=str(p.arg["point"]))

    def exited() -> bool:
        return any(e.get("event") == "backend-exited" and e.get("name") == p.target
                   and float(e.get("ts", 0)) >= armed for e in seen)
    seen: list[dict[str, Any]] = []

    def exited_now() -> bool:
        seen.extend(vm.poll_events())
        return exited()
    _wait(vm, "the armed crash", exited_now)
    return Applied(time.monotonic(), f"crashed at {p.arg['point']}", seen)


def _eio(vm: ChaosVmKind, p: Planned) -> Applied:
    vm.backend_fault(p.target, kind="error", errno="EIO", op=str(p.arg["op"]),
                     count=int(p.arg["count"]))

    def consumed() -> bool:
        return vm.backend_stats(p.target)["faults"]["error"] is None
    _wait(vm, "the armed EIO to be consumed", consumed)
    return Applied(time.monotonic())


def _latency(vm: ChaosVmKind, p: Planned) -> Applied:
    vm.backend_fault(p.target, kind="delay", ms=int(p.arg["ms"]))
    try:
        time.sleep(int(p.arg["hold_ms"]) / 1000)
    finally:
        vm.backend_fault(p.target, kind="delay", ms=0)
    return Applied(time.monotonic())


def _close_socket(vm: ChaosVmKind, p: Planned) -> Applied:
    # Lifted when asked, not when the command returns: the backend drops the
    # session on its loop while its control thread replies, and the core may
    # reconnect (a few ms) before the reply arrives -- a ``device-restored``
    # event older than the lifted moment would not count, and a recovered
    # link would be judged lost (as corrupt-msg, faults_io).
    lifted = time.monotonic()
    vm.backend_fault(p.target, kind="close-socket")
    return Applied(lifted)


def _memlimit(vm: ChaosVmKind, p: Planned) -> Applied:
    """RLIMIT_AS (soft) at the backend's current size: a limit reached, not a kill.
    cgroup v2 ``memory.max`` would need the backend in its own cgroup, which the
    plain runner does not make; the hard limit stays, so the soft one can be
    raised again (prlimit(2) on another process: CAP_SYS_RESOURCE or same uid)."""
    pid = vm.backend_pid(p.target)
    if pid is None:
        raise VmError(f"{p.target} is not running")
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


def _wait(vm: ChaosVmKind, what: str, ready: Callable[[], bool],
          timeout: float = ARM_TIMEOUT) -> None:
    poll_until(what, ready, vm.check, timeout)


Injector = Callable[[ChaosVmKind, Planned], Applied]
INJECT: dict[str, Injector] = {
    "sigkill": _sigkill, "restart": _restart, "hang": _hang, "crash-at": _crash_at, "eio": _eio,
    "latency": _latency, "close-socket": _close_socket, "memlimit": _memlimit,
}


@cache
def injectors() -> dict[str, Injector]:
    """Every family's injectors (a family not built yet is left out)."""
    out = dict(INJECT)
    for name in FAMILIES:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{name}":
                raise
            continue
        out.update(module.INJECT)
    return out


def inject(vm: ChaosVmKind, p: Planned) -> Applied:
    """Carry out ``p``; :class:`VmError` if the VM died or never took it."""
    try:
        action = injectors()[p.fault]
    except KeyError:
        raise VmError(f"no injector for fault type {p.fault!r}") from None
    return action(vm, p)
