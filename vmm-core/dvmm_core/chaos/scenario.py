"""What a chaos campaign runs: its phases, each a VM, workloads and a fault mix.

Owns the :class:`Scenario` (one *phase*: the VM kind, the workloads with
their oracles, the backend runner, the fault mix — a weight per fault type
— the spacing of injections and the bounds the invariants check) and the
:class:`Campaign` (a name, a seed and the phases run one after the other),
read from a TOML file (every value checked: a scenario file is input) or
built in.  A file is either one phase (its keys at the top) or
``[[phase]]`` tables, which take ``name``, ``seed`` and any other key from
the top as defaults.  It does not plan times (:mod:`.schedule`) or inject
anything (:mod:`.faults`); the catalogue is :mod:`.catalogue`.

The built-in default (:func:`default`) exercises every fault type against
the VM kinds that run on the machine: the core with the blk-write and
display workloads, the core with its blk backend under the docker runner
(when a Docker engine answers), and QEMU (TCG) + the Debian guest with the
blkverify and net-stream workloads.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .catalogue import FAULTS, RUNNERS, VMS, WORKLOADS, FaultType
from .vmbase import device_of

__all__ = ["FAULTS", "VMS", "WORKLOADS", "Campaign", "FaultType", "Scenario", "ScenarioError"]

MAX_DURATION = 24 * 3600.0


class ScenarioError(ValueError):
    """A scenario file or value that cannot be run (one line)."""


@dataclass(frozen=True)
class Scenario:
    """One phase of a campaign: one VM for its whole duration (a fresh one if
    an injection breaks it)."""

    name: str = "default"
    vm: str = "core"
    workload: str = "blk"           # workloads joined by "+", e.g. "blk-write+display"
    runner: str = "process"         # how the VM's backends run
    seed: int = 1
    duration: float = 60.0          # seconds of injections
    min_gap: float = 1.2            # seconds between two injections: min..max (seeded)
    max_gap: float = 2.4
    recovery_bound_ms: float = 5000.0
    rss_bound_mb: float = 1024.0
    faults: dict[str, float] = field(default_factory=dict)

    @property
    def workloads(self) -> tuple[str, ...]:
        return tuple(self.workload.split("+"))

    def targets(self) -> tuple[str, ...]:
        """The backends of this phase's VM that faults can hit."""
        out = {WORKLOADS[w].target for w in self.workloads if w in WORKLOADS}
        if self.vm == "core":
            out.add("blk0")  # the core VM boots its workload program from its disk
        return tuple(sorted(out))

    def applicable(self, fault: str) -> tuple[str, ...]:
        """The targets ``fault`` can hit in this phase (empty: none)."""
        f = FAULTS[fault]
        if self.vm not in f.vms or (f.needs and f.needs != self.runner):
            return ()
        return tuple(t for t in self.targets() if device_of(t) in f.devices)

    def check(self) -> None:
        """Raise :class:`ScenarioError` unless every value makes sense."""
        if self.vm not in VMS:
            raise ScenarioError(f"vm must be one of {', '.join(VMS)}, not {self.vm!r}")
        if self.runner not in RUNNERS:
            raise ScenarioError(f"runner must be one of {', '.join(RUNNERS)}")
        for w in self.workloads:
            if w not in WORKLOADS:
                raise ScenarioError(f"workload must be one or more of {', '.join(WORKLOADS)} "
                                    f"joined by '+', not {self.workload!r}")
            if WORKLOADS[w].vm != self.vm:
                raise ScenarioError(f"workload {w} runs on the {WORKLOADS[w].vm} VM, "
                                    f"not {self.vm}")
        if self.vm == "core" and not {"blk", "blk-write"} & set(self.workloads):
            raise ScenarioError("the core VM needs a blk or blk-write workload (its boot "
                                "program)")
        if not 0 <= self.seed < 1 << 63:
            raise ScenarioError(f"seed must be 0..2^63-1, not {self.seed}")
        _positive("duration", self.duration, MAX_DURATION)
        _positive("min_gap", self.min_gap, 3600)
        _positive("max_gap", self.max_gap, 3600)
        if self.max_gap < self.min_gap:
            raise ScenarioError("max_gap must be at least min_gap")
        _positive("recovery_bound_ms", self.recovery_bound_ms, 600_000)
        _positive("rss_bound_mb", self.rss_bound_mb, 1 << 20)
        unknown = set(self.faults) - set(FAULTS)
        if unknown:
            raise ScenarioError(f"unknown fault type(s) {', '.join(sorted(unknown))}; "
                                f"known: {', '.join(FAULTS)}")
        for name, weight in self.faults.items():
            if not math.isfinite(weight) or weight < 0:
                raise ScenarioError(f"faults.{name}: weight must be >= 0")
            if weight > 0 and not self.applicable(name):
                f = FAULTS[name]
                raise ScenarioError(
                    f"faults.{name}: hits {'/'.join(f.devices)} on the {'/'.join(f.vms)} VM"
                    + (f" with the {f.needs} runner" if f.needs else "")
                    + f"; this phase has {', '.join(self.targets())} on the {self.vm} VM"
                    + (f" ({self.runner} runner)" if f.needs else ""))
        if not any(w > 0 for w in self.faults.values()):
            raise ScenarioError("faults: at least one fault type needs a weight > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Campaign:
    """The phases of one campaign, run in order; injection times run on across
    phases (phase i starts when phase i-1's duration ended)."""

    name: str
    seed: int
    phases: tuple[Scenario, ...]

    @property
    def duration(self) -> float:
        return sum(p.duration for p in self.phases)

    def with_overrides(self, seed: int | None, duration: float | None) -> Campaign:
        """Another seed, and/or the total duration shared out in proportion."""
        scale = 1.0 if duration is None else duration / self.duration
        phases = tuple(replace(p, seed=p.seed if seed is None else seed,
                               duration=round(p.duration * scale, 3)) for p in self.phases)
        for p in phases:
            p.check()
        return Campaign(self.name, self.seed if seed is None else seed, phases)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed,
                "phases": [p.to_dict() for p in self.phases]}


