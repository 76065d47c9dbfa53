"""The core VM kind of a campaign: ``dvmm run`` + SeaBIOS + dvmm backends.

Owns starting it (a child ``dvmm run`` process with the chaos disk, the
serial log in a file, a restart limit no campaign reaches; with the display
workload a display backend serving VNC on a free loopback port; the
backends under the phase's runner), reaching it (the core's and the
backends' command endpoints, the core's event stream) and observing it
from outside: whether the core lives, each process's RSS (psutil), and the
guest's completions — ``used_idx`` in the in-flight region (vhost-user
INFLIGHT_SHMFD) the core keeps for the disk across backend restarts,
mapped read-only through ``/proc/CORE/fd``.  It is always stopped by pid
(:meth:`ChaosVm.close`), even when the campaign fails.  The face it offers
the campaign is :class:`.vmbase.ChaosVmKind`.
"""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from dvmm_shared.control import ControlError, EventSubscriber, command
from dvmm_shared.inflight import queue_region_size
from dvmm_shared.procs import Started, log_tail, spawn, stop

from .vmbase import View, VmError, poll_until
from .workload import SerialLog, check_writes, data_digest, make_disk

__all__ = ["ChaosVm", "VmError"]

START_TIMEOUT = 120.0
HEADER = struct.Struct("<QHHHH")   # features; version, desc_num, last_batch_head, used_idx
INFLIGHT_NAME = "/memfd:dvmm-inflight"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _inflight_map(pid: int) -> mmap.mmap | None:
    """The core's in-flight region of its one disk, read-only (None before it exists)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if not os.readlink(path).startswith(INFLIGHT_NAME):
                continue
            f = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            size = os.fstat(f).st_size
            return mmap.mmap(f, size, mmap.MAP_SHARED, mmap.PROT_READ) if size else None
        finally:
            os.close(f)
    return None


class ChaosVm(Started):
    """One core VM for one campaign phase (a context manager)."""

    kind = "core"

    def __init__(self, work: Path, seed: int, workload: str = "blk", *,
                 display: bool = False, runner: str = "process") -> None:
        self.work, self.seed, self.workload = work, seed, workload
        self.display, self.runner = display, runner
        self.disk, self.log = work / "chaos.img", work / "core.log"
        self.serial = SerialLog(work / "serial.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.runtime = ""
        self.digest = ""
        self.vnc_port = 0
        self.events_sub: EventSubscriber | None = None
        self.events: list[dict[str, Any]] = []
        self.screen: Any = None     # the display oracle (workload_display), with display
        self._map: mmap.mmap | None = None
        self._used_offset = 0

    def targets(self) -> tuple[str, ...]:
        return ("blk0", "display0") if self.display else ("blk0",)

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "dvmm_core.cli", "run", "-q", "--disk", str(self.disk),
                "--serial", f"file:{self.serial.path}", "--restart-limit", "1000000/60",
                "--backend-runner", self.runner,
                "--qmp", f"unix:{self.work / 'qmp.sock'},server=on,wait=off"]
        if self.display:
            self.vnc_port = _free_port()
            argv += ["--display", f"vnc=127.0.0.1:{self.vnc_port}"]
        return argv

    def start(self) -> None:
        self.digest = make_disk(self.disk, self.seed, self.workload)
        self.proc = spawn(self.argv(), self.log)
        from dvmm_core.control_cli import vm_dirs

        pid = self.proc.pid
        self.runtime = self.wait("the core's runtime directory", lambda: next(
            (d.path for d in vm_dirs() if d.pid == pid
             and os.path.exists(os.path.join(d.path, "core.ctl"))), ""))
        self.events_sub = EventSubscriber(f"ipc://{self.runtime}/events")
        self.events_sub.wait_connected()
        self.wait("the guest program to boot", lambda: self.serial.view().booted)
        self._map = self.wait("the disk's in-flight region", lambda: _inflight_map(pid))
        desc_num = HEADER.unpack_from(self._map, 0)[2]
        if not desc_num or queue_region_size(desc_num) > len(self._map):
            raise VmError("the core's in-flight region has an unknown layout")
        self._used_offset = 14
        first = self.used()
        self.wait("the guest's first completions", lambda: self.used() != first)
        if self.display:
            from .workload_display import DisplayOracle, OracleError

            self.screen = DisplayOracle(pid, lambda: self.backend_stats("display0"),
                                        ("127.0.0.1", self.vnc_port))
            try:
                self.screen.start()
            except OracleError as exc:
                raise VmError(f"display workload: {exc}") from None

    def close(self) -> None:
        if self.screen is not None:
            self.screen.close()
        if self.events_sub is not None:
            self.events_sub.close()
            self.events_sub = None
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.proc is not None:
            stop(self.proc, timeout=15)

    # -- observing ----------------------------------------------------------------
    def wait(self, what: str, ready: Any, timeout: float = START_TIMEOUT) -> Any:
        return poll_until(what, ready, self.check, timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise VmError(f"dvmm run exited with status {self.proc.returncode}:\n"
                          f"{log_tail(self.log)}")

    def used(self) -> int:
        """The disk's used index (queue 0): moves with every completion."""
        m, o = self._map, self._used_offset
        assert m is not None
        return m[o] | m[o + 1] << 8

    def completions(self, target: str) -> int:
        if target == "display0" and self.screen is not None:
            return int(self.screen.completions())
        return self.used()

    def oracle(self, target: str) -> str | None:
        """display0: a fresh VNC capture against the framebuffer in guest RAM."""
        if target == "display0" and self.screen is not None:
            why: str | None = self.screen.check()
            return why
        return None

    def view(self) -> View:
        g = self.serial.view()
        errors = {"blk0": g.read_errors}
        mismatches = g.mismatches
        stopped = g.stopped
        return View({"blk0": g.progress}, errors, mismatches, stopped)

    def poll_events(self) -> list[dict[str, Any]]:
        """Events received since the last call (also kept in :attr:`events`)."""
        new = []
        while self.events_sub is not None and (ev := self.events_sub.recv(timeout=0)):
            new.append(ev)
        self.events += new
        return new

    def status(self) -> dict[str, Any]:
        return command(f"ipc://{self.runtime}/core.ctl", "status", timeout=10)

    def backend(self, target: str = "blk0") -> dict[str, Any]:
        (b,) = [b for b in self.status()["backends"] if b["name"] == target]
        return dict(b)

    def backend_pid(self, target: str) -> int | None:
        try:
            b = self.backend(target)
        except ControlError:
            return None
        return int(b["pid"]) if b.get("pid") and b["state"] == "running" else None

    def core_fault(self, target: str, action: str) -> dict[str, Any]:
        return command(f"ipc://{self.runtime}/core.ctl", "fault", timeout=10, name=target,
                       action=action)

    def backend_fault(self, target: str, **args: Any) -> dict[str, Any]:
        """A fault through the backend's own endpoint (retried while it restarts)."""
        return self._backend_command(target, "fault", **args)

    def backend_stats(self, target: str) -> dict[str, Any]:
        return self._backend_command(target, "stats")

    def _backend_command(self, target: str, name: str, **args: Any) -> dict[str, Any]:
        """``name`` on the backend's endpoint, retried while it restarts.  A
        ``stats`` request sent to a process that is exiting is lost (the new
        process binds the same endpoint): it is retried after 0.3 s, not 5, or
        the oracle would time a restart by its own wait (measured: 4 of 30
        display restarts read 5.03 s instead of 0.1-0.5 s).  A ``fault`` is
        never resent (it may have been carried out), so it waits longer."""
        deadline = time.monotonic() + 30
        timeout = 5.0 if name == "fault" else 0.3
        while True:
            try:
                b = self.backend(target)
                if b["state"] == "running" and b["control"]:
                    return command(b["control"], name, timeout=timeout, **args)
            except ControlError:
                if time.monotonic() > deadline:
                    raise
            self.check()
            if time.monotonic() > deadline:
                raise VmError(f"the {target} backend did not come back to take a {name}")
            time.sleep(0.02)

    def diagnose(self, target: str) -> str:
        """Where the target's rings and in-flight entries stand (for a failed
        recovery's note): a request the guest made and nobody answers shows."""
        try:
            b = self.backend(target)
        except (ControlError, ValueError) as exc:
            return f"no status: {exc}"
        inflight = ""
        if target == "blk0" and self._map is not None:
            _, _, desc_num, last, used = HEADER.unpack_from(self._map, 0)
            marked = [i for i in range(desc_num) if self._map[HEADER.size + 16 * i]]
            inflight = f"; in-flight region used_idx {used} last_batch_head {last} " \
                       f"marked {marked}"
        return f"{target} {b.get('state')} link {b.get('link')} rings {b.get('rings')}" \
               f"{inflight}; vCPU {self._registers()}"

    def _registers(self) -> str:
        """The vCPU's instruction pointer and flags, through the VM's QMP socket."""
        import json
        import socket

        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(self.work / "qmp.sock"))
                f = s.makefile("rwb")
                f.readline()
                for cmd in ({"execute": "qmp_capabilities"},
                            {"execute": "human-monitor-command",
                             "arguments": {"command-line": "info registers"}}):
                    f.write(json.dumps(cmd).encode() + b"\n")
                    f.flush()
                    while "return" not in (reply := json.loads(f.readline())) \
                            and "error" not in reply:
                        pass
            text = str(reply.get("return", reply))
        except (OSError, ValueError) as exc:
            return f"(no registers: {exc})"
        keep = [w for w in text.split() if w.split("=")[0] in ("RIP", "EIP", "EFL", "CS", "IP")]
        return " ".join(keep) or text[:200]

    def rss_mb(self) -> dict[str, float]:
        """RSS of the core and the running backends, MiB."""
        out = {}
        pids = {"core": self.proc.pid if self.proc else None}
        for t in self.targets():
            pids[t] = self.backend_pid(t)
        for name, pid in pids.items():
            try:
                if pid:
                    out[name] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
            except psutil.Error:
                continue
        return out

    def final(self) -> dict[str, bool]:
        """Once stopped: the image holds what the workload says it must."""
        if "blk-write" in self.workload.split("+"):
            return {"image_writes": check_writes(self.disk, self.serial.view().progress)
                    is None}
        return {"image_unchanged": data_digest(self.disk) == self.digest}
