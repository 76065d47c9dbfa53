"""The fault schedule of a campaign: a pure function of the scenario and seed.

Owns :func:`plan`: when each injection happens (seconds after the campaign
starts), at which target, which fault and with which argument.  Nothing here
reads a clock or touches a process, so the same seed gives the same list on
every machine (``dvmm chaos replay`` relies on it) and the properties are
tested with hypothesis (tests/unit/test_chaos_schedule.py).

Shape: injections are ``min_gap..max_gap`` seconds apart (seeded); the first
ones take every fault type with a weight > 0 once, in a seeded order, so a
campaign long enough for them covers every type; after that each fault is
drawn by weight.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .scenario import Scenario

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _arg(fault: str, rng: random.Random) -> dict[str, Any]:
    """The seeded parameters of one fault."""
    if fault == "hang":
        return {"ms": rng.randrange(100, 801)}
    if fault == "crash-at":
        return {"point": rng.choice(CRASH_POINTS)}
    if fault == "memlimit":
        return {"hold_ms": rng.randrange(300, 1001)}
    if fault == "latency":
        return {"ms": rng.randrange(50, 401), "hold_ms": rng.randrange(300, 1001)}
    if fault == "eio":
        return {"op": "read", "count": 1}
    return {}


def plan(seed: int, duration: float, faults: Mapping[str, float], min_gap: float,
         max_gap: float, target: str = TARGET) -> list[Planned]:
    """Every injection in ``(0, duration]``, in time order."""
    rng = random.Random(f"dvmm-chaos:{seed}")
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
        out.append(Planned(len(out), t, target, fault, _arg(fault, rng)))


def for_scenario(s: Scenario) -> list[Planned]:
    return plan(s.seed, s.duration, s.faults, s.min_gap, s.max_gap)


def from_dicts(items: list[Any]) -> list[Planned]:
    """The planned part of a report's injections (ValueError if malformed)."""
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("an injection is not a map")
        try:
            out.append(Planned(int(item["index"]), float(item["time"]), str(item["target"]),
                               str(item["fault"]), dict(item["arg"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"injection {item.get('index')!r}: {exc}") from None
    return out


def differences(a: list[Planned], b: list[Planned]) -> list[str]:
    """Where two schedules differ, one line each (empty: the same)."""
    diffs = [f"injection {x.index}: {x} != {y}" for x, y in zip(a, b, strict=False) if x != y]
    if len(a) != len(b):
        diffs.append(f"{len(a)} injections != {len(b)}")
    return diffs
