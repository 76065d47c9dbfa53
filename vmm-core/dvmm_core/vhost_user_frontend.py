"""The core's vhost-user link to one device backend.

Owns the connection to a backend process and the order in which a device
is brought up and down over it:

* connect: GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_OWNER,
  GET_QUEUE_NUM, SET_MEM_TABLE (the guest RAM memfd, once);
* start (the guest set DRIVER_OK): SET_FEATURES, then for every enabled
  queue, in the fixed order, num, addr, base, call, kick, enable;
* stop (the guest reset the device): disable and GET_VRING_BASE per ring.

Ring addresses travel as the core's own userspace addresses (the protocol
says so), translated from the guest-physical addresses the driver wrote.
A backend that goes away makes every call raise :class:`LinkDown`; the core
keeps running and logs it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from dvmm_shared.vhost_user.connection import Connection, ConnectionClosed
from dvmm_shared.vhost_user.frontend import Frontend, FrontendError, RingSetup
from dvmm_shared.vhost_user.message import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    MemRegion,
    MessageError,
    ProtocolFeature,
)

log = logging.getLogger("dvmm.vhost_user_frontend")

WANTED_PROTOCOL = (1 << ProtocolFeature.MQ | 1 << ProtocolFeature.REPLY_ACK
                   | 1 << ProtocolFeature.CONFIG)


REPLY_TIMEOUT = 10.0


class LinkDown(Exception):
    """The backend is unreachable or broke the protocol."""


@dataclass(frozen=True)
class RamRegion:
    """A piece of guest RAM as the core maps it: what the memory table needs."""

    guest_addr: int
    size: int
    host_addr: int
    fd: int
    fd_offset: int


@dataclass(frozen=True)
class QueueStart:
    index: int
    size: int
    desc: int  # guest-physical
    driver: int
    device: int
    kick_fd: int
    call_fd: int


class VhostUserLink:
    """One backend connection, as used by a virtio-pci device of the core."""

    def __init__(self, name: str, socket_path: str, ram: Sequence[RamRegion],
                 config_size: int = 0) -> None:
        self.name = name
        self.config_size = config_size
        self.path = socket_path
        self.ram = list(ram)
        self.fe: Frontend | None = None
        self.features = 0
        self.protocol = 0
        self.num_queues = 1
        self._started: list[int] = []

    # -- lifecycle ------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> None:
        """Connect (waiting up to ``timeout`` for the socket) and negotiate."""
        conn = _connect_retry(self.path, timeout)
        # A backend that hangs (rather than dies) must not block a vCPU forever
        # on a config read: every reply has a deadline, and missing it is LinkDown.
        conn.sock.settimeout(REPLY_TIMEOUT)
        self.fe = Frontend(conn)
        with self._guard("connect"):
            fe = self.fe
            self.features = fe.get_features()
            if self.features & 1 << VHOST_USER_F_PROTOCOL_FEATURES:
                self.protocol = fe.get_protocol_features() & WANTED_PROTOCOL
                fe.set_protocol_features(self.protocol)
            fe.set_owner()
            if self.protocol & 1 << ProtocolFeature.MQ:
                self.num_queues = fe.get_queue_num()
            fe.set_mem_table([MemRegion(r.guest_addr, r.size, r.host_addr, r.fd_offset)
                              for r in self.ram], [r.fd for r in self.ram])
        log.info("%s: connected to %s (features %#x, %d queues)", self.name, self.path,
                 self.features, self.num_queues)

    @property
    def device_features(self) -> int:
        """Virtio features the backend offers to the guest."""
        return self.features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES)

    def get_config(self, offset: int, size: int) -> bytes:
        """Bytes of the device config space.  The whole structure is fetched
        from offset 0, as QEMU does: some backends (libvhost-user's blk in
        qemu-storage-daemon) ignore the offset of GET_CONFIG."""
        if not self.protocol & 1 << ProtocolFeature.CONFIG or offset + size > self.config_size:
            return bytes(size)
        with self._guard("GET_CONFIG"):
            return self._fe().get_config(0, self.config_size)[offset:offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        if self.protocol & 1 << ProtocolFeature.CONFIG:
            with self._guard("SET_CONFIG"):
                self._fe().set_config(offset, data)

    def start(self, driver_features: int, queues: Sequence[QueueStart]) -> None:
        """DRIVER_OK: give the backend the features and bring each ring up."""
        fe = self._fe()
        with self._guard("start"):
            features = driver_features | (self.features & 1 << VHOST_USER_F_PROTOCOL_FEATURES)
            fe.set_features(features)
            for q in queues:
                fe.start_ring(RingSetup(
                    q.index, q.size, self._host(q.desc), self._host(q.driver),
                    self._host(q.device), q.kick_fd, q.call_fd))
                self._started.append(q.index)
        log.info("%s: started %d queue(s), features %#x", self.name, len(queues),
                 driver_features)

    def stop(self) -> None:
        """Device reset: stop every started ring (GET_VRING_BASE)."""
        started, self._started = self._started, []
        if not started or self.fe is None:
            return
        with self._guard("stop"):
            for index in started:
                if self.features & 1 << VHOST_USER_F_PROTOCOL_FEATURES:
                    self.fe.set_vring_enable(index, False)
                base = self.fe.get_vring_base(index)
                log.debug("%s: ring %d stopped at %d", self.name, index, base)

    def close(self) -> None:
        if self.fe is not None:
            self.fe.close()
            self.fe = None

    # -- helpers --------------------------------------------------------------
    def _fe(self) -> Frontend:
        if self.fe is None:
            raise LinkDown(f"{self.name}: not connected")
        return self.fe

    def _host(self, gpa: int) -> int:
        for r in self.ram:
            if r.guest_addr <= gpa < r.guest_addr + r.size:
                return r.host_addr + gpa - r.guest_addr
        raise LinkDown(f"{self.name}: ring address {gpa:#x} is not in guest RAM")

    def _guard(self, what: str) -> _Guard:
        return _Guard(self, what)


class _Guard:
    """Turns every way a backend can fail us into LinkDown."""

    def __init__(self, link: VhostUserLink, what: str) -> None:
        self.link, self.what = link, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if exc is None:
            return
        if isinstance(exc, ConnectionClosed | FrontendError | MessageError | OSError):
            raise LinkDown(f"{self.link.name}: {self.what} failed: {exc}") from exc


def _connect_retry(path: str, timeout: float) -> Connection:
    """Connect to a socket that a just-started backend may not have created yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Connection.connect(path, timeout=5.0)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if time.monotonic() >= deadline:
                raise LinkDown(f"nobody listens on {path}: {exc.strerror}") from None
            time.sleep(0.05)
        except (TimeoutError, OSError) as exc:
            raise LinkDown(f"cannot connect to {path}: {os.strerror(exc.errno or 0)}") from None
