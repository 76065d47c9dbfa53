"""The two VMs ``dvmm bench recovery`` kills blk backends under.

Owns starting, describing and stopping them; what is measured, and how, is
:mod:`.recovery`'s.  Each VM is a context manager with the same small face
(:class:`RecoveryVm`): the pid of the frontend process (the one that keeps
the backend's in-flight region), the pid of the running blk backend, the
backend's socket path, what to do once a killed backend is dead, and the
timestamps of the core's events about it.

* :class:`CoreVm` — ``dvmm run`` (KVM + SeaBIOS) booting the re-read disk
  (:mod:`dvmm_core.boot.reread`: int 13h reads of one region, each compared
  with the first, ~70-200 reads/s here).  The core's supervisor restarts
  the backend (``--restart-limit 1000/60``: the default cap of 10 per minute
  would give it up) by activating its warm standby (or, with
  ``--no-standby``, a new interpreter) and its vhost-user link reconnects
  and replays.
* :class:`QemuVm` — ``qemu-system-x86_64 -accel tcg`` booting the dvmm
  Debian test guest with ``vhost-user-blk-pci`` on ``-chardev
  socket,reconnect=1`` to a ``python -m dvmm_blk`` this module restarts at
  once whenever it dies (no back-off).  The guest reads its disk with
  O_DIRECT in a loop (busybox ``dd iflag=direct``), so every read is a
  request.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from dvmm_core.boot.reread import make_reread_disk, parse_reread_output
from dvmm_core.control_cli import vm_dirs
from dvmm_core.guest import GuestArtifacts
from dvmm_core.guest.console import GuestConsole
from dvmm_shared.control import ControlError, EventSubscriber, command
from dvmm_shared.procs import Started, log_tail, spawn, stop

START_TIMEOUT = 120.0    # a VM booting to its first request (TCG boots Linux in ~4-10 s)
GUEST_APPEND = "console=ttyS0 quiet loglevel=0 panic=-1"
# Sequential 4 KiB O_DIRECT reads of the whole disk, for ever (one request per
# read), in the background so the command channel stays free for the verdict.
GUEST_LOOP = ("(while :; do dd if=/dev/vda of=/dev/null bs=4k iflag=direct 2>/dev/null; "
              "done) >/dev/null 2>&1 &")
# What Linux logs when a block request fails or hangs, or the device is reset.
GUEST_TROUBLE = ("dmesg | grep -iE 'I/O error|blk_update_request|timed out|timeout|"
                 "virtio_blk.*(reset|error)' || true")
QEMU_DISK = 64 << 20
# Event name in the core's stream -> phase name in the report.
CORE_PHASES = {"backend-exited": "exit seen", "backend-restarted": "respawned",
               "device-restored": "restored"}


class RecoveryVm(Protocol):
    name: str     # "core", "qemu": the row names
    label: str    # what it is, for people
    expected_phases: tuple[str, ...]   # what event_phases reports for every kill

    def frontend_pid(self) -> int: ...
    def backend_pid(self) -> int: ...
    def socket_path(self) -> Path: ...
    def backend_dead(self) -> None: ...
    def event_phases(self, kill_wall: float, phases: dict[str, float]) -> None: ...
    def check(self) -> None: ...
    def verdict(self) -> str | None: ...


def wait_for(what: str, ready: Any, vm: RecoveryVm, timeout: float = START_TIMEOUT) -> Any:
    """Poll ``ready()`` until it returns something true; RuntimeError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := ready()):
        vm.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{vm.label}: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)
    return value


class CoreVm(Started):
    """``dvmm run`` with one dvmm blk backend serving the re-read disk."""

    name = "core"
    label = "dvmm core (KVM + SeaBIOS)"
    expected_phases = tuple(CORE_PHASES.values())

    def __init__(self, work: Path, standby: bool = True) -> None:
        self.work, self.standby = work, standby
        if not standby:
            self.label = "dvmm core (KVM + SeaBIOS), --no-standby"
        self.disk, self.serial, self.log = work / "reread.img", work / "serial.log", \
            work / "core.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.runtime = ""
        self.events: EventSubscriber | None = None

    def start(self) -> None:
        make_reread_disk(self.disk, reads=(1 << 32) - 1, count=8)  # never ends before we do
        self.proc = spawn([sys.executable, "-m", "dvmm_core.cli", "run", "-q", "--disk",
                           str(self.disk), "--serial", f"file:{self.serial}",
                           "--restart-limit", "1000/60",
                           *([] if self.standby else ["--no-standby"])], self.log)
        pid = self.proc.pid
        self.runtime = wait_for("the core's runtime directory", lambda: next(
            (d.path for d in vm_dirs() if d.pid == pid
             and os.path.exists(os.path.join(d.path, "core.ctl"))), ""), self)
        self.events = EventSubscriber(f"ipc://{self.runtime}/events")
        self.events.wait_connected()

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
        if self.proc is not None:
            stop(self.proc, timeout=10)

    def frontend_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def backend_pid(self) -> int:
        """The running backend, once the supervisor reports it running."""
        def running() -> int:
            try:
                st = command(f"ipc://{self.runtime}/core.ctl", "status", timeout=5)
            except ControlError:
                return 0
            b = st["backends"][0]
            return int(b["pid"]) if b["state"] == "running" and b["pid"] else 0
        return int(wait_for("a running blk backend", running, self, timeout=30))

    def socket_path(self) -> Path:
        return Path(self.runtime) / "blk0.sock"

    def backend_dead(self) -> None:
        """Nothing to do: the core's supervisor restarts it."""

    def event_phases(self, kill_wall: float, phases: dict[str, float]) -> None:
        """The first of each recovery event after the kill, as seconds after it
        (the core stamps events with its own time.time() when it publishes them)."""
        assert self.events is not None
        while (ev := self.events.recv(timeout=0)) is not None:
            phase, ts = CORE_PHASES.get(str(ev.get("event"))), ev.get("ts")
            if phase and isinstance(ts, float) and ts >= kill_wall and phase not in phases:
                phases[phase] = ts - kill_wall

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"dvmm run exited with status {self.proc.returncode}:\n"
                               f"{log_tail(self.log)}")

    def verdict(self) -> str | None:
        """What the guest program says: None if every read so far was equal."""
        text = self.serial.read_text(errors="replace") if self.serial.exists() else ""
        result = parse_reread_output(text)
        if result.failure:
            return f"the guest program failed: {result.failure} (serial log {self.serial})"
        return None


