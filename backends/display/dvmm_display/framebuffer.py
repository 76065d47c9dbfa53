"""Frames and where they come from: the framebuffer source interface.

Owns :class:`Frame` (an immutable XRGB8888 picture, packed rows), the
:class:`FrameSource` interface the VNC server polls, and its sources:
:class:`StaticSource` (a fixed picture: tests, "no display" blank screens)
and :class:`ScanoutSource`, which reads a guest framebuffer (ramfb, later
virtio-gpu scanouts) out of guest memory through :class:`GuestMemory`.

The scanout geometry comes from the core (the "ramfb" command) and is
hostile input: format, sizes and stride are checked when set, and every read
of guest memory is bounds-checked by :meth:`GuestMemory.slice`; a range that
is not (or no longer) in guest memory shows a blank screen instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from dvmm_shared.memory import GuestMemory, GuestMemoryError

log = logging.getLogger("dvmm.display")

BLANK_WIDTH, BLANK_HEIGHT = 640, 480  # what a client sees before any framebuffer
MAX_DIMENSION = 8192
MAX_FRAME_BYTES = 256 << 20

# DRM fourccs (drm_fourcc.h) a scanout may use: little-endian 32-bit words.
DRM_FORMAT_XRGB8888 = 0x34325258  # "XR24": bytes B G R X
DRM_FORMAT_ARGB8888 = 0x34325241  # "AR24": bytes B G R A
DRM_FORMAT_XBGR8888 = 0x34324258  # "XB24": bytes R G B X
DRM_FORMAT_ABGR8888 = 0x34324241  # "AB24": bytes R G B A
SWAP_RB_FORMATS = frozenset({DRM_FORMAT_XBGR8888, DRM_FORMAT_ABGR8888})
SCANOUT_FORMATS = frozenset({DRM_FORMAT_XRGB8888, DRM_FORMAT_ARGB8888}) | SWAP_RB_FORMATS


class ScanoutError(ValueError):
    """A scanout geometry that cannot be shown (bad format, size or stride)."""


@dataclass(frozen=True)
class Frame:
    """An XRGB8888 picture, rows packed (stride = width * 4)."""

    width: int
    height: int
    pixels: bytes

    def __post_init__(self) -> None:
        if len(self.pixels) != self.width * self.height * 4:
            raise ValueError(f"{self.width}x{self.height} frame with {len(self.pixels)} bytes")

    @classmethod
    def blank(cls, width: int = BLANK_WIDTH, height: int = BLANK_HEIGHT) -> Frame:
        return cls(width, height, bytes(width * height * 4))

    def rect(self, x: int, y: int, width: int, height: int) -> bytes:
        """The XRGB8888 pixels of a rectangle inside the frame, rows packed."""
        stride = self.width * 4
        if width == self.width:
            return self.pixels[y * stride:(y + height) * stride]
        start, row = y * stride + x * 4, width * 4
        return b"".join(self.pixels[o:o + row]
                        for o in range(start, start + height * stride, stride))

    def fitted(self, width: int, height: int) -> Frame:
        """This picture cropped or padded with black to ``width`` x ``height``
        (for a client that cannot be told about a new desktop size)."""
        if (width, height) == (self.width, self.height):
            return self
        w, row = min(width, self.width), width * 4
        rows = [self.pixels[y * self.width * 4:y * self.width * 4 + w * 4].ljust(row, b"\0")
                for y in range(min(height, self.height))]
        rows.append(bytes(row * (height - len(rows))))
        return Frame(width, height, b"".join(rows))


@dataclass(frozen=True)
class Cursor:
    """A pointer image (Cursor pseudo-encoding, RFC 6143 7.8.1): XRGB8888
    pixels, a 1-bit mask (rows padded to bytes, MSB first) and the hotspot."""

    width: int
    height: int
    hot_x: int
    hot_y: int
    pixels: bytes
    mask: bytes


class FrameSource(Protocol):
    """What the VNC server shows: polled for the current picture."""

    def snapshot(self) -> Frame: ...
    def cursor(self) -> Cursor | None: ...


class StaticSource:
    """A fixed picture (a test image, or a blank screen)."""

    def __init__(self, frame: Frame | None = None, cursor: Cursor | None = None) -> None:
        self.frame = frame or Frame.blank()
        self._cursor = cursor

    def snapshot(self) -> Frame:
        return self.frame

    def cursor(self) -> Cursor | None:
        return self._cursor


class PreferredSource:
    """virtio-gpu's scanout once a driver has set one, the ramfb (or other
    fallback) picture before and after: what a PC shows as firmware hands
    over to a driver."""

    def __init__(self, primary: Callable[[], Frame | None],
                 primary_cursor: Callable[[], Cursor | None], fallback: FrameSource) -> None:
        self._primary = primary
        self._primary_cursor = primary_cursor
        self.fallback = fallback

    def snapshot(self) -> Frame:
        frame = self._primary()
        return frame if frame is not None else self.fallback.snapshot()

    def cursor(self) -> Cursor | None:
        if self._primary() is not None:
            return self._primary_cursor()
        return self.fallback.cursor()


@dataclass(frozen=True)
class ScanoutConfig:
    """Where a guest framebuffer lies: guest-physical address, size, layout."""

    addr: int
    width: int
    height: int
    fourcc: int
    stride: int

    def __post_init__(self) -> None:
        if self.fourcc not in SCANOUT_FORMATS:
            raise ScanoutError(f"unsupported pixel format {self.fourcc:#010x} "
                               f"({self.fourcc.to_bytes(4, 'little')!r})")
        if not (1 <= self.width <= MAX_DIMENSION and 1 <= self.height <= MAX_DIMENSION):
            raise ScanoutError(f"size {self.width}x{self.height} outside 1..{MAX_DIMENSION}")
        if not self.width * 4 <= self.stride <= MAX_DIMENSION * 16:
            raise ScanoutError(f"stride {self.stride} for width {self.width}")
        if self.stride * self.height > MAX_FRAME_BYTES:
            raise ScanoutError("framebuffer larger than 256 MiB")
        if not 0 < self.addr < 1 << 64 or self.addr + self.stride * self.height > 1 << 64:
            raise ScanoutError(f"address {self.addr:#x} is outside the guest-physical space")


MemoryGetter = Callable[[], GuestMemory | None]


class ScanoutSource:
    """A framebuffer in guest memory, read on every snapshot.

    ``memory`` returns the vhost-user session's current :class:`GuestMemory`
    (None without a frontend); the object is replaced, never mutated, when
    the frontend changes the memory table, so reading it from the VNC thread
    needs no lock.  ``configure`` is called from the control thread."""

    def __init__(self, memory: MemoryGetter) -> None:
        self._memory = memory
        self._lock = threading.Lock()
        self.config: ScanoutConfig | None = None
        self.read_errors = 0
        self._warned = False

    def configure(self, config: ScanoutConfig | None) -> None:
        with self._lock:
            self.config = config
            self._warned = False

    def readable(self) -> bool:
        """Whether the configured framebuffer lies in guest memory now."""
        cfg, mem = self.config, self._memory()
        if cfg is None or mem is None:
            return False
        try:
            mem.slice(cfg.addr, cfg.stride * (cfg.height - 1) + cfg.width * 4)
        except GuestMemoryError:
            return False
        return True

    def snapshot(self) -> Frame:
        cfg = self.config
        if cfg is None:
            return Frame.blank()
        mem = self._memory()
        try:
            if mem is None:
                raise GuestMemoryError("no guest memory (no frontend connected)")
            pixels = read_framebuffer(mem, cfg)
        except GuestMemoryError as exc:
            self.read_errors += 1
            if not self._warned:
                self._warned = True
                log.warning("scanout at %#x shows blank: %s", cfg.addr, exc)
            return Frame.blank(cfg.width, cfg.height)
        return Frame(cfg.width, cfg.height, pixels)

    def cursor(self) -> Cursor | None:
        return None


def read_framebuffer(mem: GuestMemory, cfg: ScanoutConfig) -> bytes:
    """The packed XRGB8888 pixels of a guest framebuffer (bounds-checked)."""
    row = cfg.width * 4
    if cfg.stride == row:
        pixels = bytes(mem.slice(cfg.addr, row * cfg.height))
    else:
        pixels = b"".join(bytes(mem.slice(cfg.addr + y * cfg.stride, row))
                          for y in range(cfg.height))
    if cfg.fourcc in SWAP_RB_FORMATS:
        out = bytearray(pixels)
        out[0::4], out[2::4] = pixels[2::4], pixels[0::4]
        pixels = bytes(out)
    return pixels


def default_cursor() -> Cursor:
    """A small white arrow with a black outline, for clients that draw the
    pointer locally (the guest's own pointer is not known under ramfb)."""
    shape = ("X.........", "XX........", "X=X.......", "X==X......", "X===X.....",
             "X====X....", "X=====X...", "X======X..", "X===XXXXX.", "X=X=X.....",
             "XX.X=X....", "X..X=X....", "....X=X...", "....XX....")
    w, h = len(shape[0]), len(shape)
    colour = {"X": b"\0\0\0\0", "=": b"\xff\xff\xff\0", ".": b"\0\0\0\0"}
    pixels = b"".join(colour[c] for line in shape for c in line)
    mask = b"".join(
        int("".join("0" if c == "." else "1" for c in line).ljust(16, "0"), 2).to_bytes(2, "big")
        for line in shape)
    return Cursor(w, h, 0, 0, pixels, mask)
