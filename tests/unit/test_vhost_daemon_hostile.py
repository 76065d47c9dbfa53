"""The vhost-user daemon under a hostile frontend.

Bad requests get a failure ack and the daemon keeps serving; undecodable
input drops that connection and the next one is served; fds riding on a
failing message are closed (counted in /proc/self/fd, the daemon being a
thread of this process); bad chains and broken rings do not stop the daemon.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator, Sequence

import pytest
from dvmm_shared.driver import Buf
from dvmm_shared.memory import memfd_region
from dvmm_shared.synthetic import SyntheticVM
from dvmm_shared.vhost_user.connection import MAX_FDS, Connection
from dvmm_shared.vhost_user.frontend import FrontendError
from dvmm_shared.vhost_user.message import (
    HEADER,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ConfigSpace,
    MemRegion,
    Request,
    VringAddr,
    VringState,
    decode_u64,
    encode,
    encode_mem_table,
    encode_u64,
)
from dvmm_shared.virtio import VIRTQ_DESC_F_NEXT, bit

from .helpers import ECHO_FEATURES, DaemonThread, echo, fd_count, wait_closed

FEATURES = ECHO_FEATURES | bit(VHOST_USER_F_PROTOCOL_FEATURES)


@pytest.fixture
def conn(daemon: DaemonThread) -> Iterator[Connection]:
    c = Connection.connect(daemon.path, timeout=5)
    c.sock.settimeout(5)
    assert decode_u64(call(c, Request.GET_FEATURES)) == FEATURES  # accepted by now
    yield c
    c.close()


def ack(conn: Connection, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
    """Send with NEED_REPLY; the backend's ack (0 = success)."""
    conn.send(request, payload, fds, need_reply=True)
    msg = conn.recv()
    assert msg.header.is_reply and msg.header.request == request
    return decode_u64(msg.payload, "ack")


def call(conn: Connection, request: int, payload: bytes = b"") -> bytes:
    conn.send(request, payload)
    msg = conn.recv()
    assert msg.header.is_reply and msg.header.request == request
    return msg.payload


def serving(path: str) -> bool:
    """A fresh connection gets GET_FEATURES answered."""
    c = Connection.connect(path, timeout=5)
    try:
        c.sock.settimeout(5)
        return decode_u64(call(c, Request.GET_FEATURES)) == FEATURES
    finally:
        c.close()


# -- refused requests, connection kept -----------------------------------------------
def test_unknown_request_gets_a_failure_ack_and_serving_continues(
        daemon: DaemonThread, conn: Connection) -> None:
    assert ack(conn, 999) == 1
    assert ack(conn, Request.SET_LOG_BASE, bytes(8)) == 1  # known, not implemented
    conn.send(998)  # no NEED_REPLY: no answer at all
    assert decode_u64(call(conn, Request.GET_FEATURES)) == FEATURES  # not a stray ack
    assert ack(conn, Request.SET_OWNER) == 0
    assert daemon.daemon.stats.protocol_errors == 3


@pytest.mark.parametrize("num", [0, 3, 100, 2048, 1 << 31])
def test_set_vring_num_must_be_a_power_of_two_within_limit(conn: Connection, num: int) -> None:
    assert ack(conn, Request.SET_VRING_NUM, VringState(0, num).encode()) == 1
    assert ack(conn, Request.SET_VRING_NUM, VringState(0, 1024).encode()) == 0


@pytest.mark.parametrize(
    ("request_", "payload"),
    [
        (Request.SET_VRING_NUM, VringState(2, 8).encode()),
        (Request.SET_VRING_BASE, VringState(0xFFFFFFFF, 0).encode()),
        (Request.SET_VRING_ADDR, VringAddr(9, 0, 0, 0, 0, 0).encode()),
        (Request.SET_VRING_ENABLE, VringState(2, 1).encode()),
        (Request.SET_VRING_CALL, encode_u64(200 | 0x100)),  # no fd, bad index
        (Request.SET_VRING_NUM, b"short"),
        (Request.SET_FEATURES, encode_u64(1 << 63)),  # not offered
        (Request.SET_PROTOCOL_FEATURES, encode_u64(1 << 40)),
        (Request.SET_CONFIG, struct.pack("<III", 0, 300, 0)),
        (Request.SET_MEM_TABLE, struct.pack("<II", 0, 0)),
        (Request.REM_MEM_REG, bytes(40)),  # no such region
    ],
)
def test_bad_request_refused_connection_kept(conn: Connection, request_: int,
                                             payload: bytes) -> None:
    assert ack(conn, request_, payload) == 1
    assert decode_u64(call(conn, Request.GET_FEATURES)) == FEATURES


