"""The supervisor's restart policy with real child processes.

The children are tiny Python programs that bind their socket and sleep (or
exit at once, or exit 0); events are recorded as the core's event sink
would receive them.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from dvmm_core.supervisor import (
    BackendState,
    RestartPolicy,
    RestartSpec,
    Supervisor,
    SupervisorError,
)

from .helpers import EventRecorder
from .test_core_supervisor import listener, wait_until


@pytest.fixture
def events() -> EventRecorder:
    return EventRecorder()


@pytest.fixture
def sup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        events: EventRecorder) -> Iterator[Supervisor]:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    s = Supervisor(on_event=events)
    yield s
    s.stop_all()


def spawn_listener(sup: Supervisor, restart: RestartSpec, name: str = "blk0") -> Any:
    b = sup.spawn(name, listener(sup.socket_path(name)), sup.socket_path(name), restart=restart)
    sup.wait_for_socket(b, timeout=15)
    return b


def test_runtime_dir_carries_the_core_pid(sup: Supervisor) -> None:
    assert os.path.basename(sup.runtime_dir).startswith(f"dvmm-{os.getpid()}-")


def test_a_killed_backend_is_restarted_on_the_same_socket(sup: Supervisor,
                                                         events: EventRecorder) -> None:
    b = spawn_listener(sup, RestartSpec())
    first = b.pid
    os.kill(first, signal.SIGKILL)
    events.wait_for("backend-restarted")
    assert b.pid != first and b.restarts == 1
    assert wait_until(lambda: b.state is BackendState.RUNNING)
    sup.wait_for_socket(b, timeout=15)
    exited = dict(events.items)["backend-exited"]
    assert exited["pid"] == first and exited["how"] == "killed by SIGKILL"
    assert events.names()[:3] == ["backend-started", "backend-exited", "backend-started"]


@pytest.mark.parametrize(("policy", "code", "restarted"), [
    (RestartPolicy.ON_FAILURE, 0, False), (RestartPolicy.ON_FAILURE, 3, True),
    (RestartPolicy.ALWAYS, 0, True), (RestartPolicy.NEVER, 3, False),
])
def test_policy_decides_on_the_exit_status(sup: Supervisor, events: EventRecorder,
                                           policy: RestartPolicy, code: int,
                                           restarted: bool) -> None:
    argv = [sys.executable, "-c", f"import sys, time; time.sleep(0.2); sys.exit({code})"]
    b = sup.spawn("b", argv, sup.socket_path("b"),
                  restart=RestartSpec(policy=policy, limit=1))
    events.wait_for("backend-exited")
    if restarted:
        events.wait_for("backend-restarted")
        assert b.restarts >= 1
    else:
        assert wait_until(lambda: b.state is BackendState.EXITED)
        assert b.restarts == 0 and "backend-restarted" not in events.names()


def test_a_backend_crashing_at_start_is_given_up_after_the_cap(sup: Supervisor,
                                                                events: EventRecorder) -> None:
    argv = [sys.executable, "-c", "import sys; sys.exit(2)"]
    b = sup.spawn("crashy", argv, sup.socket_path("crashy"),
                  restart=RestartSpec(limit=4, window=60, backoff_start=0.005))
    events.wait_for("backend-given-up", timeout=30)
    assert b.state is BackendState.GAVE_UP and b.restarts == 4
    assert events.names().count("backend-exited") == 5
    reason = dict(events.items)["backend-given-up"]["reason"]
    assert "restarted 4 times in 60 s" in reason and "exited with status 2" in reason
    assert b.info()["given_up_reason"] == reason and b.info()["pid"] is None


def test_backoff_doubles_for_quick_failures_and_is_capped() -> None:
    spec = RestartSpec(backoff_start=0.01, backoff_cap=2.0)
    assert [spec.backoff(n) for n in (1, 2, 3, 4)] == [0.01, 0.02, 0.04, 0.08]
    assert spec.backoff(30) == 2.0


def test_a_stable_backend_restarts_after_the_shortest_backoff(sup: Supervisor,
                                                              events: EventRecorder) -> None:
    b = spawn_listener(sup, RestartSpec(stable_after=0.0, backoff_start=0.01))
    for n in range(1, 4):
        os.kill(b.pid, signal.SIGKILL)
        events.wait_for("backend-restarted", n)
        assert b._quick_failures == 0
        assert wait_until(lambda: _listens(b.pid, b.socket))  # the new child, not a stale file
    assert events.names().count("backend-exited") == 3


def test_nothing_is_restarted_while_stopping(sup: Supervisor, events: EventRecorder) -> None:
    b = spawn_listener(sup, RestartSpec(policy=RestartPolicy.ALWAYS))
    sup.stop_all()
    assert wait_until(lambda: b.state is BackendState.STOPPED)
    assert "backend-restarted" not in events.names()


def test_fault_actions_through_the_supervisor(sup: Supervisor, events: EventRecorder) -> None:
    b = spawn_listener(sup, RestartSpec(policy=RestartPolicy.NEVER))
    sup.signal_backend("blk0", "stop")
    assert wait_until(lambda: _status(b.pid) == "stopped")
    sup.signal_backend("blk0", "cont")
    assert wait_until(lambda: _status(b.pid) != "stopped")
    first = b.pid
    sup.signal_backend("blk0", "restart")  # forced, whatever the policy says
    events.wait_for("backend-restarted")
    assert b.pid != first
    with pytest.raises(SupervisorError, match="no backend named 'nope'"):
        sup.signal_backend("nope", "kill")
    with pytest.raises(SupervisorError, match="unknown action"):
        sup.signal_backend("blk0", "explode")


def _listens(pid: int, path: str) -> bool:
    try:
        return any(c.laddr == path for c in psutil.Process(pid).net_connections(kind="unix"))
    except psutil.Error:
        return False


def _status(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
    return "stopped" if state in ("T", "t") else "running"


def test_policy_names_parse() -> None:
    assert RestartPolicy.parse("on-failure") is RestartPolicy.ON_FAILURE
    with pytest.raises(ValueError, match="known: always, on-failure, never"):
        RestartPolicy.parse("sometimes")


STANDBY_CHILD = """
import os, socket, sys, time
args = sys.argv[1:]
if "--standby-fd" in args:
    fd = int(args[args.index("--standby-fd") + 1])
    if not os.read(fd, 1):
        sys.exit(0)
s = socket.socket(socket.AF_UNIX)
s.bind(args[0])
s.listen()
time.sleep(60)
"""


def test_a_warm_standby_takes_over_and_a_new_one_is_prepared(
        sup: Supervisor, events: EventRecorder, monkeypatch: pytest.MonkeyPatch) -> None:
    from dvmm_core import supervisor as supervisor_mod

    monkeypatch.setattr(supervisor_mod, "STANDBY_DELAY", 0.05)
    sock = sup.socket_path("blk0")
    b = sup.spawn("blk0", [sys.executable, "-c", STANDBY_CHILD, sock], sock,
                  restart=RestartSpec(), standby=True)
    sup.wait_for_socket(b, timeout=15)
    assert wait_until(lambda: b._spare is not None)
    assert b._spare is not None
    spare_pid = b._spare[0].pid
    os.unlink(sock)
    os.kill(b.pid, signal.SIGKILL)
    events.wait_for("backend-restarted")
    assert b.pid == spare_pid  # the standby became the backend
    sup.wait_for_socket(b, timeout=15)
    assert wait_until(lambda: b._spare is not None and b._spare[0].pid != spare_pid)
    assert b._spare is not None
    last_spare = b._spare[0]
    sup.stop_all()
    assert last_spare.wait(10) == 0  # told to go away: a clean exit
