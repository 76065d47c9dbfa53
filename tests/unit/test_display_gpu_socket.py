"""VHOST_USER_GPU_SET_SOCKET: dvmm's display process speaks vhost-user-gpu to
its frontend (QEMU docs/interop/vhost-user-gpu.rst) while its own VNC keeps
working.

QEMU 7.2 refuses vhost-user-gpu-pci under TCG ("requires kvm") and no Linux
boots under this machine's KVM, so QEMU's side of the socket is played here
by :class:`QemuGpuPeer`, written from the spec: it answers
GET_PROTOCOL_FEATURES and GET_DISPLAY_INFO, and paints SCANOUT/UPDATE
messages onto a canvas the way QEMU's display does.  The display process is
real and is driven through the synthetic vhost-user frontend with a
driver's command sequence.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dvmm_display.gpu_protocol import CTRL_HDR, MEM_ENTRY, Cmd, Resp
from dvmm_shared.control import command
from dvmm_shared.driver import Buf
from dvmm_shared.procs import log_tail, spawn, stop
from dvmm_shared.synthetic import SyntheticVM
from dvmm_shared.vhost_user.message import Request
from dvmm_shared.virtio import VIRTIO_F_VERSION_1, bit
from dvmm_testing.rfbclient import RfbClient

from .test_display_gpu_e2e import expect_ok, request

HDR = struct.Struct("=III")
REPLY = 1 << 2
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_DISPLAY_INFO = 1, 2, 3
CURSOR_POS, CURSOR_POS_HIDE, CURSOR_UPDATE, SCANOUT, UPDATE = 4, 5, 6, 7, 8
W, H = 256, 128  # what "QEMU" prefers (its GET_DISPLAY_INFO answer)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@dataclass
class QemuGpuPeer:
    """QEMU's end of the vhost-user-gpu socket, per the spec."""

    sock: socket.socket
    features_offered: int = 0x5
    messages: list[tuple[int, bytes]] = field(default_factory=list)
    features_set: int | None = None
    scanout: tuple[int, int] = (0, 0)
    canvas: bytearray = field(default_factory=bytearray)
    cursor: tuple[int, int, int, int, bytes] | None = None
    cursor_pos: tuple[int, int] | None = None
    reply_flags: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _run(self) -> None:
        try:
            while True:
                request, flags, size = HDR.unpack(self._exact(HDR.size))
                payload = self._exact(size)
                self.reply_flags += bool(flags & REPLY)  # the back-end sends requests only
                with self.lock:
                    self.messages.append((request, payload))
                    self._handle(request, payload)
        except (EOFError, OSError):
            return

    def _reply(self, request: int, payload: bytes) -> None:
        self.sock.sendall(HDR.pack(request, REPLY, len(payload)) + payload)

    def _handle(self, request: int, payload: bytes) -> None:
        if request == GET_PROTOCOL_FEATURES:
            self._reply(request, self.features_offered.to_bytes(8, "little"))
        elif request == SET_PROTOCOL_FEATURES:
            self.features_set = int.from_bytes(payload, "little")
        elif request == GET_DISPLAY_INFO:  # struct virtio_gpu_resp_display_info
            modes = struct.pack("=IIIIII", 0, 0, W, H, 1, 0) + bytes(24 * 15)
            self._reply(request, CTRL_HDR.pack(Resp.OK_DISPLAY_INFO, 0, 0, 0, 0) + modes)
        elif request == SCANOUT:
            _, w, h = struct.unpack("=III", payload)
            self.scanout, self.canvas = (w, h), bytearray(w * h * 4)
        elif request == UPDATE:
            _, x, y, w, h = struct.unpack_from("=IIIII", payload)
            data = payload[20:]
            assert len(data) == w * h * 4
            sw = self.scanout[0]
            for row in range(h):
                o = ((y + row) * sw + x) * 4
                self.canvas[o:o + w * 4] = data[row * w * 4:(row + 1) * w * 4]
        elif request == CURSOR_UPDATE:
            self.cursor = (*struct.unpack_from("=IIIII", payload)[1:], payload[20:])
        elif request in (CURSOR_POS, CURSOR_POS_HIDE):
            self.cursor_pos = struct.unpack_from("=III", payload)[1:]

    def kinds(self) -> list[int]:
        with self.lock:
            return [k for k, _ in self.messages]


