"""The net workload of the QEMU VM kind: a checksummed TCP stream both ways.

Owns the host's side of the guest tool ``netverify``
(``dvmm_core/guest/netverify.c``, whose header comment is the record
specification; :func:`record` must stay in step with it): the network
namespace with the TAP the net backend serves (so no frame leaves the
machine), the host receiver in it — every record the guest sends must be
the next one of its connection, exactly — and the host sender whose
records the guest verifies.  The oracle: records verified (progress);
a record that is not the expected one is a mismatch (TCP delivers every
byte in order or breaks the connection: a dropped, duplicated, reordered
or corrupted frame must never show here); a broken connection is an
error the guest saw (it prints an ERROR line and connects again).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import socket
import struct
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass, field

from dvmm_core.guest.blkpattern import splitmix64

HOST_IP, GUEST_IP, PREFIX = "10.77.0.1", "10.77.0.2", 24
PORT = 7707
MAGIC = b"DVMMNET1"
HEAD = struct.Struct("<8sQI")
GUEST_TO_HOST, HOST_TO_GUEST = 1, 2
HOST_RATE = 100     # host -> guest records per second (the guest's side: netverify RATE)
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def record(seed: int, direction: int, seq: int) -> bytes:
    """Record ``seq`` of ``direction`` (netverify.c's layout)."""
    tag = splitmix64(seed ^ (direction << 40) ^ seq)
    length = 16 + tag % 1024
    unit = tag.to_bytes(8, "little")
    payload = bytes((unit[i % 8] + i // 8) & 0xFF for i in range(length))
    head = HEAD.pack(MAGIC, seq, length) + payload
    return head + struct.pack("<I", zlib.crc32(head))


def _sh(*argv: str) -> None:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise OSError(f"{' '.join(argv)} failed: {out.stderr.strip()}")


class NetNamespace:
    """A namespace of our own with TAP ``tap`` at HOST_IP; deleted on close."""

    def __init__(self, tag: str, tap: str = "t0") -> None:
        self.name, self.tap = f"dvmm-chaos-{tag}-{os.getpid()}", tap

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def create(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
        _sh("ip", "netns", "add", self.name)
        _sh(*self.argv("ip", "link", "set", "lo", "up"))
        _sh(*self.argv("ip", "tuntap", "add", "dev", self.tap, "mode", "tap"))
        _sh(*self.argv("ip", "addr", "add", f"{HOST_IP}/{PREFIX}", "dev", self.tap))
        _sh(*self.argv("ip", "link", "set", self.tap, "up"))

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)

    def socket(self) -> socket.socket:
        """A TCP socket in the namespace (this thread enters it for the call only)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            finally:
                _setns(own)
        finally:
            os.close(own)
            os.close(target)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@dataclass
class StreamState:
    """What the host side has seen (counters only grow)."""

    verified: int = 0          # guest records verified, all connections
    sent: int = 0              # host records sent
    connections: int = 0
    mismatches: list[str] = field(default_factory=list)


class NetStream:
    """The host receiver and sender in ``ns``; a thread per connection direction."""

    def __init__(self, ns: NetNamespace, seed: int, port: int = PORT) -> None:
        self.seed, self.state = seed, StreamState()
        self.listener = ns.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST_IP, port))
        self.listener.listen(4)
        self.listener.settimeout(0.2)
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, name="net-accept", daemon=True)]
        self._threads[0].start()

    def close(self) -> None:
        self._stop.set()
        for c in self._conns:  # wakes a sender blocked in sendall
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in list(self._threads):
            t.join(5)
        for c in self._conns:
            c.close()
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)  # blocking: sendall never stops half-way through a record
            self._conns.append(conn)
            self.state.connections += 1
            for target in (self._receive, self._send):
                t = threading.Thread(target=target, args=(conn,), daemon=True)
                self._threads.append(t)
                t.start()

    def _read(self, conn: socket.socket, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            if self._stop.is_set():
                return None
            try:
                if not select.select([conn], [], [], 0.2)[0]:
                    continue
                chunk = conn.recv(n - len(buf))
            except (OSError, ValueError):
                return None
            if not chunk:
                return None
            buf += chunk
        return buf

    def _receive(self, conn: socket.socket) -> None:
        """Verify the guest's records of this connection until it ends."""
        seq = 0
        while (head := self._read(conn, HEAD.size)) is not None:
            magic, found, length = HEAD.unpack(head)
            rest = self._read(conn, length + 4) if magic == MAGIC and length <= 1040 else b""
            if rest is None:
                return
            if head + rest != record(self.seed, GUEST_TO_HOST, seq):
                self.state.mismatches.append(f"net0: guest record {seq} of connection "
                                             f"{self.state.connections} arrived as seq {found} "
                                             f"len {length}")
                with contextlib.suppress(OSError):  # no resync: reset, the guest starts again
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.shutdown(socket.SHUT_RDWR)
                return
            self.state.verified += 1
            seq += 1

    def _send(self, conn: socket.socket) -> None:
        """Records to the guest, HOST_RATE per second, until the connection ends."""
        start = time.monotonic()
        seq = 0
        while not self._stop.is_set():
            data = record(self.seed, HOST_TO_GUEST, seq)
            try:
                conn.sendall(data)
            except OSError:
                return
            seq += 1
            self.state.sent += 1
            ahead = seq / HOST_RATE - (time.monotonic() - start)
            if ahead > 0:
                self._stop.wait(ahead)
