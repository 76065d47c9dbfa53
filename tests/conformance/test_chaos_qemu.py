"""The QEMU VM kind of ``dvmm chaos`` (dvmm_core.chaos.vm_qemu) under its faults.

QEMU (TCG) boots the dvmm Debian guest with a dvmm blk backend serving a
qcow2 image and a dvmm net backend on a TAP in a network namespace; the
guest runs ``blkverify`` (checksummed blocks, written, flushed, re-read) and
``netverify`` (a checksummed, sequenced TCP stream both ways with the
host).  Through the campaign's own injectors (dvmm_core.chaos.faults and
faults_net) every network fault type is injected once per direction —
frames dropped, duplicated, reordered, corrupted, the link quiet for a
while — and each backend is SIGKILLed once.  After each: the target's
completions move again (recovery), the fault really hit frames (the
backend's counters), and the oracles hold: no guest error, no mismatch
anywhere.  At the end ``qemu-img check`` is clean and the image holds the
last pass's blocks.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from dvmm_core.chaos.faults import inject
from dvmm_core.chaos.schedule import Planned
from dvmm_core.chaos.vm_qemu import QemuChaosVm
from dvmm_core.chaos.vmbase import ChaosVmKind, View

pytestmark = [
    pytest.mark.conformance,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None or os.geteuid() != 0,
                       reason="needs qemu-system-x86_64 and root (network namespaces)"),
]

RECOVERY_TIMEOUT = 30.0
FRAME_FAULTS = [("net-drop", "tx"), ("net-drop", "rx"), ("net-dup", "rx"), ("net-dup", "tx"),
                ("net-reorder", "tx"), ("net-reorder", "rx"), ("net-corrupt", "rx"),
                ("net-corrupt", "tx")]


def recovered(vm: ChaosVmKind, target: str, since: int) -> None:
    """Until ``target``'s completions pass ``since`` (the device does work again)."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT
    while vm.completions(target) <= since:
        vm.check()
        assert time.monotonic() < deadline, f"{target} did not recover"
        time.sleep(0.01)


def restarted(vm: QemuChaosVm, target: str) -> None:
    """Until the loop reports ``target``'s second run connected to QEMU."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT
    while not any(e["event"] == "device-restored" and e["name"] == target
                  and e["generation"] == 1 for e in vm.events):
        vm.poll_events()  # kept in vm.events
        vm.check()
        assert time.monotonic() < deadline, f"{target} did not come back"
        time.sleep(0.01)


def frames_hit(vm: QemuChaosVm) -> dict[str, int]:
    return dict(vm.backend_stats("net0")["device"]["frame_faults"])


def assert_clean(view: View) -> None:
    assert view.mismatches == 0, view
    assert view.errors == {"blk0": 0, "net0": 0}, view
    assert view.stopped is None, view


def test_qemu_vm_under_net_and_process_faults(tmp_path: Path) -> None:
    t0 = time.monotonic()
    vm = QemuChaosVm(tmp_path, seed=14, workloads={"blkverify", "net-stream"})
    n = 0
    with vm:
        print(f"\nVM up in {vm.start_s:.1f} s")
        assert vm.targets() == ("blk0", "net0")
        for fault, direction in FRAME_FAULTS:
            before, hits = vm.completions("net0"), frames_hit(vm)
            applied = inject(vm, Planned(n, 0.0, "net0", fault,
                                         {"direction": direction, "hold_ms": 400}))
            n += 1
            recovered(vm, "net0", max(before, vm.completions("net0")))
            mode = fault.removeprefix("net-")
            assert frames_hit(vm).get(mode, 0) > hits.get(mode, 0), (fault, direction)
            print(f"{fault} {direction}: {applied.note}, "
                  f"{time.monotonic() - applied.lifted:.2f} s to the next record")
        flaps = frames_hit(vm).get("flap", 0)
        inject(vm, Planned(n, 0.0, "net0", "link-flap", {"ms": 500}))
        assert frames_hit(vm).get("flap", 0) > flaps
        recovered(vm, "net0", vm.completions("net0"))
        assert_clean(vm.view())
        for target in ("blk0", "net0"):
            pid = vm.backend_pid(target)
            inject(vm, Planned(n, 0.0, target, "sigkill", {}))
            n += 1
            restarted(vm, target)
            assert vm.backend_pid(target) != pid
            recovered(vm, target, vm.completions(target))
        view = vm.view()
        assert_clean(view)
        assert view.progress["blk0"] > 0 and view.progress["net0"] > 0
    final = vm.final()
    print(f"final checks {final}; {time.monotonic() - t0:.1f} s in all")
    assert vm.blk_done, "blkverify did not finish its pass after SIGUSR1"
    assert final == {"qcow2_check": True, "image_pattern": True}
