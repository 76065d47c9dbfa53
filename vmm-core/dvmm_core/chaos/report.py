"""A campaign's report directory: ``report.json``, ``summary.md``, ``timeline.png``.

Owns the formats: ``report.json`` holds the scenario (the campaign: name,
seed, phases), the ``injections`` list (phase, planned time, target, fault,
argument, outcome, recovery_ms, invariants) and the final checks of each
phase; ``summary.md`` a table per fault type
(injections, recovered, surfaced, failed, recovery p50/p99); the timeline is
drawn with matplotlib when it is installed (an optional dependency: without
it the PNG is skipped and the reason returned).  Also reads a report back
for ``dvmm chaos replay``.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any

from .campaign import Result
from .scenario import FAULTS, Campaign, ScenarioError, from_dict
from .schedule import Planned, from_dicts

OUTCOMES = ("recovered", "surfaced", "failed")


class ReportError(ValueError):
    """A report file that cannot be read back (one line)."""


def percentile(values: list[float], p: float) -> float:
    """Nearest rank of the sorted values."""
    s = sorted(values)
    return s[max(1, math.ceil(p / 100 * len(s))) - 1]


def to_json(r: Result) -> dict[str, Any]:
    return {"version": 2, "scenario": r.scenario.to_dict(),
            "injections": [i.to_dict() for i in r.injections], "final": r.final,
            "wall_s": round(r.wall_s, 1), "stopped_early": r.stopped_early,
            "vm_restarts": r.vm_restarts,
            "ok": ok(r)}


def ok(r: Result) -> bool:
    return (r.stopped_early is None and all(r.final.values())
            and all(i.outcome != "failed" for i in r.injections))


def rows(injections: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per fault type: counts by outcome and recovery p50/p99 (ms)."""
    out = []
    for name in [f for f in FAULTS if any(i["fault"] == f for i in injections)]:
        mine = [i for i in injections if i["fault"] == name]
        times = [float(i["recovery_ms"]) for i in mine if i["recovery_ms"] is not None]
        row: dict[str, Any] = {"fault": name, "injections": len(mine)}
        row.update({o: sum(1 for i in mine if i["outcome"] == o) for o in OUTCOMES})
        row["p50_ms"] = percentile(times, 50) if times else None
        row["p99_ms"] = percentile(times, 99) if times else None
        out.append(row)
    return out


def summary_md(data: dict[str, Any]) -> str:
    sc, injections = data["scenario"], data["injections"]
    lines = [f"# dvmm chaos: scenario {sc['name']}, seed {sc['seed']}", "",
             f"{len(injections)} injections of {len({i['fault'] for i in injections})} fault "
             f"types in {data['wall_s']} s, in {len(sc['phases'])} phase(s):", ""]
    for n, ph in enumerate(sc["phases"]):
        mine = [i for i in injections if i.get("phase", 0) == n]
        lines.append(f"* **{ph['name']}** — VM {ph['vm']} ({ph['runner']} runner), workload "
                     f"{ph['workload']}: {len(mine)} injections over {ph['duration']:g} s; "
                     f"recovery bound {ph['recovery_bound_ms']:g} ms, RSS bound "
                     f"{ph['rss_bound_mb']:g} MiB.")
    lines += ["", "| fault | family | injections | recovered | surfaced | failed | p50 ms | "
              "p99 ms |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows(injections):
        p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.1f}"
        p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.1f}"
        lines.append(f"| {r['fault']} | {FAULTS[r['fault']].family} | {r['injections']} | "
                     f"{r['recovered']} | "
                     f"{r['surfaced']} | {r['failed']} | {p50} | {p99} |")
    lines += ["", "Final checks: " + ", ".join(
        f"{k} {'ok' if v else 'FAILED'}" for k, v in data["final"].items()) + "."]
    for why in data.get("vm_restarts", []):
        lines.append(f"New VM after {why}.")
    if data.get("stopped_early"):
        lines.append(f"Stopped early: {data['stopped_early']}.")
    broken = [f"#{i['index']} {i['fault']}: " + ", ".join(
        k for k, v in i["invariants"].items() if not v) for i in injections
        if i["outcome"] == "failed"]
    lines += ["", "Broken invariants: " + ("none" if not broken else ""), *broken]
    lines += ["", "`surfaced`: the fault model lets the guest see it (an injected EIO or "
              "ENOSPC is a guest I/O error, which the guest program reports and retries)."]
    return "\n".join(lines) + "\n"


def timeline(data: dict[str, Any], path: Path) -> str | None:
    """Draw the PNG; the reason when it cannot be drawn."""
    try:  # imported by name: matplotlib is optional, and mypy must pass without it
        importlib.import_module("matplotlib").use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no timeline.png"
    names = [n for n in FAULTS if any(i["fault"] == n for i in data["injections"])]
    colors = {"recovered": "tab:green", "surfaced": "tab:orange", "failed": "tab:red"}
    fig, ax = plt.subplots(figsize=(11, 2 + 0.25 * len(names)))
    for outcome, color in colors.items():
        pts = [i for i in data["injections"] if i["outcome"] == outcome]
        ax.scatter([i["started"] for i in pts], [names.index(i["fault"]) for i in pts],
                   s=[8 + min(200.0, (i["recovery_ms"] or 0) / 10) for i in pts],
                   c=color, label=outcome, alpha=0.7)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("seconds into the campaign (marker size: recovery time)")
    ax.set_title(f"dvmm chaos {data['scenario']['name']} seed {data['scenario']['seed']}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def write(r: Result, directory: Path) -> tuple[dict[str, Any], str | None]:
    """Write the three files; the report map and why the PNG is missing (or None)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = to_json(r)
    (directory / "report.json").write_text(json.dumps(data, indent=1) + "\n")
    (directory / "summary.md").write_text(summary_md(data))
    return data, timeline(data, directory / "timeline.png")


def load(path: Path) -> tuple[Campaign, list[Planned]]:
    """The scenario and the schedule a report recorded."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("injections"), list):
            raise ReportError(f"{path}: no injections list")
        return from_dict(data["scenario"]), from_dicts(data["injections"])
    except OSError as exc:
        raise ReportError(f"{path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: not JSON: {exc}") from None
    except (ScenarioError, ValueError, TypeError) as exc:
        raise ReportError(f"{path}: {exc}") from None
