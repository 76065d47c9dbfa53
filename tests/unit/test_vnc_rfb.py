"""The RFB wire format (dvmm_display.rfb): handshake pieces, pixel formats and
client messages, with hostile input: every byte string parses to a message,
asks for more bytes, or raises an RfbError — never anything else."""

from __future__ import annotations

import struct

import pytest
from dvmm_display.rfb import (
    BadPixelFormatError,
    BadSecurityTypeError,
    BadVersionError,
    ClientCutText,
    FramebufferUpdateRequest,
    KeyEvent,
    MessageTooLargeError,
    PixelFormat,
    PointerEvent,
    RfbError,
    SecurityType,
    SetEncodings,
    SetPixelFormat,
    UnknownMessageError,
    Version,
    parse_client_message,
    parse_security_choice,
    parse_version,
    rect_header,
    security_result,
    server_init,
)
from hypothesis import given
from hypothesis import strategies as st


@pytest.mark.parametrize(("line", "version"), [
    (b"RFB 003.003\n", Version.V3_3), (b"RFB 003.007\n", Version.V3_7),
    (b"RFB 003.008\n", Version.V3_8), (b"RFB 003.889\n", Version.V3_3),  # Apple
    (b"RFB 003.005\n", Version.V3_3),
])
def test_versions(line: bytes, version: Version) -> None:
    assert parse_version(line) is version


@pytest.mark.parametrize("line", [b"RFB 004.000\n", b"RFB 003.008 ", b"GET / HTTP/1.",
                                  b"RFB 03.0008\n"])
def test_bad_versions(line: bytes) -> None:
    with pytest.raises(BadVersionError):
        parse_version(line)


@given(st.binary(min_size=12, max_size=12))
def test_any_version_line_is_a_version_or_refused(line: bytes) -> None:
    try:
        parse_version(line)
    except BadVersionError:
        pass


def test_security_choice_must_be_the_offered_type() -> None:
    assert parse_security_choice(b"\x02", SecurityType.VNC_AUTH) is SecurityType.VNC_AUTH
    for bad in (b"\x01", b"\x00", b"\x10", b""):
        with pytest.raises(BadSecurityTypeError):
            parse_security_choice(bad, SecurityType.VNC_AUTH)


def test_security_result_reason_only_in_38() -> None:
    assert security_result(True, Version.V3_3) == b"\0\0\0\0"
    assert security_result(False, Version.V3_7) == b"\0\0\0\1"
    assert security_result(False, Version.V3_8, "no") == b"\0\0\0\1\0\0\0\2no"


def test_server_init_layout() -> None:
    data = server_init(640, 480, PixelFormat(), "vm")
    assert data[:4] == struct.pack(">HH", 640, 480)
    assert PixelFormat.parse(data[4:20]) == PixelFormat()
    assert data[20:] == b"\0\0\0\2vm"


