"""The virtio-gpu 2D wire format (virtio 1.2 section 5.7.6): pure parsing.

Owns the command and response layouts of the control and cursor queues:
bytes a driver put in a request become one typed command, or a
:class:`GpuError` carrying the response type the spec prescribes for it
(``VIRTIO_GPU_RESP_ERR_*``).  Responses are built here too (the header with
the request's fence echoed back, display info, EDID).  What commands *do*
is :mod:`.resources`'; descriptor chains are the device's.

Every field is hostile: lengths are checked against the command's struct,
counts against :data:`MAX_BACKING_ENTRIES`, and unknown types refused.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

# struct virtio_gpu_ctrl_hdr (5.7.6.7)
CTRL_HDR = struct.Struct("<IIQIB3x")
RECT = struct.Struct("<IIII")
VIRTIO_GPU_FLAG_FENCE = 1 << 0
VIRTIO_GPU_FLAG_INFO_RING_IDX = 1 << 1
VIRTIO_GPU_MAX_SCANOUTS = 16
VIRTIO_GPU_F_EDID = 1
MAX_BACKING_ENTRIES = 16384  # QEMU's limit for ATTACH_BACKING
EDID_BLOB_SIZE = 1024


class Cmd(enum.IntEnum):
    GET_DISPLAY_INFO = 0x0100
    RESOURCE_CREATE_2D = 0x0101
    RESOURCE_UNREF = 0x0102
    SET_SCANOUT = 0x0103
    RESOURCE_FLUSH = 0x0104
    TRANSFER_TO_HOST_2D = 0x0105
    RESOURCE_ATTACH_BACKING = 0x0106
    RESOURCE_DETACH_BACKING = 0x0107
    GET_CAPSET_INFO = 0x0108
    GET_CAPSET = 0x0109
    GET_EDID = 0x010A
    UPDATE_CURSOR = 0x0300
    MOVE_CURSOR = 0x0301


class Resp(enum.IntEnum):
    OK_NODATA = 0x1100
    OK_DISPLAY_INFO = 0x1101
    OK_EDID = 0x1104
    ERR_UNSPEC = 0x1200
    ERR_OUT_OF_MEMORY = 0x1201
    ERR_INVALID_SCANOUT_ID = 0x1202
    ERR_INVALID_RESOURCE_ID = 0x1203
    ERR_INVALID_CONTEXT_ID = 0x1204
    ERR_INVALID_PARAMETER = 0x1205


class Format(enum.IntEnum):
    """enum virtio_gpu_formats (5.7.6.8); names give the byte order in memory."""

    B8G8R8A8_UNORM = 1
    B8G8R8X8_UNORM = 2
    A8R8G8B8_UNORM = 3
    X8R8G8B8_UNORM = 4
    R8G8B8A8_UNORM = 67
    X8B8G8R8_UNORM = 68
    A8B8G8R8_UNORM = 121
    R8G8B8X8_UNORM = 134


#: Byte offsets of blue, green, red inside a pixel of each format.
BGR_OFFSETS = {
    Format.B8G8R8A8_UNORM: (0, 1, 2), Format.B8G8R8X8_UNORM: (0, 1, 2),
    Format.A8R8G8B8_UNORM: (3, 2, 1), Format.X8R8G8B8_UNORM: (3, 2, 1),
    Format.R8G8B8A8_UNORM: (2, 1, 0), Format.R8G8B8X8_UNORM: (2, 1, 0),
    Format.X8B8G8R8_UNORM: (1, 2, 3), Format.A8B8G8R8_UNORM: (1, 2, 3),
}


class GpuError(Exception):
    """A request that gets an error response (``resp``) instead of being served."""

    def __init__(self, resp: Resp, message: str) -> None:
        super().__init__(message)
        self.resp = resp


@dataclass(frozen=True)
class Header:
    type: int
    flags: int
    fence_id: int
    ctx_id: int
    ring_idx: int

    @property
    def fenced(self) -> bool:
        return bool(self.flags & VIRTIO_GPU_FLAG_FENCE)


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    width: int
    height: int

    def inside(self, width: int, height: int) -> bool:
        """Non-empty and within a ``width`` x ``height`` resource (no wrap-around:
        Python integers do not overflow, unlike the u32 sums a C device checks)."""
        return (self.width > 0 and self.height > 0
                and self.x + self.width <= width and self.y + self.height <= height)


@dataclass(frozen=True)
class GetDisplayInfo:
    pass


@dataclass(frozen=True)
class ResourceCreate2D:
    resource_id: int
    format: int
    width: int
    height: int


@dataclass(frozen=True)
class ResourceUnref:
    resource_id: int


@dataclass(frozen=True)
class SetScanout:
    rect: Rect
    scanout_id: int
    resource_id: int


@dataclass(frozen=True)
class ResourceFlush:
    rect: Rect
    resource_id: int


@dataclass(frozen=True)
class TransferToHost2D:
    rect: Rect
    offset: int
    resource_id: int


@dataclass(frozen=True)
class MemEntry:
    addr: int
    length: int


@dataclass(frozen=True)
class AttachBacking:
    resource_id: int
    entries: tuple[MemEntry, ...]


@dataclass(frozen=True)
class DetachBacking:
    resource_id: int


@dataclass(frozen=True)
class GetEdid:
    scanout_id: int


@dataclass(frozen=True)
class CursorPos:
    scanout_id: int
    x: int
    y: int


@dataclass(frozen=True)
class UpdateCursor:
    pos: CursorPos
    resource_id: int
    hot_x: int
    hot_y: int


@dataclass(frozen=True)
class MoveCursor:
    pos: CursorPos


Command = (GetDisplayInfo | ResourceCreate2D | ResourceUnref | SetScanout | ResourceFlush
           | TransferToHost2D | AttachBacking | DetachBacking | GetEdid | UpdateCursor
           | MoveCursor)

_BODY = {  # command -> struct of the part after the header
    Cmd.GET_DISPLAY_INFO: struct.Struct(""),
    Cmd.RESOURCE_CREATE_2D: struct.Struct("<IIII"),
    Cmd.RESOURCE_UNREF: struct.Struct("<I4x"),
    Cmd.SET_SCANOUT: struct.Struct("<IIIIII"),
    Cmd.RESOURCE_FLUSH: struct.Struct("<IIIII4x"),
    Cmd.TRANSFER_TO_HOST_2D: struct.Struct("<IIIIQI4x"),
    Cmd.RESOURCE_ATTACH_BACKING: struct.Struct("<II"),
    Cmd.RESOURCE_DETACH_BACKING: struct.Struct("<I4x"),
    Cmd.GET_EDID: struct.Struct("<I4x"),
    Cmd.UPDATE_CURSOR: struct.Struct("<III4xIII4x"),  # cursor_pos, resource, hotspot
    Cmd.MOVE_CURSOR: struct.Struct("<III4xIII4x"),
}
MEM_ENTRY = struct.Struct("<QI4x")
CONTROL_COMMANDS = frozenset(_BODY) - {Cmd.UPDATE_CURSOR, Cmd.MOVE_CURSOR}
CURSOR_COMMANDS = frozenset({Cmd.UPDATE_CURSOR, Cmd.MOVE_CURSOR})


def parse_header(data: bytes) -> Header:
    if len(data) < CTRL_HDR.size:
        raise GpuError(Resp.ERR_UNSPEC, f"request of {len(data)} bytes has no header")
    return Header(*CTRL_HDR.unpack_from(data))


def parse_command(data: bytes, cursor_queue: bool = False) -> tuple[Header, Command]:
    """The command in a request's readable bytes (5.7.6.8, 5.7.6.10)."""
    hdr = parse_header(data)
    try:
        cmd = Cmd(hdr.type)
    except ValueError:
        raise GpuError(Resp.ERR_UNSPEC, f"unknown command {hdr.type:#x}") from None
    allowed = CURSOR_COMMANDS if cursor_queue else CONTROL_COMMANDS
    if cmd not in allowed:
        raise GpuError(Resp.ERR_UNSPEC, f"{cmd.name} is not served on this queue")
    body = _BODY[cmd]
    if len(data) < CTRL_HDR.size + body.size:
        raise GpuError(Resp.ERR_UNSPEC, f"{cmd.name} of {len(data)} bytes is short")
    f = body.unpack_from(data, CTRL_HDR.size)
    return hdr, _build(cmd, f, data)


