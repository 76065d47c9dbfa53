"""A stalled frontend cannot wedge the daemon; the daemon's control hooks.

Real sockets against a real :class:`Daemon` in a thread, with a short
per-message deadline: a frontend that sends half a header, a header whose
payload never comes, or a message one byte at a time, and keeps its socket
open, is dropped, and the next frontend is served.  A frontend idle between
messages is not.  Then ``call_soon``, ``drop_frontend``, ``service_delay``
and ``crash_point``.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dvmm_shared.synthetic import SyntheticVM
from dvmm_shared.vhost_user.connection import Connection
from dvmm_shared.vhost_user.daemon import Daemon
from dvmm_shared.vhost_user.message import HEADER, Request, decode_u64, encode

from .helpers import ECHO_FEATURES, DaemonThread, EchoBackend, echo, wait_closed

TIMEOUT = 0.5


@pytest.fixture
def stalling(tmp_path: Path, backend: EchoBackend) -> Iterator[DaemonThread]:
    dt = DaemonThread(backend, tmp_path / "echo.sock")
    dt.daemon.message_timeout = TIMEOUT
    with dt:
        yield dt


def features(conn: Connection) -> int:
    conn.send(Request.GET_FEATURES)
    msg = conn.recv()
    assert msg.header.is_reply and msg.header.request == Request.GET_FEATURES
    return decode_u64(msg.payload)


def connect(dt: DaemonThread) -> Connection:
    conn = Connection.connect(dt.path, timeout=10)
    conn.sock.settimeout(10)  # far above the daemon's deadline: its verdict comes first
    return conn


GET_FEATURES = encode(Request.GET_FEATURES)
SET_FEATURES_HEADER = HEADER.pack(Request.SET_FEATURES, 0x1, 8)  # promises 8 bytes


@pytest.mark.parametrize(("what", "sent"), [
    ("half a header", GET_FEATURES[:6]),
    ("a header without its payload", SET_FEATURES_HEADER),
    ("a header and part of its payload", SET_FEATURES_HEADER + b"\x01\x02\x03"),
])
def test_a_stalled_frontend_is_dropped_and_the_next_is_served(
        stalling: DaemonThread, what: str, sent: bytes) -> None:
    stalled = connect(stalling)
    try:
        assert features(stalled)  # a working session first
        stalled.sock.sendall(sent)
        nxt = connect(stalling)  # waits in the backlog while the daemon waits on `stalled`
        try:
            assert wait_closed(stalled, timeout=10), f"{what}: still connected"
            assert features(nxt) & ECHO_FEATURES == ECHO_FEATURES
            assert stalling.daemon.stats.connections == 2
            assert stalling.daemon.stats.protocol_errors == 1
        finally:
            nxt.close()
    finally:
        stalled.close()


def test_a_message_trickling_in_is_held_to_one_deadline(stalling: DaemonThread) -> None:
    """Each byte arrives well within the deadline, the message does not."""
    conn = connect(stalling)
    stop = threading.Event()

    def trickle() -> None:
        for byte in GET_FEATURES * 10:  # far longer than the deadline allows
            if stop.wait(TIMEOUT / 5):
                return
            try:
                conn.sock.send(bytes([byte]))
            except OSError:
                return

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        assert wait_closed(conn, timeout=10)
    finally:
        stop.set()
        sender.join(10)
        conn.close()
    assert stalling.daemon.stats.protocol_errors == 1


def test_a_frontend_idle_between_messages_is_kept(stalling: DaemonThread) -> None:
    conn = connect(stalling)
    try:
        assert features(conn)
        conn.sock.settimeout(3 * TIMEOUT)
        with pytest.raises(TimeoutError):  # the daemon leaves an idle frontend alone
            conn.sock.recv(1)
        assert features(conn)
        assert stalling.daemon.stats.protocol_errors == 0
    finally:
        conn.close()


def test_message_timeout_must_be_positive(tmp_path: Path, backend: EchoBackend) -> None:
    with pytest.raises(ValueError, match="not positive"):
        Daemon(backend, str(tmp_path / "x.sock"), message_timeout=0)


# -- hooks ---------------------------------------------------------------------------
def run_on_loop(dt: DaemonThread, fn: Callable[[], object]) -> object:
    """Run ``fn`` through call_soon and wait for its result."""
    done = threading.Event()
    result: list[tuple[threading.Thread, object]] = []

    def call() -> None:
        result.append((threading.current_thread(), fn()))
        done.set()

    dt.daemon.call_soon(call)
    assert done.wait(10), "call_soon callback never ran"
    thread, value = result[0]
    assert thread is dt.thread
    return value


def test_call_soon_runs_on_the_loop_thread(daemon: DaemonThread) -> None:
    assert run_on_loop(daemon, lambda: 42) == 42

    def boom() -> None:
        raise RuntimeError("boom")

    daemon.daemon.call_soon(boom)  # logged; the loop goes on
    assert run_on_loop(daemon, lambda: "alive") == "alive"


def test_drop_frontend_ends_the_session_as_a_disconnect_would(
        daemon: DaemonThread, vm: SyntheticVM, backend: EchoBackend) -> None:
    assert run_on_loop(daemon, daemon.daemon.drop_frontend) is False
    vm.connect(daemon.path, ECHO_FEATURES)
    assert echo(vm, 0, b"abc") == b"cba"
    assert daemon.daemon.session is not None
    assert run_on_loop(daemon, daemon.daemon.drop_frontend) is True
    assert vm.frontend is not None and wait_closed(vm.frontend.conn)
    assert daemon.daemon.session is None and backend.resets == 1
    vm.close()
    with SyntheticVM(mem_size=4 << 20) as again:  # and the next frontend is served
        again.connect(daemon.path, ECHO_FEATURES)
        assert echo(again, 0, b"next") == b"txen"


def test_service_delay_still_serves(daemon: DaemonThread, vm: SyntheticVM) -> None:
    daemon.daemon.service_delay = 0.01
    vm.connect(daemon.path, ECHO_FEATURES)
    assert echo(vm, 0, b"slow") == b"wols"
    with pytest.raises(ValueError, match="negative"):
        daemon.daemon.service_delay = -1


def test_crash_point_names_are_checked(daemon: DaemonThread) -> None:
    d = daemon.daemon
    for point in ("after-pop", "after-data", "before-used", "after-used", None):
        d.crash_point = point
        assert d.crash_point == point
    with pytest.raises(ValueError, match="after-data"):
        d.crash_point = "sometime"


def test_stop_still_works_with_a_stalled_frontend_queued(stalling: DaemonThread) -> None:
    conn = connect(stalling)
    try:
        conn.sock.sendall(GET_FEATURES[:3])
        stalling.stop()  # within the deadline plus a little: no hang
        assert not stalling.thread.is_alive()
    finally:
        conn.close()
    with pytest.raises(OSError):
        socket.socket(socket.AF_UNIX).connect(stalling.path)
