"""A test-only ``hostile`` control command: the backend acts as if compromised.

Owns what a backend armed with ``--test-hooks`` does on ``hostile``
(issue 12's hostile-backend test): from inside its sandbox, with its real
privileges, it tries one thing a compromised device model would try, and
answers how the attempt ended.  Each attempt is logged on the backend's
stderr with its outcome, so the refusal shows in the VM's log.

``kind``:

* ``open`` ``path`` -- open a host file for reading (the sandbox's mount
  namespace hides it: ENOENT; or DAC refuses it);
* ``connect`` ``host`` ``port`` -- a TCP connection (seccomp refuses
  ``socket(AF_INET)``: EPERM);
* ``exec`` -- ``execve("/bin/sh")`` (seccomp kills the backend: SIGSYS;
  there is no reply);
* ``ptrace`` -- ``PTRACE_ATTACH`` to the parent (seccomp kills: SIGSYS);
* ``fork`` -- a new process (``clone`` without ``CLONE_THREAD``: EPERM);
* ``guest-write`` ``addr`` -- write guest memory at an address outside the
  regions the frontend gave (the memory map refuses it; nothing else of the
  guest is mapped in this process);
* ``syscall`` ``nr`` -- any raw system call (for policy tests).

Never armed unless the backend was started with ``--test-hooks`` (a hidden
option); the plain control plane has no such command.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from .control import CommandServer, ControlError
from .memory import GuestMemoryError
from .vhost_user.daemon import Daemon

log = logging.getLogger("dvmm.sandbox")

PTRACE_ATTACH = 16
_libc = ctypes.CDLL(None, use_errno=True)


def install(server: CommandServer, daemon: Daemon) -> None:
    """Add ``hostile`` to a backend's command server."""
    kinds: dict[str, Callable[[dict[str, Any]], object]] = {
        "open": _open, "connect": _connect, "exec": _exec, "ptrace": _ptrace,
        "fork": _fork, "syscall": _syscall,
        "guest-write": lambda req: _guest_write(daemon, req),
    }

    def hostile(req: dict[str, Any]) -> dict[str, Any]:
        kind = req.get("kind")
        attempt = kinds.get(kind) if isinstance(kind, str) else None
        if attempt is None:
            raise ControlError(f"hostile: kind must be one of {', '.join(kinds)}")
        log.warning("test hook: hostile %s %s", kind,
                    {k: v for k, v in req.items() if k not in ("cmd", "kind")})
        try:
            result = attempt(req)
        except (OSError, GuestMemoryError) as exc:
            err = exc.errno if isinstance(exc, OSError) and exc.errno else None
            name = errno.errorcode.get(err, "") if err else type(exc).__name__
            log.warning("test hook: hostile %s refused: %s (%s)", kind, exc, name)
            return {"kind": kind, "refused": True, "errno": name, "error": str(exc)}
        log.error("test hook: hostile %s was NOT refused: %r", kind, result)
        return {"kind": kind, "refused": False, "result": repr(result)[:200]}

    server.handlers["hostile"] = hostile


def _str(req: dict[str, Any], key: str) -> str:
    value = req.get(key)
    if not isinstance(value, str) or not value:
        raise ControlError(f"hostile: {key} must be a non-empty string")
    return value


def _int(req: dict[str, Any], key: str) -> int:
    value = req.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ControlError(f"hostile: {key} must be a non-negative integer")
    return value


def _open(req: dict[str, Any]) -> object:
    with open(_str(req, "path"), "rb") as f:
        return f.read(64)


def _connect(req: dict[str, Any]) -> object:
    with socket.create_connection((_str(req, "host"), _int(req, "port")), timeout=2) as s:
        return s.getpeername()


def _exec(req: dict[str, Any]) -> object:
    os.execv("/bin/sh", ["sh", "-c", "echo escaped"])
    return None  # pragma: no cover - execv does not return


def _ptrace(req: dict[str, Any]) -> object:
    return _raw(_libc.ptrace, PTRACE_ATTACH, os.getppid(), 0, 0)


def _fork(req: dict[str, Any]) -> object:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - only if the policy let it through
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _syscall(req: dict[str, Any]) -> object:
    return _raw(_libc.syscall, _int(req, "nr"), 0, 0, 0)


def _raw(fn: Any, *args: int) -> int:
    rc = int(fn(*[ctypes.c_long(a) for a in args]))
    if rc == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def _guest_write(daemon: Daemon, req: dict[str, Any]) -> object:
    session = daemon.session
    if session is None:
        raise ControlError("hostile guest-write: no frontend connected")
    addr = _int(req, "addr")
    session.mem.write(addr, b"\xcc" * 8)
    return addr