def test_failing_get_requests_reply_with_an_empty_payload(conn: Connection) -> None:
    assert call(conn, Request.GET_VRING_BASE, VringState(2, 0).encode()) == b""
    bad_cfg = struct.pack("<III", 0, 300, 0) + bytes(300)
    assert call(conn, Request.GET_CONFIG, bad_cfg) == b""
    good = call(conn, Request.GET_CONFIG, ConfigSpace(0, 4, 0, bytes(4)).encode())
    assert ConfigSpace.decode(good).data == b"echo"


def test_kick_before_size_and_address_is_refused(conn: Connection) -> None:
    efd = os.eventfd(0)
    try:
        assert ack(conn, Request.SET_VRING_KICK, encode_u64(0), [efd]) == 1
        assert ack(conn, Request.SET_VRING_KICK, encode_u64(0x100)) == 1  # polling mode
    finally:
        os.close(efd)


# -- fds riding on failing messages ----------------------------------------------------
def _memfd(size: int = 1 << 16) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


TABLE_1 = encode_mem_table([MemRegion(0, 1 << 16, 0x7000_0000, 0)])
TABLE_2 = encode_mem_table([MemRegion(0, 1 << 16, 0x7000_0000, 0),
                            MemRegion(1 << 20, 1 << 16, 0x7100_0000, 0)])


@pytest.mark.parametrize(
    ("request_", "payload", "nfds", "result"),
    [
        (Request.SET_MEM_TABLE, TABLE_1, 0, 1),
        (Request.SET_MEM_TABLE, TABLE_1, 2, 1),
        (Request.SET_MEM_TABLE, TABLE_2, 1, 1),
        (Request.SET_MEM_TABLE, TABLE_2, MAX_FDS, 1),
        (Request.SET_MEM_TABLE, encode_mem_table([MemRegion(0, 1 << 30, 0, 0)]), 1, 1),
        (Request.ADD_MEM_REG, bytes(8) + MemRegion(0, 1 << 30, 0, 0).encode(), 1, 1),
        (Request.ADD_MEM_REG, bytes(8) + MemRegion(0, 1 << 16, 0, 0).encode(), 0, 1),
        (Request.SET_VRING_CALL, encode_u64(200), 1, 1),
        (Request.SET_VRING_KICK, encode_u64(7), 1, 1),
        (Request.SET_VRING_ERR, encode_u64(0x100), 1, 0),  # "no fd" flag, yet one came
        (Request.SET_OWNER, b"", 2, 0),  # takes no fd
        (999, b"", 4, 1),
    ],
)
def test_fds_of_a_failing_or_fdless_message_are_closed(
        conn: Connection, request_: int, payload: bytes, nfds: int, result: int) -> None:
    fds = [_memfd() for _ in range(nfds)]
    try:
        before = fd_count()
        assert ack(conn, request_, payload, fds) == result
        assert fd_count() == before
    finally:
        for fd in fds:
            os.close(fd)


def test_extra_fds_of_add_mem_reg_are_closed_and_removal_unmaps(conn: Connection) -> None:
    fds = [_memfd() for _ in range(3)]
    region = bytes(8) + MemRegion(0, 1 << 16, 0x7000_0000, 0).encode()
    try:
        before = fd_count()
        assert ack(conn, Request.ADD_MEM_REG, region, fds) == 0
        assert fd_count() == before + 1  # Python's mmap keeps a dup of the fd it maps
        assert ack(conn, Request.REM_MEM_REG, region) == 0
        assert fd_count() == before
    finally:
        for fd in fds:
            os.close(fd)


# -- input that drops the connection ------------------------------------------------
DROPS = {
    "truncated-then-closed": (encode(Request.SET_VRING_NUM, bytes(8))[:15], True),
    "header-only-then-closed": (HEADER.pack(Request.SET_VRING_NUM, 1, 8), True),
    "oversized-size": (HEADER.pack(Request.SET_MEM_TABLE, 1, 1 << 20), False),
    "huge-size": (HEADER.pack(Request.SET_MEM_TABLE, 1, 0xFFFFFFFF), False),
    "garbage": (b"\xde\xad\xbe\xef" * 3, False),
    "http": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),
    "version-0": (HEADER.pack(Request.GET_FEATURES, 0, 0), False),
}


