"""virtio-gpu 2D state: the resource table, backing pages, scanouts, cursor.

Owns what the 2D commands of virtio 1.2 5.7.6.8 do once parsed
(:mod:`.gpu_protocol`): host-side copies of resources, the guest pages
attached as their backing, which resource each scanout shows, and the
picture a scanout *presents* — replaced on RESOURCE_FLUSH (and SET_SCANOUT),
so the VNC side sees whole flushed frames, never a transfer half done.

Every id, size, rectangle, offset and backing entry is checked; a bad one
raises :class:`GpuError` with the spec's response type and changes
nothing.  Host memory for resources is capped (:data:`DEFAULT_MEMORY_CAP`).
Backing pages are read through :class:`GuestMemory` (bounds-checked) at
TRANSFER_TO_HOST_2D time.  Runs on the vhost-user loop thread only; the VNC
thread reads :attr:`Scanout.frame`, which is swapped atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from dvmm_shared.memory import GuestMemory, GuestMemoryError

from .edid import build_edid
from .framebuffer import MAX_DIMENSION, Cursor, Frame
from .gpu_protocol import (
    BGR_OFFSETS,
    MAX_BACKING_ENTRIES,
    Format,
    GpuError,
    MemEntry,
    Rect,
    Resp,
)

DEFAULT_MEMORY_CAP = 256 << 20
MAX_BACKING_BYTES = 1 << 30
BYTES_PER_PIXEL = 4  # every 2D format of 5.7.6.8 is 32 bits
CURSOR_SIZE = 64  # cursor resources are 64x64 (5.7.6.10)
OPAQUE_FORMATS = frozenset({Format.B8G8R8X8_UNORM, Format.X8R8G8B8_UNORM,
                            Format.X8B8G8R8_UNORM, Format.R8G8B8X8_UNORM})


@dataclass
class Resource:
    resource_id: int
    format: Format
    width: int
    height: int
    pixels: bytearray
    backing: tuple[MemEntry, ...] = ()

    @property
    def stride(self) -> int:
        return self.width * BYTES_PER_PIXEL


@dataclass
class Scanout:
    width: int
    height: int
    resource_id: int = 0
    rect: Rect = field(default_factory=lambda: Rect(0, 0, 0, 0))
    frame: Frame | None = None  # what is presented now (None: disabled)


class TableObserver(Protocol):
    """Someone else showing the scanouts too (the vhost-user-gpu frontend,
    :mod:`.gpu_socket`); called on the vhost-user loop thread."""

    def scanout(self, scanout_id: int, width: int, height: int) -> None: ...
    def update(self, scanout_id: int, rect: Rect, frame: Frame) -> None: ...
    def cursor(self, scanout_id: int, x: int, y: int, image: CursorImage | None) -> None: ...
    def cursor_moved(self, scanout_id: int, x: int, y: int) -> None: ...


@dataclass(frozen=True)
class CursorImage:
    """A cursor as vhost-user-gpu sends it: 64x64 pixels, bytes B, G, R, A."""

    hot_x: int
    hot_y: int
    bgra: bytes


def to_xrgb(fmt: Format, src: bytes) -> bytes:
    """Pixels of ``fmt`` as XRGB8888 (bytes B, G, R, X)."""
    b, g, r = BGR_OFFSETS[fmt]
    if (b, g, r) == (0, 1, 2):
        return src
    out = bytearray(len(src))
    out[0::4], out[1::4], out[2::4] = src[b::4], src[g::4], src[r::4]
    return bytes(out)


class ResourceTable:
    """The 2D resources, scanouts and cursor of one virtio-gpu device."""

    def __init__(self, memory: Callable[[], GuestMemory | None], *, num_scanouts: int = 1,
                 size: tuple[int, int] = (1024, 768),
                 memory_cap: int = DEFAULT_MEMORY_CAP) -> None:
        self._memory = memory
        self.memory_cap = memory_cap
        self.used = 0
        self.resources: dict[int, Resource] = {}
        self.scanouts = [Scanout(*size) for _ in range(num_scanouts)]
        self.cursor: Cursor | None = None
        self.cursor_pos = (0, 0)
        # what UPDATE_CURSOR last set, for the state a restarted process restores
        self.cursor_resource = 0
        self.cursor_scanout = 0
        self.cursor_hot = (0, 0)
        self.observer: TableObserver | None = None

    # -- lookups ---------------------------------------------------------------------
    def resource(self, resource_id: int) -> Resource:
        res = self.resources.get(resource_id)
        if res is None:
            raise GpuError(Resp.ERR_INVALID_RESOURCE_ID, f"no resource {resource_id}")
        return res

    def scanout(self, scanout_id: int) -> Scanout:
        if not 0 <= scanout_id < len(self.scanouts):
            raise GpuError(Resp.ERR_INVALID_SCANOUT_ID, f"no scanout {scanout_id}")
        return self.scanouts[scanout_id]

    def presented(self) -> Frame | None:
        """What scanout 0 shows (None: the driver has not set a scanout)."""
        return self.scanouts[0].frame

    def modes(self) -> list[tuple[int, int] | None]:
        return [(s.width, s.height) for s in self.scanouts]

    def edid(self, scanout_id: int) -> bytes:
        s = self.scanout(scanout_id)
        return build_edid(s.width, s.height)

    # -- commands (5.7.6.8) ------------------------------------------------------------
    def create_2d(self, resource_id: int, fmt: int, width: int, height: int) -> None:
        if resource_id == 0 or resource_id in self.resources:
            raise GpuError(Resp.ERR_INVALID_RESOURCE_ID, f"resource id {resource_id} in use")
        try:
            format_ = Format(fmt)
        except ValueError:
            raise GpuError(Resp.ERR_INVALID_PARAMETER, f"format {fmt}") from None
        if not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION):
            raise GpuError(Resp.ERR_INVALID_PARAMETER, f"size {width}x{height}")
        size = width * height * BYTES_PER_PIXEL
        if self.used + size > self.memory_cap:
            raise GpuError(Resp.ERR_OUT_OF_MEMORY, f"{size} bytes over the {self.memory_cap} cap")
        self.resources[resource_id] = Resource(resource_id, format_, width, height,
                                               bytearray(size))
        self.used += size

    def unref(self, resource_id: int) -> None:
        res = self.resource(resource_id)
        for i, s in enumerate(self.scanouts):  # a scanout showing it goes dark, as in QEMU
            if s.resource_id == resource_id:
                s.resource_id, s.frame = 0, None
                if self.observer is not None:
                    self.observer.scanout(i, 0, 0)
        del self.resources[resource_id]
        self.used -= len(res.pixels)

    def attach_backing(self, resource_id: int, entries: tuple[MemEntry, ...]) -> None:
        res = self.resource(resource_id)
        if res.backing:
            raise GpuError(Resp.ERR_UNSPEC, f"resource {resource_id} already has backing")
        if not 0 < len(entries) <= MAX_BACKING_ENTRIES:
            raise GpuError(Resp.ERR_INVALID_PARAMETER, f"{len(entries)} backing entries")
        mem = self._mem()
        total = 0
        for e in entries:
            total += e.length
            try:
                mem.slice(e.addr, e.length)
            except GuestMemoryError:
                raise GpuError(Resp.ERR_UNSPEC,
                               f"backing {e.addr:#x}+{e.length:#x} is not guest memory") from None
        if total > MAX_BACKING_BYTES:
            raise GpuError(Resp.ERR_INVALID_PARAMETER, f"backing of {total} bytes")
        res.backing = entries

    def detach_backing(self, resource_id: int) -> None:
        self.resource(resource_id).backing = ()

    def transfer_to_host_2d(self, resource_id: int, rect: Rect, offset: int) -> None:
        res = self.resource(resource_id)
        if not res.backing:
            raise GpuError(Resp.ERR_UNSPEC, f"resource {resource_id} has no backing")
        if not rect.inside(res.width, res.height):
            raise GpuError(Resp.ERR_INVALID_PARAMETER, f"{rect} outside resource {resource_id}")
        row = rect.width * BYTES_PER_PIXEL
        # As QEMU does: source rows are a resource stride apart from ``offset``.
        last = offset + res.stride * (rect.height - 1) + row
        if last > sum(e.length for e in res.backing):
            raise GpuError(Resp.ERR_INVALID_PARAMETER, f"offset {offset} beyond the backing")
        src = _Backing(self._mem(), res.backing)
        if rect.x == 0 and rect.width == res.width:  # whole rows: one contiguous copy
            dst = rect.y * res.stride
            res.pixels[dst:dst + row * rect.height] = src.read(offset, row * rect.height)
            return
        for y in range(rect.height):
            dst = (rect.y + y) * res.stride + rect.x * BYTES_PER_PIXEL
            res.pixels[dst:dst + row] = src.read(offset + y * res.stride, row)

    def set_scanout(self, scanout_id: int, resource_id: int, rect: Rect) -> None:
        s = self.scanout(scanout_id)
        if resource_id == 0:  # disable the scanout (5.7.6.8 SET_SCANOUT)
            s.resource_id, s.frame = 0, None
            if self.observer is not None:
                self.observer.scanout(scanout_id, 0, 0)
            return
        res = self.resource(resource_id)
        if not rect.inside(res.width, res.height):
            raise GpuError(Resp.ERR_INVALID_PARAMETER, f"{rect} outside resource {resource_id}")
        s.resource_id, s.rect = resource_id, rect
        self._present(s, res)
        if self.observer is not None and s.frame is not None:
            self.observer.scanout(scanout_id, rect.width, rect.height)
            self.observer.update(scanout_id, Rect(0, 0, rect.width, rect.height), s.frame)

    def flush(self, resource_id: int, rect: Rect) -> None:
        res = self.resource(resource_id)
        if not rect.inside(res.width, res.height):
            raise GpuError(Resp.ERR_INVALID_PARAMETER, f"{rect} outside resource {resource_id}")
        for i, s in enumerate(self.scanouts):
            if s.resource_id == resource_id:
                self._present(s, res)
                self._observe_flush(i, s, rect)

    def _observe_flush(self, scanout_id: int, s: Scanout, rect: Rect) -> None:
        """The flushed part of what the scanout shows, in scanout coordinates."""
        if self.observer is None or s.frame is None:
            return
        x0, y0 = max(rect.x, s.rect.x), max(rect.y, s.rect.y)
        x1 = min(rect.x + rect.width, s.rect.x + s.rect.width)
        y1 = min(rect.y + rect.height, s.rect.y + s.rect.height)
        if x1 > x0 and y1 > y0:
            self.observer.update(scanout_id, Rect(x0 - s.rect.x, y0 - s.rect.y, x1 - x0, y1 - y0),
                                 s.frame)

    def _present(self, s: Scanout, res: Resource) -> None:
        r = s.rect
        stride, row = res.stride, r.width * BYTES_PER_PIXEL
        src = b"".join(bytes(res.pixels[o:o + row]) for o in
                       range(r.y * stride + r.x * 4, (r.y + r.height) * stride, stride))
        s.frame = Frame(r.width, r.height, to_xrgb(res.format, src))

    # -- cursor queue (5.7.6.10) -------------------------------------------------------
    def update_cursor(self, scanout_id: int, x: int, y: int, resource_id: int,
                      hot_x: int, hot_y: int) -> None:
        self.scanout(scanout_id)
        self.cursor_pos = (x, y)
        if resource_id == 0:
            self.cursor, self.cursor_resource = None, 0
            if self.observer is not None:
                self.observer.cursor(scanout_id, x, y, None)
            return
        res = self.resource(resource_id)
        w, h = min(res.width, CURSOR_SIZE), min(res.height, CURSOR_SIZE)
        if not (hot_x < w and hot_y < h):
            raise GpuError(Resp.ERR_INVALID_PARAMETER, f"hotspot {hot_x},{hot_y}")
        pixels = b"".join(bytes(res.pixels[y * res.stride:y * res.stride + w * 4])
                          for y in range(h))
        if res.format in OPAQUE_FORMATS:
            alpha = b"\xff" * (w * h)
        else:
            alpha = pixels[_alpha_offset(res.format)::4]
        mask = b"".join(_mask_row(alpha[y * w:(y + 1) * w]) for y in range(h))
        self.cursor = Cursor(w, h, hot_x, hot_y, to_xrgb(res.format, pixels), mask)
        self.cursor_resource, self.cursor_scanout = resource_id, scanout_id
        self.cursor_hot = (hot_x, hot_y)
        if self.observer is not None:
            self.observer.cursor(scanout_id, x, y, _cursor_image(res, hot_x, hot_y))

    def move_cursor(self, scanout_id: int, x: int, y: int) -> None:
        self.scanout(scanout_id)
        self.cursor_pos = (x, y)
        if self.observer is not None:
            self.observer.cursor_moved(scanout_id, x, y)

    def _mem(self) -> GuestMemory:
        mem = self._memory()
        if mem is None:
            raise GpuError(Resp.ERR_UNSPEC, "no guest memory")
        return mem

    def reset(self) -> None:
        """The driver reset the device: every resource and scanout is gone."""
        self.resources.clear()
        self.used = 0
        for s in self.scanouts:
            s.resource_id, s.frame = 0, None
        self.cursor, self.cursor_resource = None, 0


def _cursor_image(res: Resource, hot_x: int, hot_y: int) -> CursorImage:
    """The resource's top-left 64x64 pixels as B, G, R, A (PIXMAN_a8r8g8b8)."""
    w, h = min(res.width, CURSOR_SIZE), min(res.height, CURSOR_SIZE)
    rows = []
    for y in range(h):
        raw = bytes(res.pixels[y * res.stride:y * res.stride + w * 4])
        bgra = bytearray(to_xrgb(res.format, raw))
        bgra[3::4] = (b"\xff" * w if res.format in OPAQUE_FORMATS
                      else raw[_alpha_offset(res.format)::4])
        rows.append(bytes(bgra).ljust(CURSOR_SIZE * 4, b"\0"))
    rows += [bytes(CURSOR_SIZE * 4)] * (CURSOR_SIZE - h)
    return CursorImage(hot_x, hot_y, b"".join(rows))


def _alpha_offset(fmt: Format) -> int:
    return ({0, 1, 2, 3} - set(BGR_OFFSETS[fmt])).pop()


def _mask_row(alpha: bytes) -> bytes:
    """A cursor mask row (Cursor pseudo-encoding): a bit per pixel, alpha >= 128."""
    bits = "".join("1" if a >= 128 else "0" for a in alpha)
    bits = bits.ljust(-(-len(bits) // 8) * 8, "0")
    return int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""


class _Backing:
    """A resource's backing entries as one byte range (5.7.6.8 ATTACH_BACKING)."""

    def __init__(self, mem: GuestMemory, entries: tuple[MemEntry, ...]) -> None:
        self.mem = mem
        self.entries = entries

    def read(self, offset: int, length: int) -> bytes:
        out = []
        pos = 0
        for e in self.entries:
            if length == 0:
                break
            if offset < pos + e.length:
                start = max(0, offset - pos)
                take = min(length, e.length - start)
                try:
                    out.append(bytes(self.mem.slice(e.addr + start, take)))
                except GuestMemoryError:
                    raise GpuError(Resp.ERR_UNSPEC, "backing left guest memory") from None
                offset += take
                length -= take
            pos += e.length
        return b"".join(out)
