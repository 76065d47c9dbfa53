"""The VNC server on real sockets (dvmm_display.server), in process, with the
test client written from RFC 6143: several clients at once, each dropped
alone when it sends garbage, stalls or fails authentication."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from dvmm_display.framebuffer import Cursor, Frame
from dvmm_display.pixels import pixel_value
from dvmm_display.rfb import PixelFormat
from dvmm_display.server import VncServer, parse_listen
from dvmm_testing.rfbclient import CURSOR, DESKTOP_SIZE, RAW, ZRLE, AuthRefused, Format, RfbClient

from .test_vnc_session import Sink


def picture(width: int, height: int, seed: int = 0) -> Frame:
    """Random colours; the X byte is 0 (ZRLE's 3-byte CPIXELs do not carry it)."""
    rnd = random.Random(seed)
    px = bytearray(rnd.randbytes(width * height * 4))
    px[3::4] = bytes(width * height)
    return Frame(width, height, bytes(px))


class Source:
    def __init__(self, frame: Frame) -> None:
        self.frame = frame
        self.pointer: Cursor | None = None

    def snapshot(self) -> Frame:
        return self.frame

    def cursor(self) -> Cursor | None:
        return self.pointer


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def source() -> Source:
    return Source(picture(160, 100))


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def server(source: Source, sink: Sink) -> Iterator[VncServer]:
    srv = VncServer("127.0.0.1", 0, source, sink, client_timeout=0.5)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def client(srv: VncServer, **kw: object) -> RfbClient:
    return RfbClient(*srv.address, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"])
def test_full_picture_for_each_version(server: VncServer, source: Source, version: bytes) -> None:
    with client(server, version=version) as c:
        assert (c.width, c.height, c.name) == (160, 100, "dvmm")
        c.request()
        rects = c.read_update()
        assert [(r.x, r.y, r.width, r.height, r.encoding) for r in rects] == [(0, 0, 160, 100, RAW)]
        assert bytes(c.screen) == source.frame.pixels


def test_password(source: Source, sink: Sink) -> None:
    srv = VncServer("127.0.0.1", 0, source, sink, password=b"s3cret")
    srv.start()
    try:
        with client(srv, password=b"s3cret") as c:
            c.request()
            c.read_update()
            assert bytes(c.screen) == source.frame.pixels
        for version in (b"RFB 003.008\n", b"RFB 003.003\n"):
            with pytest.raises(AuthRefused):
                client(srv, password=b"wrong", version=version)
        wait_for(lambda: srv.stats.auth_failures == 2 and not srv.clients, "the refusals")
    finally:
        srv.stop()


def test_garbage_drops_only_that_client(server: VncServer, source: Source) -> None:
    good = client(server)
    good.set_encodings(ZRLE)
    good.request()
    good.read_update()
    bad = client(server)
    bad.sock.sendall(b"\x09garbage")
    assert bad.sock.recv(10) == b""  # closed by the server
    wait_for(lambda: server.stats.drop_reasons.get("protocol error") == 1, "the drop")
    frame = bytearray(source.frame.pixels)
    frame[(70 * 160 + 100) * 4:(70 * 160 + 103) * 4] = b"\xff\xff\xff\0" * 3
    source.frame = Frame(160, 100, bytes(frame))
    good.request(incremental=True)
    rects = good.read_update()
    assert [(r.x, r.y, r.width, r.height) for r in rects] == [(64, 64, 64, 36)]
    assert bytes(good.screen) == source.frame.pixels
    good.close()


def test_stalled_handshake_and_half_message_are_dropped(server: VncServer) -> None:
    silent = socket.create_connection(server.address)
    half = client(server)
    half.sock.sendall(b"\x03\x00\x00")  # a FramebufferUpdateRequest cut short
    with client(server) as fine:
        wait_for(lambda: server.stats.dropped == 2, "two drops")
        fine.request()
        fine.read_update()  # still served
    assert silent.recv(100).startswith(b"RFB 003.008\n")
    silent.close()
    half.close()


def test_client_not_reading_is_dropped_others_go_on(source: Source, sink: Sink) -> None:
    source.frame = picture(1600, 1200)
    srv = VncServer("127.0.0.1", 0, source, sink, client_timeout=0.5)
    srv.start()
    try:
        sleeper = socket.socket()
        sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sleeper.connect(srv.address)
        sleeper.sendall(b"RFB 003.008\n\x01\x01" + bytes([3, 0, 0, 0, 0, 0, 6, 64, 4, 176]))
        with client(srv) as reader:
            wait_for(lambda: srv.stats.drop_reasons.get("not reading its updates for 0.5 s")
                     == 1, "the stalled client's drop")
            reader.request()
            reader.read_update()
            assert bytes(reader.screen) == source.frame.pixels
        sleeper.close()
    finally:
        srv.stop()


@pytest.mark.parametrize("encoding", [RAW, ZRLE])
@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("fmt", [
    PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0),
    PixelFormat(8, 8, False, True, 7, 7, 3, 0, 3, 6),
    PixelFormat(32, 24, False, True, 255, 255, 255, 0, 8, 16),
])
def test_pixel_formats(server: VncServer, source: Source, fmt: PixelFormat, big_endian: bool,
                       encoding: int) -> None:
    cf = Format(fmt.bits_per_pixel, fmt.depth, big_endian, fmt.red_max, fmt.green_max,
                fmt.blue_max, fmt.red_shift, fmt.green_shift, fmt.blue_shift)
    with client(server) as c:
        c.set_pixel_format(cf)
        c.set_encodings(encoding)
        c.request()
        (r,) = c.read_update()
        px = source.frame.pixels
        assert r.encoding == encoding
        assert r.pixels == [pixel_value(fmt, px[i + 2], px[i + 1], px[i])
                            for i in range(0, len(px), 4)]


def test_resize_and_cursor(server: VncServer, source: Source) -> None:
    with client(server) as c:
        c.set_encodings(ZRLE, DESKTOP_SIZE, CURSOR)
        c.request()
        c.read_update()
        source.frame = picture(200, 120, 5)
        source.pointer = Cursor(2, 2, 1, 1, bytes(16), b"\xc0\x40")
        c.request(incremental=True)
        kinds = [r.encoding for r in c.read_update()]
        assert kinds[:2] == [DESKTOP_SIZE, CURSOR] and (c.width, c.height) == (200, 120)
        assert bytes(c.screen) == source.frame.pixels and c.cursor is not None


def test_input_goes_to_the_sink(server: VncServer, sink: Sink) -> None:
    with client(server) as c:
        c.key(0x61, True)
        c.pointer(10, 20, 1)
        c.key(0x61, False)
        wait_for(lambda: len(sink.events) == 3, "three events")
    assert sink.events == [("key", 0x61, True), ("pointer", 10, 20, 1), ("key", 0x61, False)]


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:5900") == ("127.0.0.1", 5900)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("5900", "host:", ":5900", "h:70000", "h:x"):
        with pytest.raises(ValueError):
            parse_listen(bad)
