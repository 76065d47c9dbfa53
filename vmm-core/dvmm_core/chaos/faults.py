"""Carrying out one planned fault on a running :class:`~.vm.ChaosVm`.

Owns how each fault type of :data:`.scenario.FAULTS` reaches dvmm — only
through its own interfaces, the ones ``dvmm fault`` uses: process faults
(SIGKILL, SIGSTOP/SIGCONT) through the core's supervisor (``core.ctl``
``fault``), the others through the backend's command endpoint (``crash-at``
a named point, ``error`` EIO, ``delay`` for latency, ``close-socket``) —
and when the fault is *lifted*: the moment from which recovery is timed.
For a kill, a hang and a closed socket that is when the action ends; for a
crash at a point, the core's ``backend-exited`` event (the crash happens at
the backend's next request); for EIO, when the armed error is consumed; for
latency, when the delay is switched off again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

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


INJECT: dict[str, Callable[[ChaosVm, Planned], Applied]] = {
    "sigkill": _sigkill, "hang": _hang, "crash-at": _crash_at, "eio": _eio,
    "latency": _latency, "close-socket": _close_socket,
}


def inject(vm: ChaosVm, p: Planned) -> Applied:
    """Carry out ``p``; :class:`VmError` if the VM died or never took it."""
    try:
        action = INJECT[p.fault]
    except KeyError:
        raise VmError(f"no injector for fault type {p.fault!r}") from None
    return action(vm, p)
