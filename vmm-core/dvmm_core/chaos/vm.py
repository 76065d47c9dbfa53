"""The VM a campaign runs against: ``dvmm run`` + SeaBIOS + one dvmm blk backend.

Owns starting it (a child ``dvmm run`` process with the chaos disk, the
serial log in a file, a restart limit no campaign reaches), reaching it
(the core's and the backend's command endpoints, the core's event stream)
and observing it from outside: whether the core lives, each process's RSS
(psutil), and the guest's completions — ``used_idx`` in the in-flight
region (vhost-user INFLIGHT_SHMFD) the core keeps for the device across
backend restarts, mapped read-only through ``/proc/CORE/fd``.  It is always
stopped by pid (:meth:`ChaosVm.close`), even when the campaign fails.
"""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
from dvmm_shared.control import ControlError, EventSubscriber, command
from dvmm_shared.inflight import queue_region_size
from dvmm_shared.procs import log_tail, spawn, stop

from .workload import SerialLog, make_disk

START_TIMEOUT = 120.0
HEADER = struct.Struct("<QHHHH")   # features; version, desc_num, last_batch_head, used_idx
INFLIGHT_NAME = "/memfd:dvmm-inflight"


class VmError(RuntimeError):
    """The VM died or did not come up (one line plus a log tail)."""


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


class ChaosVm:
    """One core VM for one campaign (a context manager)."""

    def __init__(self, work: Path, seed: int, workload: str = "blk") -> None:
        self.work, self.seed, self.workload = work, seed, workload
        self.disk, self.log = work / "chaos.img", work / "core.log"
        self.serial = SerialLog(work / "serial.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.runtime = ""
        self.digest = ""
        self.events_sub: EventSubscriber | None = None
        self.events: list[dict[str, Any]] = []
        self._map: mmap.mmap | None = None
        self._used_offset = 0

    def __enter__(self) -> ChaosVm:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        self.digest = make_disk(self.disk, self.seed, self.workload)
        self.proc = spawn([sys.executable, "-m", "dvmm_core.cli", "run", "-q", "--disk",
                           str(self.disk), "--serial", f"file:{self.serial.path}",
                           "--restart-limit", "1000000/60"], self.log)
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

    def close(self) -> None:
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
        deadline = time.monotonic() + timeout
        while not (value := ready()):
            self.check()
            if time.monotonic() > deadline:
                raise VmError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.02)
        return value

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise VmError(f"dvmm run exited with status {self.proc.returncode}:\n"
                          f"{log_tail(self.log)}")

    def used(self) -> int:
        """The device's used index (queue 0): moves with every completion."""
        m, o = self._map, self._used_offset
        assert m is not None
        return m[o] | m[o + 1] << 8

    def poll_events(self) -> list[dict[str, Any]]:
        """Events received since the last call (also kept in :attr:`events`)."""
        new = []
        while self.events_sub is not None and (ev := self.events_sub.recv(timeout=0)):
            new.append(ev)
        self.events += new
        return new

    def status(self) -> dict[str, Any]:
        return command(f"ipc://{self.runtime}/core.ctl", "status", timeout=10)

    def backend(self) -> dict[str, Any]:
        (b,) = [b for b in self.status()["backends"] if b["name"] == "blk0"]
        return dict(b)

    def core_fault(self, action: str) -> dict[str, Any]:
        return command(f"ipc://{self.runtime}/core.ctl", "fault", timeout=10, name="blk0",
                       action=action)

    def backend_fault(self, **args: Any) -> dict[str, Any]:
        """A fault through the backend's own endpoint (retried while it restarts)."""
        deadline = time.monotonic() + 30
        while True:
            try:
                b = self.backend()
                if b["state"] == "running" and b["control"]:
                    return command(b["control"], "fault", timeout=5, **args)
            except ControlError:
                if time.monotonic() > deadline:
                    raise
            self.check()
            if time.monotonic() > deadline:
                raise VmError("the blk backend did not come back to take a fault")
            time.sleep(0.02)

    def rss_mb(self) -> dict[str, float]:
        """RSS of the core and the running backend, MiB."""
        out = {}
        pids = {"core": self.proc.pid if self.proc else None}
        try:
            pids["blk0"] = self.backend().get("pid")
        except ControlError:
            pass
        for name, pid in pids.items():
            try:
                if pid:
                    out[name] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
            except psutil.Error:
                continue
        return out
