"""The virtio-gpu device as a vhost-user backend (virtio 1.2 section 5.7).

Owns what the device advertises (device id 16: a control queue and a
cursor queue, ``struct virtio_gpu_config``, VIRTIO_GPU_F_EDID) and serving
one request: the readable bytes become a command (:mod:`.gpu_protocol`,
pure), the command runs against the :class:`ResourceTable`
(:mod:`.resources`), and the response header (with the request's fence,
5.7.6.7) or the spec's error response goes into the writable part.  A bad
request fails alone; the device keeps serving.  Cursor-queue requests get
no response data (as QEMU's device does).  Requests are served in order
and synchronously, so a fenced request's fence has signalled by the time
its response is written.

Crash recovery (:mod:`.recovery`): with the in-flight memfd the frontend
keeps (INFLIGHT_SHMFD, :attr:`GpuDevice.state_size` bytes of it are the
device's), every request that changes the table is saved there before its
answer is pushed, and a restarted process restores the table from it when
its first ring starts.

``VHOST_USER_GPU_SET_SOCKET`` (QEMU's vhost-user-gpu-pci) hands over a
socket on which :mod:`.gpu_socket` shows the frontend every scanout,
update and cursor, and learns its preferred display size; dvmm's VNC
keeps showing the same table.

The connection also brings guest memory (SET_MEM_TABLE), which the ramfb
scanout reads even when the machine has no virtio-gpu function:
:meth:`GpuDevice.memory` is the current session's :class:`GuestMemory`.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from dvmm_shared.chain import ChainReader, ChainWriter
from dvmm_shared.memory import GuestMemory
from dvmm_shared.vhost_user.backend import BackendHost, VhostUserBackend
from dvmm_shared.vhost_user.connection import Message
from dvmm_shared.vhost_user.message import ProtocolFeature, Request
from dvmm_shared.virtio import VIRTIO_F_VERSION_1, bit
from dvmm_shared.virtqueue import DescriptorChain

from .framebuffer import MAX_DIMENSION
from .gpu_protocol import (
    CTRL_HDR,
    MAX_BACKING_ENTRIES,
    MEM_ENTRY,
    VIRTIO_GPU_F_EDID,
    AttachBacking,
    Command,
    DetachBacking,
    GetDisplayInfo,
    GetEdid,
    GpuError,
    Header,
    MoveCursor,
    Rect,
    ResourceCreate2D,
    ResourceFlush,
    ResourceUnref,
    Resp,
    SetScanout,
    TransferToHost2D,
    UpdateCursor,
    display_info,
    edid_payload,
    parse_command,
    parse_header,
    response,
)
from .gpu_socket import GpuSocket, Modes
from .gpu_state import STATE_SIZE
from .recovery import Recovery
from .resources import ResourceTable
from .rfb import ResizeStatus

log = logging.getLogger("dvmm.display")

VIRTIO_ID_GPU = 16
CONTROLQ, CURSORQ = 0, 1
NUM_SCANOUTS = 1
# struct virtio_gpu_config (5.7.4): events_read, events_clear, num_scanouts, num_capsets.
CONFIG = struct.Struct("<IIII")
VIRTIO_GPU_EVENT_DISPLAY = 1 << 0
MAX_REQUEST = CTRL_HDR.size + 8 + MAX_BACKING_ENTRIES * MEM_ENTRY.size
#: Commands that change what a restarted process must restore.
CHANGING = (ResourceCreate2D, ResourceUnref, SetScanout, AttachBacking, DetachBacking,
            UpdateCursor)


@dataclass
class GpuStats:
    requests: int = 0
    errors: int = 0
    short_chains: int = 0
    cursor_updates: int = 0
    config_events: int = 0  # display-size changes announced (VIRTIO_GPU_EVENT_DISPLAY)


Result = tuple[Resp, bytes]


class GpuDevice(VhostUserBackend):
    """virtio-gpu over vhost-user; the session's memory feeds every scanout."""

    max_queue_size = 1024
    state_size = STATE_SIZE

    def __init__(self, size: tuple[int, int] = (1024, 768)) -> None:
        self.stats = GpuStats()
        self.events_read = 0
        self._host: BackendHost | None = None
        self.table = ResourceTable(self.memory, num_scanouts=NUM_SCANOUTS, size=size)
        self.recovery = Recovery(self.table)
        #: A driver runs the control queue (it can follow a display-size change).
        self.driver_ready = False
        #: Runs a callable on the daemon's loop thread (set by the program).
        self.call_soon: Callable[[Callable[[], None]], None] | None = None
        #: The frontend's vhost-user-gpu socket (GPU_SET_SOCKET), if any.
        self.gpu_socket: GpuSocket | None = None
        self._handlers: dict[type, Callable[[Command], Result]] = {
            GetDisplayInfo: self._display_info, GetEdid: self._edid,
            ResourceCreate2D: self._create, ResourceUnref: self._unref,
            SetScanout: self._set_scanout, ResourceFlush: self._flush,
            TransferToHost2D: self._transfer, AttachBacking: self._attach,
            DetachBacking: self._detach, UpdateCursor: self._update_cursor,
            MoveCursor: self._move_cursor,
        }

    @property
    def num_queues(self) -> int:
        return 2

    def features(self) -> int:
        return bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_GPU_F_EDID)

    def protocol_features(self) -> int:
        # the back-end channel carries the config-change notice of a resize
        return 1 << ProtocolFeature.BACKEND_REQ

    def get_config(self, offset: int, size: int) -> bytes:
        data = CONFIG.pack(self.events_read, 0, NUM_SCANOUTS, 0)
        return data[offset:offset + size].ljust(size, b"\0")

    def set_config(self, offset: int, data: bytes) -> None:
        # events_clear (offset 4) is the only driver-writable field (5.7.4).
        if offset == 4 and len(data) == 4:
            self.events_read &= ~int.from_bytes(data, "little")

    def attach(self, host: BackendHost) -> None:
        self._host = host

    # -- crash recovery (see the module doc) --------------------------------------------
    def state_region(self, fd: int, offset: int, fresh: bool) -> None:
        self.recovery.attach(fd, offset, fresh)

    def queue_started(self, index: int) -> None:
        self.recovery.ring_started()
        if index == CONTROLQ:
            self.driver_ready = True

    def queue_stopped(self, index: int) -> None:
        if index == CONTROLQ:
            self.driver_ready = False

    # -- VHOST_USER_GPU_SET_SOCKET (vhost-user-gpu.rst) ----------------------------------
    def extra_requests(self) -> Mapping[int, Callable[[Message], None]]:
        return {Request.GPU_SET_SOCKET: self._set_socket}

    def _set_socket(self, msg: Message) -> None:
        fd = msg.take_fd()
        if fd is None:
            raise ValueError("GPU_SET_SOCKET without an fd")
        try:  # refused: the fd is ours to close (found by dvmm chaos fuzz)
            if self._host is None:
                raise ValueError("GPU_SET_SOCKET before the session")
            sock = socket.socket(fileno=fd)  # not a socket: OSError, fd left open
        except BaseException:
            os.close(fd)
            raise
        self._close_socket()
        channel = GpuSocket(sock, self._frontend_modes, self._resync)
        self.gpu_socket = self.table.observer = channel
        channel.start(self._host)

    def _frontend_modes(self, modes: Modes) -> None:
        """The frontend's preferred display: what GET_DISPLAY_INFO reports now."""
        for scanout, mode in zip(self.table.scanouts, modes, strict=False):
            if mode is not None:
                scanout.width, scanout.height = mode

    def _resync(self) -> None:
        """The socket is ready: show it what is on the scanouts already."""
        channel = self.gpu_socket
        if channel is None:
            return
        for i, s in enumerate(self.table.scanouts):
            if s.frame is not None:
                channel.scanout(i, s.frame.width, s.frame.height)
                channel.update(i, Rect(0, 0, s.frame.width, s.frame.height), s.frame)

    def _close_socket(self) -> None:
        if self.gpu_socket is not None:
            self.gpu_socket.close()
        self.gpu_socket = self.table.observer = None

    def reset(self) -> None:
        """The frontend left or reset the device: nothing of its session stays
        (a frontend that keeps the in-flight memfd gets it back from there)."""
        self._close_socket()
        self.driver_ready = False
        self.recovery.detach()
        self.table.reset()

    # -- display size (5.7.4: VIRTIO_GPU_EVENT_DISPLAY) ------------------------------
    def request_size(self, width: int, height: int) -> int:
        """A VNC client asks for a screen size (any thread): announced to the
        driver if one runs (it answers with GET_DISPLAY_INFO and a new
        scanout), refused otherwise -- firmware cannot follow."""
        if not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION):
            return ResizeStatus.INVALID_LAYOUT
        if not self.driver_ready or self.call_soon is None:
            return ResizeStatus.PROHIBITED
        self.call_soon(lambda: self.set_display_size(width, height))
        return ResizeStatus.OK

    def set_display_size(self, width: int, height: int) -> None:
        """Make ``width`` x ``height`` scanout 0's mode (loop thread): what
        GET_DISPLAY_INFO and GET_EDID report from now on; the driver learns
        of it through events_read and a config-change notice."""
        s = self.table.scanouts[0]
        if (s.width, s.height) == (width, height):
            return
        s.width, s.height = width, height
        self.events_read |= VIRTIO_GPU_EVENT_DISPLAY
        self.stats.config_events += 1
        self.recovery.save()
        host = self._host
        notified = host is not None and host.config_changed()
        log.info("display size %dx%d announced%s", width, height,
                 "" if notified else " (config event pending: no back-end channel)")

    def memory(self) -> GuestMemory | None:
        """The last frontend's guest memory (None before the first one; empty
        once it reset or left, as the session clears it).  Safe from other
        threads: the session replaces its GuestMemory, never mutates it."""
        mem = getattr(self._host, "mem", None)
        return mem if isinstance(mem, GuestMemory) else None

    # -- requests ----------------------------------------------------------------------
    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        self.stats.requests += 1
        reader = ChainReader(chain.readable)
        data = reader.read(min(reader.remaining, MAX_REQUEST))
        if self.recovery.is_replay(queue_index, chain.head, data):
            # applied (and saved) by the previous process, unanswered: answer it
            hdr, resp, payload = _header_or_none(data), Resp.OK_NODATA, b""
        else:
            hdr, resp, payload = self.serve(data, cursor_queue=queue_index == CURSORQ,
                                            on_change=lambda: self.recovery.changed(
                                                queue_index, chain.head, data))
        if queue_index == CURSORQ:
            return 0
        out = response(hdr, resp, payload)
        writer = ChainWriter(chain.writable)
        if writer.remaining < len(out):
            self.stats.short_chains += 1
            log.debug("queue %d: %d-byte response does not fit %d bytes", queue_index,
                      len(out), writer.remaining)
            return 0
        writer.write(out)
        return len(out)

    def serve(self, data: bytes, cursor_queue: bool = False,
              on_change: Callable[[], None] | None = None
              ) -> tuple[Header | None, Resp, bytes]:
        """One request's bytes to (its header, the response type, the payload);
        ``on_change`` runs after a request that changed the table."""
        hdr: Header | None = None
        try:
            hdr = parse_header(data)
            hdr, cmd = parse_command(data, cursor_queue)
            resp, payload = self._handlers[type(cmd)](cmd)
        except GpuError as exc:
            self.stats.errors += 1
            log.debug("gpu request %s: %s", hdr, exc)
            return hdr, exc.resp, b""
        if on_change is not None and isinstance(cmd, CHANGING):
            on_change()
        return hdr, resp, payload

    def _display_info(self, cmd: Command) -> Result:
        return Resp.OK_DISPLAY_INFO, display_info(self.table.modes())

    def _edid(self, cmd: Command) -> Result:
        assert isinstance(cmd, GetEdid)
        return Resp.OK_EDID, edid_payload(self.table.edid(cmd.scanout_id))

    def _create(self, cmd: Command) -> Result:
        assert isinstance(cmd, ResourceCreate2D)
        self.table.create_2d(cmd.resource_id, cmd.format, cmd.width, cmd.height)
        return Resp.OK_NODATA, b""

    def _unref(self, cmd: Command) -> Result:
        assert isinstance(cmd, ResourceUnref)
        self.table.unref(cmd.resource_id)
        return Resp.OK_NODATA, b""

    def _set_scanout(self, cmd: Command) -> Result:
        assert isinstance(cmd, SetScanout)
        self.table.set_scanout(cmd.scanout_id, cmd.resource_id, cmd.rect)
        return Resp.OK_NODATA, b""

    def _flush(self, cmd: Command) -> Result:
        assert isinstance(cmd, ResourceFlush)
        self.table.flush(cmd.resource_id, cmd.rect)
        return Resp.OK_NODATA, b""

    def _transfer(self, cmd: Command) -> Result:
        assert isinstance(cmd, TransferToHost2D)
        self.table.transfer_to_host_2d(cmd.resource_id, cmd.rect, cmd.offset)
        return Resp.OK_NODATA, b""

    def _attach(self, cmd: Command) -> Result:
        assert isinstance(cmd, AttachBacking)
        self.table.attach_backing(cmd.resource_id, cmd.entries)
        return Resp.OK_NODATA, b""

    def _detach(self, cmd: Command) -> Result:
        assert isinstance(cmd, DetachBacking)
        self.table.detach_backing(cmd.resource_id)
        return Resp.OK_NODATA, b""

    def _update_cursor(self, cmd: Command) -> Result:
        assert isinstance(cmd, UpdateCursor)
        self.stats.cursor_updates += 1
        self.table.update_cursor(cmd.pos.scanout_id, cmd.pos.x, cmd.pos.y, cmd.resource_id,
                                 cmd.hot_x, cmd.hot_y)
        return Resp.OK_NODATA, b""

    def _move_cursor(self, cmd: Command) -> Result:
        assert isinstance(cmd, MoveCursor)
        self.table.move_cursor(cmd.pos.scanout_id, cmd.pos.x, cmd.pos.y)
        return Resp.OK_NODATA, b""


def _header_or_none(data: bytes) -> Header | None:
    try:
        return parse_header(data)
    except GpuError:
        return None
