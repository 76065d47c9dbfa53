"""The display workload's oracle (dvmm_core.chaos.workload_display) on a real VM.

``dvmm run --display vnc=...`` with SeaBIOS's ramfb VGA BIOS and the screen
disk (coloured int 10h text, then halt): the oracle pins the framebuffer the
display scans out, and compares a fresh VNC capture with the framebuffer
read from the core's guest RAM memfd.  Every process fault a campaign aims
at ``display0`` — SIGKILL, a hang (SIGSTOP, SIGCONT), a clean restart
through the supervisor, the vhost-user socket closed by the backend — must
end with the display serving frames again (the oracle's completions move)
and the oracle holding; and the oracle must be able to fail: an altered
expected frame, and the display told to scan out the wrong address.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from corevm import CoreVM, wait_until
from dvmm_core.boot.screen import DRAWN, make_screen_disk
from dvmm_core.chaos.workload_display import DisplayOracle, altered
from dvmm_core.control_cli import vm_dirs
from dvmm_shared.control import ControlError, command

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/share/seabios/vgabios-ramfb.bin"),
                                reason="SeaBIOS's ramfb VGA BIOS is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DisplayVm:
    """The VM's core and display endpoints, as a campaign's VM reaches them."""

    def __init__(self, vm: CoreVM) -> None:
        assert vm.proc is not None
        self.vm, self.pid = vm, vm.proc.pid
        found: list[str] = []

        def runtime() -> bool:
            found[:] = [d.path for d in vm_dirs() if d.pid == self.pid
                        and os.path.exists(os.path.join(d.path, "core.ctl"))]
            return bool(found)
        wait_until(runtime, 60, "the core's runtime directory", vm.proc, vm.diagnostics)
        self.core = f"ipc://{found[0]}/core.ctl"

    def backend(self) -> dict[str, Any]:
        (b,) = [b for b in command(self.core, "status", timeout=5)["backends"]
                if b["name"] == "display0"]
        return dict(b)

    def control(self) -> str:
        b = self.backend()
        if b["state"] != "running" or not b["control"]:
            raise ControlError(f"display0 is {b['state']}")
        return str(b["control"])

    def stats(self) -> dict[str, Any]:
        return command(self.control(), "stats", timeout=5)

    def core_fault(self, action: str) -> None:
        command(self.core, "fault", timeout=10, name="display0", action=action)


@contextlib.contextmanager
def display_vm(tmp_path: Path) -> Iterator[tuple[DisplayVm, DisplayOracle]]:
    disk = make_screen_disk(tmp_path / "screen.img")
    args = ["--firmware", "seabios", "--memory", "128",
            "--display", f"vnc=127.0.0.1:{free_port()}", "--disk", str(disk)]
    with CoreVM(tmp_path, args) as vm:
        vm.wait_serial(DRAWN, timeout=120)
        dvm = DisplayVm(vm)
        with DisplayOracle(dvm.pid, dvm.stats) as oracle:
            fb = oracle.start(timeout=60)
            assert (fb.width, fb.height) == (1024, 768)
            yield dvm, oracle
        assert vm.stop() == 0, vm.diagnostics()
        assert "Traceback" not in vm.stderr(), vm.diagnostics()


def recovered(dvm: DisplayVm, oracle: DisplayOracle) -> None:
    """The display serves the guest's screen again (completions move)."""
    first = oracle.completions()
    wait_until(lambda: oracle.completions() > first, 60, "the display to serve frames again",
               dvm.vm.proc, dvm.vm.diagnostics)


@pytest.mark.parametrize("fault", ["sigkill", "hang", "restart", "close-socket"])
def test_display_oracle_holds_after_a_process_fault(tmp_path: Path, fault: str) -> None:
    with display_vm(tmp_path) as (dvm, oracle):
        assert oracle.check() is None
        pid = dvm.backend()["pid"]
        if fault == "sigkill":
            dvm.core_fault("kill")
        elif fault == "restart":
            dvm.core_fault("restart")
        elif fault == "hang":
            served = oracle.completions()
            dvm.core_fault("stop")
            time.sleep(0.3)  # the hang itself: what the fault is, not a wait
            assert oracle.completions() == served  # a stopped display serves nothing
            dvm.core_fault("cont")
        else:
            command(dvm.control(), "fault", timeout=5, kind="close-socket")
        if fault in ("sigkill", "restart"):
            wait_until(lambda: dvm.backend()["pid"] not in (None, pid), 60,
                       "a new display process", dvm.vm.proc, dvm.vm.diagnostics)
        recovered(dvm, oracle)
        assert oracle.check() is None
        assert oracle.captures >= 2


def test_display_oracle_catches_a_difference(tmp_path: Path) -> None:
    with display_vm(tmp_path) as (dvm, oracle):
        assert oracle.ram is not None and oracle.fb is not None
        frame = oracle.ram.framebuffer(oracle.fb)
        assert len(set(frame[i:i + 4] for i in range(0, len(frame), 4))) >= 6  # drawn text
        oracle.expected = altered(frame, 3)
        why = oracle.check()
        assert why is not None and "differs from guest RAM in 3 rows" in why, why
        oracle.expected = frame
        assert oracle.check() is None
        oracle.expected = None
        # The display told to scan out one row further on: the configuration
        # no longer is the guest's, until a restored link makes the core send
        # it again.
        fb = oracle.fb
        command(dvm.control(), "ramfb", timeout=5, addr=fb.addr + fb.stride, width=fb.width,
                height=fb.height, fourcc=fb.fourcc, stride=fb.stride)
        why = oracle.check()
        assert why is not None and "scans out" in why, why
        command(dvm.control(), "fault", timeout=5, kind="close-socket")
        wait_until(lambda: oracle.check() is None, 60, "the core to resend the ramfb config",
                   dvm.vm.proc, dvm.vm.diagnostics)


def test_display_oracle_holds_after_a_memory_limit_under_load(tmp_path: Path) -> None:
    """``cgroup-memlimit`` on display0 of the campaign's core VM while a VNC
    client keeps capturing: every frame the display sends is new memory, so
    1 MiB of headroom is soon reached and the OOM killer may end the display
    (the supervisor starts it again); afterwards the oracle holds."""
    import threading

    from dvmm_core.chaos.faults import Applied
    from dvmm_core.chaos.faults_container import INJECT
    from dvmm_core.chaos.schedule import Planned
    from dvmm_core.chaos.vm import ChaosVm

    with ChaosVm(tmp_path, 7, "blk", display=True) as vm:
        oracle = vm.screen
        assert isinstance(oracle, DisplayOracle) and oracle.check() is None
        pid = vm.backend_pid("display0")
        done: list[Applied] = []
        fault = threading.Thread(target=lambda: done.append(INJECT["cgroup-memlimit"](
            vm, Planned(0, 0.0, "display0", "cgroup-memlimit", {"hold_ms": 1000}))))
        fault.start()
        while fault.is_alive():
            oracle.check()  # load: whole-frame captures (may fail while it is killed)
        fault.join()
        (applied,) = done
        if "RLIMIT_AS instead" in applied.note:
            pytest.skip(applied.note)
        assert "memory limit" in applied.note, applied.note
        if "OOM-killed" in applied.note:
            wait_until(lambda: vm.backend_pid("display0") not in (None, pid), 60,
                       "a new display process", vm.proc)
        first = oracle.completions()
        wait_until(lambda: oracle.completions() > first, 60, "the display to serve frames",
                   vm.proc)
        assert oracle.check() is None
        assert vm.view().mismatches == 0
