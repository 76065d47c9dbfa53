"""The blk workloads of a chaos campaign under the dvmm core, and their oracles.

Owns the guest programs next to this module, the disks they boot from, the
reading of their serial log into a :class:`GuestView` (progress,
mismatches: acknowledged data altered, never allowed; I/O errors: allowed
only while a fault the guest may see is armed) and the host's check of the
image after the VM stopped.  SeaBIOS boots either program:

* ``blk`` (``boot/reread_boot.S`` assembled with ``--defsym CHAOS=1``):
  reads one region through int 13h for ever and compares every read with
  the first; the image's data must be unchanged;
* ``blk-write`` (``chaos_write_boot.S``): write number S puts S's pattern in
  slot S mod N, reads it back and compares; the image must then hold N
  intact writes with consecutive numbers (the last N acknowledged ones, or
  the one in flight when the VM stopped in place of its slot's previous),
  the newest at least the last number the guest reported.

A failed request is reported and retried by both.  It does not run the VM
(:mod:`.vm`) or decide outcomes (:mod:`.campaign`).
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

SOURCE = "reread_boot.S"        # in dvmm_core.boot, with CHAOS defined
MAGIC = b"DVMC"
WRITE_SOURCE = "chaos_write_boot.S"
WRITE_MAGIC = b"DVMW"
SLOTS = 16                      # blk-write: sectors written in turn
KINDS = ("blk", "blk-write")
PARAMS_FORMAT = "<4sIBB"
SECTORS = 8                     # sectors per read (one 4 KiB request)
FOREVER = (1 << 32) - 1         # reads: the program outlives any campaign

_BOOTED = "dvmm-chaos: booted"
_MISMATCH = re.compile(r"dvmm-chaos: MISMATCH at (?:read|write) (\d+)")
_READ_ERROR = re.compile(r"dvmm-chaos: (?:read|I/O) error AH=([0-9A-F]+)")
_PROGRESS = re.compile(r"dvmm-chaos: (?:reads|writes) (\d+)")
_FATAL = re.compile(r"dvmm-chaos: (bad params|done \d+ equal)")


class WorkloadError(RuntimeError):
    """The guest program cannot be built (binutils missing, bad source)."""


def _text(name: str, package: str) -> bytes:
    return resources.files(package).joinpath(name).read_bytes()


def boot_sector(source: str = SOURCE) -> bytes:
    """A guest program assembled (as --32, ld -Ttext 0x7c00, binary): 512 bytes.
    ``blk``'s program is the re-read workload of the core tier in its chaos
    variant (one source, :data:`SOURCE` in :mod:`dvmm_core.boot`)."""
    package, defsym = ("dvmm_core.boot", ["--defsym", "CHAOS=1"]) if source == SOURCE else \
        (__package__ or "dvmm_core.chaos", [])
    with tempfile.TemporaryDirectory(prefix="dvmm-chaos-boot-") as tmp:
        Path(tmp, source).write_bytes(_text(source, package))
        for inc in INCLUDES:
            Path(tmp, inc).write_bytes(_text(inc, "dvmm_core.boot"))
        for argv in (["as", "--32", *defsym, "-o", "boot.o", source],
                     ["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "-e", "_start",
                      "--oformat", "binary", "-o", "boot.bin", "boot.o"]):
            try:
                done = subprocess.run(argv, cwd=tmp, capture_output=True, text=True)
            except FileNotFoundError:
                raise WorkloadError(f"{argv[0]} not found (apt-get install binutils)") from None
            if done.returncode != 0:
                raise WorkloadError(f"{argv[0]} failed on {source}: {done.stderr.strip()}")
        image = Path(tmp, "boot.bin").read_bytes()
    if len(image) != SECTOR_SIZE or image[510:] != b"\x55\xaa":
        raise WorkloadError(f"{source}: not a 512-byte boot sector ({len(image)} bytes)")
    return image


def pattern(seq: int) -> bytes:
    """The sector of write ``seq``: dword k = seq xor (k * 0x9E3779B9) mod 2^32."""
    return struct.pack("<128I", *((seq ^ (k * 0x9E3779B9)) & 0xFFFFFFFF for k in range(128)))


def make_disk(path: Path, seed: int, kind: str = "blk") -> str:
    """Write the bootable image of workload ``kind``; return the SHA-256 of its
    data region (``blk``) or "" (``blk-write``: checked by :func:`check_writes`)."""
    if kind == "blk-write":
        sector = bytearray(boot_sector(WRITE_SOURCE))
        struct.pack_into(PARAMS_FORMAT, sector, PARAMS_OFFSET, WRITE_MAGIC, 0, SLOTS, 0)
        # Slot s starts as write s: the first pass rewrites the same bytes.
        image = bytes(sector) + b"".join(pattern(s) for s in range(SLOTS))
        path.write_bytes(image + bytes(-len(image) % IMAGE_ALIGN))
        return ""
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


def check_writes(path: Path, progress: int) -> str | None:
    """Why the image of a stopped ``blk-write`` VM breaks the oracle (None: it holds)."""
    with path.open("rb") as f:
        f.seek(SECTOR_SIZE)
        region = f.read(SLOTS * SECTOR_SIZE)
    seqs = []
    for slot in range(SLOTS):
        block = region[slot * SECTOR_SIZE:(slot + 1) * SECTOR_SIZE]
        seq = struct.unpack_from("<I", block)[0]
        if block != pattern(seq) or seq % SLOTS != slot:
            return f"slot {slot}: not an intact write for this slot (dword 0 = {seq})"
        seqs.append(seq)
    seqs.sort()
    if seqs != list(range(seqs[0], seqs[0] + SLOTS)):
        return f"the slots do not hold {SLOTS} consecutive writes: {seqs}"
    if seqs[-1] + 1 < progress:
        return f"acknowledged writes lost: newest on disk {seqs[-1]}, guest verified {progress}"
    return None


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
