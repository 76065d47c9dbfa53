"""The vhost-user-gpu protocol, back-end side (QEMU docs/interop/vhost-user-gpu.rst).

Owns the socket a frontend hands over with ``VHOST_USER_GPU_SET_SOCKET``
(QEMU's ``vhost-user-gpu-pci`` does, so QEMU's own display shows what the
driver draws): the opening (GET_PROTOCOL_FEATURES, then
SET_PROTOCOL_FEATURES with the features both sides know -- none are
defined yet), the frontend's preferred display configuration
(GET_DISPLAY_INFO), and, as a :class:`TableObserver` of the resource table,
every scanout change (SCANOUT), flushed rectangle (UPDATE, pixels in
PIXMAN_x8r8g8b8) and cursor change (CURSOR_UPDATE, CURSOR_POS,
CURSOR_POS_HIDE).  dvmm's own VNC server keeps reading the same table.

Nothing here blocks the vhost-user loop on the frontend: replies are read
when the socket is readable (watched through the :class:`BackendHost`),
and a send that cannot finish within ``timeout`` seconds, a malformed
reply or a hang-up closes the channel with one log line -- the device and
VNC go on.  Messages are the spec's: a header ``{u32 request, u32 flags,
u32 size}`` in the machine's byte order, flag bit 2 on replies.
"""

from __future__ import annotations

import enum
import logging
import selectors
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from dvmm_shared.vhost_user.backend import BackendHost

from .framebuffer import Frame
from .gpu_protocol import CTRL_HDR, VIRTIO_GPU_MAX_SCANOUTS, Rect
from .resources import CursorImage

log = logging.getLogger("dvmm.display.gpu_socket")

HEADER = struct.Struct("=III")
REPLY_FLAG = 1 << 2
POS = struct.Struct("=III")  # VhostUserGpuCursorPos, VhostUserGpuScanout
UPDATE = struct.Struct("=IIIII")
CURSOR = struct.Struct("=IIIII")  # pos, hot_x, hot_y; then 64 * 64 u32
PMODE = struct.Struct("=IIIIII")  # struct virtio_gpu_display_one: rect, enabled, flags
MAX_REPLY = 4096
#: Protocol features this side knows (the spec defines none yet).
OUR_PROTOCOL_FEATURES = 0


class GpuRequest(enum.IntEnum):
    GET_PROTOCOL_FEATURES = 1
    SET_PROTOCOL_FEATURES = 2
    GET_DISPLAY_INFO = 3
    CURSOR_POS = 4
    CURSOR_POS_HIDE = 5
    CURSOR_UPDATE = 6
    SCANOUT = 7
    UPDATE = 8
    DMABUF_SCANOUT = 9
    DMABUF_UPDATE = 10


class ChannelState(enum.Enum):
    NEGOTIATING = "negotiating"  # GET_PROTOCOL_FEATURES sent, no answer yet
    READY = "ready"
    CLOSED = "closed"


class ChannelError(Exception):
    """The frontend broke the protocol or went away."""


@dataclass
class ChannelStats:
    sent: int = 0
    updates: int = 0
    update_bytes: int = 0
    cursor: int = 0
    replies: int = 0
    protocol_features: int = 0


Modes = list[tuple[int, int] | None]


