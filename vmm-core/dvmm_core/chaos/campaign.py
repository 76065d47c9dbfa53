"""Running a campaign: each phase's schedule against its VM, the invariants after each fault.

Owns the loop (wait for the planned time, inject, wait for recovery,
check) and the verdict of each injection.  Recovery is the first guest
request the fault's target completed after the fault was lifted (its
``completions`` counter moves: the disk's used index, the net stream's
verified records, the display's frames) — and, for the faults that lose
the backend's connection, after the frontend restored the link
(``device-restored``).  Invariants, after every injection:

* ``vm_alive`` — the frontend process (core or QEMU) runs;
* ``oracle`` — the workloads report no acknowledged data altered or lost,
  still run, and the target's own oracle holds (display: a VNC capture
  equals the framebuffer in guest RAM);
* ``errors_allowed`` — a guest I/O error appeared only on the target of a
  fault whose model lets it surface (EIO, ENOSPC), at most as many as armed;
* ``recovery_bound`` — recovered within the phase's bound;
* ``rss_bounded`` — the frontend's and every backend's RSS under the bound.

Outcome: ``failed`` if any invariant broke, else ``surfaced`` if the guest
saw the error, else ``recovered``.  At the end of each phase, once its VM
stopped, the VM's final checks run (images intact, ``qemu-img check``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvmm_shared.control import ControlError

from .faults import inject
from .scenario import FAULTS, Campaign, Scenario
from .schedule import Planned, for_campaign
from .vmbase import ChaosVmKind, View, VmError

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
    scenario: Campaign
    injections: list[Injection]
    final: dict[str, bool]
    wall_s: float
    stopped_early: str | None = None
    vm_restarts: list[str] = field(default_factory=list)


def _recover(vm: ChaosVmKind, target: str, lifted: float, wants_restore: bool,
             early: list[dict[str, Any]]) -> float | None:
    """Seconds from ``lifted`` to ``target``'s first completion after it (None:
    timed out).  ``early``: events the injector already took from the stream."""
    wall_lifted = time.time() - (time.monotonic() - lifted)
    base = vm.completions(target)
    restored = not wants_restore
    changed: float | None = None
    deadline = lifted + RECOVERY_TIMEOUT
    pending = list(early)
    while time.monotonic() < deadline:
        for ev in [*pending, *vm.poll_events()]:
            if ev.get("name") != target:
                continue
            if ev.get("event") == "backend-exited":
                base, changed = vm.completions(target), None  # a dying backend's work
            if ev.get("event") == "device-restored" and float(ev.get("ts", 0)) >= wall_lifted:
                restored = True
        pending = []
        if changed is None and vm.completions(target) != base:
            changed = time.monotonic()
        if changed is not None and restored:
            return changed - lifted
        vm.check()
        time.sleep(0.0005 if changed is None else 0.005)
    return None


def _judge(inj: Injection, sc: Scenario, vm: ChaosVmKind, before: View,
           recovered: float | None) -> None:
    p = inj.planned
    after = vm.view()
    allowed = FAULTS[p.fault].surfaces
    new = {t: n - before.errors.get(t, 0) for t, n in after.errors.items()}
    mine, others = new.get(p.target, 0), sum(n for t, n in new.items() if t != p.target)
    broken = vm.oracle(p.target) if recovered is not None else None
    rss = vm.rss_mb()
    inj.recovery_ms = None if recovered is None else round(recovered * 1000, 1)
    inj.invariants = {
        "vm_alive": vm.alive(),
        "oracle": after.mismatches == before.mismatches and after.stopped is None
        and broken is None,
        "errors_allowed": others == 0 and (mine == 0 or (allowed and mine <= int(
            p.arg.get("count", 1)))),
        "recovery_bound": recovered is not None and recovered * 1000 <= sc.recovery_bound_ms,
        "rss_bounded": bool(rss) and max(rss.values()) <= sc.rss_bound_mb,
    }
    if not all(inj.invariants.values()):
        inj.outcome = "failed"
    else:
        inj.outcome = "surfaced" if mine else "recovered"
    inj.note = " ".join(filter(None, [inj.note, broken or "", f"rss {rss}"]))


def _await_report(vm: ChaosVmKind, target: str, before: View) -> None:
    """The guest prints its error line after the failed completion, and the
    first completion after the fault may be that one: give the line a moment
    (bounded), so it counts for this injection, not the next."""
    deadline = time.monotonic() + SURFACE_WAIT
    while vm.view().errors.get(target, 0) == before.errors.get(target, 0) \
            and time.monotonic() < deadline:
        time.sleep(0.005)


def run_one(vm: ChaosVmKind, sc: Scenario, p: Planned, t0: float) -> Injection:
    inj = Injection(p, started=time.monotonic() - t0)
    before = vm.view()
    vm.poll_events()
    try:
        applied = inject(vm, p)
        inj.note = applied.note
        recovered = _recover(vm, p.target, applied.lifted, FAULTS[p.fault].restores,
                             applied.events)
        if FAULTS[p.fault].surfaces:
            _await_report(vm, p.target, before)
    except (VmError, ControlError) as exc:
        inj.note, recovered = str(exc).splitlines()[0], None
    if recovered is None and vm.alive() and (diagnose := getattr(vm, "diagnose", None)):
        inj.note = " ".join(filter(None, [inj.note, f"[{diagnose(p.target)}]"]))
    _judge(inj, sc, vm, before, recovered)
    return inj


def make_vm(sc: Scenario, work: Path) -> ChaosVmKind:
    """The VM of a phase (not started)."""
    if sc.vm == "qemu":
        from .vm_qemu import QemuChaosVm

        return QemuChaosVm(work, sc.seed, set(sc.workloads))
    from .vm import ChaosVm

    blk = next(w for w in sc.workloads if w in ("blk", "blk-write"))
    return ChaosVm(work, sc.seed, blk, display="display" in sc.workloads, runner=sc.runner)


def _one_vm(sc: Scenario, work: Path, pending: list[Planned], start: float,
            progress: Callable[[str], None]) -> tuple[list[Injection], dict[str, bool],
                                                       str | None]:
    """Run ``pending`` on one fresh VM until the end or an injection it does not
    recover from; the injections run, the VM's final checks, why it ended early."""
    out: list[Injection] = []
    broken = None
    work.mkdir(parents=True, exist_ok=True)
    vm = make_vm(sc, work)
    with vm:
        progress(f"{sc.name}: {sc.vm} VM up after {time.monotonic() - start:.1f} s; "
                 f"{len(pending)} injections to go")
        first = {t: vm.completions(t) for t in vm.targets()}
        t0 = time.monotonic() - (pending[0].time - sc.min_gap)  # keep the planned spacing
        for p in pending:
            while (left := t0 + p.time - time.monotonic()) > 0:
                vm.check()
                time.sleep(min(left, 0.05))
            inj = run_one(vm, sc, p, start)
            out.append(inj)
            progress(f"#{p.index} t={p.time:.1f}s {p.fault} {p.target} {p.arg or ''} -> "
                     f"{inj.outcome} ({inj.recovery_ms} ms)")
            if not vm.alive() or inj.recovery_ms is None:
                broken = f"injection {p.index} ({p.fault} {p.target}) not recovered: " \
                         f"{inj.note or inj.outcome}"
                break
        view = vm.view()
        final = {"vm_alive": vm.alive() or broken is not None,
                 "oracle": view.mismatches == 0 and view.stopped is None,
                 # every device served the guest during this VM's life
                 "guest_progress": all(vm.completions(t) != n for t, n in first.items())}
    final.update(vm.final())  # the VM has stopped: its images are final
    return out, final, broken


