"""Hostile ``fault`` commands: any map either arms a valid fault or is refused in one line.

The handlers run against a real (not serving) Daemon and a real FaultyDisk,
called directly; ``kill`` is left out since it ends the process by design."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dvmm_blk.disk import FaultyDisk, RawDisk
from dvmm_shared.control import ControlError
from dvmm_shared.vhost_user.control_host import BackendControl
from dvmm_shared.vhost_user.daemon import CRASH_POINTS, Daemon
from hypothesis import given, settings
from hypothesis import strategies as st

from .helpers import EchoBackend, make_image

anything = (st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats()
            | st.text(max_size=12) | st.binary(max_size=4) | st.lists(st.integers(), max_size=2))
fields = {
    "kind": st.sampled_from(["delay", "error", "close-socket", "crash-at", "clear"]) | anything,
    "ms": st.integers(-5, 70_000) | anything,
    "errno": st.sampled_from(["EIO", "ENOSPC", "EBADF"]) | anything,
    "op": st.sampled_from(["read", "write", "any", "trim"]) | anything,
    "count": st.integers(-2, 10) | anything,
    "point": st.sampled_from([*CRASH_POINTS, "never"]) | anything,
}
requests = st.fixed_dictionaries({}, optional=fields).filter(lambda r: r.get("kind") != "kill")
# Most requests name a real kind, so the argument checks behind it are reached.
well_aimed = st.fixed_dictionaries({"kind": st.sampled_from(["delay", "error", "crash-at"])},
                                   optional={k: v for k, v in fields.items() if k != "kind"})


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendControl]:
    tmp: Path = tmp_path_factory.mktemp("fault")
    daemon = Daemon(EchoBackend(), str(tmp / "echo.sock"))
    disk = FaultyDisk(RawDisk(str(make_image(tmp / "d.img", 4096))))
    ctl = BackendControl(daemon, f"ipc://{tmp}/echo.ctl", None, disk)
    try:
        yield ctl
    finally:
        ctl.server.close()
        daemon.close()
        disk.close()


@settings(max_examples=300, deadline=None)
@given(req=requests | well_aimed)
def test_fault_requests(control: BackendControl, req: dict[str, Any]) -> None:
    try:
        reply = control.fault({"cmd": "fault", **req})
    except ControlError as exc:
        assert "\n" not in str(exc) and str(exc)
    else:
        assert reply["kind"] == req["kind"]
    daemon = control.daemon
    assert 0 <= daemon.service_delay <= 60
    assert daemon.crash_point is None or daemon.crash_point in CRASH_POINTS
    armed = control.faults.describe() if control.faults is not None else None
    assert armed is None or (armed["errno"] in ("EIO", "ENOSPC")
                             and (armed["remaining"] is None or armed["remaining"] >= 1))
    control.fault({"cmd": "fault", "kind": "clear"})


@pytest.mark.parametrize("req", [
    {"kind": "error", "errno": ["EIO"]}, {"kind": "error", "op": {"a": 1}},
    {"kind": "crash-at", "point": ["after-pop"]}, {"kind": ["delay"]},
])
def test_unhashable_arguments_are_refused(control: BackendControl, req: dict[str, Any]) -> None:
    with pytest.raises(ControlError, match="must be one of"):
        control.fault({"cmd": "fault", **req})
