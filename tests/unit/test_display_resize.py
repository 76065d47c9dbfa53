"""Display-size changes: a VNC client's SetDesktopSize (the ExtendedDesktopSize
extension) or the ``resize`` command becomes virtio-gpu's config event
(virtio 1.2 5.7.4: VIRTIO_GPU_EVENT_DISPLAY in events_read, cleared through
events_clear), a BACKEND_CONFIG_CHANGE_MSG on the vhost-user back-end
channel, and the new mode in GET_DISPLAY_INFO; the VNC client sees the new
size once the driver shows a scanout of it."""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dvmm_display.device import VIRTIO_GPU_EVENT_DISPLAY, GpuDevice
from dvmm_display.framebuffer import Frame
from dvmm_display.gpu_protocol import CTRL_HDR, MEM_ENTRY, Cmd, Resp
from dvmm_display.rfb import (
    Encoding,
    FramebufferUpdateRequest,
    MessageTooLargeError,
    ResizeStatus,
    RfbError,
    SetDesktopSize,
    parse_client_message,
)
from dvmm_display.session import ClientState, VncSession
from dvmm_shared.control import command
from dvmm_shared.procs import log_tail, spawn, stop
from dvmm_shared.synthetic import DEFAULT_PROTOCOL, SyntheticVM
from dvmm_shared.vhost_user.connection import Connection
from dvmm_shared.vhost_user.message import BackendRequest, ProtocolFeature, Request
from dvmm_shared.virtio import VIRTIO_F_VERSION_1, bit
from dvmm_testing.rfbclient import EXTENDED_DESKTOP_SIZE, RAW, RfbClient

from .test_display_gpu_e2e import expect_ok, request

EXT = int(Encoding.EXTENDED_DESKTOP_SIZE)


def set_desktop_size(w: int, h: int, screens: int = 1) -> bytes:
    return struct.pack(">BxHHBx", 251, w, h, screens) + struct.pack(
        ">IHHHHI", 0, 0, 0, w, h, 0) * screens


# -- the RFB side, sans-IO ------------------------------------------------------------
def test_set_desktop_size_parses_and_is_bounded() -> None:
    msg = set_desktop_size(800, 600)
    assert parse_client_message(msg[:-1]) is None  # a screen still missing
    parsed = parse_client_message(msg + b"\x03")
    assert parsed is not None
    got, used = parsed
    assert used == len(msg) and isinstance(got, SetDesktopSize)
    assert (got.width, got.height, len(got.screens)) == (800, 600, 1)
    with pytest.raises(MessageTooLargeError):
        parse_client_message(set_desktop_size(8, 8, 17))


def normal_session(asked: list[tuple[int, int]], status: int) -> VncSession:
    def resizer(w: int, h: int) -> int:
        asked.append((w, h))
        return status

    s = VncSession(None, "t", sink=None, initial_frame=lambda: Frame.blank(64, 48),  # type: ignore[arg-type]
                   resizer=resizer)
    s.state, s.size = ClientState.NORMAL, (64, 48)
    return s


def ext_rects(s: VncSession) -> list[tuple[int, int, int, int]]:
    """(reason, status, width, height) of the ExtendedDesktopSize rectangles in s.out."""
    out, found = bytes(s.out), []
    for i in range(len(out) - 12):
        if struct.unpack_from(">i", out, i + 8)[0] == EXT:
            found.append(struct.unpack_from(">HHHH", out, i))
    s.out.clear()
    return found


