"""The block-engine and channel fault family of a chaos campaign.

Owns how each of these fault types reaches dvmm, through its own interfaces
only, and when it is *lifted* (the moment recovery is timed from, the rule
of :mod:`.faults`):

* ``short-read`` / ``short-write`` — the blk backend's ``fault`` kinds of
  the same name (:mod:`dvmm_blk.iofaults`): the next ``count`` reads or
  writes transfer only part of their bytes and the engine must carry on.
  Lifted when the backend's ``stats`` show them consumed;
* ``enospc`` — ``fault error errno=ENOSPC op=write count=1``: the guest may
  see VIRTIO_BLK_S_IOERR (the one type here that *surfaces*).  Lifted when
  consumed;
* ``torn-write`` — the next write stores only ``percent`` % of its bytes and
  the backend SIGKILLs itself; the supervisor restarts it and the in-flight
  region replays the write in full (the link is *restored*).  Lifted at the
  core's ``backend-exited`` event;
* ``drop-kick`` / ``drop-call`` — the backend loses the next kick or call
  (:mod:`dvmm_shared.vhost_user.channel`); its lost-notification safety net
  must find the work.  Lifted when the drop happened (consumed);
* ``delay-kick`` / ``delay-call`` — the next kick or call arrives ``ms``
  late.  Lifted when the late notification was delivered.  A driver that
  polls the used ring and asks for no calls (SeaBIOS) makes no call to drop
  or delay: once its requests have completed for a while without one, the
  fault is cleared and the note says so;
* ``corrupt-msg`` — the core's vhost-user link sends the backend one
  corrupted message (``core.ctl fault action=corrupt-msg``); the backend
  drops the session and the link reconnects and replays (*restored*).
  Lifted just before the message goes out (the reconnect can finish within
  milliseconds, before the command's reply arrives).  The dvmm core is the
  frontend this needs; under QEMU the link is QEMU's own.

:data:`INJECT`, :data:`ARGS` (seeded parameters) and :data:`TYPES` (name,
surfaces, restores, help) are what the catalogue, schedule and campaign use;
a parameter missing from a planned fault takes its default.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from .faults import ARM_TIMEOUT, Applied, Injector
from .schedule import Planned
from .vmbase import ChaosVmKind, VmError, poll_until

POLL = 0.02
#: Seconds a call fault waits for a call before asking whether the driver wants any.
CALL_WAIT = 2.0


def _wait(vm: ChaosVmKind, what: str, ready: Callable[[], bool]) -> float:
    """Poll ``ready`` (deadline :data:`ARM_TIMEOUT`); the monotonic time it held."""
    poll_until(what, ready, vm.check, ARM_TIMEOUT, POLL)
    return time.monotonic()


def _armed(vm: ChaosVmKind, target: str, family: str) -> dict[str, Any]:
    """The backend's armed faults of one family (``device``/``channel``/``error``)."""
    faults = vm.backend_stats(target)["faults"]
    value = faults.get(family)
    return value if isinstance(value, dict) else {}


def _short(op: str) -> Injector:
    def inject(vm: ChaosVmKind, p: Planned) -> Applied:
        count = int(p.arg.get("count", 1))
        vm.backend_fault(p.target, kind=f"short-{op}", count=count)

        def consumed() -> bool:
            return not _armed(vm, p.target, "device").get(f"short_{op}")
        lifted = _wait(vm, f"the armed short {op}s to be consumed", consumed)
        return Applied(lifted, f"{count} short {op}(s)")
    return inject


def _enospc(vm: ChaosVmKind, p: Planned) -> Applied:
    vm.backend_fault(p.target, kind="error", errno="ENOSPC", op=str(p.arg.get("op", "write")),
                     count=int(p.arg.get("count", 1)))

    def consumed() -> bool:
        return vm.backend_stats(p.target)["faults"]["error"] is None
    return Applied(_wait(vm, "the armed ENOSPC to be consumed", consumed))


def _torn_write(vm: ChaosVmKind, p: Planned) -> Applied:
    armed = time.time()
    percent = int(p.arg.get("percent", 50))
    vm.backend_fault(p.target, kind="torn-write", percent=percent)
    seen: list[dict[str, Any]] = []

    def exited() -> bool:
        seen.extend(vm.poll_events())
        return any(e.get("event") == "backend-exited" and e.get("name") == p.target
                   and float(e.get("ts", 0)) >= armed for e in seen)
    lifted = _wait(vm, "the torn write's crash", exited)
    return Applied(lifted, f"torn at {percent} %", seen)


