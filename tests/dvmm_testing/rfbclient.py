"""A minimal RFB client for tests, written from RFC 6143 (not from dvmm's server).

Blocking socket, one connection: the handshake of 3.3, 3.7 and 3.8 (None and
VNC authentication, the latter with ``cryptography``'s DES, not dvmm's),
SetPixelFormat, SetEncodings, FramebufferUpdateRequest, key/pointer/cut-text
messages, and the decoding of updates: Raw, ZRLE (all tile kinds of 7.7.6),
Cursor and DesktopSize pseudo-rectangles.  It keeps the picture it holds as
XRGB8888 bytes when the pixel format is the server's native one; other
formats are returned as decoded pixel values for the caller to check.
"""

from __future__ import annotations

import socket
import struct
import warnings
import zlib
from dataclasses import dataclass, field

RAW, ZRLE, CURSOR, DESKTOP_SIZE = 0, 16, -239, -223
EXTENDED_DESKTOP_SIZE = -308


class AuthRefused(Exception):
    pass


@dataclass
class Rect:
    x: int
    y: int
    width: int
    height: int
    encoding: int
    pixels: list[int] = field(default_factory=list)  # pixel values, row-major
    mask: bytes = b""


@dataclass
class Format:
    bpp: int = 32
    depth: int = 24
    big_endian: bool = False
    rmax: int = 255
    gmax: int = 255
    bmax: int = 255
    rshift: int = 16
    gshift: int = 8
    bshift: int = 0

    def pack(self) -> bytes:
        return struct.pack(">BBBBHHHBBB3x", self.bpp, self.depth, self.big_endian, 1,
                           self.rmax, self.gmax, self.bmax, self.rshift, self.gshift,
                           self.bshift)

    @property
    def max_pixel(self) -> int:
        return ((self.rmax << self.rshift) | (self.gmax << self.gshift)
                | (self.bmax << self.bshift))

    def cpixel_size(self) -> int:
        if self.bpp == 32 and self.depth <= 24 and (
                self.max_pixel < 1 << 24 or self.max_pixel & 0xFF == 0):
            return 3
        return self.bpp // 8

    def cpixel(self, data: bytes) -> int:
        """A CPIXEL's value (7.7.6)."""
        order = "big" if self.big_endian else "little"
        if len(data) == self.bpp // 8:
            return int.from_bytes(data, order)
        value = int.from_bytes(data, order)
        return value if self.max_pixel < 1 << 24 else value << 8


