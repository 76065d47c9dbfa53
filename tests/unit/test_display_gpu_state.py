"""The saved virtio-gpu state (:mod:`dvmm_display.gpu_state`): round trips,
two slots surviving a save cut short, corrupt bytes refused, and the
session handing a device its piece of the in-flight memfd."""

from __future__ import annotations

import mmap
import os

import pytest
from dvmm_display.gpu_protocol import MemEntry, Rect
from dvmm_display.gpu_state import (
    SLOT_HEADER,
    SLOT_SIZE,
    STATE_SIZE,
    GpuState,
    Marker,
    ResourceState,
    ScanoutState,
    StateError,
    StateStore,
    decode,
    encode,
)
from dvmm_shared.inflight import InflightRegion, state_offset
from hypothesis import given
from hypothesis import strategies as st

u32 = st.integers(0, (1 << 32) - 1)
entries = st.lists(st.builds(MemEntry, st.integers(0, (1 << 64) - 1), u32), max_size=8)
resources = st.builds(ResourceState, u32, u32, u32, u32, entries.map(tuple))
scanouts = st.builds(ScanoutState, u32, u32, u32, st.builds(Rect, u32, u32, u32, u32))
states = st.builds(
    GpuState, st.lists(resources, max_size=6).map(tuple), st.lists(scanouts, max_size=4).map(
        tuple), u32, u32, st.tuples(st.integers(-(1 << 31), (1 << 31) - 1),
                                    st.integers(-(1 << 31), (1 << 31) - 1)),
    st.tuples(u32, u32), st.none() | st.builds(Marker, u32, u32, u32))


@given(states)
def test_encode_decode_round_trip(state: GpuState) -> None:
    assert decode(encode(state)) == state


@given(st.binary(max_size=200))
def test_garbage_is_refused_or_decoded_never_crashes(data: bytes) -> None:
    try:
        decode(data)
    except StateError:
        pass


def test_a_save_cut_short_leaves_the_previous_state() -> None:
    mapping = mmap.mmap(-1, STATE_SIZE)
    store = StateStore(mapping)
    assert store.load() is None
    one = GpuState(resources=(ResourceState(1, 2, 64, 64),))
    two = GpuState(resources=(ResourceState(1, 2, 64, 64), ResourceState(2, 2, 8, 8)))
    store.save(one)
    store.save(two)
    assert store.load() == two
    # a third save killed half-way: payload written, header torn
    view = memoryview(mapping)
    slot = (store.seq + 1) % 2 * SLOT_SIZE
    view[slot + SLOT_HEADER.size:slot + SLOT_HEADER.size + 4] = b"junk"
    view[slot:slot + 8] = b"DVGS\x01\0\0\0"
    assert store.load() == two
    # a reopened store (the next process) continues after the newest slot
    again = StateStore(mapping)
    assert again.seq == 2 and again.load() == two
    again.save(one)
    assert StateStore(mapping).load() == one
    view.release()


def test_a_corrupt_payload_falls_back_to_the_older_slot() -> None:
    mapping = mmap.mmap(-1, STATE_SIZE)
    store = StateStore(mapping)
    one, two = GpuState(cursor_resource=1), GpuState(cursor_resource=2)
    store.save(one)
    store.save(two)
    newest = store.seq % 2 * SLOT_SIZE
    mapping[newest + SLOT_HEADER.size] ^= 0xFF
    assert store.load() == one
    store.clear()
    assert store.load() is None


def test_a_state_too_large_for_a_slot_is_refused() -> None:
    big = ResourceState(1, 2, 1, 1, tuple(MemEntry(i, 1) for i in range(16384)))
    with pytest.raises(StateError):
        encode(GpuState(resources=(big,) * 30))


def test_the_inflight_memfd_holds_the_state_after_the_queues() -> None:
    fd, region = InflightRegion.allocate(2, 64, 2, extra=STATE_SIZE)
    try:
        offset = state_offset(2, 64)
        assert offset % mmap.PAGESIZE == 0 and offset >= region.size
        assert os.fstat(fd).st_size == offset + STATE_SIZE
        StateStore.map(fd, offset).save(GpuState(cursor_resource=9))
        assert StateStore.map(fd, offset).load() == GpuState(cursor_resource=9)
    finally:
        os.close(fd)
    fd, _ = InflightRegion.allocate(2, 64, 2)  # no extra: the region alone, as before
    try:
        assert os.fstat(fd).st_size == region.size
    finally:
        os.close(fd)
