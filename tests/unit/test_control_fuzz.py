"""Hostile input to a CommandServer: random bytes and random msgpack values.

Every request gets exactly one reply (an error unless it happens to be a
well-formed command) and the server still answers ``health`` afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from dvmm_shared.control import CommandServer, Handler, command, pack, runtime_endpoint, unpack
from hypothesis import given, settings
from hypothesis import strategies as st

HANDLERS: dict[str, Handler] = {"health": lambda req: {"alive": True}}

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
           | st.text(max_size=20) | st.binary(max_size=20))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(scalars.filter(lambda v: v is None or not isinstance(v, float)),
                      inner, max_size=4),
    max_leaves=12,
)
# Maps that look like commands, to reach the dispatch checks and not only the decoder.
commands = st.dictionaries(st.sampled_from(["cmd", "kind", "ms", "name"]) | st.text(max_size=5),
                           values, max_size=4)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp: Path = tmp_path_factory.mktemp("ctl")
    srv = CommandServer(runtime_endpoint(str(tmp), "fuzz"), HANDLERS)
    srv.start()
    try:
        yield srv.endpoint
    finally:
        srv.close()


def raw_request(endpoint: str, data: bytes) -> Any:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REQ)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send(data)
        assert sock.poll(5000), "server did not answer"
        return unpack(sock.recv())
    finally:
        sock.close(linger=0)


def check_reply(request: Any, reply: Any) -> None:
    assert isinstance(reply, dict)
    good = isinstance(request, dict) and request.get("cmd") == "health" and all(
        isinstance(k, str) for k in request)
    if good:
        assert reply["ok"] is True
    else:
        assert reply["ok"] is False
        assert isinstance(reply["error"], str) and "\n" not in reply["error"]


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=64))
def test_random_bytes(endpoint: str, data: bytes) -> None:
    reply = raw_request(endpoint, data)
    try:
        request = unpack(data)
    except Exception:
        request = None
    check_reply(request, reply)
    assert command(endpoint, "health")["alive"] is True


@settings(max_examples=150, deadline=None)
@given(value=values | commands)
def test_random_msgpack_values(endpoint: str, value: Any) -> None:
    reply = raw_request(endpoint, pack(value))
    check_reply(value, reply)
    assert command(endpoint, "health")["alive"] is True


def test_oversized_message_does_not_wedge(endpoint: str) -> None:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REQ)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send(b"\x00" * (2 << 20))  # over MAX_MESSAGE: ZeroMQ drops this peer
    finally:
        sock.close(linger=0)
    assert command(endpoint, "health")["alive"] is True
