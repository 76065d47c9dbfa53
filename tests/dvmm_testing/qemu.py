"""QEMU (TCG) running the dvmm Linux test guest, for conformance tests.

Owns the QEMU command line, the QEMU process lifecycle (start, wait for the
guest's READY, power off, kill) and the log directory (``serial.log``: every
byte from the guest's ttyS0; ``qemu.log``: QEMU's own stdout/stderr).  The
serial port is one end of a ``socketpair`` handed to QEMU as
``-chardev socket,fd=N``: no path to race on, nothing lost before we connect,
and EOF the moment QEMU exits.  Talking to the guest is
:class:`dvmm_testing.serial.CommandChannel`.

Usage::

    with QemuGuest(["-drive", f"file={img},if=virtio,format=raw"]) as vm:
        assert vm.check("blockdev --getsize64 /dev/vda").strip() == "1048576"
"""

from __future__ import annotations

import contextlib
import enum
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from dvmm_core.guest import GuestArtifacts, build_guest

from dvmm_testing import procs
from dvmm_testing.serial import (
    CommandChannel,
    CommandFailed,
    CommandResult,
    GuestError,
    GuestExited,
)

BASE_APPEND = "console=ttyS0 quiet loglevel=0 panic=-1"
_POWEROFF_TIMEOUT = 15.0


