"""The control-plane library: commands (REQ/REP) and events (PUB/SUB) over real ipc sockets."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from dvmm_shared.control import (
    HISTORY_LEN,
    CommandServer,
    ControlError,
    EventPublisher,
    EventSubscriber,
    Handler,
    command,
    events_endpoint,
    pack,
    runtime_endpoint,
    unpack,
)


def echo(req: dict[str, Any]) -> dict[str, Any]:
    return {"echo": {k: v for k, v in req.items() if k != "cmd"}}


def boom(req: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("disk on fire\nsecond line")


def refuse(req: dict[str, Any]) -> dict[str, Any]:
    raise ControlError("not now")


def not_a_map(req: dict[str, Any]) -> Any:
    return [1, 2]


HANDLERS: dict[str, Handler] = {
    "health": lambda req: {"pid": os.getpid()},
    "echo": echo,
    "boom": boom,
    "refuse": refuse,
    "unpackable": lambda req: {"value": object()},
    "notamap": not_a_map,
}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CommandServer]:
    srv = CommandServer(runtime_endpoint(str(tmp_path), "test"), HANDLERS)
    srv.start()
    try:
        yield srv
    finally:
        srv.close()


def test_endpoint_names() -> None:
    assert runtime_endpoint("/run/x", "blk0") == "ipc:///run/x/blk0.ctl"
    assert runtime_endpoint("/run/x", "core") == "ipc:///run/x/core.ctl"
    assert events_endpoint("/run/x") == "ipc:///run/x/events"


def test_command_round_trip(server: CommandServer) -> None:
    assert command(server.endpoint, "health") == {"ok": True, "pid": os.getpid()}
    reply = command(server.endpoint, "echo", n=3, name="blk0", blob=b"\x00\xff", items=[1, "a"])
    assert reply["echo"] == {"n": 3, "name": "blk0", "blob": b"\x00\xff", "items": [1, "a"]}


@pytest.mark.parametrize(("cmd", "text"), [
    ("nosuch", "unknown command 'nosuch'"),
    ("boom", "RuntimeError: disk on fire second line"),
    ("refuse", "not now"),
    ("unpackable", "TypeError"),
    ("notamap", "notamap: handler returned a list"),
])
def test_errors_are_one_line_and_server_keeps_serving(
        server: CommandServer, cmd: str, text: str) -> None:
    with pytest.raises(ControlError) as info:
        command(server.endpoint, cmd)
    assert text in str(info.value)
    assert "\n" not in str(info.value)
    assert command(server.endpoint, "health")["ok"] is True


def test_missing_endpoint(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no control endpoint at"):
        command(runtime_endpoint(str(tmp_path), "absent"), "health")


def test_timeout_then_next_call_works(tmp_path: Path) -> None:
    release = threading.Event()

    def stall(req: dict[str, Any]) -> dict[str, Any]:
        release.wait(10)
        return {}

    srv = CommandServer(runtime_endpoint(str(tmp_path), "slow"), {"stall": stall, **HANDLERS})
    srv.start()
    try:
        with pytest.raises(ControlError, match="no answer from"):
            command(srv.endpoint, "stall", timeout=0.2)
        release.set()
        assert command(srv.endpoint, "health")["ok"] is True
    finally:
        srv.close()


def test_close_removes_socket_file(tmp_path: Path) -> None:
    srv = CommandServer(runtime_endpoint(str(tmp_path), "x"), HANDLERS)
    srv.start()
    assert (tmp_path / "x.ctl").exists()
    srv.close()
    assert not (tmp_path / "x.ctl").exists()
    srv.close()  # twice is harmless
    never_started = CommandServer(runtime_endpoint(str(tmp_path), "y"), HANDLERS)
    never_started.close()
    assert not (tmp_path / "y.ctl").exists()


def test_bind_failure_is_control_error(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="cannot bind"):
        CommandServer(f"ipc://{tmp_path}/missing-dir/x.ctl", HANDLERS)
    with pytest.raises(ControlError, match="cannot bind"):
        EventPublisher(f"ipc://{tmp_path}/missing-dir/events")


def test_exit_after_reply_answers_first(tmp_path: Path) -> None:
    done = threading.Event()
    srv: CommandServer

    def bye(req: dict[str, Any]) -> dict[str, Any]:
        srv.exit_after_reply(done.set)
        return {"bye": True}

    srv = CommandServer(runtime_endpoint(str(tmp_path), "bye"), {"bye": bye})
    srv.start()
    assert command(srv.endpoint, "bye") == {"ok": True, "bye": True}
    assert done.wait(5)
    assert not (tmp_path / "bye.ctl").exists()
    srv.close()


def test_publisher_sequence_and_history(tmp_path: Path) -> None:
    pub = EventPublisher(events_endpoint(str(tmp_path)))
    try:
        first = pub.publish("backend-started", name="blk0", pid=12)
        assert first["event"] == "backend-started" and first["seq"] == 1
        assert first["name"] == "blk0" and isinstance(first["ts"], float)

        def burst() -> None:
            for _ in range(400):
                pub.publish("tick")

        threads = [threading.Thread(target=burst) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seqs = [e["seq"] for e in pub.history]
        assert len(seqs) == HISTORY_LEN
        assert sorted(seqs) == list(range(1602 - HISTORY_LEN, 1602))
    finally:
        pub.close()
    assert not (tmp_path / "events").exists()


def test_subscriber_receives_events_in_order(tmp_path: Path) -> None:
    pub = EventPublisher(events_endpoint(str(tmp_path)))
    sub = EventSubscriber(pub.endpoint)
    try:
        assert sub.wait_connected(5)
        assert pub.wait_subscribed(1, timeout=5)  # no slow joiner from here on
        assert pub.subscriptions == 1
        sent = [pub.publish("device-lost", name="blk0", n=i) for i in range(20)]
        got = [sub.recv(timeout=5) for _ in sent]
        assert got == sent
        assert sub.recv(timeout=0.05) is None
    finally:
        sub.close()
        pub.close()


def test_wait_subscribed_times_out_without_subscribers(tmp_path: Path) -> None:
    lonely = EventSubscriber(events_endpoint(str(tmp_path)))
    assert lonely.wait_connected(0.1) is False  # nobody publishes yet
    lonely.close()
    pub = EventPublisher(events_endpoint(str(tmp_path)))
    try:
        assert pub.wait_subscribed(1, timeout=0.1) is False
        subs = [EventSubscriber(pub.endpoint) for _ in range(2)]
        assert pub.wait_subscribed(2, timeout=5)  # verbose: the same filter counts twice
        for sub in subs:
            sub.close()
    finally:
        pub.close()
    assert pub.wait_subscribed(1, timeout=0.1) is False


def test_subscriber_skips_garbage(tmp_path: Path) -> None:
    raw: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
    raw.bind(events_endpoint(str(tmp_path)))
    sub = EventSubscriber(events_endpoint(str(tmp_path)))
    try:
        for _ in range(200):
            raw.send(pack({"event": "probe"}))
            if sub.recv(timeout=0.05) is not None:
                break
        while sub.recv(timeout=0.05) is not None:
            pass
        for junk in (b"\xc1", pack([1, 2]), pack({"no": "event"}), pack({"event": 5})):
            raw.send(junk)
        raw.send(pack({"event": "real", "seq": 9}))
        assert sub.recv(timeout=5) == {"event": "real", "seq": 9}
    finally:
        sub.close()
        raw.close(linger=0)


def test_unpack_rejects_garbage() -> None:
    for junk in (b"", b"\xc1", b"\x92\x01", pack(1) + pack(2)):
        with pytest.raises(ControlError):
            unpack(junk)
