"""The RFB wire format (RFC 6143): bytes in, typed messages or typed errors out.

Owns the handshake pieces (ProtocolVersion, security types, SecurityResult,
ClientInit/ServerInit), the pixel format record, the six client-to-server
messages of section 7.5 and the server-to-client headers of section 7.6.
Pure: no sockets, no state beyond its arguments.  :mod:`.session` drives
the handshake with these, :mod:`.encoders` produces rectangle payloads.

Everything a client sends is hostile: :func:`parse_client_message` returns
``None`` while a message is incomplete, a typed message when it is whole,
and raises an :class:`RfbError` subclass for anything malformed — the
caller drops that client and nobody else.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass

RFB_VERSION_LEN = 12  # "RFB xxx.yyy\n" (7.1.1)
_VERSION_RE = re.compile(rb"RFB (\d{3})\.(\d{3})\n")
MAX_CUT_TEXT = 1 << 20  # ClientCutText larger than this is refused (memory bound)
MAX_ENCODINGS = 1024  # SetEncodings longer than this is refused (no real client needs it)


class RfbError(Exception):
    """A client broke the protocol; the connection is to be closed."""


class BadVersionError(RfbError):
    """The ProtocolVersion line is not ``RFB xxx.yyy\\n`` of a version we speak."""


class BadSecurityTypeError(RfbError):
    """The client chose a security type that was not offered."""


class UnknownMessageError(RfbError):
    """A client message type that RFC 6143 (and this server) does not define."""


class BadPixelFormatError(RfbError):
    """A SetPixelFormat this server cannot honour or that is inconsistent."""


class MessageTooLargeError(RfbError):
    """A length field beyond what this server accepts."""


class Version(enum.Enum):
    """The three protocol versions of RFC 6143 (7.1.1)."""

    V3_3 = (3, 3)
    V3_7 = (3, 7)
    V3_8 = (3, 8)

    def banner(self) -> bytes:
        major, minor = self.value
        return b"RFB %03d.%03d\n" % (major, minor)


SERVER_VERSION = Version.V3_8


def parse_version(line: bytes) -> Version:
    """The version a client asked for.  7.1.1: versions other than 3.7 and
    3.8 "should be interpreted as 3.3" (e.g. Apple's 3.889), but a line that
    is not ``RFB 003.xxx`` at all is garbage."""
    m = _VERSION_RE.fullmatch(line)
    if m is None or int(m.group(1)) != 3:
        raise BadVersionError(f"not an RFB 3.x version line: {line[:RFB_VERSION_LEN]!r}")
    minor = int(m.group(2))
    if minor == 7:
        return Version.V3_7
    return Version.V3_8 if minor == 8 else Version.V3_3


class SecurityType(enum.IntEnum):
    INVALID = 0
    NONE = 1
    VNC_AUTH = 2


def security_types_message(offered: SecurityType) -> bytes:
    """3.7/3.8: the list of types (7.1.2); one type is offered at a time."""
    return bytes([1, offered])


def security_type_33(offered: SecurityType) -> bytes:
    """3.3: the server decides and sends the type as a U32 (7.1.2, 3.3 note)."""
    return struct.pack(">I", offered)


def parse_security_choice(data: bytes, offered: SecurityType) -> SecurityType:
    if len(data) != 1 or data[0] != offered:
        raise BadSecurityTypeError(f"client chose security type {data[:1].hex()}, "
                                   f"offered {int(offered)}")
    return offered


def security_result(ok: bool, version: Version, reason: str = "authentication failed") -> bytes:
    """SecurityResult (7.1.3); only 3.8 adds the failure reason string."""
    if ok:
        return struct.pack(">I", 0)
    if version is Version.V3_8:
        text = reason.encode()
        return struct.pack(">II", 1, len(text)) + text
    return struct.pack(">I", 1)


def needs_security_result(version: Version, chosen: SecurityType) -> bool:
    """3.3 and 3.7 send SecurityResult only after VNC authentication (7.1.3)."""
    return version is Version.V3_8 or chosen is SecurityType.VNC_AUTH


@dataclass(frozen=True)
class PixelFormat:
    """PIXEL_FORMAT (7.4).  Only true-colour formats are accepted here."""

    bits_per_pixel: int = 32
    depth: int = 24
    big_endian: bool = False
    true_colour: bool = True
    red_max: int = 255
    green_max: int = 255
    blue_max: int = 255
    red_shift: int = 16
    green_shift: int = 8
    blue_shift: int = 0

    STRUCT = struct.Struct(">BBBBHHHBBB3x")

    @property
    def bytes_per_pixel(self) -> int:
        return self.bits_per_pixel // 8

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.bits_per_pixel, self.depth, self.big_endian,
                                self.true_colour, self.red_max, self.green_max,
                                self.blue_max, self.red_shift, self.green_shift,
                                self.blue_shift)

    @classmethod
    def parse(cls, data: bytes) -> PixelFormat:
        bpp, depth, be, tc, rm, gm, bm, rs, gs, bs = cls.STRUCT.unpack(data)
        fmt = cls(bpp, depth, be != 0, tc != 0, rm, gm, bm, rs, gs, bs)
        fmt.validate()
        return fmt

    def validate(self) -> None:
        """Refuse what cannot be rendered: colour maps, odd sizes, channels
        that are not ``2**n - 1`` wide or do not fit in the pixel."""
        if self.bits_per_pixel not in (8, 16, 32):
            raise BadPixelFormatError(f"bits-per-pixel {self.bits_per_pixel} (8, 16 or 32)")
        if not 1 <= self.depth <= self.bits_per_pixel:
            raise BadPixelFormatError(f"depth {self.depth} with {self.bits_per_pixel} bpp")
        if not self.true_colour:
            raise BadPixelFormatError("colour-map pixel formats are not supported")
        for name, mx, shift in (("red", self.red_max, self.red_shift),
                                ("green", self.green_max, self.green_shift),
                                ("blue", self.blue_max, self.blue_shift)):
            if mx == 0 or mx & (mx + 1):
                raise BadPixelFormatError(f"{name}-max {mx} is not 2**n - 1")
            if shift + mx.bit_length() > self.bits_per_pixel:
                raise BadPixelFormatError(f"{name} channel does not fit in the pixel")


#: What the server announces in ServerInit: XRGB8888 as guests write it.
NATIVE_FORMAT = PixelFormat()


def server_init(width: int, height: int, fmt: PixelFormat, name: str) -> bytes:
    text = name.encode()
    return struct.pack(">HH", width, height) + fmt.pack() + struct.pack(">I", len(text)) + text


# -- client to server (7.5) ----------------------------------------------------------

class ClientMsg(enum.IntEnum):
    SET_PIXEL_FORMAT = 0
    SET_ENCODINGS = 2
    FRAMEBUFFER_UPDATE_REQUEST = 3
    KEY_EVENT = 4
    POINTER_EVENT = 5
    CLIENT_CUT_TEXT = 6
    SET_DESKTOP_SIZE = 251  # the ExtendedDesktopSize extension (RFB community spec)


@dataclass(frozen=True)
class SetPixelFormat:
    format: PixelFormat


@dataclass(frozen=True)
class SetEncodings:
    encodings: tuple[int, ...]


@dataclass(frozen=True)
class FramebufferUpdateRequest:
    incremental: bool
    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class KeyEvent:
    down: bool
    keysym: int


@dataclass(frozen=True)
class PointerEvent:
    buttons: int
    x: int
    y: int


@dataclass(frozen=True)
class ClientCutText:
    text: bytes  # ISO 8859-1 (7.5.6)


@dataclass(frozen=True)
class Screen:
    """One screen of a SetDesktopSize / ExtendedDesktopSize layout."""

    id: int
    x: int
    y: int
    width: int
    height: int
    flags: int = 0


@dataclass(frozen=True)
class SetDesktopSize:
    width: int
    height: int
    screens: tuple[Screen, ...]


ClientMessage = (SetPixelFormat | SetEncodings | FramebufferUpdateRequest | KeyEvent
                 | PointerEvent | ClientCutText | SetDesktopSize)
MAX_SCREENS = 16
SCREEN = struct.Struct(">IHHHHI")

_FIXED = {  # message type -> total length of the fixed part
    ClientMsg.SET_PIXEL_FORMAT: 20, ClientMsg.SET_ENCODINGS: 4,
    ClientMsg.FRAMEBUFFER_UPDATE_REQUEST: 10, ClientMsg.KEY_EVENT: 8,
    ClientMsg.POINTER_EVENT: 6, ClientMsg.CLIENT_CUT_TEXT: 8,
    ClientMsg.SET_DESKTOP_SIZE: 8,
}


def parse_client_message(buf: bytes | bytearray,
                         max_cut_text: int = MAX_CUT_TEXT) -> tuple[ClientMessage, int] | None:
    """The first whole message in ``buf`` and its length, or None if more bytes are needed."""
    if not buf:
        return None
    try:
        kind = ClientMsg(buf[0])
    except ValueError:
        raise UnknownMessageError(f"unknown client message type {buf[0]}") from None
    fixed = _FIXED[kind]
    if len(buf) < fixed:
        return None
    head = bytes(buf[:fixed])
    if kind is ClientMsg.SET_PIXEL_FORMAT:
        return SetPixelFormat(PixelFormat.parse(head[4:20])), fixed
    if kind is ClientMsg.SET_ENCODINGS:
        (count,) = struct.unpack_from(">H", head, 2)
        if count > MAX_ENCODINGS:
            raise MessageTooLargeError(f"SetEncodings with {count} encodings")
        end = fixed + 4 * count
        if len(buf) < end:
            return None
        return SetEncodings(struct.unpack_from(f">{count}i", bytes(buf[fixed:end]))), end
    if kind is ClientMsg.FRAMEBUFFER_UPDATE_REQUEST:
        inc, x, y, w, h = struct.unpack_from(">BHHHH", head, 1)
        return FramebufferUpdateRequest(inc != 0, x, y, w, h), fixed
    if kind is ClientMsg.KEY_EVENT:
        down, keysym = struct.unpack_from(">B2xI", head, 1)
        return KeyEvent(down != 0, keysym), fixed
    if kind is ClientMsg.POINTER_EVENT:
        mask, x, y = struct.unpack_from(">BHH", head, 1)
        return PointerEvent(mask, x, y), fixed
    if kind is ClientMsg.SET_DESKTOP_SIZE:
        return _set_desktop_size(buf, head, fixed)
    (length,) = struct.unpack_from(">I", head, 4)
    # A negative S32 here is the Extended Clipboard extension, which is only
    # legal once the server has advertised it; this one never does.
    if length > max_cut_text:
        raise MessageTooLargeError(f"ClientCutText of {length} bytes")
    if len(buf) < fixed + length:
        return None
    return ClientCutText(bytes(buf[fixed:fixed + length])), fixed + length


def _set_desktop_size(buf: bytes | bytearray, head: bytes,
                      fixed: int) -> tuple[ClientMessage, int] | None:
    """``{u8 251, pad, u16 width, u16 height, u8 screens, pad, screen[]}``."""
    width, height, count = struct.unpack_from(">HHB", head, 2)
    if count > MAX_SCREENS:
        raise MessageTooLargeError(f"SetDesktopSize with {count} screens")
    end = fixed + SCREEN.size * count
    if len(buf) < end:
        return None
    screens = tuple(Screen(*SCREEN.unpack_from(bytes(buf[fixed:end]), i * SCREEN.size))
                    for i in range(count))
    return SetDesktopSize(width, height, screens), end


# -- server to client (7.6) and encodings (7.7, 7.8) ---------------------------------

class Encoding(enum.IntEnum):
    RAW = 0
    COPY_RECT = 1
    ZRLE = 16
    CURSOR = -239
    DESKTOP_SIZE = -223
    EXTENDED_DESKTOP_SIZE = -308


class ResizeReason(enum.IntEnum):
    """ExtendedDesktopSize's x-position: why the size is sent."""

    SERVER = 0  # the server (the guest) changed it
    THIS_CLIENT = 1  # the answer to this client's SetDesktopSize
    OTHER_CLIENT = 2


class ResizeStatus(enum.IntEnum):
    """ExtendedDesktopSize's y-position in an answer to SetDesktopSize."""

    OK = 0
    PROHIBITED = 1
    OUT_OF_RESOURCES = 2
    INVALID_LAYOUT = 3


_U16 = 0xFFFF


def framebuffer_update_header(rect_count: int) -> bytes:
    return struct.pack(">BxH", 0, rect_count)


def rect_header(x: int, y: int, width: int, height: int, encoding: int) -> bytes:
    if max(x, y, width, height) > _U16 or min(x, y, width, height) < 0:
        raise ValueError(f"rectangle {x},{y} {width}x{height} does not fit RFB's U16 fields")
    return struct.pack(">HHHHi", x, y, width, height, encoding)


def bell() -> bytes:
    return b"\x02"


def server_cut_text(text: bytes) -> bytes:
    return struct.pack(">B3xI", 3, len(text)) + text


def extended_desktop_size_rect(reason: int, status: int, width: int, height: int) -> bytes:
    """An ExtendedDesktopSize pseudo-rectangle: one screen covering the framebuffer."""
    return (rect_header(reason, status, width, height, Encoding.EXTENDED_DESKTOP_SIZE)
            + struct.pack(">B3x", 1) + SCREEN.pack(0, 0, 0, width, height, 0))
