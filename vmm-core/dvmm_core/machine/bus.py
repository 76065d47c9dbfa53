"""Port-I/O and MMIO dispatch: which device model answers a guest access.

Owns the address maps.  A device registers a range and gets accesses with
the offset into its range; an access nobody claims reads as all ones and a
write to it is dropped, each logged once per address so a chatty guest
cannot flood the log.  Devices see plain integers of 1, 2, 4 (or 8 for
MMIO) bytes.

Dispatch is on every guest exit (``kvm.runner``), so it is one dict lookup:
each address the guest has used maps to ``(base, read, write)`` of its
device; a miss searches the sorted ranges (bisect) and fills the entry.
(Un)registering a range empties the cache.  The cache is bounded: a guest
sweeping MMIO addresses costs a bisect per access, never memory.

Accesses are serialised per bus when several vCPU threads dispatch (device
models are simple and not re-entrant).  A machine with one vCPU builds its
buses with ``serialize=False``: only that vCPU's thread dispatches, so the
lock would protect nothing and costs a quarter of a port exit's Python work.
Device state shared with other threads (the console, the INTx pump) has its
own locks in the device models.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable
from typing import NamedTuple, Protocol

log = logging.getLogger("dvmm.bus")


class BusDevice(Protocol):
    """A device model on a bus: reads return the value, writes return nothing."""

    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...


class BusError(Exception):
    """A registration that overlaps an existing range."""


#: Cached addresses per bus (a PC's port space is 64 Ki; MMIO BARs are 4-16 KiB).
CACHE_LIMIT = 8192
_Hit = tuple[int, Callable[[int, int], int], Callable[[int, int, int], None]]


class _Range(NamedTuple):
    base: int
    length: int
    device: BusDevice
    name: str


class Bus:
    """An address space (port I/O or MMIO) of non-overlapping device ranges."""

    def __init__(self, name: str, *, serialize: bool = True) -> None:
        self.name = name
        self._ranges: list[_Range] = []
        self._bases: list[int] = []
        self._logged: set[tuple[str, int]] = set()
        self._hits: dict[int, _Hit] = {}
        # Several vCPU threads: accesses are serialised (see the module doc).
        self.lock = threading.Lock() if serialize else None

    def register(self, base: int, length: int, device: BusDevice, name: str = "") -> None:
        i = bisect.bisect_left(self._bases, base)
        for r in self._ranges[max(0, i - 1):i + 1]:
            if base < r.base + r.length and r.base < base + length:
                raise BusError(f"{self.name}: {name or device} at {base:#x}+{length:#x} "
                               f"overlaps {r.name} at {r.base:#x}+{r.length:#x}")
        self._ranges.insert(i, _Range(base, length, device, name or type(device).__name__))
        self._bases.insert(i, base)
        self._hits = {}

    def unregister(self, base: int) -> None:
        i = bisect.bisect_left(self._bases, base)
        if i < len(self._bases) and self._bases[i] == base:
            del self._ranges[i], self._bases[i]
            self._hits = {}

    def find(self, addr: int) -> _Range | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            r = self._ranges[i]
            if addr < r.base + r.length:
                return r
        return None

    def _lookup(self, addr: int) -> _Hit | None:
        """The cache miss: find the range, remember it for ``addr``."""
        r = self.find(addr)
        if r is None:
            return None
        hit = (r.base, r.device.read, r.device.write)
        hits = self._hits
        if len(hits) < CACHE_LIMIT:
            hits[addr] = hit
        return hit

    def read(self, addr: int, size: int) -> int:
        hit = self._hits.get(addr) or self._lookup(addr)
        if hit is None:
            self._log_once("read", addr, size)
            return (1 << (8 * size)) - 1
        lock = self.lock  # acquire/release: half the cost of a with block (no __enter__ lookup)
        if lock is None:
            return hit[1](addr - hit[0], size) & ((1 << (8 * size)) - 1)
        lock.acquire()
        try:
            return hit[1](addr - hit[0], size) & ((1 << (8 * size)) - 1)
        finally:
            lock.release()

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self._hits.get(addr) or self._lookup(addr)
        if hit is None:
            self._log_once("write", addr, size, value)
            return
        lock = self.lock
        if lock is None:
            hit[2](addr - hit[0], size, value)
            return
        lock.acquire()
        try:
            hit[2](addr - hit[0], size, value)
        finally:
            lock.release()

    def _log_once(self, kind: str, addr: int, size: int, value: int | None = None) -> None:
        if (kind, addr) in self._logged:
            return
        self._logged.add((kind, addr))
        extra = "" if value is None else f" of {value:#x}"
        log.debug("%s: unclaimed %d-byte %s at %#x%s", self.name, size, kind, addr, extra)
