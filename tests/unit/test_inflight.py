"""The in-flight region (dvmm_shared.inflight): layout, validation, recovery
details, and the split queue with a region attached."""

from __future__ import annotations

import mmap
import os
import struct

import pytest
from dvmm_shared.driver import Buf
from dvmm_shared.inflight import (
    INFLIGHT_VERSION,
    NO_HEAD,
    InflightError,
    InflightQueue,
    InflightRegion,
    check_geometry,
    queue_region_size,
    region_size,
)

from .helpers import ring_pair


@pytest.mark.parametrize(("size", "expected"), [
    (1, 64), (2, 64), (4, 128), (8, 192), (128, 2112), (1024, 16448), (32768, 524352)])
def test_queue_region_size_is_libvhost_users(size: int, expected: int) -> None:
    assert queue_region_size(size) == expected
    assert queue_region_size(size) >= 16 + 16 * size  # the header and every entry fit
    assert region_size(3, size) == 3 * expected


@pytest.mark.parametrize(("queues", "size", "why"), [
    (0, 128, "0 queues"), (9, 128, "9 queues"), (0xFFFF, 128, "65535 queues"),
    (1, 0, "queue size 0"), (1, 96, "queue size 96"), (1, 65536, "queue size 65536"),
])
def test_geometry_is_checked(queues: int, size: int, why: str) -> None:
    with pytest.raises(InflightError, match=why):
        check_geometry(queues, size, max_queues=8)


def _region(queues: int = 2, size: int = 8) -> tuple[int, InflightRegion]:
    return InflightRegion.allocate(queues, size, max_queues=queues)


def test_a_region_maps_at_an_unaligned_offset_and_is_shared() -> None:
    size = 8
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4096 + 64 + region_size(1, size))
        region = InflightRegion.map(fd, region_size(1, size), 4096 + 64, 1, size, 1)
        q = region.queue(0)
        assert q is not None and q.desc_num == size and region.queue(1) is None
        q.mark(5)
        with mmap.mmap(fd, 0) as m:
            base = 4096 + 64
            assert struct.unpack_from("<HH", m, base + 8) == (0, size)  # version, desc_num
            assert m[base + 16 + 16 * 5] == 1
    finally:
        os.close(fd)


def test_a_queue_region_initialised_for_another_size_is_reset() -> None:
    fd, region = _region(1, 8)
    try:
        q = region.queue(0)
        assert q is not None
        q.recover(0, 8)
        q.mark(3)
        again = InflightRegion.map(fd, region_size(1, 8), 0, 1, 8, 1)
        assert again.queue(0) is not None and again.queue(0).is_inflight(3)  # type: ignore[union-attr]
        # same bytes described as 4-entry queues: not ours to read any more
        small = InflightRegion.map(fd, region_size(1, 4), 0, 1, 4, 1)
        sq = small.queue(0)
        assert sq is not None and sq.version == 0 and sq.desc_num == 4 and not sq.is_inflight(3)
    finally:
        os.close(fd)


def test_a_hostile_desc_num_cannot_reach_past_the_region() -> None:
    view = memoryview(bytearray(queue_region_size(4)))
    struct.pack_into("<HH", view, 8, INFLIGHT_VERSION, 0xFFFF)
    q = InflightQueue(view)
    assert q.desc_num == (len(view) - 16) // 16
    q.mark(q.desc_num)  # out of range: ignored
    q.post_put(0xFFFF, 3)
    assert q.used_idx == 3


def test_recovery_of_a_fresh_region_keeps_the_frontends_base() -> None:
    fd, region = _region()
    try:
        q = region.queue(1)
        assert q is not None
        assert q.recover(ring_used_idx=77, ring_num=8) is None
        assert (q.version, q.used_idx, q.last_batch_head) == (INFLIGHT_VERSION, 77, NO_HEAD)
    finally:
        os.close(fd)


def test_recovery_resolves_a_published_unretired_put_and_orders_by_counter() -> None:
    fd, region = _region()
    try:
        q = region.queue(0)
        assert q is not None
        q.recover(10, 8)
        for head in (4, 2, 6, 1):  # taken in this order
            q.mark(head)
        q.pre_put(2)  # 2 was completed: used index published (11), not retired
        q2 = region.queue(0)
        assert q2 is not None
        assert q2.recover(ring_used_idx=11, ring_num=8) == 11 + 3
        assert list(q2.resubmit) == [4, 6, 1] and q2.used_idx == 11
        assert not q2.is_inflight(2)
        assert q2.counter == 4  # after the newest in-flight entry
    finally:
        os.close(fd)


def test_recovery_drops_entries_outside_the_ring() -> None:
    fd, region = _region(1, 8)
    try:
        q = region.queue(0)
        assert q is not None
        q.recover(0, 8)
        q.mark(1)
        q.mark(6)
        q2 = region.queue(0)
        assert q2 is not None
        assert q2.recover(0, ring_num=4) == 1  # the ring is smaller now: entry 6 is garbage
        assert list(q2.resubmit) == [1] and not q2.is_inflight(6)
    finally:
        os.close(fd)


def test_a_tracked_queue_marks_retires_and_gives_back() -> None:
    rp = ring_pair(8)
    fd, region = _region(1, 8)
    try:
        q = region.queue(0)
        assert q is not None
        assert rp.device.recover_inflight(q) == 0
        heads = [rp.driver.add([Buf(rp.alloc(8), 8, write=True)]) for _ in range(3)]
        chains = [rp.device.pop() for _ in range(3)]
        assert [c.head for c in chains if c] == heads
        assert q.inflight_heads() == heads
        rp.device.undo_pop()  # without a head: the last one taken
        assert q.inflight_heads() == heads[:2] and rp.device.last_avail_idx == 2
        rp.device.push(heads[1], 0)
        assert q.inflight_heads() == heads[:1] and (q.used_idx, q.last_batch_head) == (1, heads[1])
        # a new process: the first is resubmitted, then the given-back one is taken anew
        rp2 = region.queue(0)
        assert rp2 is not None
        dev = type(rp.device)(rp.mem, rp.driver.layout, last_avail_idx=1)
        assert dev.recover_inflight(rp2) == 1 and dev.last_avail_idx == 2
        first = dev.pop()
        assert first is not None and first.head == heads[0]
        dev.undo_pop(first.head)  # a resubmitted chain given back stays first, in flight
        assert list(rp2.resubmit) == [heads[0]] and rp2.is_inflight(heads[0])
        assert [c.head for c in (dev.pop(), dev.pop()) if c] == [heads[0], heads[2]]
        assert dev.pop() is None
    finally:
        os.close(fd)
