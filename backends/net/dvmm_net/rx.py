"""Receive: frames from the link straight into the guest's posted buffers.

Owns one service round of a receive ring.  Chains are popped into a small
stash until they can hold the largest frame that may come (with
MRG_RXBUF a frame spans several chains, 5.1.6.3.2; without it every chain
must hold a whole frame), then one ``recv`` on the link writes the frame
and, for a TAP, its virtio-net header directly into those guest-memory
slices.  The chains the frame filled are pushed with ``num_buffers`` set in
the header; the rest stay in the stash for the next frame, and whatever is
left at the end of the round is given back to the ring (``undo_pop``), so
no chain is held between rounds and a memory-table change can never leave
a stale slice behind.  Chains are popped in growing bursts
(:meth:`SplitQueue.pop_batch`: 1, 2, 4 … per refill, never more than the
frames the round may still deliver, so few spares are given back) and
the used entries of a round are published together
(:meth:`SplitQueue.push_batch`) at its end.

The common case takes a short path: a TAP frame that one chain can hold
whole (with MRG_RXBUF: a chain as large as the largest frame, as Linux
posts them; without it: every chain) is read into that chain's buffers
and the spare byte with an iovec list built once per chain, and the
header's few device-owned fields are patched in place in guest memory.

A round that reads the link dry leaves the pair *drained*: kicks (the
driver posting buffers, several per round when it keeps the ring full) do
not start another round that could only find the link empty again; the
next frame makes the watched fd readable, and that starts it.

When the posted buffers cannot hold a large frame, reception pauses: the
link fd is no longer watched until the driver kicks the ring with new
buffers (back-pressure, no busy loop, nothing queued here; the frames wait
in the TAP's or the socket's own bounded queue).

After a backend crash, receive chains the previous process had taken and
not returned (in-flight tracking, :mod:`dvmm_shared.inflight`) are handed
out first by the queue and filled with the next frames, like any posted
buffer; the frame the crash interrupted is lost, as on a wire.  Chains
given back at the end of a round are unmarked (or, resubmitted ones, stay
first in line), so none is reported twice.

Hostile chains are counted and returned empty (a used length of 0, which
a driver discards); a frame longer than the buffers it got is counted and
dropped, and the buffers reused.
"""

from __future__ import annotations

import enum
import logging
from collections import deque

from dvmm_shared.chain import ChainWriter, write_views
from dvmm_shared.virtqueue import ChainError, DescriptorChain, SplitQueue

from .header import HDR_LEN, MAX_GSO_FRAME, NUM_BUFFERS_OFFSET, num_buffers_bytes, rx_header
from .link import LinkChanged
from .pair import QueuePair
from .stats import worth_logging

log = logging.getLogger("dvmm.net")

RX_BURST = 64  # frames per round: the loop stays fair to kicks and messages
IOV_MAX = 1024
# A TAP read returns at most the buffers' length, so a frame that exactly
# fills them and one that was cut look alike: one spare byte after the
# guest's buffers tells them apart (written only when the frame did not fit).
_SPARE = memoryview(bytearray(1))


class Outcome(enum.Enum):
    FRAME = "frame"  # delivered
    DROPPED = "dropped"  # read and thrown away (cut short)
    EMPTY = "empty"  # nothing waiting on the link
    STARVED = "starved"  # not enough buffers posted
    CHANGED = "changed"  # the link's fd changes
    FAILED = "failed"  # the link reported an error


class Posted:
    """A popped receive chain: its head, device-writable buffers and their
    size, the iovec list for one read (the buffers and the spare byte), and
    whether a TAP frame may be read into it alone (``whole``: the header
    fits its first buffer and the iovec list is within IOV_MAX)."""

    __slots__ = ("bufs", "head", "iov", "size", "whole")

    def __init__(self, head: int, bufs: list[memoryview], size: int, whole: bool) -> None:
        self.head = head
        self.bufs = bufs
        self.size = size
        self.iov = [*bufs, _SPARE]
        self.whole = whole


