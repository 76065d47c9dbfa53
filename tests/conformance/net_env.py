"""The host side of the net conformance tests: namespaces, TAPs, backends, sockets.

Owns everything the tests do outside the guest: a network namespace per
test (``ip netns``) so no traffic leaves it, TAP interfaces inside it, the
dvmm net backend started inside it (its vhost-user socket is a file path,
so QEMU outside the namespace reaches it), a QEMU wrapper that runs QEMU
inside the namespace (for QEMU's own ``-netdev tap``), and host endpoints:
sockets are created *inside* the namespace by switching this thread into
it for the ``socket()`` call only (a socket stays in the namespace it was
created in), so pings and TCP transfers need no tool on the host.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dvmm_testing import procs

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
HOST_IP = "10.77.0.1"
GUEST_IP = "10.77.0.2"
PREFIX = 24


def sh(*argv: str) -> str:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


@dataclass
class NetNs:
    """A network namespace of the test's own."""

    name: str

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str) -> str:
        return sh(*self.argv(*argv))

    def add_tap(self, name: str, *, addr: str | None = f"{HOST_IP}/{PREFIX}",
                multi_queue: bool = False, mtu: int | None = None) -> None:
        self.run("ip", "tuntap", "add", "dev", name, "mode", "tap",
                 *(["multi_queue"] if multi_queue else []))
        if mtu is not None:
            self.run("ip", "link", "set", name, "mtu", str(mtu))
        if addr is not None:
            self.run("ip", "addr", "add", addr, "dev", name)
        self.run("ip", "link", "set", name, "up")

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM,
               proto: int = 0) -> socket.socket:
        """A socket in this namespace (this thread enters it for the call only)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                return socket.socket(family, kind, proto)
            finally:
                _setns(own)
        finally:
            os.close(own)
            os.close(target)

    def qemu_wrapper(self, path: Path) -> str:
        """A script that runs QEMU inside the namespace (for ``-netdev tap``)."""
        path.write_text(f'#!/bin/sh\nexec ip netns exec {self.name} qemu-system-x86_64 "$@"\n')
        path.chmod(0o755)
        return str(path)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def netns(tag: str) -> Iterator[NetNs]:
    """A fresh namespace with ``lo`` up; deleted (with its TAPs) afterwards."""
    ns = NetNs(f"dvmm-{tag}-{os.getpid()}")
    subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, check=False)
    sh("ip", "netns", "add", ns.name)
    try:
        ns.run("ip", "link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, check=False)


# -- the dvmm net backend -------------------------------------------------------
@dataclass
class NetBackend:
    socket: str
    log: Path
    proc: subprocess.Popen[bytes]

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def pair_stats(self) -> list[dict[str, int]]:
        """Per-pair counters from the backend's last stats line (logged on exit)."""
        lines = [ln for ln in self.text().splitlines() if "stopped: pair0" in ln]
        assert lines, f"no stats in the backend log:\n{self.text()}"
        pairs = []
        for m in re.finditer(r"pair\d+: rx (\d+) frames/(\d+) B \((\d+) gso\), "
                             r"tx (\d+) frames/(\d+) B \((\d+) gso, (\d+) csum\)", lines[-1]):
            keys = ("rx_frames", "rx_bytes", "rx_gso", "tx_frames", "tx_bytes", "tx_gso",
                    "tx_csum")
            pairs.append(dict(zip(keys, map(int, m.groups()), strict=True)))
        return pairs


@contextmanager
def net_backend(workdir: Path, name: str, *args: str,
                ns: NetNs | None = None) -> Iterator[NetBackend]:
    """``python -m dvmm_net --socket ... ARGS`` (inside ``ns``); SIGTERM on exit."""
    sock = str(workdir / f"{name}.sock")
    log = workdir / f"{name}.log"
    argv = [sys.executable, "-m", "dvmm_net", "--socket", sock, *args]
    proc = procs.spawn(ns.argv(*argv) if ns is not None else argv, log)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"net backend {name} did not listen:\n{procs.log_tail(log)}")
            time.sleep(0.02)
        yield NetBackend(sock, log, proc)
    finally:
        procs.stop(proc)


def vhost_user_net_args(sock: str, mac: str, *, queues: int = 1, extra: str = "") -> list[str]:
    """QEMU's vhost-user-net frontend.

    ``vectors=0``: QEMU 7.2 under TCG dereferences a NULL irqfd table when a
    vhost-user virtio-net device's MSI-X vector is unmasked (there are no KVM
    irqfds without KVM) and crashes; with legacy INTx it works.  So per-queue
    interrupt counts are not available and the backend's per-pair counters
    show which queues carried traffic."""
    mq = ",mq=on,vectors=0" if queues > 1 else ",vectors=0"
    return ["-chardev", f"socket,id=n0,path={sock}",
            "-netdev", f"vhost-user,id=net0,chardev=n0,queues={queues}",
            "-device", f"virtio-net-pci,netdev=net0,mac={mac}{mq}{extra}"]


