"""virtio-gpu 2D (virtio 1.2 5.7.6): the pure command parser, the resource
table and the device's request service, with every value checked and the
spec's error response for each bad one."""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from dvmm_display.device import GpuDevice
from dvmm_display.edid import build_edid, preferred_mode
from dvmm_display.gpu_protocol import (
    BGR_OFFSETS,
    CTRL_HDR,
    MEM_ENTRY,
    VIRTIO_GPU_FLAG_FENCE,
    Cmd,
    Format,
    GpuError,
    Resp,
    parse_command,
    response,
)
from dvmm_shared.memory import GuestMemory, memfd_region
from hypothesis import given, settings
from hypothesis import strategies as st

MEM = 4 << 20


@dataclass
class Host:
    mem: GuestMemory


@pytest.fixture
def gpu() -> Iterator[GpuDevice]:
    fd, region = memfd_region(MEM)
    dev = GpuDevice(size=(640, 480))
    dev.attach(Host(GuestMemory([region])))  # type: ignore[arg-type]
    yield dev
    os.close(fd)


def hdr(cmd: int, fence: int | None = None) -> bytes:
    flags = VIRTIO_GPU_FLAG_FENCE if fence is not None else 0
    return CTRL_HDR.pack(cmd, flags, fence or 0, 0, 0)


def create(rid: int, fmt: int, w: int, h: int) -> bytes:
    return hdr(Cmd.RESOURCE_CREATE_2D) + struct.pack("<IIII", rid, fmt, w, h)


def attach(rid: int, entries: list[tuple[int, int]], count: int | None = None) -> bytes:
    n = len(entries) if count is None else count
    return (hdr(Cmd.RESOURCE_ATTACH_BACKING) + struct.pack("<II", rid, n)
            + b"".join(MEM_ENTRY.pack(a, ln) for a, ln in entries))


def transfer(rid: int, x: int, y: int, w: int, h: int, offset: int) -> bytes:
    return hdr(Cmd.TRANSFER_TO_HOST_2D) + struct.pack("<IIIIQI4x", x, y, w, h, offset, rid)


def set_scanout(sid: int, rid: int, x: int, y: int, w: int, h: int) -> bytes:
    return hdr(Cmd.SET_SCANOUT) + struct.pack("<IIIIII", x, y, w, h, sid, rid)


def flush(rid: int, x: int, y: int, w: int, h: int) -> bytes:
    return hdr(Cmd.RESOURCE_FLUSH) + struct.pack("<IIIII4x", x, y, w, h, rid)


def rid_only(cmd: int, rid: int) -> bytes:
    return hdr(cmd) + struct.pack("<I4x", rid)


def ok(dev: GpuDevice, data: bytes, resp: Resp = Resp.OK_NODATA) -> bytes:
    _, got, payload = dev.serve(data)
    assert got is resp
    return payload


def fails(dev: GpuDevice, data: bytes, resp: Resp) -> None:
    before = (dict(dev.table.resources), dev.table.used)
    _, got, payload = dev.serve(data)
    assert got is resp and payload == b""
    assert (dict(dev.table.resources), dev.table.used) == before


