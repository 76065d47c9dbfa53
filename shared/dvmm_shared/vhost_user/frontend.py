"""A vhost-user frontend client: the requests a VMM sends a backend.

Owns the frontend half of the protocol: typed calls for each request,
waiting for replies (and REPLY_ACK acknowledgements when negotiated), and
the fixed bring-up order for a ring (num, addr, base, call, kick, enable).
Used by the dvmm core, the benchmarks' synthetic frontends and the tests.
It knows nothing of PCI or KVM: the caller decides addresses and fds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from .connection import Connection, Message
from .message import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    ConfigSpace,
    InflightInfo,
    MemRegion,
    MessageError,
    ProtocolFeature,
    Request,
    VringAddr,
    VringState,
    decode_u64,
    encode_mem_table,
    encode_single_region,
    encode_u64,
    request_name,
)


class FrontendError(Exception):
    """The backend refused a request or answered out of protocol."""


@dataclass(frozen=True)
class RingSetup:
    """Everything needed to start one ring."""

    index: int
    num: int
    desc_user_addr: int
    avail_user_addr: int
    used_user_addr: int
    kick_fd: int
    call_fd: int
    base: int = 0


class Frontend:
    """Typed vhost-user requests over one connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.protocol_features = 0
        self.features = 0

    @classmethod
    def connect(cls, path: str, timeout: float | None = 5.0) -> Frontend:
        return cls(Connection.connect(path, timeout))

    def close(self) -> None:
        self.conn.close()

    # -- plumbing -----------------------------------------------------------
    def _has(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & 1 << feature)

    def _call(self, request: Request, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        self.conn.send(request, payload, fds)
        return self._reply(request).payload

    def _reply(self, request: Request) -> Message:
        msg = self._reply_with_fds(request)
        msg.close_fds()
        return msg

    def _reply_with_fds(self, request: Request) -> Message:
        """The reply to ``request``; the caller owns (and must close) its fds."""
        msg = self.conn.recv()
        if not msg.header.is_reply or msg.header.request != request:
            msg.close_fds()
            raise FrontendError(
                f"expected a reply to {request.name}, got {request_name(msg.header.request)}")
        return msg

    def _send(self, request: Request, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """A request without a reply of its own; waits for the ack under REPLY_ACK."""
        ack = self._has(ProtocolFeature.REPLY_ACK)
        self.conn.send(request, payload, fds, need_reply=ack)
        if ack and decode_u64(self._reply(request).payload, "ack") != 0:
            raise FrontendError(f"backend refused {request.name}")

    # -- negotiation ----------------------------------------------------------
    def get_features(self) -> int:
        return decode_u64(self._call(Request.GET_FEATURES), "features")

    def set_features(self, features: int) -> None:
        self.features = features
        self._send(Request.SET_FEATURES, encode_u64(features))

    def get_protocol_features(self) -> int:
        return decode_u64(self._call(Request.GET_PROTOCOL_FEATURES), "protocol features")

    def set_protocol_features(self, features: int) -> None:
        self.conn.send(Request.SET_PROTOCOL_FEATURES, encode_u64(features))
        self.protocol_features = features

    def set_owner(self) -> None:
        self._send(Request.SET_OWNER)

    def get_queue_num(self) -> int:
        return decode_u64(self._call(Request.GET_QUEUE_NUM), "queue num")

    def get_max_mem_slots(self) -> int:
        return decode_u64(self._call(Request.GET_MAX_MEM_SLOTS), "mem slots")

    def negotiate(self, wanted: int, protocol_wanted: int) -> tuple[int, int]:
        """The usual opening: features and protocol features, then SET_OWNER."""
        offered = self.get_features()
        proto = 0
        if offered & 1 << VHOST_USER_F_PROTOCOL_FEATURES:
            proto = self.get_protocol_features() & protocol_wanted
            self.set_protocol_features(proto)
        self.set_owner()
        features = offered & (wanted | 1 << VHOST_USER_F_PROTOCOL_FEATURES)
        self.set_features(features)
        return features, proto

    # -- memory ---------------------------------------------------------------
    def set_mem_table(self, regions: Sequence[MemRegion], fds: Sequence[int]) -> None:
        self._send(Request.SET_MEM_TABLE, encode_mem_table(list(regions)), fds)

    def add_mem_reg(self, region: MemRegion, fd: int) -> None:
        self._send(Request.ADD_MEM_REG, encode_single_region(region), [fd])

    def rem_mem_reg(self, region: MemRegion) -> None:
        self._send(Request.REM_MEM_REG, encode_single_region(region))

    # -- rings ----------------------------------------------------------------
    def start_ring(self, ring: RingSetup, enable: bool = True) -> None:
        """Bring a ring up in the fixed order: num, addr, base, call, kick, enable."""
        self._send(Request.SET_VRING_NUM, VringState(ring.index, ring.num).encode())
        self._send(Request.SET_VRING_ADDR, VringAddr(
            ring.index, 0, ring.desc_user_addr, ring.used_user_addr,
            ring.avail_user_addr, 0).encode())
        self._send(Request.SET_VRING_BASE, VringState(ring.index, ring.base).encode())
        self._send(Request.SET_VRING_CALL, encode_u64(ring.index), [ring.call_fd])
        self._send(Request.SET_VRING_KICK, encode_u64(ring.index), [ring.kick_fd])
        if enable and self.features & 1 << VHOST_USER_F_PROTOCOL_FEATURES:
            self.set_vring_enable(ring.index, True)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._send(Request.SET_VRING_ENABLE, VringState(index, int(enable)).encode())

    def get_vring_base(self, index: int) -> int:
        """Stop a ring; returns the backend's next available index."""
        payload = self._call(Request.GET_VRING_BASE, VringState(index, 0).encode())
        return VringState.decode(payload).num

    # -- in-flight tracking (INFLIGHT_SHMFD, "Inflight I/O tracking") ----------
    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[int, InflightInfo]:
        """Ask the backend for a (zeroed) in-flight region for ``num_queues``
        rings of ``queue_size``; returns the region's fd (the caller owns it)
        and its description, to hand back with :meth:`set_inflight_fd`."""
        self.conn.send(Request.GET_INFLIGHT_FD,
                       InflightInfo(0, 0, num_queues, queue_size).encode())
        msg = self._reply_with_fds(Request.GET_INFLIGHT_FD)
        try:
            info = InflightInfo.decode(msg.payload)
        except MessageError as exc:
            msg.close_fds()
            raise FrontendError(f"GET_INFLIGHT_FD: {exc}") from exc
        fd = msg.take_fd()
        if info.mmap_size == 0 or fd is None:
            if fd is not None:
                os.close(fd)
            raise FrontendError(
                f"backend refused GET_INFLIGHT_FD for {num_queues} queues of {queue_size}"
                if info.mmap_size == 0 else "GET_INFLIGHT_FD reply without an fd")
        return fd, info

    def set_inflight_fd(self, fd: int, info: InflightInfo) -> None:
        """Hand the in-flight region back (before the rings are started)."""
        self._send(Request.SET_INFLIGHT_FD, info.encode(), [fd])

    def set_backend_req_fd(self, fd: int) -> None:
        """Give the backend its end of the back-end channel (BACKEND_REQ)."""
        self._send(Request.SET_BACKEND_REQ_FD, b"", [fd])

    # -- config ---------------------------------------------------------------
    def get_config(self, offset: int, size: int) -> bytes:
        payload = self._call(Request.GET_CONFIG,
                             ConfigSpace(offset, size, 0, bytes(size)).encode())
        cfg = ConfigSpace.decode(payload)
        if cfg.size != size:
            raise FrontendError(f"GET_CONFIG returned {cfg.size} bytes, asked {size}")
        return cfg.data

    def set_config(self, offset: int, data: bytes) -> None:
        self._send(Request.SET_CONFIG, ConfigSpace(offset, len(data), 0, data).encode())
