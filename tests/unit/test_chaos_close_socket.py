"""A close-socket injection whose link is back before the fault command
returns still counts as recovered (``dvmm chaos``'s timing of "lifted").

The backend drops the session on its loop while its control thread answers
the command, and the core reconnects in a few ms: sometimes (about one drop
in a hundred under the blk-write workload) the core's ``device-restored``
event is stamped before the answer reaches the campaign.  Timing recovery
from when the command returned threw that event away, and a guest that went
on writing was reported as hung ("not recovered", a new VM).  The VM here
stands for that order of events exactly: the restore is stamped, then the
answer comes back, then the guest completes requests.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from dvmm_core.chaos import campaign
from dvmm_core.chaos.faults import inject
from dvmm_core.chaos.scenario import FAULTS
from dvmm_core.chaos.schedule import Planned

#: How long after the restore the command's answer arrives.
ANSWER_LAG = 0.002


class FastRestoreVm:
    """The parts of a ChaosVmKind a close-socket injection and its recovery
    use; the link is restored inside the fault command."""

    kind = "core"

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.restored = False
        self.used = 0

    def backend_fault(self, target: str, **req: Any) -> dict[str, Any]:
        assert req == {"kind": "close-socket"}
        stamp = time.time()  # the core's event, as the drop and reconnect finish
        self.events.append({"event": "device-restored", "name": target, "ts": stamp})
        self.restored = True
        while time.time() < stamp + ANSWER_LAG:  # then the answer travels back
            pass
        return {"kind": "close-socket"}

    def poll_events(self) -> list[dict[str, Any]]:
        new, self.events = self.events, []
        return new

    def completions(self, target: str) -> int:
        if self.restored:  # the guest goes on: every look sees one more request
            self.used += 1
        return self.used

    def check(self) -> None:
        pass


def test_a_link_restored_before_the_command_returns_is_recovered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(campaign, "RECOVERY_TIMEOUT", 1.0)  # (the failure case's wait)
    vm = FastRestoreVm()
    p = Planned(index=0, time=0.1, target="blk0", fault="close-socket", arg={})
    assert FAULTS["close-socket"].restores
    applied = inject(vm, p)  # type: ignore[arg-type]
    recovered = campaign._recover(vm, "blk0", applied.lifted,  # type: ignore[arg-type]
                                  FAULTS["close-socket"].restores, applied.events)
    assert recovered is not None
    assert recovered >= ANSWER_LAG  # timed from the request, the answer's trip included