@dataclass
class Rig:
    vm: SyntheticVM
    peer: QemuGpuPeer
    control: str
    port: int

    def stats(self) -> dict[str, Any]:
        device: dict[str, Any] = command(self.control, "stats")["device"]
        return device


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    sock, control, log = tmp_path / "gpu.sock", f"ipc://{tmp_path}/d.ctl", tmp_path / "log"
    proc = spawn([sys.executable, "-m", "dvmm_display", "--socket", str(sock), "--vnc",
                  "127.0.0.1:0", "--control", control], log)
    vm = SyntheticVM(mem_size=8 << 20)
    qemu_end, backend_end = socket.socketpair()
    try:
        wait_for(lambda: (sock.exists() and os.path.exists(control[6:]))
                 or proc.poll() is not None, "the display process to listen")
        assert proc.poll() is None, log_tail(log)
        vm.connect(str(sock), bit(VIRTIO_F_VERSION_1), num_queues=2)
        peer = QemuGpuPeer(qemu_end)
        peer.start()
        assert vm.frontend is not None
        vm.frontend._send(Request.GPU_SET_SOCKET, b"", [backend_end.fileno()])
        backend_end.close()
        yield Rig(vm, peer, control, command(control, "stats")["device"]["vnc"]["port"])
    finally:
        vm.close()
        qemu_end.close()
        status = stop(proc)
        print(log_tail(log))
        assert status == 0, log_tail(log)


