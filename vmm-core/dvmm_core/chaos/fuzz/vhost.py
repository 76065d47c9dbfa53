"""Fuzz targets ``vhost-user-blk|net|display``: a hostile frontend's message stream.

Each input is one frontend connection to the backend's real
:class:`~dvmm_shared.vhost_user.daemon.Daemon` (in this process, driven one
select pass at a time instead of by ``serve_forever``, so a run is
deterministic): a sequence of vhost-user messages -- request codes, flags,
payloads shaped like the real ones with hostile numbers, or raw bytes --
each with the fds a frontend would pass (a memfd of guest memory, eventfds,
a socket, an in-flight memfd) or too few, too many, the wrong kind; kicks
on the rings it set up; guest memory rewritten under the rings; and a raw
tail that ends the stream anywhere, even inside a message.

What counts as a crash: any exception out of the daemon (a refused message
is answered and logged, never raised), a signal (SIGBUS from touching a
mapping past the end of a short memfd), a hang, or an fd the backend was
handed and did not close (:class:`~.hostile.FdGuard`).

The device is the real one; only its outside world is local: a scratch
image file (blk), a socketpair standing in for the TAP (net), nothing for
the display (its VNC side is not started).
"""

from __future__ import annotations

import array
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

from ._atheris import Provider, provider
from .hostile import FdGuard, choose, pick

MEM_SIZE = 1 << 20          # the guest memfd a well-behaved frontend maps
USER_BASE = 0x7F00_0000_0000  # the frontend's address of that memfd
IMAGE_SIZE = 1 << 20
MAX_OPS = 40
MAX_PASSES = 64             # select passes per step: a loop that never settles is a hang


class _Frontend:
    """The hostile frontend's side of one connection, and every fd it made."""

    def __init__(self, daemon: Any, mem_fd: int) -> None:
        self.daemon = daemon
        self.mem_fd = mem_fd
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(daemon.listener.getsockname())
        self.sock.setblocking(False)
        self.owned: list[int] = []          # fds this side created (closed at the end)
        self.kicks: list[int] = []          # eventfds it handed over, to signal later
        self.peers: list[socket.socket] = []  # our ends of sockets it handed over
        daemon._accept()

    # -- fds a frontend passes -------------------------------------------------------
    def make_fd(self, p: Provider, kind: int) -> int:
        if kind == 0:
            fd = os.dup(self.mem_fd)
        elif kind == 1:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.kicks.append(fd)
        elif kind == 2:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            mine.setblocking(False)
            self.peers.append(mine)
            fd = theirs.detach()
        else:  # a small memfd (in-flight region, or guest memory that is too short)
            fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
            os.ftruncate(fd, pick(p, [0, 4096, 1 << 16], 20))
        self.owned.append(fd)
        return fd

    # -- the stream ------------------------------------------------------------------
    def send(self, data: bytes, fds: Sequence[int] = ()) -> bool:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            sent = self.sock.sendmsg([data], anc)
            if sent < len(data):
                self.sock.setblocking(True)
                self.sock.settimeout(1.0)
                self.sock.sendall(data[sent:])
                self.sock.setblocking(False)
        except OSError:  # the daemon dropped us
            return False
        return True

    def pump(self) -> None:
        """Let the daemon handle everything ready; read (and drop) its replies."""
        for _ in range(MAX_PASSES):
            events = self.daemon.sel.select(0)
            if not events:
                break
            for key, mask in events:
                self.daemon._dispatch(key, mask)
            self._after_pass()
            self.drain()
        else:
            raise RuntimeError(f"the daemon still had work after {MAX_PASSES} passes")
        self.drain()

    def _after_pass(self) -> None:
        """What ``serve_forever`` does after each select pass (the channel's
        timers and lost-notification net; it forgets an ended session)."""
        channel = getattr(self.daemon.faults, "channel", None)
        if channel is not None:
            channel.run_due(self.daemon.session)

    def drain(self) -> None:
        space = socket.CMSG_SPACE(8 * 4)
        for sock in (self.sock, *self.peers):
            while True:
                try:
                    data, anc, _flags, _ = sock.recvmsg(65536, space)
                except (BlockingIOError, OSError):
                    break
                for _level, _kind, blob in anc:  # GET_INFLIGHT_FD's memfd
                    fds = array.array("i")
                    fds.frombytes(blob[:len(blob) - len(blob) % 4])
                    for fd in fds:
                        os.close(fd)
                if not data:
                    break

    def close(self) -> None:
        self.sock.close()
        if self.daemon.session is not None:
            self.pump()  # the daemon sees the disconnect itself
        self._after_pass()
        for peer in self.peers:
            peer.close()
        for fd in self.owned:
            os.close(fd)


