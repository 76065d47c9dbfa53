"""Guest memory as seen from a process that maps it: a set of regions.

A region is a piece of guest RAM living in a file descriptor (a memfd shared
by the core) at some offset.  It has a guest-physical address (what
descriptors carry) and, for vhost-user, the frontend's userspace address
(what ring addresses carry).  This module maps regions and turns
``(address, length)`` into a ``memoryview`` slice of the mapping, refusing any
access that is not entirely inside one region: guest addresses are hostile.

It owns the mappings; it does not know about rings or devices.  Mappings are
never closed explicitly: dropping the last reference (the region and every
view taken from it) unmaps it, so a view handed out can never point at
unmapped memory.
"""

from __future__ import annotations

import bisect
import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field


class GuestMemoryError(Exception):
    """An address range that is not fully inside one mapped region."""


@dataclass(frozen=True)
class RegionSpec:
    """Where a region lives: addresses, size and the backing fd + offset."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    fd: int


@dataclass
class Region:
    """One mapped region of guest memory."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    view: memoryview = field(repr=False)
    _mapping: mmap.mmap = field(repr=False)

    @property
    def guest_end(self) -> int:
        return self.guest_addr + self.size

    @classmethod
    def map(cls, spec: RegionSpec) -> Region:
        """Map ``spec.fd`` (the caller keeps ownership of the fd)."""
        if spec.size <= 0:
            raise GuestMemoryError(f"region at {spec.guest_addr:#x} has size {spec.size}")
        if spec.guest_addr < 0 or spec.mmap_offset < 0 or spec.user_addr < 0:
            raise GuestMemoryError("region with a negative address or offset")
        # mmap offsets must be page aligned; vhost-user's mmap_offset need
        # not be, so map from the page below and skip the difference.
        gran = mmap.ALLOCATIONGRANULARITY
        base = spec.mmap_offset - spec.mmap_offset % gran
        skip = spec.mmap_offset - base
        try:
            mapping = mmap.mmap(
                spec.fd, spec.size + skip, mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE, offset=base,
            )
        except (OSError, ValueError, OverflowError) as exc:
            raise GuestMemoryError(
                f"cannot map region gpa={spec.guest_addr:#x} size={spec.size:#x}: {exc}"
            ) from exc
        view = memoryview(mapping)[skip:skip + spec.size]
        return cls(spec.guest_addr, spec.size, spec.user_addr, spec.mmap_offset, view, mapping)


class GuestMemory:
    """The regions of guest memory, with bounds-checked translation."""

    def __init__(self, regions: Iterable[Region] = ()) -> None:
        self._regions: list[Region] = []
        self._starts: list[int] = []
        for region in regions:
            self.add(region)

    @classmethod
    def from_specs(cls, specs: Iterable[RegionSpec]) -> GuestMemory:
        return cls(Region.map(s) for s in specs)

    def __iter__(self) -> Iterator[Region]:
        return iter(self._regions)

    def __len__(self) -> int:
        return len(self._regions)

    def add(self, region: Region) -> None:
        """Insert a region; overlapping guest ranges are refused."""
        i = bisect.bisect_left(self._starts, region.guest_addr)
        prev = self._regions[i - 1] if i > 0 else None
        nxt = self._regions[i] if i < len(self._regions) else None
        if (prev and prev.guest_end > region.guest_addr) or (
            nxt and region.guest_end > nxt.guest_addr
        ):
            raise GuestMemoryError(
                f"region {region.guest_addr:#x}+{region.size:#x} overlaps an existing one"
            )
        self._regions.insert(i, region)
        self._starts.insert(i, region.guest_addr)

    def remove(self, guest_addr: int, size: int) -> Region:
        """Remove the region that starts at ``guest_addr`` with ``size``."""
        i = bisect.bisect_left(self._starts, guest_addr)
        if i < len(self._regions):
            region = self._regions[i]
            if region.guest_addr == guest_addr and region.size == size:
                del self._regions[i], self._starts[i]
                return region
        raise GuestMemoryError(f"no region {guest_addr:#x}+{size:#x} to remove")

    def slice(self, addr: int, length: int) -> memoryview:
        """The bytes ``[addr, addr+length)`` of guest-physical memory."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and length >= 0:
            r = self._regions[i]
            off = addr - r.guest_addr
            if off + length <= r.size:
                return r.view[off:off + length]
        raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} is not in guest memory")

    def user_to_guest(self, user_addr: int, length: int) -> int:
        """Translate a frontend userspace address (vhost-user rings) to guest-physical."""
        for r in self._regions:
            off = user_addr - r.user_addr
            if off >= 0 and off + length <= r.size:
                return r.guest_addr + off
        raise GuestMemoryError(f"user range {user_addr:#x}+{length:#x} is not in guest memory")

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.slice(addr, length))

    def write(self, addr: int, data: bytes | memoryview) -> None:
        self.slice(addr, len(data))[:] = data


def memfd_region(size: int, guest_addr: int = 0, name: str = "dvmm-ram",
                 hugetlb: bool = False) -> tuple[int, Region]:
    """Create a memfd of ``size`` bytes and map it as one region.

    Returns ``(fd, region)``; the caller owns the fd (it is what gets passed
    to backends) and the region's user address is the mapping's address in
    this process, as a vhost-user frontend reports it.
    """
    flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB if hugetlb else 0)
    fd = os.memfd_create(name, flags)
    try:
        os.ftruncate(fd, size)
        region = Region.map(RegionSpec(guest_addr, size, 0, 0, fd))
    except BaseException:
        os.close(fd)
        raise
    region.user_addr = buffer_address(region.view)
    return fd, region


def buffer_address(view: memoryview) -> int:
    """The process address of a writable buffer (for vhost-user user addresses)."""
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view))
