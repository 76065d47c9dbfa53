"""Smoke run of the start-up benchmark so the harness cannot rot (no timing asserted)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.core
def test_firmware_startup_bench_prints_ratios() -> None:
    out = subprocess.run([sys.executable, "-m", "dvmm_core.cli", "bench", "startup",
                          "--runs", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for label in ("time to first serial byte", "time to demo checksum", "VMM process RSS"):
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith(label))
        dvmm, qemu, ratio = (float(x) for x in re.findall(r"\d+\.\d+", line))
        assert dvmm > 0 and qemu > 0
        assert ratio == pytest.approx(dvmm / qemu, rel=0.05, abs=0.01)
