"""In-flight I/O tracking for split virtqueues (vhost-user INFLIGHT_SHMFD).

Owns the shared region of QEMU's docs/interop/vhost-user.rst, "Inflight I/O
tracking": one region per queue, each a header ``{u64 features; u16
version; u16 desc_num; u16 last_batch_head; u16 used_idx}`` followed by
``DescStateSplit[desc_num]`` = ``{u8 inflight; u8 padding[5]; u16 next; u64
counter}``.  The backend allocates it (GET_INFLIGHT_FD), the frontend keeps
it across backend restarts and hands it back (SET_INFLIGHT_FD) before the
rings start; a restarted backend finds there which requests it had taken
from the ring and not completed, and resubmits them.

The bookkeeping, per request, as the document prescribes:

* after taking head ``i`` from the available ring: ``desc[i].counter =
  counter++``, then ``desc[i].inflight = 1`` (:meth:`InflightQueue.mark`);
* when completing it: ``last_batch_head = i`` (:meth:`~InflightQueue.pre_put`),
  then the used element and the used ring's ``idx``, then ``desc[i].inflight
  = 0`` and ``used_idx = idx`` (:meth:`~InflightQueue.post_put`).

A process killed between any two of those stores is resolved at the next
start (:meth:`InflightQueue.recover`): if the region's ``used_idx`` differs
from the ring's used index, the last put was published but not retired, so
``desc[last_batch_head]`` is cleared and ``used_idx`` caught up; every entry
still in flight is then resubmitted in counter order, and the ring resumes
at ``used_idx + in-flight`` (the frontend only knows the used index after a
crash).  That last step is exact because the device marks every head right
after taking it, before it takes the next one: the chains it took and did not
mark are always the last ones taken, and are taken again.

The hot path is a few stores through ``memoryview`` casts, no allocation.
Region sizes follow libvhost-user (``vu_inflight_queue_size``), so a region
is interchangeable between dvmm backends and libvhost-user ones such as
qemu-storage-daemon.  The region is hostile input like guest memory: every
index read from it is bounds-checked.  Ring walking is :mod:`.virtqueue`'s.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections import deque

from .virtio import VIRTQ_MAX_SIZE

log = logging.getLogger("dvmm.inflight")

INFLIGHT_VERSION = 1
INFLIGHT_ALIGNMENT = 64  # libvhost-user's INFLIGHT_ALIGNMENT
HEADER_SIZE = 16
DESC_STATE_SIZE = 16
# u16 word indices of the header, and byte/u64 positions of DescStateSplit i.
_VERSION, _DESC_NUM, _LAST_BATCH_HEAD, _USED_IDX = 4, 5, 6, 7
NO_HEAD = 0xFFFF  # last_batch_head before the first put: no entry


class InflightError(Exception):
    """An in-flight region description that cannot be honoured."""


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region: libvhost-user's ``ALIGN_UP(16 * n + 2, 64)``.

    (It counts the 16-byte header as 2 bytes, but rounding a multiple of 16
    plus 2 up to 64 always leaves at least 16 spare bytes, so it fits.)"""
    return (DESC_STATE_SIZE * queue_size + 2 + INFLIGHT_ALIGNMENT - 1) & ~(INFLIGHT_ALIGNMENT - 1)


def region_size(num_queues: int, queue_size: int) -> int:
    return num_queues * queue_region_size(queue_size)


def state_offset(num_queues: int, queue_size: int) -> int:
    """Where device state starts in a region's memfd: after the queues,
    page aligned (a backend's ``state_size``, see VhostUserBackend)."""
    return (region_size(num_queues, queue_size) + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)


def check_geometry(num_queues: int, queue_size: int, max_queues: int) -> int:
    """Validate a frontend's ``num_queues``/``queue_size``; returns the region size."""
    if not 1 <= num_queues <= max_queues:
        raise InflightError(f"{num_queues} queues (the device has {max_queues})")
    if not 1 <= queue_size <= VIRTQ_MAX_SIZE or queue_size & (queue_size - 1):
        raise InflightError(f"queue size {queue_size} is not a power of two <= {VIRTQ_MAX_SIZE}")
    return region_size(num_queues, queue_size)


