"""The re-read disk: a boot program that reads one region over and over.

``reread_boot.S`` (next to this module) is the crash-recovery workload of
the core tier: SeaBIOS boots it, it reads ``count`` sectors from LBA 1
``reads`` times through int 13h and compares every read with the first, so
a request lost, completed twice or answered with wrong data while its
backend is killed and restarted shows up as a mismatch or a read error.
This module writes such a disk (:func:`make_reread_disk`) and reads the
program's verdict from a serial log (:func:`parse_reread_output`).
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .demo import IMAGE_ALIGN, PARAMS_OFFSET, SECTOR_SIZE, assemble_boot_sector

SOURCE_NAME = "reread_boot.S"
MAGIC = b"DVMR"
PARAMS_FORMAT = "<4sIBB"
MAX_COUNT = 127

_DONE = re.compile(r"dvmm-reread: done (\d+) equal")
_FAIL = re.compile(r"dvmm-reread: (MISMATCH at read \d+|read error AH=[0-9A-F]+ at read \d+|"
                   r"bad params)")
_PROGRESS = re.compile(r"dvmm-reread: reads (\d+)")


@dataclass(frozen=True)
class RereadResult:
    done: int | None      # reads completed and equal, when the program finished
    failure: str | None   # what went wrong, when it did
    progress: int         # the last progress line (reads so far)


def make_reread_disk(path: Path, reads: int, count: int = 8, seed: int = 0) -> None:
    """A bootable image: the program, then ``count`` sectors of seeded data."""
    if not 1 <= count <= MAX_COUNT or not 1 <= reads < 1 << 32:
        raise ValueError(f"reads {reads} / count {count} out of range")
    sector = bytearray(assemble_boot_sector(name=SOURCE_NAME, magic=MAGIC))
    struct.pack_into(PARAMS_FORMAT, sector, PARAMS_OFFSET, MAGIC, reads, 0, count)
    data = hashlib.shake_256(f"dvmm-reread:{seed}".encode()).digest(count * SECTOR_SIZE)
    image = bytes(sector) + data
    image += bytes(-len(image) % IMAGE_ALIGN)
    path.write_bytes(image)


def parse_reread_output(text: str) -> RereadResult:
    done = _DONE.search(text)
    fail = _FAIL.search(text)
    progress = [int(m) for m in _PROGRESS.findall(text)]
    return RereadResult(int(done.group(1)) if done else None,
                        fail.group(1) if fail else None, max(progress, default=0))
