"""The split virtqueue, driver side: what a guest driver does to a ring.

Used by the unit tests (a test queue for every device's tests), by the
synthetic frontends of the benchmarks, and by anything that needs to play
guest.  It lays a ring out in a :class:`GuestMemory` region, posts buffers
(direct or through an indirect table), and reaps used elements.  It also lets
tests write raw, hostile descriptors.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .memory import GuestMemory
from .virtio import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_SIZE,
    VIRTQ_USED_ELEM_SIZE,
)
from .virtqueue import RingLayout, memory_fence, vring_need_event

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


def ring_layout(base: int, size: int) -> RingLayout:
    """A compact layout of a ring of ``size`` entries starting at ``base``."""
    desc = base
    avail = desc + VIRTQ_DESC_SIZE * size
    used = (avail + 6 + 2 * size + 3) & ~3
    return RingLayout(size, desc, avail, used)


def ring_bytes(size: int) -> int:
    lay = ring_layout(0, size)
    return lay.used_addr + 6 + VIRTQ_USED_ELEM_SIZE * size


@dataclass(frozen=True)
class Buf:
    """One buffer a driver posts: guest address, length, device-writable or not."""

    addr: int
    length: int
    write: bool = False


class DriverQueue:
    """Driver side of a split ring; descriptors are allocated from a free list."""

    def __init__(self, mem: GuestMemory, layout: RingLayout, *, event_idx: bool = False) -> None:
        self.mem = mem
        self.layout = layout
        self.size = layout.size
        self.event_idx = event_idx
        self.avail_idx = 0
        self.last_used = 0
        self._free = list(range(self.size))
        self._chains: dict[int, list[int]] = {}
        self._kicked_at = 0
        zero = bytes(layout.used_addr + 6 + VIRTQ_USED_ELEM_SIZE * self.size - layout.desc_addr)
        mem.write(layout.desc_addr, zero)

    # -- ring words shared with the device --------------------------------
    # The device reads and writes these while the driver runs, so each must be
    # one 16-bit load or store.  Measured on CPython 3.11: struct.pack_into
    # with "<H" stores the two bytes one at a time, and bytes(view) may load
    # them one at a time (memcpy), so either can tear at a carry (0x00FF ->
    # 0x0100 read as 0x0000 or 0x01FF) and a torn used index reaps garbage.
    # A memoryview cast to "H" loads and stores the halfword whole.  Ring
    # words are little-endian (virtio 1.x); so is every host dvmm runs on.
    def _u16(self, addr: int) -> int:
        return int(self.mem.slice(addr, 2).cast("H")[0])

    def _put_u16(self, addr: int, value: int) -> None:
        self.mem.slice(addr, 2).cast("H")[0] = value & 0xFFFF

    # -- raw access, for hostile tests ------------------------------------
    def write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(self.layout.desc_addr + VIRTQ_DESC_SIZE * index,
                       _DESC.pack(addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        """Put ``head`` in the available ring and advance the index."""
        slot = self.avail_idx % self.size
        self._put_u16(self.layout.avail_addr + 4 + 2 * slot, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self._put_u16(self.layout.avail_addr + 2, idx)

    def set_avail_flags(self, flags: int) -> None:
        self._put_u16(self.layout.avail_addr, flags)

    def set_used_event(self, idx: int) -> None:
        self._put_u16(self.layout.avail_addr + 4 + 2 * self.size, idx)

    # -- normal driver operations -----------------------------------------
    def add(self, bufs: Sequence[Buf], *, indirect_at: int | None = None,
            publish: bool = True) -> int:
        """Post a chain; with ``indirect_at`` the descriptors go in a table there."""
        if indirect_at is not None:
            head = self._alloc(1)[0]
            for i, b in enumerate(bufs):
                flags = (VIRTQ_DESC_F_WRITE if b.write else 0) | (
                    VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0)
                self.mem.write(indirect_at + VIRTQ_DESC_SIZE * i,
                               _DESC.pack(b.addr, b.length, flags, i + 1))
            self.write_desc(head, indirect_at, VIRTQ_DESC_SIZE * len(bufs),
                            VIRTQ_DESC_F_INDIRECT, 0)
            self._chains[head] = [head]
        else:
            ids = self._alloc(len(bufs))
            for i, (idx, b) in enumerate(zip(ids, bufs, strict=True)):
                last = i + 1 == len(bufs)
                flags = (VIRTQ_DESC_F_WRITE if b.write else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
                self.write_desc(idx, b.addr, b.length, flags, 0 if last else ids[i + 1])
            head = ids[0]
            self._chains[head] = ids
        if publish:
            self.publish(head)
        return head

    def _alloc(self, n: int) -> list[int]:
        if n == 0 or n > len(self._free):
            raise RuntimeError(f"driver queue: cannot allocate {n} descriptors")
        ids, self._free = self._free[:n], self._free[n:]
        return ids

    @property
    def free_descriptors(self) -> int:
        return len(self._free)

    def used_idx(self) -> int:
        return self._u16(self.layout.used_addr + 2)

    def get_used(self) -> list[tuple[int, int]]:
        """Reap all new used elements as ``(head, written_len)``; frees descriptors."""
        out: list[tuple[int, int]] = []
        # The used_event the last call published must be visible before the
        # used index is read again, or driver and device can both miss the
        # other's store and nobody notifies (the driver half of 2.7.10).
        memory_fence()
        end = self.used_idx()
        while self.last_used != end:
            slot = self.last_used % self.size
            head, written = _USED_ELEM.unpack(self.mem.read(
                self.layout.used_addr + 4 + VIRTQ_USED_ELEM_SIZE * slot, VIRTQ_USED_ELEM_SIZE))
            self._free.extend(self._chains.pop(head, []))
            out.append((head, written))
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            self.set_used_event(self.last_used)
        return out

    def avail_event(self) -> int:
        off = self.layout.used_addr + 4 + VIRTQ_USED_ELEM_SIZE * self.size
        return self._u16(off)

    def used_flags(self) -> int:
        return self._u16(self.layout.used_addr)

    def should_kick(self) -> bool:
        """Whether the device asked for a notification for what we published."""
        old, self._kicked_at = self._kicked_at, self.avail_idx
        memory_fence()  # the new available index before avail_event is read (2.7.10)
        if self.event_idx:
            return vring_need_event(self.avail_event(), self.avail_idx, old)
        return not self.used_flags() & 1
