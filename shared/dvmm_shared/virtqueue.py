"""The split virtqueue, device side (virtio 1.2 section 2.7).

Owns walking the rings: popping descriptor chains from the available ring
(direct and indirect descriptors), turning their buffers into ``memoryview``
slices of guest memory, putting used elements back, and deciding whether the
driver wants an interrupt (EVENT_IDX ``used_event``/``avail_event`` or the
NO_INTERRUPT / NO_NOTIFY flags).  It never does device I/O.

Everything read from the rings is hostile: indices are range-checked, chains
are capped at the queue size (loops), indirect tables are checked for size
and nesting, and every buffer must lie inside one memory region.  A bad chain
raises a :class:`ChainError` carrying its head so the device can return it
and keep serving; a bad available index raises :class:`RingError` and the
queue should be treated as broken (NEEDS_RESET).

The ring position (``last_avail_idx``, ``used_idx``) is plain state here.
With an :class:`~dvmm_shared.inflight.InflightQueue` attached (vhost-user
INFLIGHT_SHMFD) every chain taken is marked in flight and every used element
retired in the shared region, and chains left in flight by a previous
process are handed out again first, in their original order.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .memory import GuestMemory, GuestMemoryError
from .virtio import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_SIZE,
    VIRTQ_MAX_SIZE,
    VIRTQ_USED_ELEM_SIZE,
    VIRTQ_USED_F_NO_NOTIFY,
)

if TYPE_CHECKING:
    from .inflight import InflightQueue

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_NEXT_OR_INDIRECT = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT


class QueueError(Exception):
    """Base of everything a hostile ring can provoke."""


class RingError(QueueError):
    """The ring itself is inconsistent (avail index jumped, bad layout)."""


class ChainError(QueueError):
    """One descriptor chain is malformed; ``head`` identifies it."""

    def __init__(self, head: int, message: str) -> None:
        super().__init__(f"chain {head}: {message}")
        self.head = head


class DescriptorIndexError(ChainError):
    """A descriptor index (head or ``next``) is outside the table."""


class ChainLoopError(ChainError):
    """The chain is longer than its table allows: a loop or a runaway chain."""


class IndirectError(ChainError):
    """An indirect table is misused (not negotiated, nested, bad size, with NEXT)."""


class BufferAddressError(ChainError):
    """A buffer does not lie entirely inside guest memory."""


class DescriptorOrderError(ChainError):
    """A device-readable descriptor follows a device-writable one (2.7.4.2)."""


_fence_lock = threading.Lock()


def memory_fence() -> None:
    """A full memory barrier.

    Python has no fence primitive; taking an uncontended lock executes a
    locked read-modify-write, which is a full barrier on x86.  Needed between
    publishing ``avail_event`` and re-reading the available index, the one
    store->load ordering the split ring depends on (2.7.10).
    """
    with _fence_lock:
        pass


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """2.7.10: notify iff ``event_idx`` lies in ``[old_idx, new_idx)`` (mod 2**16)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


@dataclass
class DescriptorChain:
    """A popped chain: its head and its buffers, split by direction."""

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)


@dataclass(frozen=True)
class RingLayout:
    """Guest-physical addresses of the three ring parts and the queue size."""

    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int

    def check(self) -> None:
        n = self.size
        if n <= 0 or n > VIRTQ_MAX_SIZE or n & (n - 1):
            raise RingError(f"queue size {n} is not a power of two in 1..{VIRTQ_MAX_SIZE}")

    @property
    def desc_bytes(self) -> int:
        return VIRTQ_DESC_SIZE * self.size

    @property
    def avail_bytes(self) -> int:
        return 6 + 2 * self.size

    @property
    def used_bytes(self) -> int:
        return 6 + VIRTQ_USED_ELEM_SIZE * self.size