def draw(vm: SyntheticVM, w: int, h: int) -> tuple[bytearray, list[int]]:
    rnd = random.Random(w)
    picture = bytearray(rnd.randbytes(w * h * 4))
    picture[3::4] = bytes(w * h)
    pages = [vm.alloc(4096) for _ in range(len(picture) // 4096)]
    rnd.shuffle(pages)
    store(vm, picture, pages)
    return picture, pages


def store(vm: SyntheticVM, picture: bytearray, pages: list[int]) -> None:
    for i, page in enumerate(pages):
        vm.mem.write(page, bytes(picture[i * 4096:(i + 1) * 4096]))


def vnc_capture(port: int) -> bytes:
    with RfbClient("127.0.0.1", port) as vnc:
        vnc.request(incremental=False)
        vnc.read_update()
        return bytes(vnc.screen)


def test_the_frontend_sees_what_the_driver_draws_and_vnc_too(rig: Rig) -> None:
    vm, peer = rig.vm, rig.peer
    wait_for(lambda: GET_DISPLAY_INFO in peer.kinds(), "the opening")
    assert peer.kinds()[:3] == [GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_DISPLAY_INFO]
    assert peer.features_set == 0  # no protocol feature is defined yet: none acked

    def display() -> tuple[int, int]:
        info = request(vm, b"", Cmd.GET_DISPLAY_INFO, reply=16 * 24)
        w, h = struct.unpack_from("<II", info, CTRL_HDR.size + 8)
        return w, h

    wait_for(lambda: display() == (W, H), "the frontend's preferred size")
    picture, pages = draw(vm, W, H)
    expect_ok(request(vm, struct.pack("<IIII", 1, 2, W, H), Cmd.RESOURCE_CREATE_2D))
    entries = b"".join(MEM_ENTRY.pack(p, 4096) for p in pages)
    expect_ok(request(vm, struct.pack("<II", 1, len(pages)) + entries,
                      Cmd.RESOURCE_ATTACH_BACKING))
    rect = struct.pack("<IIII", 0, 0, W, H)
    expect_ok(request(vm, rect + struct.pack("<QI4x", 0, 1), Cmd.TRANSFER_TO_HOST_2D))
    expect_ok(request(vm, rect + struct.pack("<II", 0, 1), Cmd.SET_SCANOUT))
    wait_for(lambda: bytes(peer.canvas) == bytes(picture), "the frontend's canvas")
    assert peer.scanout == (W, H)
    assert vnc_capture(rig.port) == bytes(picture)
    assert peer.reply_flags == 0
    # a partial change: only its rectangle travels
    picture[(10 * W + 20) * 4:(10 * W + 60) * 4] = b"\x11\x22\x33\x00" * 40
    store(vm, picture, pages)
    part = struct.pack("<IIII", 20, 10, 40, 1)
    expect_ok(request(vm, part + struct.pack("<QI4x", (10 * W + 20) * 4, 1),
                      Cmd.TRANSFER_TO_HOST_2D))
    expect_ok(request(vm, part + struct.pack("<I4x", 1), Cmd.RESOURCE_FLUSH))
    wait_for(lambda: bytes(peer.canvas) == bytes(picture), "the partial update")
    with peer.lock:
        last = [p for k, p in peer.messages if k == UPDATE][-1]
    assert struct.unpack_from("=IIIII", last) == (0, 20, 10, 40, 1)
    assert vnc_capture(rig.port) == bytes(picture)


def test_cursor_messages(rig: Rig) -> None:
    vm, peer = rig.vm, rig.peer
    wait_for(lambda: GET_DISPLAY_INFO in peer.kinds(), "the opening")
    cursor = vm.alloc(64 * 64 * 4)
    vm.mem.write(cursor, bytes([1, 2, 3, 0x80]) * (64 * 64))  # B8G8R8A8
    expect_ok(request(vm, struct.pack("<IIII", 7, 1, 64, 64), Cmd.RESOURCE_CREATE_2D))
    expect_ok(request(vm, struct.pack("<II", 7, 1) + MEM_ENTRY.pack(cursor, 64 * 64 * 4),
                      Cmd.RESOURCE_ATTACH_BACKING))
    expect_ok(request(vm, struct.pack("<IIII", 0, 0, 64, 64) + struct.pack("<QI4x", 0, 7),
                      Cmd.TRANSFER_TO_HOST_2D))
    cursorq = vm.rings[1]
    for body, cmd in ((struct.pack("<IIIIIIII", 0, 30, 40, 0, 7, 5, 6, 0), Cmd.UPDATE_CURSOR),
                      (struct.pack("<IIIIIIII", 0, 31, 41, 0, 0, 0, 0, 0), Cmd.MOVE_CURSOR)):
        data = CTRL_HDR.pack(cmd, 0, 0, 0, 0) + body
        addr = vm.alloc(len(data), 16)
        vm.mem.write(addr, data)
        cursorq.queue.add([Buf(addr, len(data))])
        cursorq.kick_if_needed()
        cursorq.wait_used()
    wait_for(lambda: peer.cursor_pos == (31, 41), "CURSOR_POS")
    assert peer.cursor is not None
    x, y, hot_x, hot_y, image = peer.cursor
    assert (x, y, hot_x, hot_y) == (30, 40, 5, 6)
    assert image == bytes([1, 2, 3, 0x80]) * (64 * 64)  # PIXMAN_a8r8g8b8 = B, G, R, A


def test_a_frontend_breaking_the_protocol_loses_the_socket_only(rig: Rig) -> None:
    vm, peer = rig.vm, rig.peer
    wait_for(lambda: GET_DISPLAY_INFO in peer.kinds(), "the opening")
    peer.sock.sendall(HDR.pack(UPDATE, 0, 4) + b"junk")  # a request, not a reply
    wait_for(lambda: rig.stats()["gpu_socket"]["state"] == "closed", "the socket closed")
    # the device and dvmm's VNC go on
    assert request(vm, b"", Cmd.GET_DISPLAY_INFO, reply=16 * 24)[:4] == struct.pack(
        "<I", Resp.OK_DISPLAY_INFO)
    assert len(vnc_capture(rig.port)) > 0
