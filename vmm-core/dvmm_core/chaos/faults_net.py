"""The network fault family: frames dropped, duplicated, reordered, corrupted;
the link down, then up.

Owns injecting them into a VM's net backend through its command endpoint
(``fault`` kinds of :mod:`dvmm_net.faults`, which says what each does to a
frame and why a corrupted frame is one the receiver detects) and when each
is *lifted*: the fault is armed for ``hold_ms`` (``ms`` for a link flap)
in one direction (``rx``: to the guest, ``tx``: from it) and expires in
the backend by itself; lifted is when the backend's ``stats`` no longer
show it armed.  None surfaces to the guest: TCP retransmits what was lost
or spoiled and drops what was duplicated, so the net-stream oracle must
see every record, in order and intact.

:data:`INJECT` joins :func:`.faults.injectors`; :data:`ARGS` are the seeded
parameters (the same as :mod:`.schedule` draws) and :data:`TYPES` the
catalogue's entries of the family, as (name, surfaces, restores, help).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from .catalogue import FAULTS
from .faults import Applied, Injector, _wait
from .schedule import Planned
from .vmbase import ChaosVmKind

NAMES = ("net-drop", "net-dup", "net-reorder", "net-corrupt", "link-flap")
LIFT_TIMEOUT = 10.0   # an armed fault the backend does not let go of after its time


def _armed(vm: ChaosVmKind, target: str) -> bool:
    """Whether the backend still holds a frame fault (a new run holds none)."""
    return bool(vm.backend_stats(target)["faults"].get("device"))


def _hold(vm: ChaosVmKind, p: Planned, ms: int, **args: Any) -> Applied:
    reply = vm.backend_fault(p.target, ms=ms, **args)
    time.sleep(ms / 1000)
    _wait(vm, f"the {p.fault} on {p.target} to expire", lambda: not _armed(vm, p.target),
          LIFT_TIMEOUT)
    return Applied(time.monotonic(), f"{reply.get('direction', 'both')} for {ms} ms")


def _frames(mode: str) -> Injector:
    def inject(vm: ChaosVmKind, p: Planned) -> Applied:
        return _hold(vm, p, int(p.arg["hold_ms"]), kind=f"net-{mode}",
                     direction=str(p.arg["direction"]))
    inject.__name__ = f"_net_{mode}"
    inject.__doc__ = f"{mode} the frames of one direction for hold_ms."
    return inject


def _link_flap(vm: ChaosVmKind, p: Planned) -> Applied:
    """No frame forwarded either way for ms (QEMU keeps the LINK_UP bit itself)."""
    return _hold(vm, p, int(p.arg["ms"]), kind="link-flap")


INJECT: dict[str, Injector] = {
    "net-drop": _frames("drop"), "net-dup": _frames("dup"),
    "net-reorder": _frames("reorder"), "net-corrupt": _frames("corrupt"),
    "link-flap": _link_flap,
}


def _frame_args(rng: random.Random) -> dict[str, Any]:
    return {"direction": rng.choice(("rx", "tx")), "hold_ms": rng.randrange(300, 1001)}


def _flap_args(rng: random.Random) -> dict[str, Any]:
    return {"ms": rng.randrange(200, 1001)}


ARGS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    **{n: _frame_args for n in NAMES[:4]}, "link-flap": _flap_args,
}

TYPES: tuple[tuple[str, bool, bool, str], ...] = tuple(
    (n, FAULTS[n].surfaces, FAULTS[n].restores, FAULTS[n].help) for n in NAMES)
