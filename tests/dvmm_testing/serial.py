"""Host side of the guest's serial command channel.

Owns the framing spoken by the test guest's ``/init``
(``vmm-core/dvmm_core/guest/init.sh``) over a connected stream socket that
carries the guest's ttyS0, and the serial log file every received byte goes
to.  It does not start or stop QEMU (see :mod:`dvmm_testing.qemu`).

Framing::

    host -> guest  b"<id> <base64 of the command>\\n"
    guest -> host  b"@@DVMM-BEGIN <id>@@\\n" OUTPUT b"\\n@@DVMM-END <id> <rc>@@\\n"
    once at boot   b"@@DVMM-READY@@\\n"

OUTPUT is the command's stdout and stderr, byte for byte (the guest tty is
raw: no echo, no ``\\r`` added).  The command travels as base64 so no byte
of it can be taken for tty control or a line end; ids only grow, so the
output of a command that timed out can never be mistaken for a later one's.
Bytes outside BEGIN..END (boot messages, kernel messages) are only logged.
"""

from __future__ import annotations

import base64
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from dvmm_testing.procs import log_tail

READY = b"@@DVMM-READY@@\n"
PANIC = b"Kernel panic - not syncing"
_PANIC_END = b"---[ end Kernel panic"
_RECV_SIZE = 1 << 16
_PANIC_GRACE = 5.0  # seconds to collect the panic trace before giving up
_SEND_TIMEOUT = 30.0  # the guest reads a line in microseconds unless it is wedged


@dataclass(frozen=True)
class CommandResult:
    """Exit status and combined stdout+stderr of one guest command."""

    rc: int
    output: str


class GuestError(Exception):
    """Something went wrong with the guest; the message ends with the serial log tail."""

    def __init__(self, message: str, log_path: Path | None = None) -> None:
        if log_path is not None:
            tail = log_tail(log_path)
            message = f"{message}\n--- serial log {log_path} (tail) ---\n{tail}"
        super().__init__(message)
        self.log_path = log_path


class GuestTimeout(GuestError):
    """The guest did not answer in time (boot or command)."""


class GuestPanic(GuestError):
    """The guest kernel panicked."""


class GuestExited(GuestError):
    """The channel closed: QEMU exited (poweroff, reset with -no-reboot, crash)."""


class CommandFailed(GuestError):
    """``check()``: the command exited non-zero."""

    def __init__(self, cmd: str, result: CommandResult, log_path: Path | None) -> None:
        super().__init__(
            f"guest command {cmd!r} exited with {result.rc}; output:\n{result.output}", log_path
        )
        self.cmd = cmd
        self.result = result


class CommandChannel:
    """Runs shell commands in the guest over its serial port."""

    def __init__(self, sock: socket.socket, log_path: Path) -> None:
        self._sock = sock
        self.log_path = log_path
        self._log = log_path.open("wb")
        self._buf = bytearray()
        self._next_id = 1
        self._eof = False
        self._panicked = False
        self._ready = False
        self._busy = False

    # -- public -------------------------------------------------------------

    def wait_ready(self, timeout: float) -> None:
        """Block until the guest's /init announces the channel."""
        self._consume_through(re.compile(re.escape(READY)), time.monotonic() + timeout, "boot")
        self._ready = True

    def run(self, cmd: str, timeout: float = 60.0) -> CommandResult:
        """Run *cmd* with ``sh -c`` in the guest; return its status and output."""
        cid = self.submit(cmd)
        deadline = time.monotonic() + timeout
        what = f"command {cmd!r}"
        self._consume_through(re.compile(rb"@@DVMM-BEGIN %d@@\n" % cid), deadline, what)
        end = re.compile(rb"\n@@DVMM-END %d (\d+)@@\n" % cid)
        output, (rc,) = self._consume_through(end, deadline, what)
        self._busy = False
        return CommandResult(int(rc), output.decode("utf-8", "replace"))

    def submit(self, cmd: str) -> int:
        """Send *cmd* without waiting for it (``poweroff -f`` never answers); its id."""
        cid = self._next_id
        self._next_id += 1
        self._busy = True
        line = f"{cid} {base64.b64encode(cmd.encode()).decode()}\n"
        self._sock.settimeout(_SEND_TIMEOUT)
        try:
            self._sock.sendall(line.encode())
        except TimeoutError:
            raise GuestTimeout(f"guest not reading command {cmd!r}", self.log_path) from None
        except OSError as exc:  # EPIPE/ECONNRESET: QEMU is gone
            self._eof = True
            raise GuestExited(f"cannot send {cmd!r}: {exc}", self.log_path) from None
        return cid

    @property
    def idle(self) -> bool:
        """READY was seen and every command sent so far has answered."""
        return self._ready and not self._busy and not self._eof

    def drain(self, timeout: float) -> None:
        """Log whatever the guest still sends until EOF or *timeout*."""
        deadline = time.monotonic() + timeout
        while not self._eof and self._recv(deadline):
            self._buf.clear()

    def close(self) -> None:
        self._sock.close()
        self._log.close()

    @property
    def panicked(self) -> bool:
        return self._panicked

    # -- reading ------------------------------------------------------------

    def _consume_through(
        self, pattern: re.Pattern[bytes], deadline: float, what: str
    ) -> tuple[bytes, tuple[bytes, ...]]:
        """Read until *pattern* matches; drop the buffer through the match.

        Returns the bytes before the match and the match's groups.
        """
        start = 0
        while (m := pattern.search(self._buf, start)) is None:
            start = max(0, len(self._buf) - 64)  # markers are shorter than 64 bytes
            if self._panicked or not self._recv(deadline):
                raise self._failure(what)
        before, groups = bytes(self._buf[: m.start()]), tuple(bytes(g) for g in m.groups())
        del self._buf[: m.end()]
        return before, groups

    def _recv(self, deadline: float) -> bool:
        """Read one chunk into the buffer and log; False on EOF or timeout."""
        remaining = deadline - time.monotonic()
        if self._eof or remaining <= 0:
            return False
        self._sock.settimeout(remaining)
        try:
            data = self._sock.recv(_RECV_SIZE)
        except TimeoutError:
            return False
        except ConnectionResetError:
            data = b""
        self._eof = not data
        self._log.write(data)
        self._log.flush()
        self._note_panic(data)
        self._buf += data
        return bool(data)

    def _note_panic(self, data: bytes) -> None:
        """Spot a panic (the marker may straddle two reads: look at the buffer end)."""
        if not self._panicked and PANIC in self._buf[-len(PANIC) :] + data:
            self._panicked = True

    def _failure(self, what: str) -> GuestError:
        if self._panicked:
            self._collect_panic()
            return GuestPanic(f"guest kernel panicked while waiting for {what}", self.log_path)
        if self._eof:
            return GuestExited(f"guest serial closed (QEMU exited) during {what}", self.log_path)
        return GuestTimeout(f"timed out waiting for {what}", self.log_path)

    def _collect_panic(self) -> None:
        """Log the rest of the panic report (panic=-1 then ends QEMU: EOF)."""
        deadline = time.monotonic() + _PANIC_GRACE
        while _PANIC_END not in self._buf and self._recv(deadline):
            pass
