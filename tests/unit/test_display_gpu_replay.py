"""Linux's virtio_gpu driver, replayed: the command sequence QEMU traced
while the dvmm test guest's driver brought up its fbdev console
(``tests/data/virtio_gpu_linux_console.trace``, recorded by
``tests/dvmm_testing/gpu_trace.py``) drives a real display process through
the synthetic vhost-user frontend, with backing pages holding a picture the
test made; a VNC client must capture exactly that picture.

The trace names resources, formats, sizes, scanout and flush rectangles; the
backing entries and transfer rectangles it lacks are the test's (shuffled
4 KiB pages, whole-resource transfers).  Each 8x16 flush is the console's
cursor blink: the test toggles that cell in guest memory before the
transfer, as the driver's framebuffer does.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from dvmm_display.gpu_protocol import CTRL_HDR, MEM_ENTRY, Cmd, Resp
from dvmm_shared.synthetic import SyntheticVM
from dvmm_testing.gpu_trace import TraceCmd, parse
from dvmm_testing.rfbclient import DESKTOP_SIZE, RfbClient

from .test_display_gpu_e2e import expect_ok, gpu_vm, request

TRACE = Path(__file__).parents[1] / "data" / "virtio_gpu_linux_console.trace"
B8G8R8X8 = 2
__all__ = ["gpu_vm"]  # the fixture, used by name


class Guest:
    """The guest side of the replay: the resource's picture and its pages."""

    def __init__(self, vm: SyntheticVM) -> None:
        self.vm = vm
        self.width = self.height = 0
        self.picture = bytearray()
        self.pages: list[int] = []

    def create(self, w: int, h: int) -> None:
        rnd = random.Random(w * h)
        self.width, self.height = w, h
        self.picture = bytearray(rnd.randbytes(w * h * 4))
        self.picture[3::4] = bytes(w * h)  # X
        self.pages = [self.vm.alloc(4096) for _ in range(len(self.picture) // 4096)]
        rnd.shuffle(self.pages)  # as a guest's page allocator hands them out
        self.store()

    def store(self) -> None:
        for i, page in enumerate(self.pages):
            self.vm.mem.write(page, bytes(self.picture[i * 4096:(i + 1) * 4096]))

    def toggle(self, x: int, y: int, w: int, h: int) -> None:
        """Invert a cell (the console's cursor blink)."""
        stride = self.width * 4
        for row in range(y, y + h):
            start = row * stride + x * 4
            cell = self.picture[start:start + w * 4]
            self.picture[start:start + w * 4] = bytes(
                0 if i % 4 == 3 else b ^ 0xFF for i, b in enumerate(cell))
        self.store()


def replay(vm: SyntheticVM, guest: Guest, cmd: TraceCmd) -> None:
    f = cmd.fields
    if cmd.name == "cmd_get_edid":
        out = request(vm, struct.pack("<I4x", f["scanout"]), Cmd.GET_EDID, reply=8 + 1024)
        assert CTRL_HDR.unpack_from(out)[0] == Resp.OK_EDID
    elif cmd.name == "cmd_get_display_info":
        out = request(vm, b"", Cmd.GET_DISPLAY_INFO, reply=16 * 24)
        assert CTRL_HDR.unpack_from(out)[0] == Resp.OK_DISPLAY_INFO
        x, y, w, h, enabled, _ = struct.unpack_from("<6I", out, CTRL_HDR.size)
        assert enabled and (x, y, w, h) == (0, 0, 1024, 768)  # what QEMU announced too
    elif cmd.name == "cmd_res_create_2d":
        assert f["fmt"] == B8G8R8X8
        guest.create(f["w"], f["h"])
        expect_ok(request(vm, struct.pack("<IIII", f["res"], f["fmt"], f["w"], f["h"]),
                          Cmd.RESOURCE_CREATE_2D))
    elif cmd.name == "cmd_res_back_attach":
        entries = b"".join(MEM_ENTRY.pack(p, 4096) for p in guest.pages)
        expect_ok(request(vm, struct.pack("<II", f["res"], len(guest.pages)) + entries,
                          Cmd.RESOURCE_ATTACH_BACKING))
    elif cmd.name == "cmd_set_scanout":
        expect_ok(request(vm, struct.pack("<6I", f["x"], f["y"], f["w"], f["h"], f["id"],
                                          f["res"]), Cmd.SET_SCANOUT))
    elif cmd.name == "cmd_res_xfer_toh_2d":
        expect_ok(request(vm, struct.pack("<IIIIQI4x", 0, 0, guest.width, guest.height, 0,
                                          f["res"]), Cmd.TRANSFER_TO_HOST_2D))
    elif cmd.name == "cmd_res_flush":
        expect_ok(request(vm, struct.pack("<IIIII4x", f["x"], f["y"], f["w"], f["h"],
                                          f["res"]), Cmd.RESOURCE_FLUSH))
    else:
        pytest.fail(f"the trace has a command this replay does not know: {cmd}")


def test_trace_is_a_linux_console_bring_up() -> None:
    names = [c.name for c in parse(TRACE.read_text())]
    assert names[:5] == ["cmd_get_edid", "cmd_get_display_info", "cmd_res_create_2d",
                         "cmd_res_back_attach", "cmd_set_scanout"]
    assert names.count("cmd_res_flush") >= 3
    with pytest.raises(ValueError, match="not a virtio_gpu trace line"):
        parse("virtio_blk_req_complete 1\n")


def test_linux_driver_sequence_shows_the_guest_picture(gpu_vm: tuple[SyntheticVM, int]) -> None:
    vm, port = gpu_vm
    guest = Guest(vm)
    cmds = parse(TRACE.read_text())
    blinks = 0
    for i, cmd in enumerate(cmds):
        after = cmds[i + 1] if i + 1 < len(cmds) else None
        if (cmd.name == "cmd_res_xfer_toh_2d" and after is not None
                and after.name == "cmd_res_flush" and (after.fields["w"], after.fields["h"])
                == (8, 16)):
            guest.toggle(after.fields["x"], after.fields["y"], 8, 16)
            blinks += 1
        replay(vm, guest, cmd)
    assert blinks >= 2 and (guest.width, guest.height) == (1024, 768)
    with RfbClient("127.0.0.1", port) as c:
        c.set_encodings(DESKTOP_SIZE)
        c.request()
        c.read_update()
        assert (c.width, c.height) == (guest.width, guest.height)
        assert bytes(c.screen) == guest.picture
