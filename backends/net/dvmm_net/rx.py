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
a stale slice behind.

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
from dataclasses import dataclass

from dvmm_shared.chain import ChainWriter, write_views
from dvmm_shared.virtqueue import ChainError, SplitQueue

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


@dataclass
class Posted:
    """A popped receive chain: its head and device-writable buffers."""

    head: int
    bufs: list[memoryview]
    size: int


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

    def run(self) -> bool:
        """Deliver up to RX_BURST frames; whether anything was pushed."""
        relinked = False
        try:
            for _ in range(RX_BURST):
                outcome = self.receive_one()
                if outcome in (Outcome.FRAME, Outcome.DROPPED):
                    continue
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
            self.give_back()
        return self.pushed

    # -- one frame ----------------------------------------------------------------
    def receive_one(self) -> Outcome:
        cfg = self.cfg
        need = cfg.rx_need if cfg.mrg_rxbuf else 1
        self._fill(need)
        if not self.chains:
            return Outcome.STARVED
        if (cfg.mrg_rxbuf and self.capacity < need and not self.blocked
                and self.descriptors < self.queue.size):
            return Outcome.STARVED  # the driver can still post more: wait for them
        iov, cap = self._iov()
        link = self.pair.link
        if link.vnet_hdr:
            hdr, bufs = ChainWriter(self.chains[0].bufs).take(cfg.hdr_len), iov
        else:  # the link carries bare frames: the header is ours to write
            writer = ChainWriter(iov)
            hdr, bufs = writer.take(cfg.hdr_len), writer.take_rest()
        try:
            n = link.recv(self.pair.index, [*bufs, _SPARE])
        except BlockingIOError:
            return Outcome.EMPTY
        except LinkChanged:
            return Outcome.CHANGED
        except OSError as exc:
            self.pair.all_stats.rx_link_errors += 1
            log.warning("pair %d: receive failed, waiting for the next kick: %s",
                        self.pair.index, exc)
            return Outcome.FAILED
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
        for head, length in used:  # the header is complete before the driver sees it
            self.queue.push(head, length)
        self.pushed = True
        st = self.pair.stats
        st.rx_frames += 1
        st.rx_bytes += total - self.cfg.hdr_len

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
        hdr_len = self.cfg.hdr_len
        if not self.chains:
            self.blocked = False  # the bad chain is next in line now
        while self.capacity < need and not self.blocked:
            try:
                chain = self.queue.pop()
            except ChainError as exc:
                self._bad(exc.head, str(exc))
                continue
            if chain is None:
                return
            size = chain.writable_len
            if chain.readable or size < hdr_len:
                self._bad(chain.head, f"receive chain {chain.head}: {len(chain.readable)} "
                          f"device-readable buffers, {size} writable bytes")
                continue
            self.chains.append(Posted(chain.head, chain.writable, size))
            self.capacity += size
            self.descriptors += len(chain.writable)

    def _bad(self, head: int, why: str) -> None:
        """Return a bad chain empty, but only in ring order: with chains stashed
        before it, it goes back to the ring until they are used."""
        if self.chains:
            self.queue.undo_pop(head)
            self.blocked = True
            return
        stats = self.pair.all_stats
        stats.rx_bad_chains += 1
        if worth_logging(stats.rx_bad_chains):
            log.warning("pair %d: %s; returned empty", self.pair.index, why)
        self.queue.push(head, 0)
        self.pushed = True

    def give_back(self) -> None:
        """Unpop the chains no frame used (they are the last ones popped,
        and go back newest first)."""
        for posted in reversed(self.chains):
            self.queue.undo_pop(posted.head)
        self.chains.clear()
        self.capacity = self.descriptors = 0


def receive(pair: QueuePair, queue: SplitQueue) -> bool:
    """Serve a receive ring (kicked, or its link fd readable)."""
    if not pair.rx_on:
        return False
    pair.resume_rx()
    return RxRound(pair, queue).run()
