"""The frontend's copy of a backend's in-flight region (vhost-user
"Inflight I/O tracking").

Owns the memfd a backend returned for GET_INFLIGHT_FD: the core keeps it
for the life of the device so that a restarted backend gets the *same*
region back with SET_INFLIGHT_FD and finds what its predecessor was in the
middle of.  The core never writes the region while a backend serves it; it
only zeroes it between driver sessions (a device reset means nothing is in
flight any more) and counts the in-flight descriptors for the event stream.

Layout per queue (split rings), as the spec gives it: a 16-byte header
``{u64 features; u16 version; u16 desc_num; u16 last_batch_head;
u16 used_idx}`` then ``desc_num`` 16-byte ``DescStateSplit`` whose first
byte is the ``inflight`` flag.  Queues are ``mmap_size / num_queues`` apart.
Everything in it was written by a backend, so it is read defensively.
"""

from __future__ import annotations

import mmap
import os
import struct

from dvmm_shared.vhost_user.message import InflightInfo

HEADER = struct.Struct("<QHHHH")
DESC_STATE_SIZE = 16
MAX_REGION = 64 << 20


class InflightRegionError(Exception):
    """The backend's in-flight description cannot be mapped."""


class InflightRegion:
    def __init__(self, fd: int, info: InflightInfo) -> None:
        if not 0 < info.mmap_size <= MAX_REGION or info.num_queues == 0:
            os.close(fd)
            raise InflightRegionError(f"in-flight region of {info.mmap_size} bytes for "
                                      f"{info.num_queues} queue(s)")
        self.fd, self.info = fd, info
        try:
            self._map = mmap.mmap(fd, info.mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=info.mmap_offset)
        except (OSError, ValueError) as exc:
            os.close(fd)
            raise InflightRegionError(f"cannot map the in-flight region: {exc}") from None
        self.stride = info.mmap_size // info.num_queues

    def in_flight(self) -> int:
        """How many descriptors the backend marked in flight, over all queues."""
        total = 0
        for q in range(self.info.num_queues):
            base = q * self.stride
            _, version, desc_num, _, _ = HEADER.unpack_from(self._map, base)
            if not version:
                continue
            count = min(desc_num, (self.stride - HEADER.size) // DESC_STATE_SIZE)
            first = base + HEADER.size
            total += sum(1 for i in range(count) if self._map[first + i * DESC_STATE_SIZE])
        return total

    def clear(self) -> None:
        """A new driver session: nothing is in flight (the region reads as new)."""
        self._map[:] = bytes(len(self._map))

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)
