"""The fault schedule of a campaign: a pure function of the scenario and seed.

Owns :func:`plan`: when each injection happens (seconds after the campaign
starts), at which target, which fault and with which argument.  Nothing here
reads a clock or touches a process, so the same seed gives the same list on
every machine (``dvmm chaos replay`` relies on it) and the properties are
tested with hypothesis (tests/unit/test_chaos_schedule.py).

Shape: injections are ``min_gap..max_gap`` seconds apart (seeded); the first
ones take every fault type with a weight > 0 once, in a seeded order, so a
campaign long enough for them covers every type; after that each fault is
drawn by weight.  A fault that can hit several targets of the phase's VM
(a SIGKILL: blk0 or display0) picks one, seeded.  The phases of a campaign
follow each other: phase i's times start where phase i-1's duration ended,
its indices where the previous ones stopped.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .scenario import Campaign, Scenario

TARGET = "blk0"
CRASH_POINTS = ("after-pop", "after-data", "before-used", "after-used")


@dataclass(frozen=True)
class Planned:
    """One injection of the schedule."""

    index: int
    time: float                 # seconds after the start (ms resolution)
    target: str
    fault: str
    arg: dict[str, Any]         # fault parameters (ms, point, ...)
    phase: int = 0              # the campaign phase (VM) it belongs to

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _arg(fault: str, rng: random.Random) -> dict[str, Any]:
    """The seeded parameters of one fault."""
    if fault in ("hang", "docker-pause"):
        return {"ms": rng.randrange(100, 801)}
    if fault == "crash-at":
        return {"point": rng.choice(CRASH_POINTS)}
    if fault in ("memlimit", "cgroup-memlimit"):
        return {"hold_ms": rng.randrange(300, 1001)}
    if fault == "latency":
        return {"ms": rng.randrange(50, 401), "hold_ms": rng.randrange(300, 1001)}
    if fault == "eio":
        return {"op": "read", "count": 1}
    if fault in ("short-read", "short-write"):
        return {"count": rng.randrange(1, 4)}
    if fault == "enospc":
        return {"op": "write", "count": 1}
    if fault == "torn-write":
        return {"percent": rng.randrange(10, 91)}
    if fault in ("drop-kick", "drop-call"):
        return {"count": 1}
    if fault in ("delay-kick", "delay-call"):
        return {"ms": rng.randrange(50, 401)}
    if fault in ("net-drop", "net-dup", "net-reorder", "net-corrupt"):
        return {"direction": rng.choice(("rx", "tx")), "hold_ms": rng.randrange(300, 1001)}
    if fault == "link-flap":
        return {"ms": rng.randrange(200, 1001)}
    return {}


def plan(seed: int, duration: float, faults: Mapping[str, float], min_gap: float,
         max_gap: float, targets: Mapping[str, tuple[str, ...]] | None = None, *,
         phase: int = 0, offset: float = 0.0, first_index: int = 0) -> list[Planned]:
    """Every injection in ``(offset, offset + duration]``, in time order.

    ``targets`` maps each fault to the targets it can hit (default: blk0)."""
    rng = random.Random(f"dvmm-chaos:{seed}" if phase == 0 else f"dvmm-chaos:{seed}:{phase}")
    names = sorted(n for n, w in faults.items() if w > 0)
    weights = [faults[n] for n in names]
    first = names[:]
    rng.shuffle(first)
    out: list[Planned] = []
    t = 0.0
    while True:
        t = round(t + rng.uniform(min_gap, max_gap), 3)
        if t > duration or not names:
            return out
        fault = first[len(out)] if len(out) < len(first) else \
            rng.choices(names, weights)[0]
        choices = (targets or {}).get(fault, (TARGET,))
        target = choices[0] if len(choices) == 1 else rng.choice(choices)
        out.append(Planned(first_index + len(out), round(offset + t, 3), target, fault,
                           _arg(fault, rng), phase))


def for_scenario(s: Scenario, phase: int = 0, offset: float = 0.0,
                 first_index: int = 0) -> list[Planned]:
    """The schedule of one phase."""
    targets = {name: s.applicable(name) for name in s.faults}
    return plan(s.seed, s.duration, s.faults, s.min_gap, s.max_gap, targets, phase=phase,
                offset=offset, first_index=first_index)


def for_campaign(c: Campaign) -> list[Planned]:
    """The whole campaign's schedule, phase after phase."""
    out: list[Planned] = []
    offset = 0.0
    for i, s in enumerate(c.phases):
        out += for_scenario(s, i, offset, len(out))
        offset = round(offset + s.duration, 3)
    return out


def from_dicts(items: list[Any]) -> list[Planned]:
    """The planned part of a report's injections (ValueError if malformed)."""
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("an injection is not a map")
        try:
            out.append(Planned(int(item["index"]), float(item["time"]), str(item["target"]),
                               str(item["fault"]), dict(item["arg"]),
                               int(item.get("phase", 0))))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"injection {item.get('index')!r}: {exc}") from None
    return out


def differences(a: list[Planned], b: list[Planned]) -> list[str]:
    """Where two schedules differ, one line each (empty: the same)."""
    diffs = [f"injection {x.index}: {x} != {y}" for x, y in zip(a, b, strict=False) if x != y]
    if len(a) != len(b):
        diffs.append(f"{len(a)} injections != {len(b)}")
    return diffs
