"""Property tests of the device-side ring walk.

Random descriptor tables and available rings: ``pop()`` must return a chain
whose buffers all lie in guest memory and whose length is bounded by its
table, or raise a :class:`QueueError` -- nothing else, and it must terminate.
Random *valid* chains must round-trip byte for byte.
"""

from __future__ import annotations

import struct

import pytest
from dvmm_shared.driver import Buf, DriverQueue, ring_layout
from dvmm_shared.virtio import VIRTQ_DESC_F_INDIRECT
from dvmm_shared.virtqueue import ChainError, DescriptorChain, QueueError, RingError, SplitQueue
from hypothesis import event, given, settings
from hypothesis import strategies as st

from .helpers import (
    BUF_BASE,
    REGION_A,
    REGION_B,
    REGION_C,
    RING_BASE,
    standard_memory,
    view_in_memory,
)

DESC = struct.Struct("<QIHH")
INDIRECT_AT = 0x8000  # a table the random descriptors may point at
MEM = standard_memory()

# Mostly plausible values (so that many chains are valid and walked to the
# end), with edges and arbitrary 64/32/16-bit values mixed in.
ADDRS = st.one_of(
    st.integers(BUF_BASE, REGION_B[0] + REGION_B[1]),
    st.integers(BUF_BASE, REGION_A[1]),
    st.sampled_from([
        0, INDIRECT_AT, REGION_A[1] - 8, REGION_B[0], REGION_B[0] + REGION_B[1] - 16,
        REGION_B[0] + REGION_B[1], REGION_C[0], REGION_C[0] + REGION_C[1] - 1,
        REGION_C[0] + REGION_C[1], (1 << 64) - 1,
    ]),
    st.integers(0, (1 << 64) - 1),
)
LENS = st.one_of(
    st.integers(0, 64),
    st.integers(0, 0x2000),
    st.sampled_from([16, 32, 48, 64, 256, 0x10000, 0xFFFFFFFF]),
    st.integers(0, (1 << 32) - 1),
)
FLAGS = st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(0, 7),
                  st.integers(0, 0xFFFF))


def descs(size: int) -> st.SearchStrategy[tuple[int, int, int, int]]:
    nexts = st.one_of(st.integers(0, size - 1), st.integers(0, size - 1),
                      st.integers(0, 0xFFFF))
    return st.tuples(ADDRS, LENS, FLAGS, nexts)


@st.composite
def hostile_rings(draw: st.DrawFn) -> tuple[int, list[tuple[int, int, int, int]],
                                           list[tuple[int, int, int, int]], int, list[int], int]:
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    table = draw(st.lists(descs(size), min_size=size, max_size=size))
    indirect = draw(st.lists(descs(16), max_size=16))
    start = draw(st.one_of(st.just(0), st.integers(0, 0xFFFF)))
    heads = draw(st.lists(st.one_of(st.integers(0, size - 1), st.integers(0, size + 1),
                                    st.integers(0, 0xFFFF)), max_size=size))
    avail = start + len(heads)
    if draw(st.integers(0, 7)) == 0:  # sometimes an arbitrary jump
        avail = draw(st.integers(0, 0xFFFF))
    return size, table, indirect, start, heads, avail & 0xFFFF


def check_chain(chain: DescriptorChain, head_desc: tuple[int, int, int, int],
                size: int) -> None:
    _addr, length, flags, _nxt = head_desc
    bound = length // 16 if flags & VIRTQ_DESC_F_INDIRECT else size
    assert 1 <= len(chain.readable) + len(chain.writable) <= bound
    for view in chain.readable + chain.writable:
        assert view_in_memory(MEM, view)


@pytest.mark.timeout(120)
@settings(max_examples=400, deadline=None)
@given(ring=hostile_rings(), indirect_ok=st.booleans())
def test_pop_returns_a_sane_chain_or_raises_a_queue_error(
        ring: tuple[int, list[tuple[int, int, int, int]], list[tuple[int, int, int, int]],
                    int, list[int], int],
        indirect_ok: bool) -> None:
    size, table, indirect, start, heads, avail = ring
    layout = ring_layout(RING_BASE, size)
    for i, desc in enumerate(table):
        MEM.write(layout.desc_addr + 16 * i, DESC.pack(*desc))
    MEM.write(INDIRECT_AT, b"".join(DESC.pack(*d) for d in indirect) + bytes(16))
    for i, head in enumerate(heads):
        MEM.write(layout.avail_addr + 4 + 2 * ((start + i) % size), head.to_bytes(2, "little"))
    MEM.write(layout.avail_addr + 2, avail.to_bytes(2, "little"))
    queue = SplitQueue(MEM, layout, indirect=indirect_ok, last_avail_idx=start)
    jump = (avail - start) & 0xFFFF
    outcomes = 0
    for _ in range(size + 1):
        slot_head = int.from_bytes(MEM.read(layout.avail_addr + 4 + 2 * (
            queue.last_avail_idx % size), 2), "little")
        try:
            chain = queue.pop()
        except RingError:
            assert jump > size
            event("ring error")
            return
        except ChainError as exc:
            assert exc.head == slot_head
            event(type(exc).__name__)
        except QueueError as exc:  # pragma: no cover - the hierarchy has no other kinds
            raise AssertionError(f"unexpected QueueError kind {exc!r}") from exc
        else:
            if chain is None:
                break
            assert chain.head == slot_head < size
            check_chain(chain, table[chain.head], size)
            event("chain")
        outcomes += 1
    assert jump <= size
    assert outcomes == jump and queue.last_avail_idx == avail


# -- valid chains round-trip ------------------------------------------------------
@st.composite
def valid_chains(draw: st.DrawFn) -> tuple[list[bytes], list[int]]:
    readable = draw(st.lists(st.binary(min_size=0, max_size=300), max_size=6))
    writable = draw(st.lists(st.integers(0, 300), max_size=6))
    if not readable and not writable:
        readable = [b"x"]
    return readable, writable


@settings(max_examples=150, deadline=None)
@given(chains=st.lists(valid_chains(), min_size=1, max_size=4), indirect=st.booleans(),
       fill=st.integers(0, 255))
def test_valid_chains_round_trip(chains: list[tuple[list[bytes], list[int]]], indirect: bool,
                                 fill: int) -> None:
    mem = standard_memory()
    layout = ring_layout(RING_BASE, 64)
    driver = DriverQueue(mem, layout)
    device = SplitQueue(mem, layout)
    cursor = BUF_BASE
    posted = []
    for readable, writable in chains:
        bufs = []
        for data in readable:
            mem.write(cursor, data)
            bufs.append(Buf(cursor, len(data)))
            cursor += len(data)
        for length in writable:
            bufs.append(Buf(cursor, length, write=True))
            cursor += length
        table = None
        if indirect:
            table, cursor = cursor, cursor + 16 * len(bufs)
        posted.append((driver.add(bufs, indirect_at=table), bufs))
    for head, bufs in posted:
        chain = device.pop()
        assert chain is not None and chain.head == head
        reads = [b for b in bufs if not b.write]
        writes = [b for b in bufs if b.write]
        assert [bytes(v) for v in chain.readable] == [mem.read(b.addr, b.length) for b in reads]
        assert [len(v) for v in chain.writable] == [b.length for b in writes]
        for view in chain.writable:
            view[:] = bytes([fill]) * len(view)
        device.push(head, chain.writable_len)
        for b in writes:
            assert mem.read(b.addr, b.length) == bytes([fill]) * b.length
    assert device.pop() is None
    assert driver.get_used() == [(h, sum(b.length for b in bs if b.write)) for h, bs in posted]
