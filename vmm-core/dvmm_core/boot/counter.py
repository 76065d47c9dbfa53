"""The counter disk: a boot program that counts on COM1 and echoes its input.

``counter_boot.S`` (next to this module) is the workload of the management
tests: SeaBIOS boots it, it prints ``dvmm-count: N`` for N = 1, 2, 3, ...
(a few lines a second: between two lines it polls COM1 ``delay`` times) and
echoes every byte it receives as ``dvmm-count: echo HH``.  So a test sees
whether the guest makes progress (QMP ``stop``/``cont``), that it starts
over after a reset, and exactly which bytes reached the guest's UART (the
serial console's escape keys).  This module writes such a disk
(:func:`make_counter_disk`) and reads a serial log (:func:`parse_counter`).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import NamedTuple

from .demo import IMAGE_ALIGN, PARAMS_OFFSET, assemble_boot_sector

SOURCE_NAME = "counter_boot.S"
MAGIC = b"DVMC"
BOOTED = "dvmm-count: booted"
DEFAULT_DELAY = 5000

_COUNT = re.compile(r"dvmm-count: (\d+)\r?$", re.M)
_ECHO = re.compile(r"dvmm-count: echo ([0-9A-F]{2})\r?$", re.M)


class CounterOutput(NamedTuple):
    counts: list[int]   # every counter value printed, in order
    echoed: bytes       # every byte the guest received, in order
    boots: int          # how many times the program started


def make_counter_disk(path: Path, delay: int = DEFAULT_DELAY) -> Path:
    """A bootable image: the program with ``delay`` polls per line, padded
    to a whole MiB (SeaBIOS needs a cylinder of its CHS translation)."""
    if not 1 <= delay < 1 << 32:
        raise ValueError(f"delay {delay} out of range")
    sector = bytearray(assemble_boot_sector(name=SOURCE_NAME, magic=MAGIC))
    struct.pack_into("<4sI", sector, PARAMS_OFFSET, MAGIC, delay)
    path.write_bytes(bytes(sector) + bytes(IMAGE_ALIGN - len(sector)))
    return path


def parse_counter(text: str) -> CounterOutput:
    return CounterOutput([int(m) for m in _COUNT.findall(text)],
                         bytes(int(h, 16) for h in _ECHO.findall(text)), text.count(BOOTED))