def message(request: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(request, 0, len(payload)) + payload


def parse_display_info(payload: bytes) -> Modes:
    """``struct virtio_gpu_resp_display_info`` -> the enabled modes' sizes."""
    need = CTRL_HDR.size + PMODE.size * VIRTIO_GPU_MAX_SCANOUTS
    if len(payload) < need:
        raise ChannelError(f"display info of {len(payload)} bytes, need {need}")
    modes: Modes = []
    for i in range(VIRTIO_GPU_MAX_SCANOUTS):
        _x, _y, w, h, enabled, _flags = PMODE.unpack_from(payload, CTRL_HDR.size + i * PMODE.size)
        modes.append((w, h) if enabled and w and h else None)
    return modes


class GpuSocket:
    """One frontend's vhost-user-gpu socket; a :class:`TableObserver`."""

    def __init__(self, sock: socket.socket, on_display_info: Callable[[Modes], None],
                 on_ready: Callable[[], None], timeout: float = 2.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.on_display_info = on_display_info
        self.on_ready = on_ready
        self.state = ChannelState.NEGOTIATING
        self.stats = ChannelStats()
        self._awaiting: deque[int] = deque()  # requests whose reply is due, in order
        self._host: BackendHost | None = None
        self._inbuf = bytearray()

    def start(self, host: BackendHost) -> None:
        """Open the protocol; replies are read as the socket becomes readable."""
        self._host = host
        host.watch(self.sock.fileno(), selectors.EVENT_READ, self._readable)
        self._request(GpuRequest.GET_PROTOCOL_FEATURES)

    def close(self, reason: str = "") -> None:
        if self.state is ChannelState.CLOSED:
            return
        if reason:
            log.warning("vhost-user-gpu socket closed: %s", reason)
        self.state = ChannelState.CLOSED
        if self._host is not None:
            self._host.unwatch(self.sock.fileno())
        self.sock.close()

    # -- sending ------------------------------------------------------------------------
    def _send(self, request: int, payload: bytes = b"") -> None:
        if self.state is ChannelState.CLOSED:
            return
        try:
            self.sock.sendall(message(request, payload))
        except OSError as exc:  # includes the timeout: a frontend that stopped reading
            self.close(f"{GpuRequest(request).name} not sent: {exc}")
            return
        self.stats.sent += 1

    def _request(self, request: GpuRequest) -> None:
        self._awaiting.append(request)
        self._send(request)

    # -- replies --------------------------------------------------------------------------
    def _readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(f"receive failed: {exc}")
            return
        if not data:
            self.close("the frontend hung up")
            return
        self._inbuf += data
        try:
            while self.state is not ChannelState.CLOSED and self._reply():
                pass
        except ChannelError as exc:
            self.close(str(exc))

    def _reply(self) -> bool:
        if len(self._inbuf) < HEADER.size:
            return False
        request, flags, size = HEADER.unpack_from(self._inbuf)
        if size > MAX_REPLY:
            raise ChannelError(f"a {size}-byte message from the frontend")
        if len(self._inbuf) < HEADER.size + size:
            return False
        payload = bytes(self._inbuf[HEADER.size:HEADER.size + size])
        del self._inbuf[:HEADER.size + size]
        if not flags & REPLY_FLAG or not self._awaiting or self._awaiting[0] != request:
            raise ChannelError(f"unexpected message {request} (flags {flags:#x}) from the "
                               f"frontend")
        self._awaiting.popleft()
        self.stats.replies += 1
        self._on_reply(request, payload)
        return True

    def _on_reply(self, request: int, payload: bytes) -> None:
        if request == GpuRequest.GET_PROTOCOL_FEATURES:
            if len(payload) != 8:
                raise ChannelError(f"protocol features of {len(payload)} bytes")
            features = int.from_bytes(payload, "little") & OUR_PROTOCOL_FEATURES
            self.stats.protocol_features = features
            self._send(GpuRequest.SET_PROTOCOL_FEATURES, features.to_bytes(8, "little"))
            self.state = ChannelState.READY
            log.info("vhost-user-gpu socket ready (protocol features %#x)", features)
            self._request(GpuRequest.GET_DISPLAY_INFO)
            self.on_ready()
        elif request == GpuRequest.GET_DISPLAY_INFO:
            self.on_display_info(parse_display_info(payload))

    # -- TableObserver -------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state is ChannelState.READY

    def scanout(self, scanout_id: int, width: int, height: int) -> None:
        if self.ready:
            self._send(GpuRequest.SCANOUT, POS.pack(scanout_id, width, height))

    def update(self, scanout_id: int, rect: Rect, frame: Frame) -> None:
        if not self.ready:
            return
        pixels = frame.rect(rect.x, rect.y, rect.width, rect.height)  # B, G, R, X
        self._send(GpuRequest.UPDATE, UPDATE.pack(scanout_id, rect.x, rect.y, rect.width,
                                                   rect.height) + pixels)
        self.stats.updates += 1
        self.stats.update_bytes += len(pixels)

    def cursor(self, scanout_id: int, x: int, y: int, image: CursorImage | None) -> None:
        if not self.ready:
            return
        self.stats.cursor += 1
        if image is None:
            self._send(GpuRequest.CURSOR_POS_HIDE, POS.pack(scanout_id, x, y))
            return
        self._send(GpuRequest.CURSOR_UPDATE,
                   CURSOR.pack(scanout_id, x, y, image.hot_x, image.hot_y) + image.bgra)

    def cursor_moved(self, scanout_id: int, x: int, y: int) -> None:
        if self.ready:
            self._send(GpuRequest.CURSOR_POS, POS.pack(scanout_id, x, y))
