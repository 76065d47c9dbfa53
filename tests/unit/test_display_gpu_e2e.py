"""virtio-gpu 2D end to end: a real display process, its control queue driven
through the synthetic vhost-user frontend with a driver's command sequence
(as Linux's virtio-gpu DRM driver issues it for its first framebuffer), and
a VNC client that must capture the picture the test put in the backing pages."""

from __future__ import annotations

import os
import random
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dvmm_display.gpu_protocol import CTRL_HDR, MEM_ENTRY, VIRTIO_GPU_FLAG_FENCE, Cmd, Resp
from dvmm_shared.control import command
from dvmm_shared.driver import Buf
from dvmm_shared.procs import log_tail, spawn, stop
from dvmm_shared.synthetic import SyntheticVM
from dvmm_shared.virtio import VIRTIO_F_VERSION_1, bit
from dvmm_testing.rfbclient import DESKTOP_SIZE, RfbClient

W, H = 256, 192


@pytest.fixture
def gpu_vm(tmp_path: Path) -> Iterator[tuple[SyntheticVM, int]]:
    sock, control, log = tmp_path / "gpu.sock", f"ipc://{tmp_path}/d.ctl", tmp_path / "log"
    proc = spawn([sys.executable, "-m", "dvmm_display", "--socket", str(sock), "--vnc",
                  "127.0.0.1:0", "--control", control], log)
    vm = SyntheticVM(mem_size=8 << 20)
    try:
        deadline = time.monotonic() + 20
        while not (sock.exists() and os.path.exists(control[6:])) and proc.poll() is None:
            assert time.monotonic() < deadline, "the display process did not listen"
            time.sleep(0.02)
        assert proc.poll() is None, log_tail(log)
        vm.connect(str(sock), bit(VIRTIO_F_VERSION_1), num_queues=2)
        yield vm, command(control, "stats")["device"]["vnc"]["port"]
    finally:
        vm.close()
        assert stop(proc) == 0, log_tail(log)


def request(vm: SyntheticVM, body: bytes, cmd: int, fence: int = 0, reply: int = 0) -> bytes:
    """Post one control request, wait for it; the response bytes."""
    data = CTRL_HDR.pack(cmd, VIRTIO_GPU_FLAG_FENCE if fence else 0, fence, 0, 0) + body
    req, resp = vm.alloc(len(data), 16), vm.alloc(CTRL_HDR.size + reply, 16)
    vm.mem.write(req, data)
    ring = vm.rings[0]
    ring.queue.add([Buf(req, len(data)), Buf(resp, CTRL_HDR.size + reply, write=True)])
    ring.kick_if_needed()
    ((_, written),) = ring.wait_used()
    return vm.mem.read(resp, written)


def expect_ok(out: bytes, fence: int = 0) -> None:
    kind, flags, fence_id, _, _ = CTRL_HDR.unpack_from(out)
    assert kind == Resp.OK_NODATA, hex(kind)
    assert (flags & VIRTIO_GPU_FLAG_FENCE, fence_id) == ((1, fence) if fence else (0, 0))


def test_driver_sequence_reaches_the_vnc_client(gpu_vm: tuple[SyntheticVM, int]) -> None:
    vm, port = gpu_vm
    info = request(vm, b"", Cmd.GET_DISPLAY_INFO, reply=16 * 24)
    assert CTRL_HDR.unpack_from(info)[0] == Resp.OK_DISPLAY_INFO
    edid = request(vm, struct.pack("<I4x", 0), Cmd.GET_EDID, reply=8 + 1024)
    assert CTRL_HDR.unpack_from(edid)[0] == Resp.OK_EDID
    # the framebuffer: shuffled 4 KiB pages, as a guest's page allocator hands them out
    rnd = random.Random(10)
    picture = bytearray(rnd.randbytes(W * H * 4))
    picture[3::4] = bytes(W * H)
    pages = [vm.alloc(4096) for _ in range(len(picture) // 4096)]
    rnd.shuffle(pages)
    for i, page in enumerate(pages):
        vm.mem.write(page, picture[i * 4096:(i + 1) * 4096])
    entries = b"".join(MEM_ENTRY.pack(p, 4096) for p in pages)
    expect_ok(request(vm, struct.pack("<IIII", 1, 2, W, H), Cmd.RESOURCE_CREATE_2D))  # B8G8R8X8
    expect_ok(request(vm, struct.pack("<II", 1, len(pages)) + entries,
                      Cmd.RESOURCE_ATTACH_BACKING))
    expect_ok(request(vm, struct.pack("<IIIIII", 0, 0, W, H, 0, 1), Cmd.SET_SCANOUT))
    expect_ok(request(vm, struct.pack("<IIIIQI4x", 0, 0, W, H, 0, 1), Cmd.TRANSFER_TO_HOST_2D))
    expect_ok(request(vm, struct.pack("<IIIII4x", 0, 0, W, H, 1), Cmd.RESOURCE_FLUSH, fence=7),
              fence=7)
    with RfbClient("127.0.0.1", port) as c:
        c.set_encodings(DESKTOP_SIZE)
        c.request()
        c.read_update()
        assert (c.width, c.height) == (W, H) and bytes(c.screen) == picture
        # a bad request fails alone; the device keeps serving
        bad = request(vm, struct.pack("<IIIII4x", 0, 0, W + 1, H, 1), Cmd.RESOURCE_FLUSH)
        assert CTRL_HDR.unpack_from(bad)[0] == Resp.ERR_INVALID_PARAMETER
        # the guest draws a line, transfers and flushes it: an incremental update
        picture[(100 * W) * 4:(101 * W) * 4] = b"\xff\xff\xff\x00" * W
        vm.mem.write(pages[100 * W * 4 // 4096] + (100 * W * 4) % 4096,
                     picture[(100 * W) * 4:(101 * W) * 4])
        expect_ok(request(vm, struct.pack("<IIIIQI4x", 0, 100, W, 1, 100 * W * 4, 1),
                          Cmd.TRANSFER_TO_HOST_2D))
        expect_ok(request(vm, struct.pack("<IIIII4x", 0, 100, W, 1, 1), Cmd.RESOURCE_FLUSH))
        c.request(incremental=True)
        rects = c.read_update()
        assert [(r.y, r.height) for r in rects] == [(64, 64)]
        assert bytes(c.screen) == picture
