"""The vhost-user wire format (QEMU docs/interop/vhost-user.rst).

Owns the numbers (request codes, header flags, protocol feature bits) and the
codec: a 12-byte header ``{u32 request, u32 flags, u32 size}`` followed by a
payload whose layout depends on the request.  Decoding is pure and strict:
every payload is length-checked and a bad one raises :class:`MessageError`.
Sockets and fds are the connection's business, not this module's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from ..memory import RegionSpec

HEADER = struct.Struct("<III")
VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x1 << 2
VHOST_USER_NEED_REPLY_MASK = 0x1 << 3

# Largest payload we accept.  The biggest legitimate ones are the memory table
# (8 + 8 * 32 bytes) and GET/SET_CONFIG (12 + 256); anything far larger is a
# broken or hostile frontend.
MAX_PAYLOAD = 4096
VHOST_MEMORY_BASELINE_NREGIONS = 8
VHOST_USER_MAX_CONFIG_SIZE = 256
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x1 << 8
VHOST_USER_F_PROTOCOL_FEATURES = 30
VHOST_USER_CONFIG_FLAG_WRITABLE = 0x1
VHOST_USER_CONFIG_FLAG_MIGRATION = 0x2


class Request(IntEnum):
    """Front-end message types."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendRequest(IntEnum):
    """Back-end message types (sent on the SET_BACKEND_REQ_FD channel)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3


class ProtocolFeature(IntEnum):
    """Protocol feature bit numbers."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


class MessageError(Exception):
    """A message that does not follow the protocol."""


@dataclass(frozen=True)
class Header:
    request: int
    flags: int
    size: int

    @classmethod
    def decode(cls, data: bytes) -> Header:
        if len(data) != HEADER.size:
            raise MessageError(f"truncated header: {len(data)} of {HEADER.size} bytes")
        request, flags, size = HEADER.unpack(data)
        if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
            raise MessageError(f"unsupported vhost-user version in flags {flags:#x}")
        if size > MAX_PAYLOAD:
            raise MessageError(f"payload of {size} bytes is larger than {MAX_PAYLOAD}")
        return cls(request, flags, size)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_REPLY_MASK)


def encode(request: int, payload: bytes = b"", *, reply: bool = False,
           need_reply: bool = False) -> bytes:
    flags = VHOST_USER_VERSION
    if reply:
        flags |= VHOST_USER_REPLY_MASK
    if need_reply:
        flags |= VHOST_USER_NEED_REPLY_MASK
    return HEADER.pack(request, flags, len(payload)) + payload


def request_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


# -- payloads ---------------------------------------------------------------
_U64 = struct.Struct("<Q")
_VRING_STATE = struct.Struct("<II")
_VRING_ADDR = struct.Struct("<IIQQQQ")
_MEM_HDR = struct.Struct("<II")
_MEM_REGION = struct.Struct("<QQQQ")
_CONFIG_HDR = struct.Struct("<III")
# VhostUserInflight: {u64 mmap_size; u64 mmap_offset; u16 num_queues;
# u16 queue_size} is 20 bytes of fields, but C pads the struct to 24 and
# QEMU and libvhost-user check the size against sizeof(): send 24.
_INFLIGHT = struct.Struct("<QQHH4x")
_INFLIGHT_PACKED_SIZE = 20


def _exact(payload: bytes, size: int, what: str) -> None:
    if len(payload) != size:
        raise MessageError(f"{what}: payload of {len(payload)} bytes, expected {size}")


def decode_u64(payload: bytes, what: str = "u64") -> int:
    _exact(payload, _U64.size, what)
    return int(_U64.unpack(payload)[0])


