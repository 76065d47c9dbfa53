"""Running a campaign: the schedule against one VM, the invariants after each fault.

Owns the loop (wait for the planned time, inject, wait for recovery,
check) and the verdict of each injection.  Recovery is the first guest
request completed after the fault was lifted (``used_idx`` in the core's
in-flight region moves) — and, for the faults that lose the backend's
connection, after the core published ``device-restored``.  Invariants,
after every injection:

* ``vm_alive`` — the core process runs;
* ``oracle`` — the guest program reports no read that differs from its
  first one (no acknowledged data altered) and is still running;
* ``errors_allowed`` — a guest read error appeared only for a fault whose
  model lets it surface (EIO), and at most as many as were armed;
* ``recovery_bound`` — recovered within the scenario's bound;
* ``rss_bounded`` — the core's and the backend's RSS under the bound.

Outcome: ``failed`` if any invariant broke, else ``surfaced`` if the guest
saw the error, else ``recovered``.  At the end, once the VM stopped, the
image must pass the workload's check (:mod:`.workload`; ``final`` checks
in the report).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .faults import inject
from .scenario import FAULTS, Scenario
from .schedule import Planned, for_scenario
from .vm import ChaosVm, VmError
from .workload import GuestView, check_writes, data_digest

RECOVERY_TIMEOUT = 20.0   # no recovery this long: the injection failed, a new VM goes on
MAX_VMS = 25
SURFACE_WAIT = 2.0        # seconds for the guest's error line after a surfacing fault


@dataclass
class Injection:
    planned: Planned
    started: float = 0.0                 # seconds after the campaign's start
    outcome: str = "failed"
    recovery_ms: float | None = None
    invariants: dict[str, bool] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**self.planned.to_dict(), "started": round(self.started, 3),
                "outcome": self.outcome, "recovery_ms": self.recovery_ms,
                "invariants": self.invariants, "note": self.note}


@dataclass
class Result:
    scenario: Scenario
    injections: list[Injection]
    final: dict[str, bool]
    wall_s: float
    stopped_early: str | None = None
    vm_restarts: list[str] = field(default_factory=list)


def _recover(vm: ChaosVm, lifted: float, wants_restore: bool) -> float | None:
    """Seconds from ``lifted`` to the first completion after it (None: timed out)."""
    wall_lifted = time.time() - (time.monotonic() - lifted)
    base = vm.used()
    restored = not wants_restore
    changed: float | None = None
    deadline = lifted + RECOVERY_TIMEOUT
    while time.monotonic() < deadline:
        for ev in vm.poll_events():
            if ev.get("event") == "backend-exited":
                base, changed = vm.used(), None   # what a dying backend finished does not count
            if ev.get("event") == "device-restored" and float(ev.get("ts", 0)) >= wall_lifted:
                restored = True
        if changed is None and vm.used() != base:
            changed = time.monotonic()
        if changed is not None and restored:
            return changed - lifted
        vm.check()
        time.sleep(0.0005 if changed is None else 0.005)
    return None


def _judge(inj: Injection, sc: Scenario, vm: ChaosVm, before: GuestView,
           recovered: float | None) -> None:
    after = vm.serial.view()
    allowed = FAULTS[inj.planned.fault].surfaces
    new_errors = after.read_errors - before.read_errors
    rss = vm.rss_mb()
    inj.recovery_ms = None if recovered is None else round(recovered * 1000, 1)
    inj.invariants = {
        "vm_alive": vm.alive(),
        "oracle": after.mismatches == 0 and after.stopped is None,
        "errors_allowed": new_errors == 0 or (allowed and new_errors <= int(
            inj.planned.arg.get("count", 1))),
        "recovery_bound": recovered is not None and recovered * 1000 <= sc.recovery_bound_ms,
        "rss_bounded": bool(rss) and max(rss.values()) <= sc.rss_bound_mb,
    }
    if not all(inj.invariants.values()):
        inj.outcome = "failed"
    else:
        inj.outcome = "surfaced" if new_errors else "recovered"
    inj.note = " ".join(filter(None, [inj.note, f"rss {rss}"]))


def _await_report(vm: ChaosVm, before: GuestView) -> None:
    """The guest prints its error line after the failed completion, and the
    first completion after the fault may be that one: give the line a moment
    (bounded), so it counts for this injection, not the next."""
    deadline = time.monotonic() + SURFACE_WAIT
    while vm.serial.view().read_errors == before.read_errors and time.monotonic() < deadline:
        time.sleep(0.005)


def run_one(vm: ChaosVm, sc: Scenario, p: Planned, t0: float) -> Injection:
    inj = Injection(p, started=time.monotonic() - t0)
    before = vm.serial.view()
    vm.poll_events()
    try:
        applied = inject(vm, p)
        inj.note = applied.note
        recovered = _recover(vm, applied.lifted, FAULTS[p.fault].restores)
        if FAULTS[p.fault].surfaces:
            _await_report(vm, before)
    except VmError as exc:
        inj.note, recovered = str(exc).splitlines()[0], None
    _judge(inj, sc, vm, before, recovered)
    return inj


def _one_vm(sc: Scenario, work: Path, pending: list[Planned], start: float,
            progress: Callable[[str], None]) -> tuple[list[Injection], dict[str, bool],
                                                       str | None]:
    """Run ``pending`` on one fresh VM until the end or an injection it does not
    recover from; the injections run, the VM's final checks, why it ended early."""
    out: list[Injection] = []
    broken = None
    work.mkdir(parents=True, exist_ok=True)
    with ChaosVm(work, sc.seed, sc.workload) as vm:
        progress(f"VM up after {time.monotonic() - start:.1f} s; {len(pending)} injections "
                 "to go")
        t0 = time.monotonic() - (pending[0].time - sc.min_gap)  # keep the planned spacing
        for p in pending:
            while (left := t0 + p.time - time.monotonic()) > 0:
                vm.check()
                time.sleep(min(left, 0.05))
            inj = run_one(vm, sc, p, start)
            out.append(inj)
            progress(f"#{p.index} t={p.time:.1f}s {p.fault} {p.arg or ''} -> {inj.outcome} "
                     f"({inj.recovery_ms} ms)")
            if not vm.alive() or inj.recovery_ms is None:
                broken = f"injection {p.index} ({p.fault}) not recovered: " \
                         f"{inj.note or inj.outcome}"
                break
        view = vm.serial.view()
        final = {"vm_alive": vm.alive() or broken is not None,
                 "oracle": view.mismatches == 0 and view.stopped is None,
                 "guest_progress": view.progress > 0}
    if sc.workload == "blk-write":  # the VM has stopped: the image is final
        final["image_writes"] = check_writes(vm.disk, view.progress) is None
    else:
        final["image_unchanged"] = data_digest(vm.disk) == vm.digest
    return out, final, broken


def run(sc: Scenario, work: Path, progress: Callable[[str], None]) -> Result:
    """The whole campaign in ``work`` (each VM's files in ``work/vmN``).

    An injection the VM does not recover from is recorded as failed, and a
    fresh VM continues the schedule (at most :data:`MAX_VMS`), so one
    broken invariant does not hide what the rest of the campaign finds."""
    pending = for_scenario(sc)
    injections: list[Injection] = []
    final: dict[str, bool] = {}
    restarts: list[str] = []
    stopped = None
    start = time.monotonic()
    while pending:
        if len(restarts) >= MAX_VMS:
            stopped = f"{MAX_VMS} VMs broken; {len(pending)} injections not run"
            break
        done, fin, broken = _one_vm(sc, work / f"vm{len(restarts) + 1}", pending, start,
                                    progress)
        injections += done
        final = {k: final.get(k, True) and v for k, v in fin.items()}
        pending = pending[len(done):]
        if broken:
            restarts.append(broken)
            progress(f"{broken}; a new VM continues the schedule")
    return Result(sc, injections, final, time.monotonic() - start, stopped, restarts)
