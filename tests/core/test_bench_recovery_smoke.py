"""Smoke run of ``dvmm bench recovery --kills 3 --pause 0.5`` so the harness cannot rot.

Checks that the command runs both VMs (the dvmm core, QEMU + the dvmm blk
backend), prints a p50/p99 line for each whose values are the nearest-rank
percentiles of the spread it printed, prints the goal and the ratio table,
and exits 0 (a guest that saw an error would make it exit 1).  No timing is
asserted.  Bad options fail at once, with one line.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from dvmm_bench.recovery import percentile
from dvmm_bench.report import parse_table
from dvmm_core.kvm import kvm_available

pytestmark = [
    pytest.mark.core,
    pytest.mark.skipif(kvm_available() is not None, reason=f"no usable KVM: {kvm_available()}"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 is not installed"),
]

SUMMARY = re.compile(r"^(core|qemu)\s+p50\s+([\d.]+) ms\s+p99\s+([\d.]+) ms\s+\((\d+) kills;",
                     re.M)
SPREAD = re.compile(r"^(core|qemu)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+"
                    r"([\d.]+)$", re.M)


def bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvmm_core.cli", "bench", "recovery", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 51)]
    assert percentile(values, 50) == 25.0
    assert percentile(values, 99) == 50.0
    assert percentile([7.0], 99) == 7.0


@pytest.mark.parametrize("args", [["--kills", "0"], ["--kills", "-3"], ["--pause", "-1"],
                                  ["--pause", "1e9"]])
def test_bad_option_is_one_line_error(args: list[str]) -> None:
    out = bench(*args, timeout=60)
    assert out.returncode != 0
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert args[0] in out.stderr


def test_recovery_bench_three_kills_prints_p50_p99() -> None:
    out = bench("--kills", "3", "--pause", "0.5")
    assert out.returncode == 0, out.stdout + out.stderr
    summaries = {m[0]: m for m in SUMMARY.findall(out.stdout)}
    assert set(summaries) == {"core", "qemu"}, out.stdout
    spreads = {m[0]: m for m in SPREAD.findall(out.stdout)}
    assert set(spreads) == {"core", "qemu"}, out.stdout
    for vm, (_, p50, p99, kills) in summaries.items():
        assert int(kills) == 3
        _, n, low, mid, _mean, high, top = spreads[vm]
        assert int(n) == 3
        assert 0 < float(low) <= float(mid) <= float(high) <= float(top)
        assert (p50, p99) == (mid, high)
    assert "goal (issue 8): p50 < 100 ms, p99 < 500 ms" in out.stdout
    rows = parse_table(out.stdout)
    assert [r.metric for r in rows] == ["p50 (ms)", "p99 (ms)"]
    for row in rows:
        assert row.peer_name == "qemu" and row.dvmm > 0 and row.peer > 0
    assert len(re.findall(r"^(core|qemu) kill \d/3: ", out.stderr, re.M)) == 6, out.stderr