@pytest.mark.parametrize("raw,close_write", DROPS.values(), ids=DROPS.keys())
def test_undecodable_input_drops_the_connection_and_the_next_one_works(
        daemon: DaemonThread, conn: Connection, raw: bytes, close_write: bool) -> None:
    before = fd_count()
    efd = os.eventfd(0)
    conn.sock.sendmsg([raw], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", efd))])
    os.close(efd)
    if close_write:
        conn.sock.shutdown(socket.SHUT_WR)
    assert wait_closed(conn)
    assert fd_count() == before - 1  # the daemon's end is gone, and the fd it was sent
    assert serving(daemon.path)
    assert daemon.daemon.stats.connections == 2


def test_too_many_fds_drop_the_connection(daemon: DaemonThread, conn: Connection) -> None:
    fds = [os.eventfd(0) for _ in range(MAX_FDS + 2)]
    before = fd_count()
    conn.sock.sendmsg([encode(Request.SET_OWNER)],
                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
    assert wait_closed(conn)
    for fd in fds:
        os.close(fd)
    assert fd_count() == before - 1 - len(fds)
    assert serving(daemon.path)


# -- the rings under hostile conditions ---------------------------------------------------
def test_bad_chain_between_good_ones_is_returned_empty(daemon: DaemonThread,
                                                       vm: SyntheticVM) -> None:
    vm.connect(daemon.path, ECHO_FEATURES, num_queues=1, queue_size=16)
    ring = vm.rings[0]
    assert echo(vm, 0, b"first") == b"tsrif"
    ring.queue.write_desc(15, 0x1000, 8, VIRTQ_DESC_F_NEXT, 15)  # a loop
    ring.queue.publish(15)
    ring.queue.write_desc(14, (1 << 40), 8, 0, 0)  # outside guest memory
    ring.queue.publish(14)
    ring.kick_if_needed()
    used: list[tuple[int, int]] = []
    while len(used) < 2:
        used += ring.wait_used()
    assert used == [(15, 0), (14, 0)]
    assert echo(vm, 0, b"second") == b"dnoces"
    assert daemon.daemon.stats.queue(0).bad_chains == 2


def test_broken_avail_ring_stops_only_that_ring(daemon: DaemonThread, vm: SyntheticVM) -> None:
    vm.connect(daemon.path, ECHO_FEATURES, num_queues=2, queue_size=8)
    assert echo(vm, 0, b"ok") == b"ko"
    vm.rings[0].queue.set_avail_idx(100)  # jumps by more than the queue size
    vm.rings[0].kick.signal()
    assert echo(vm, 1, b"other ring") == b"gnir rehto"
    fe = vm.frontend
    assert fe is not None and fe.get_vring_base(0) == 1
    assert fe.get_vring_base(1) == 1


def test_memory_table_without_the_rings_is_refused_and_the_daemon_survives(
        daemon: DaemonThread, vm: SyntheticVM) -> None:
    vm.connect(daemon.path, ECHO_FEATURES, num_queues=1, queue_size=8)
    assert echo(vm, 0, b"one") == b"eno"
    fe, ring = vm.frontend, vm.rings[0]
    assert fe is not None and vm.region is not None
    fe.conn.sock.settimeout(10)
    fd, other = memfd_region(1 << 16, guest_addr=1 << 30)
    try:
        with pytest.raises(FrontendError, match="SET_MEM_TABLE"):
            fe.set_mem_table([MemRegion(1 << 30, 1 << 16, other.user_addr, 0)], [fd])
    finally:
        os.close(fd)
    src = vm.alloc(3)
    vm.mem.write(src, b"two")
    out = vm.alloc(3)
    head = ring.queue.add([Buf(src, 3), Buf(out, 3, write=True)])
    ring.kick.signal()
    assert decode_u64(call(fe.conn, Request.GET_FEATURES)) == FEATURES
    # The refused table was not installed: the ring keeps serving from the old one.
    assert ring.wait_used() == [(head, 3)]
    assert vm.mem.read(out, 3) == b"owt"


def test_removing_the_ring_region_is_survived(daemon: DaemonThread, vm: SyntheticVM) -> None:
    vm.connect(daemon.path, ECHO_FEATURES, num_queues=1, queue_size=8)
    fe = vm.frontend
    assert fe is not None and vm.region is not None
    fe.conn.sock.settimeout(10)
    extra_fd, extra = memfd_region(1 << 16, guest_addr=1 << 32)
    try:
        fe.add_mem_reg(MemRegion(1 << 32, 1 << 16, extra.user_addr, 0), extra_fd)
        with pytest.raises(FrontendError, match="ADD_MEM_REG"):  # overlaps
            fe.add_mem_reg(MemRegion(1 << 32, 1 << 12, extra.user_addr, 0), extra_fd)
    finally:
        os.close(extra_fd)
    fe.rem_mem_reg(MemRegion(1 << 32, 1 << 16, extra.user_addr, 0))
    assert echo(vm, 0, b"still") == b"llits"
    with pytest.raises(FrontendError, match="REM_MEM_REG"):
        fe.rem_mem_reg(MemRegion(0, vm.mem_size, vm.region.user_addr, 0))
    vm.rings[0].kick.signal()
    assert decode_u64(call(fe.conn, Request.GET_FEATURES)) == FEATURES
