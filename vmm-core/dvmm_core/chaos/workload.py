"""The blk workload of a chaos campaign under the dvmm core, and its oracle.

Owns the guest program (``chaos_boot.S`` next to this module: SeaBIOS boots
it, it reads one region through int 13h for ever and compares every read
with the first, reporting and retrying a failed read), the disk it boots
from, and the reading of its serial log into a :class:`GuestView`: reads so
far, mismatches (acknowledged data altered: never allowed), read errors
(allowed only while a fault the guest may see is armed).  It does not run
the VM (:mod:`.vm`) or decide outcomes (:mod:`.campaign`).
"""

from __future__ import annotations

import hashlib
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dvmm_core.boot.demo import IMAGE_ALIGN, INCLUDES, PARAMS_OFFSET, SECTOR_SIZE

SOURCE = "chaos_boot.S"
MAGIC = b"DVMC"
PARAMS_FORMAT = "<4sIBB"
SECTORS = 8                     # sectors per read (one 4 KiB request)
FOREVER = (1 << 32) - 1         # reads: the program outlives any campaign

_BOOTED = "dvmm-chaos: booted"
_MISMATCH = re.compile(r"dvmm-chaos: MISMATCH at read (\d+)")
_READ_ERROR = re.compile(r"dvmm-chaos: read error AH=([0-9A-F]+)")
_PROGRESS = re.compile(r"dvmm-chaos: reads (\d+)")
_FATAL = re.compile(r"dvmm-chaos: (bad params|done \d+ equal)")


class WorkloadError(RuntimeError):
    """The guest program cannot be built (binutils missing, bad source)."""


def _text(name: str, package: str) -> bytes:
    return resources.files(package).joinpath(name).read_bytes()


def boot_sector() -> bytes:
    """``chaos_boot.S`` assembled (as --32, ld -Ttext 0x7c00, binary): 512 bytes."""
    with tempfile.TemporaryDirectory(prefix="dvmm-chaos-boot-") as tmp:
        Path(tmp, SOURCE).write_bytes(_text(SOURCE, __package__ or "dvmm_core.chaos"))
        for inc in INCLUDES:
            Path(tmp, inc).write_bytes(_text(inc, "dvmm_core.boot"))
        for argv in (["as", "--32", "-o", "boot.o", SOURCE],
                     ["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "-e", "_start",
                      "--oformat", "binary", "-o", "boot.bin", "boot.o"]):
            try:
                done = subprocess.run(argv, cwd=tmp, capture_output=True, text=True)
            except FileNotFoundError:
                raise WorkloadError(f"{argv[0]} not found (apt-get install binutils)") from None
            if done.returncode != 0:
                raise WorkloadError(f"{argv[0]} failed on {SOURCE}: {done.stderr.strip()}")
        image = Path(tmp, "boot.bin").read_bytes()
    if len(image) != SECTOR_SIZE or image[510:] != b"\x55\xaa":
        raise WorkloadError(f"{SOURCE}: not a 512-byte boot sector ({len(image)} bytes)")
    return image


def make_disk(path: Path, seed: int) -> str:
    """Write the bootable image; return the SHA-256 of its data region."""
    sector = bytearray(boot_sector())
    struct.pack_into(PARAMS_FORMAT, sector, PARAMS_OFFSET, MAGIC, FOREVER, 0, SECTORS)
    data = hashlib.shake_256(f"dvmm-chaos:{seed}".encode()).digest(SECTORS * SECTOR_SIZE)
    image = bytes(sector) + data
    image += bytes(-len(image) % IMAGE_ALIGN)
    path.write_bytes(image)
    return hashlib.sha256(data).hexdigest()


def data_digest(path: Path) -> str:
    """SHA-256 of the data region the guest reads (what :func:`make_disk` returned)."""
    with path.open("rb") as f:
        f.seek(SECTOR_SIZE)
        return hashlib.sha256(f.read(SECTORS * SECTOR_SIZE)).hexdigest()


@dataclass(frozen=True)
class GuestView:
    """What the guest program has said so far."""

    booted: bool
    progress: int                 # the last progress line (reads so far)
    mismatches: int               # reads that differed from the first: data altered
    read_errors: int              # failed int 13h reads (each retried)
    stopped: str | None           # the program ended (it never should)


def parse(text: str) -> GuestView:
    stopped = _FATAL.search(text)
    progress = [int(m) for m in _PROGRESS.findall(text)]
    return GuestView(_BOOTED in text, max(progress, default=0), len(_MISMATCH.findall(text)),
                     len(_READ_ERROR.findall(text)), stopped.group(1) if stopped else None)


class SerialLog:
    """The guest's serial log file, parsed whenever asked."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def view(self) -> GuestView:
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        return parse(text)
