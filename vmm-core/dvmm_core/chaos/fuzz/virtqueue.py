"""Fuzz targets ``virtqueue-blk|net``: a hostile driver's rings and requests.

Each input lays out guest memory as a hostile guest would: a descriptor
table (addresses, lengths, flags, next indexes, near the valid values and
anywhere), an available ring (index jumps, heads out of range), an indirect
table, and the buffers the descriptors point at, whose first bytes are a
device request -- a virtio-blk header (type, sector) with discard/write-zeroes
segments and data, or a virtio-net header + frame on the TX queue, a
control-queue command, and frames arriving on the link for the RX queue.
Then the real device serves the ring the way the daemon does
(:meth:`~dvmm_shared.vhost_user.session.Session.service`: ``process_queue``
through :func:`~dvmm_shared.vhost_user.vring.serve_chains`, then the
notification check), several passes, with event-idx and indirect
descriptors on or off.

A bad chain is returned used with 0 bytes and a broken ring raises
``RingError`` (the session stops that ring): both are refusals.  Anything
else raised is a crash, as is a pass that never ends.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

from ._atheris import Provider, provider
from .hostile import FdGuard, choose, pick

MEM_SIZE = 0x20000
RING_BASE = 0x1000
INDIRECT_AT = 0x3000
BUF_BASE = 0x4000
IMAGE_SIZE = 1 << 20
_DESC = struct.Struct("<QIHH")
MAX_PASSES = 8


class Guest:
    """Guest memory (one memfd region) written by the input."""

    def __init__(self) -> None:
        from dvmm_shared.memory import GuestMemory, memfd_region

        fd, region = memfd_region(MEM_SIZE)
        os.close(fd)  # the mapping keeps it
        self.mem = GuestMemory([region])

    def lay_out(self, p: Provider, size: int) -> Any:
        """Descriptor table, indirect table, available ring; the ring layout."""
        from dvmm_shared.driver import ring_layout

        layout = ring_layout(RING_BASE, size)
        self.mem.write(0, bytes(MEM_SIZE))
        for i in range(min(size, 16)):
            self.mem.write(layout.desc_addr + 16 * i, _desc(p, size))
        self.mem.write(INDIRECT_AT, b"".join(_desc(p, 16) for _ in range(choose(p, 17))))
        heads = [pick(p, [0, 1, 2, size - 1, size], 16) for _ in range(choose(p, 9))]
        ring = layout.avail_addr
        self.mem.write(ring, struct.pack("<H", pick(p, [0, 1], 16)))  # flags
        for i, head in enumerate(heads):
            self.mem.write(ring + 4 + 2 * (i % size), struct.pack("<H", head))
        self.mem.write(ring + 2, struct.pack("<H", pick(p, [len(heads), 0, size + 1], 16)))
        return layout

    def fill(self, p: Provider, addr: int, data: bytes) -> None:
        self.mem.write(addr, data[:MEM_SIZE - addr])


def _desc(p: Provider, size: int) -> bytes:
    addr = pick(p, [BUF_BASE, BUF_BASE + 16, BUF_BASE + 0x200, BUF_BASE + 0x1000,
                    INDIRECT_AT, MEM_SIZE - 1, MEM_SIZE])
    length = pick(p, [1, 16, 512, 0x1000, 0, 0x10000], 32)
    flags = pick(p, [0, 1, 2, 3, 4, 5], 16)
    nxt = pick(p, list(range(min(size, 4))), 16)
    return _DESC.pack(addr, length, flags, nxt)


def serve(device: Any, index: int, queue: Any) -> None:
    """What the session's ``service`` does with a kicked ring, bounded."""
    from dvmm_shared.vhost_user.backend import QueueStats
    from dvmm_shared.vhost_user.vring import serve_chains
    from dvmm_shared.virtqueue import RingError

    stats = QueueStats()

    def serve_one(i: int, q: Any) -> bool:
        return serve_chains(device, i, q, stats)

    try:
        for _ in range(MAX_PASSES):
            pushed = device.process_queue(index, queue, serve_one)
            if pushed:
                queue.needs_notification()
            if not queue.enable_notification():
                return
    except RingError:  # refused: the session marks the ring broken
        return


def _queue(p: Provider, guest: Guest, features_ok: bool = True) -> Any:
    from dvmm_shared.virtqueue import SplitQueue

    size = pick(p, [1, 2, 4, 8, 16, 256], 8) or 1
    size = 1 << (size.bit_length() - 1)  # the session allows powers of two only
    layout = guest.lay_out(p, min(size, 1024))
    return SplitQueue(guest.mem, layout, last_avail_idx=pick(p, [0, 0xFFFF], 16),
                      event_idx=p.ConsumeBool(), indirect=p.ConsumeBool())


# -- virtio-blk -------------------------------------------------------------------------
def _blk_request(p: Provider) -> bytes:
    from dvmm_shared.virtio import VirtioBlkReqType as T

    rtype = pick(p, [int(t) for t in T], 32)
    sector = pick(p, [0, 1, IMAGE_SIZE // 512 - 1, IMAGE_SIZE // 512, 1 << 60])
    segs = b"".join(struct.pack("<QII", pick(p, [0, 8, IMAGE_SIZE // 512 - 1]),
                                pick(p, [1, 8, 0, 1 << 20], 32), pick(p, [0, 1, 2], 32))
                    for _ in range(choose(p, 3)))
    return struct.pack("<IIQ", rtype, 0, sector) + segs + p.ConsumeBytes(choose(p, 600))


def blk_target(work: str) -> Callable[[bytes], None]:
    from dvmm_blk.device import BlkDevice
    from dvmm_blk.disk import RawDisk

    image = os.path.join(work, "disk.img")
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    device = BlkDevice(RawDisk(image, lock=False), serial="fuzz")
    guest, guard = Guest(), FdGuard()

    def one(data: bytes) -> None:
        p = provider(data)
        queue = _queue(p, guest)
        for addr in (BUF_BASE, BUF_BASE + 0x200, BUF_BASE + 0x1000):
            guest.fill(p, addr, _blk_request(p))
        serve(device, 0, queue)
        queue.release()
        guard.check()

    return one


# -- virtio-net -------------------------------------------------------------------------
def net_target(work: str) -> Callable[[bytes], None]:
    from dvmm_net.device import NetDevice

    from .vhost import SocketLink

    link = SocketLink()
    device = NetDevice(link, mac=bytes.fromhex("525400123456"))
    guest, guard = Guest(), FdGuard()

    def one(data: bytes) -> None:
        p = provider(data)
        offered = device.features()
        device.reset()
        device.set_features(offered & pick(p, [offered, 0, offered & ~(1 << 15)]))
        index = choose(p, 3)  # RX, TX, control
        queue = _queue(p, guest)
        for addr in (BUF_BASE, BUF_BASE + 0x200, BUF_BASE + 0x1000):
            guest.fill(p, addr, p.ConsumeBytes(choose(p, 200)))
        device.queue_started(index)
        for _ in range(choose(p, 3)):  # frames from the link, for the RX queue
            try:
                link.peer.send(p.ConsumeBytes(pick(p, [14, 60, 1514, 0, 70000], 17)))
            except OSError:
                pass
        serve(device, index, queue)
        device.queue_stopped(index)
        _drain(link)
        queue.release()
        guard.check()

    return one


def _drain(link: Any) -> None:
    for sock in (link.dev, link.peer):
        try:
            while True:
                sock.recv(1 << 17)
        except OSError:
            pass


def target(name: str, work: str) -> Callable[[bytes], None]:
    return blk_target(work) if name == "blk" else net_target(work)