class QemuVm(Started):
    """QEMU (TCG) + the Debian guest + a dvmm blk backend restarted here."""

    name = "qemu"
    label = "QEMU (TCG) + dvmm blk backend"
    expected_phases: tuple[str, ...] = ()

    def __init__(self, work: Path, artifacts: GuestArtifacts) -> None:
        self.work, self.artifacts = work, artifacts
        self.image, self.sock = work / "disk.img", work / "blk.sock"
        self.serial_log, self.qemu_log = work / "serial.log", work / "qemu.log"
        self.backend: subprocess.Popen[bytes] | None = None
        self.qemu: subprocess.Popen[bytes] | None = None
        self.chan: socket.socket | None = None
        self.console: GuestConsole | None = None
        self.generation = 0

    def start(self) -> None:
        with self.image.open("wb") as f:
            f.truncate(QEMU_DISK)
        self._spawn_backend()
        wait_for("the blk backend's socket", self.sock.exists, self, timeout=30)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.chan = ours
        with theirs:  # QEMU holds the only other end: its exit is EOF here
            self.qemu = spawn(self._qemu_argv(theirs.fileno()), self.qemu_log,
                              pass_fds=[theirs.fileno()])
        self.console = GuestConsole(ours, self.serial_log, self.check, self.qemu_log)
        self.console.wait_ready(START_TIMEOUT)
        self._command(GUEST_LOOP)

    def _qemu_argv(self, serial_fd: int) -> list[str]:
        kernel = self.artifacts.vmlinux or self.artifacts.kernel  # vmlinux: PVH, boots faster
        return ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-accel", "tcg",
                "-M", "q35", "-m", "512", "-smp", "1",
                "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
                "-numa", "node,memdev=mem", "-display", "none", "-no-reboot",
                "-chardev", f"socket,id=ser0,fd={serial_fd}", "-serial", "chardev:ser0",
                "-kernel", str(kernel), "-initrd", str(self.artifacts.initrd),
                "-append", GUEST_APPEND,
                "-chardev", f"socket,id=c0,path={self.sock},reconnect=1",
                "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"]

    def _command(self, cmd: str, timeout: float = 30.0) -> str:
        """Run ``cmd`` through the guest's serial command channel; its output."""
        assert self.console is not None
        return self.console.command(cmd, timeout)

    def _spawn_backend(self) -> None:
        log = self.work / f"blk.{self.generation}.log"
        self.backend = spawn([sys.executable, "-m", "dvmm_blk", "--socket", str(self.sock),
                              "--image", str(self.image), "--quiet"], log)
        self.generation += 1

    def close(self) -> None:
        if self.qemu is not None:
            stop(self.qemu, timeout=5)
        if self.backend is not None:
            stop(self.backend)
        if self.chan is not None:
            self.chan.close()

    def frontend_pid(self) -> int:
        assert self.qemu is not None
        return self.qemu.pid

    def backend_pid(self) -> int:
        assert self.backend is not None
        return self.backend.pid

    def socket_path(self) -> Path:
        return self.sock

    def backend_dead(self) -> None:
        """Reap it and start the next one at once, on the same socket path
        (dvmm backends bind a temporary name and rename it into place)."""
        assert self.backend is not None
        self.backend.wait()
        self._spawn_backend()

    def event_phases(self, kill_wall: float, phases: dict[str, float]) -> None:
        """QEMU publishes no events."""

    def check(self) -> None:
        for what, proc, log in (("qemu-system-x86_64", self.qemu, self.qemu_log),
                                ("the blk backend", self.backend,
                                 self.work / f"blk.{self.generation - 1}.log")):
            if proc is not None and proc.poll() is not None and proc.returncode >= 0:
                raise RuntimeError(f"{what} exited with status {proc.returncode}:\n"
                                   f"{log_tail(log)}")

    def verdict(self) -> str | None:
        """What the guest kernel logged about its disk: None if nothing."""
        trouble = self._command(GUEST_TROUBLE).strip()
        return f"the guest kernel logged: {trouble.splitlines()[0]}" if trouble else None


__all__ = ["CoreVm", "QemuVm", "RecoveryVm", "wait_for"]