def test_session_announces_answers_and_reports_the_new_size() -> None:
    asked: list[tuple[int, int]] = []
    s = normal_session(asked, ResizeStatus.OK)
    s.feed(struct.pack(">BxHii", 2, 2, 0, EXT))  # SetEncodings Raw, ExtendedDesktopSize
    s.request = FramebufferUpdateRequest(True, 0, 0, 64, 48)
    assert s.make_update(Frame.blank(64, 48), None)
    assert ext_rects(s) == [(0, 0, 64, 48)]  # the server supports it: announced once
    s.feed(set_desktop_size(800, 600))
    assert asked == [(800, 600)]
    s.request = FramebufferUpdateRequest(True, 0, 0, 64, 48)
    assert s.make_update(Frame.blank(64, 48), None)
    assert ext_rects(s) == [(1, ResizeStatus.OK, 64, 48)]  # the answer; size unchanged yet
    s.request = FramebufferUpdateRequest(True, 0, 0, 64, 48)
    assert s.make_update(Frame.blank(800, 600), None)
    assert ext_rects(s) == [(0, 0, 800, 600)]  # the guest followed
    s.feed(set_desktop_size(800, 600, screens=0))
    s.request = FramebufferUpdateRequest(True, 0, 0, 800, 600)
    assert s.make_update(Frame.blank(800, 600), None)
    assert ext_rects(s) == [(1, ResizeStatus.INVALID_LAYOUT, 800, 600)]
    assert asked == [(800, 600)]


def test_set_desktop_size_without_the_extension_drops_the_client() -> None:
    s = normal_session([], ResizeStatus.OK)
    with pytest.raises(RfbError):
        s.feed(set_desktop_size(800, 600))


# -- the device, in process -----------------------------------------------------------
class Host:
    def __init__(self) -> None:
        self.notices = 0

    def config_changed(self) -> bool:
        self.notices += 1
        return True


def test_device_announces_a_size_and_the_driver_clears_the_event() -> None:
    dev = GpuDevice(size=(1024, 768))
    host = Host()
    dev.attach(host)  # type: ignore[arg-type]
    assert dev.request_size(800, 600) == ResizeStatus.PROHIBITED  # no driver yet
    assert dev.request_size(0, 600) == ResizeStatus.INVALID_LAYOUT
    dev.set_display_size(800, 600)
    events_read, events_clear, scanouts, _ = struct.unpack("<IIII", dev.get_config(0, 16))
    assert (events_read, events_clear, scanouts) == (VIRTIO_GPU_EVENT_DISPLAY, 0, 1)
    assert host.notices == 1 and dev.stats.config_events == 1
    _, resp, payload = dev.serve(CTRL_HDR.pack(Cmd.GET_DISPLAY_INFO, 0, 0, 0, 0))
    assert resp == Resp.OK_DISPLAY_INFO
    assert struct.unpack_from("<IIIIII", payload, 0) == (0, 0, 800, 600, 1, 0)
    dev.set_config(4, VIRTIO_GPU_EVENT_DISPLAY.to_bytes(4, "little"))  # events_clear
    assert struct.unpack("<I", dev.get_config(0, 4)) == (0,)
    dev.set_display_size(800, 600)  # the same size: no new event
    assert host.notices == 1 and dev.get_config(0, 4) == bytes(4)


