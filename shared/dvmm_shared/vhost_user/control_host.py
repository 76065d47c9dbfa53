"""A backend process's command endpoint (``--control ENDPOINT``).

Owns the commands every backend answers over the control plane
(:mod:`dvmm_shared.control`) and how each one reaches the :class:`Daemon`:

* ``health`` — pid, uptime, whether a frontend is connected, connections;
* ``stats`` — the daemon's :class:`BackendStats` as plain maps, plus the
  device's own counters (a callable the backend program passes in);
* ``shutdown`` — the reply is sent, then the daemon stops as on SIGTERM;
* ``fault`` — ``kind`` is one of :data:`FAULT_KINDS`.  Process- and
  protocol-level faults go to the daemon's hooks (``service_delay``,
  ``crash_point``, ``drop_frontend`` through ``call_soon``), I/O errors to the
  device's :class:`FaultApplier` (blk's :class:`dvmm_blk.disk.FaultyDisk`);
  kinds a device adds itself (net's frame faults, blk's short transfers and
  torn write) to its :class:`DeviceFaults`; kick and call faults (``drop-kick``,
  ``delay-kick``, ``drop-call``, ``delay-call``) to the daemon's
  :mod:`.channel`.

Commands run on the control thread, not the daemon's loop: they only read
counters, set plain attributes the loop reads, or hand work to the loop with
``call_soon``.  Every argument is checked (hostile input): a bad one gets a
one-line error reply and changes nothing.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Protocol

import psutil

from ..control import CommandServer, ControlError
from .daemon import CRASH_POINTS, Daemon

DeviceStats = Callable[[], dict[str, Any]]
FAULT_KINDS = ("kill", "delay", "error", "close-socket", "crash-at", "clear")
ERROR_OPS = ("read", "write", "any")
ERRNOS = {"EIO": errno.EIO, "ENOSPC": errno.ENOSPC}
MAX_DELAY_MS = 60_000


class FaultApplier(Protocol):
    """What a device offers for ``fault error``: fail matching I/O with an errno."""

    def inject_error(self, err: int, op: str, count: int | None) -> None: ...
    def clear(self) -> None: ...
    def describe(self) -> dict[str, Any] | None:
        """The armed error (errno name, ops, remaining count), or None."""


class DeviceFaults(Protocol):
    """Fault kinds a device adds to ``fault`` (net: frames dropped, duplicated ...)."""

    kinds: tuple[str, ...]

    def apply(self, kind: str, req: dict[str, Any]) -> dict[str, Any]:
        """Arm ``kind`` with the request's arguments (ControlError if bad); the reply."""

    def clear(self) -> None: ...

    def describe(self) -> dict[str, Any] | None:
        """The armed device faults, or None."""


def add_control_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control", metavar="ENDPOINT",
                        help="serve health/stats/shutdown/fault commands on this ZeroMQ "
                             "endpoint (the dvmm core passes ipc://RUNTIME/NAME.ctl)")


def start_control(daemon: Daemon, endpoint: str, device_stats: DeviceStats | None = None,
                  faults: FaultApplier | None = None,
                  device_faults: DeviceFaults | None = None) -> CommandServer:
    """Bind ``endpoint`` and serve the backend commands on their own thread.

    Raises :class:`ControlError` when the endpoint cannot be bound."""
    return BackendControl(daemon, endpoint, device_stats, faults, device_faults).server


