"""Smoke run of ``dvmm bench net --quick`` so the harness cannot rot.

Checks the shape of what it prints — every workload, both backends measured
(dvmm and dpdk-testpmd, or the kernel-tap fallback when testpmd cannot run),
each ratio the quotient of the two values — and never a speed: benchmarks
print ratios, tests do not time anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from dvmm_bench.net import FALLBACK, METRICS, PEER, WORKLOADS
from dvmm_bench.report import HIGHER, parse_table

pytestmark = [
    pytest.mark.core,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ip netns, TAP devices)"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 is not installed"),
]


def test_net_bench_quick_prints_every_workload_with_ratios() -> None:
    out = subprocess.run([sys.executable, "-m", "dvmm_core.cli", "bench", "net", "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {(r.group, r.workload, r.metric): r for r in parse_table(out.stdout)}
    peers = {r.peer_name for r in rows.values()}
    assert len(peers) == 1 and peers <= {PEER, FALLBACK}, peers
    if shutil.which("dpdk-testpmd") is not None and peers != {PEER}:
        print(f"note: testpmd was installed but the fallback peer was used:\n{out.stdout}")
    for wl in WORKLOADS:
        for metric, _ in METRICS:
            row = rows.pop(("net", wl.name, metric))
            assert row.better == HIGHER
            assert row.dvmm > 0 and row.peer > 0, row
            printed = next(ln for ln in out.stdout.splitlines()
                           if ln.startswith("net ") and f" {wl.name} " in ln
                           and f" {metric} " in ln)
            ratio = float(printed.split()[-2])
            assert ratio == pytest.approx(row.dvmm / row.peer, rel=0.02, abs=0.006)
    assert not rows, f"unexpected rows: {sorted(rows)}"
    assert "VERSION_1" in out.stdout
