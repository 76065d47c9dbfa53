"""``dvmm chaos run|replay|list|fuzz``: fault campaigns from the command line.

Owns the options and what is printed; the campaign is :mod:`.campaign`,
the report files :mod:`.report`.  Exit status: 0 when every invariant held
(``replay``: and the schedule was the same), 1 otherwise or on a bad
argument (one line).
"""

from __future__ import annotations

import argparse
import math
import shutil
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from dvmm_shared.cli import UsageError

HELP = "fault-injection campaigns with integrity oracles (run, replay, list)"
DESCRIPTION = """\
Run a reproducible fault campaign against a VM while a workload with an
integrity oracle runs in its guest, and check the invariants after every
injection: the VM process alive, no acknowledged data altered, a guest
error only where the fault model allows it, recovery within the bound,
RSS bounded.  The same seed gives the same schedule.
"""


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Interrupted(Exception):
    """SIGTERM or SIGINT: unwind, so the campaign's VM is stopped by its pid."""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _campaign(scenario: Any, report_dir: Path) -> dict[str, Any]:
    from . import campaign, report

    # A background job of a non-interactive shell ignores SIGINT: take both.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    # The VM's files (core log, serial log, image) stay in DIR/vm when the
    # campaign failed: what the core and the backend logged is the diagnosis.
    work = report_dir / "vm"
    shutil.rmtree(work, ignore_errors=True)
    result = campaign.run(scenario, work, _say)
    data, no_png = report.write(result, report_dir)
    if data["ok"]:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"dvmm chaos: the VM's logs are kept in {work}")
    if no_png:
        print(f"dvmm chaos: {no_png}")
    print(report.summary_md(data), end="")
    print(f"report: {report_dir / 'report.json'}")
    return data


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 < value <= 24 * 3600:
        raise argparse.ArgumentTypeError(f"duration must be seconds in (0, 86400], not {text!r}")
    return value


def run_run(args: argparse.Namespace) -> int:
    from .scenario import ScenarioError, default, load

    try:
        if args.scenario:
            base = load(Path(args.scenario))
        else:
            base, left_out = default(docker=why_no_docker(), qemu=why_no_qemu())
            for why in left_out:
                _say(f"dvmm chaos: {why}")
        scenario = base.with_overrides(args.seed, args.duration)
    except ScenarioError as exc:
        raise UsageError(str(exc)) from None
    _preflight(scenario)
    try:
        return 0 if _campaign(scenario, Path(args.report))["ok"] else 1
    except Interrupted as exc:
        raise UsageError(f"interrupted by {exc}; the VM was stopped, no report") from None


def run_replay(args: argparse.Namespace) -> int:
    from . import report
    from .schedule import differences, for_campaign, from_dicts

    try:
        scenario, recorded = report.load(Path(args.report_json))
    except report.ReportError as exc:
        raise UsageError(str(exc)) from None
    planned = for_campaign(scenario)
    diffs = differences(recorded, planned)
    if diffs:  # the recorded campaign may have stopped early: compare what it ran
        diffs = differences(recorded, planned[:len(recorded)])
    if diffs:
        print("dvmm chaos replay: the schedule differs:\n" + "\n".join(diffs[:20]))
        return 1
    if args.schedule_only:
        print(f"same schedule: {len(recorded)} injections")
        return 0
    _preflight(scenario)
    out = Path(args.report) if args.report else Path(args.report_json).parent / "replay"
    try:
        data = _campaign(scenario, out)
    except Interrupted as exc:
        raise UsageError(f"interrupted by {exc}; the VM was stopped, no report") from None
    ran = from_dicts(data["injections"])
    diffs = differences(recorded, ran) if len(ran) == len(recorded) else \
        [*differences(recorded[:len(ran)], ran), f"{len(ran)} of {len(recorded)} ran"]
    print("replay: same injections as the report" if not diffs else
          "replay: injections differ:\n" + "\n".join(diffs[:20]))
    return 0 if data["ok"] and not diffs else 1


