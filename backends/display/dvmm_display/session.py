"""One VNC client's protocol state, without sockets (sans-IO).

Owns a client's lifecycle (:class:`ClientState`: version, security, auth,
init, normal), its choices (pixel format, encodings), its pending update
request and the picture it was last sent, and produces the bytes to send.
:mod:`.server` moves bytes between this and a socket and decides when to
offer frames; :mod:`.rfb` parses; :mod:`.encoders` encodes.

Bytes go in with :meth:`VncSession.feed` (which raises :class:`RfbError`
for garbage: the server drops the client) and come out of
:attr:`VncSession.out`.  Frames go in with :meth:`VncSession.make_update`,
which answers only a pending FramebufferUpdateRequest (RFC 6143 7.5.3: the
server never sends unrequested updates) and, for an incremental one, only
when something changed: the damaged tiles, the cursor, a new desktop size.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from . import des
from .damage import Rect, damaged, full
from .encoders import ZrleEncoder, choose_encoding, cursor_rect, desktop_size_rect, encode_raw
from .framebuffer import MAX_DIMENSION, Cursor, Frame
from .pixels import PixelConverter
from .rfb import (
    NATIVE_FORMAT,
    RFB_VERSION_LEN,
    SERVER_VERSION,
    ClientCutText,
    ClientMessage,
    Encoding,
    FramebufferUpdateRequest,
    KeyEvent,
    PointerEvent,
    ResizeReason,
    ResizeStatus,
    RfbError,
    SecurityType,
    SetDesktopSize,
    SetEncodings,
    SetPixelFormat,
    Version,
    extended_desktop_size_rect,
    framebuffer_update_header,
    needs_security_result,
    parse_client_message,
    parse_security_choice,
    parse_version,
    rect_header,
    security_result,
    security_type_33,
    security_types_message,
    server_init,
)


class ClientState(enum.Enum):
    VERSION = "version"  # waiting for the client's ProtocolVersion
    SECURITY = "security"  # 3.7/3.8: waiting for the chosen security type
    AUTH = "auth"  # waiting for the VNC authentication response
    INIT = "init"  # waiting for ClientInit
    NORMAL = "normal"  # messages of section 7.5
    CLOSING = "closing"  # last bytes (an auth failure) to flush, then close


class AuthFailedError(RfbError):
    """The VNC authentication response did not match the password."""


class InputSink(Protocol):
    """Where a client's input goes (the core, through :mod:`.input`)."""

    def key(self, keysym: int, down: bool) -> None: ...
    def pointer(self, x: int, y: int, buttons: int) -> None: ...
    def cut_text(self, text: bytes) -> None: ...


#: Asks for a new screen size (a client's SetDesktopSize); returns a
#: :class:`ResizeStatus` value.  The size changes later, when the guest
#: follows (virtio-gpu: the config event, 5.7.4), or never.
Resizer = Callable[[int, int], int]


def no_resize(width: int, height: int) -> int:
    return ResizeStatus.PROHIBITED


@dataclass
class SessionStats:
    updates: int = 0
    rects: int = 0
    pixels: int = 0
    messages: int = 0


