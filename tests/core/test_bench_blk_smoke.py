"""Smoke run of ``dvmm bench blk --quick`` so the harness cannot rot.

Checks the shape of what it prints — every workload on both targets, both
backends measured, each ratio the quotient of the two values — and never a
speed: benchmarks print ratios, tests do not time anything.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from dvmm_bench.blk import METRICS, TARGETS, WORKLOADS
from dvmm_bench.report import parse_table

pytestmark = [
    pytest.mark.core,
    pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                       reason="qemu-storage-daemon is not installed"),
]


def test_blk_bench_quick_prints_every_workload_with_ratios() -> None:
    out = subprocess.run([sys.executable, "-m", "dvmm_core.cli", "bench", "blk", "--quick"],
                         capture_output=True, text=True, timeout=300)
    # Non-zero also when a request failed or returned the wrong block.
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {(r.group, r.workload, r.metric): r for r in parse_table(out.stdout)}
    for target in TARGETS:
        for wl in WORKLOADS:
            for metric, _, better in METRICS:
                row = rows.pop((f"blk {target}", wl.name, metric))
                assert row.peer_name == "qsd" and row.better == better
                assert row.dvmm > 0 and row.peer > 0, row
                printed = next(ln for ln in out.stdout.splitlines()
                               if ln.startswith(f"blk {target}") and f" {wl.name} " in ln
                               and f" {metric} " in ln)
                ratio = float(printed.split()[-2])
                assert ratio == pytest.approx(row.dvmm / row.peer, rel=0.02, abs=0.006)
    assert not rows, f"unexpected rows: {sorted(rows)}"
    assert "VERSION_1" in out.stdout
