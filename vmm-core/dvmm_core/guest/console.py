"""The host end of the test guest's serial command channel.

Owns the framing of ``init.sh`` (beside this module) from the host's side:
waiting for the READY line, sending a command as one base64 line, and
taking its output from between the BEGIN and END markers.  The channel is
one end of a socket pair whose other end QEMU holds (``-chardev
socket,fd=N``); everything the guest prints is appended to a log file.
Used by :class:`dvmm_bench.recovery_vms.QemuVm` and the chaos campaigns'
QEMU VM kind (:mod:`dvmm_core.chaos.vm_qemu`).
"""

from __future__ import annotations

import base64
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path

from dvmm_shared.procs import log_tail

READY = b"@@DVMM-READY@@\n"   # the test guest's /init: its serial command channel is up


class ConsoleError(RuntimeError):
    """The guest did not answer in time, or QEMU closed the console."""


class GuestConsole:
    """Commands to the guest's /init over ``chan``; ``check`` raises if the VM died."""

    def __init__(self, chan: socket.socket, log: Path, check: Callable[[], None],
                 qemu_log: Path | None = None) -> None:
        self.chan, self.log, self.check, self.qemu_log = chan, log, check, qemu_log
        self.commands = 0

    def wait_ready(self, timeout: float) -> None:
        self.read_until(READY, timeout, "the guest to come up")

    def command(self, cmd: str, timeout: float = 30.0) -> str:
        """Run ``cmd`` in the guest (``sh -c``); its output."""
        return self.command_status(cmd, timeout)[0]

    def command_status(self, cmd: str, timeout: float = 30.0) -> tuple[str, int]:
        """Run ``cmd`` in the guest; its output and exit status."""
        self.commands += 1
        cid = self.commands
        self.chan.sendall(f"{cid} {base64.b64encode(cmd.encode()).decode()}\n".encode())
        end = f"@@DVMM-END {cid} ".encode()
        text = self.read_until(end, timeout, f"command {cmd!r}")
        begin = f"@@DVMM-BEGIN {cid}@@\n".encode()
        status = text.rsplit(end, 1)[1].split(b"@@", 1)[0]
        out = text.split(begin, 1)[-1].rsplit(b"\n@@DVMM-END", 1)[0]
        return out.decode(errors="replace"), int(status or b"-1")

    def read_until(self, marker: bytes, timeout: float, what: str) -> bytes:
        """The guest's console up to ``marker`` (and the rest of its line), also
        appended to the log."""
        seen = b""
        deadline = time.monotonic() + timeout
        with self.log.open("ab") as log:
            while marker not in seen or not seen.endswith(b"\n"):
                self.check()
                if time.monotonic() > deadline:
                    raise ConsoleError(f"timed out after {timeout:.0f} s waiting for {what} in "
                                       f"the QEMU guest; {self.log}:\n{log_tail(self.log)}")
                if select.select([self.chan], [], [], 0.5)[0]:
                    chunk = self.chan.recv(65536)
                    if not chunk:
                        tail = log_tail(self.qemu_log) if self.qemu_log else ""
                        raise ConsoleError(f"QEMU closed the guest console:\n{tail}")
                    log.write(chunk)
                    seen += chunk
        return seen
