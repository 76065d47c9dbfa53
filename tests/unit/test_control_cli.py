"""``dvmm status``, ``dvmm fault`` and VM discovery against a fake core and a real backend.

The core is faked only at its I/O edge: a CommandServer on ``core.ctl``
answering ``status``/``fault``/``events`` as the core does.  The blk backend
is a real ``dvmm_blk`` process with ``--control`` in the same runtime
directory, serving a real image to a SyntheticVM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dvmm_core.cli import main
from dvmm_shared.control import (
    CommandServer,
    ControlError,
    EventPublisher,
    events_endpoint,
    runtime_endpoint,
)
from dvmm_shared.synthetic import SyntheticVM
from dvmm_shared.virtio import VirtioBlkReqType as T

from .helpers import BlkProcess, blk_backend, make_image
from .test_blk_e2e import ALL_FEATURES, IOERR, OK, complete, post, status
from .test_control_backend import wait_for_file


@dataclass
class FakeCore:
    """The core's control endpoints, answering from plain data."""

    dir: Path
    backends: list[dict[str, Any]] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    server: CommandServer | None = None
    pub: EventPublisher | None = None

    def start(self) -> FakeCore:
        self.server = CommandServer(runtime_endpoint(str(self.dir), "core"), {
            "status": lambda req: {"vm": {"pid": os.getpid(), "uptime": 12.5,
                                          "state": "running"}, "backends": self.backends},
            "fault": self.fault,
            "events": lambda req: {"events": list(self.events().history)},
        })
        self.server.start()
        self.pub = EventPublisher(events_endpoint(str(self.dir)))
        return self

    def events(self) -> EventPublisher:
        assert self.pub is not None
        return self.pub

    def fault(self, req: dict[str, Any]) -> dict[str, Any]:
        if req.get("name") not in [b["name"] for b in self.backends]:
            raise ControlError(f"no backend named {req.get('name')!r}")
        self.faults.append(req)
        return {"name": req["name"], "action": req["action"]}

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.pub is not None:
            self.pub.close()


def backend_entry(name: str, pid: int | None, control: str | None, **extra: Any) -> dict[str, Any]:
    entry = {"name": name, "pid": pid, "state": "running" if pid else "given-up",
             "restarts": 0, "uptime": 3.0, "policy": "on-failure", "control": control,
             "external": False, "last_exit": None, "given_up_reason": None}
    return {**entry, **extra}


@pytest.fixture
def vmdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    d = tmp_path / f"dvmm-{os.getpid()}-abcd1234"
    d.mkdir()
    return d


@pytest.fixture
def core(vmdir: Path) -> Iterator[FakeCore]:
    fake = FakeCore(vmdir).start()
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def blk(vmdir: Path, core: FakeCore) -> Iterator[BlkProcess]:
    image = make_image(vmdir / "disk.img", 64 * 512)
    endpoint = runtime_endpoint(str(vmdir), "blk0")
    with blk_backend(vmdir, image, "--control", endpoint) as b:
        wait_for_file(vmdir / "blk0.ctl", b.proc)
        core.backends[:] = [
            backend_entry("blk0", b.proc.pid, endpoint, restarts=2,
                          last_exit="killed by signal 9", link="connected"),
            backend_entry("net0", None, None, given_up_reason="crashed 10 times in 60 s"),
        ]
        yield b