# -- host endpoints -------------------------------------------------------------
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int(w) for w in struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


@dataclass
class PingResult:
    sent: int
    received: int
    rtts: list[float] = field(default_factory=list)


def ping(ns: NetNs, dst: str, count: int = 20, interval: float = 0.05, size: int = 56,
         timeout: float = 5.0) -> PingResult:
    """ICMP echo from inside ``ns`` (a raw socket: no ping binary needed)."""
    sock = ns.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    sent_at: dict[int, float] = {}
    result = PingResult(count, 0)
    with sock:
        for seq in range(count):
            payload = bytes((seq + i) & 0xFF for i in range(size))
            head = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
            csum = _checksum(head + payload)
            sock.sendto(struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, csum, ident, seq)
                        + payload, (dst, 0))
            sent_at[seq] = time.monotonic()
            _collect(sock, ident, sent_at, result, time.monotonic() + interval)
        _collect(sock, ident, sent_at, result, time.monotonic() + timeout,
                 until=lambda: not sent_at)
    return result


def _collect(sock: socket.socket, ident: int, sent_at: dict[int, float], result: PingResult,
             deadline: float, until: Callable[[], bool] | None = None) -> None:
    while (left := deadline - time.monotonic()) > 0:
        if until is not None and until():
            return
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            return
        packet = sock.recv(65536)
        ihl = (packet[0] & 0x0F) * 4
        kind, _, _, pid, seq = struct.unpack_from("!BBHHH", packet, ihl)
        if kind == ICMP_ECHO_REPLY and pid == ident and seq in sent_at:
            result.rtts.append(time.monotonic() - sent_at.pop(seq))
            result.received += 1


@dataclass
class Transfer:
    """One TCP transfer seen from the host: bytes, their sha256, and timing."""

    nbytes: int = 0
    sha256: str = ""
    seconds: float = 0.0
    error: BaseException | None = None

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e6 if self.seconds else 0.0


class TcpSink(threading.Thread):
    """Accept one connection in ``ns`` and hash everything it sends."""

    def __init__(self, ns: NetNs, port: int, addr: str = HOST_IP) -> None:
        super().__init__(name=f"sink-{port}", daemon=True)
        self.listener = ns.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((addr, port))
        self.listener.listen(1)
        self.listener.settimeout(120)
        self.result = Transfer()

    def run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(120)
                digest = hashlib.sha256()
                t0 = None
                while data := conn.recv(1 << 20):
                    t0 = t0 if t0 is not None else time.monotonic()
                    digest.update(data)
                    self.result.nbytes += len(data)
                self.result.seconds = time.monotonic() - (t0 or time.monotonic())
                self.result.sha256 = digest.hexdigest()
        except BaseException as exc:
            self.result.error = exc
        finally:
            self.listener.close()

    def outcome(self, timeout: float = 120) -> Transfer:
        self.join(timeout)
        assert not self.is_alive(), "the host sink did not finish"
        if self.result.error is not None:
            raise self.result.error
        return self.result


class TcpSource(threading.Thread):
    """Connect from ``ns`` to a guest listener (retrying until it listens) and send."""

    def __init__(self, ns: NetNs, addr: str, port: int, data: bytes) -> None:
        super().__init__(name=f"source-{port}", daemon=True)
        self.ns, self.addr, self.port, self.data = ns, addr, port, data
        self.result = Transfer(len(data), hashlib.sha256(data).hexdigest())

    def run(self) -> None:
        try:
            sock = self._connect(time.monotonic() + 60)
            with sock:
                t0 = time.monotonic()
                sock.sendall(self.data)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(4096):  # until the guest closes: all data was read
                    pass
                self.result.seconds = time.monotonic() - t0
        except BaseException as exc:
            self.result.error = exc

    def _connect(self, deadline: float) -> socket.socket:
        while True:
            sock = self.ns.socket()
            sock.settimeout(120)
            try:
                sock.connect((self.addr, self.port))
                return sock
            except ConnectionRefusedError:  # the guest's nc is not listening yet
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def outcome(self, timeout: float = 120) -> Transfer:
        self.join(timeout)
        assert not self.is_alive(), "the host source did not finish"
        if self.result.error is not None:
            raise self.result.error
        return self.result
