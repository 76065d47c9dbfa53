"""The chaos schedule is a pure function of the scenario and seed (hypothesis),
and scenarios and reports are read back strictly."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from dvmm_core.chaos.scenario import DEFAULT, FAULTS, ScenarioError, from_dict, load
from dvmm_core.chaos.schedule import differences, for_campaign, from_dicts, plan
from hypothesis import given, settings
from hypothesis import strategies as st

weights = st.dictionaries(st.sampled_from(sorted(FAULTS)),
                          st.floats(0, 10, allow_nan=False), min_size=1).filter(
    lambda w: any(v > 0 for v in w.values()))
gaps = st.tuples(st.floats(0.2, 5), st.floats(0, 5)).map(lambda g: (g[0], g[0] + g[1]))


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), duration=st.floats(0.1, 300), w=weights, gap=gaps)
def test_same_seed_same_schedule_and_its_shape(seed: int, duration: float,
                                               w: dict[str, float],
                                               gap: tuple[float, float]) -> None:
    a = plan(seed, duration, w, *gap)
    assert a == plan(seed, duration, w, *gap)
    assert differences(a, plan(seed, duration, w, *gap)) == []
    times = [p.time for p in a]
    assert times == sorted(times) and all(0 < t <= duration for t in times)
    assert [p.index for p in a] == list(range(len(a)))
    assert all(w.get(p.fault, 0) > 0 for p in a)
    for x, y in itertools.pairwise(times):
        assert gap[0] - 0.002 <= y - x <= gap[1] + 0.002
    # The first injections cover every fault type with a weight.
    wanted = {n for n, v in w.items() if v > 0}
    if len(a) >= len(wanted):
        assert {p.fault for p in a[:len(wanted)]} == wanted
    # Round trip through a report's JSON.
    assert from_dicts(json.loads(json.dumps([p.to_dict() for p in a]))) == a


def test_another_seed_another_schedule_and_differences_says_where() -> None:
    core = DEFAULT.phases[0]
    a = plan(1, 120, core.faults, 1.2, 2.4)
    b = plan(2, 120, core.faults, 1.2, 2.4)
    assert a != b
    assert differences(a, b) and differences(a, a[:-1])[-1].endswith(f"!= {len(a) - 1}")


def test_default_campaign_covers_every_fault_type_in_each_phases_first_injections() -> None:
    a = for_campaign(DEFAULT)
    assert {p.fault for p in a} == set(FAULTS)
    assert [p.index for p in a] == list(range(len(a)))
    assert [p.time for p in a] == sorted(p.time for p in a)
    for n, ph in enumerate(DEFAULT.phases):
        mine = [p for p in a if p.phase == n]
        wanted = {f for f, w in ph.faults.items() if w > 0}
        assert {p.fault for p in mine[:len(wanted)]} == wanted
        assert all(p.target in ph.applicable(p.fault) for p in mine)
    assert {p.arg["point"] for p in a if p.fault == "crash-at"} <= {
        "after-pop", "after-data", "before-used", "after-used"}
    # Faults that can hit several devices of a VM reach each of them (given time).
    long = for_campaign(DEFAULT.with_overrides(None, 1500))
    assert {p.target for p in long if p.fault == "sigkill"} == {"blk0", "display0", "net0"}


def test_phases_inherit_top_level_keys_and_bad_pairs_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('name = "two"\nseed = 5\nmin_gap = 0.5\nmax_gap = 0.9\n'
                 '[[phase]]\nname = "a"\nworkload = "blk-write+display"\nduration = 10\n'
                 '[[phase]]\nname = "b"\nvm = "qemu"\nworkload = "net-stream"\n'
                 'duration = 5\n[phase.faults]\nnet-drop = 1\n')
    c = load(f)
    assert (c.name, c.seed, [p.name for p in c.phases]) == ("two", 5, ["a", "b"])
    assert c.phases[0].min_gap == 0.5 and c.phases[1].faults == {"net-drop": 1.0}
    assert c.phases[0].targets() == ("blk0", "display0")
    assert from_dict(c.to_dict()) == c
    assert c.with_overrides(None, 30).duration == pytest.approx(30)
    f.write_text('vm = "qemu"\nworkload = "net-stream"\n[faults]\ndocker-kill = 1\n')
    with pytest.raises(ScenarioError, match="docker-kill: hits blk on the core VM"):
        load(f)


def test_scenario_file(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text('name = "k"\nseed = 7\nduration = 30\n[faults]\nsigkill = 2\neio = 0.5\n')
    c = load(f)
    (s,) = c.phases
    assert (c.name, s.seed, s.duration, s.faults) == ("k", 7, 30.0,
                                                      {"sigkill": 2.0, "eio": 0.5})
    assert from_dict(c.to_dict()) == c
    assert c.with_overrides(9, 5).seed == 9 and c.with_overrides(9, 5).phases[0].seed == 9


@pytest.mark.parametrize("text, message", [
    ("duration = -1", "duration"),
    ("duration = true", "duration"),
    ("seed = 'x'", "seed"),
    ("colour = 1", "unknown scenario key"),
    ("[faults]\nmeteor = 1", "unknown fault type"),
    ("[faults]\nsigkill = 0", "weight > 0"),
    ("[faults]\nsigkill = -1", "weight must be >= 0"),
    ("min_gap = 3\nmax_gap = 1", "max_gap"),
    ("vm = 'xen'", "vm must be"),
    ("vm = 'qemu'", "workload blk runs on the core VM"),
    ("workload = 'display'", "needs a blk or blk-write workload"),
    ("runner = 'lxc'", "runner must be"),
    ("[[phase]]\nseed = 1\n[[phase]]\nseed = 2", "campaign's seed"),
    ("not toml [", "not TOML"),
])
def test_bad_scenarios_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ScenarioError, match=message) as exc:
        load(f)
    assert "\n" not in str(exc.value)


def test_malformed_injections_are_refused() -> None:
    with pytest.raises(ValueError):
        from_dicts([{"index": 0, "time": 1.0}])
    with pytest.raises(ValueError):
        from_dicts(["x"])


def test_every_fault_type_has_an_injector_and_the_arguments_it_reads() -> None:
    """The schedule draws each type's arguments; each family says which it reads."""
    import random

    from dvmm_core.chaos import faults_container, faults_io, faults_net
    from dvmm_core.chaos.faults import injectors
    from dvmm_core.chaos.schedule import _arg

    assert set(injectors()) == set(FAULTS)
    for family in (faults_io, faults_net, faults_container):
        for name, draw in family.ARGS.items():
            assert set(_arg(name, random.Random(1))) == set(draw(random.Random(1))), name
