"""The chaos report files and the guest oracle's parsing, without a VM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dvmm_core.chaos.campaign import Injection, Result
from dvmm_core.chaos.report import ReportError, load, ok, percentile, rows, summary_md, write
from dvmm_core.chaos.scenario import DEFAULT
from dvmm_core.chaos.schedule import Planned
from dvmm_core.chaos.workload import parse

GOOD = dict.fromkeys(("vm_alive", "oracle", "errors_allowed", "recovery_bound",
                      "rss_bounded"), True)


def injection(i: int, fault: str, outcome: str, ms: float | None) -> Injection:
    inv = dict(GOOD, recovery_bound=outcome != "failed")
    return Injection(Planned(i, 1.0 + i, "blk0", fault, {}), 1.0 + i, outcome, ms, inv)


def result(*injections: Injection) -> Result:
    return Result(DEFAULT, list(injections), {"vm_alive": True, "oracle": True}, 12.0)


def test_summary_table_per_fault_type(tmp_path: Path) -> None:
    r = result(injection(0, "sigkill", "recovered", 50.0),
               injection(1, "sigkill", "recovered", 70.0),
               injection(2, "eio", "surfaced", 2.0),
               injection(3, "hang", "failed", None))
    data, _ = write(r, tmp_path)
    assert not ok(r) and not data["ok"]
    by = {row["fault"]: row for row in rows(data["injections"])}
    assert by["sigkill"] == {"fault": "sigkill", "injections": 2, "recovered": 2,
                             "surfaced": 0, "failed": 0, "p50_ms": 50.0, "p99_ms": 70.0}
    assert by["eio"]["surfaced"] == 1 and by["hang"]["failed"] == 1
    assert by["hang"]["p50_ms"] is None
    text = (tmp_path / "summary.md").read_text()
    assert "| sigkill | process | 2 | 2 | 0 | 0 | 50.0 | 70.0 |" in text
    assert "#3 hang: recovery_bound" in text and text == summary_md(data)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [i["fault"] for i in saved["injections"]] == ["sigkill", "sigkill", "eio", "hang"]
    assert {"time", "target", "fault", "outcome", "recovery_ms", "invariants"} <= set(
        saved["injections"][0])
    scenario, planned = load(tmp_path / "report.json")
    assert scenario == DEFAULT and [p.fault for p in planned][-1] == "hang"


def test_a_clean_campaign_is_ok() -> None:
    assert ok(result(injection(0, "sigkill", "recovered", 5.0),
                     injection(1, "eio", "surfaced", 1.0)))


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile([3.0], 99)) == \
        (50.0, 99.0, 3.0)


@pytest.mark.parametrize("content", ["", "[]", '{"injections": 3}',
                                     '{"injections": [], "scenario": {"seed": "x"}}'])
def test_bad_reports_are_refused(tmp_path: Path, content: str) -> None:
    f = tmp_path / "report.json"
    f.write_text(content)
    with pytest.raises(ReportError):
        load(f)


def test_guest_oracle_parsing() -> None:
    text = ("\r\ndvmm-chaos: booted\r\ndvmm-chaos: reads 256\r\n"
            "dvmm-chaos: read error AH=0C\r\ndvmm-chaos: reads 512\r\n")
    v = parse(text)
    assert (v.booted, v.progress, v.read_errors, v.mismatches, v.stopped) == \
        (True, 512, 1, 0, None)
    bad = parse(text + "dvmm-chaos: MISMATCH at read 600\r\n")
    assert bad.mismatches == 1
    assert parse("dvmm-chaos: bad params\r\n").stopped == "bad params"


def test_write_image_oracle(tmp_path: Path) -> None:
    """The host check of a stopped blk-write VM's image: 16 intact, consecutive
    writes, none older than what the guest verified."""
    from dvmm_core.boot.demo import SECTOR_SIZE
    from dvmm_core.chaos.workload import SLOTS, check_writes, make_disk, pattern

    img = tmp_path / "w.img"
    make_disk(img, 1, "blk-write")
    assert check_writes(img, 0) is None and check_writes(img, SLOTS) is None

    def put(slot: int, data: bytes) -> None:
        with img.open("r+b") as f:
            f.seek((1 + slot) * SECTOR_SIZE)
            f.write(data)

    put(0, pattern(SLOTS))                      # write 16 landed: still a window
    assert check_writes(img, SLOTS + 1) is None
    assert "lost" in str(check_writes(img, SLOTS + 5))
    put(3, pattern(SLOTS + 3))                  # a gap: 17 and 18 missing
    assert "consecutive" in str(check_writes(img, 0))
    put(3, pattern(3)[:-4] + b"\0\0\0\0")       # a torn or altered sector
    assert "intact" in str(check_writes(img, 0))
    put(3, pattern(4))                          # a write in the wrong slot
    assert "intact" in str(check_writes(img, 0))
