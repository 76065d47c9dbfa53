"""Guest memory: mapping regions, bounds-checked translation, overlap refusal."""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Iterator

import pytest
from dvmm_shared.memory import (
    GuestMemory,
    GuestMemoryError,
    Region,
    RegionSpec,
    buffer_address,
    memfd_region,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from .helpers import REGION_A, REGION_B, REGION_C, make_memory, standard_memory

PAGE = 4096


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("test-mem", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4 * PAGE)
    yield fd
    os.close(fd)


# -- Region.map ---------------------------------------------------------------
def test_region_maps_the_file_at_its_offset(memfd: int) -> None:
    os.pwrite(memfd, b"hello", PAGE)
    region = Region.map(RegionSpec(0x8000, PAGE, 0x7F0000, PAGE, memfd))
    mem = GuestMemory([region])
    assert mem.read(0x8000, 5) == b"hello"
    mem.write(0x8000 + 100, b"world")
    assert os.pread(memfd, 5, PAGE + 100) == b"world"  # MAP_SHARED: the fd sees it


def test_region_with_unaligned_mmap_offset(memfd: int) -> None:
    # vhost-user mmap_offset need not be page aligned.
    os.pwrite(memfd, b"unaligned", PAGE + 123)
    region = Region.map(RegionSpec(0, 1000, 0, PAGE + 123, memfd))
    assert region.size == 1000 and len(region.view) == 1000
    assert bytes(region.view[:9]) == b"unaligned"


@pytest.mark.parametrize(
    ("spec_args", "fragment"),
    [
        ((0, 0, 0, 0), "size 0"),
        ((0, -PAGE, 0, 0), "size -4096"),
        ((-PAGE, PAGE, 0, 0), "negative"),
        ((0, PAGE, -1, 0), "negative"),
        ((0, PAGE, 0, -PAGE), "negative"),
        ((0, 5 * PAGE, 0, 0), "cannot map"),  # larger than the file
        ((0, PAGE, 0, 4 * PAGE), "cannot map"),  # offset at the end of the file
        ((0, PAGE, 0, 1 << 70), "cannot map"),  # offset overflows off_t
    ],
)
def test_region_map_refuses_bad_specs(memfd: int, spec_args: tuple[int, int, int, int],
                                      fragment: str) -> None:
    gpa, size, user, offset = spec_args
    with pytest.raises(GuestMemoryError, match=fragment):
        Region.map(RegionSpec(gpa, size, user, offset, memfd))


def test_region_map_refuses_a_bad_fd() -> None:
    r, w = os.pipe()
    os.close(w)
    try:
        with pytest.raises(GuestMemoryError, match="cannot map"):
            Region.map(RegionSpec(0, PAGE, 0, 0, r))  # a pipe cannot be mapped
    finally:
        os.close(r)


def test_memfd_region_user_addr_is_the_mapping_address() -> None:
    fd, region = memfd_region(2 * PAGE, guest_addr=0x200000)
    os.close(fd)
    assert region.user_addr == buffer_address(region.view)
    region.view[PAGE:PAGE + 4] = b"abcd"
    assert ctypes.string_at(region.user_addr + PAGE, 4) == b"abcd"
    assert region.guest_addr == 0x200000 and region.guest_end == 0x202000


def test_views_outlive_the_memory_object() -> None:
    mem = make_memory((0, PAGE))
    mem.write(10, b"still mapped")
    view = mem.slice(10, 12)
    del mem
    gc.collect()
    assert bytes(view) == b"still mapped"


# -- translation --------------------------------------------------------------
def test_slice_inside_each_region() -> None:
    mem = standard_memory()
    for gpa, size in (REGION_A, REGION_B, REGION_C):
        mem.write(gpa + size - 4, b"tail")
        assert mem.read(gpa + size - 4, 4) == b"tail"
        assert len(mem.slice(gpa, size)) == size


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (REGION_A[1] - 4, 8),  # straddles A and B, both mapped but separate regions
        (REGION_B[0] + REGION_B[1] - 1, 2),  # past B into the gap
        (REGION_B[0] + REGION_B[1], 1),  # in the gap
        (REGION_C[0] - 1, 2),  # from the gap into C
        (REGION_C[0] + REGION_C[1], 1),  # past the last region
        (REGION_C[0], REGION_C[1] + 1),  # one byte too long
        (0, 1 << 64),  # absurd length
        ((1 << 64) - 1, 1),  # top of the address space
        (-1, 1),  # negative address
        (-16, 32),  # negative address reaching into region A
        (0, -1),  # negative length
    ],
)
def test_slice_refuses_ranges_not_inside_one_region(addr: int, length: int) -> None:
    mem = standard_memory()
    with pytest.raises(GuestMemoryError, match="not in guest memory"):
        mem.slice(addr, length)


def test_failed_write_changes_nothing() -> None:
    mem = standard_memory()
    with pytest.raises(GuestMemoryError):
        mem.write(REGION_A[1] - 2, b"XXXX")
    assert mem.read(REGION_A[1] - 2, 2) == b"\0\0"
    assert mem.read(REGION_B[0], 2) == b"\0\0"


