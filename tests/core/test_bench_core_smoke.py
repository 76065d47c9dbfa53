"""Smoke run of ``dvmm bench core --quick`` so the harness cannot rot.

Checks that every compared metric is printed with positive values for dvmm
and QEMU and that each ratio is the quotient of the two; no speed is asserted.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from dvmm_bench.core import guest_image
from dvmm_bench.report import parse_table
from dvmm_core.kvm import kvm_available

pytestmark = [
    pytest.mark.core,
    pytest.mark.skipif(kvm_available() is not None, reason=f"no usable KVM: {kvm_available()}"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 is not installed"),
]

EXPECTED = {
    ("port-exit-loop", "exit time (us)"), ("port-exit-loop", "exits/s"),
    ("kvm-layer-exit-loop", "exit time (us)"), ("kvm-layer-exit-loop", "exits/s"),
    ("tiny-bios", "start to first insn (ms)"), ("tiny-bios", "VMM RSS at first insn (MiB)"),
    ("tiny-bios", "RSS incl. children (MiB)"),
}


def test_tiny_bios_layout() -> None:
    rom = guest_image(5)
    assert len(rom) == 0x10000
    assert rom[0xFFF0:0xFFF3] == bytes.fromhex("e90df0")   # jmp near 0xf000
    assert rom[0xF000:0xF005] == bytes.fromhex("baf803b053")
    assert rom[0xF008:0xF00C] == (5).to_bytes(4, "little")
    with pytest.raises(ValueError):
        guest_image(0)


def test_core_bench_quick_prints_ratios() -> None:
    out = subprocess.run([sys.executable, "-m", "dvmm_core.cli", "bench", "core", "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = parse_table(out.stdout)
    assert {(r.workload, r.metric) for r in rows} == EXPECTED
    for row in rows:
        assert row.group == "core" and row.peer_name == "qemu"
        assert row.dvmm > 0 and row.peer > 0, row
        printed = next(ln for ln in out.stdout.splitlines()
                       if f" {row.workload} " in ln and f" {row.metric} " in ln)
        ratio = float(printed.split()[-2])
        assert ratio == pytest.approx(row.dvmm / row.peer, rel=0.02, abs=0.006)
