"""The backend supervisor with trivial Python children standing in for backends.

A "backend" here binds its socket and sleeps; variants exit early, ignore
SIGTERM, or never listen.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from dvmm_core import supervisor as supervisor_mod
from dvmm_core.supervisor import (
    Backend,
    BackendState,
    RestartPolicy,
    RestartSpec,
    Supervisor,
    SupervisorError,
)

LISTENER = textwrap.dedent("""
    import os, signal, socket, sys, time
    if "--ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.unlink(sys.argv[1])  # a killed predecessor's socket, as backends replace it
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX)
    s.bind(sys.argv[1])
    s.listen()
    time.sleep(60)
""")


NEVER = RestartSpec(policy=RestartPolicy.NEVER)


def listener(sock: str, *extra: str) -> list[str]:
    return [sys.executable, "-c", LISTENER, sock, *extra]


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Bounded poll of a condition nobody can signal us about."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Exits:
    """on_exit recorder that a test can wait on."""

    def __init__(self) -> None:
        self.backends: list[Backend] = []
        self.event = threading.Event()

    def __call__(self, backend: Backend) -> None:
        self.backends.append(backend)
        self.event.set()


@pytest.fixture
def exits() -> Exits:
    return Exits()


@pytest.fixture
def sup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exits: Exits) -> Iterator[Supervisor]:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    s = Supervisor(on_exit=exits)
    yield s
    s.stop_all()


def test_runtime_dir_is_private_and_holds_the_sockets(sup: Supervisor, tmp_path: Path) -> None:
    runtime = Path(sup.runtime_dir)
    assert runtime.parent == tmp_path and runtime.name.startswith("dvmm-")
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    assert Path(sup.socket_path("blk0")) == runtime / "blk0.sock"


def test_wait_for_socket_returns_once_the_child_listens(sup: Supervisor,
                                                        exits: Exits) -> None:
    b = sup.spawn("blk0", listener(sup.socket_path("blk0")), sup.socket_path("blk0"))
    sup.wait_for_socket(b, timeout=15)
    assert os.path.exists(b.socket)
    assert b.state is BackendState.RUNNING and b.pid > 0
    assert b.describe_exit() == "still running"
    usage = b.usage()
    assert usage["rss"] > 0 and usage["cpu"] >= 0
    assert exits.backends == []


def test_child_exiting_before_listening(sup: Supervisor, exits: Exits) -> None:
    sock = sup.socket_path("blk0")
    b = sup.spawn("blk0", [sys.executable, "-c", "import sys; sys.exit(3)"], sock, restart=NEVER)
    with pytest.raises(SupervisorError, match="blk0 exited with status 3 before listening"):
        sup.wait_for_socket(b, timeout=15)
    assert exits.event.wait(10)
    assert exits.backends == [b] and b.state is BackendState.EXITED


def test_spawn_python_runs_the_module_with_its_socket(sup: Supervisor) -> None:
    b = sup.spawn_python("net0", "dvmm_no_such_module", ["--x", "1"])
    assert b.argv == [sys.executable, "-m", "dvmm_no_such_module", "--socket",
                      sup.socket_path("net0"), "--x", "1"]
    assert b.socket == sup.socket_path("net0")
    with pytest.raises(SupervisorError, match="exited with status 1"):
        sup.wait_for_socket(b, timeout=15)


def test_a_child_that_never_listens_times_out(sup: Supervisor) -> None:
    b = sup.spawn("slow", [sys.executable, "-c", "import time; time.sleep(60)"],
                  sup.socket_path("slow"))
    t0 = time.monotonic()
    with pytest.raises(SupervisorError, match="did not listen"):
        sup.wait_for_socket(b, timeout=0.3)
    assert time.monotonic() - t0 < 5


def test_an_unstartable_backend(sup: Supervisor, tmp_path: Path) -> None:
    with pytest.raises(SupervisorError, match="cannot start backend ghost"):
        sup.spawn("ghost", [str(tmp_path / "no-such-program")], sup.socket_path("ghost"))
    assert sup.backends == []


def test_a_killed_child_is_reported(sup: Supervisor, exits: Exits) -> None:
    b = sup.spawn("blk0", listener(sup.socket_path("blk0")), sup.socket_path("blk0"),
                  restart=NEVER)
    sup.wait_for_socket(b, timeout=15)
    os.kill(b.pid, signal.SIGKILL)
    assert exits.event.wait(10), "on_exit was not called"
    assert exits.backends == [b]
    assert b.describe_exit() == "killed by SIGKILL"
    assert b.state is BackendState.EXITED and b.returncode == -signal.SIGKILL


def test_a_child_exit_status_is_reported(sup: Supervisor, exits: Exits) -> None:
    b = sup.spawn("blk0", [sys.executable, "-c", "import sys; sys.exit(7)"],
                  sup.socket_path("blk0"), restart=NEVER)
    assert exits.event.wait(10)
    assert b.describe_exit() == "exited with status 7"


def test_stop_all_terminates_children_and_removes_the_runtime_dir(sup: Supervisor,
                                                                  exits: Exits) -> None:
    children = []
    for name in ("blk0", "blk1"):
        b = sup.spawn(name, listener(sup.socket_path(name)), sup.socket_path(name))
        sup.wait_for_socket(b, timeout=15)
        children.append(b)
    runtime = sup.runtime_dir
    sup.stop_all()
    for b in children:
        assert b.proc is not None and b.proc.returncode == -signal.SIGTERM
    assert not os.path.exists(runtime)
    assert wait_until(lambda: all(b.state is BackendState.STOPPED for b in children))
    assert exits.backends == []  # a requested stop is not a crash


def test_stop_all_kills_a_child_that_ignores_sigterm(sup: Supervisor,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor_mod, "STOP_GRACE", 0.3)
    sock = sup.socket_path("stubborn")
    b = sup.spawn("stubborn", listener(sock, "--ignore-term"), sock)
    sup.wait_for_socket(b, timeout=15)  # SIGTERM is ignored by now
    sup.stop_all()
    assert b.proc is not None and b.proc.returncode == -signal.SIGKILL


def test_stop_all_keeps_a_runtime_dir_it_did_not_create(tmp_path: Path) -> None:
    given = tmp_path / "run"
    given.mkdir()
    s = Supervisor(runtime_dir=str(given))
    s.stop_all()
    assert given.is_dir()


PARENT = textwrap.dedent("""
    import sys, time
    from dvmm_core.supervisor import Supervisor
    sup = Supervisor(runtime_dir=sys.argv[1])
    b = sup.spawn("child", [sys.executable, "-c", "import time; time.sleep(60)"],
                  sup.socket_path("child"))
    print(b.pid, flush=True)
    time.sleep(60)
""")


def test_children_do_not_outlive_the_core(tmp_path: Path) -> None:
    core = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert core.stdout is not None
        child = int(core.stdout.readline())
        assert psutil.pid_exists(child)
        core.kill()
        core.wait(10)

        def gone() -> bool:
            try:
                return psutil.Process(child).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        assert wait_until(gone), "the backend survived the core (PR_SET_PDEATHSIG)"
    finally:
        if core.poll() is None:
            core.kill()
        core.wait(10)