def test_zero_length_slice_at_region_end_is_empty() -> None:
    mem = standard_memory()
    assert len(mem.slice(REGION_C[0] + REGION_C[1], 0)) == 0
    with pytest.raises(GuestMemoryError):
        mem.slice(REGION_C[0] + REGION_C[1] + 1, 0)  # beyond the end, even empty


def test_regions_do_not_alias() -> None:
    mem = standard_memory()
    mem.write(REGION_A[1] - 1, b"a")
    mem.write(REGION_B[0], b"b")
    assert mem.read(REGION_A[1] - 1, 1) == b"a" and mem.read(REGION_B[0], 1) == b"b"


# -- add / remove --------------------------------------------------------------
@pytest.mark.parametrize(
    ("gpa", "size"),
    [(0x10000, PAGE), (0x0F000, 2 * PAGE), (0x1F000, 2 * PAGE), (0x0, 0x40000),
     (0x100800, PAGE), (0x0FF800, PAGE)],
)
def test_overlapping_region_refused(gpa: int, size: int) -> None:
    mem = standard_memory()
    fd, region = memfd_region(size, guest_addr=gpa)
    os.close(fd)
    with pytest.raises(GuestMemoryError, match="overlaps"):
        mem.add(region)
    assert [r.guest_addr for r in mem] == [REGION_A[0], REGION_B[0], REGION_C[0]]


def test_adjacent_regions_accepted_and_kept_sorted() -> None:
    mem = make_memory((0x30000, PAGE), (0x10000, PAGE), (0x20000, 0x10000), (0x11000, PAGE))
    assert [r.guest_addr for r in mem] == [0x10000, 0x11000, 0x20000, 0x30000]
    assert len(mem) == 4


def test_remove_exact_region_only() -> None:
    mem = standard_memory()
    with pytest.raises(GuestMemoryError, match="no region"):
        mem.remove(REGION_B[0], REGION_B[1] - 1)
    with pytest.raises(GuestMemoryError, match="no region"):
        mem.remove(REGION_B[0] + 1, REGION_B[1])
    removed = mem.remove(*REGION_B)
    assert removed.guest_addr == REGION_B[0]
    assert len(mem) == 2
    with pytest.raises(GuestMemoryError):
        mem.slice(REGION_B[0], 1)
    assert len(mem.slice(*REGION_C)) == REGION_C[1]  # the others still translate


# -- user_to_guest ---------------------------------------------------------------
def test_user_to_guest_translates_and_bounds_checks() -> None:
    mem = standard_memory()
    regions = list(mem)
    b = regions[1]
    assert mem.user_to_guest(b.user_addr, 16) == b.guest_addr
    assert mem.user_to_guest(b.user_addr + 100, b.size - 100) == b.guest_addr + 100
    with pytest.raises(GuestMemoryError, match="user range"):
        mem.user_to_guest(b.user_addr + b.size - 8, 16)
    with pytest.raises(GuestMemoryError, match="user range"):
        mem.user_to_guest(min(r.user_addr for r in regions) - 16, 8)
    with pytest.raises(GuestMemoryError, match="user range"):
        mem.user_to_guest(b.user_addr, b.size + 1)


def test_user_to_guest_with_explicit_user_addresses(memfd: int) -> None:
    mem = GuestMemory([Region.map(RegionSpec(0x100000, 2 * PAGE, 0x7000_0000, 0, memfd))])
    assert mem.user_to_guest(0x7000_0000 + 0x10, 0x20) == 0x100010
    with pytest.raises(GuestMemoryError):
        mem.user_to_guest(0x100000, 16)  # a guest address is not a user address


# -- property: translation agrees with a reference model --------------------------
LAYOUT = (REGION_A, REGION_B, REGION_C)
_MEM = standard_memory()
for _gpa, _size in LAYOUT:
    _MEM.write(_gpa, bytes((_gpa >> 12) + i & 0xFF for i in range(_size)))

interesting_addr = st.one_of(
    st.sampled_from([g + d for g, s in LAYOUT for d in (-1, 0, 1, s - 1, s, s + 1)]),
    st.integers(-(1 << 20), 0x200000),
    st.integers(0, (1 << 64) - 1),
)


@settings(max_examples=300, deadline=None)
@given(addr=interesting_addr, length=st.integers(-2, 0x20002))
def test_slice_matches_reference(addr: int, length: int) -> None:
    inside = [g for g, s in LAYOUT if length >= 0 and g <= addr and addr + length <= g + s]
    if not inside:
        with pytest.raises(GuestMemoryError):
            _MEM.slice(addr, length)
        return
    gpa = inside[0]
    view = _MEM.slice(addr, length)
    assert len(view) == length
    expected = bytes((gpa >> 12) + i & 0xFF for i in range(addr - gpa, addr - gpa + length))
    assert bytes(view) == expected
