"""qcow2 internal snapshots: the snapshot table, parsed and checked.

Owns qcow2.txt's "Snapshots" section: the variable-length table entries
(L1 table of the snapshot, id, name, dates, VM state size, virtual disk
size).  dvmm lists snapshots and reads their disk contents (through a
:class:`~.qcow2_image.Qcow2Image` opened on the snapshot's L1 table); it
does not create, apply or delete them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .base import ImageCorrupt, ImageFile
from .qcow2_header import MAX_L1_BYTES, Qcow2Header

ENTRY = struct.Struct(">QIHHIIQII")  # 40 bytes
MAX_EXTRA = 1024
MAX_TABLE_BYTES = 64 << 20  # QEMU's QCOW_MAX_SNAPSHOTS_SIZE


@dataclass(frozen=True)
class Snapshot:
    index: int
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None  # None: not recorded (version 2 entries), the image's
    icount: int | None = None  # instructions executed (record/replay), if recorded


def read_snapshots(file: ImageFile, h: Qcow2Header) -> list[Snapshot]:
    """Every snapshot of the table, each field checked."""
    out: list[Snapshot] = []
    pos = h.snapshots_offset
    for i in range(h.nb_snapshots):
        if pos - h.snapshots_offset > MAX_TABLE_BYTES:
            raise ImageCorrupt("qcow2 snapshot table is too large")
        raw = file.read(pos, ENTRY.size, f"qcow2 snapshot {i} entry")
        (l1_off, l1_size, id_len, name_len, sec, nsec, clock, vm32,
         extra_len) = ENTRY.unpack(raw)
        if extra_len > MAX_EXTRA:
            raise ImageCorrupt(f"qcow2 snapshot {i} has {extra_len} bytes of extra data")
        extra = file.read(pos + ENTRY.size, extra_len, f"qcow2 snapshot {i} extra data")
        vm_state, disk_size = vm32, None
        if extra_len >= 8:
            vm_state = struct.unpack_from(">Q", extra)[0]
        if extra_len >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        icount = struct.unpack_from(">Q", extra, 16)[0] if extra_len >= 24 else None
        if icount == (1 << 64) - 1:
            icount = None
        names = file.read(pos + ENTRY.size + extra_len, id_len + name_len,
                          f"qcow2 snapshot {i} name")
        _check_l1(file, h, i, l1_off, l1_size)
        out.append(Snapshot(i, names[:id_len].decode("utf-8", "replace"),
                            names[id_len:].decode("utf-8", "replace"), l1_off, l1_size,
                            sec, nsec, clock, vm_state, disk_size, icount))
        length = ENTRY.size + extra_len + id_len + name_len
        pos += length + (-length % 8)
    return out


def table_length(file: ImageFile, h: Qcow2Header) -> int:
    """Bytes the snapshot table takes (for reference counting)."""
    pos = h.snapshots_offset
    for i in range(h.nb_snapshots):
        raw = file.read(pos, ENTRY.size, f"qcow2 snapshot {i} entry")
        _, _, id_len, name_len, _, _, _, _, extra_len = ENTRY.unpack(raw)
        length = ENTRY.size + extra_len + id_len + name_len
        pos += length + (-length % 8)
    return pos - h.snapshots_offset


def _check_l1(file: ImageFile, h: Qcow2Header, i: int, offset: int, size: int) -> None:
    if size * 8 > MAX_L1_BYTES:
        raise ImageCorrupt(f"qcow2 snapshot {i} L1 table of {size} entries is too large")
    if size and offset % h.cluster_size:
        raise ImageCorrupt(f"qcow2 snapshot {i} L1 table offset {offset:#x} is not aligned")
    if size and offset + 8 * size > file.size:
        raise ImageCorrupt(f"qcow2 snapshot {i} L1 table lies beyond the end of the file")


def find_snapshot(snapshots: list[Snapshot], key: str) -> Snapshot:
    """A snapshot by id or name (id first, as qemu-img does)."""
    for s in snapshots:
        if s.id == key:
            return s
    for s in snapshots:
        if s.name == key:
            return s
    from .base import ImageError

    raise ImageError(f"no snapshot {key!r} in the image")