def run_list(args: argparse.Namespace) -> int:
    from .scenario import DEFAULT, FAULTS, VMS, WORKLOADS

    print("fault types (family; devices; VM kinds):")
    for f in FAULTS.values():
        where = f"[{f.family}; {'/'.join(f.devices)}; {'/'.join(f.vms)}" + \
            (f"; {f.needs} runner]" if f.needs else "]")
        print(f"  {f.name:15} {where} {'(may surface) ' if f.surfaces else ''}{f.help}")
    print("workloads:")
    for w in WORKLOADS.values():
        print(f"  {w.name:15} [{w.vm} VM, {w.target}] {w.help}")
    print("vms:")
    for name, text in VMS.items():
        print(f"  {name:15} {text}")
    print(f"default scenario: {len(DEFAULT.phases)} phases, {DEFAULT.duration:g} s of "
          "injections, every fault type:")
    for ph in DEFAULT.phases:
        print(f"  {ph.name:15} {ph.vm} VM, {ph.runner} runner, workload {ph.workload}, "
              f"{ph.duration:g} s, {ph.min_gap:g}-{ph.max_gap:g} s apart: "
              f"{', '.join(n for n, w in ph.faults.items() if w > 0)}")
    return 0


def why_no_docker() -> str | None:
    """Why the docker runner cannot run here (None: a Docker engine answers)."""
    import subprocess

    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        done = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "no Docker engine answered within 20 s (DOCKER_HOST?)"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["docker info failed"])[-1]
        return f"no Docker engine answers ({last})"
    return None


def why_no_qemu() -> str | None:
    """Why the QEMU VM kind cannot run here (None: it can)."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    if shutil.which("qemu-img") is None:
        return "qemu-img is not installed (apt-get install qemu-utils)"
    return None


def run_fuzz(args: argparse.Namespace) -> int:
    from .fuzz import command

    return command.run(args)


def _preflight(campaign: Any) -> None:
    from dvmm_core.kvm import kvm_available

    kinds = {p.vm for p in campaign.phases}
    if "core" in kinds and (why := kvm_available()) is not None:
        raise UsageError(f"the core VM needs KVM: {why}")
    if "qemu" in kinds and (why := why_no_qemu()) is not None:
        raise UsageError(f"the qemu VM: {why}")
    if any(p.runner == "docker" for p in campaign.phases) and (why := why_no_docker()):
        raise UsageError(f"the docker runner: {why}")


def add_parser(sub: Any) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("chaos", help=HELP, description=DESCRIPTION, formatter_class=formatter)
    kinds = p.add_subparsers(dest="chaos", metavar="ACTION", required=True)
    r = kinds.add_parser("run", help="run a campaign and write its report",
                         description="Run a campaign; write report.json, summary.md and "
                         "timeline.png (with matplotlib) into --report DIR.")
    r.add_argument("--scenario", metavar="FILE.toml", help="the scenario (default: built in, "
                   "every fault type)")
    r.add_argument("--seed", type=int, help="override the scenario's seed")
    r.add_argument("--duration", type=_seconds, metavar="S",
                   help="override the scenario's duration (seconds of injections)")
    r.add_argument("--report", required=True, metavar="DIR", help="where the report goes")
    r.set_defaults(func=run_run)
    rp = kinds.add_parser("replay", help="re-run a report's schedule and compare injections",
                          description="Rebuild the schedule of DIR/report.json from its "
                          "scenario and seed, check it equals the recorded injections, run "
                          "it again and compare the injection lists.")
    rp.add_argument("report_json", metavar="DIR/report.json")
    rp.add_argument("--report", metavar="DIR", help="where the new report goes "
                    "(default: DIR/replay)")
    rp.add_argument("--schedule-only", action="store_true",
                    help="only compare the schedule; run nothing")
    rp.set_defaults(func=run_replay)
    ls = kinds.add_parser("list", help="fault types, workloads and VMs",
                          description="List the fault types, workloads and VM kinds.")
    ls.set_defaults(func=run_list)
    from .fuzz import command as fuzz_command

    fz = kinds.add_parser("fuzz", help="coverage-guided hostile-frontend fuzzers (atheris)",
                          description=fuzz_command.DESCRIPTION, formatter_class=formatter)
    fuzz_command.add_arguments(fz)
    fz.set_defaults(func=run_fuzz)
