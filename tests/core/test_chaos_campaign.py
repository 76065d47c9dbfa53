"""A short chaos campaign on the dvmm core (KVM + SeaBIOS), issue 14.

Every implemented fault type is injected at least once into the blk backend
while a guest program re-reads one region and compares every read with the
first (``blk``), or writes numbered sectors and reads each back
(``blk-write``, its image checked once the VM stopped); the invariants
must hold after every injection, the report's files must say so, and
``dvmm chaos replay --schedule-only`` must rebuild the same schedule from
the report.  A second, tiny campaign with an
impossible recovery bound shows that a broken invariant is reported as
``failed`` (the checks can fail).  The VM is always stopped by pid (the
campaign's context manager).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from corevm import dvmm_argv
from dvmm_core.chaos import campaign, report
from dvmm_core.chaos.faults import INJECT
from dvmm_core.chaos.scenario import FAULTS, Campaign, Scenario

pytestmark = pytest.mark.core


@pytest.mark.parametrize("workload", ["blk", "blk-write"])
def test_short_campaign_every_fault_type_invariants_hold(tmp_path: Path, workload: str) -> None:
    phase = Scenario(workload=workload, faults=dict.fromkeys(INJECT, 1.0))
    scenario = Campaign("short", 1, (phase,)).with_overrides(seed=3, duration=24)
    result = campaign.run(scenario, tmp_path / "work", print)
    data, no_png = report.write(result, tmp_path / "report")
    injections = data["injections"]
    assert {i["fault"] for i in injections} == set(INJECT), injections
    failed = [i for i in injections if i["outcome"] == "failed"]
    assert not failed, json.dumps(failed, indent=1)
    assert data["ok"] and all(data["final"].values()), data["final"]
    assert all(i["outcome"] == "surfaced" for i in injections if i["fault"] == "eio")
    assert all(i["outcome"] == "recovered" for i in injections if i["fault"] != "eio")
    assert all(all(i["invariants"].values()) for i in injections)
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert all(f"| {name} |" in summary for name in INJECT)
    assert (tmp_path / "report" / "timeline.png").exists() or no_png
    replay = subprocess.run(dvmm_argv("chaos", "replay", "--schedule-only",
                                      str(tmp_path / "report" / "report.json")),
                            capture_output=True, text=True)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert f"same schedule: {len(injections)} injections" in replay.stdout


def test_a_broken_invariant_is_a_failed_injection(tmp_path: Path) -> None:
    phase = Scenario(seed=5, duration=3, recovery_bound_ms=0.001, faults={"sigkill": 1})
    result = campaign.run(Campaign("broken", 5, (phase,)), tmp_path / "work", print)
    assert result.injections and not report.ok(result)
    for inj in result.injections:
        assert inj.outcome == "failed"
        assert inj.invariants["recovery_bound"] is False and inj.invariants["oracle"]
        assert inj.recovery_ms is not None and inj.recovery_ms > 0


def test_chaos_list_and_bad_arguments() -> None:
    listed = subprocess.run(dvmm_argv("chaos", "list"), capture_output=True, text=True)
    assert listed.returncode == 0 and all(name in listed.stdout for name in FAULTS)
    bad = subprocess.run(dvmm_argv("chaos", "run", "--duration", "-5", "--report", "/nowhere"),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "duration must be seconds" in bad.stderr.splitlines()[-1]
    bad = subprocess.run(dvmm_argv("chaos", "run", "--scenario", "/nowhere.toml", "--report",
                                   "/nowhere"), capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "/nowhere.toml" in bad.stderr