class VncSession:
    """The protocol of one client connection."""

    def __init__(self, password: bytes | None, name: str, sink: InputSink,
                 initial_frame: Callable[[], Frame], resizer: Resizer = no_resize) -> None:
        self.password = password
        self.name = name
        self.sink = sink
        self.resizer = resizer
        #: ExtendedDesktopSize rectangles owed to the client (answers, announcements)
        self.size_notes: list[tuple[int, int]] = []
        self._initial_frame = initial_frame
        self.state = ClientState.VERSION
        self.version = SERVER_VERSION
        self.offered = SecurityType.VNC_AUTH if password is not None else SecurityType.NONE
        self.challenge = b""
        self.out = bytearray(SERVER_VERSION.banner())
        self.inbuf = bytearray()
        self.converter = PixelConverter(NATIVE_FORMAT)
        self.encodings: tuple[int, ...] = ()
        self.zrle = ZrleEncoder()
        self.request: FramebufferUpdateRequest | None = None
        self.size = (0, 0)
        self.last: Frame | None = None
        self.cursor_sent: Cursor | None = None
        self.stats = SessionStats()
        self.close_reason = ""

    # -- input -----------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Consume bytes from the client; raises :class:`RfbError` on garbage."""
        self.inbuf += data
        while self.state is not ClientState.CLOSING and self._step():
            pass

    @property
    def closing(self) -> bool:
        """Authentication failed: flush what is queued, then close."""
        return self.state is ClientState.CLOSING

    @property
    def partial(self) -> bool:
        """Whether part of a message has arrived and the rest is awaited."""
        return bool(self.inbuf)

    def _take(self, n: int) -> bytes | None:
        if len(self.inbuf) < n:
            return None
        data = bytes(self.inbuf[:n])
        del self.inbuf[:n]
        return data

    def _step(self) -> bool:
        if self.state is ClientState.NORMAL:
            parsed = parse_client_message(self.inbuf)
            if parsed is None:
                return False
            msg, used = parsed
            del self.inbuf[:used]
            self.stats.messages += 1
            self._handle(msg)
            return True
        need = {ClientState.VERSION: RFB_VERSION_LEN, ClientState.SECURITY: 1,
                ClientState.AUTH: des.CHALLENGE_SIZE, ClientState.INIT: 1}[self.state]
        data = self._take(need)
        if data is None:
            return False
        {ClientState.VERSION: self._on_version, ClientState.SECURITY: self._on_security,
         ClientState.AUTH: self._on_auth, ClientState.INIT: self._on_init}[self.state](data)
        return True

    # -- handshake (7.1, 7.3) ----------------------------------------------------------
    def _on_version(self, line: bytes) -> None:
        self.version = parse_version(line)
        if self.version is Version.V3_3:
            self.out += security_type_33(self.offered)
            self._start_security(self.offered)
        else:
            self.out += security_types_message(self.offered)
            self.state = ClientState.SECURITY

    def _on_security(self, data: bytes) -> None:
        self._start_security(parse_security_choice(data, self.offered))

    def _start_security(self, chosen: SecurityType) -> None:
        if chosen is SecurityType.VNC_AUTH:
            self.challenge = des.new_challenge()
            self.out += self.challenge
            self.state = ClientState.AUTH
            return
        if needs_security_result(self.version, chosen):
            self.out += security_result(True, self.version)
        self.state = ClientState.INIT

    def _on_auth(self, response: bytes) -> None:
        assert self.password is not None
        if des.check_response(self.password, self.challenge, response):
            self.out += security_result(True, self.version)
            self.state = ClientState.INIT
            return
        self.out += security_result(False, self.version, "wrong password")
        self.state = ClientState.CLOSING
        self.close_reason = "wrong password"

    def _on_init(self, data: bytes) -> None:
        # ClientInit's shared-flag (7.3.1) is ignored: clients always share.
        frame = self._initial_frame()
        self.size = (frame.width, frame.height)
        self.out += server_init(frame.width, frame.height, NATIVE_FORMAT, self.name)
        self.state = ClientState.NORMAL

    # -- messages of 7.5 ---------------------------------------------------------------
    def _handle(self, msg: ClientMessage) -> None:
        if isinstance(msg, SetPixelFormat):
            self.converter = PixelConverter(msg.format)
            self.last = None  # what the client holds is in the old format: resend all
        elif isinstance(msg, SetEncodings):
            self.encodings = msg.encodings
            self.cursor_sent = None
            if Encoding.EXTENDED_DESKTOP_SIZE in msg.encodings:
                # the first update says the server can resize (the extension's rule)
                self.size_notes.append((ResizeReason.SERVER, ResizeStatus.OK))
        elif isinstance(msg, SetDesktopSize):
            self.size_notes.append((ResizeReason.THIS_CLIENT, self._resize(msg)))
        elif isinstance(msg, FramebufferUpdateRequest):
            self.request = msg
        elif isinstance(msg, KeyEvent):
            self.sink.key(msg.keysym, msg.down)
        elif isinstance(msg, PointerEvent):
            x = min(msg.x, max(self.size[0] - 1, 0))
            y = min(msg.y, max(self.size[1] - 1, 0))
            self.sink.pointer(x, y, msg.buttons)
        elif isinstance(msg, ClientCutText):
            self.sink.cut_text(msg.text)

    def _resize(self, msg: SetDesktopSize) -> int:
        if Encoding.EXTENDED_DESKTOP_SIZE not in self.encodings:
            raise RfbError("SetDesktopSize without the ExtendedDesktopSize encoding")
        if not msg.screens or not (1 <= msg.width <= MAX_DIMENSION
                                   and 1 <= msg.height <= MAX_DIMENSION):
            return ResizeStatus.INVALID_LAYOUT
        return self.resizer(msg.width, msg.height)

    # -- output ------------------------------------------------------------------------
    @property
    def wants_update(self) -> bool:
        return self.state is ClientState.NORMAL and self.request is not None

    def make_update(self, frame: Frame, cursor: Cursor | None) -> bool:
        """Answer the pending request with ``frame`` if there is something to
        send; whether an update was appended to :attr:`out`."""
        req = self.request
        if req is None or self.state is not ClientState.NORMAL:
            return False
        pseudo: list[bytes] = []
        resized = (frame.width, frame.height) != self.size
        extended = Encoding.EXTENDED_DESKTOP_SIZE in self.encodings
        if resized and (extended or Encoding.DESKTOP_SIZE in self.encodings):
            self.size = (frame.width, frame.height)
            self.last = None
            pseudo.append(extended_desktop_size_rect(ResizeReason.SERVER, ResizeStatus.OK,
                                                     *self.size) if extended
                          else desktop_size_rect(*self.size))
        elif resized:
            frame = frame.fitted(*self.size)  # the client cannot resize: crop or pad
        if extended:  # answers and announcements, with the size the client holds
            pseudo += [extended_desktop_size_rect(reason, status, *self.size)
                       for reason, status in self.size_notes]
        self.size_notes.clear()
        if (cursor is not None and cursor != self.cursor_sent
                and Encoding.CURSOR in self.encodings):
            pseudo.append(cursor_rect(cursor, self.converter))
            self.cursor_sent = cursor
        area = Rect(req.x, req.y, req.width, req.height)
        if resized and pseudo:
            area = full(frame)
        if req.incremental:
            rects = damaged(self.last, frame, area)
        else:
            clipped = area.clip(full(frame))
            rects = [clipped] if clipped else []
        if not rects and not pseudo and req.incremental:
            return False  # nothing changed: the request stays pending
        self._send(frame, rects, pseudo)
        # An update of the whole screen's damage leaves the client holding ``frame``.
        whole = area.clip(full(frame)) == full(frame)
        self.last = frame if whole else patch(self.last, frame, rects)
        return True

    def _send(self, frame: Frame, rects: list[Rect], pseudo: list[bytes]) -> None:
        enc = choose_encoding(self.encodings)
        self.out += framebuffer_update_header(len(rects) + len(pseudo))
        for p in pseudo:
            self.out += p
        for r in rects:
            self.out += rect_header(r.x, r.y, r.width, r.height, enc)
            if enc is Encoding.ZRLE:
                self.out += self.zrle.encode(frame, r, self.converter)
            else:
                self.out += encode_raw(frame, r, self.converter)
            self.stats.pixels += r.area
        self.request = None
        self.stats.updates += 1
        self.stats.rects += len(rects)


def patch(base: Frame | None, frame: Frame, rects: list[Rect]) -> Frame:
    """``base`` with ``rects`` of ``frame`` copied in: what a client holds after
    an update that covered only part of the screen.  Without a base (the
    first update) the parts never sent count as sent: a client asking for
    part of the screen first gets only changes there later."""
    if (base is None or (base.width, base.height) != (frame.width, frame.height)
            or full(frame) in rects):
        return frame
    out = bytearray(base.pixels)
    stride = frame.width * 4
    for r in rects:
        for y in range(r.y, r.y + r.height):
            o = y * stride + r.x * 4
            out[o:o + r.width * 4] = frame.pixels[o:o + r.width * 4]
    return Frame(frame.width, frame.height, bytes(out))
