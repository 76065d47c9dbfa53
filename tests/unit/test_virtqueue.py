"""Split virtqueue, device side: chains round-trip, and hostile chains are refused.

The driver side is :class:`DriverQueue` over the same memfd-backed memory;
hostile chains are written as raw descriptors.  After every refused chain the
queue must still serve the next good one.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from dvmm_shared.driver import Buf
from dvmm_shared.virtio import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_MAX_SIZE,
)
from dvmm_shared.virtqueue import (
    BufferAddressError,
    ChainError,
    ChainLoopError,
    DescriptorIndexError,
    DescriptorOrderError,
    IndirectError,
    QueueError,
    RingError,
    RingLayout,
    SplitQueue,
)

from .helpers import REGION_A, REGION_B, REGION_C, RingPair, ring_pair

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
DESC = struct.Struct("<QIHH")


def post_good_chain(rp: RingPair) -> tuple[int, int, int]:
    """A two-descriptor request through the normal driver path: (head, out, in)."""
    out = rp.alloc(8, b"request!")
    inb = rp.alloc(32)
    return rp.driver.add([Buf(out, 8), Buf(inb, 32, write=True)]), out, inb


def serve_good_chain(rp: RingPair) -> None:
    head, _out, inb = post_good_chain(rp)
    chain = rp.device.pop()
    assert chain is not None and chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"request!"]
    chain.writable[0][:4] = b"done"
    rp.device.push(head, 4)
    assert (head, 4) in rp.driver.get_used()
    assert rp.mem.read(inb, 4) == b"done"


# -- round trips ----------------------------------------------------------------
def test_direct_chain_round_trip() -> None:
    rp = ring_pair()
    hdr = rp.alloc(16, b"0123456789abcdef")
    data = rp.alloc(100, bytes(range(100)))
    reply = rp.alloc(64)
    head = rp.driver.add([Buf(hdr, 16), Buf(data, 100), Buf(reply, 64, write=True)])
    assert rp.device.pending() == 1
    chain = rp.device.pop()
    assert chain is not None and chain.head == head
    assert b"".join(chain.readable) == b"0123456789abcdef" + bytes(range(100))
    assert chain.readable_len == 116 and chain.writable_len == 64
    chain.writable[0][:] = b"R" * 64
    rp.device.push(head, 64)
    assert rp.device.pop() is None and rp.device.pending() == 0
    assert rp.driver.get_used() == [(head, 64)]
    assert rp.mem.read(reply, 64) == b"R" * 64


def test_indirect_chain_round_trip() -> None:
    rp = ring_pair()
    bufs = [Buf(rp.alloc(8, bytes([i]) * 8), 8) for i in range(3)]
    bufs += [Buf(rp.alloc(16), 16, write=True) for _ in range(2)]
    table = rp.alloc(16 * len(bufs))
    head = rp.driver.add(bufs, indirect_at=table)
    assert rp.driver.free_descriptors == 7  # one ring descriptor for five buffers
    chain = rp.device.pop()
    assert chain is not None and chain.head == head
    assert [bytes(v) for v in chain.readable] == [bytes([i]) * 8 for i in range(3)]
    assert [len(v) for v in chain.writable] == [16, 16]
    chain.writable[1][:] = b"w" * 16
    rp.device.push(head, 32)
    assert rp.driver.get_used() == [(head, 32)]
    assert rp.mem.read(bufs[4].addr, 16) == b"w" * 16
    assert rp.driver.free_descriptors == 8


def test_chains_come_out_in_order_across_many_ring_laps() -> None:
    rp = ring_pair(4)
    for lap in range(10):
        heads = [rp.driver.add([Buf(rp.alloc(4, bytes([lap, i, 0, 0])), 4)])
                 for i in range(1 + lap % 4)]
        assert rp.device.pending() == len(heads)
        for i, head in enumerate(heads):
            chain = rp.device.pop()
            assert chain is not None and chain.head == head
            assert bytes(chain.readable[0]) == bytes([lap, i, 0, 0])
            rp.device.push(head, i)
        assert rp.driver.get_used() == [(h, i) for i, h in enumerate(heads)]
        rp.next_free = 0x4000


def test_16_bit_index_wraparound() -> None:
    rp = ring_pair(4)
    start = 0xFFFE
    rp.driver.avail_idx = rp.driver.last_used = start
    rp.device = SplitQueue(rp.mem, rp.driver.layout, last_avail_idx=start)
    for i in range(6):
        head = rp.driver.add([Buf(rp.alloc(4), 4, write=True)])
        chain = rp.device.pop()
        assert chain is not None and chain.head == head
        rp.device.push(head, i)
        assert rp.driver.get_used() == [(head, i)]
    assert rp.device.last_avail_idx == rp.device.used_idx == (start + 6) & 0xFFFF == 4


def test_chain_of_exactly_the_queue_size_is_accepted() -> None:
    rp = ring_pair(8)
    head = rp.driver.add([Buf(rp.alloc(4), 4) for _ in range(8)])
    chain = rp.device.pop()
    assert chain is not None and chain.head == head and len(chain.readable) == 8


def test_undo_pop_gives_the_chain_back() -> None:
    rp = ring_pair()
    head, _, _ = post_good_chain(rp)
    first = rp.device.pop()
    rp.device.undo_pop()
    again = rp.device.pop()
    assert first is not None and again is not None and again.head == first.head == head


def test_zero_length_descriptor_inside_memory_is_an_empty_buffer() -> None:
    rp = ring_pair()
    head = rp.driver.add([Buf(rp.alloc(16), 0), Buf(rp.alloc(4), 4, write=True)])
    chain = rp.device.pop()
    assert chain is not None and chain.head == head
    assert [len(v) for v in chain.readable] == [0] and chain.writable_len == 4


def test_write_flag_on_the_indirect_descriptor_itself_is_ignored() -> None:
    # 2.7.5.3.2: the device MUST ignore the write-only flag of the descriptor
    # that refers to an indirect table.
    rp = ring_pair()
    buf = rp.alloc(8, b"readable")
    table = rp.alloc(16, DESC.pack(buf, 8, 0, 0))
    rp.driver.write_desc(5, table, 16, INDIRECT | WRITE, 0)
    rp.driver.publish(5)
    chain = rp.device.pop()
    assert chain is not None and [bytes(v) for v in chain.readable] == [b"readable"]


# -- ring layout -------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 3, 6, 100, VIRTQ_MAX_SIZE * 2])
def test_queue_size_must_be_a_power_of_two(size: int) -> None:
    with pytest.raises(RingError, match="power of two"):
        RingLayout(size, 0, 0x1000, 0x2000).check()


@pytest.mark.parametrize(
    "layout",
    [RingLayout(8, REGION_C[0] + REGION_C[1] - 64, 0x2000, 0x3000),  # desc past the end
     RingLayout(8, 0x1000, REGION_A[1] - 8, 0x3000),  # avail straddles A/B
     RingLayout(8, 0x1000, 0x2000, 0x200000)],  # used ring in no region
)
def test_ring_outside_memory_is_refused(layout: RingLayout) -> None:
    rp = ring_pair()
    with pytest.raises(RingError, match="not in guest memory"):
        SplitQueue(rp.mem, layout)


# -- hostile chains ------------------------------------------------------------------
def _table(rp: RingPair, *descs: tuple[int, int, int, int]) -> int:
    return rp.alloc(16 * len(descs), b"".join(DESC.pack(*d) for d in descs))


def _raw(*descs: tuple[int, int, int, int, int], head: int = 5) -> Callable[[RingPair], None]:
    """Write raw descriptors (index, addr, len, flags, next) and publish ``head``."""
    def post(rp: RingPair) -> None:
        for index, addr, length, flags, nxt in descs:
            rp.driver.write_desc(index, addr, length, flags, nxt)
        rp.driver.publish(head)
    return post


def _indirect(*descs: tuple[int, int, int, int], flags: int = INDIRECT,
              length: int | None = None) -> Callable[[RingPair], None]:
    def post(rp: RingPair) -> None:
        table = _table(rp, *descs) if descs else rp.alloc(16)
        size = 16 * len(descs) if length is None else length
        rp.driver.write_desc(5, table, size, flags, 6)
        rp.driver.publish(5)
    return post


GOOD = 0x8000  # a 16-byte buffer in region A
END_C = REGION_C[0] + REGION_C[1]
HOSTILE: list[tuple[str, Callable[[RingPair], None], type[ChainError], int]] = [
    ("loop", _raw((5, GOOD, 4, NEXT, 6), (6, GOOD, 4, NEXT, 5)), ChainLoopError, 5),
    ("self-loop", _raw((5, GOOD, 4, NEXT, 5)), ChainLoopError, 5),
    ("loop-through-all", _raw(*[(i, GOOD, 1, NEXT, (i + 1) % 8) for i in range(8)], head=0),
     ChainLoopError, 0),
    ("head-out-of-range", _raw(head=8), DescriptorIndexError, 8),
    ("head-0xffff", _raw(head=0xFFFF), DescriptorIndexError, 0xFFFF),
    ("next-out-of-range", _raw((5, GOOD, 4, NEXT, 8)), DescriptorIndexError, 5),
    ("next-0xffff", _raw((5, GOOD, 4, NEXT, 0xFFFF)), DescriptorIndexError, 5),
    ("past-last-region", _raw((5, END_C - 8, 16, 0, 0)), BufferAddressError, 5),
    ("straddles-regions", _raw((5, REGION_A[1] - 8, 16, 0, 0)), BufferAddressError, 5),
    ("in-the-gap", _raw((5, REGION_B[0] + REGION_B[1], 1, 0, 0)), BufferAddressError, 5),
    ("huge-length", _raw((5, GOOD, 0xFFFFFFFF, 0, 0)), BufferAddressError, 5),
    ("top-of-address-space", _raw((5, (1 << 64) - 16, 16, 0, 0)), BufferAddressError, 5),
    ("zero-length-outside", _raw((5, 0x200000, 0, 0, 0)), BufferAddressError, 5),
    ("bad-second-buffer", _raw((5, GOOD, 4, NEXT, 6), (6, END_C, 4, WRITE, 0)),
     BufferAddressError, 5),
    ("readable-after-writable", _raw((5, GOOD, 4, WRITE | NEXT, 6), (6, GOOD, 4, 0, 0)),
     DescriptorOrderError, 5),
    ("indirect-with-next", _indirect((GOOD, 4, 0, 0), flags=INDIRECT | NEXT), IndirectError, 5),
    ("nested-indirect", _indirect((GOOD, 16, INDIRECT, 0)), IndirectError, 5),
    ("indirect-length-0", _indirect(length=0), IndirectError, 5),
    ("indirect-length-15", _indirect((GOOD, 4, 0, 0), length=15), IndirectError, 5),
    ("indirect-length-24", _indirect((GOOD, 4, 0, 0), (GOOD, 4, 0, 0), length=24),
     IndirectError, 5),
    ("indirect-too-many", _indirect(length=16 * (VIRTQ_MAX_SIZE + 1)), IndirectError, 5),
    ("indirect-table-outside", _raw((5, END_C - 16, 32, INDIRECT, 0)), BufferAddressError, 5),
    ("indirect-loop", _indirect((GOOD, 4, NEXT, 1), (GOOD, 4, NEXT, 0)), ChainLoopError, 5),
    ("indirect-next-out-of-range", _indirect((GOOD, 4, NEXT, 2), (GOOD, 4, 0, 0)),
     DescriptorIndexError, 5),
    ("indirect-bad-buffer", _indirect((REGION_A[1] - 2, 4, 0, 0)), BufferAddressError, 5),
    ("indirect-readable-after-writable", _indirect((GOOD, 4, WRITE | NEXT, 1), (GOOD, 4, 0, 0)),
     DescriptorOrderError, 5),
]


@pytest.mark.parametrize(("post", "error", "head"), [c[1:] for c in HOSTILE],
                         ids=[c[0] for c in HOSTILE])
def test_hostile_chain_is_refused_and_the_queue_keeps_working(
        post: Callable[[RingPair], None], error: type[ChainError], head: int) -> None:
    rp = ring_pair(8)
    serve_good_chain(rp)
    post(rp)
    with pytest.raises(error) as info:
        rp.device.pop()
    assert info.value.head == head
    assert str(info.value).startswith(f"chain {head}: ")
    if head < rp.device.size:  # what the daemon does: give it back with 0 bytes
        rp.device.push(head, 0)
        assert rp.driver.get_used() == [(head, 0)]
    serve_good_chain(rp)
    serve_good_chain(rp)


def test_indirect_without_negotiation_is_refused() -> None:
    rp = ring_pair(indirect=False)
    _indirect((GOOD, 4, 0, 0))(rp)
    with pytest.raises(IndirectError, match="without INDIRECT_DESC"):
        rp.device.pop()
    serve_good_chain(rp)


def test_a_bad_chain_between_good_ones() -> None:
    rp = ring_pair(8)
    first, _, _ = post_good_chain(rp)
    _raw((5, GOOD, 4, NEXT, 5))(rp)
    last, _, _ = post_good_chain(rp)
    got: list[int | str] = []
    for _ in range(3):
        try:
            chain = rp.device.pop()
        except ChainError as exc:
            got.append(f"bad {exc.head}")
        else:
            assert chain is not None
            got.append(chain.head)
    assert got == [first, "bad 5", last]
    assert rp.device.pop() is None


@pytest.mark.parametrize("jump", [9, 100, 0x8000, 0xFFFF])
def test_avail_index_jumping_past_the_queue_size_is_a_ring_error(jump: int) -> None:
    rp = ring_pair(8)
    rp.driver.set_avail_idx(jump)
    with pytest.raises(RingError, match="more than the queue size") as info:
        rp.device.pop()
    assert not isinstance(info.value, ChainError)
    with pytest.raises(RingError):
        rp.device.pending()
    assert rp.device.last_avail_idx == 0  # nothing consumed


def test_a_full_ring_is_not_a_ring_error() -> None:
    rp = ring_pair(4)
    heads = [rp.driver.add([Buf(rp.alloc(4), 4)]) for _ in range(4)]
    assert rp.device.pending() == 4
    assert [c.head for c in iter(rp.device.pop, None)] == heads


def test_every_chain_error_is_a_queue_error() -> None:
    for cls in (ChainLoopError, DescriptorIndexError, BufferAddressError, IndirectError,
                DescriptorOrderError):
        assert issubclass(cls, ChainError) and issubclass(cls, QueueError)
    assert issubclass(RingError, QueueError) and not issubclass(RingError, ChainError)


def test_direct_descriptors_followed_by_one_indirect() -> None:
    """2.7.5.3.2: the device MUST handle zero or more chained descriptors
    followed by a single INDIRECT descriptor."""
    rp = ring_pair()
    header = Buf(rp.alloc(8, b"header!!"), 8)
    inner = [Buf(rp.alloc(4, b"data"), 4), Buf(rp.alloc(16), 16, write=True)]
    table = rp.alloc(16 * len(inner))
    for i, b in enumerate(inner):
        flags = (WRITE if b.write else 0) | (NEXT if i + 1 < len(inner) else 0)
        rp.mem.write(table + 16 * i, struct.pack("<QIHH", b.addr, b.length, flags, i + 1))
    rp.driver.write_desc(0, header.addr, 8, NEXT, 1)
    rp.driver.write_desc(1, table, 16 * len(inner), INDIRECT, 0)
    rp.driver.publish(0)
    chain = rp.device.pop()
    assert chain is not None and chain.head == 0
    assert [bytes(v) for v in chain.readable] == [b"header!!", b"data"]
    assert [len(v) for v in chain.writable] == [16]


def test_indirect_inside_an_indirect_table_is_refused() -> None:
    rp = ring_pair()
    inner_table = rp.alloc(16)
    table = rp.alloc(16)
    rp.mem.write(table, struct.pack("<QIHH", inner_table, 16, INDIRECT, 0))
    rp.driver.write_desc(0, table, 16, INDIRECT, 0)
    rp.driver.publish(0)
    with pytest.raises(IndirectError, match="inside an indirect table"):
        rp.device.pop()
