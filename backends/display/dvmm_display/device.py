"""The virtio-gpu device as a vhost-user backend (virtio 1.2 section 5.7).

Owns what the device advertises (device id 16: a control queue and a
cursor queue, ``struct virtio_gpu_config``) and what a request on either
queue gets back.  Until the 2D command set is served here, every request
is answered with ``VIRTIO_GPU_RESP_ERR_UNSPEC`` in a response header (5.7.6.7),
so a driver that does use the queues sees a clean failure, not a hang.

The connection also brings guest memory (SET_MEM_TABLE), which is what the
ramfb scanout reads even when the machine has no virtio-gpu function:
:meth:`GpuDevice.memory` is the current session's :class:`GuestMemory`.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from dvmm_shared.chain import ChainShortError, ChainWriter
from dvmm_shared.memory import GuestMemory
from dvmm_shared.vhost_user.backend import BackendHost, VhostUserBackend
from dvmm_shared.virtio import VIRTIO_F_VERSION_1, bit
from dvmm_shared.virtqueue import DescriptorChain

log = logging.getLogger("dvmm.display")

VIRTIO_ID_GPU = 16
CONTROLQ, CURSORQ = 0, 1
NUM_SCANOUTS = 1
# struct virtio_gpu_config (5.7.4): events_read, events_clear, num_scanouts, num_capsets.
CONFIG = struct.Struct("<IIII")
# struct virtio_gpu_ctrl_hdr (5.7.6.7): type, flags, fence_id, ctx_id, ring_idx, padding.
CTRL_HDR = struct.Struct("<IIQIB3x")
VIRTIO_GPU_RESP_ERR_UNSPEC = 0x1200


@dataclass
class GpuStats:
    requests: int = 0
    unsupported: int = 0
    short_chains: int = 0


class GpuDevice(VhostUserBackend):
    """virtio-gpu over vhost-user; the session's memory feeds the scanout."""

    max_queue_size = 1024

    def __init__(self) -> None:
        self.stats = GpuStats()
        self.events_read = 0
        self._host: BackendHost | None = None

    @property
    def num_queues(self) -> int:
        return 2

    def features(self) -> int:
        return bit(VIRTIO_F_VERSION_1)

    def get_config(self, offset: int, size: int) -> bytes:
        data = CONFIG.pack(self.events_read, 0, NUM_SCANOUTS, 0)
        return data[offset:offset + size].ljust(size, b"\0")

    def set_config(self, offset: int, data: bytes) -> None:
        # events_clear (offset 4) is the only driver-writable field (5.7.4).
        if offset == 4 and len(data) == 4:
            self.events_read &= ~int.from_bytes(data, "little")

    def attach(self, host: BackendHost) -> None:
        self._host = host

    def memory(self) -> GuestMemory | None:
        """The last frontend's guest memory (None before the first one; empty
        once it reset or left, as the session clears it).  Safe from other
        threads: the session replaces its GuestMemory, never mutates it."""
        mem = getattr(self._host, "mem", None)
        return mem if isinstance(mem, GuestMemory) else None

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        self.stats.requests += 1
        self.stats.unsupported += 1
        writer = ChainWriter(chain.writable)
        try:
            writer.write(CTRL_HDR.pack(VIRTIO_GPU_RESP_ERR_UNSPEC, 0, 0, 0, 0))
        except ChainShortError:
            self.stats.short_chains += 1
            return 0
        return CTRL_HDR.size
