"""What every VM kind of a chaos campaign offers the campaign loop.

Owns the face (:class:`ChaosVmKind`) shared by the VM kinds — the dvmm core
with SeaBIOS guests (:mod:`.vm`) and QEMU (TCG) with the Debian guest and
dvmm backends (:mod:`.vm_qemu`) — and the :class:`View` of the guest's
workload oracles.  The campaign loop (:mod:`.campaign`) and the injectors
(:mod:`.faults` and the fault families beside it) use only this face, so a
fault type runs against every VM kind that has its target device.

Targets are backend names: ``blk0``, ``net0``, ``display0``; the device
kind is the name without its number (:func:`device_of`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol


class VmError(RuntimeError):
    """The VM died or did not come up, or a fault could not be injected (one line
    plus a log tail)."""


@dataclass(frozen=True)
class View:
    """What the guest's workloads have said so far (all counters only grow)."""

    progress: dict[str, int] = field(default_factory=dict)   # per target: work verified
    errors: dict[str, int] = field(default_factory=dict)     # per target: errors the guest saw
    mismatches: int = 0          # acknowledged data altered or lost: never allowed
    stopped: str | None = None   # a workload ended (it never should)


def poll_until(what: str, ready: Callable[[], Any], check: Callable[[], None],
               timeout: float, poll: float = 0.02) -> Any:
    """Poll ``ready`` until it returns something true and return that; ``check``
    (the VM's: raises :class:`VmError` if it died) runs between two looks, and
    :class:`VmError` after ``timeout`` seconds names ``what``."""
    deadline = time.monotonic() + timeout
    while not (value := ready()):
        check()
        if time.monotonic() > deadline:
            raise VmError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)
    return value


def device_of(target: str) -> str:
    """``blk0`` -> ``blk``."""
    return re.sub(r"\d+$", "", target)


class ChaosVmKind(Protocol):
    """One running VM for (part of) a campaign; a context manager that always
    stops every process it started, by pid."""

    kind: str        # "core" | "qemu"
    work: Path

    def __enter__(self) -> ChaosVmKind: ...

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    def targets(self) -> tuple[str, ...]:
        """The backends faults can hit (``blk0``, ``net0``, ``display0``)."""

    def alive(self) -> bool:
        """The frontend (core or QEMU) runs."""

    def check(self) -> None:
        """Raise :class:`VmError` if the frontend died."""

    def completions(self, target: str) -> int:
        """A counter that moves whenever ``target`` completes guest work (blk:
        the used index; net: frames the oracle verified; display: frames
        scanned out).  Recovery is its first move after a fault was lifted."""

    def poll_events(self) -> list[dict[str, Any]]:
        """Events since the last call: ``{"event": "backend-exited" |
        "device-restored" | ..., "name": target, "ts": wall time}``."""

    def view(self) -> View:
        """The workload oracles' state."""

    def oracle(self, target: str) -> str | None:
        """A check of ``target``'s oracle once its fault recovered (display: a
        capture against guest RAM): why it broke, None when it holds."""

    def rss_mb(self) -> dict[str, float]:
        """RSS of the frontend and of every running backend, MiB."""

    def backend_pid(self, target: str) -> int | None:
        """The pid of the running backend (None while it restarts)."""

    def core_fault(self, target: str, action: str) -> dict[str, Any]:
        """A process fault through the supervisor: ``kill``, ``restart``,
        ``stop``, ``cont`` (under QEMU: the campaign's own restart loop)."""

    def backend_fault(self, target: str, **args: Any) -> dict[str, Any]:
        """A fault through the backend's command endpoint (``fault`` command;
        retried while the backend restarts)."""

    def backend_stats(self, target: str) -> dict[str, Any]:
        """The backend's ``stats`` reply (its armed faults under ``faults``)."""

    def final(self) -> dict[str, bool]:
        """Checks once the VM has stopped (after ``__exit__``): images intact,
        ``qemu-img check`` clean …"""
