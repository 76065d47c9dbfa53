"""The two links: a real TAP (inside a network namespace of the test's own)
and the peer socket between two backends.

The TAP tests check the kernel behaviour the device relies on: frames go
out and come back with the virtio-net header, a read into buffers that are
too short returns the frame's full length, multi-queue attach/detach, and
the one-line errors for a missing, foreign or busy TAP.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dvmm_net.header import HDR_LEN, VirtioNetHdr
from dvmm_net.link import TUN_F_CSUM, TUN_F_TSO4, LinkChanged, LinkDown, LinkError
from dvmm_net.peer import PeerLink, PeerState
from dvmm_net.tap import IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, TUNSETIFF, TapLink

TUNGETVNETHDRSZ = 0x800454D7
HOST_MAC = bytes.fromhex("525400000002")
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"dvmm-unit-{os.getpid()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "ip", *args], check=True, capture_output=True)


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the block in ``ns`` (this thread only): TUNSETIFF finds TAPs by name there."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        assert _libc.setns(target, 0x40000000) == 0
        yield
    finally:
        assert _libc.setns(own, 0x40000000) == 0
        os.close(own)
        os.close(target)


def arp_request(src_mac: bytes, src_ip: str, dst_ip: str) -> bytes:
    eth = b"\xff" * 6 + src_mac + b"\x08\x06"
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, src_mac,
                      socket.inet_aton(src_ip), bytes(6), socket.inet_aton(dst_ip))
    return eth + arp


def recv_arp(link: TapLink, bufs: list[memoryview]) -> tuple[int, bytes]:
    """Ask the kernel who has 10.99.0.1 (again every 0.2 s: the first request
    may meet an interface that is still coming up) and read until an ARP
    frame comes back; returns the length read and the bytes."""
    request = VirtioNetHdr().pack() + arp_request(HOST_MAC, "10.99.0.2", "10.99.0.1")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        link.send(0, [memoryview(bytearray(request[:7])), memoryview(bytearray(request[7:]))])
        while select.select([link.fileno(0)], [], [], 0.2)[0]:
            n = link.recv(0, bufs)
            data = b"".join(bytes(b) for b in bufs)[:n]
            if data[HDR_LEN + 12:HDR_LEN + 14] == b"\x08\x06":
                return n, data
    raise AssertionError("no ARP reply from the TAP")


@pytest.fixture
def tap(netns: str) -> Iterator[TapLink]:
    ip(netns, "tuntap", "add", "dev", "t0", "mode", "tap")
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw",
                    "net.ipv6.conf.t0.disable_ipv6=1"], check=True)  # no IPv6 chatter
    ip(netns, "addr", "add", "10.99.0.1/24", "dev", "t0")
    ip(netns, "link", "set", "t0", "up")
    with inside(netns):
        link = TapLink.open("t0")
    try:
        yield link
    finally:
        link.close()


def test_frames_out_and_back_with_the_vnet_header(tap: TapLink) -> None:
    assert tap.vnet_hdr and tap.pairs == 1 and not tap.multi_queue
    out = bytearray(4)
    fcntl.ioctl(tap.fileno(0), TUNGETVNETHDRSZ, out)
    assert struct.unpack("i", out)[0] == HDR_LEN
    tap.set_vnet_header(HDR_LEN, TUN_F_CSUM | TUN_F_TSO4)  # accepted by the kernel
    buf = memoryview(bytearray(2048))
    n, data = recv_arp(tap, [buf[:HDR_LEN], buf[HDR_LEN:]])
    assert data[HDR_LEN:HDR_LEN + 6] == HOST_MAC  # the reply is addressed to us
    op, = struct.unpack_from("!H", data, HDR_LEN + 20)
    assert op == 2 and data[HDR_LEN + 28:HDR_LEN + 32] == socket.inet_aton("10.99.0.1")
    assert n == len(data) >= HDR_LEN + 42


def test_a_short_read_is_capped_at_the_buffers(tap: TapLink) -> None:
    """Why the device adds a spare byte: a cut frame reads as exactly full."""
    short = memoryview(bytearray(HDR_LEN + 20))
    n, _ = recv_arp(tap, [short])
    assert n == len(short)


def test_nothing_waiting_is_blocking_io(tap: TapLink) -> None:
    with pytest.raises(BlockingIOError):
        tap.recv(0, [memoryview(bytearray(2048))])


def test_open_errors_are_one_line(netns: str) -> None:
    ip(netns, "tuntap", "add", "dev", "t1", "mode", "tap")
    with inside(netns):
        with pytest.raises(LinkError, match="no network interface nosuch"):
            TapLink.open("nosuch")
        with pytest.raises(LinkError, match="lo is not a TAP device"):
            TapLink.open("lo")
        with pytest.raises(LinkError, match="not a multi-queue TAP"):
            TapLink.open("t1", queues=2)
        with pytest.raises(LinkError, match="not a network interface name"):
            TapLink.open("x" * 16)
        first = TapLink.open("t1")
        try:
            with pytest.raises(LinkError, match="already in use"):
                TapLink.open("t1")
        finally:
            first.close()


def test_multi_queue_tap(netns: str) -> None:
    ip(netns, "tuntap", "add", "dev", "mq0", "mode", "tap", "multi_queue")
    with inside(netns):
        link = TapLink.open("mq0", queues=2)
        single = None
        try:
            assert link.pairs == 2 and link.multi_queue
            link.set_pair_active(1, False)
            link.set_pair_active(0, False)
            # a detached queue no longer belongs to the TAP: a third opener fits
            link.set_pair_active(1, True)
            link.set_pair_active(0, True)
            single = TapLink.open("mq0", queues=1)  # a multi_queue TAP, one queue asked
            assert single.multi_queue and single.pairs == 1
        finally:
            link.close()
            if single is not None:
                single.close()


def test_inherited_fds(netns: str) -> None:
    ip(netns, "tuntap", "add", "dev", "t2", "mode", "tap")
    with inside(netns):
        fd = os.open("/dev/net/tun", os.O_RDWR)
    ifreq = struct.pack("16sH22x", b"t2", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
    fcntl.ioctl(fd, TUNSETIFF, ifreq)
    link = TapLink.from_fds([fd])
    try:
        assert link.name == "t2" and link.vnet_hdr and not os.get_blocking(fd)
    finally:
        link.close()
    with pytest.raises(LinkError, match="not an open file descriptor"):
        TapLink.from_fds([fd])
    r, w = os.pipe()
    try:
        with pytest.raises(LinkError, match="is not a TAP"):
            TapLink.from_fds([r])
    finally:
        os.close(r)
        os.close(w)


# -- peer link --------------------------------------------------------------------
def plugged(path: str) -> PeerLink:
    """A peer link plugged in, as the device does once its receive ring runs."""
    link = PeerLink(path)
    assert link.state is PeerState.DOWN and link.fileno(0) == -1
    link.set_pair_active(0, True)
    return link


def test_peer_rendezvous_and_frames(tmp_path: Path) -> None:
    path = str(tmp_path / "link.sock")
    a = plugged(path)
    b = plugged(path)
    try:
        assert (a.state, b.state) == (PeerState.LISTENING, PeerState.CONNECTED)
        assert not a.vnet_hdr and a.pairs == 1
        with pytest.raises(LinkDown):
            a.send(0, [memoryview(b"x" * 60)])
        with pytest.raises(LinkChanged):  # the listener is readable: b is connecting
            a.recv(0, [memoryview(bytearray(64))])
        listener_fd = a.fileno(0)
        a.reopen(0)
        assert a.state is PeerState.CONNECTED and a.fileno(0) != listener_fd
        b.send(0, [memoryview(b"hello "), memoryview(b"peer" * 20)])
        buf = memoryview(bytearray(200))
        assert a.recv(0, [buf]) == 86 and bytes(buf[:86]) == b"hello " + b"peer" * 20
        a.send(0, [memoryview(b"z" * 100)])
        assert b.recv(0, [memoryview(bytearray(30))]) == 100  # cut short: full length
        with pytest.raises(BlockingIOError):
            b.recv(0, [buf])
    finally:
        a.close()
        b.close()
    assert not os.path.exists(path)


def test_listener_waits_for_the_next_peer(tmp_path: Path) -> None:
    path = str(tmp_path / "link.sock")
    a, b = plugged(path), plugged(path)
    a.reopen(0)
    b.close()
    with pytest.raises(LinkChanged):  # end of file
        a.recv(0, [memoryview(bytearray(64))])
    a.reopen(0)
    assert a.state is PeerState.LISTENING
    c = plugged(path)
    try:
        assert c.state is PeerState.CONNECTED
        with pytest.raises(LinkChanged):
            a.recv(0, [memoryview(bytearray(64))])
        a.reopen(0)
        c.send(0, [memoryview(b"again")])
        assert a.recv(0, [memoryview(bytearray(64))]) == 5
    finally:
        a.close()
        c.close()


def test_connector_takes_over_when_the_listener_leaves(tmp_path: Path) -> None:
    path = str(tmp_path / "link.sock")
    a, b = plugged(path), plugged(path)
    a.close()  # removes its socket file
    with pytest.raises(LinkChanged):
        b.recv(0, [memoryview(bytearray(64))])
    b.reopen(0)
    assert b.state is PeerState.LISTENING and os.path.exists(path)
    c = plugged(path)
    try:
        assert c.state is PeerState.CONNECTED
    finally:
        b.close()
        c.close()


def test_stale_socket_file_is_replaced_and_other_files_are_not(tmp_path: Path) -> None:
    path = tmp_path / "link.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    link = plugged(str(path))
    assert link.state is PeerState.LISTENING
    link.close()
    path.write_text("not a socket")
    with pytest.raises(LinkError, match="is not a socket"):
        PeerLink(str(path))
    assert path.read_text() == "not a socket"


def test_unplugged_while_nothing_receives(tmp_path: Path) -> None:
    """A backend whose guest stopped receiving pulls the cable: the other side
    drops its frames instead of filling a socket nobody reads."""
    path = str(tmp_path / "link.sock")
    a, b = plugged(path), plugged(path)
    try:
        a.reopen(0)  # accept b
        a.set_pair_active(0, False)
        assert a.state is PeerState.DOWN and a.fileno(0) == -1
        assert not os.path.exists(path)
        with pytest.raises(LinkDown):
            a.send(0, [memoryview(b"x" * 60)])
        with pytest.raises(BlockingIOError):
            a.recv(0, [memoryview(bytearray(64))])
        with pytest.raises(LinkChanged):  # b sees the cable pulled
            b.recv(0, [memoryview(bytearray(64))])
        b.reopen(0)
        assert b.state is PeerState.LISTENING  # and waits at the path itself
        a.set_pair_active(0, True)  # plugged back in: a connects to b
        assert a.state is PeerState.CONNECTED
        b.reopen(0)
        a.send(0, [memoryview(b"back")])
        assert b.recv(0, [memoryview(bytearray(64))]) == 4
    finally:
        a.close()
        b.close()
    assert not os.path.exists(path)