def _phase(sc: Scenario, work: Path, pending: list[Planned], start: float,
           progress: Callable[[str], None]) -> tuple[list[Injection], dict[str, bool],
                                                      list[str], str | None]:
    """One phase; a fresh VM continues the schedule after one that broke."""
    injections: list[Injection] = []
    final: dict[str, bool] = {}
    restarts: list[str] = []
    while pending:
        if len(restarts) >= MAX_VMS:
            return injections, final, restarts, \
                f"{MAX_VMS} VMs broken; {len(pending)} injections not run"
        done, fin, broken = _one_vm(sc, work / f"vm{len(restarts) + 1}", pending, start,
                                    progress)
        injections += done
        final = {k: final.get(k, True) and v for k, v in fin.items()}
        pending = pending[len(done):]
        if broken:
            restarts.append(broken)
            progress(f"{broken}; a new VM continues the schedule")
    return injections, final, restarts, None


def run(c: Campaign, work: Path, progress: Callable[[str], None]) -> Result:
    """The whole campaign in ``work`` (each VM's files in ``work/PHASE/vmN``).

    An injection the VM does not recover from is recorded as failed, and a
    fresh VM continues the schedule (at most :data:`MAX_VMS` per phase), so
    one broken invariant does not hide what the rest of the campaign finds."""
    schedule = for_campaign(c)
    injections: list[Injection] = []
    final: dict[str, bool] = {}
    restarts: list[str] = []
    stopped = None
    start = time.monotonic()
    for i, sc in enumerate(c.phases):
        pending = [p for p in schedule if p.phase == i]
        if not pending:
            continue
        done, fin, rs, stop = _phase(sc, work / f"{i}-{sc.name}", pending, start, progress)
        injections += done
        final.update({f"{sc.name}:{k}": v for k, v in fin.items()})
        restarts += rs
        if stop:
            stopped = f"phase {sc.name}: {stop}"
            break
    return Result(c, injections, final, time.monotonic() - start, stopped, restarts)
