"""Fuzz target ``virtio-gpu``: a hostile driver's control and cursor commands.

Each input is a sequence of virtio-gpu requests (virtio 1.2 5.7.6) served by
the real :class:`~dvmm_display.device.GpuDevice` through ``handle_chain``,
as its ring service does: every command type (and unknown ones), headers
with fences and contexts, resource ids that exist, were freed or never
were, formats, sizes up to and past the limits, rectangles and transfer
offsets around the resource's edges, backing entries (counts up to and past
QEMU's, addresses in and out of guest memory, lengths that sum past the
cap), cursor images and moves on every scanout; requests split across
descriptors or cut short, response buffers too small; and between them the
device's other inputs: a display-size change, a config write, a reset.

An error response is a refusal.  Anything raised is a crash; the resource
memory cap bounds what an input may allocate (the run's RSS limit checks it).
"""

from __future__ import annotations

import selectors
import struct
from collections.abc import Callable, Sequence
from typing import Any

from ._atheris import Provider, provider
from .hostile import FdGuard, choose, pick
from .virtqueue import BUF_BASE, MEM_SIZE, Guest

MAX_COMMANDS = 24
_SIZES = [1, 64, 640, 480, 1024, 4096, 16384, 0, 16385]
_IDS = [1, 2, 3, 0, 0xFFFFFFFF]


class FakeHost:
    """The device's view of the vhost-user session: guest memory, nothing else."""

    def __init__(self, mem: Any) -> None:
        self.mem = mem

    def watch(self, fd: int, events: int, callback: Callable[[], None]) -> None:
        pass

    def unwatch(self, fd: int, events: int = selectors.EVENT_READ) -> None:
        pass

    def service_queue(self, index: int) -> None:
        pass

    def submit_chains(self, index: int, queue: Any, start: Any) -> bool:
        return False

    def complete(self, index: int, done: Sequence[tuple[int, int]]) -> None:
        pass

    def config_changed(self) -> bool:
        return False


def _rect(p: Provider) -> bytes:
    return struct.pack("<IIII", pick(p, [0, 1, 63, 639], 32), pick(p, [0, 1, 479], 32),
                       pick(p, [1, 64, 640, 0, 16384], 32), pick(p, [1, 64, 480, 0], 32))


def _body(p: Provider, cmd: int) -> bytes:
    """The fields after the header, laid out for ``cmd`` with hostile values."""
    from dvmm_display.gpu_protocol import Cmd, Format

    rid = pick(p, _IDS, 32)
    scanout = pick(p, [0, 1, 15, 16], 32)
    if cmd == Cmd.RESOURCE_CREATE_2D:
        fmt = pick(p, [int(f) for f in Format] + [0, 200], 32)
        return struct.pack("<IIII", rid, fmt, pick(p, _SIZES, 32), pick(p, _SIZES, 32))
    if cmd in (Cmd.RESOURCE_UNREF, Cmd.RESOURCE_DETACH_BACKING):
        return struct.pack("<I4x", rid)
    if cmd == Cmd.GET_EDID:
        return struct.pack("<I4x", scanout)
    if cmd == Cmd.SET_SCANOUT:
        return _rect(p) + struct.pack("<II", scanout, pick(p, [*_IDS[:3], 0], 32))
    if cmd == Cmd.RESOURCE_FLUSH:
        return _rect(p) + struct.pack("<I4x", rid)
    if cmd == Cmd.TRANSFER_TO_HOST_2D:
        return _rect(p) + struct.pack("<QI4x", pick(p, [0, 4, 2560, 1 << 32]), rid)
    if cmd == Cmd.RESOURCE_ATTACH_BACKING:
        count = choose(p, 5)
        entries = b"".join(struct.pack("<QI4x", pick(p, [BUF_BASE, 0, MEM_SIZE - 4096, MEM_SIZE]),
                                       pick(p, [4096, 0x10000, 1, 0, 1 << 31], 32))
                           for _ in range(count))
        return struct.pack("<II", rid, pick(p, [count, count + 1, 0, 16385], 32)) + entries
    if cmd in (Cmd.UPDATE_CURSOR, Cmd.MOVE_CURSOR):
        return struct.pack("<III4xIII4x", scanout, pick(p, [0, 10, 1 << 31], 32),
                           pick(p, [0, 10], 32), rid, pick(p, [0, 63, 64], 32),
                           pick(p, [0, 63, 64], 32))
    return p.ConsumeBytes(choose(p, 32))


def _request(p: Provider) -> tuple[bytes, int]:
    """One request's bytes and its queue (0 control, 1 cursor)."""
    from dvmm_display.gpu_protocol import CTRL_HDR, Cmd

    codes = [int(c) for c in Cmd]
    cmd = codes[choose(p, len(codes))] if p.ConsumeIntInRange(0, 15) else pick(p, [], 32)
    hdr = CTRL_HDR.pack(cmd, pick(p, [0, 1, 3], 32), pick(p, [0, 1]), pick(p, [0, 1], 32),
                        pick(p, [0, 1], 8))
    data = hdr + _body(p, cmd)
    if not p.ConsumeIntInRange(0, 7):  # cut short, or trailing bytes
        data = data[:choose(p, len(data) + 1)] + p.ConsumeBytes(choose(p, 8))
    cursor = cmd in (Cmd.UPDATE_CURSOR, Cmd.MOVE_CURSOR)
    return data, (1 if cursor else 0) if p.ConsumeIntInRange(0, 7) else choose(p, 2)


def _chain(p: Provider, head: int, data: bytes) -> Any:
    from dvmm_shared.virtqueue import DescriptorChain

    cut = choose(p, len(data) + 1) if p.ConsumeBool() else len(data)
    readable = [memoryview(bytearray(part)) for part in (data[:cut], data[cut:]) if part]
    room = pick(p, [24, 408, 1048, 0, 23], 12)
    return DescriptorChain(head, readable, [memoryview(bytearray(room))])


def _one(p: Provider, guest: Guest, guard: FdGuard) -> None:
    from dvmm_display.device import GpuDevice

    guest.mem.write(BUF_BASE, p.ConsumeBytes(choose(p, 4096)))  # backing page contents
    device = GpuDevice((640, 480))
    device.attach(FakeHost(guest.mem))
    device.queue_started(0)
    for head in range(MAX_COMMANDS):
        if not p.remaining_bytes():
            break
        side = choose(p, 16)
        if side == 0:
            device.set_display_size(pick(p, [800, 1, 640], 16) or 1, pick(p, [600, 1], 16) or 1)
        elif side == 1:
            device.set_config(pick(p, [4, 0, 8], 8), p.ConsumeBytes(pick(p, [4, 0, 8], 4)))
        elif side == 2:
            device.reset()
        else:
            data, queue = _request(p)
            device.handle_chain(queue, _chain(p, head, data))
    device.reset()
    guard.check()


def target(arg: str, work: str) -> Callable[[bytes], None]:
    guest, guard = Guest(), FdGuard()
    return lambda data: _one(provider(data), guest, guard)
