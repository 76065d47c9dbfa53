"""Smoke run of ``dvmm bench display --quick`` so the harness cannot rot.

Checks the shape of what it prints -- every metric, both VMMs measured
(dvmm's display process and QEMU's own VNC server, each on SeaBIOS's ramfb
screen), each ratio the quotient of the two values -- and never a speed:
benchmarks print ratios, tests do not time anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from dvmm_bench.display import PEER
from dvmm_bench.report import HIGHER, LOWER, parse_table

pytestmark = [
    pytest.mark.core,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 is not installed"),
]

METRICS = {"frames/s": HIGHER, "CPU ms/frame (VMM)": LOWER,
           "CPU ms/frame (display proc)": LOWER, "MB/s to the client": HIGHER}


def test_display_bench_quick_prints_every_metric_with_ratios() -> None:
    out = subprocess.run([sys.executable, "-m", "dvmm_core.cli", "bench", "display", "--quick"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {r.metric: r for r in parse_table(out.stdout)}
    assert set(rows) == set(METRICS), out.stdout
    for metric, better in METRICS.items():
        row = rows[metric]
        assert (row.group, row.peer_name, row.better) == ("display", PEER, better), row
        assert row.dvmm > 0 and row.peer > 0, row
        assert abs(row.ratio - row.dvmm / row.peer) <= 0.01 * row.ratio + 0.01, row
    assert "round 1 dvmm" in out.stderr and f"round 1 {PEER}" in out.stderr, out.stderr