def _message(p: Provider, fe: _Frontend, backend: Any) -> tuple[bytes, list[int]]:
    """One message: a request code, flags, a payload shaped for it, its fds."""
    from dvmm_shared.vhost_user.message import HEADER, Request

    codes = list(Request)
    req = codes[choose(p, len(codes))] if p.ConsumeIntInRange(0, 15) else pick(p, [], 32)
    flags = pick(p, [1, 1, 1 | 1 << 3, 1 | 1 << 2, 0, 2], 32)
    payload, wanted = _payload(p, int(req), backend)
    if not p.ConsumeIntInRange(0, 7):
        payload = p.ConsumeBytes(choose(p, 300))
    # the fds it should carry, none, one more, or some of the wrong kind
    how = choose(p, 6)
    kinds = (wanted if how < 3 else [] if how == 3 else [*wanted, choose(p, 4)] if how == 4
             else [choose(p, 4) for _ in range(choose(p, 4))])
    fds = [fe.make_fd(p, kind) for kind in kinds]
    return HEADER.pack(req, flags, len(payload)) + payload, fds


def _payload(p: Provider, req: int, backend: Any) -> tuple[bytes, list[int]]:
    """A payload laid out for ``req`` with hostile numbers, and the fd kinds it wants."""
    from dvmm_shared.vhost_user import message as m

    R = m.Request
    ring = pick(p, [0, 1, 2, 3, 0xFF, 0x100], 32)
    num = pick(p, [8, 16, 256, 1024, 0, 1, 3, 2048], 32)
    u64: Callable[[Sequence[int]], bytes] = lambda ok: struct.pack("<Q", pick(p, ok))  # noqa: E731
    if req in (R.SET_FEATURES, R.SET_PROTOCOL_FEATURES, R.SET_LOG_BASE, R.SET_STATUS):
        offered = backend.features() | 1 << m.VHOST_USER_F_PROTOCOL_FEATURES
        return u64([offered, offered & ~(1 << 30), 0, 0x1FFFF, 1 << 5 | 1 << 12]), []
    if req in (R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE):
        return m.VringState(ring, num).encode(), []
    if req == R.SET_VRING_ADDR:
        desc, used, avail = (USER_BASE + pick(p, [0x1000, 0x4000, 0x8000, MEM_SIZE - 16,
                                                  MEM_SIZE], 20) for _ in range(3))
        return m.VringAddr(ring, pick(p, [0, 1], 32), desc, used, avail, 0).encode(), []
    if req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
        nofd = m.VHOST_USER_VRING_NOFD_MASK if not p.ConsumeIntInRange(0, 5) else 0
        return struct.pack("<Q", ring | nofd), [] if nofd else [1]
    if req in (R.SET_MEM_TABLE, R.ADD_MEM_REG, R.REM_MEM_REG):
        regions = [_region(p) for _ in range(1 + choose(p, 3))]
        if req != R.SET_MEM_TABLE:
            return m.encode_single_region(regions[0]), [0]
        body = m.encode_mem_table(regions)
        return body[:8 + 32 * len(regions)] if p.ConsumeBool() else body, [0] * len(regions)
    if req in (R.GET_CONFIG, R.SET_CONFIG):
        size = pick(p, [4, 8, 60, 256, 0], 32)
        data = p.ConsumeBytes(size if size <= 256 else 0)
        return m.ConfigSpace(pick(p, [0, 4, 20, 256], 32), size, pick(p, [0, 1], 32),
                             data).encode(), []
    if req in (R.GET_INFLIGHT_FD, R.SET_INFLIGHT_FD):
        info = m.InflightInfo(pick(p, [4096, 1 << 16, 0]), pick(p, [0, 4096]),
                              pick(p, [1, 2, 3, 0, 64], 16), pick(p, [8, 256, 1024, 0], 16))
        return info.encode(), [3] if req == R.SET_INFLIGHT_FD else []
    if req in (R.SET_BACKEND_REQ_FD, R.GPU_SET_SOCKET):
        return b"", [2]
    return p.ConsumeBytes(choose(p, 24)), []


