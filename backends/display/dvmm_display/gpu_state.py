"""virtio-gpu state that outlives the display process: encoding and the store.

Owns what a restarted display process needs to show the same screen with no
help from the guest: every 2D resource (id, format, size, the guest pages
attached as its backing), what each scanout shows (its size, resource and
rectangle) and the cursor (resource, hot spot, position) -- the table's
*description*, not its pixels: a restarted process reads the pixels back
from the backing pages, which the guest keeps.  Also the identity of the
last request that changed the table (:class:`Marker`), so the one request a
crash can leave applied but unanswered is answered, not applied twice, when
the in-flight region hands it out again.

The store is a piece of the in-flight memfd (INFLIGHT_SHMFD) past the
queues' region, which the frontend keeps across backend restarts (the dvmm
core does, :mod:`dvmm_core.inflight_region`).  Two slots, each a header
``{magic, format, u64 seq, u32 length, u32 crc32}`` and the payload: a save
writes the older slot, payload first and header last, so a process killed
mid-save leaves the other slot whole; a load takes the valid slot with the
higher sequence.  The memfd is hostile input like guest memory: lengths,
counts and checksums are checked, and a bad state is ignored (a blank
screen, never a crash).  Applying a state to a table is :mod:`.device`'s.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from dataclasses import dataclass, field

from .gpu_protocol import MAX_BACKING_ENTRIES, MemEntry, Rect

SLOT_SIZE = 4 << 20
STATE_SIZE = 2 * SLOT_SIZE
SLOT_HEADER = struct.Struct("<4sIQII")
MAGIC = b"DVGS"
FORMAT = 1
MAX_RESOURCES = 1 << 16

_HEAD = struct.Struct("<IIIIiiII?III")  # counts, cursor, marker
_RES = struct.Struct("<IIIII")
_ENTRY = struct.Struct("<QI")
_SCANOUT = struct.Struct("<IIIIIII")


class StateError(ValueError):
    """A state that cannot be encoded (too large) or decoded (corrupt)."""


@dataclass(frozen=True)
class Marker:
    """The last request that changed the table: queue, head, crc32 of its bytes."""

    queue: int
    head: int
    crc: int


@dataclass(frozen=True)
class ResourceState:
    resource_id: int
    format: int
    width: int
    height: int
    backing: tuple[MemEntry, ...] = ()


@dataclass(frozen=True)
class ScanoutState:
    width: int
    height: int
    resource_id: int = 0
    rect: Rect = field(default_factory=lambda: Rect(0, 0, 0, 0))


@dataclass(frozen=True)
class GpuState:
    resources: tuple[ResourceState, ...] = ()
    scanouts: tuple[ScanoutState, ...] = ()
    cursor_resource: int = 0
    cursor_scanout: int = 0
    cursor_pos: tuple[int, int] = (0, 0)
    cursor_hot: tuple[int, int] = (0, 0)
    marker: Marker | None = None


def encode(state: GpuState) -> bytes:
    m = state.marker
    out = [_HEAD.pack(len(state.resources), len(state.scanouts), state.cursor_resource,
                      state.cursor_scanout, *state.cursor_pos, *state.cursor_hot,
                      m is not None, *(m.queue, m.head, m.crc) if m else (0, 0, 0))]
    for r in state.resources:
        out.append(_RES.pack(r.resource_id, r.format, r.width, r.height, len(r.backing)))
        out.extend(_ENTRY.pack(e.addr, e.length) for e in r.backing)
    for s in state.scanouts:
        out.append(_SCANOUT.pack(s.width, s.height, s.resource_id, s.rect.x, s.rect.y,
                                 s.rect.width, s.rect.height))
    data = b"".join(out)
    if len(data) > SLOT_SIZE - SLOT_HEADER.size:
        raise StateError(f"state of {len(data)} bytes does not fit a {SLOT_SIZE}-byte slot")
    return data


def decode(data: bytes) -> GpuState:
    """A payload back to a state; StateError when it is malformed."""
    try:
        return _decode(memoryview(data))
    except struct.error as exc:
        raise StateError(f"truncated state: {exc}") from None


def _decode(view: memoryview) -> GpuState:
    (n_res, n_scan, cur_res, cur_scan, cx, cy, hx, hy, has_marker, mq, mh,
     mc) = _HEAD.unpack_from(view, 0)
    if n_res > MAX_RESOURCES or n_scan > 16:
        raise StateError(f"{n_res} resources, {n_scan} scanouts")
    pos = _HEAD.size
    resources = []
    for _ in range(n_res):
        rid, fmt, w, h, n = _RES.unpack_from(view, pos)
        pos += _RES.size
        if n > MAX_BACKING_ENTRIES:
            raise StateError(f"resource {rid}: {n} backing entries")
        backing = tuple(MemEntry(*_ENTRY.unpack_from(view, pos + i * _ENTRY.size))
                        for i in range(n))
        pos += n * _ENTRY.size
        resources.append(ResourceState(rid, fmt, w, h, backing))
    scanouts = []
    for _ in range(n_scan):
        w, h, rid, x, y, rw, rh = _SCANOUT.unpack_from(view, pos)
        pos += _SCANOUT.size
        scanouts.append(ScanoutState(w, h, rid, Rect(x, y, rw, rh)))
    marker = Marker(mq, mh, mc) if has_marker else None
    return GpuState(tuple(resources), tuple(scanouts), cur_res, cur_scan, (cx, cy), (hx, hy),
                    marker)


class StateStore:
    """The two slots in a mapped piece of the in-flight memfd."""

    def __init__(self, mapping: mmap.mmap, skip: int = 0) -> None:
        self._view = memoryview(mapping)[skip:skip + STATE_SIZE]
        if len(self._view) < STATE_SIZE:
            raise StateError(f"state region of {len(self._view)} bytes, need {STATE_SIZE}")
        self.seq = max((s for s, _ in self._valid()), default=0)
        self.saves = 0

    @classmethod
    def map(cls, fd: int, offset: int) -> StateStore:
        """Map ``STATE_SIZE`` bytes of ``fd`` at ``offset`` (the caller keeps
        the fd; the mapping lives as long as the store)."""
        skip = offset % mmap.ALLOCATIONGRANULARITY
        try:
            mapping = mmap.mmap(fd, STATE_SIZE + skip, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE, offset=offset - skip)
        except (OSError, ValueError, OverflowError) as exc:
            raise StateError(f"cannot map the state region: {exc}") from None
        return cls(mapping, skip)

    def _slot(self, i: int) -> memoryview:
        return self._view[i * SLOT_SIZE:(i + 1) * SLOT_SIZE]

    def _valid(self) -> list[tuple[int, bytes]]:
        """(seq, payload) of every slot whose header and checksum hold."""
        out = []
        for i in range(2):
            slot = self._slot(i)
            magic, fmt, seq, length, crc = SLOT_HEADER.unpack_from(slot)
            if magic != MAGIC or fmt != FORMAT or length > SLOT_SIZE - SLOT_HEADER.size:
                continue
            payload = bytes(slot[SLOT_HEADER.size:SLOT_HEADER.size + length])
            if _crc(seq, payload) == crc:
                out.append((seq, payload))
        return out

    def load(self) -> GpuState | None:
        """The newest whole state, or None (nothing saved, or both slots bad)."""
        valid = sorted(self._valid(), reverse=True)
        for _seq, payload in valid:
            try:
                return decode(payload)
            except StateError:
                continue
        return None

    def save(self, state: GpuState) -> None:
        data = encode(state)
        self.seq += 1
        slot = self._slot(self.seq % 2)
        slot[SLOT_HEADER.size:SLOT_HEADER.size + len(data)] = data
        slot[:SLOT_HEADER.size] = SLOT_HEADER.pack(MAGIC, FORMAT, self.seq, len(data),
                                                   _crc(self.seq, data))
        self.saves += 1

    def clear(self) -> None:
        """A new driver session: no state (both headers invalidated)."""
        for i in range(2):
            self._slot(i)[:SLOT_HEADER.size] = bytes(SLOT_HEADER.size)
        self.seq = 0


def _crc(seq: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<QI", seq, len(payload))))
