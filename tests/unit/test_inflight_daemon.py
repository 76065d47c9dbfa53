"""In-flight tracking through the real protocol: GET/SET_INFLIGHT_FD against
the daemon (hostile values included), and a backend process that SIGKILLs
itself at each crash point while serving a request, restarted on the same
rings and region: the request completes exactly once.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from dvmm_shared.driver import Buf
from dvmm_shared.inflight import region_size
from dvmm_shared.synthetic import DEFAULT_PROTOCOL
from dvmm_shared.vhost_user.connection import Connection
from dvmm_shared.vhost_user.daemon import DAEMON_PROTOCOL_FEATURES
from dvmm_shared.vhost_user.frontend import Frontend, FrontendError
from dvmm_shared.vhost_user.message import (
    InflightInfo,
    ProtocolFeature,
    Request,
    decode_u64,
)
from dvmm_shared.vhost_user.vring import CRASH_POINTS

from .helpers import ECHO_FEATURES, DaemonThread, EchoBackend, echo, fd_count
from .inflight_rig import INFLIGHT_PROTOCOL, InflightVM, echo_backend

INFLIGHT = 1 << ProtocolFeature.INFLIGHT_SHMFD


@pytest.fixture
def ivm() -> Iterator[InflightVM]:
    v = InflightVM(mem_size=4 << 20)
    try:
        yield v
    finally:
        v.close()


def frontend(daemon: DaemonThread, protocol: int = INFLIGHT_PROTOCOL) -> Frontend:
    fe = Frontend.connect(daemon.path)
    fe.negotiate(ECHO_FEATURES, protocol)
    return fe


def test_the_daemon_offers_inflight_tracking(daemon: DaemonThread) -> None:
    assert DAEMON_PROTOCOL_FEATURES & INFLIGHT
    fe = frontend(daemon)
    try:
        assert fe.get_protocol_features() & INFLIGHT
        assert fe.protocol_features & INFLIGHT
    finally:
        fe.close()


def test_get_inflight_fd_gives_a_zeroed_sealed_region(daemon: DaemonThread) -> None:
    fe = frontend(daemon)
    fd, info = fe.get_inflight_fd(2, 128)
    try:
        assert info == InflightInfo(region_size(2, 128), 0, 2, 128)
        assert info.mmap_size == 2 * 2112  # libvhost-user's layout: ALIGN_UP(16 * 128 + 2, 64)
        assert os.fstat(fd).st_size == info.mmap_size
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        with mmap.mmap(fd, info.mmap_size) as m:
            # all zero but desc_num, which the backend records as libvhost-user does
            assert m[10:12] == (128).to_bytes(2, "little") and not any(m[12:2112])
        fe.set_inflight_fd(fd, info)
    finally:
        os.close(fd)
        fe.close()


@pytest.mark.parametrize(("queues", "size"), [
    (0, 128), (3, 128), (0xFFFF, 128), (1, 0), (1, 3), (1, 100), (1, 0xFFFF), (2, 0x8000 + 1),
])
def test_hostile_get_inflight_fd_is_refused_and_serving_goes_on(
        daemon: DaemonThread, ivm: InflightVM, queues: int, size: int) -> None:
    ivm.connect(daemon.path, ECHO_FEATURES, num_queues=2, queue_size=16)
    fe = ivm.frontend
    assert fe is not None
    before = fd_count()
    with pytest.raises(FrontendError, match="refused GET_INFLIGHT_FD"):
        fe.get_inflight_fd(queues, size)
    assert fd_count() == before
    assert echo(ivm, 1, b"still serving") == b"gnivres llits"


def test_get_inflight_fd_needs_the_protocol_feature(daemon: DaemonThread) -> None:
    fe = frontend(daemon, DEFAULT_PROTOCOL)
    try:
        with pytest.raises(FrontendError, match="refused"):
            fe.get_inflight_fd(1, 128)
        assert fe.get_queue_num() == 2
    finally:
        fe.close()


@pytest.mark.parametrize("size", [0, 8, 23, 25])
def test_a_malformed_get_inflight_fd_gets_an_empty_answer(daemon: DaemonThread,
                                                          size: int) -> None:
    fe = frontend(daemon)
    try:
        fe.conn.send(Request.GET_INFLIGHT_FD, bytes(size))
        msg = fe.conn.recv()
        assert msg.header.is_reply and not msg.fds
        assert InflightInfo.decode(msg.payload).mmap_size == 0
        assert fe.get_queue_num() == 2
    finally:
        fe.close()


def _ack(conn: Connection, payload: bytes, fds: Sequence[int]) -> int:
    conn.send(Request.SET_INFLIGHT_FD, payload, fds, need_reply=True)
    msg = conn.recv()
    assert msg.header.is_reply and msg.header.request == Request.SET_INFLIGHT_FD
    return decode_u64(msg.payload, "ack")


def _memfd(size: int) -> int:
    fd = os.memfd_create("test-inflight", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize(("what", "file_size", "info"), [
    ("mmap_size too small", 8192, InflightInfo(100, 0, 1, 128)),
    ("file shorter than the region", 100, InflightInfo(2112, 0, 1, 128)),
    ("offset past the end", 8192, InflightInfo(2112, 1 << 40, 1, 128)),
    ("offset leaves too little", 8192, InflightInfo(2112, 8192 - 64, 1, 128)),
    ("no queues", 8192, InflightInfo(0, 0, 0, 128)),
    ("more queues than the device", 1 << 16, InflightInfo(3 * 2112, 0, 3, 128)),
    ("queue size not a power of two", 8192, InflightInfo(2112, 0, 1, 120)),
    ("queue size zero", 8192, InflightInfo(2112, 0, 1, 0)),
])
def test_hostile_set_inflight_fd_is_refused(daemon: DaemonThread, what: str, file_size: int,
                                            info: InflightInfo) -> None:
    fe = frontend(daemon)
    fd, good = _memfd(file_size), _memfd(2112)
    try:
        before = fd_count()
        assert _ack(fe.conn, info.encode(), [fd]) != 0, what
        assert fd_count() == before  # the daemon closed its copy
        assert _ack(fe.conn, InflightInfo(2112, 0, 1, 128).encode(), [good]) == 0
    finally:
        os.close(fd)
        os.close(good)
        fe.close()


def test_set_inflight_fd_without_an_fd_is_refused(daemon: DaemonThread) -> None:
    fe = frontend(daemon)
    try:
        assert _ack(fe.conn, InflightInfo(2112, 0, 1, 128).encode(), []) != 0
        assert _ack(fe.conn, b"short", []) != 0
        assert fe.get_queue_num() == 2
    finally:
        fe.close()


def test_get_or_set_inflight_fd_after_the_rings_started_is_refused(daemon: DaemonThread,
                                                            ivm: InflightVM) -> None:
    ivm.connect(daemon.path, ECHO_FEATURES, num_queues=2, queue_size=16)
    assert ivm.frontend is not None and ivm.inflight is not None
    fd, info = ivm.inflight
    assert _ack(ivm.frontend.conn, info.encode(), [fd]) != 0
    with pytest.raises(FrontendError, match="refused GET_INFLIGHT_FD"):
        ivm.frontend.get_inflight_fd(2, 16)
    assert echo(ivm, 0, b"abc") == b"cba"


def test_a_reconnect_with_the_region_resumes_cleanly(daemon: DaemonThread, ivm: InflightVM,
                                                     backend: EchoBackend) -> None:
    ivm.connect(daemon.path, ECHO_FEATURES, num_queues=2, queue_size=16)
    for i in range(20):  # wrap the ring
        assert echo(ivm, i % 2, bytes([i]) * 3) == bytes([i]) * 3
    ivm.connect(daemon.path, ECHO_FEATURES, num_queues=2, queue_size=16)
    assert echo(ivm, 0, b"again") == b"niaga"
    assert len(backend.chains) == 21
    assert all(q.resubmitted == 0 for q in daemon.daemon.stats.queues.values())


# -- a backend that dies mid-request -------------------------------------------------
def _wait_exit(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    return proc.wait(timeout)


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_request_interrupted_by_a_crash_completes_exactly_once(
        tmp_path: Path, ivm: InflightVM, point: str) -> None:
    sock, log = tmp_path / "echo.sock", tmp_path / "echo.log"
    data = b"interrupted request"
    src, dst = ivm.alloc(64, align=16), ivm.alloc(64, align=16)
    ivm.mem.write(src, data)
    seen: list[tuple[int, int]] = []
    with echo_backend(sock, point, log) as proc:
        ivm.connect(str(sock), ECHO_FEATURES, num_queues=1, queue_size=16)
        ring = ivm.rings[0]
        head = ring.queue.add([Buf(src, len(data)), Buf(dst, len(data), write=True)])
        ring.kick.signal()
        assert _wait_exit(proc) == -9, log.read_text()
    seen += ring.queue.get_used()  # after-used: published before the crash
    with echo_backend(sock, None, log):
        ivm.connect(str(sock), ECHO_FEATURES, num_queues=1, queue_size=16)
        if not seen:
            seen += ring.wait_used()
        assert echo(ivm, 0, b"next") == b"txen"  # served after whatever was resubmitted
        seen += ring.queue.get_used()
    assert seen == [(head, len(data))], log.read_text()
    assert ivm.mem.read(dst, len(data)) == data[::-1]
    resubmitted = "served again" in log.read_text()
    assert resubmitted == (point != "after-used"), log.read_text()


def test_killed_between_requests_nothing_is_replayed(tmp_path: Path, ivm: InflightVM) -> None:
    sock, log = tmp_path / "echo.sock", tmp_path / "echo.log"
    with echo_backend(sock, None, log) as proc:
        ivm.connect(str(sock), ECHO_FEATURES, num_queues=1, queue_size=16)
        assert echo(ivm, 0, b"one") == b"eno"
        proc.kill()
        assert _wait_exit(proc) == -9
    with echo_backend(sock, None, log):
        ivm.connect(str(sock), ECHO_FEATURES, num_queues=1, queue_size=16)
        assert echo(ivm, 0, b"two") == b"owt"
    assert "served again" not in log.read_text()