class RxRound:
    """The chains popped from one receive ring during one service round."""

    def __init__(self, pair: QueuePair, queue: SplitQueue) -> None:
        self.pair = pair
        self.queue = queue
        self.cfg = pair.cfg
        self.chains: deque[Posted] = deque()
        self.capacity = 0
        self.descriptors = 0
        self.blocked = False  # a bad chain waits behind the stash
        self.pushed = False
        self.used: list[tuple[int, int]] = []  # published at the end of the round
        self.frames = self.nbytes = 0
        self._grab = 1  # chains per refill, doubled each time
        self._left = RX_BURST  # frames this round may still deliver
        link = pair.link
        self._tap = link.vnet_hdr  # frames come with their header (TAP)
        self._recv, self._index = link.recv, pair.index

    def run(self) -> bool:
        """Deliver up to RX_BURST frames; whether anything was pushed."""
        relinked = False
        try:
            for left in range(RX_BURST, 0, -1):
                self._left = left
                outcome = self.receive_one()
                if outcome is Outcome.FRAME or outcome is Outcome.DROPPED:
                    continue
                self.pair.rx_drained = outcome is Outcome.EMPTY
                if outcome is Outcome.CHANGED and not relinked:
                    relinked = True
                    self.pair.relink()
                    continue
                if outcome is Outcome.STARVED:
                    self.pair.all_stats.rx_starved += 1
                    self.pair.pause_rx()
                elif outcome is Outcome.FAILED:
                    self.pair.pause_rx()
                break
        finally:
            self.finish()
        return self.pushed

    # -- one frame ----------------------------------------------------------------
    def receive_one(self) -> Outcome:
        cfg = self.cfg
        mrg = cfg.mrg_rxbuf
        need = cfg.rx_need if mrg else 1
        if self.capacity < need:
            self._fill(need)
            if not self.chains:
                return Outcome.STARVED
        first = self.chains[0]
        if first.whole and (first.size >= need or not mrg):
            return self._receive_whole(first)
        if (mrg and self.capacity < need and not self.blocked
                and self.descriptors < self.queue.size):
            return Outcome.STARVED  # the driver can still post more: wait for them
        return self._receive_spread()

    def _receive_whole(self, first: Posted) -> Outcome:
        """A TAP frame into the first chain alone, its header patched in place."""
        try:
            n = self._recv(self._index, first.iov)
        except (BlockingIOError, LinkChanged, OSError) as exc:
            return self._recv_failed(exc)
        cfg = self.cfg
        if n > first.size or n < cfg.hdr_len:
            self._cut_short(first.size)
            return Outcome.DROPPED
        self.chains.popleft()
        self.capacity -= first.size
        self.descriptors -= len(first.bufs)
        hdr = first.bufs[0]  # holds the whole header (checked by the caller)
        if hdr[1]:
            self.pair.stats.rx_gso += 1
        if not cfg.guest_csum:
            hdr[0] = 0  # 5.1.6.4.1: no DATA_VALID without GUEST_CSUM
        if cfg.hdr_len == HDR_LEN:  # num_buffers = 1 (the TAP leaves it alone)
            hdr[NUM_BUFFERS_OFFSET] = 1
            hdr[NUM_BUFFERS_OFFSET + 1] = 0
        self.used.append((first.head, n))
        self.pushed = True
        self.frames += 1
        self.nbytes += n - cfg.hdr_len
        return Outcome.FRAME

    def _recv_failed(self, exc: Exception) -> Outcome:
        if isinstance(exc, BlockingIOError):
            return Outcome.EMPTY
        if isinstance(exc, LinkChanged):
            return Outcome.CHANGED
        self.pair.all_stats.rx_link_errors += 1
        log.warning("pair %d: receive failed, waiting for the next kick: %s",
                    self.pair.index, exc)
        return Outcome.FAILED

    def _receive_spread(self) -> Outcome:
        """The general case: a frame across chains (MRG_RXBUF) or buffers too
        small for the header, or a bare link (the header is ours to write)."""
        cfg = self.cfg
        iov, cap = self._iov()
        link = self.pair.link
        if link.vnet_hdr:
            hdr, bufs = ChainWriter(self.chains[0].bufs).take(cfg.hdr_len), iov
        else:  # the link carries bare frames: the header is ours to write
            writer = ChainWriter(iov)
            hdr, bufs = writer.take(cfg.hdr_len), writer.take_rest()
        try:
            n = link.recv(self.pair.index, [*bufs, _SPARE])
        except (BlockingIOError, LinkChanged, OSError) as exc:
            return self._recv_failed(exc)
        total = n if link.vnet_hdr else n + cfg.hdr_len
        if total > cap or total < cfg.hdr_len:
            self._cut_short(cap)
            return Outcome.DROPPED
        self._deliver(total, hdr)
        return Outcome.FRAME

    def _cut_short(self, cap: int) -> None:
        stats = self.pair.all_stats
        stats.rx_truncated += 1
        if worth_logging(stats.rx_truncated):
            log.info("pair %d: dropped a frame longer than the %d bytes of buffers posted",
                     self.pair.index, cap)
        cfg = self.cfg
        if cfg.mrg_rxbuf and cap >= cfg.rx_need:
            # Larger than the MTU said (the guest raised it without telling
            # us): hold out for room for the largest frame from now on.
            cfg.rx_need = cfg.hdr_len + MAX_GSO_FRAME

    def _iov(self) -> tuple[list[memoryview], int]:
        """The buffers the next frame may fill: all stashed chains (MRG_RXBUF)
        or the first one, at most IOV_MAX slices with the spare byte."""
        iov: list[memoryview] = []
        for posted in self.chains if self.cfg.mrg_rxbuf else [self.chains[0]]:
            room = IOV_MAX - 1 - len(iov)
            if room <= 0:
                break
            iov.extend(posted.bufs[:room])
        return iov, sum(len(b) for b in iov)

    def _deliver(self, total: int, hdr: list[memoryview]) -> None:
        used: list[tuple[int, int]] = []
        remaining = total
        while remaining > 0 or not used:
            posted = self.chains.popleft()
            length = min(posted.size, remaining)
            used.append((posted.head, length))
            remaining -= length
            self.capacity -= posted.size
            self.descriptors -= len(posted.bufs)
        self._write_header(hdr, len(used))
        self.used += used  # the header is complete before the driver sees it
        self.pushed = True
        self.frames += 1
        self.nbytes += total - self.cfg.hdr_len

    def _write_header(self, hdr: list[memoryview], num_buffers: int) -> None:
        size = self.cfg.hdr_len
        if not self.pair.link.vnet_hdr:
            write_views(hdr, rx_header(num_buffers, size))
            return
        raw = bytearray(b"".join(hdr))
        if raw[1]:
            self.pair.stats.rx_gso += 1
        if not self.cfg.guest_csum:
            raw[0] = 0  # 5.1.6.4.1: no DATA_VALID without GUEST_CSUM
        if size == HDR_LEN:  # the TAP skips num_buffers: it is the device's to set
            raw[NUM_BUFFERS_OFFSET:HDR_LEN] = num_buffers_bytes(num_buffers)
        write_views(hdr, bytes(raw))

    # -- the stash ----------------------------------------------------------------
    def _fill(self, need: int) -> None:
        if not self.chains:
            self.blocked = False  # the bad chain is next in line now
        while self.capacity < need and not self.blocked:
            batch = self.queue.pop_batch(self._grab)
            if not batch:
                return
            # No more than the frames the round may still take: a busy link
            # ends a round with at most the spares of the last refill.
            self._grab = min(2 * self._grab, self._left)
            self._stash(batch)

    def _stash(self, batch: list[DescriptorChain | ChainError]) -> None:
        hdr_len, tap = self.cfg.hdr_len, self._tap
        for i, chain in enumerate(batch):
            if isinstance(chain, ChainError):
                why = str(chain)
            else:
                bufs = chain.writable
                size = sum(len(b) for b in bufs) if len(bufs) != 1 else len(bufs[0])
                if not chain.readable and size >= hdr_len:
                    whole = tap and len(bufs[0]) >= hdr_len and len(bufs) < IOV_MAX
                    self.chains.append(Posted(chain.head, bufs, size, whole))
                    self.capacity += size
                    self.descriptors += len(bufs)
                    continue
                why = (f"receive chain {chain.head}: {len(chain.readable)} "
                       f"device-readable buffers, {size} writable bytes")
            if self._bad(batch, i, why):
                return

    def _bad(self, batch: list[DescriptorChain | ChainError], i: int, why: str) -> bool:
        """Return a bad chain empty, but only in ring order: with chains stashed
        before it, it and the rest of its burst go back to the ring (newest
        first) until they are used.  True if the burst ends here."""
        if self.chains:
            for chain in reversed(batch[i:]):
                self.queue.undo_pop(chain.head)
            self.blocked = True
            return True
        stats = self.pair.all_stats
        stats.rx_bad_chains += 1
        if worth_logging(stats.rx_bad_chains):
            log.warning("pair %d: %s; returned empty", self.pair.index, why)
        self.used.append((batch[i].head, 0))
        self.pushed = True
        return False

    def finish(self) -> None:
        """Publish the round's used entries and counts, then unpop the chains
        no frame used (the last ones popped: they go back newest first)."""
        if self.used:
            self.queue.push_batch(self.used)
            self.used = []
        st = self.pair.stats
        st.rx_frames += self.frames
        st.rx_bytes += self.nbytes
        self.frames = self.nbytes = 0
        for posted in reversed(self.chains):
            self.queue.undo_pop(posted.head)
        self.chains.clear()
        self.capacity = self.descriptors = 0


def receive(pair: QueuePair, queue: SplitQueue) -> bool:
    """Serve a receive ring (kicked, or its link fd readable)."""
    if not pair.rx_on or pair.rx_drained:
        return False
    pair.resume_rx()
    return RxRound(pair, queue).run()