class InflightQueue:
    """One queue's region: the per-request stores and the recovery."""

    __slots__ = ("_b", "_h", "_out", "_q", "counter", "desc_num", "resubmit")

    def __init__(self, view: memoryview) -> None:
        self._b = view  # bytes: inflight flags at 16 + 16 * i
        self._h = view.cast("H")  # header words
        self._q = view.cast("Q")  # counters at 3 + 2 * i
        self.desc_num = min(int(self._h[_DESC_NUM]), (len(view) - HEADER_SIZE) // 16)
        self.counter = 0
        #: Heads to hand out again before taking new ones, in counter order.
        self.resubmit: deque[int] = deque()
        # Resubmitted heads handed out and not completed yet (see undo).
        self._out: set[int] = set()

    # -- header -------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self._h[_VERSION])

    @property
    def used_idx(self) -> int:
        return int(self._h[_USED_IDX])

    @property
    def last_batch_head(self) -> int:
        return int(self._h[_LAST_BATCH_HEAD])

    def is_inflight(self, head: int) -> bool:
        return 0 <= head < self.desc_num and self._b[HEADER_SIZE + DESC_STATE_SIZE * head] != 0

    def inflight_heads(self) -> list[int]:
        """Heads marked in flight, in counter order (oldest first)."""
        flags = self._b[HEADER_SIZE:HEADER_SIZE + DESC_STATE_SIZE * self.desc_num:DESC_STATE_SIZE]
        heads = [i for i, f in enumerate(flags.tobytes()) if f]
        heads.sort(key=lambda i: int(self._q[3 + 2 * i]))
        return heads

    # -- the hot path ---------------------------------------------------------
    def mark(self, head: int) -> None:
        """Head ``head`` was taken from the available ring (before acting on it)."""
        if head < self.desc_num:  # a bad head is returned at once, never held
            self._q[3 + 2 * head] = self.counter
            self.counter += 1
            self._b[HEADER_SIZE + DESC_STATE_SIZE * head] = 1

    def pre_put(self, head: int) -> None:
        """Before the used element of ``head`` is written (recorded even when
        out of range: recovery must never clear a stale, re-used head)."""
        self._h[_LAST_BATCH_HEAD] = head

    def post_put(self, head: int, used_idx: int) -> None:
        """After the used index covering ``head`` was published."""
        if head < self.desc_num:
            self._b[HEADER_SIZE + DESC_STATE_SIZE * head] = 0
        if self._out:
            self._out.discard(head)
        self._h[_USED_IDX] = used_idx

    def take_resubmit(self) -> int:
        head = self.resubmit.popleft()
        self._out.add(head)
        return head

    def undo(self, head: int) -> bool:
        """A taken head goes back untouched; True if it was a resubmitted one
        (it stays in flight, first in line), False if it was new (unmarked:
        the caller rewinds the ring)."""
        if head in self._out:
            self._out.discard(head)
            self.resubmit.appendleft(head)
            return True
        if 0 <= head < self.desc_num:
            self._b[HEADER_SIZE + DESC_STATE_SIZE * head] = 0
        return False

    # -- start ----------------------------------------------------------------
    def recover(self, ring_used_idx: int, ring_num: int) -> int | None:
        """Resolve the region against the ring's used index at ring start.

        Returns the available index to resume from (``used_idx`` plus the
        requests in flight, which are queued in :attr:`resubmit`), or None
        for a fresh region (then initialised; the frontend's base stands)."""
        h = self._h
        if h[_VERSION] == 0:
            h[_VERSION] = INFLIGHT_VERSION
            h[_USED_IDX] = ring_used_idx
            h[_LAST_BATCH_HEAD] = NO_HEAD
            return None
        if h[_USED_IDX] != ring_used_idx:
            # The last put published its used entry but did not retire it.
            last = int(h[_LAST_BATCH_HEAD])
            if last < self.desc_num:
                self._b[HEADER_SIZE + DESC_STATE_SIZE * last] = 0
            h[_USED_IDX] = ring_used_idx
        heads = self.inflight_heads()
        for bad in [i for i in heads if i >= ring_num]:
            log.warning("in-flight entry %d is outside the ring of %d; dropped", bad, ring_num)
            self._b[HEADER_SIZE + DESC_STATE_SIZE * bad] = 0
            heads.remove(bad)
        self.resubmit = deque(heads)
        self._out.clear()
        self.counter = int(self._q[3 + 2 * heads[-1]]) + 1 if heads else 0
        return (ring_used_idx + len(heads)) & 0xFFFF


class InflightRegion:
    """The whole region, mapped: one :class:`InflightQueue` view per queue.

    Like guest memory, the mapping is never unmapped explicitly: it goes
    when the last view of it does, so a queue still holding one is safe."""

    def __init__(self, mapping: mmap.mmap, skip: int, num_queues: int, queue_size: int) -> None:
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.size = region_size(num_queues, queue_size)
        self._view = memoryview(mapping)[skip:skip + self.size]

    @classmethod
    def map(cls, fd: int, mmap_size: int, mmap_offset: int, num_queues: int,
            queue_size: int, max_queues: int) -> InflightRegion:
        """Map a region the frontend handed back (SET_INFLIGHT_FD); the
        caller keeps the fd.  Refuses a description or fd that does not hold
        the region (a short file would fault on access)."""
        need = check_geometry(num_queues, queue_size, max_queues)
        if mmap_size < need:
            raise InflightError(f"region of {mmap_size} bytes, {num_queues} queues of "
                                f"{queue_size} need {need}")
        try:
            file_size = os.fstat(fd).st_size
        except OSError as exc:
            raise InflightError(f"region fd: {exc}") from exc
        if mmap_offset > file_size or file_size - mmap_offset < need:
            raise InflightError(f"region fd holds {file_size} bytes, need {need} at "
                                f"offset {mmap_offset}")
        skip = mmap_offset % mmap.ALLOCATIONGRANULARITY
        try:
            mapping = mmap.mmap(fd, need + skip, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE, offset=mmap_offset - skip)
        except (OSError, ValueError, OverflowError) as exc:
            raise InflightError(f"cannot map the region: {exc}") from exc
        region = cls(mapping, skip, num_queues, queue_size)
        region._claim()
        return region

    @classmethod
    def allocate(cls, num_queues: int, queue_size: int, max_queues: int, extra: int = 0
                 ) -> tuple[int, InflightRegion]:
        """A new zeroed region in a sealed memfd (GET_INFLIGHT_FD): ``(fd, region)``;
        the caller owns the fd.  ``extra`` bytes of device state follow the
        queues at :func:`state_offset` (not part of the described region)."""
        need = check_geometry(num_queues, queue_size, max_queues)
        fd = os.memfd_create("dvmm-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, state_offset(num_queues, queue_size) + extra if extra else need)
            # Nobody may shrink it under a mapping (SIGBUS), as libvhost-user does.
            import fcntl

            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            region = cls(mmap.mmap(fd, need, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE), 0, num_queues, queue_size)
        except BaseException:
            os.close(fd)
            raise
        region._claim()
        return fd, region

    def _claim(self) -> None:
        """Record the queue size in each queue header (as libvhost-user does);
        a queue whose initialised header disagrees is not ours to read: reset."""
        stride = queue_region_size(self.queue_size)
        for i in range(self.num_queues):
            part = self._view[i * stride:(i + 1) * stride]
            h = part.cast("H")
            if h[_VERSION] and h[_DESC_NUM] != self.queue_size:
                log.warning("in-flight region of queue %d was for %d entries, not %d; reset",
                            i, h[_DESC_NUM], self.queue_size)
                part[:] = bytes(stride)
            h[_DESC_NUM] = self.queue_size
            h.release()
            part.release()

    def queue(self, index: int) -> InflightQueue | None:
        """The region of queue ``index`` (None beyond the described queues)."""
        if not 0 <= index < self.num_queues:
            return None
        stride = queue_region_size(self.queue_size)
        return InflightQueue(self._view[index * stride:(index + 1) * stride])
