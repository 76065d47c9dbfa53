"""Helpers for the core tier: run ``dvmm run`` as a real process and watch it.

The core runs on real KVM with real SeaBIOS; its serial console and the
firmware's debug port go to files, which tests wait on (bounded by a
timeout) instead of sleeping.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SEABIOS = "/usr/share/seabios/bios.bin"
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1bc")


def dvmm_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvmm_core.cli", *args]


def clean(data: bytes) -> str:
    return ANSI.sub(b"", data).decode(errors="replace")


def wait_until(check: Callable[[], bool], timeout: float, what: str,
               proc: subprocess.Popen[bytes] | None = None,
               diagnostics: Callable[[], str] = lambda: "") -> None:
    """Poll ``check`` until it holds; fail with ``what`` and diagnostics."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"dvmm exited ({proc.returncode}) before {what}\n"
                                 f"{diagnostics()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                                 f"{diagnostics()}")
        time.sleep(0.1)


@dataclass
class CoreVM:
    """A ``dvmm run`` process with its serial and firmware logs in ``workdir``."""

    workdir: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    stderr_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.stderr_path = self.workdir / "dvmm.stderr"

    @property
    def serial_path(self) -> Path:
        return self.workdir / "serial.log"

    @property
    def firmware_path(self) -> Path:
        return self.workdir / "firmware.log"

    def start(self) -> CoreVM:
        argv = dvmm_argv("run", "--serial", f"file:{self.serial_path}",
                         "--firmware-log", str(self.firmware_path), *self.args)
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._err)
        return self

    def serial(self) -> str:
        return clean(self.serial_path.read_bytes()) if self.serial_path.exists() else ""

    def firmware(self) -> str:
        return clean(self.firmware_path.read_bytes()) if self.firmware_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def diagnostics(self) -> str:
        return (f"--- serial ---\n{self.serial()[-3000:]}\n--- firmware log ---\n"
                f"{self.firmware()[-3000:]}\n--- dvmm stderr ---\n{self.stderr()[-3000:]}")

    def wait_serial(self, text: str, timeout: float = 60.0, count: int = 1) -> str:
        wait_until(lambda: self.serial().count(text) >= count, timeout,
                   f"{count} x {text!r} on the serial console", self.proc, self.diagnostics)
        return self.serial()

    def wait_firmware(self, text: str, timeout: float = 60.0) -> str:
        wait_until(lambda: text in self.firmware(), timeout,
                   f"{text!r} in the firmware log", self.proc, self.diagnostics)
        return self.firmware()

    def wait_stderr(self, text: str, timeout: float = 30.0) -> str:
        wait_until(lambda: text in self.stderr(), timeout, f"{text!r} on dvmm's stderr",
                   self.proc, self.diagnostics)
        return self.stderr()

    def backends(self) -> list[psutil.Process]:
        assert self.proc is not None
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._err.close()
        return rc

    def __enter__(self) -> CoreVM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def kvm_usable() -> str | None:
    """Why the core tier cannot run here (None when it can)."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible"
    if not os.path.exists(SEABIOS):
        return f"{SEABIOS} is missing (install seabios)"
    return None
