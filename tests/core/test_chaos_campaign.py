"""A short chaos campaign over every fault type of issue 14, on every VM kind.

The built-in default campaign, shortened (≤ 2 minutes of injections and VM
starts): the dvmm core (KVM + SeaBIOS) with the blk-write and display
workloads, the core with its blk backend under the docker runner (the
session's private dockerd), and QEMU (TCG) + the Debian guest with the
blkverify (qcow2) and net-stream workloads.  Every fault type is injected
at least once; the invariants must hold after every injection, each
phase's final checks (images, ``qemu-img check``) must pass, the report's
files must say so, and ``dvmm chaos replay --schedule-only`` must rebuild
the same schedule from the report.  A second, tiny campaign with an
impossible recovery bound shows that a broken invariant is reported as
``failed`` (the checks can fail).  VMs are always stopped by pid (the
campaign's context managers).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from corevm import dvmm_argv
from dvmm_core.chaos import campaign, report
from dvmm_core.chaos.scenario import DEFAULT, FAULTS, Campaign, Scenario
from dvmm_testing.dockerd import docker_host, docker_images  # noqa: F401 - fixtures

pytestmark = pytest.mark.core

GAP = (0.4, 0.7)


def short(c: Campaign) -> Campaign:
    """Each phase just long enough for its fault types once."""
    return Campaign(c.name, 3, tuple(
        replace(p, seed=3, min_gap=GAP[0], max_gap=GAP[1],
                duration=round(GAP[1] * sum(1 for w in p.faults.values() if w > 0) + 0.1, 3))
        for p in c.phases))


@pytest.mark.usefixtures("docker_host")
def test_short_campaign_every_fault_type_invariants_hold(tmp_path: Path) -> None:
    scenario = short(DEFAULT)
    assert scenario.duration <= 60
    result = campaign.run(scenario, tmp_path / "work", print)
    data, no_png = report.write(result, tmp_path / "report")
    injections = data["injections"]
    assert {i["fault"] for i in injections} == set(FAULTS), injections
    failed = [i for i in injections if i["outcome"] == "failed"]
    assert not failed, json.dumps(failed, indent=1)
    assert data["ok"] and all(data["final"].values()), data["final"]
    assert {k.split(":")[1] for k in data["final"]} >= {"image_writes", "qcow2_check",
                                                        "image_pattern"}
    surfacing = {name for name, f in FAULTS.items() if f.surfaces}
    assert all(i["outcome"] == "recovered" for i in injections if i["fault"] not in surfacing)
    assert all(all(i["invariants"].values()) for i in injections)
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert all(f"| {name} |" in summary for name in FAULTS)
    assert (tmp_path / "report" / "timeline.png").exists() or no_png
    replay = subprocess.run(dvmm_argv("chaos", "replay", "--schedule-only",
                                      str(tmp_path / "report" / "report.json")),
                            capture_output=True, text=True)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert f"same schedule: {len(injections)} injections" in replay.stdout


def test_a_broken_invariant_is_a_failed_injection(tmp_path: Path) -> None:
    phase = Scenario(seed=5, duration=3, recovery_bound_ms=0.001, faults={"sigkill": 1.0})
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