def _channel(kind: str) -> Injector:
    """drop-kick, drop-call: consumed when dropped; delay-*: when delivered late."""
    what = "kick" if kind.endswith("kick") else "call"

    def inject(vm: ChaosVmKind, p: Planned) -> Applied:
        args = {"ms": int(p.arg.get("ms", 200))} if kind.startswith("delay") else {
            "count": int(p.arg.get("count", 1))}
        base = vm.completions(p.target)
        vm.backend_fault(p.target, kind=kind, **args)
        note = ", ".join(f"{k}={v}" for k, v in args.items())

        def consumed() -> bool:
            ch = _armed(vm, p.target, "channel")
            return (not ch.get(f"drop_{what}s") and not ch.get(f"{what}_delay_ms")
                    and not ch.get("delayed"))
        # A driver that polls the used ring (SeaBIOS sets
        # VIRTQ_AVAIL_F_NO_INTERRUPT, virtio 1.2 2.7.10) asks for no call:
        # while its requests complete without one, there is none to lose.
        if (what == "call" and not _poll(vm, consumed, CALL_WAIT)
                and vm.completions(p.target) != base):
            vm.backend_fault(p.target, kind="clear")
            return Applied(time.monotonic(), f"{note}; the driver asked for no call "
                           "(it polls the used ring): nothing to drop")
        lifted = _wait(vm, f"the {kind} to be consumed", consumed)
        return Applied(lifted, note)
    return inject


def _poll(vm: ChaosVmKind, ready: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not ready():
        vm.check()
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True


def _corrupt_msg(vm: ChaosVmKind, p: Planned) -> Applied:
    if vm.kind != "core":
        raise VmError(f"corrupt-msg needs the dvmm core as the frontend, not {vm.kind}")
    lifted = time.monotonic()
    reply = vm.core_fault(p.target, "corrupt-msg")
    return Applied(lifted, f"mode {reply.get('mode', 'version')}")


INJECT: dict[str, Injector] = {
    "short-read": _short("read"), "short-write": _short("write"), "enospc": _enospc,
    "torn-write": _torn_write,
    "drop-kick": _channel("drop-kick"), "delay-kick": _channel("delay-kick"),
    "drop-call": _channel("drop-call"), "delay-call": _channel("delay-call"),
    "corrupt-msg": _corrupt_msg,
}


def _count(rng: random.Random) -> dict[str, Any]:
    return {"count": rng.randrange(1, 4)}


def _ms(rng: random.Random) -> dict[str, Any]:
    return {"ms": rng.randrange(50, 401)}


#: The seeded parameters of each type (the same draws as :mod:`.schedule`).
ARGS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "short-read": _count, "short-write": _count,
    "enospc": lambda rng: {"op": "write", "count": 1},
    "torn-write": lambda rng: {"percent": rng.randrange(10, 91)},
    "drop-kick": lambda rng: {"count": 1}, "drop-call": lambda rng: {"count": 1},
    "delay-kick": _ms, "delay-call": _ms,
    "corrupt-msg": lambda rng: {},
}

#: (name, surfaces: the guest may see an error, restores: the link goes down
#: and is restored, help).
TYPES: tuple[tuple[str, bool, bool, str], ...] = (
    ("short-read", False, False, "the next 1-3 disk reads transfer only part of their bytes; "
     "the engine carries on"),
    ("short-write", False, False, "the next 1-3 disk writes transfer only part of their "
     "bytes; the engine carries on"),
    ("enospc", True, False, "the next disk write fails with ENOSPC: the guest may see an "
     "I/O error"),
    ("torn-write", False, True, "the next disk write stores only part of its data, then the "
     "backend crashes; the restarted backend replays it in full"),
    ("drop-kick", False, False, "the backend loses the next kick; its lost-kick safety net "
     "finds the work"),
    ("delay-kick", False, False, "the backend sees the next kick 50-400 ms late"),
    ("drop-call", False, False, "the backend does not signal the next call; its safety net "
     "signals it"),
    ("delay-call", False, False, "the backend signals the next call 50-400 ms late"),
    ("corrupt-msg", False, True, "the core sends the backend one corrupted vhost-user "
     "message; the backend drops the session, the core reconnects and replays"),
)
