"""Test helpers for dvmm: QEMU running the Linux test guest, its command
channel, and leak-proof child processes.  Re-exports the public names."""

from dvmm_testing.procs import log_tail, spawn, stop, wait_exit
from dvmm_testing.qemu import QemuGuest, QemuStartError
from dvmm_testing.serial import (
    CommandChannel,
    CommandFailed,
    CommandResult,
    GuestError,
    GuestExited,
    GuestPanic,
    GuestTimeout,
)

__all__ = [
    "CommandChannel",
    "CommandFailed",
    "CommandResult",
    "GuestError",
    "GuestExited",
    "GuestPanic",
    "GuestTimeout",
    "QemuGuest",
    "QemuStartError",
    "log_tail",
    "spawn",
    "stop",
    "wait_exit",
]
