"""The serial console on a pseudo-terminal (issue 15): ``dvmm run`` with its
stdin and stdout on a pty, the counter boot program echoing every byte its
UART receives (``dvmm-count: echo HH``).

* escape sequences behave the same whichever way the input is cut into
  reads (each split is forced: the next part is written only once the pty
  holds no unread input) and sent in one write;
* the guest receives exactly the bytes that are not part of an escape;
* Ctrl-A x quits cleanly, the monitor prompt runs ``info status`` and
  ``system_reset``, and the terminal mode afterwards equals the mode before.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import termios
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from corevm import clean, dvmm_argv, wait_until
from dvmm_core.boot.counter import BOOTED, make_counter_disk, parse_counter

A = b"\x01"


class PtyVM:
    """``dvmm run`` on a pty: the test holds the master and a slave fd."""

    def __init__(self, workdir: Path, disk: Path, *extra: str, stdout: int | None = None) -> None:
        self.master, self.slave = os.openpty()
        self.mode_before = termios.tcgetattr(self.slave)
        self.out = bytearray()
        self.stderr_path = workdir / "dvmm.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                dvmm_argv("run", "--disk", str(disk), *extra), stdin=self.slave,
                stdout=self.slave if stdout is None else stdout, stderr=err,
                start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.out += data

    def text(self) -> str:
        return clean(bytes(self.out))

    def diagnostics(self) -> str:
        return (f"--- pty ---\n{self.text()[-3000:]}\n--- stderr ---\n"
                f"{self.stderr_path.read_text(errors='replace')[-3000:]}")

    def wait_text(self, text: str, count: int = 1, timeout: float = 90) -> None:
        wait_until(lambda: self.text().count(text) >= count, timeout,
                   f"{count} x {text!r} on the console", self.proc, self.diagnostics)

    def unread(self) -> int:
        """Bytes written to the pty that dvmm has not read yet (TIOCINQ)."""
        buf = fcntl.ioctl(self.slave, termios.FIONREAD, b"\0\0\0\0")
        value: int = struct.unpack("i", buf)[0]
        return value

    def send(self, *parts: bytes) -> None:
        """Each part in its own read: the next goes once the last was consumed."""
        for part in parts:
            os.write(self.master, part)
            wait_until(lambda: self.unread() == 0, 30, "dvmm to read its input", self.proc,
                       self.diagnostics)

    def echoed(self) -> bytes:
        return parse_counter(self.text()).echoed

    def wait_echoed(self, expected: bytes, timeout: float = 60) -> None:
        wait_until(lambda: len(self.echoed()) >= len(expected), timeout,
                   f"the guest to echo {len(expected)} bytes", self.proc,
                   lambda: f"echoed {self.echoed()!r}\n{self.diagnostics()}")
        assert self.echoed() == expected, self.diagnostics()

    def mode(self) -> list[Any]:
        return termios.tcgetattr(self.slave)

    def close(self) -> int:
        """SIGTERM (if still running) and the exit status; the pty stays open."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def release(self) -> None:
        self.close()
        os.close(self.slave)
        os.close(self.master)


@pytest.fixture
def counter_disk(tmp_path: Path) -> Path:
    return make_counter_disk(tmp_path / "counter.img", delay=3000)


@pytest.fixture
def pty_vm(tmp_path: Path, counter_disk: Path) -> Iterator[PtyVM]:
    vm = PtyVM(tmp_path, counter_disk)
    try:
        vm.wait_text(BOOTED)
        yield vm
    finally:
        vm.release()


#: Guest bytes around every escape: C-a C-a (one C-a through), C-a z and C-a t
#: (keys without a meaning: dropped).  C-a h is tested on its own: its text may
#: land in the middle of a guest line (as with QEMU's mux) and hide an echo.
SEQUENCE = b"ab" + A + A + b"cd" + A + b"z" + b"ef" + A + b"t" + b"gh"
THROUGH = b"ab\x01cdefgh"


