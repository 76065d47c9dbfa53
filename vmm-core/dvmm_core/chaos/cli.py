"""``dvmm chaos run|replay|list``: fault campaigns from the command line.

Owns the options and what is printed; the campaign is :mod:`.campaign`,
the report files :mod:`.report`.  Exit status: 0 when every invariant held
(``replay``: and the schedule was the same), 1 otherwise or on a bad
argument (one line).
"""

from __future__ import annotations

import argparse
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


def run_run(args: argparse.Namespace) -> int:
    from .scenario import DEFAULT, ScenarioError, load

    try:
        base = load(Path(args.scenario)) if args.scenario else DEFAULT
        scenario = base.with_overrides(args.seed, args.duration)
    except ScenarioError as exc:
        raise UsageError(str(exc)) from None
    _preflight()
    try:
        return 0 if _campaign(scenario, Path(args.report))["ok"] else 1
    except Interrupted as exc:
        raise UsageError(f"interrupted by {exc}; the VM was stopped, no report") from None


def run_replay(args: argparse.Namespace) -> int:
    from . import report
    from .schedule import differences, for_scenario, from_dicts

    try:
        scenario, recorded = report.load(Path(args.report_json))
    except report.ReportError as exc:
        raise UsageError(str(exc)) from None
    planned = for_scenario(scenario)
    diffs = differences(recorded, planned)
    if diffs:  # the recorded campaign may have stopped early: compare what it ran
        diffs = differences(recorded, planned[:len(recorded)])
    if diffs:
        print("dvmm chaos replay: the schedule differs:\n" + "\n".join(diffs[:20]))
        return 1
    if args.schedule_only:
        print(f"same schedule: {len(recorded)} injections")
        return 0
    _preflight()
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

    print("fault types:")
    for f in FAULTS.values():
        print(f"  {f.name:13} {'(may surface) ' if f.surfaces else ''}{f.help}")
    print("workloads:")
    for name, text in WORKLOADS.items():
        print(f"  {name:13} {text}")
    print("vms:")
    for name, text in VMS.items():
        print(f"  {name:13} {text}")
    print(f"default scenario: every fault type, weight 1; {DEFAULT.duration:g} s; "
          f"{DEFAULT.min_gap:g}-{DEFAULT.max_gap:g} s between injections")
    return 0


def _preflight() -> None:
    from dvmm_core.kvm import kvm_available

    if (why := kvm_available()) is not None:
        raise UsageError(f"the core VM needs KVM: {why}")


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
    r.add_argument("--duration", type=float, metavar="S",
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