def dvmm(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_status_table(blk: BlkProcess, vmdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with SyntheticVM(mem_size=1 << 20) as vm:
        vm.connect(str(blk.socket), ALL_FEATURES)
        r = post(vm, vm.rings[0], T.IN, 1, in_len=2048)
        complete(vm.rings[0], 1)
        rc, out, err = dvmm(capsys, "status")  # the only live VM: found without --vm
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"VM pid {os.getpid()}  state running  up 12.5s  runtime {vmdir}"
    assert lines[1].split() == ["NAME", "PID", "STATE", "LINK", "RESTARTS", "UPTIME", "RSS",
                                "CPU", "I/O", "POLICY"]
    row = lines[2].split()
    assert row[:6] == ["blk0", str(blk.proc.pid), "running", "connected", "2", "3.0s"]
    assert "r 1/2.0K w 0/0 fl 0 err 0" in lines[2]
    assert lines[3].split()[:4] == ["net0", "-", "given-up", "-"] and " - " in lines[3]
    assert lines[4:] == ["blk0: last exit: killed by signal 9",
                         "net0: given up: crashed 10 times in 60 s"]
    assert status(vm, r) == OK


def test_status_json(blk: BlkProcess, core: FakeCore, vmdir: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    core.backends.append(backend_entry("mute", os.getpid(), runtime_endpoint(str(vmdir), "x")))
    rc, out, _ = dvmm(capsys, "status", "--pid", str(os.getpid()), "--json")
    assert rc == 0
    report = json.loads(out)
    assert report["runtime_dir"] == str(vmdir) and report["vm"]["state"] == "running"
    blk0, net0, mute = report["backends"]
    assert blk0["rss"] > 0 and blk0["cpu_s"] >= 0 and blk0["stats"]["pid"] == blk.proc.pid
    assert blk0["stats"]["device"]["reads"] == 0 and "ok" not in blk0["stats"]
    assert net0["rss"] is None and net0["stats"] is None
    assert mute["stats"] is None  # its endpoint does not answer: "-" in the table


def test_process_faults_go_to_the_core(blk: BlkProcess, core: FakeCore,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    for action in ("kill", "stop", "cont", "restart"):
        rc, out, _ = dvmm(capsys, "fault", "blk0", action)
        assert rc == 0 and out == f"blk0: {action} done\n"
    assert [f["action"] for f in core.faults] == ["kill", "stop", "cont", "restart"]
    assert blk.proc.poll() is None  # the fake core does not carry them out


def test_engine_and_channel_faults_are_armed_through_the_cli(
        blk: BlkProcess, core: FakeCore, capsys: pytest.CaptureFixture[str]) -> None:
    for args, done in ((["short-read", "2"], "short-read done (count=2)"),
                       (["short-write"], "short-write done (count=1)"),
                       (["torn-write"], "torn-write done (percent=50)"),
                       (["drop-call", "3"], "drop-call done (count=3)"),
                       (["delay-kick", "40"], "delay-kick done (ms=40)")):
        rc, out, _ = dvmm(capsys, "fault", "blk0", *args)
        assert rc == 0 and out == f"blk0: {done}\n"
    rc, out, _ = dvmm(capsys, "status", "--pid", str(os.getpid()), "--json")
    faults = json.loads(out)["backends"][0]["stats"]["faults"]
    assert faults["device"] == {"short_read": 2, "short_write": 1, "torn_write": 50}
    assert faults["channel"]["drop_calls"] == 3 and faults["channel"]["kick_delay_ms"] == 40
    assert dvmm(capsys, "fault", "blk0", "clear")[0] == 0
    assert dvmm(capsys, "fault", "blk0", "corrupt-msg", "size")[0] == 0
    assert core.faults[-1] == {"cmd": "fault", "name": "blk0", "action": "corrupt-msg",
                              "mode": "size"}


def test_error_fault_reaches_the_guest(blk: BlkProcess,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with SyntheticVM(mem_size=1 << 20) as vm:
        vm.connect(str(blk.socket), ALL_FEATURES)
        ring = vm.rings[0]
        rc, out, _ = dvmm(capsys, "fault", "blk0", "error", "eio", "--op", "read")
        assert rc == 0 and out == "blk0: error done (errno=EIO op=read count=None)\n"
        reads = [post(vm, ring, T.IN, s, in_len=512) for s in (1, 2)]
        complete(ring, 2)
        assert [status(vm, r) for r in reads] == [IOERR, IOERR]
        assert dvmm(capsys, "fault", "blk0", "clear")[0] == 0
        r = post(vm, ring, T.IN, 1, in_len=512)
        complete(ring, 1)
        assert status(vm, r) == OK


@pytest.mark.parametrize(("args", "text"), [
    (["fault", "blk0", "melt"], "unknown fault 'melt'; one of: kill, stop"),
    (["fault", "nope", "kill"], "no backend named 'nope'"),
    (["fault", "nope", "clear"], "no backend named 'nope' in VM"),
    (["fault", "net0", "clear"], "backend 'net0' has no control endpoint"),
    (["fault", "blk0", "delay"], "fault delay needs MS"),
    (["fault", "blk0", "delay", "soon"], "MS must be an integer"),
    (["fault", "blk0", "kill", "now"], "fault kill takes no argument"),
    (["fault", "blk0", "kill", "--count", "2"], "--op and --count go with fault error only"),
    (["fault", "blk0", "error", "EBADF"], "errno must be one of EIO, ENOSPC"),
    (["fault", "blk0", "delay-kick"], "fault delay-kick needs MS"),
    (["fault", "blk0", "short-read", "many"], "fault short-read: COUNT must be an integer"),
    (["fault", "blk0", "torn-write", "100"], "percent must be an integer 1..99"),
    (["status", "--vm", "/nonexistent/dvmm-1-x"], "no VM runtime directory"),
    (["status", "--pid", "999999999"], "no VM with core pid 999999999"),
])
def test_one_line_errors(blk: BlkProcess, capsys: pytest.CaptureFixture[str],
                         args: list[str], text: str) -> None:
    rc, out, err = dvmm(capsys, *args)
    assert rc == 1 and out == ""
    assert err.startswith("dvmm: error: ") and text in err and err.count("\n") == 1


def test_discovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    rc, _, err = dvmm(capsys, "status")
    assert rc == 1 and f"no running VM found (no live dvmm-PID-* in {tmp_path})" in err
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (tmp_path / f"dvmm-{dead.stdout.strip()}-dead0000").mkdir()  # its core is gone
    rc, _, err = dvmm(capsys, "status")
    assert rc == 1 and "no running VM found" in err
    mine = tmp_path / f"dvmm-{os.getpid()}-live0000"
    parent = tmp_path / f"dvmm-{os.getppid()}-live1111"
    mine.mkdir()
    parent.mkdir()
    rc, _, err = dvmm(capsys, "status")
    assert rc == 1 and err.count("\n") == 1
    assert f"several VMs are running: {parent} (pid {os.getppid()})" in err or \
        f"several VMs are running: {mine} (pid {os.getpid()})" in err
    assert "choose one with --vm DIR or --pid N" in err
    rc, _, err = dvmm(capsys, "status", "--pid", str(os.getpid()))
    assert rc == 1 and f"no control endpoint at {mine}/core.ctl" in err
