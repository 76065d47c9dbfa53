"""The virtio-blk device: features, config space, and serving one request.

Owns what the device advertises (virtio 1.2 section 5.2: feature bits and
``struct virtio_blk_config``) and the mapping from a parsed request to a disk
operation and a status byte.  Parsing is :mod:`.request`'s, file I/O is
:mod:`.disk`'s, and the rings are the shared daemon's.  With an engine
(:mod:`.engine`) requests are served concurrently and completed out of order
through :mod:`.dispatch`; without one (``sync``) each is served inline.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dvmm_shared.chain import ChainReader, ChainWriter, write_views
from dvmm_shared.vhost_user.backend import BackendHost, VhostUserBackend
from dvmm_shared.virtio import (
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_SECTOR_SIZE,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioBlkStatus,
    bit,
)
from dvmm_shared.virtqueue import DescriptorChain, SplitQueue

from .disk import Disk
from .dispatch import Dispatcher
from .engine import Engine
from .request import (
    BlkRequest,
    BlkRequestError,
    Discard,
    DiskLimits,
    Flush,
    GetId,
    NoStatusByteError,
    Read,
    Segment,
    Write,
    WriteZeroes,
    parse_request,
    parse_simple,
    take_status,
)

log = logging.getLogger("dvmm.blk")

# struct virtio_blk_config up to write_zeroes_may_unmap (5.2.4), 60 bytes:
# capacity, size_max, seg_max, geometry(c,h,s), blk_size, topology(4 fields),
# writeback, unused, num_queues, max_discard_sectors, max_discard_seg,
# discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
# write_zeroes_may_unmap, 3 unused bytes.
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
DEFAULT_QUEUE_SIZE = 128
SEG_MAX = DEFAULT_QUEUE_SIZE - 2  # header and status take two descriptors
DISCARD_ALIGNMENT = 8  # sectors (4 KiB): what hole punching can honour

#: A parsed request: the request, its status byte, the bytes written if it succeeds.
Parsed = tuple[BlkRequest, memoryview, int]
#: A disk call and its arguments; raises OSError.
DiskOp = tuple[Callable[..., Any], tuple[Any, ...]]
#: The same call as ``(op, fd, offset, buffers)`` (:attr:`.engine.Job.native`).
Native = tuple[str, int, int, list[memoryview]]


@dataclass
class BlkStats:
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    discards: int = 0
    write_zeroes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    unsupported: int = 0


class BlkDevice(VhostUserBackend):
    """A virtio-blk device over one :class:`Disk`."""

    max_queue_size = 1024

    def __init__(self, disk: Disk, *, queues: int = 1, serial: str = "dvmm",
                 engine: Engine | None = None, inline: bool = True) -> None:
        if queues < 1:
            raise ValueError("a block device needs at least one queue")
        self.disk = disk
        self._queues = queues
        self.serial = serial.encode()[:VIRTIO_BLK_ID_BYTES]
        self.limits = DiskLimits(capacity=disk.size // VIRTIO_BLK_SECTOR_SIZE)
        self.stats = BlkStats()
        #: ``inline``: requests that do not wait for a device are served on
        #: the loop thread (False: every request with I/O goes to the engine).
        self.dispatcher = Dispatcher(self, engine, inline=inline) if engine else None
        self._try_read: Callable[[int, list[memoryview]], bool] | None = getattr(
            disk, "try_read", None)
        self.memory_backed = bool(getattr(disk, "memory_backed", False))
        self._native: Callable[[str, int, list[memoryview]], Native | None] | None = getattr(
            disk, "native", None)
        #: False for an image format (:mod:`.formats`): the dispatcher asks
        #: for a native call only when the request may start at once.
        self.native_is_stable = bool(getattr(disk, "native_is_stable", True))

    @property
    def num_queues(self) -> int:
        return self._queues

    def features(self) -> int:
        f = (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_EVENT_IDX)
             | bit(VIRTIO_F_RING_INDIRECT_DESC) | bit(VIRTIO_BLK_F_SEG_MAX)
             | bit(VIRTIO_BLK_F_BLK_SIZE) | bit(VIRTIO_BLK_F_FLUSH) | bit(VIRTIO_BLK_F_MQ))
        if self.disk.read_only:
            return f | bit(VIRTIO_BLK_F_RO)
        return f | bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)

    def config(self) -> bytes:
        lim = self.limits
        return CONFIG.pack(
            lim.capacity, 0, SEG_MAX, 0, 0, 0, VIRTIO_BLK_SECTOR_SIZE,
            0, 0, 0, 0, 1, 0, self._queues,
            lim.max_discard_sectors, lim.max_discard_seg, DISCARD_ALIGNMENT,
            lim.max_write_zeroes_sectors, lim.max_write_zeroes_seg, 1,
        )

    def get_config(self, offset: int, size: int) -> bytes:
        return self.config()[offset:offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        log.info("ignoring a write of %d bytes to config offset %d", len(data), offset)

    # -- the daemon's hooks ---------------------------------------------------------
    def attach(self, host: BackendHost) -> None:
        if self.dispatcher is not None:
            self.dispatcher.attach(host)

    def queue_started(self, index: int) -> None:
        if self.dispatcher is not None:
            self.dispatcher.watch()

    def queue_stopped(self, index: int) -> None:
        if self.dispatcher is not None:
            self.dispatcher.drain(index)

    def process_queue(self, queue_index: int, queue: SplitQueue,
                      serve: Callable[[int, SplitQueue], bool]) -> bool:
        d = self.dispatcher
        if d is None or d.host is None or (d.inline and d.idle and self.inline_is_faster(queue)):
            return serve(queue_index, queue)
        return d.serve(d.host, queue_index, queue)

    def inline_is_faster(self, queue: SplitQueue) -> bool:
        """Serve this pass on the loop thread, one request at a time, when
        nothing is in flight and a hand-off cannot win: a memory-backed image
        (tmpfs: every request is a copy, which the GIL keeps from running
        beside the loop's Python; measured slower with workers, see
        BENCHMARKS.md) or a single request (queue depth 1: the hand-off
        would only add its latency)."""
        if self.memory_backed:
            return True
        tracker = queue.inflight
        return (queue.avail_idx() - queue.last_avail_idx) & 0xFFFF <= 1 and not (
            tracker is not None and tracker.resubmit)

    # -- requests -------------------------------------------------------------
    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        """Serve one request now, on the loop thread (the ``sync`` engine, a
        tmpfs image, a lone request, fault injection)."""
        simple = parse_simple(chain.readable, chain.writable, self.limits)
        if simple is not None:  # the hot path: as few calls as possible
            return self.serve_simple(*simple)
        parsed = self._parse_full(queue_index, chain)
        if isinstance(parsed, int):
            return parsed
        return self.serve(*parsed)

    def serve(self, req: BlkRequest, status_buf: memoryview, ok_written: int) -> int:
        """Serve a parsed request now; the bytes written into its chain."""
        status = self.execute(req)
        status_buf[0] = status
        return ok_written if status == VirtioBlkStatus.OK else 1

    def serve_simple(self, req: Read | Write, status_buf: memoryview) -> int:
        """Serve a plain read or write now (the hot path: as few calls as
        possible); the bytes written into its chain."""
        disk, st = self.disk, self.stats
        try:
            if type(req) is Read:
                disk.read(req.sector * VIRTIO_BLK_SECTOR_SIZE, req.bufs)
                st.reads += 1
                st.bytes_read += req.nbytes
                status_buf[0] = VirtioBlkStatus.OK
                return req.nbytes + 1
            if disk.read_only:
                st.errors += 1
                status_buf[0] = VirtioBlkStatus.IOERR
                return 1
            disk.write(req.sector * VIRTIO_BLK_SECTOR_SIZE, req.bufs)
        except OSError as exc:
            status_buf[0] = self.failed(req, exc)
            return 1
        st.writes += 1
        st.bytes_written += req.nbytes
        status_buf[0] = VirtioBlkStatus.OK
        return 1

    def parse(self, queue_index: int, chain: DescriptorChain) -> Parsed | int:
        """The request of a chain, its status byte and the bytes written if
        it succeeds; or, for a chain answered already (a bad request: its
        status is set), the bytes written."""
        simple = parse_simple(chain.readable, chain.writable, self.limits)
        if simple is not None:  # the common read/write layout, no stream objects
            rw, status_buf = simple
            return rw, status_buf, rw.nbytes + 1 if isinstance(rw, Read) else 1
        return self._parse_full(queue_index, chain)

    def _parse_full(self, queue_index: int, chain: DescriptorChain) -> Parsed | int:
        writer = ChainWriter(chain.writable)
        try:
            status_buf = take_status(writer)
        except NoStatusByteError as exc:
            self.stats.errors += 1
            log.warning("queue %d: %s; request dropped", queue_index, exc)
            return 0
        try:
            req = parse_request(ChainReader(chain.readable), writer, self.limits)
        except BlkRequestError as exc:
            status_buf[0] = self._refuse(queue_index, exc)
            return 1
        return req, status_buf, writer.consumed + 1

    def _refuse(self, queue_index: int, exc: BlkRequestError) -> int:
        if exc.status_unsupported:
            self.stats.unsupported += 1
            log.info("queue %d: unsupported %s", queue_index, exc)
            return VirtioBlkStatus.UNSUPP
        self.stats.errors += 1
        log.warning("queue %d: bad request: %s", queue_index, exc)
        return VirtioBlkStatus.IOERR

    def execute(self, req: BlkRequest) -> int:
        """Do the I/O now; returns the virtio-blk status byte."""
        op = self.operation(req)
        if isinstance(op, int):
            return op
        fn, args = op
        try:
            fn(*args)
        except OSError as exc:
            return self.failed(req, exc)
        self.account(req)
        return VirtioBlkStatus.OK

    def operation(self, req: BlkRequest) -> DiskOp | int:
        """The disk call that serves ``req`` (any thread may make it), or the
        status of a request answered without one."""
        disk = self.disk
        if isinstance(req, Read):
            return disk.read, (req.sector * VIRTIO_BLK_SECTOR_SIZE, req.bufs)
        if isinstance(req, GetId):
            write_views(req.buf, self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
                        [:sum(len(b) for b in req.buf)])
            return VirtioBlkStatus.OK
        if disk.read_only and not isinstance(req, Flush):
            self.stats.errors += 1
            return VirtioBlkStatus.IOERR
        if isinstance(req, Write):
            return disk.write, (req.sector * VIRTIO_BLK_SECTOR_SIZE, req.bufs)
        if isinstance(req, Flush):
            return disk.flush, ()
        if isinstance(req, Discard):
            return self._discard, (req.segments,)
        return self._write_zeroes, (req.segments,)

    def read_cached(self, req: BlkRequest) -> bool:
        """Serve a read now if no byte of it has to come from the device
        (:class:`~.disk.CachedReads`); False leaves it to the engine."""
        if self._try_read is None or not isinstance(req, Read):
            return False
        try:
            return self._try_read(req.sector * VIRTIO_BLK_SECTOR_SIZE, req.bufs)
        except OSError:
            return False  # the engine's read reports it

    def native(self, req: BlkRequest) -> Native | None:
        """``req`` as a system call an engine can make itself (io_uring), if
        the disk can say which (a plain image; not a fault-injecting one)."""
        fn = self._native
        if fn is None:
            return None
        if isinstance(req, Read):
            return fn("read", req.sector * VIRTIO_BLK_SECTOR_SIZE, req.bufs)
        if isinstance(req, Write):
            return fn("write", req.sector * VIRTIO_BLK_SECTOR_SIZE, req.bufs)
        if isinstance(req, Flush):
            return fn("flush", 0, [])
        return None

    def _discard(self, segments: list[Segment]) -> None:
        for seg in segments:
            self.disk.discard(seg.sector * VIRTIO_BLK_SECTOR_SIZE,
                              seg.num_sectors * VIRTIO_BLK_SECTOR_SIZE)

    def _write_zeroes(self, segments: list[Segment]) -> None:
        for seg in segments:
            self.disk.write_zeroes(seg.sector * VIRTIO_BLK_SECTOR_SIZE,
                                   seg.num_sectors * VIRTIO_BLK_SECTOR_SIZE, seg.unmap)

    def account(self, req: BlkRequest) -> None:
        """Count a request that succeeded (on the loop thread)."""
        st = self.stats
        if isinstance(req, Read):
            st.reads += 1
            st.bytes_read += req.nbytes
        elif isinstance(req, Write):
            st.writes += 1
            st.bytes_written += req.nbytes
        elif isinstance(req, Flush):
            st.flushes += 1
        elif isinstance(req, Discard):
            st.discards += 1
        elif isinstance(req, WriteZeroes):
            st.write_zeroes += 1

    def failed(self, req: BlkRequest, exc: OSError) -> int:
        self.stats.errors += 1
        log.warning("I/O error on %s: %s", type(req).__name__, exc)
        return VirtioBlkStatus.IOERR

    def close(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.close()
        self.disk.close()
