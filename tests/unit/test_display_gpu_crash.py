"""virtio-gpu crash recovery: SIGKILL the display process, the same screen after.

The dvmm core's own recovery machinery is the frontend: the supervisor runs
``python -m dvmm_display`` (restart policy on) and a :class:`VhostUserLink`
brings the virtio-gpu rings up in a memfd "guest RAM" exactly as a device
of the core does (in-flight region included) and reconnects after a crash.
The test plays the driver: a Linux-like bring-up (display info, a
B8G8R8X8 resource on shuffled guest pages, set scanout, transfer, flush, a
cursor), a VNC capture, SIGKILL, and once the supervisor restarted the
process and the link replayed its setup, a VNC capture that must be equal
-- the guest sends nothing in between.  Also: a request the process applied
and died before answering is answered once, not applied twice; a driver
reset starts from an empty table.
"""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dvmm_core.supervisor import Backend, RestartSpec, Supervisor
from dvmm_core.vhost_user_frontend import QueueStart, RamRegion, VhostUserLink
from dvmm_display.gpu_protocol import CTRL_HDR, MEM_ENTRY, Cmd, Resp
from dvmm_shared.control import command
from dvmm_shared.driver import Buf, DriverQueue, ring_bytes, ring_layout
from dvmm_shared.eventfd import EventFd
from dvmm_shared.memory import GuestMemory, memfd_region
from dvmm_shared.virtio import VIRTIO_F_VERSION_1, bit
from dvmm_testing.rfbclient import RfbClient

from .helpers import EventRecorder

W, H = 320, 240
RAM = 8 << 20
QSIZE = 64
B8G8R8X8, B8G8R8A8 = 2, 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Ring:
    def __init__(self, mem: GuestMemory, index: int, base: int) -> None:
        self.index, self.mem = index, mem
        self.layout = ring_layout(base, QSIZE)
        self.queue = DriverQueue(mem, self.layout)
        self.kick, self.call = EventFd(), EventFd()

    def start_args(self) -> QueueStart:
        lay = self.layout
        return QueueStart(self.index, QSIZE, lay.desc_addr, lay.avail_addr, lay.used_addr,
                          self.kick.fd, self.call.fd)

    def wait_used(self, timeout: float = 20.0) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        used = self.queue.get_used()
        while not used:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self.call.fd], [], [], left)[0], "no completion"
            self.call.consume()
            used = self.queue.get_used()
        return used


@dataclass
class Gpu:
    """The driver's side: guest RAM, the two rings, a bump allocator."""

    mem: GuestMemory
    link: VhostUserLink
    rings: list[Ring]
    events: EventRecorder
    sup: Supervisor
    backend: Backend
    port: int
    next: int = 0x10000

    def alloc(self, size: int, align: int = 4096) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        self.next = addr + size
        assert self.next <= RAM
        return addr

    def post(self, ring: int, cmd: int, body: bytes, reply: int = 0) -> tuple[int, int, int]:
        """Post a request; (head, request address, response address)."""
        data = CTRL_HDR.pack(cmd, 0, 0, 0, 0) + body
        req, resp = self.alloc(len(data), 16), self.alloc(CTRL_HDR.size + reply, 16)
        self.mem.write(req, data)
        head = self.rings[ring].queue.add(
            [Buf(req, len(data)), Buf(resp, CTRL_HDR.size + reply, write=True)])
        self.rings[ring].kick.signal()
        return head, req, resp

    def request(self, cmd: int, body: bytes, reply: int = 0, ring: int = 0) -> int:
        head, _, resp = self.post(ring, cmd, body, reply)
        assert self.rings[ring].wait_used() == [(head, CTRL_HDR.size + reply if ring == 0
                                                 else 0)]
        return int(CTRL_HDR.unpack_from(self.mem.read(resp, CTRL_HDR.size))[0])

    def ok(self, cmd: int, body: bytes, ring: int = 0) -> None:
        resp = self.request(cmd, body, ring=ring)
        assert ring == 1 or resp == Resp.OK_NODATA, hex(resp)

    def display_pid(self) -> int:
        pid = self.backend.pid
        assert pid is not None
        return pid


@pytest.fixture
def gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gpu]:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    events = EventRecorder()
    sup = Supervisor(on_event=events)
    fd, region = memfd_region(RAM)
    mem = GuestMemory([region])
    port = free_port()
    link: VhostUserLink | None = None
    try:
        backend = sup.spawn_python("display0", "dvmm_display", ["--vnc", f"127.0.0.1:{port}"],
                                   restart=RestartSpec(), control=True)
        sup.wait_for_socket(backend, timeout=20)
        link = VhostUserLink("display0", backend.socket,
                             [RamRegion(0, RAM, region.user_addr, fd, 0)], config_size=16,
                             mem=mem, on_event=events)
        link.connect(timeout=10)
        rings = [Ring(mem, 0, 0x1000), Ring(mem, 1, 0x5000)]
        link.start(bit(VIRTIO_F_VERSION_1), [r.start_args() for r in rings])
        yield Gpu(mem, link, rings, events, sup, backend, port)
    finally:
        if link is not None:
            link.close()
        sup.stop_all()
        os.close(fd)