class QemuStartError(GuestError):
    """QEMU exited before the guest came up (bad arguments, missing backend...)."""


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class QemuGuest:
    """One QEMU process booting the test guest; a context manager.

    *extra_args* are appended to the QEMU command line (devices, chardevs,
    drives); *append* to the kernel command line.  With *pvh* (default) QEMU
    boots the uncompressed vmlinux through its PVH entry when the artifacts
    have one, ~2.5 s faster under TCG than the bzImage.  QEMU runs with
    ``-nodefaults``: no default NIC, VGA, monitor or serial besides ours.
    With *log_dir* None a temporary directory is used and removed on a clean
    exit; it is kept (and named in the error) when the block raised.
    """

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        *,
        artifacts: GuestArtifacts | None = None,
        memory_mb: int = 512,
        cpus: int = 1,
        append: str = "",
        boot_timeout: float = 120.0,
        pvh: bool = True,
        log_dir: Path | None = None,
        qemu_binary: str = "qemu-system-x86_64",
    ) -> None:
        self.artifacts = artifacts
        self.extra_args = list(extra_args)
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.append = append
        self.boot_timeout = boot_timeout
        self.pvh = pvh
        self.qemu_binary = qemu_binary
        self._own_log_dir = log_dir is None
        self.log_dir = (
            log_dir if log_dir is not None else Path(tempfile.mkdtemp(prefix="dvmm-qemu-"))
        )
        self.serial_log = self.log_dir / "serial.log"
        self.qemu_log = self.log_dir / "qemu.log"
        self.state = State.NEW
        self.boot_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._chan: CommandChannel | None = None

    # -- lifecycle ----------------------------------------------------------

    def __enter__(self) -> QemuGuest:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if exc_type is None and self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def start(self) -> None:
        """Start QEMU and wait until the guest's command channel is up."""
        if self.state is not State.NEW:
            raise RuntimeError(f"QemuGuest.start() in state {self.state.value}")
        arts = self.artifacts if self.artifacts is not None else build_guest(log=lambda _m: None)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        t0 = time.monotonic()
        with theirs:  # QEMU holds the only other copy: its exit means EOF for us
            self._proc = self._spawn(arts, theirs.fileno())
        self._chan = CommandChannel(ours, self.serial_log)
        self.state = State.RUNNING
        try:
            self._chan.wait_ready(self.boot_timeout)
        except GuestError as exc:
            raise self._boot_failure(exc) from None
        self.boot_seconds = time.monotonic() - t0

    def _spawn(self, arts: GuestArtifacts, fd: int) -> subprocess.Popen[bytes]:
        self.qemu_log.unlink(missing_ok=True)  # a reused log_dir starts afresh
        try:
            return procs.spawn(self.argv(arts, fd), self.qemu_log, pass_fds=[fd])
        except OSError as exc:
            raise QemuStartError(f"cannot run {self.qemu_binary}: {exc}") from None

    def argv(self, arts: GuestArtifacts, serial_fd: int) -> list[str]:
        """The full QEMU command line."""
        mem = self.memory_mb
        cmdline = f"{BASE_APPEND} {self.append}".strip()
        return [
            self.qemu_binary, "-nodefaults", "-no-user-config",
            "-accel", "tcg", "-M", "q35", "-m", str(mem), "-smp", str(self.cpus),
            "-object", f"memory-backend-memfd,id=mem,size={mem}M,share=on",
            "-numa", "node,memdev=mem",
            "-display", "none", "-no-reboot",
            "-chardev", f"socket,id=ser0,fd={serial_fd}", "-serial", "chardev:ser0",
            "-kernel", str(self._kernel(arts)), "-initrd", str(arts.initrd),
            "-append", cmdline,
            *self.extra_args,
        ]  # fmt: skip

    def _kernel(self, arts: GuestArtifacts) -> Path:
        return arts.vmlinux if self.pvh and arts.vmlinux is not None else arts.kernel

    def _boot_failure(self, exc: GuestError) -> GuestError:
        """Stop QEMU; if it exited by itself, QEMU's own words are the news."""
        status = self.stop()
        if not isinstance(exc, GuestExited):
            return exc
        qemu_says = f"{self.qemu_log}:\n{procs.log_tail(self.qemu_log)}"
        if self.serial_log.stat().st_size == 0:
            return QemuStartError(
                f"QEMU exited with status {status} before the guest ran; {qemu_says}"
            )
        return GuestExited(f"{exc}\n--- QEMU exit status {status}, {qemu_says}")

    def stop(self) -> int | None:
        """Power the guest off (or kill QEMU if the guest cannot listen); QEMU's status.

        Idempotent.  A guest that is booting or still running a timed-out
        command would never read ``poweroff -f``, so QEMU is killed at once.
        """
        if self.state is not State.RUNNING:
            return self._proc.returncode if self._proc is not None else None
        self.state = State.STOPPED
        proc, chan = self._qemu(), self._channel()
        if chan.idle and proc.poll() is None:
            with contextlib.suppress(GuestError):
                chan.submit("poweroff -f")
                chan.drain(_POWEROFF_TIMEOUT)  # EOF when QEMU exits
        status = procs.stop(proc, timeout=2.0)
        chan.drain(1.0)
        chan.close()
        return status

    # -- commands -----------------------------------------------------------

    def run(self, cmd: str, timeout: float = 60.0) -> CommandResult:
        """Run *cmd* (``sh -c``) in the guest: exit status and stdout+stderr."""
        self._require_running()
        return self._channel().run(cmd, timeout)

    def check(self, cmd: str, timeout: float = 60.0) -> str:
        """Run *cmd*; return its output, raise CommandFailed if it exits non-zero."""
        result = self.run(cmd, timeout)
        if result.rc != 0:
            raise CommandFailed(cmd, result, self.serial_log)
        return result.output

    def poweroff(self) -> int:
        """Power the guest off (``poweroff -f``) and wait for QEMU to exit; its status."""
        self._require_running()
        status = self.stop()
        assert status is not None
        return status

    @property
    def pid(self) -> int:
        return self._qemu().pid

    def _require_running(self) -> None:
        if self.state is not State.RUNNING:
            raise RuntimeError(f"guest is {self.state.value}, not running")

    def _qemu(self) -> subprocess.Popen[bytes]:
        assert self._proc is not None
        return self._proc

    def _channel(self) -> CommandChannel:
        assert self._chan is not None
        return self._chan