def encode_u64(value: int) -> bytes:
    return _U64.pack(value & 0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class VringState:
    index: int
    num: int

    @classmethod
    def decode(cls, payload: bytes) -> VringState:
        _exact(payload, _VRING_STATE.size, "vring state")
        return cls(*_VRING_STATE.unpack(payload))

    def encode(self) -> bytes:
        return _VRING_STATE.pack(self.index, self.num)


@dataclass(frozen=True)
class VringAddr:
    """Ring addresses, in the frontend's userspace address space."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int

    @classmethod
    def decode(cls, payload: bytes) -> VringAddr:
        _exact(payload, _VRING_ADDR.size, "vring address")
        return cls(*_VRING_ADDR.unpack(payload))

    def encode(self) -> bytes:
        return _VRING_ADDR.pack(self.index, self.flags, self.desc_user_addr,
                                self.used_user_addr, self.avail_user_addr, self.log_guest_addr)


@dataclass(frozen=True)
class MemRegion:
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int

    def spec(self, fd: int) -> RegionSpec:
        return RegionSpec(self.guest_addr, self.size, self.user_addr, self.mmap_offset, fd)

    def encode(self) -> bytes:
        return _MEM_REGION.pack(self.guest_addr, self.size, self.user_addr, self.mmap_offset)


def decode_mem_table(payload: bytes) -> list[MemRegion]:
    if len(payload) < _MEM_HDR.size:
        raise MessageError("memory table: truncated")
    count, _pad = _MEM_HDR.unpack_from(payload)
    if count == 0 or count > VHOST_MEMORY_BASELINE_NREGIONS:
        raise MessageError(f"memory table: {count} regions (1..{VHOST_MEMORY_BASELINE_NREGIONS})")
    # QEMU always sends the full 8-region array; accept exactly-sized too.
    need = _MEM_HDR.size + count * _MEM_REGION.size
    if len(payload) < need:
        raise MessageError(f"memory table: {len(payload)} bytes for {count} regions")
    return [MemRegion(*_MEM_REGION.unpack_from(payload, _MEM_HDR.size + i * _MEM_REGION.size))
            for i in range(count)]


def encode_mem_table(regions: list[MemRegion]) -> bytes:
    body = b"".join(r.encode() for r in regions)
    body += bytes(_MEM_REGION.size * (VHOST_MEMORY_BASELINE_NREGIONS - len(regions)))
    return _MEM_HDR.pack(len(regions), 0) + body


def decode_single_region(payload: bytes) -> MemRegion:
    _exact(payload, 8 + _MEM_REGION.size, "memory region")
    return MemRegion(*_MEM_REGION.unpack_from(payload, 8))


def encode_single_region(region: MemRegion) -> bytes:
    return bytes(8) + region.encode()


@dataclass(frozen=True)
class ConfigSpace:
    offset: int
    size: int
    flags: int
    data: bytes

    @classmethod
    def decode(cls, payload: bytes) -> ConfigSpace:
        if len(payload) < _CONFIG_HDR.size:
            raise MessageError("config: truncated")
        offset, size, flags = _CONFIG_HDR.unpack_from(payload)
        if size > VHOST_USER_MAX_CONFIG_SIZE or offset > VHOST_USER_MAX_CONFIG_SIZE:
            raise MessageError(f"config: offset {offset} size {size} too large")
        data = payload[_CONFIG_HDR.size:]
        if len(data) != size:
            raise MessageError(f"config: {len(data)} data bytes, header says {size}")
        return cls(offset, size, flags, bytes(data))

    def encode(self) -> bytes:
        return _CONFIG_HDR.pack(self.offset, self.size, self.flags) + self.data


@dataclass(frozen=True)
class InflightInfo:
    """GET_INFLIGHT_FD / SET_INFLIGHT_FD payload ("Inflight description").

    Only the wire format: whether the numbers make sense is the receiver's
    business (:mod:`dvmm_shared.inflight` checks them)."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    @classmethod
    def decode(cls, payload: bytes) -> InflightInfo:
        if len(payload) == _INFLIGHT_PACKED_SIZE:  # a packed sender: no tail padding
            payload = bytes(payload) + bytes(_INFLIGHT.size - _INFLIGHT_PACKED_SIZE)
        _exact(payload, _INFLIGHT.size, "inflight description")
        return cls(*_INFLIGHT.unpack(payload))

    def encode(self) -> bytes:
        return _INFLIGHT.pack(self.mmap_size, self.mmap_offset, self.num_queues,
                              self.queue_size)


def decode_vring_fd_index(payload: bytes) -> tuple[int, bool]:
    """KICK/CALL/ERR payload: ``(ring index, has_fd)``."""
    value = decode_u64(payload, "vring fd")
    return value & VHOST_USER_VRING_IDX_MASK, not value & VHOST_USER_VRING_NOFD_MASK