# -- end to end: a display process, the back-end channel, a VNC client ---------------
@dataclass
class Rig:
    vm: SyntheticVM
    channel: Connection
    control: str
    port: int


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    sock, control, log = tmp_path / "gpu.sock", f"ipc://{tmp_path}/d.ctl", tmp_path / "log"
    proc = spawn([sys.executable, "-m", "dvmm_display", "--socket", str(sock), "--vnc",
                  "127.0.0.1:0", "--control", control, "--size", "640x480"], log)
    vm = SyntheticVM(mem_size=8 << 20)
    ours, theirs = socket.socketpair()
    try:
        deadline = time.monotonic() + 20
        while not (sock.exists() and os.path.exists(control[6:])) and proc.poll() is None:
            assert time.monotonic() < deadline, "the display process did not listen"
            time.sleep(0.02)
        assert proc.poll() is None, log_tail(log)
        vm.connect(str(sock), bit(VIRTIO_F_VERSION_1), num_queues=2,
                   protocol=DEFAULT_PROTOCOL | 1 << ProtocolFeature.BACKEND_REQ)
        assert vm.frontend is not None
        vm.frontend._send(Request.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
        theirs.close()
        yield Rig(vm, Connection(ours), control,
                  command(control, "stats")["device"]["vnc"]["port"])
    finally:
        vm.close()
        ours.close()
        assert stop(proc) == 0, log_tail(log)


def display_info(vm: SyntheticVM) -> tuple[int, int]:
    info = request(vm, b"", Cmd.GET_DISPLAY_INFO, reply=16 * 24)
    _, _, w, h, enabled, _ = struct.unpack_from("<IIIIII", info, CTRL_HDR.size)
    assert enabled == 1
    return w, h


def show(vm: SyntheticVM, rid: int, w: int, h: int) -> None:
    """What the driver does after the event: a resource of the new size, shown."""
    pages = vm.alloc(w * h * 4)
    vm.mem.write(pages, bytes([0x40, 0x80, 0xC0, 0]) * (w * h))
    expect_ok(request(vm, struct.pack("<IIII", rid, 2, w, h), Cmd.RESOURCE_CREATE_2D))
    expect_ok(request(vm, struct.pack("<II", rid, 1) + MEM_ENTRY.pack(pages, w * h * 4),
                      Cmd.RESOURCE_ATTACH_BACKING))
    rect = struct.pack("<IIII", 0, 0, w, h)
    expect_ok(request(vm, rect + struct.pack("<II", 0, rid), Cmd.SET_SCANOUT))
    expect_ok(request(vm, rect + struct.pack("<QI4x", 0, rid), Cmd.TRANSFER_TO_HOST_2D))
    expect_ok(request(vm, rect + struct.pack("<I4x", rid), Cmd.RESOURCE_FLUSH))


def events_read(vm: SyntheticVM) -> int:
    assert vm.frontend is not None
    return int.from_bytes(vm.frontend.get_config(0, 4), "little")


def test_vnc_set_desktop_size_reaches_the_driver_and_back(rig: Rig) -> None:
    vm = rig.vm
    assert display_info(vm) == (640, 480)  # --size
    show(vm, 1, 640, 480)
    with RfbClient("127.0.0.1", rig.port) as vnc:
        vnc.set_encodings(RAW, EXTENDED_DESKTOP_SIZE)
        vnc.request(incremental=False)
        rects = vnc.read_update()
        assert (EXTENDED_DESKTOP_SIZE, 0, 0) in [(r.encoding, r.x, r.y) for r in rects]
        vnc.set_desktop_size(800, 600)
        notice = rig.channel.recv(timeout=10)  # BACKEND_CONFIG_CHANGE_MSG
        assert notice.header.request == BackendRequest.CONFIG_CHANGE_MSG
        assert events_read(vm) == VIRTIO_GPU_EVENT_DISPLAY
        assert display_info(vm) == (800, 600)
        assert vm.frontend is not None
        vm.frontend.set_config(4, VIRTIO_GPU_EVENT_DISPLAY.to_bytes(4, "little"))
        assert events_read(vm) == 0
        vnc.request(incremental=True)
        answer = [r for r in vnc.read_update() if r.encoding == EXTENDED_DESKTOP_SIZE]
        assert [(r.x, r.y) for r in answer] == [(1, ResizeStatus.OK)]
        show(vm, 2, 800, 600)
        while (vnc.width, vnc.height) != (800, 600):
            vnc.request(incremental=True)
            vnc.read_update()
        vnc.request(incremental=False)
        vnc.read_update()
        assert bytes(vnc.screen) == bytes([0x40, 0x80, 0xC0, 0]) * (800 * 600)


def test_the_resize_command_is_announced_too(rig: Rig) -> None:
    show(rig.vm, 1, 640, 480)
    reply = command(rig.control, "resize", width=1280, height=720)
    assert (reply["width"], reply["height"], reply["driver"]) == (1280, 720, True)
    assert rig.channel.recv(timeout=10).header.request == BackendRequest.CONFIG_CHANGE_MSG
    assert display_info(rig.vm) == (1280, 720)
    stats = command(rig.control, "stats")["device"]["gpu"]
    assert stats["display"] == [1280, 720] and stats["config_events"] == 1