def des_response(password: bytes, challenge: bytes) -> bytes:
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    key = bytes(int(f"{b:08b}"[::-1], 2) for b in password[:8].ljust(8, b"\0"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return enc.update(challenge) + enc.finalize()


class RfbClient:
    def __init__(self, host: str, port: int, *, version: bytes = b"RFB 003.008\n",
                 password: bytes | None = None, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.fmt = Format()
        self._zlib = zlib.decompressobj()
        self.server_version = self._exact(12)
        self.sock.sendall(version)
        self._auth(version, password)
        self.sock.sendall(b"\x01")  # ClientInit, shared
        self.width, self.height = struct.unpack(">HH", self._exact(4))
        self.server_format = self._exact(16)
        (n,) = struct.unpack(">I", self._exact(4))
        self.name = self._exact(n).decode()
        self.screen = bytearray(self.width * self.height * 4)
        self.cursor: Rect | None = None

    # -- handshake -------------------------------------------------------------------
    def _auth(self, version: bytes, password: bytes | None) -> None:
        if version == b"RFB 003.003\n":
            (kind,) = struct.unpack(">I", self._exact(4))
        else:
            (count,) = self._exact(1)
            if count == 0:
                raise AuthRefused(self._reason())
            types = self._exact(count)
            kind = 2 if 2 in types else types[0]
            self.sock.sendall(bytes([kind]))
        if kind == 2:
            if password is None:
                raise AuthRefused("server wants a password")
            self.sock.sendall(des_response(password, self._exact(16)))
        if kind == 2 or version == b"RFB 003.008\n":
            (result,) = struct.unpack(">I", self._exact(4))
            if result != 0:
                reason = self._reason() if version == b"RFB 003.008\n" else "failed"
                raise AuthRefused(reason)

    def _reason(self) -> str:
        (n,) = struct.unpack(">I", self._exact(4))
        return self._exact(n).decode(errors="replace")

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"server closed the connection ({len(buf)}/{n} bytes)")
            buf += chunk
        return bytes(buf)

    # -- client messages -------------------------------------------------------------
    def set_pixel_format(self, fmt: Format) -> None:
        self.fmt = fmt
        self.sock.sendall(b"\x00\x00\x00\x00" + fmt.pack())

    def set_encodings(self, *encodings: int) -> None:
        self.sock.sendall(struct.pack(f">BxH{len(encodings)}i", 2, len(encodings), *encodings))

    def request(self, incremental: bool = False, x: int = 0, y: int = 0,
                width: int | None = None, height: int | None = None) -> None:
        self.sock.sendall(struct.pack(">BBHHHH", 3, incremental, x, y,
                                      self.width if width is None else width,
                                      self.height if height is None else height))

    def key(self, keysym: int, down: bool) -> None:
        self.sock.sendall(struct.pack(">BBxxI", 4, down, keysym))

    def pointer(self, x: int, y: int, buttons: int) -> None:
        self.sock.sendall(struct.pack(">BBHH", 5, buttons, x, y))

    def set_desktop_size(self, width: int, height: int, screens: int = 1) -> None:
        """SetDesktopSize (the ExtendedDesktopSize extension), one screen."""
        self.sock.sendall(struct.pack(">BxHHBx", 251, width, height, screens)
                          + struct.pack(">IHHHHI", 0, 0, 0, width, height, 0) * screens)

    # -- updates ---------------------------------------------------------------------
    def read_update(self) -> list[Rect]:
        """The rectangles of the next FramebufferUpdate (applied to :attr:`screen`)."""
        kind = self._exact(1)[0]
        if kind != 0:
            raise AssertionError(f"expected FramebufferUpdate, got message type {kind}")
        (count,) = struct.unpack(">xH", self._exact(3))
        return [self._read_rect() for _ in range(count)]

    def _read_rect(self) -> Rect:
        x, y, w, h, enc = struct.unpack(">HHHHi", self._exact(12))
        r = Rect(x, y, w, h, enc)
        bpp = self.fmt.bpp // 8
        order = "big" if self.fmt.big_endian else "little"
        if enc == RAW:
            data = self._exact(w * h * bpp)
            r.pixels = [int.from_bytes(data[i:i + bpp], order) for i in range(0, len(data), bpp)]
        elif enc == ZRLE:
            (n,) = struct.unpack(">I", self._exact(4))
            r.pixels = decode_zrle(self.fmt, self._zlib.decompress(self._exact(n)), w, h)
        elif enc == CURSOR:
            data = self._exact(w * h * bpp)
            r.pixels = [int.from_bytes(data[i:i + bpp], order) for i in range(0, len(data), bpp)]
            r.mask = self._exact((w + 7) // 8 * h)
            self.cursor = r
            return r
        elif enc == DESKTOP_SIZE:
            self.width, self.height = w, h
            self.screen = bytearray(w * h * 4)
            return r
        elif enc == EXTENDED_DESKTOP_SIZE:  # x = reason, y = status, then the screens
            (screens,) = struct.unpack(">B3x", self._exact(4))
            self._exact(16 * screens)
            if (w, h) != (self.width, self.height):
                self.width, self.height = w, h
                self.screen = bytearray(w * h * 4)
            return r
        else:
            raise AssertionError(f"unexpected encoding {enc}")
        self._apply(r)
        return r

    def _apply(self, r: Rect) -> None:
        if self.fmt != Format():
            return
        for row in range(r.height):
            o = ((r.y + row) * self.width + r.x) * 4
            line = r.pixels[row * r.width:(row + 1) * r.width]
            self.screen[o:o + r.width * 4] = b"".join(p.to_bytes(4, "little") for p in line)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RfbClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decode_zrle(fmt: Format, data: bytes, width: int, height: int) -> list[int]:
    """The pixel values of one ZRLE rectangle (its zlib data already inflated)."""
    out = [0] * (width * height)
    pos = 0
    cp = fmt.cpixel_size()

    def cpixel() -> int:
        nonlocal pos
        pos += cp
        return fmt.cpixel(data[pos - cp:pos])

    for ty in range(0, height, 64):
        for tx in range(0, width, 64):
            tw, th = min(64, width - tx), min(64, height - ty)
            sub = data[pos]
            pos += 1
            tile: list[int] = []
            if sub == 0:
                tile = [cpixel() for _ in range(tw * th)]
            elif sub == 1:
                tile = [cpixel()] * (tw * th)
            elif 2 <= sub <= 16:
                palette = [cpixel() for _ in range(sub)]
                bits = 1 if sub == 2 else 2 if sub <= 4 else 4
                row_bytes = (tw * bits + 7) // 8
                for _ in range(th):
                    acc = int.from_bytes(data[pos:pos + row_bytes], "big")
                    pos += row_bytes
                    total = row_bytes * 8
                    for i in range(tw):
                        idx = (acc >> (total - bits * (i + 1))) & ((1 << bits) - 1)
                        tile.append(palette[idx])
            elif sub == 128 or sub >= 130:
                palette = [cpixel() for _ in range(sub - 128)] if sub >= 130 else []
                while len(tile) < tw * th:
                    if sub == 128:
                        value, run = cpixel(), None
                    else:
                        idx = data[pos]
                        pos += 1
                        value, run = palette[idx & 0x7F], (None if idx & 0x80 else 1)
                    if run is None:
                        run = 1
                        while data[pos] == 255:
                            run += 255
                            pos += 1
                        run += data[pos]
                        pos += 1
                    tile.extend([value] * run)
            else:
                raise AssertionError(f"bad ZRLE subencoding {sub}")
            for row in range(th):
                o = (ty + row) * width + tx
                out[o:o + tw] = tile[row * tw:(row + 1) * tw]
    assert pos == len(data), "ZRLE data left over"
    return out
