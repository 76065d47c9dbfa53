"""``dvmm events`` as a real process against a fake core's event stream.

The publisher is the real :class:`EventPublisher` (what the core uses); the
test waits for the CLI's subscription to reach it (XPUB) before publishing,
so no event is lost to the slow-joiner window and nothing sleeps.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dvmm_core.control_format import format_event

from .test_control_cli import FakeCore


@pytest.fixture
def core(tmp_path: Path) -> Iterator[FakeCore]:
    d = tmp_path / "dvmm-1-events00"
    d.mkdir()
    fake = FakeCore(d).start()
    try:
        yield fake
    finally:
        fake.close()


def events_cli(core: FakeCore, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dvmm_core.cli", "events", "--vm", str(core.dir), *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=10)


def test_history_then_live_in_json(core: FakeCore,
                                   procs: list[subprocess.Popen[str]]) -> None:
    pub = core.events()
    early = [pub.publish("backend-started", name="blk0", pid=100 + i) for i in range(2)]
    cli = events_cli(core, "--history", "--json", "--count", "5", "--timeout", "60")
    procs.append(cli)
    assert cli.stdout is not None
    seen = [json.loads(cli.stdout.readline()) for _ in early]  # printed after subscribing
    assert seen == early
    assert pub.wait_subscribed(1, timeout=10)
    late = [pub.publish("device-lost", name="blk0", outage_ms=12.5, replayed=i)
            for i in range(3)]
    out, err = cli.communicate(timeout=20)
    assert cli.returncode == 0 and err == ""
    assert [json.loads(line) for line in out.splitlines()] == late


def test_human_lines_and_sigterm(core: FakeCore, procs: list[subprocess.Popen[str]]) -> None:
    cli = events_cli(core)
    procs.append(cli)
    assert core.events().wait_subscribed(1, timeout=10)
    core.events().publish("backend-exited", name="blk0", status="killed by signal 9",
                          restart=True, code=None)
    assert cli.stdout is not None
    line = cli.stdout.readline()
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} #1 backend-exited name=blk0 "
                        r'status="killed by signal 9" restart=yes code=-\n', line)
    cli.send_signal(signal.SIGTERM)
    out, err = cli.communicate(timeout=10)
    assert cli.returncode == 0 and out == "" and err == ""


def test_closed_stdout_ends_quietly(core: FakeCore, procs: list[subprocess.Popen[str]]) -> None:
    cli = events_cli(core)
    procs.append(cli)
    assert core.events().wait_subscribed(1, timeout=10) and cli.stdout is not None
    cli.stdout.close()  # like `dvmm events | head -0`
    deadline = time.monotonic() + 20
    while cli.poll() is None and time.monotonic() < deadline:
        core.events().publish("tick")  # the next write finds the pipe closed
        try:
            cli.wait(0.05)
        except subprocess.TimeoutExpired:
            pass
    assert cli.returncode == 0
    assert cli.stderr is not None and cli.stderr.read() == ""


def test_count_not_reached_is_an_error(core: FakeCore) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dvmm_core.cli", "events", "--vm", str(core.dir),
         "--count", "3", "--timeout", "0.3"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr == "dvmm: error: timed out after 0 of 3 events\n"


def test_no_event_stream(tmp_path: Path) -> None:
    d = tmp_path / "dvmm-1-noevents"
    d.mkdir()
    out = subprocess.run([sys.executable, "-m", "dvmm_core.cli", "events", "--vm", str(d)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr == f"dvmm: error: VM {d} has no event stream (is its core running?)\n"


def test_format_event_values() -> None:
    line = format_event({"event": "x", "seq": 7, "ts": 0.25, "s": "", "q": "a=b",
                         "l": [1, "two"], "b": b"\x01", "f": 1 / 3, "n": None})
    assert line.split(" ", 1)[1] == ('#7 x s="" q="a=b" l=[1,"two"] b=01 f=0.333333 n=-')
    assert format_event({"event": "x", "ts": "bad"}).startswith("??:??:??.??? #? x")