class BackendControl:
    """The command handlers of one backend process."""

    def __init__(self, daemon: Daemon, endpoint: str, device_stats: DeviceStats | None,
                 faults: FaultApplier | None, device_faults: DeviceFaults | None = None) -> None:
        self.daemon = daemon
        self.device_stats = device_stats
        self.faults = faults
        self.device_faults = device_faults
        self.started = psutil.Process().create_time()
        self.server = CommandServer(endpoint, {
            "health": self.health, "stats": self.stats,
            "shutdown": self.shutdown, "fault": self.fault,
        })
        self.server.start()

    def _uptime(self) -> float:
        return round(max(0.0, time.time() - self.started), 3)

    def health(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "uptime": self._uptime(),
                "frontend": self.daemon.session is not None,
                "connections": self.daemon.stats.connections}

    def stats(self, req: dict[str, Any]) -> dict[str, Any]:
        st = self.daemon.stats
        queues = dict(st.queues)  # one C-level copy: the loop may add a queue meanwhile
        return {
            "pid": os.getpid(), "uptime": self._uptime(),
            "connections": st.connections, "protocol_errors": st.protocol_errors,
            "queues": [{"index": i, **asdict(q)} for i, q in sorted(queues.items())],
            "device": self.device_stats() if self.device_stats is not None else {},
            "faults": self._armed(),
        }

    def _armed(self) -> dict[str, Any]:
        armed = {"delay_ms": round(self.daemon.service_delay * 1000),
                 "crash_point": self.daemon.crash_point,
                 "error": self.faults.describe() if self.faults is not None else None}
        if self.device_faults is not None:
            armed["device"] = self.device_faults.describe()
        armed["channel"] = self.daemon.faults.channel.faults.describe()
        return armed

    def shutdown(self, req: dict[str, Any]) -> dict[str, Any]:
        self.server.exit_after_reply(self.daemon.stop)
        return {"stopping": True}

    def fault(self, req: dict[str, Any]) -> dict[str, Any]:
        kind = req.get("kind")
        handler = {
            "kill": self._kill, "delay": self._delay, "error": self._error,
            "close-socket": self._close_socket, "crash-at": self._crash_at,
            "clear": self._clear,
        }.get(kind if isinstance(kind, str) else "")
        extra, channel = self.device_faults, self.daemon.faults.channel.faults
        if handler is None and extra is not None and kind in extra.kinds:
            assert isinstance(kind, str)
            return {"kind": kind, **extra.apply(kind, req)}
        if handler is None and kind in channel.kinds:
            assert isinstance(kind, str)
            try:
                return {"kind": kind, **channel.apply(kind, req)}
            except ValueError as exc:
                raise ControlError(f"fault {kind}: {exc}") from None
        if handler is None:
            kinds = FAULT_KINDS + channel.kinds + (extra.kinds if extra is not None else ())
            raise ControlError(f"fault kind must be one of {', '.join(kinds)}")
        return {"kind": kind, **handler(req)}

    def _kill(self, req: dict[str, Any]) -> dict[str, Any]:
        # SIGKILL only once the reply has left: the caller learns it was armed.
        self.server.exit_after_reply(lambda: os.kill(os.getpid(), signal.SIGKILL))
        return {"pid": os.getpid()}

    def _delay(self, req: dict[str, Any]) -> dict[str, Any]:
        ms = int_arg(req, "ms", 0, MAX_DELAY_MS)
        if ms is None:
            raise ControlError("fault delay needs ms (0 clears)")
        self.daemon.service_delay = ms / 1000
        return {"ms": ms}

    def _error(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.faults is None:
            raise ControlError("fault error: this backend has no I/O error injection")
        name = req.get("errno", "EIO")
        if not isinstance(name, str) or name not in ERRNOS:
            raise ControlError(f"fault error: errno must be one of {', '.join(ERRNOS)}")
        op = req.get("op", "any")
        if not isinstance(op, str) or op not in ERROR_OPS:
            raise ControlError(f"fault error: op must be one of {', '.join(ERROR_OPS)}")
        count = int_arg(req, "count", 1, 1 << 32)
        self.faults.inject_error(ERRNOS[name], op, count)
        return {"errno": name, "op": op, "count": count}

    def _close_socket(self, req: dict[str, Any]) -> dict[str, Any]:
        had = self.daemon.session is not None

        def drop() -> None:  # on the daemon's loop, between two messages
            self.daemon.drop_frontend()

        self.daemon.call_soon(drop)
        return {"frontend": had}

    def _crash_at(self, req: dict[str, Any]) -> dict[str, Any]:
        point = req.get("point")
        if not isinstance(point, str) or point not in CRASH_POINTS:
            raise ControlError(f"fault crash-at: point must be one of {', '.join(CRASH_POINTS)}")
        self.daemon.crash_point = point
        return {"point": point}

    def _clear(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.faults is not None:
            self.faults.clear()
        if self.device_faults is not None:
            self.device_faults.clear()
        self.daemon.faults.channel.faults.clear()
        self.daemon.service_delay = 0.0
        self.daemon.crash_point = None
        return {}


def int_arg(req: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    """``req[key]`` as an int in ``lo..hi``, None when absent; anything else is refused."""
    value = req.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ControlError(f"{key} must be an integer {lo}..{hi}")
    return value