def _build(cmd: Cmd, f: tuple[int, ...], data: bytes) -> Command:
    if cmd is Cmd.GET_DISPLAY_INFO:
        return GetDisplayInfo()
    if cmd is Cmd.RESOURCE_CREATE_2D:
        return ResourceCreate2D(*f)
    if cmd is Cmd.RESOURCE_UNREF:
        return ResourceUnref(f[0])
    if cmd is Cmd.SET_SCANOUT:
        return SetScanout(Rect(*f[:4]), f[4], f[5])
    if cmd is Cmd.RESOURCE_FLUSH:
        return ResourceFlush(Rect(*f[:4]), f[4])
    if cmd is Cmd.TRANSFER_TO_HOST_2D:
        return TransferToHost2D(Rect(*f[:4]), f[4], f[5])
    if cmd is Cmd.RESOURCE_ATTACH_BACKING:
        return AttachBacking(f[0], _entries(f[1], data))
    if cmd is Cmd.RESOURCE_DETACH_BACKING:
        return DetachBacking(f[0])
    if cmd is Cmd.GET_EDID:
        return GetEdid(f[0])
    pos = CursorPos(f[0], f[1], f[2])
    if cmd is Cmd.UPDATE_CURSOR:
        return UpdateCursor(pos, f[3], f[4], f[5])
    return MoveCursor(pos)