def bring_up(gpu: Gpu) -> bytes:
    """A console's bring-up; the picture (XRGB8888 bytes) it shows."""
    rnd = random.Random(7)
    picture = bytearray(rnd.randbytes(W * H * 4))
    picture[3::4] = bytes(W * H)
    pages = [gpu.alloc(4096) for _ in range(len(picture) // 4096)]
    rnd.shuffle(pages)
    for i, page in enumerate(pages):
        gpu.mem.write(page, bytes(picture[i * 4096:(i + 1) * 4096]))
    assert gpu.request(Cmd.GET_DISPLAY_INFO, b"", reply=16 * 24) == Resp.OK_DISPLAY_INFO
    gpu.ok(Cmd.RESOURCE_CREATE_2D, struct.pack("<IIII", 1, B8G8R8X8, W, H))
    entries = b"".join(MEM_ENTRY.pack(p, 4096) for p in pages)
    gpu.ok(Cmd.RESOURCE_ATTACH_BACKING, struct.pack("<II", 1, len(pages)) + entries)
    rect = struct.pack("<IIII", 0, 0, W, H)
    gpu.ok(Cmd.SET_SCANOUT, rect + struct.pack("<II", 0, 1))
    gpu.ok(Cmd.TRANSFER_TO_HOST_2D, rect + struct.pack("<QI4x", 0, 1))
    gpu.ok(Cmd.RESOURCE_FLUSH, rect + struct.pack("<I4x", 1))
    # a 64x64 cursor resource, shown through the cursor queue
    cursor = gpu.alloc(64 * 64 * 4)
    gpu.mem.write(cursor, bytes([0, 0, 255, 255]) * (64 * 64))
    gpu.ok(Cmd.RESOURCE_CREATE_2D, struct.pack("<IIII", 2, B8G8R8A8, 64, 64))
    gpu.ok(Cmd.RESOURCE_ATTACH_BACKING, struct.pack("<II", 2, 1) + MEM_ENTRY.pack(cursor,
                                                                                  64 * 64 * 4))
    gpu.ok(Cmd.TRANSFER_TO_HOST_2D, struct.pack("<IIII", 0, 0, 64, 64) + struct.pack(
        "<QI4x", 0, 2))
    # struct virtio_gpu_update_cursor: pos {scanout, x, y, pad}, resource, hot x/y, pad
    gpu.ok(Cmd.UPDATE_CURSOR, struct.pack("<IIIIIIII", 0, 10, 20, 0, 2, 3, 4, 0), ring=1)
    return bytes(picture)


def capture(gpu: Gpu) -> tuple[bytes, bool]:
    """The screen a new VNC client gets (first full update), and whether a
    cursor shape came with it."""
    deadline = time.monotonic() + 20
    while True:
        try:
            client = RfbClient("127.0.0.1", gpu.port)
            break
        except OSError:
            assert time.monotonic() < deadline, "the VNC server did not come back"
            time.sleep(0.05)
    with client:
        client.set_encodings(0, -239)  # Raw, Cursor
        client.request(incremental=False)
        while True:
            client.read_update()
            if client.width == W and client.screen != bytes(len(client.screen)):
                return bytes(client.screen), client.cursor is not None
            client.request(incremental=True)


def kill_and_wait(gpu: Gpu, restores: int = 1) -> None:
    os.kill(gpu.display_pid(), signal.SIGKILL)
    gpu.events.wait_for("device-restored", count=restores, timeout=30)


def test_sigkill_then_the_same_screen(gpu: Gpu) -> None:
    picture = bring_up(gpu)
    before, had_cursor = capture(gpu)
    assert before == picture and had_cursor
    first = gpu.display_pid()
    kill_and_wait(gpu)
    assert gpu.display_pid() != first
    after, cursor_after = capture(gpu)
    assert after == before and cursor_after
    # the restored table is the driver's: resource 1 exists, new ones work
    assert gpu.request(Cmd.RESOURCE_CREATE_2D,
                       struct.pack("<IIII", 1, B8G8R8X8, 8, 8)) == Resp.ERR_INVALID_RESOURCE_ID
    gpu.ok(Cmd.RESOURCE_CREATE_2D, struct.pack("<IIII", 3, B8G8R8X8, 8, 8))
    stats = command(gpu.backend.control or "", "stats")["device"]["gpu"]
    assert stats["resources"] == 3 and stats["scanout"] is True


def test_a_request_applied_before_the_crash_is_answered_once(gpu: Gpu) -> None:
    bring_up(gpu)
    control = gpu.backend.control or ""
    command(control, "fault", kind="crash-at", point="before-used")
    head, _, resp = gpu.post(0, Cmd.RESOURCE_CREATE_2D, struct.pack("<IIII", 5, B8G8R8X8, 16, 16))
    gpu.events.wait_for("device-restored", timeout=30)
    assert gpu.rings[0].wait_used() == [(head, CTRL_HDR.size)]
    # OK_NODATA: served from the saved state, not "resource 5 exists"
    assert CTRL_HDR.unpack_from(gpu.mem.read(resp, CTRL_HDR.size))[0] == Resp.OK_NODATA
    assert gpu.request(Cmd.RESOURCE_UNREF, struct.pack("<I4x", 5)) == Resp.OK_NODATA


def test_a_driver_reset_forgets_the_table(gpu: Gpu) -> None:
    bring_up(gpu)
    gpu.link.stop()
    for ring in gpu.rings:  # the driver lays its rings out afresh
        gpu.mem.write(ring.layout.desc_addr, bytes(ring_bytes(QSIZE)))
        ring.queue = DriverQueue(gpu.mem, ring.layout)
    gpu.link.start(bit(VIRTIO_F_VERSION_1), [r.start_args() for r in gpu.rings])
    # a fresh session: resource 1 is free again, also after a crash
    gpu.ok(Cmd.RESOURCE_CREATE_2D, struct.pack("<IIII", 1, B8G8R8X8, 8, 8))
    kill_and_wait(gpu)
    assert gpu.request(Cmd.RESOURCE_CREATE_2D,
                       struct.pack("<IIII", 1, B8G8R8X8, 8, 8)) == Resp.ERR_INVALID_RESOURCE_ID
    gpu.ok(Cmd.RESOURCE_CREATE_2D, struct.pack("<IIII", 2, B8G8R8X8, 8, 8))