def _positive(name: str, value: float, limit: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0 < value <= limit:
        raise ScenarioError(f"{name} must be a number in (0, {limit:g}], not {value!r}")


_NUMBERS = ("duration", "min_gap", "max_gap", "recovery_bound_ms", "rss_bound_mb")
_STRINGS = ("name", "vm", "workload", "runner")


def phase_from_dict(data: dict[str, Any]) -> Scenario:
    """A checked phase from a TOML table or a report's map.  A phase without
    ``faults`` gets every fault type that can hit its VM, weight 1."""
    known = set(Scenario.__dataclass_fields__)
    extra = set(data) - known
    if extra:
        raise ScenarioError(f"unknown scenario key(s) {', '.join(sorted(extra))}")
    values: dict[str, Any] = {}
    for key in _STRINGS:
        if key in data:
            if not isinstance(data[key], str):
                raise ScenarioError(f"{key} must be a string")
            values[key] = data[key]
    if "seed" in data:
        if isinstance(data["seed"], bool) or not isinstance(data["seed"], int):
            raise ScenarioError("seed must be an integer")
        values["seed"] = data["seed"]
    for key in _NUMBERS:
        if key in data:
            _positive(key, data[key], math.inf)
            values[key] = float(data[key])
    if "faults" in data:
        faults = data["faults"]
        if not isinstance(faults, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                for k, v in faults.items()):
            raise ScenarioError("faults must be a table of fault type = weight")
        values["faults"] = {k: float(v) for k, v in faults.items()}
    scenario = Scenario(**values)
    if "faults" not in values:
        scenario = replace(scenario, faults=every_fault(scenario))
    scenario.check()
    return scenario


def every_fault(phase: Scenario) -> dict[str, float]:
    """Weight 1 for every fault type that can hit the phase's VM."""
    probe = replace(phase, faults={})
    return {name: 1.0 for name in FAULTS if probe.applicable(name)}


def from_dict(data: dict[str, Any]) -> Campaign:
    """A checked campaign: ``phases`` (or ``phase``) as a list of tables that
    inherit the top-level keys, or the top-level keys as its one phase."""
    if not isinstance(data, dict):
        raise ScenarioError("a scenario is a table")
    listed = data.get("phases", data.get("phase"))
    top = {k: v for k, v in data.items() if k not in ("phases", "phase")}
    if listed is None:
        phase = phase_from_dict(top)
        return Campaign(phase.name, phase.seed, (phase,))
    if not isinstance(listed, list) or not listed or not all(isinstance(p, dict)
                                                             for p in listed):
        raise ScenarioError("phase must be a list of tables ([[phase]])")
    phases = []
    for i, p in enumerate(listed):
        try:
            phases.append(phase_from_dict({**top, **p}))
        except ScenarioError as exc:
            raise ScenarioError(f"phase {i + 1}: {exc}") from None
    name = top.get("name", "default")
    seed = phases[0].seed
    if any(p.seed != seed for p in phases):
        raise ScenarioError("every phase of a campaign takes the campaign's seed")
    return Campaign(str(name), seed, tuple(phases))


def load(path: Path) -> Campaign:
    """The campaign in a TOML file."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ScenarioError(f"{path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: not TOML: {exc}") from None
    try:
        return from_dict(data)
    except ScenarioError as exc:
        raise ScenarioError(f"{path}: {exc}") from None


DEFAULT_PHASES: tuple[dict[str, Any], ...] = (
    {"name": "core", "vm": "core", "workload": "blk-write+display", "duration": 70.0},
    {"name": "core-docker", "vm": "core", "workload": "blk-write", "runner": "docker",
     "duration": 20.0, "faults": {"docker-kill": 1.0, "docker-pause": 1.0, "sigkill": 1.0}},
    {"name": "qemu", "vm": "qemu", "workload": "blkverify+net-stream", "duration": 50.0},
)


def default(docker: str | None = None, qemu: str | None = None) -> tuple[Campaign, list[str]]:
    """The built-in campaign, without the phases this machine cannot run (``docker``
    / ``qemu``: why that VM kind cannot run here, None when it can); the reasons
    of the phases left out."""
    phases, left_out = [], []
    for p in DEFAULT_PHASES:
        why = docker if p.get("runner") == "docker" else qemu if p["vm"] == "qemu" else None
        if why:
            left_out.append(f"phase {p['name']} left out: {why}")
            continue
        phases.append(phase_from_dict({**p, "name": p["name"]}))
    return Campaign("default", 1, tuple(phases)), left_out


DEFAULT = default()[0]