def test_firmware_escape_sequences_split_anywhere(pty_vm: PtyVM) -> None:
    expected = b""
    for cut in range(1, len(SEQUENCE)):
        pty_vm.send(SEQUENCE[:cut], SEQUENCE[cut:])
        expected += THROUGH
        pty_vm.wait_echoed(expected)
    pty_vm.send(SEQUENCE)  # all in one write
    expected += THROUGH
    pty_vm.wait_echoed(expected)
    pty_vm.send(A, b"h", A + b"?")
    pty_vm.wait_text("Ctrl-a x    exit dvmm", count=2)
    pty_vm.send(b"z")
    pty_vm.wait_echoed(expected + b"z")  # the help keys sent nothing
    assert pty_vm.close() == 0
    assert pty_vm.mode() == pty_vm.mode_before


@pytest.mark.parametrize("parts", [[A + b"x"], [A, b"x"], [b"q" + A, b"x"],
                                   [b"q", A + b"x"]], ids=["one-write", "split", "q-a|x",
                                                           "q|a-x"])
def test_firmware_ctrl_a_x_quits_and_restores_the_terminal(tmp_path: Path, counter_disk: Path,
                                                           parts: list[bytes]) -> None:
    vm = PtyVM(tmp_path, counter_disk)
    try:
        vm.wait_text(BOOTED)
        assert vm.mode() != vm.mode_before  # raw while it runs
        vm.send(*parts[:-1])
        os.write(vm.master, parts[-1])
        assert vm.proc.wait(timeout=30) == 0, vm.diagnostics()
        assert vm.mode() == vm.mode_before
        assert b"x" not in vm.echoed() and A not in vm.echoed()
        assert "Traceback" not in vm.diagnostics()
    finally:
        vm.release()


def test_firmware_monitor_prompt(pty_vm: PtyVM) -> None:
    pty_vm.send(A + b"c")
    pty_vm.wait_text("(dvmm) ")
    pty_vm.send(b"info status\r")
    pty_vm.wait_text("VM status: running")
    pty_vm.send(b"stop\r", b"info status\r")
    pty_vm.wait_text("VM status: paused")
    pty_vm.send(b"cont\r", b"info stat", b"\x7f\x7fatus\r")  # with backspaces
    pty_vm.wait_text("VM status: running", count=2)
    banners = pty_vm.text().count("SeaBIOS (version")
    pty_vm.send(b"system_reset\r")
    pty_vm.wait_text("(dvmm) ", count=6)
    held = len(pty_vm.out)
    pty_vm.send(A + b"c")  # back to the guest: what it printed meanwhile comes out
    pty_vm.wait_text("SeaBIOS (version", count=banners + 1)
    pty_vm.wait_text(BOOTED, count=2)
    assert len(pty_vm.out) > held
    pty_vm.send(b"xy")
    pty_vm.wait_echoed(b"xy")  # monitor input never reached the guest
    pty_vm.send(A + b"c", b"quit\r")
    assert pty_vm.proc.wait(timeout=30) == 0, pty_vm.diagnostics()
    assert pty_vm.mode() == pty_vm.mode_before


def test_firmware_sigterm_restores_the_terminal(pty_vm: PtyVM) -> None:
    assert pty_vm.mode() != pty_vm.mode_before
    assert pty_vm.close() == 0
    assert pty_vm.mode() == pty_vm.mode_before


def test_firmware_closed_stdout_hands_the_terminal_back(tmp_path: Path,
                                                       counter_disk: Path) -> None:
    read_end, write_end = os.pipe()
    vm = PtyVM(tmp_path, counter_disk, stdout=write_end)
    os.close(write_end)
    try:
        first = os.read(read_end, 1)  # the console writes...
        assert first
        wait_until(lambda: vm.mode() != vm.mode_before, 60, "raw mode", vm.proc,
                   vm.diagnostics)
        os.close(read_end)  # ...until its reader goes away
        wait_until(lambda: vm.mode() == vm.mode_before, 60, "the terminal mode back",
                   vm.proc, vm.diagnostics)
        assert vm.proc.poll() is None  # the VM runs on; Ctrl-C works again
        assert vm.close() == 0
    finally:
        vm.release()