def valid_formats() -> st.SearchStrategy[PixelFormat]:
    """True-colour formats of 8, 16 or 32 bits: channels of 1.. bits placed in
    any order with any gaps, either byte order."""
    @st.composite
    def build(draw: st.DrawFn) -> PixelFormat:
        bpp = draw(st.sampled_from([8, 16, 32]))
        bits = [draw(st.integers(1, bpp // 3)) for _ in range(3)]
        shifts, pos = [0, 0, 0], 0
        left = sum(bits)
        for ch in draw(st.permutations([0, 1, 2])):
            pos += draw(st.integers(0, bpp - pos - left))
            shifts[ch] = pos
            pos += bits[ch]
            left -= bits[ch]
        return PixelFormat(bpp, draw(st.integers(1, bpp)), draw(st.booleans()), True,
                           (1 << bits[0]) - 1, (1 << bits[1]) - 1, (1 << bits[2]) - 1,
                           *shifts)
    return build()


@given(valid_formats())
def test_pixel_format_round_trip(fmt: PixelFormat) -> None:
    assert PixelFormat.parse(fmt.pack()) == fmt


@pytest.mark.parametrize("fmt", [
    PixelFormat(bits_per_pixel=24), PixelFormat(depth=0), PixelFormat(depth=33),
    PixelFormat(true_colour=False), PixelFormat(red_max=254), PixelFormat(green_max=0),
    PixelFormat(bits_per_pixel=16, depth=16), PixelFormat(blue_shift=30),
])
def test_bad_pixel_formats(fmt: PixelFormat) -> None:
    with pytest.raises(BadPixelFormatError):
        PixelFormat.parse(fmt.pack())


def encoded(msg: object) -> bytes:
    if isinstance(msg, SetPixelFormat):
        return b"\0\0\0\0" + msg.format.pack()
    if isinstance(msg, SetEncodings):
        n = len(msg.encodings)
        return struct.pack(f">BxH{n}i", 2, n, *msg.encodings)
    if isinstance(msg, FramebufferUpdateRequest):
        return struct.pack(">BBHHHH", 3, msg.incremental, msg.x, msg.y, msg.width, msg.height)
    if isinstance(msg, KeyEvent):
        return struct.pack(">BBxxI", 4, msg.down, msg.keysym)
    if isinstance(msg, PointerEvent):
        return struct.pack(">BBHH", 5, msg.buttons, msg.x, msg.y)
    assert isinstance(msg, ClientCutText)
    return struct.pack(">BxxxI", 6, len(msg.text)) + msg.text


u16 = st.integers(0, 0xFFFF)
messages = st.one_of(
    valid_formats().map(SetPixelFormat),
    st.lists(st.integers(-(1 << 31), (1 << 31) - 1), max_size=40).map(
        lambda e: SetEncodings(tuple(e))),
    st.builds(FramebufferUpdateRequest, st.booleans(), u16, u16, u16, u16),
    st.builds(KeyEvent, st.booleans(), st.integers(0, 0xFFFFFFFF)),
    st.builds(PointerEvent, st.integers(0, 255), u16, u16),
    st.binary(max_size=300).map(ClientCutText),
)


@given(messages)
def test_messages_round_trip_and_prefixes_ask_for_more(msg: object) -> None:
    data = encoded(msg)
    assert parse_client_message(data + b"\x05trailing") == (msg, len(data))
    for cut in range(len(data)):
        assert parse_client_message(data[:cut]) is None


@given(st.binary(max_size=64))
def test_random_bytes_parse_or_fail_cleanly(data: bytes) -> None:
    try:
        parsed = parse_client_message(data)
    except RfbError:
        return
    if parsed is not None:
        assert 0 < parsed[1] <= len(data)


@given(st.lists(messages, max_size=8), st.binary(min_size=1, max_size=32))
def test_garbage_after_good_messages(msgs: list[object], garbage: bytes) -> None:
    stream = b"".join(encoded(m) for m in msgs) + garbage
    pos = 0
    for m in msgs:
        parsed = parse_client_message(stream[pos:])
        assert parsed is not None and parsed[0] == m
        pos += parsed[1]
    try:
        parse_client_message(stream[pos:])
    except RfbError:
        pass


@pytest.mark.parametrize(("data", "error"), [
    (b"\x01", UnknownMessageError), (b"\xff\0\0", UnknownMessageError),
    (b"\x06\0\0\0\xff\xff\xff\xff", MessageTooLargeError),  # extended clipboard, not offered
    (b"\x02\0\xff\xff", MessageTooLargeError),
    (b"\0\0\0\0" + PixelFormat(bits_per_pixel=12).pack(), BadPixelFormatError),
])
def test_malformed_messages(data: bytes, error: type[RfbError]) -> None:
    with pytest.raises(error):
        parse_client_message(data)


def test_rect_header_refuses_what_u16_cannot_carry() -> None:
    assert rect_header(1, 2, 3, 4, -239) == struct.pack(">HHHHi", 1, 2, 3, 4, -239)
    with pytest.raises(ValueError):
        rect_header(0, 0, 70000, 1, 0)
