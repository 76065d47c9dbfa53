"""A synthetic vhost-user frontend: a "VM" with no CPU, for tests and benchmarks.

Owns a memfd of guest memory, the driver side of each ring laid out in it,
the kick and call eventfds, and a :class:`Frontend` connection that brings
the backend up exactly as a VMM would.  Callers post buffers through
:class:`DriverQueue`, kick, and wait for the call eventfd; the backend under
test is a real process (or thread) speaking the real protocol.
"""

from __future__ import annotations

import os
import select
from dataclasses import dataclass, field

from .driver import DriverQueue, ring_bytes, ring_layout
from .eventfd import EventFd
from .memory import GuestMemory, Region, memfd_region
from .vhost_user.frontend import Frontend, RingSetup
from .vhost_user.message import MemRegion, ProtocolFeature
from .virtio import VIRTIO_F_RING_EVENT_IDX

DEFAULT_PROTOCOL = (1 << ProtocolFeature.MQ | 1 << ProtocolFeature.REPLY_ACK
                    | 1 << ProtocolFeature.CONFIG | 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)


@dataclass
class DriverRing:
    """One ring seen from the driver: the queue plus its notifications."""

    index: int
    queue: DriverQueue
    kick: EventFd
    call: EventFd

    def kick_if_needed(self) -> None:
        if self.queue.should_kick():
            self.kick.signal()

    def wait_used(self, timeout: float = 5.0) -> list[tuple[int, int]]:
        """Reap used elements, waiting on the call eventfd until there are some."""
        used = self.queue.get_used()
        while not used:
            ready, _, _ = select.select([self.call.fd], [], [], timeout)
            if not ready:
                raise TimeoutError(f"ring {self.index}: no completion in {timeout} s")
            self.call.consume()
            used = self.queue.get_used()
        return used


@dataclass
class SyntheticVM:
    """Guest memory with a bump allocator for buffers, and the rings."""

    mem_size: int = 64 << 20
    fd: int = -1
    region: Region | None = None
    mem: GuestMemory = field(default_factory=GuestMemory)
    rings: list[DriverRing] = field(default_factory=list)
    frontend: Frontend | None = None
    _next: int = 0

    def __post_init__(self) -> None:
        self.fd, self.region = memfd_region(self.mem_size)
        self.mem = GuestMemory([self.region])
        self._next = 0x1000

    def alloc(self, size: int, align: int = 4096) -> int:
        addr = (self._next + align - 1) & ~(align - 1)
        if addr + size > self.mem_size:
            raise MemoryError("synthetic VM is out of guest memory")
        self._next = addr + size
        return addr

    def connect(self, socket_path: str, features: int, num_queues: int = 1,
                queue_size: int = 128, event_idx: bool | None = None,
                protocol: int = DEFAULT_PROTOCOL) -> int:
        """Connect and start ``num_queues`` rings; returns the negotiated features.

        ``event_idx`` True/False forces VIRTIO_F_RING_EVENT_IDX in or out of
        ``features``; None leaves ``features`` as given."""
        assert self.region is not None
        if event_idx is not None:
            features = (features | 1 << VIRTIO_F_RING_EVENT_IDX if event_idx
                        else features & ~(1 << VIRTIO_F_RING_EVENT_IDX))
        fe = self.frontend = Frontend.connect(socket_path)
        acked, _ = fe.negotiate(features, protocol)
        # The driver rings must follow what was negotiated (2.7.10): on a
        # mismatch one side waits for notifications the other never sends.
        event_idx = bool(acked & 1 << VIRTIO_F_RING_EVENT_IDX)
        fe.set_mem_table([MemRegion(0, self.mem_size, self.region.user_addr, 0)], [self.fd])
        for i in range(num_queues):
            layout = ring_layout(self.alloc(ring_bytes(queue_size)), queue_size)
            ring = DriverRing(i, DriverQueue(self.mem, layout, event_idx=event_idx),
                              EventFd(), EventFd())
            u = self.region.user_addr
            fe.start_ring(RingSetup(i, queue_size, u + layout.desc_addr, u + layout.avail_addr,
                                    u + layout.used_addr, ring.kick.fd, ring.call.fd))
            self.rings.append(ring)
        return acked

    def close(self) -> None:
        if self.frontend is not None:
            self.frontend.close()
            self.frontend = None
        for ring in self.rings:
            ring.kick.close()
            ring.call.close()
        self.rings.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SyntheticVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