class SplitQueue:
    """Device side of one split virtqueue."""

    def __init__(self, mem: GuestMemory, layout: RingLayout, *, event_idx: bool = False,
                 indirect: bool = True, last_avail_idx: int = 0,
                 used_idx: int | None = None, inflight: InflightQueue | None = None) -> None:
        layout.check()
        self.mem = mem
        self.size = layout.size
        self.event_idx = event_idx
        self.indirect = indirect
        try:
            self._desc = mem.slice(layout.desc_addr, layout.desc_bytes)
            self._avail = mem.slice(layout.avail_addr, layout.avail_bytes)
            self._used = mem.slice(layout.used_addr, layout.used_bytes)
        except GuestMemoryError as exc:
            raise RingError(f"ring not in guest memory: {exc}") from exc
        # The ring words the driver and device share (flags, indices, event
        # words) must each be one 16-bit load or store: struct's "<H" moves
        # the two bytes separately, and a driver reading a torn used index
        # (0x00FF -> 0x0100 seen as 0x01FF) reaps garbage.  A memoryview cast
        # to "H" loads and stores the halfword whole (little-endian hosts,
        # as virtio 1.x rings are).
        self._avail_h = self._avail.cast("H")
        self._used_h = self._used.cast("H")
        self.last_avail_idx = last_avail_idx & 0xFFFF
        # The used index normally equals the position we start from; a
        # restarted backend may be told otherwise (inflight recovery).
        self.used_idx = self.last_avail_idx if used_idx is None else used_idx & 0xFFFF
        self._signalled_used = self.used_idx
        self._signalled_valid = False
        # The available index as last read: what avail_event re-arms at.
        self._avail_seen = self.last_avail_idx
        #: In-flight tracking (None: untracked); see :meth:`recover_inflight`.
        self.inflight = inflight

    def recover_inflight(self, tracker: InflightQueue) -> int:
        """Track this ring in ``tracker``'s region, resolving what a previous
        process left there against the used index in guest memory: the ring
        then resumes after the chains in flight, which :meth:`pop` hands out
        again first.  Returns how many are resubmitted."""
        ring_used = int(self._used_h[1])
        resume = tracker.recover(ring_used, self.size)
        self.inflight = tracker
        if resume is None:
            return 0
        self.last_avail_idx = self._avail_seen = resume
        self.used_idx = self._signalled_used = ring_used
        self._signalled_valid = False
        return len(tracker.resubmit)

    # -- available ring -------------------------------------------------
    def avail_idx(self) -> int:
        return int(self._avail_h[1])

    @property
    def avail_seen(self) -> int:
        """The available index the device last looked at (a lost-kick check
        compares it with :meth:`avail_idx`)."""
        return self._avail_seen

    def avail_flags(self) -> int:
        return int(self._avail_h[0])

    def used_event(self) -> int:
        return int(self._avail_h[2 + self.size])

    def pending(self) -> int:
        """How many chains the driver has made available and we have not popped."""
        avail = self.avail_idx()
        n = (avail - self.last_avail_idx) & 0xFFFF
        if n > self.size:
            raise RingError(
                f"available index moved by {n}, more than the queue size {self.size}"
            )
        self._avail_seen = avail
        return n

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None.  Raises ChainError / RingError.

        Tracked: a chain left in flight by a previous process comes first;
        a new one is marked in flight before it is returned."""
        tracker = self.inflight
        if tracker is not None and tracker.resubmit:
            return self._walk(tracker.take_resubmit())
        if not self.pending():
            return None
        slot = self.last_avail_idx % self.size
        head = int(self._avail_h[2 + slot])
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if tracker is not None:
            tracker.mark(head)
        return self._walk(head)

    def pop_batch(self, limit: int) -> list[DescriptorChain | ChainError]:
        """Up to ``limit`` chains in the order :meth:`pop` would hand them out,
        for a device that serves a burst at once: the available index is read
        once, and a chain of one direct descriptor (what a net driver posts
        per frame) is built without the general walk.  A malformed chain is
        returned in its place as the ChainError :meth:`pop` would raise, so a
        bad chain does not end the burst; a RingError is raised before
        anything is taken.  Tracked, every head is marked right after it is
        taken, as :meth:`pop` does."""
        out: list[DescriptorChain | ChainError] = []
        tracker = self.inflight
        while tracker is not None and tracker.resubmit and len(out) < limit:
            try:
                out.append(self._walk(tracker.take_resubmit()))
            except ChainError as exc:
                out.append(exc)
        count = min(self.pending(), limit - len(out)) if len(out) < limit else 0
        avail, desc, size = self._avail_h, self._desc, self.size
        # The region the last buffer lay in: the next one is almost always
        # there too, and slicing it directly skips the region search.
        base, span, region = 0, -1, self._desc  # (no region yet: span -1 never fits)
        last = self.last_avail_idx
        for _ in range(count):
            head = avail[2 + last % size]
            last = self.last_avail_idx = (last + 1) & 0xFFFF
            if tracker is not None:
                tracker.mark(head)
            if head < size:
                addr, length, flags, _ = _DESC.unpack_from(desc, head * VIRTQ_DESC_SIZE)
                if not flags & _NEXT_OR_INDIRECT:
                    off = addr - base
                    if off >= 0 and off + length <= span:
                        buf = region[off:off + length]
                    else:
                        try:
                            buf = self.mem.slice(addr, length)
                        except GuestMemoryError as exc:
                            out.append(BufferAddressError(head, str(exc)))
                            continue
                        for r in self.mem:
                            if r.guest_addr <= addr < r.guest_end:
                                base, span, region = r.guest_addr, r.size, r.view
                    out.append(DescriptorChain(head, [], [buf]) if flags & VIRTQ_DESC_F_WRITE
                               else DescriptorChain(head, [buf], []))
                    continue
            try:
                out.append(self._walk(head))
            except ChainError as exc:
                out.append(exc)
        return out

    def _walk(self, head: int) -> DescriptorChain:
        chain = DescriptorChain(head)
        if head >= self.size:
            raise DescriptorIndexError(head, f"head index {head} >= queue size {self.size}")
        self._collect(chain, self._desc, self.size, head, nested=False)
        return chain

    def _indirect_table(self, chain: DescriptorChain, addr: int, length: int,
                        flags: int) -> tuple[memoryview, int]:
        """Check an INDIRECT descriptor and map its table (2.7.5.3)."""
        head = chain.head
        if not self.indirect:
            raise IndirectError(head, "indirect descriptor without INDIRECT_DESC")
        if flags & VIRTQ_DESC_F_NEXT:
            raise IndirectError(head, "indirect descriptor with NEXT set")
        if length == 0 or length % VIRTQ_DESC_SIZE:
            raise IndirectError(head, f"indirect table length {length}")
        count = length // VIRTQ_DESC_SIZE
        if count > VIRTQ_MAX_SIZE:
            raise IndirectError(head, f"indirect table of {count} descriptors")
        try:
            return self.mem.slice(addr, length), count
        except GuestMemoryError as exc:
            raise BufferAddressError(head, f"indirect table: {exc}") from exc

    def _collect(self, chain: DescriptorChain, table: memoryview, count: int,
                 index: int, *, nested: bool) -> None:
        head = chain.head
        for _ in range(count):
            addr, length, flags, nxt = _DESC.unpack_from(table, index * VIRTQ_DESC_SIZE)
            if flags & VIRTQ_DESC_F_INDIRECT:
                # 2.7.5.3.2: zero or more direct descriptors may be followed by
                # one indirect descriptor, which ends the chain; tables do not nest.
                if nested:
                    raise IndirectError(head, "indirect descriptor inside an indirect table")
                sub, sub_count = self._indirect_table(chain, addr, length, flags)
                self._collect(chain, sub, sub_count, 0, nested=True)
                return
            try:
                buf = self.mem.slice(addr, length)
            except GuestMemoryError as exc:
                raise BufferAddressError(head, str(exc)) from exc
            if flags & VIRTQ_DESC_F_WRITE:
                chain.writable.append(buf)
            elif chain.writable:
                raise DescriptorOrderError(head, "readable descriptor after a writable one")
            else:
                chain.readable.append(buf)
            if not flags & VIRTQ_DESC_F_NEXT:
                return
            if nxt >= count:
                raise DescriptorIndexError(head, f"next index {nxt} >= table size {count}")
            index = nxt
        kind = "indirect table" if nested else "queue"
        raise ChainLoopError(head, f"chain longer than the {kind} ({count} descriptors)")

    def undo_pop(self, head: int | None = None) -> None:
        """Give back the last popped chain (device ran out of resources).

        Chains go back in the reverse order they were popped; with in-flight
        tracking ``head`` says which (a resubmitted chain stays in flight)."""
        tracker = self.inflight
        if tracker is not None:
            if head is None:
                head = int(self._avail_h[2 + (self.last_avail_idx - 1) % self.size])
            if tracker.undo(head):
                return
        self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF

    # -- used ring --------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Put ``(head, written)`` in the used ring and publish the new index.

        Tracked, the steps of "Inflight I/O tracking": ``last_batch_head``,
        used element, used index, then the entry retired (see
        :meth:`write_used`, :meth:`publish_used`, :meth:`retire` for the same
        steps one by one)."""
        tracker = self.inflight
        if tracker is not None:
            tracker.pre_put(head)
        slot = self.used_idx % self.size
        _USED_ELEM.pack_into(self._used, 4 + VIRTQ_USED_ELEM_SIZE * slot, head, written)
        # x86 keeps stores in order, so the element is visible before the index.
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._used_h[1] = self.used_idx
        if tracker is not None:
            tracker.post_put(head, self.used_idx)

    def push_batch(self, used: Sequence[tuple[int, int]]) -> None:
        """:meth:`push` for each ``(head, written)`` in turn, each used index
        published (and, tracked, each entry retired) as it is written, so the
        in-flight region stays exact at every store; only the calls are saved."""
        tracker = self.inflight
        ring, words, size = self._used, self._used_h, self.size
        idx = self.used_idx
        for head, written in used:
            if tracker is not None:
                tracker.pre_put(head)
            _USED_ELEM.pack_into(ring, 4 + VIRTQ_USED_ELEM_SIZE * (idx % size), head, written)
            idx = self.used_idx = (idx + 1) & 0xFFFF
            words[1] = idx
            if tracker is not None:
                tracker.post_put(head, idx)

    # push() in steps, for fault injection that stops a process between them.
    def write_used(self, head: int, written: int) -> None:
        if self.inflight is not None:
            self.inflight.pre_put(head)
        slot = self.used_idx % self.size
        _USED_ELEM.pack_into(self._used, 4 + VIRTQ_USED_ELEM_SIZE * slot, head, written)

    def publish_used(self) -> None:
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._used_h[1] = self.used_idx

    def retire(self, head: int) -> None:
        if self.inflight is not None:
            self.inflight.post_put(head, self.used_idx)

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one."""
        memory_fence()
        if not self.event_idx:
            return not self.avail_flags() & VIRTQ_AVAIL_F_NO_INTERRUPT
        old, new = self._signalled_used, self.used_idx
        valid = self._signalled_valid
        self._signalled_used, self._signalled_valid = new, True
        return not valid or vring_need_event(self.used_event(), new, old)

    def enable_notification(self) -> bool:
        """Ask the driver to kick again; True if chains arrived meanwhile (2.7.10).

        The kick is asked for beyond the available index the device has
        *seen* (as vhost does), not beyond ``last_avail_idx``: a device that
        leaves chains available on purpose (net RX holding out for enough
        buffers for a large frame) still hears about the next ones.  For a
        device that drains the ring the two are the same."""
        seen = self._avail_seen
        if self.event_idx:
            self._used_h[2 + 4 * self.size] = seen  # avail_event, after the used ring
        else:
            self._used_h[0] = 0
        memory_fence()
        self.pending()
        return self._avail_seen != seen

    def disable_notification(self) -> None:
        """Tell the driver kicks are not needed while we are polling the ring."""
        if not self.event_idx:
            self._used_h[0] = VIRTQ_USED_F_NO_NOTIFY

    def release(self) -> None:
        """Drop the ring views so the memory can be unmapped."""
        for view in (self._avail_h, self._used_h, self._desc, self._avail, self._used):
            view.release()
