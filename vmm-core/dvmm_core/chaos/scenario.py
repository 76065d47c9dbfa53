"""What a chaos campaign runs: the fault types, the workloads and a scenario.

Owns the catalogue (:data:`FAULTS`, :data:`WORKLOADS`, shown by ``dvmm
chaos list``) and the :class:`Scenario` — the VM, the workload with its
oracle, the fault mix (a weight per fault type), the spacing of injections
and the bounds the invariants check — read from a TOML file (every value
checked: a scenario file is input) or the built-in default, which weighs
every fault type equally.  It does not plan times (:mod:`.schedule`) or
inject anything (:mod:`.faults`).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any


class ScenarioError(ValueError):
    """A scenario file or value that cannot be run (one line)."""


@dataclass(frozen=True)
class FaultType:
    name: str
    surfaces: bool      # the fault model lets the guest see an error
    restores: bool      # the backend's connection is lost and restored
    help: str


FAULTS: dict[str, FaultType] = {f.name: f for f in (
    FaultType("sigkill", False, True, "SIGKILL the blk backend (the core's supervisor "
              "restarts it, the link reconnects and replays in-flight requests)"),
    FaultType("hang", False, False, "SIGSTOP the backend, SIGCONT it 100-800 ms later"),
    FaultType("crash-at", False, True, "the backend SIGKILLs itself at a named point of its "
              "next request (after-pop, after-data, before-used, after-used)"),
    FaultType("eio", True, False, "the next disk read fails with EIO: the guest sees a "
              "read error (allowed) and retries"),
    FaultType("latency", False, False, "every ring service pass sleeps 50-400 ms for "
              "0.3-1 s (a latency spike)"),
    FaultType("close-socket", False, True, "the backend closes its vhost-user socket "
              "(the core reconnects)"),
    FaultType("restart", False, True, "the supervisor stops the backend cleanly (SIGTERM) "
              "and starts it again"),
    FaultType("memlimit", False, False, "the backend's address space is capped at its "
              "current size (RLIMIT_AS, soft) for 0.3-1 s: every allocation fails"),
)}

WORKLOADS = {
    "blk": "SeaBIOS boots a program that reads one disk region through int 13h for ever, "
           "comparing every read with the first (oracle: no read differs; a read error "
           "only while an EIO is armed; the image's data unchanged at the end)",
    "blk-write": "SeaBIOS boots a program that writes numbered sectors in turn to 16 slots "
                 "through int 13h and reads each back (oracle: every read-back equal; an "
                 "I/O error only while an EIO is armed; after the VM stopped, the image "
                 "holds 16 intact, consecutive writes, none older than the guest verified)",
}
VMS = {"core": "the dvmm core (KVM) with SeaBIOS and one dvmm blk backend"}
MAX_DURATION = 24 * 3600.0


@dataclass(frozen=True)
class Scenario:
    name: str = "default"
    vm: str = "core"
    workload: str = "blk"
    seed: int = 1
    duration: float = 60.0          # seconds of injections
    min_gap: float = 1.2            # seconds between two injections: min..max (seeded)
    max_gap: float = 2.4
    recovery_bound_ms: float = 5000.0
    rss_bound_mb: float = 1024.0
    faults: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FAULTS, 1.0))

    def with_overrides(self, seed: int | None, duration: float | None) -> Scenario:
        out = replace(self, seed=self.seed if seed is None else seed,
                      duration=self.duration if duration is None else duration)
        out.check()
        return out

    def check(self) -> None:
        """Raise :class:`ScenarioError` unless every value makes sense."""
        if self.vm not in VMS:
            raise ScenarioError(f"vm must be one of {', '.join(VMS)}, not {self.vm!r}")
        if self.workload not in WORKLOADS:
            raise ScenarioError(f"workload must be one of {', '.join(WORKLOADS)}")
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
        if not any(w > 0 for w in self.faults.values()):
            raise ScenarioError("faults: at least one fault type needs a weight > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positive(name: str, value: float, limit: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0 < value <= limit:
        raise ScenarioError(f"{name} must be a number in (0, {limit:g}], not {value!r}")


_NUMBERS = ("duration", "min_gap", "max_gap", "recovery_bound_ms", "rss_bound_mb")


def from_dict(data: dict[str, Any]) -> Scenario:
    """A checked scenario from a TOML table or a report's ``scenario`` map."""
    known = set(Scenario.__dataclass_fields__)
    extra = set(data) - known
    if extra:
        raise ScenarioError(f"unknown scenario key(s) {', '.join(sorted(extra))}")
    values: dict[str, Any] = {}
    for key in ("name", "vm", "workload"):
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
    scenario.check()
    return scenario


def load(path: Path) -> Scenario:
    """The scenario in a TOML file."""
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


DEFAULT = Scenario()