def scattered(dev: GpuDevice, data: bytes, seed: int) -> list[tuple[int, int]]:
    """Write ``data`` into guest memory as 4 KiB pieces in shuffled pages."""
    mem = dev.memory()
    assert mem is not None
    pages = list(range(16, MEM // 4096))
    random.Random(seed).shuffle(pages)
    entries = []
    for i in range(0, len(data), 4096):
        addr = pages[i // 4096] * 4096
        mem.write(addr, data[i:i + 4096])
        entries.append((addr, len(data[i:i + 4096])))
    return entries


@pytest.mark.parametrize("fmt", list(Format))
def test_a_driver_sequence_presents_the_picture(gpu: GpuDevice, fmt: Format) -> None:
    w, h = 100, 60
    rnd = random.Random(int(fmt))
    pixels = rnd.randbytes(w * h * 4)
    ok(gpu, create(7, fmt, w, h))
    ok(gpu, attach(7, scattered(gpu, pixels, int(fmt))))
    ok(gpu, transfer(7, 0, 0, w, h, 0))
    ok(gpu, set_scanout(0, 7, 0, 0, w, h))
    frame = gpu.table.presented()
    assert frame is not None and (frame.width, frame.height) == (w, h)
    b, g, r = BGR_OFFSETS[fmt]
    src, out = pixels, frame.pixels
    assert out[0::4] == src[b::4] and out[1::4] == src[g::4] and out[2::4] == src[r::4]


def test_partial_transfer_then_flush(gpu: GpuDevice) -> None:
    w, h = 80, 40
    ok(gpu, create(1, Format.B8G8R8X8_UNORM, w, h))
    first = bytes(w * h * 4)
    ok(gpu, attach(1, scattered(gpu, first, 1)))
    ok(gpu, transfer(1, 0, 0, w, h, 0))
    ok(gpu, set_scanout(0, 1, 0, 0, w, h))
    shown = gpu.table.presented()
    # the guest draws a 10x5 box at (20, 30) in its backing, transfers only that
    new = bytearray(first)
    for y in range(30, 35):
        new[(y * w + 20) * 4:(y * w + 30) * 4] = b"\x10\x20\x30\x00" * 10
    ok(gpu, rid_only(Cmd.RESOURCE_DETACH_BACKING, 1))
    ok(gpu, attach(1, scattered(gpu, bytes(new), 2)))
    ok(gpu, transfer(1, 20, 30, 10, 5, (30 * w + 20) * 4))
    assert gpu.table.presented() is shown  # nothing presented before the flush
    ok(gpu, flush(1, 20, 30, 10, 5))
    frame = gpu.table.presented()
    assert frame is not None and frame.pixels == bytes(new)


def test_display_info_and_edid(gpu: GpuDevice) -> None:
    payload = ok(gpu, hdr(Cmd.GET_DISPLAY_INFO), Resp.OK_DISPLAY_INFO)
    assert len(payload) == 16 * 24
    assert struct.unpack_from("<IIIIII", payload) == (0, 0, 640, 480, 1, 0)
    assert struct.unpack_from("<IIIIII", payload, 24)[4] == 0  # scanout 1 disabled
    payload = ok(gpu, hdr(Cmd.GET_EDID) + struct.pack("<I4x", 0), Resp.OK_EDID)
    (size,) = struct.unpack_from("<I", payload)
    edid = payload[8:8 + size]
    assert size == 128 and len(payload) == 8 + 1024
    assert sum(edid) % 256 == 0 and edid[:8] == b"\x00\xff\xff\xff\xff\xff\xff\x00"
    assert preferred_mode(edid) == (640, 480)
    fails(gpu, hdr(Cmd.GET_EDID) + struct.pack("<I4x", 1), Resp.ERR_INVALID_SCANOUT_ID)


@given(st.integers(1, 5000), st.integers(1, 5000))
def test_edid_checksums_and_modes(w: int, h: int) -> None:
    edid = build_edid(w, h)
    assert len(edid) == 128 and sum(edid) % 256 == 0
    assert preferred_mode(edid) == (min(w, 4095), min(h, 4095))


def test_fence_is_echoed(gpu: GpuDevice) -> None:
    head, resp, _ = gpu.serve(hdr(Cmd.RESOURCE_CREATE_2D, fence=99)
                              + struct.pack("<IIII", 3, 1, 4, 4))
    out = response(head, resp)
    assert CTRL_HDR.unpack(out) == (Resp.OK_NODATA, VIRTIO_GPU_FLAG_FENCE, 99, 0, 0)
    head, resp, _ = gpu.serve(hdr(Cmd.RESOURCE_UNREF, fence=5) + struct.pack("<I4x", 1234))
    assert CTRL_HDR.unpack(response(head, resp))[:3] == (Resp.ERR_INVALID_RESOURCE_ID,
                                                         VIRTIO_GPU_FLAG_FENCE, 5)


def test_bad_values_get_the_spec_errors(gpu: GpuDevice) -> None:
    ok(gpu, create(1, Format.B8G8R8A8_UNORM, 16, 16))
    E = Resp
    fails(gpu, create(0, 1, 4, 4), E.ERR_INVALID_RESOURCE_ID)
    fails(gpu, create(1, 1, 4, 4), E.ERR_INVALID_RESOURCE_ID)  # in use
    fails(gpu, create(2, 5, 4, 4), E.ERR_INVALID_PARAMETER)  # no such format
    fails(gpu, create(2, 1, 0, 4), E.ERR_INVALID_PARAMETER)
    fails(gpu, create(2, 1, 1 << 31, 4), E.ERR_INVALID_PARAMETER)
    fails(gpu, create(2, 1, 8192, 8192), E.ERR_OUT_OF_MEMORY)  # 256 MiB + the first one
    fails(gpu, attach(9, [(0x10000, 4096)]), E.ERR_INVALID_RESOURCE_ID)
    fails(gpu, attach(1, [(MEM - 100, 4096)]), E.ERR_UNSPEC)  # not guest memory
    fails(gpu, attach(1, [], count=0), E.ERR_INVALID_PARAMETER)
    fails(gpu, attach(1, [(0x10000, 4096)], count=3), E.ERR_UNSPEC)  # entries missing
    fails(gpu, attach(1, [(0x10000, 4096)], count=1 << 20), E.ERR_INVALID_PARAMETER)
    fails(gpu, transfer(1, 0, 0, 16, 16, 0), E.ERR_UNSPEC)  # no backing yet
    ok(gpu, attach(1, [(0x10000, 1024)]))
    fails(gpu, attach(1, [(0x10000, 1024)]), E.ERR_UNSPEC)  # backing attached already
    fails(gpu, transfer(1, 0, 0, 17, 16, 0), E.ERR_INVALID_PARAMETER)
    fails(gpu, transfer(1, 15, 0, 2, 1, 0), E.ERR_INVALID_PARAMETER)
    fails(gpu, transfer(1, 0, 0, 0, 1, 0), E.ERR_INVALID_PARAMETER)
    fails(gpu, transfer(1, 0, 0, 16, 16, 4), E.ERR_INVALID_PARAMETER)  # past the backing
    fails(gpu, transfer(1, 0, 0, 4, 1, (1 << 64) - 1), E.ERR_INVALID_PARAMETER)
    fails(gpu, set_scanout(1, 1, 0, 0, 16, 16), E.ERR_INVALID_SCANOUT_ID)
    fails(gpu, set_scanout(0, 9, 0, 0, 16, 16), E.ERR_INVALID_RESOURCE_ID)
    fails(gpu, set_scanout(0, 1, 8, 8, 9, 8), E.ERR_INVALID_PARAMETER)
    fails(gpu, set_scanout(0, 1, 0xFFFFFFFF, 0, 2, 2), E.ERR_INVALID_PARAMETER)  # no wrap
    fails(gpu, flush(1, 0, 0, 32, 1), E.ERR_INVALID_PARAMETER)
    fails(gpu, flush(9, 0, 0, 1, 1), E.ERR_INVALID_RESOURCE_ID)
    fails(gpu, rid_only(Cmd.RESOURCE_UNREF, 9), E.ERR_INVALID_RESOURCE_ID)
    fails(gpu, rid_only(Cmd.RESOURCE_DETACH_BACKING, 9), E.ERR_INVALID_RESOURCE_ID)
    fails(gpu, hdr(0x0199), E.ERR_UNSPEC)  # unknown command
    fails(gpu, hdr(Cmd.GET_CAPSET_INFO), E.ERR_UNSPEC)  # no 3D: no capsets
    fails(gpu, create(5, 1, 4, 4)[:30], E.ERR_UNSPEC)  # short
    fails(gpu, b"\x01\x01", E.ERR_UNSPEC)


def test_unref_darkens_its_scanout_and_frees_memory(gpu: GpuDevice) -> None:
    ok(gpu, create(1, Format.B8G8R8X8_UNORM, 8, 8))
    assert gpu.table.used == 256
    ok(gpu, set_scanout(0, 1, 0, 0, 8, 8))
    assert gpu.table.presented() is not None
    ok(gpu, rid_only(Cmd.RESOURCE_UNREF, 1))
    assert gpu.table.presented() is None and gpu.table.used == 0
    ok(gpu, create(1, Format.B8G8R8X8_UNORM, 8, 8))  # the id is free again
    ok(gpu, set_scanout(0, 1, 0, 0, 8, 8))
    ok(gpu, set_scanout(0, 0, 0, 0, 0, 0))  # resource 0: scanout disabled
    assert gpu.table.presented() is None


def cursor_cmd(cmd: int, sid: int, x: int, y: int, rid: int = 0, hx: int = 0,
               hy: int = 0) -> bytes:
    return hdr(cmd) + struct.pack("<III4xIII4x", sid, x, y, rid, hx, hy)


def test_cursor_queue(gpu: GpuDevice) -> None:
    ok(gpu, create(2, Format.B8G8R8A8_UNORM, 64, 64))
    img = bytearray(64 * 64 * 4)
    img[3::4] = bytes([255 if i % 64 < 10 else 0 for i in range(64 * 64)])  # left 10 columns
    ok(gpu, attach(2, scattered(gpu, bytes(img), 3)))
    ok(gpu, transfer(2, 0, 0, 64, 64, 0))
    _, resp, _ = gpu.serve(cursor_cmd(Cmd.UPDATE_CURSOR, 0, 5, 6, 2, 1, 2), cursor_queue=True)
    assert resp is Resp.OK_NODATA
    cur = gpu.table.cursor
    assert cur is not None and (cur.width, cur.height, cur.hot_x, cur.hot_y) == (64, 64, 1, 2)
    assert cur.mask[:8] == b"\xff\xc0" + bytes(6)
    gpu.serve(cursor_cmd(Cmd.MOVE_CURSOR, 0, 50, 60), cursor_queue=True)
    assert gpu.table.cursor_pos == (50, 60)
    _, resp, _ = gpu.serve(cursor_cmd(Cmd.UPDATE_CURSOR, 0, 0, 0, 2, 64, 0), cursor_queue=True)
    assert resp is Resp.ERR_INVALID_PARAMETER  # hotspot outside
    _, resp, _ = gpu.serve(cursor_cmd(Cmd.MOVE_CURSOR, 3, 0, 0), cursor_queue=True)
    assert resp is Resp.ERR_INVALID_SCANOUT_ID
    assert gpu.serve(cursor_cmd(Cmd.MOVE_CURSOR, 0, 1, 1))[1] is Resp.ERR_UNSPEC  # control q
    gpu.serve(cursor_cmd(Cmd.UPDATE_CURSOR, 0, 0, 0, 0), cursor_queue=True)
    assert gpu.table.cursor is None


@given(st.binary(max_size=200), st.booleans())
def test_random_requests_parse_or_fail_with_a_response_type(data: bytes, cursor: bool) -> None:
    try:
        parse_command(data, cursor)
    except GpuError as exc:
        assert exc.resp in Resp


u32 = st.integers(0, 0xFFFFFFFF)
requests = st.one_of(
    st.builds(create, st.integers(0, 4), st.sampled_from([1, 2, 3, 5, 67, 134]),
              st.integers(0, 70), st.integers(0, 70)),
    st.builds(lambda r, a, n: attach(r, [(a, n)]), st.integers(0, 4),
              st.integers(0, MEM), st.integers(0, 40000)),
    st.builds(transfer, st.integers(0, 4), st.integers(0, 80), st.integers(0, 80),
              st.integers(0, 80), st.integers(0, 80), st.integers(0, 30000)),
    st.builds(set_scanout, st.integers(0, 1), st.integers(0, 4), st.integers(0, 80),
              st.integers(0, 80), st.integers(0, 80), st.integers(0, 80)),
    st.builds(flush, st.integers(0, 4), u32, u32, u32, u32),
    st.builds(rid_only, st.sampled_from([Cmd.RESOURCE_UNREF, Cmd.RESOURCE_DETACH_BACKING]),
              st.integers(0, 4)),
)


@settings(deadline=None, max_examples=60)
@given(st.lists(requests, max_size=30))
def test_random_command_sequences_keep_the_table_consistent(cmds: list[bytes]) -> None:
    fd, region = memfd_region(MEM)
    try:
        dev = GpuDevice(size=(64, 64))
        dev.attach(Host(GuestMemory([region])))  # type: ignore[arg-type]
        for data in cmds:
            _, resp, _ = dev.serve(data)
            assert resp in Resp
            t = dev.table
            assert t.used == sum(len(r.pixels) for r in t.resources.values()) <= t.memory_cap
            s = t.scanouts[0]
            assert (s.frame is None) or s.resource_id in t.resources
    finally:
        os.close(fd)