def _region(p: Provider) -> Any:
    from dvmm_shared.vhost_user.message import MemRegion

    size = pick(p, [MEM_SIZE, MEM_SIZE // 2, 4096, 2 * MEM_SIZE, 0])
    return MemRegion(pick(p, [0, MEM_SIZE, 1 << 32]), size,
                     pick(p, [USER_BASE, USER_BASE + MEM_SIZE // 2, 0]), pick(p, [0, 4096, 12]))


def session(daemon_of: Callable[[], Any], data: bytes, guard: FdGuard) -> None:
    """One input = one frontend connection (see the module doc)."""
    p = provider(data)
    daemon, mem_fd = daemon_of(), os.memfd_create("fuzz-guest", os.MFD_CLOEXEC)
    try:
        os.ftruncate(mem_fd, MEM_SIZE)
        os.pwrite(mem_fd, p.ConsumeBytes(choose(p, 4096)), pick(p, [0x1000, 0x4000, 0], 20))
        fe = _Frontend(daemon, mem_fd)
        try:
            _play(p, fe, daemon.backend)
        finally:
            fe.close()
    finally:
        daemon.close()
        os.close(mem_fd)
    guard.check()


def _prelude(p: Provider, fe: _Frontend, backend: Any) -> None:
    """What a well-behaved frontend sends first (features, memory table, rings
    with their fds, enabled), so the hostile part meets running rings too."""
    from dvmm_shared.vhost_user import message as m

    R = m.Request
    features = backend.features() | 1 << m.VHOST_USER_F_PROTOCOL_FEATURES
    steps: list[tuple[int, bytes, list[int]]] = [
        (R.SET_OWNER, b"", []),
        (R.SET_FEATURES, m.encode_u64(features & pick(p, [features, ~0x20000000])), []),
        # REPLY_ACK with CONFIG, INFLIGHT_SHMFD or BACKEND_REQ (the display's)
        (R.SET_PROTOCOL_FEATURES, m.encode_u64(pick(p, [1 << 3 | 1 << 9, 1 << 3 | 1 << 12,
                                                        1 << 3 | 1 << 5])), []),
        (R.SET_MEM_TABLE, m.encode_mem_table([m.MemRegion(0, MEM_SIZE, USER_BASE, 0)]), [0]),
    ]
    for ring in range(1 + choose(p, min(3, backend.num_queues))):
        size = pick(p, [16, 8, 256], 16)
        u = USER_BASE + 0x1000 + 0x3000 * ring
        steps += [
            (R.SET_VRING_NUM, m.VringState(ring, size).encode(), []),
            (R.SET_VRING_ADDR, m.VringAddr(ring, 0, u, u + 16 * size + 0x800,
                                           u + 16 * size, 0).encode(), []),
            (R.SET_VRING_BASE, m.VringState(ring, pick(p, [0, 0xFFFF], 16)).encode(), []),
            (R.SET_VRING_CALL, m.encode_u64(ring), [1]),
            (R.SET_VRING_KICK, m.encode_u64(ring), [1]),
            (R.SET_VRING_ENABLE, m.VringState(ring, 1).encode(), []),
        ]
    for req, payload, kinds in steps:
        if not fe.send(m.encode(req, payload), [fe.make_fd(p, k) for k in kinds]):
            return
        fe.pump()


def _play(p: Provider, fe: _Frontend, backend: Any) -> None:
    if p.ConsumeBool():
        _prelude(p, fe, backend)
    for _ in range(MAX_OPS):
        if not p.remaining_bytes() or fe.daemon.session is None:
            return
        op = choose(p, 12)
        if op < 9:
            data, fds = _message(p, fe, backend)
            if not fe.send(data, fds):
                return
        elif op == 9 and fe.kicks:
            os.eventfd_write(fe.kicks[choose(p, len(fe.kicks))], 1)
        elif op == 10:  # the driver rewrites guest memory (rings, buffers)
            os.pwrite(fe.mem_fd, p.ConsumeBytes(choose(p, 256)), pick(p, [0x1000, 0x4000,
                                                                          0x8000], 20))
        else:  # a raw tail: anything, a message cut anywhere; then the frontend hangs up
            fe.send(p.ConsumeBytes(p.remaining_bytes()))
            fe.sock.shutdown(socket.SHUT_WR)
        fe.pump()


# -- the three devices ----------------------------------------------------------------
def _daemon(backend: Any) -> Any:
    from dvmm_shared.vhost_user.daemon import Daemon

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind("")  # an autobound abstract address: no file to clean up
    listener.listen(1)
    # a message cut short by the stream's end is refused at once, not after 5 s
    return Daemon.from_listener(backend, listener, message_timeout=0.05)


def blk_daemon(image: str) -> Callable[[], Any]:
    from dvmm_blk.device import BlkDevice
    from dvmm_blk.disk import RawDisk

    return lambda: _daemon(BlkDevice(RawDisk(image, lock=False), queues=2, serial="fuzz"))


class SocketLink:
    """The net device's link: a SOCK_SEQPACKET socketpair standing in for a TAP
    (the frames the device sends are read and dropped)."""

    vnet_hdr = True
    pairs = 1
    description = "fuzz link"

    def __init__(self) -> None:
        self.dev, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.dev.setblocking(False)
        self.peer.setblocking(False)

    def fileno(self, pair: int) -> int:
        return self.dev.fileno()

    def recv(self, pair: int, bufs: Sequence[memoryview]) -> int:
        n, _, _, _ = self.dev.recvmsg_into(bufs)
        return int(n)

    def send(self, pair: int, bufs: Sequence[memoryview]) -> None:
        self.dev.sendmsg(bufs)
        try:
            while self.peer.recv(1 << 17):
                pass
        except BlockingIOError:
            pass

    def reopen(self, pair: int) -> None:
        pass

    def set_vnet_header(self, size: int, offloads: int) -> None:
        pass

    def set_pair_active(self, pair: int, active: bool) -> None:
        pass

    def close(self) -> None:
        self.dev.close()
        self.peer.close()


def net_daemon() -> Any:
    from dvmm_net.device import NetDevice

    return _daemon(NetDevice(SocketLink(), mac=bytes.fromhex("525400123456")))


def display_daemon() -> Any:
    from dvmm_display.device import GpuDevice

    return _daemon(GpuDevice((640, 480)))


def target(name: str, work: str) -> Callable[[bytes], None]:
    """The one-input function of ``vhost-user-NAME`` (scratch files in ``work``)."""
    guard = FdGuard()
    if name == "blk":
        image = os.path.join(work, "disk.img")
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        factory = blk_daemon(image)
    else:
        factory = net_daemon if name == "net" else display_daemon
    return lambda data: session(factory, data, guard)
