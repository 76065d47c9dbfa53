"""The net data path in bursts: batched ring walks and the short paths.

:meth:`SplitQueue.pop_batch` must hand out exactly what repeated
:meth:`SplitQueue.pop` calls would (the same chains, the same errors in
their place, the same in-flight marks), and :meth:`SplitQueue.push_batch`
must leave the used ring and the in-flight region exactly as repeated
:meth:`SplitQueue.push` calls do.  Both are checked on random, hostile
rings.  Then the device: a transmit burst mixing chains for the short path,
the general path and bad ones keeps ring order and its counters; a burst
cut by a full link leaves nothing marked in flight; a receive burst longer
than one round fills every chain once, with ``num_buffers`` set.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from dvmm_net.header import HDR_LEN, VirtioNetHdr
from dvmm_net.rx import RX_BURST
from dvmm_net.tx import TX_BURST
from dvmm_shared.driver import Buf, DriverQueue, ring_layout
from dvmm_shared.inflight import InflightRegion
from dvmm_shared.memory import GuestMemory, buffer_address
from dvmm_shared.virtio import (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_HDR_GSO_TCPV4,
    bit,
)
from dvmm_shared.virtqueue import ChainError, DescriptorChain, SplitQueue
from hypothesis import given, settings
from hypothesis import strategies as st

from .helpers import RING_BASE, standard_memory
from .test_inflight_net import Region, net_rig
from .test_net_device import (
    MRG,
    QSIZE,
    RX,
    TX,
    frame,
    post_rx,
    post_tx,
    rig,
    tap_frame,
    used,
    wait_for,
)
from .test_virtqueue_fuzz import descs

SIZE = 16
Item = tuple[str, int, list[tuple[int, int]], list[tuple[int, int]]]


def _where(mem: GuestMemory, views: list[memoryview]) -> list[tuple[int, int]]:
    """Each buffer as (guest address, length)."""
    out = []
    for v in views:
        addr = buffer_address(v) if len(v) else -1
        gpa = next((r.guest_addr + addr - r.user_addr for r in mem
                    if r.user_addr <= addr < r.user_addr + r.size), -1)
        out.append((gpa, len(v)))
    return out


def _item(mem: GuestMemory, got: DescriptorChain | ChainError) -> Item:
    """A chain or error by what identifies it: kind, head, buffer places."""
    if isinstance(got, ChainError):
        return (type(got).__name__, got.head, [], [])
    return ("chain", got.head, _where(mem, got.readable), _where(mem, got.writable))


class Ring:
    """A random ring over fresh memory, served by a queue with its own
    in-flight region (so two of them can be compared)."""

    def __init__(self, table: list[tuple[int, int, int, int]], heads: list[int],
                 resubmit: list[int]) -> None:
        self.mem = standard_memory()
        layout = ring_layout(RING_BASE, SIZE)
        self.driver = DriverQueue(self.mem, layout)
        for i, (addr, length, flags, nxt) in enumerate(table):
            self.driver.write_desc(i, addr, length, flags, nxt)
        for head in heads:
            self.driver.publish(head)
        fd, self.region = InflightRegion.allocate(1, SIZE, 1)
        os.close(fd)  # the mapping keeps the region
        tracker = self.region.queue(0)
        assert tracker is not None
        self.queue = SplitQueue(self.mem, layout)
        self.queue.recover_inflight(tracker)
        tracker.resubmit.extend(resubmit)  # as a recovery would have queued them

    def state(self) -> tuple[int, bytes]:
        return self.queue.last_avail_idx, bytes(self.region._view)


def _pop_all(ring: Ring, limit: int) -> list[Item]:
    out: list[Item] = []
    while len(out) < limit:
        try:
            chain = ring.queue.pop()
        except ChainError as exc:
            out.append(_item(ring.mem, exc))
            continue
        if chain is None:
            break
        out.append(_item(ring.mem, chain))
    return out


@settings(max_examples=150, deadline=None)
@given(table=st.lists(descs(SIZE), min_size=SIZE, max_size=SIZE),
       heads=st.lists(st.one_of(st.integers(0, SIZE - 1), st.integers(0, 0xFFFF)), max_size=SIZE),
       resubmit=st.lists(st.integers(0, SIZE - 1), max_size=3, unique=True),
       limit=st.integers(1, 2 * SIZE))
def test_pop_batch_hands_out_what_pop_would(table: list[tuple[int, int, int, int]],
                                            heads: list[int], resubmit: list[int],
                                            limit: int) -> None:
    one, burst = Ring(table, heads, resubmit), Ring(table, heads, resubmit)
    expected = _pop_all(one, limit)
    assert [_item(burst.mem, c) for c in burst.queue.pop_batch(limit)] == expected
    assert burst.state() == one.state()  # the same position and in-flight marks


@settings(max_examples=100, deadline=None)
@given(pushes=st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 1 << 20)),
                       max_size=3 * SIZE),
       start=st.integers(0, 0xFFFF))
def test_push_batch_leaves_what_push_would(pushes: list[tuple[int, int]], start: int) -> None:
    one, burst = Ring([(0, 0, 0, 0)] * SIZE, [], []), Ring([(0, 0, 0, 0)] * SIZE, [], [])
    for ring in (one, burst):
        ring.queue.used_idx = start
        for head in range(SIZE):
            tracker = ring.queue.inflight
            assert tracker is not None
            tracker.mark(head)
    for head, written in pushes:
        one.queue.push(head, written)
    burst.queue.push_batch(pushes)
    lay = one.driver.layout
    ring_bytes = 4 + 8 * SIZE
    assert burst.mem.read(lay.used_addr, ring_bytes) == one.mem.read(lay.used_addr, ring_bytes)
    assert burst.queue.used_idx == one.queue.used_idx
    assert burst.state() == one.state()


# -- transmit ---------------------------------------------------------------------
def test_a_transmit_burst_keeps_ring_order_across_paths(tmp_path: Path) -> None:
    features = MRG | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4)
    with rig(tmp_path, features) as r:
        vm, ring = r.vm, r.ring(TX)
        plain = [VirtioNetHdr().pack() + frame(60 + i, i) for i in range(6 + TX_BURST)]
        gso = VirtioNetHdr(flags=1, gso_type=VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54,
                           gso_size=1448, csum_start=34, csum_offset=16).pack() + frame(3000)
        bad = vm.alloc(16, align=16)
        heads = [post_tx(vm, ring, plain[0], kick=False),            # short path
                 post_tx(vm, ring, plain[1], pieces=2, kick=False),  # header apart
                 ring.queue.add([Buf(bad, 8)]),                      # no whole header
                 post_tx(vm, ring, gso, kick=False),                 # offloads
                 post_tx(vm, ring, plain[2], indirect=True, kick=False),
                 post_tx(vm, ring, VirtioNetHdr().pack() + frame(10), kick=False),  # runt
                 *[post_tx(vm, ring, f, kick=False) for f in plain[3:]]]
        ring.kick.signal()
        assert sorted(used(ring, len(heads))) == sorted((h, 0) for h in heads)
        sent = [plain[0], plain[1], gso, *plain[2:]]
        assert [r.link.take() for _ in sent] == sent
        assert r.link.pending_frames() == []
        st_ = r.device.stats()
        assert st_.tx_bad_chains == 2
        p = st_.pairs[0]
        assert (p.tx_frames, p.tx_gso, p.tx_csum) == (len(sent), 1, 1)
        assert p.tx_bytes == sum(len(f) - HDR_LEN for f in sent)


def test_a_burst_cut_by_a_full_link_leaves_nothing_in_flight(tmp_path: Path) -> None:
    with net_rig(tmp_path) as rig_:
        tx = rig_.vm.rings[TX]
        link = rig_.link
        link.ends[0][0].setsockopt(*_SNDBUF_4K)
        frames = [VirtioNetHdr().pack() + frame(1000, i) for i in range(24)]
        for f in frames:
            post_tx(rig_.vm, tx, f, kick=False)
        tx.kick.signal()
        pair = rig_.daemon.daemon.session.backend.pairs[0]  # type: ignore[union-attr]
        wait_for(lambda: pair.tx_blocked, "transmission to block on the full link")
        region = Region(rig_.vm, TX)
        try:
            # Sent chains were retired, the rest of the burst unmarked.
            assert region.inflight() == []
            assert region.header()[3] == tx.queue.used_idx()
            assert [link.take() for _ in frames] == frames  # each exactly once, in order
            assert len(used(tx, len(frames))) == len(frames)
            assert link.pending_frames() == []
            assert region.inflight() == []
        finally:
            region.close()


_SNDBUF_4K = (1, 7, 4096)  # SOL_SOCKET, SO_SNDBUF


# -- receive ----------------------------------------------------------------------
def test_a_receive_burst_longer_than_a_round_fills_each_chain_once(tmp_path: Path) -> None:
    count = RX_BURST + 9
    with net_rig(tmp_path) as rig_:
        rx = rig_.vm.rings[RX]
        first = QSIZE - 16
        posted = list(post_rx(rig_.vm, rx, *([2048] * first)).items())
        for i in range(count):
            rig_.link.inject(tap_frame(frame(60 + i, i)))
        got = used(rx, first)  # the ring runs dry: reception waits for a kick
        posted += post_rx(rig_.vm, rx, *([2048] * (count - first))).items()
        got += used(rx, count - first)
        order = [h for h, _ in posted]  # chains are filled in ring order
        assert [h for h, _ in got] == order
        for i, ((head, length), (_, addr)) in enumerate(zip(got, posted, strict=True)):
            data = rig_.vm.mem.read(addr, length)
            assert head == order[i]
            assert struct.unpack_from("<H", data, 10)[0] == 1  # num_buffers
            assert data[HDR_LEN:] == frame(60 + i, i)
        region = Region(rig_.vm, RX)
        try:
            wait_for(lambda: region.header()[3] == rx.queue.used_idx(), "the region to catch up")
            assert region.inflight() == []  # the spares of each round were given back
        finally:
            region.close()
