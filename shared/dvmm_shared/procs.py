"""Helper child processes that cannot leak (test peers, benchmark peers).

Owns how the test harness and the benchmarks start helper programs (QEMU,
backends, peers such as qemu-storage-daemon or testpmd) and how they end
them: the child dies with the test process (``PR_SET_PDEATHSIG``) even
if pytest is killed, its output goes to a log file rather than a pipe that
could fill up, and stopping is SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child receive ``sig`` when its parent dies.

    It runs between fork and exec.  The signal follows the *thread* that
    forked, so start children from a thread that lives as long as they should
    (pytest's main thread, the core's main thread do).
    """
    def preexec() -> None:  # pragma: no cover - runs in the forked child
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    return preexec


def spawn(
    argv: Sequence[str],
    log_path: Path,
    pass_fds: Sequence[int] = (),
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start *argv* with stdout and stderr appended to *log_path*, stdin null."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=tuple(pass_fds),
            env=env,
            preexec_fn=die_with_parent(),
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """End *proc*: SIGTERM, wait up to *timeout*, then SIGKILL; return its status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The exit status if *proc* ends within *timeout* seconds, else None."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def log_tail(path: Path, lines: int = 40) -> str:
    """The last *lines* lines of a log file ('' if it does not exist)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


__all__ = ["log_tail", "spawn", "stop", "wait_exit"]


class Started:
    """A context manager over ``start()`` / ``close()``: ``close`` runs when
    ``start`` fails half-way and when the block ends, so whatever ``start``
    spawned is stopped by pid in every case (the VMs of tests, benchmarks and
    chaos campaigns)."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
