"""A whole-screen capture over VNC, for the display workload's oracle.

Owns the smallest RFB client that can take a picture (RFC 6143), written
from the RFC, not from dvmm's server, so the oracle checks the server
rather than agreeing with it: ProtocolVersion 3.8 (7.1.1), security type
None (7.1.2, 7.2.1; a display with a password is not supported here),
ClientInit shared / ServerInit (7.3), SetPixelFormat to 32 bpp
little-endian true colour with red at bit 16, green at 8, blue at 0 (7.5.1),
so a pixel on the wire is the bytes B G R X (packed XRGB8888, what guest
RAM holds), SetEncodings with Raw only (7.5.2, 7.7.1), and one
non-incremental FramebufferUpdateRequest (7.5.3) whose update's Raw
rectangles are pasted into the picture (7.6.1).

Everything the server sends is checked: sizes, rectangle bounds, message
types and encodings.  A server that breaks the protocol, hangs beyond the
timeout or closes the connection raises :class:`CaptureError` (one line).
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

VERSION = b"RFB 003.008\n"
SECURITY_NONE = 1
RAW = 0
MAX_SIDE = 16384
#: 32 bpp, depth 24, little-endian, true colour, max 255 each, shifts 16/8/0.
PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)


class CaptureError(RuntimeError):
    """The VNC server could not be reached or broke the protocol."""


@dataclass(frozen=True)
class Capture:
    """A picture as packed XRGB8888 rows (the X byte as the server sent it)."""

    width: int
    height: int
    pixels: bytes


class _Conn:
    """One blocking connection with an overall deadline."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise CaptureError(f"VNC {host}:{port}: {exc.strerror or exc}") from None

    def exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise CaptureError(f"VNC server silent ({len(buf)}/{n} bytes before timeout)")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except TimeoutError:
                continue
            except OSError as exc:
                raise CaptureError(f"VNC connection failed: {exc.strerror or exc}") from None
            if not chunk:
                raise CaptureError(f"VNC server closed the connection ({len(buf)}/{n} bytes)")
            buf += chunk
        return bytes(buf)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise CaptureError(f"VNC connection failed: {exc.strerror or exc}") from None

    def close(self) -> None:
        self.sock.close()


def _handshake(c: _Conn) -> tuple[int, int]:
    """Version, security None, ClientInit; the framebuffer size from ServerInit."""
    banner = c.exact(12)
    if not banner.startswith(b"RFB 003."):
        raise CaptureError(f"not an RFB server: {banner!r}")
    c.send(VERSION)
    (count,) = c.exact(1)
    if count == 0:  # 7.1.2: a reason string follows
        (n,) = struct.unpack(">I", c.exact(4))
        raise CaptureError(f"VNC server refused: {c.exact(min(n, 4096))!r}")
    if SECURITY_NONE not in c.exact(count):
        raise CaptureError("VNC server wants authentication (not supported by the oracle)")
    c.send(bytes([SECURITY_NONE]))
    if struct.unpack(">I", c.exact(4))[0] != 0:  # SecurityResult (7.1.3)
        raise CaptureError("VNC security handshake failed")
    c.send(b"\x01")  # ClientInit: shared
    width, height = struct.unpack(">HH", c.exact(4))
    c.exact(16)  # the server's pixel format: ours replaces it
    (n,) = struct.unpack(">I", c.exact(4))
    c.exact(min(n, 1 << 16))
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise CaptureError(f"VNC server announced a {width}x{height} screen")
    return width, height


def _read_update(c: _Conn, screen: bytearray, width: int, height: int) -> int:
    """One FramebufferUpdate pasted into ``screen``; the pixels it covered."""
    kind = c.exact(1)[0]
    if kind != 0:
        raise CaptureError(f"expected FramebufferUpdate, got message type {kind}")
    (count,) = struct.unpack(">xH", c.exact(3))
    covered = 0
    for _ in range(count):
        x, y, w, h, enc = struct.unpack(">HHHHi", c.exact(12))
        if enc != RAW:
            raise CaptureError(f"VNC server used encoding {enc}, not the Raw asked for")
        if x + w > width or y + h > height:
            raise CaptureError(f"rectangle {w}x{h}+{x}+{y} outside the {width}x{height} "
                               f"screen")
        data = c.exact(w * h * 4)
        for row in range(h):
            at = ((y + row) * width + x) * 4
            screen[at:at + w * 4] = data[row * w * 4:(row + 1) * w * 4]
        covered += w * h
    return covered


def capture(host: str, port: int, timeout: float = 10.0, *, region: tuple[int, int] | None
            = None) -> Capture:
    """The server's current picture (or its top-left ``region`` (w, h) only:
    a cheap probe that the server serves frames at all)."""
    c = _Conn(host, port, timeout)
    try:
        width, height = _handshake(c)
        c.send(b"\x00\x00\x00\x00" + PIXEL_FORMAT)
        c.send(struct.pack(">BxHi", 2, 1, RAW))
        w, h = region if region is not None else (width, height)
        w, h = min(w, width), min(h, height)
        c.send(struct.pack(">BBHHHH", 3, 0, 0, 0, w, h))
        screen = bytearray(width * height * 4)
        covered = 0
        while covered < w * h:  # a server may split its answer over several updates
            covered += _read_update(c, screen, width, height)
        return Capture(width, height, bytes(screen))
    finally:
        c.close()