def _entries(count: int, data: bytes) -> tuple[MemEntry, ...]:
    if count == 0 or count > MAX_BACKING_ENTRIES:
        raise GpuError(Resp.ERR_INVALID_PARAMETER, f"{count} backing entries")
    start = CTRL_HDR.size + _BODY[Cmd.RESOURCE_ATTACH_BACKING].size
    if len(data) < start + count * MEM_ENTRY.size:
        raise GpuError(Resp.ERR_UNSPEC, f"ATTACH_BACKING lists {count} entries, carries fewer")
    return tuple(MemEntry(*MEM_ENTRY.unpack_from(data, start + i * MEM_ENTRY.size))
                 for i in range(count))


# -- responses -----------------------------------------------------------------------

def response(req: Header | None, resp: Resp, payload: bytes = b"") -> bytes:
    """A response header (with the request's fence, 5.7.6.7) and its payload."""
    flags = fence = ctx = ring = 0
    if req is not None and req.fenced:
        flags = req.flags & (VIRTIO_GPU_FLAG_FENCE | VIRTIO_GPU_FLAG_INFO_RING_IDX)
        fence, ctx, ring = req.fence_id, req.ctx_id, req.ring_idx
    return CTRL_HDR.pack(resp, flags, fence, ctx, ring) + payload


def display_info(modes: list[tuple[int, int] | None]) -> bytes:
    """struct virtio_gpu_resp_display_info's pmodes[16]: (width, height) per
    enabled scanout, None for a disabled one."""
    out = b""
    for i in range(VIRTIO_GPU_MAX_SCANOUTS):
        mode = modes[i] if i < len(modes) else None
        w, h = mode if mode else (0, 0)
        out += RECT.pack(0, 0, w, h) + struct.pack("<II", 1 if mode else 0, 0)
    return out


def edid_payload(edid: bytes) -> bytes:
    """struct virtio_gpu_resp_edid after the header: size, padding, edid[1024]."""
    return struct.pack("<I4x", len(edid)) + edid.ljust(EDID_BLOB_SIZE, b"\0")
