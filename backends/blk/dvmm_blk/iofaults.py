"""Block-engine faults of a blk backend: short transfers and a torn write.

Owns the ``fault`` kinds ``short-read``, ``short-write`` and ``torn-write``
(:class:`BlkFaults`, the control endpoint's
:class:`~dvmm_shared.vhost_user.control_host.DeviceFaults` hook: arguments
checked as hostile input, armed from the control thread) and the process-wide
armed state (:data:`IO`) that the data path consults where the system calls
are made:

* short-read / short-write — the next ``count`` ``preadv``/``pwritev`` calls
  (the thread and inline engines' :func:`dvmm_blk.disk._vector_io`, image
  formats' file I/O) or io_uring ``READV``/``WRITEV`` operations
  (:mod:`.uring`) are made over only the first part of their buffers, so the
  kernel really returns a short count.  POSIX allows it for any read or
  write (a signal, a full disk partway, a FUSE or NFS file); the engine
  must carry on from where the call stopped, and the guest must see nothing;
* torn-write — the next write stores only its first ``percent`` % of bytes
  (not sector aligned, as a power cut inside a multi-page write leaves it)
  and the process SIGKILLs itself before completing the request: a torn
  write on a crash.  The request stays marked in flight in the vhost-user
  in-flight region (vhost-user.rst "Inflight I/O tracking"), so the
  restarted backend writes it again in full before the guest hears of it.

The unarmed fast path reads one attribute (:attr:`IoFaults.armed`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

log = logging.getLogger("dvmm.blk")

KINDS = ("short-read", "short-write", "torn-write")
MAX_COUNT = 1 << 20


class IoFaults:
    """The armed block-engine faults of this process (one disk per process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.short = {"read": 0, "write": 0}   # calls still to shorten
        self.torn_percent: int | None = None    # armed torn write: bytes kept, %
        self.armed = False
        self.shortened = 0                      # calls shortened so far, for stats

    def arm_short(self, op: str, count: int) -> None:
        with self._lock:
            self.short[op] = count
            self.armed = True

    def arm_torn(self, percent: int) -> None:
        with self._lock:
            self.torn_percent = percent
            self.armed = True

    def clear(self) -> None:
        with self._lock:
            self.short = {"read": 0, "write": 0}
            self.torn_percent = None
            self.armed = False

    def take_short(self, op: str) -> bool:
        """Whether this ``op`` ("read"/"write") call is to be shortened (counted)."""
        with self._lock:
            if not self.short.get(op):
                return False
            self.short[op] -= 1
            self.shortened += 1
            self._rearm()
        return True

    def take_torn(self) -> int | None:
        """The percentage of the next write to keep before crashing, if armed."""
        with self._lock:
            percent, self.torn_percent = self.torn_percent, None
            self._rearm()
        return percent

    def torn_armed(self) -> bool:
        return self.torn_percent is not None

    def short_armed(self, op: str) -> bool:
        return bool(self.short.get(op))

    def _rearm(self) -> None:
        self.armed = bool(self.short["read"] or self.short["write"]
                          or self.torn_percent is not None)

    def describe(self) -> dict[str, Any] | None:
        if not self.armed:
            return None
        return {"short_read": self.short["read"], "short_write": self.short["write"],
                "torn_write": self.torn_percent}


#: The process's armed block-engine faults.
IO = IoFaults()


def short_length(total: int) -> int:
    """How many bytes a shortened call moves: less than half, never 0 (a
    0-byte read means end of file) and not sector aligned (the continuation
    must cope with any count)."""
    return max(1, total // 2 - 3)


def head(bufs: list[memoryview], n: int) -> list[memoryview]:
    """The first ``n`` bytes of ``bufs`` (views, no copy)."""
    out = []
    for b in bufs:
        if n <= 0:
            break
        out.append(b[:n])
        n -= len(b)
    return out


def maybe_short(what: str, bufs: list[memoryview]) -> list[memoryview]:
    """``bufs`` or, when a short ``what`` call is armed, its head."""
    if IO.armed and IO.take_short(what):
        total = sum(map(len, bufs))
        if total > 1:
            log.warning("fault injection: short %s (%d of %d bytes)", what,
                        short_length(total), total)
            return head(bufs, short_length(total))
    return bufs


def crash_process(where: str) -> None:
    """SIGKILL this process, as a power cut or crash would (tests replace this)."""
    log.warning("fault injection: crashing %s", where)
    os.kill(os.getpid(), signal.SIGKILL)


class BlkFaults:
    """The blk backend's own ``fault`` kinds for the control endpoint."""

    kinds: tuple[str, ...] = KINDS

    def __init__(self, io: IoFaults = IO) -> None:
        self.io = io

    def apply(self, kind: str, req: dict[str, Any]) -> dict[str, Any]:
        from dvmm_shared.control import ControlError

        try:
            if kind in ("short-read", "short-write"):
                count = _int(req, "count", 1, MAX_COUNT, 1)
                self.io.arm_short(kind.removeprefix("short-"), count)
                return {"count": count}
            if kind == "torn-write":
                percent = _int(req, "percent", 1, 99, 50)
                self.io.arm_torn(percent)
                return {"percent": percent}
        except ValueError as exc:
            raise ControlError(f"fault {kind}: {exc}") from None
        raise ControlError(f"fault kind must be one of {', '.join(KINDS)}")

    def clear(self) -> None:
        self.io.clear()

    def describe(self) -> dict[str, Any] | None:
        return self.io.describe()


def _int(req: dict[str, Any], key: str, lo: int, hi: int, default: int) -> int:
    value = req.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{key} must be an integer {lo}..{hi}")
    return value
