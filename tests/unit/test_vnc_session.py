"""One client's protocol state without sockets (dvmm_display.session):
handshakes of 3.3/3.7/3.8, authentication, update requests, input, and
hostile byte streams."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from dvmm_display.des import vnc_response
from dvmm_display.framebuffer import Frame, default_cursor
from dvmm_display.rfb import Encoding, RfbError
from dvmm_display.session import ClientState, VncSession
from hypothesis import given, settings
from hypothesis import strategies as st

FRAME = Frame(100, 70, bytes(range(256)) * (100 * 70 * 4 // 256) + bytes(100 * 70 * 4 % 256))


@dataclass
class Sink:
    events: list[tuple[object, ...]] = field(default_factory=list)

    def key(self, keysym: int, down: bool) -> None:
        self.events.append(("key", keysym, down))

    def pointer(self, x: int, y: int, buttons: int) -> None:
        self.events.append(("pointer", x, y, buttons))

    def cut_text(self, text: bytes) -> None:
        self.events.append(("cut", text))


def take(s: VncSession) -> bytes:
    data = bytes(s.out)
    s.out.clear()
    return data


def connected(version: bytes = b"RFB 003.008\n", password: bytes | None = None,
              frame: Frame = FRAME) -> tuple[VncSession, Sink]:
    sink = Sink()
    s = VncSession(password, "test", sink, lambda: frame)
    assert take(s) == b"RFB 003.008\n"
    s.feed(version)
    kind = 2 if password else 1
    if version == b"RFB 003.003\n":
        assert take(s)[:4] == struct.pack(">I", kind)  # then the challenge, if any
        s.out += s.challenge
    else:
        assert take(s) == bytes([1, kind])
        s.feed(bytes([kind]))
    if password:
        assert take(s) == s.challenge and len(s.challenge) == 16
        s.feed(vnc_response(password, s.challenge))
    s.feed(b"\x01")
    init = take(s)
    # [SecurityResult] ServerInit: size, PIXEL_FORMAT, name
    assert init.endswith(b"\0\0\0\4test") and init[-28:-24] == struct.pack(">HH", 100, 70)
    assert init[:-28] in (b"", b"\0\0\0\0")
    assert s.state is ClientState.NORMAL
    return s, sink


@pytest.mark.parametrize("version", [b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"])
@pytest.mark.parametrize("password", [None, b"pw"])
def test_handshakes(version: bytes, password: bytes | None) -> None:
    connected(version, password)


def test_security_result_after_none_only_in_38() -> None:
    for version, result in ((b"RFB 003.007\n", b""), (b"RFB 003.008\n", b"\0\0\0\0")):
        s = VncSession(None, "t", Sink(), lambda: FRAME)
        take(s)
        s.feed(version)
        take(s)
        s.feed(b"\x01")
        assert take(s) == result


@pytest.mark.parametrize("version", [b"RFB 003.003\n", b"RFB 003.008\n"])
def test_wrong_password_closes_after_the_result(version: bytes) -> None:
    s = VncSession(b"right", "t", Sink(), lambda: FRAME)
    take(s)
    s.feed(version)
    take(s)
    if version != b"RFB 003.003\n":
        s.feed(b"\x02")
    take(s)  # the challenge
    s.feed(vnc_response(b"wrong", s.challenge) + b"\x01")
    assert s.closing
    out = take(s)
    assert out[:4] == b"\0\0\0\1"
    assert (out[4:] != b"") == (version == b"RFB 003.008\n")  # 3.8 adds a reason


def test_choosing_an_unoffered_type_is_an_error() -> None:
    s = VncSession(b"pw", "t", Sink(), lambda: FRAME)
    s.feed(b"RFB 003.008\n")
    with pytest.raises(RfbError):
        s.feed(b"\x01")  # None was not offered


def test_updates_follow_requests() -> None:
    s, _ = connected()
    assert not s.make_update(FRAME, None)  # nothing asked
    s.feed(struct.pack(">BBHHHH", 3, 0, 0, 0, 100, 70))
    assert s.make_update(FRAME, None)
    out = take(s)
    assert out[:4] == b"\0\0\0\1" and out[4:16] == struct.pack(">HHHHi", 0, 0, 100, 70, 0)
    assert out[16:] == FRAME.pixels
    s.feed(struct.pack(">BBHHHH", 3, 1, 0, 0, 100, 70))
    assert not s.make_update(FRAME, None) and s.wants_update  # unchanged: stays pending
    px = bytearray(FRAME.pixels)
    px[(50 * 100 + 80) * 4] ^= 1
    assert s.make_update(Frame(100, 70, bytes(px)), None)
    out = take(s)
    assert out[4:16] == struct.pack(">HHHHi", 64, 0, 36, 64, 0)  # the one damaged tile


def test_desktop_size_and_cursor_when_supported() -> None:
    s, _ = connected()
    s.feed(struct.pack(">BxH3i", 2, 3, Encoding.ZRLE, Encoding.DESKTOP_SIZE, Encoding.CURSOR))
    s.feed(struct.pack(">BBHHHH", 3, 1, 0, 0, 100, 70))
    bigger = Frame(120, 80, bytes(120 * 80 * 4))
    assert s.make_update(bigger, default_cursor())
    out = take(s)
    assert out[:4] == b"\0\0\0\3"
    assert out[4:16] == struct.pack(">HHHHi", 0, 0, 120, 80, Encoding.DESKTOP_SIZE)
    assert struct.unpack(">i", out[24:28])[0] == Encoding.CURSOR
    assert s.size == (120, 80)


def test_without_desktop_size_the_picture_is_fitted() -> None:
    s, _ = connected()
    s.feed(struct.pack(">BBHHHH", 3, 0, 0, 0, 100, 70))
    assert s.make_update(Frame(120, 80, bytes(120 * 80 * 4)), default_cursor())
    out = take(s)
    assert out[:4] == b"\0\0\0\1"  # no cursor either: not asked for
    assert out[4:16] == struct.pack(">HHHHi", 0, 0, 100, 70, 0)


def test_input_reaches_the_sink() -> None:
    s, sink = connected()
    s.feed(struct.pack(">BBxxI", 4, 1, 0xFF1B) + struct.pack(">BBHH", 5, 4, 500, 10)
           + struct.pack(">BxxxI", 6, 2) + b"hi" + struct.pack(">BBxxI", 4, 0, 0xFF1B))
    assert sink.events == [("key", 0xFF1B, True), ("pointer", 99, 10, 4), ("cut", b"hi"),
                           ("key", 0xFF1B, False)]


def test_messages_split_anywhere() -> None:
    s, sink = connected()
    data = struct.pack(">BBxxI", 4, 1, 0x61) * 3
    for i in range(len(data)):
        s.feed(data[i:i + 1])
    assert len(sink.events) == 3 and not s.partial


@settings(deadline=None)
@given(st.binary(min_size=1, max_size=200))
def test_garbage_in_any_state_is_an_error_or_harmless(data: bytes) -> None:
    for s in (VncSession(None, "t", Sink(), lambda: FRAME), connected()[0]):
        try:
            s.feed(data)
        except RfbError:
            continue
        assert s.state in ClientState
