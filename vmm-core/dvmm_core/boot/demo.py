"""The demo disk: a boot sector that reads its payload through BIOS int 13h.

``demo_boot.S`` (next to this module) is a 512-byte MBR that SeaBIOS loads
from any disk it can boot (virtio-blk included).  It prints on COM1, reads
the payload (LBA 1 onwards) with int 13h extended reads (AH=42h) in chunks,
checksums every byte it read and prints the result, then halts or resets the
machine.  This module

* assembles the sector with binutils (``as --32`` + ``ld --oformat binary``)
  and caches it under ``${DVMM_CACHE:-~/.cache}/dvmm/boot/``, keyed by a hash
  of the source (:func:`assemble_boot_sector`);
* writes a disk image: the sector with its parameter block filled in plus a
  deterministic payload, and returns the checksum the program must print
  (:func:`make_demo_disk`, :class:`DemoDisk`);
* extracts the program's lines from a serial log (:func:`parse_demo_output`);
* provides ``dvmm demo-disk PATH`` (:func:`add_parser`).

The checksum (:func:`demo_checksum`): the payload as little-endian 32-bit
words ``w[0..n-1]``; ``A = B = 0``; for each word in order ``A = (A + w) mod
2**32`` and ``B = (B + A) mod 2**32``; the checksum is ``B`` (equal to
``sum((n - i) * w[i]) mod 2**32``).  It takes three instructions per word in
16-bit code and, unlike a plain sum, notices sectors read in the wrong order.

The payload is the message plus ``"\\n"`` followed by pseudo-random bytes:
payload block ``k`` (1 MiB each, the last one shorter) is
``SHAKE-256(b"dvmm-demo-disk:<seed>:<k>")``, so a disk is reproducible from
``(sectors, seed, message)`` alone.  The image is zero-padded to whole MiBs.

The program prints whole lines with interrupts disabled; SeaBIOS's serial
console may still flush a pending character of its own (a lone ``.`` line)
during an int 13h call, i.e. between two of the program's lines, which
:func:`parse_demo_output` ignores like the rest of SeaBIOS's output.  The
sector layout and the exact output are described in ``demo_boot.S``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from dvmm_shared.cli import UsageError, one_line

log = logging.getLogger(__name__)

SECTOR_SIZE = 512
SOURCE_NAME = "demo_boot.S"
#: Files the boot programs ``.include`` (part of the cache key).
INCLUDES = ("com1.inc", "com1_init.inc")
#: Where the parameter block sits in the boot sector (the first partition
#: entry's slot: its first byte, ``D``, is not a valid boot indicator, so the
#: disk reads as unpartitioned to Linux and libblkid).
PARAMS_OFFSET = 0x1BE
PARAMS_MAGIC = b"DVMD"
#: magic, payload sectors, after action, sectors per read.
PARAMS_FORMAT = "<4sIBB"
#: ``--after`` names and their codes in the parameter block.
AFTER_ACTIONS: dict[str, int] = {"halt": 0, "reset-cf9": 1, "reset-kbd": 2}
DEFAULT_SECTORS = 4096
DEFAULT_CHUNK = 64
#: Sectors per int 13h call: the EDD limit of 127 (SeaBIOS takes more, but
#: the 64 KiB buffer segment and other BIOSes do not).
MAX_CHUNK = 127
MAX_SECTORS = 0xFFFF_FFFF - 1
MAX_MESSAGE = 64
#: Images are zero-padded to whole MiBs: SeaBIOS reads the boot sector by CHS
#: and its LBA translation (16 heads x 63 sectors) gives a disk of fewer than
#: 1008 sectors zero cylinders ("Boot failed: could not read the boot disk").
IMAGE_ALIGN = 1 << 20
DEFAULT_MESSAGE = "hello from the dvmm demo disk"

PREFIX = "dvmm-demo: "
BANNER = PREFIX + "booted"
DONE = PREFIX + "done"

_BLOCK = 1 << 20
_WORD = next(code for code in "IL" if array(code).itemsize == 4)  # a C uint32
_MASK = 0xFFFF_FFFF
# Bump when the build recipe (tools, flags) changes: part of the cache key.
_RECIPE = b"as --32 | ld -m elf_i386 -Ttext 0x7c00 -e _start --oformat binary | v1"


class BootBuildError(UsageError):
    """The boot sector could not be built (binutils missing, bad source)."""


# --------------------------------------------------------------------------
# Building the boot sector


def _default_cache_dir() -> Path:
    base = os.environ.get("DVMM_CACHE") or str(Path.home() / ".cache")
    return Path(base) / "dvmm" / "boot"


def _source(name: str = SOURCE_NAME) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


def _check_sector(image: bytes, what: str, magic: bytes = PARAMS_MAGIC) -> None:
    if len(image) != SECTOR_SIZE:
        raise BootBuildError(f"{what}: {len(image)} bytes, expected {SECTOR_SIZE}")
    if image[510:512] != b"\x55\xaa":
        raise BootBuildError(f"{what}: no 0x55AA boot signature")
    if image[PARAMS_OFFSET:PARAMS_OFFSET + 4] != magic:
        raise BootBuildError(f"{what}: no parameter block at {PARAMS_OFFSET:#x}")


def _run_tool(argv: list[str], cwd: str, name: str = SOURCE_NAME) -> None:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise BootBuildError(f"cannot run {argv[0]}: {one_line(exc)}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "rror" in ln), lines[-1] if lines else "")
        raise BootBuildError(
            f"{Path(argv[0]).name} failed on {name} (exit {proc.returncode}): {detail}")


def _build(source: bytes, name: str = SOURCE_NAME, magic: bytes = PARAMS_MAGIC) -> bytes:
    tools = {name: shutil.which(name) for name in ("as", "ld")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        raise BootBuildError(
            f"cannot build the demo boot sector: {' and '.join(repr(m) for m in missing)} "
            "not found on PATH (install binutils: apt-get install binutils)")
    assert tools["as"] is not None and tools["ld"] is not None
    with tempfile.TemporaryDirectory(prefix="dvmm-boot-") as tmp:
        Path(tmp, name).write_bytes(source)
        for inc in INCLUDES:
            Path(tmp, inc).write_bytes(_source(inc))
        _run_tool([tools["as"], "--32", "-o", "boot.o", name], tmp, name)
        _run_tool([tools["ld"], "-m", "elf_i386", "-Ttext", "0x7c00", "-e", "_start",
                   "--oformat", "binary", "-o", "boot.bin", "boot.o"], tmp, name)
        image = Path(tmp, "boot.bin").read_bytes()
    _check_sector(image, f"assembled {name}", magic)
    return image


def assemble_boot_sector(cache_dir: Path | None = None, name: str = SOURCE_NAME,
                         magic: bytes = PARAMS_MAGIC) -> bytes:
    """The 512-byte demo boot sector, assembled from ``demo_boot.S``.

    The result is cached in ``cache_dir`` (default
    ``${DVMM_CACHE:-~/.cache}/dvmm/boot/``) under a name derived from a hash
    of the source, and rebuilt when missing or damaged.  An unwritable cache
    only costs a rebuild next time.  Raises :class:`BootBuildError` (one
    line) when binutils is missing or the source does not assemble.
    """
    source = _source(name)
    included = b"".join(b"\0" + _source(inc) for inc in INCLUDES)
    key = hashlib.sha256(_RECIPE + b"\0" + source + included).hexdigest()[:16]
    directory = cache_dir if cache_dir is not None else _default_cache_dir()
    stem = Path(name).stem
    cached = directory / f"{stem}-{key}.bin"
    try:
        image = cached.read_bytes()
        _check_sector(image, str(cached), magic)
        return image
    except (OSError, BootBuildError):
        pass
    image = _build(source) if name == SOURCE_NAME else _build(source, name, magic)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}-", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(image)
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp_name, cached)
    except OSError as exc:
        log.debug("not caching the demo boot sector in %s: %s", directory, one_line(exc))
    return image


# --------------------------------------------------------------------------
# The checksum


class DemoChecksum:
    """The running checksum: feed :meth:`update` the payload in order."""

    __slots__ = ("a", "b", "words")

    def __init__(self) -> None:
        self.a = 0
        self.b = 0
        self.words = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Add ``data`` (a multiple of 4 bytes) to the checksum."""
        if len(data) % 4:
            raise ValueError(f"checksum input must be whole 32-bit words, got {len(data)} bytes")
        words = array(_WORD, bytes(data))
        if sys.byteorder != "little":  # pragma: no cover - dvmm runs on x86
            words.byteswap()
        a, b = self.a, self.b
        for w in words:  # exact integers; reduced once per call
            a += w
            b += a
        self.a, self.b = a & _MASK, b & _MASK
        self.words += len(words)

    @property
    def value(self) -> int:
        return self.b


def demo_checksum(data: bytes | bytearray | memoryview) -> int:
    """The checksum the boot program prints for payload ``data``."""
    state = DemoChecksum()
    state.update(data)
    return state.value


# --------------------------------------------------------------------------
# The disk


@dataclass(frozen=True)
class DemoResult:
    """What the boot program printed (see :func:`parse_demo_output`)."""

    boots: int                 # banners in the whole log (more than 1 after resets)
    message: str | None = None
    sectors: int | None = None
    checksum: int | None = None
    done: bool = False
    error: str | None = None   # "read error AH=.. at LBA .." or "bad params"

    @property
    def ok(self) -> bool:
        return (self.done and self.error is None and self.sectors is not None
                and self.checksum is not None)


@dataclass(frozen=True)
class DemoDisk:
    """A demo disk image and what its boot program must print."""

    path: Path
    sectors: int               # payload sectors, LBA 1 .. sectors
    checksum: int
    message: str | None        # None when there is no payload
    after: str = "halt"
    seed: int = 1
    chunk_sectors: int = DEFAULT_CHUNK

    @property
    def size(self) -> int:
        """Image size in bytes: boot sector and payload, zero-padded to whole MiBs."""
        return image_size(self.sectors)

    @property
    def checksum_hex(self) -> str:
        return f"{self.checksum:08X}"

    def expected_lines(self) -> list[str]:
        """The lines a successful boot prints, in order (without CR LF)."""
        lines = [BANNER]
        if self.message is not None:
            lines.append(f"{PREFIX}message: {self.message}")
        lines.append(f"{PREFIX}read {self.sectors} sectors checksum {self.checksum_hex}")
        lines.append(DONE)
        return lines

    def mismatches(self, result: DemoResult | None) -> list[str]:
        """Human-readable differences between ``result`` and this disk (none = pass)."""
        if result is None:
            return ["no 'dvmm-demo: booted' banner in the output"]
        problems: list[str] = []
        if result.error is not None:
            problems.append(f"the program failed: {result.error}")
        if result.message != self.message:
            problems.append(f"message {result.message!r}, expected {self.message!r}")
        if result.sectors != self.sectors:
            problems.append(f"read {result.sectors} sectors, expected {self.sectors}")
        if result.checksum != self.checksum:
            got = "none" if result.checksum is None else f"{result.checksum:08X}"
            problems.append(f"checksum {got}, expected {self.checksum_hex}")
        if not result.done:
            problems.append("no 'dvmm-demo: done' line")
        return problems


def image_size(payload_sectors: int) -> int:
    """Bytes in a demo image with ``payload_sectors`` of payload."""
    used = (1 + payload_sectors) * SECTOR_SIZE
    return -(-used // IMAGE_ALIGN) * IMAGE_ALIGN


def _payload_blocks(sectors: int, seed: int, message: str) -> Iterator[bytes]:
    total = sectors * SECTOR_SIZE
    for k, start in enumerate(range(0, total, _BLOCK)):
        size = min(_BLOCK, total - start)
        block = hashlib.shake_256(f"dvmm-demo-disk:{seed}:{k}".encode()).digest(size)
        if k == 0:
            head = message.encode("ascii") + b"\n"
            block = head + block[len(head):]
        yield block


def boot_sector_with_params(sector: bytes, sectors: int, after: str = "halt",
                            chunk_sectors: int = DEFAULT_CHUNK) -> bytes:
    """``sector`` (from :func:`assemble_boot_sector`) with its parameter block set."""
    _check_sector(sector, "boot sector")
    image = bytearray(sector)
    struct.pack_into(PARAMS_FORMAT, image, PARAMS_OFFSET, PARAMS_MAGIC, sectors,
                     AFTER_ACTIONS[after], chunk_sectors)
    return bytes(image)


def _validate(payload_sectors: int, after: str, seed: int, message: str,
              chunk_sectors: int) -> None:
    if isinstance(payload_sectors, bool) or not isinstance(payload_sectors, int):
        raise ValueError(f"payload sectors must be an integer, got {payload_sectors!r}")
    if not 0 <= payload_sectors <= MAX_SECTORS:
        raise ValueError(f"payload sectors must be 0..{MAX_SECTORS}, got {payload_sectors}")
    if after not in AFTER_ACTIONS:
        raise ValueError(f"after must be one of {', '.join(AFTER_ACTIONS)}, got {after!r}")
    if not 1 <= chunk_sectors <= MAX_CHUNK:
        raise ValueError(f"sectors per read must be 1..{MAX_CHUNK}, got {chunk_sectors}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if len(message) > MAX_MESSAGE or any(not " " <= c <= "~" for c in message):
        raise ValueError(f"message must be at most {MAX_MESSAGE} printable ASCII characters")


def make_demo_disk(path: Path, payload_sectors: int = DEFAULT_SECTORS, after: str = "halt",
                   seed: int = 1, message: str = DEFAULT_MESSAGE,
                   chunk_sectors: int = DEFAULT_CHUNK,
                   cache_dir: Path | None = None) -> DemoDisk:
    """Write a demo disk image to ``path`` and return what it must print.

    The image is the boot sector, the payload (LBA 1 .. ``payload_sectors``)
    and zeros up to a whole MiB (:func:`image_size`).

    ``after`` is ``halt``, ``reset-cf9`` or ``reset-kbd``; ``chunk_sectors``
    the sectors per int 13h call (1..127).  The checksum is computed here
    over exactly the payload bytes written (LBA 1 .. ``payload_sectors``).
    Raises ``ValueError`` for bad arguments, :class:`BootBuildError` when the
    sector cannot be built, ``OSError`` when the file cannot be written.
    """
    _validate(payload_sectors, after, seed, message, chunk_sectors)
    sector = boot_sector_with_params(assemble_boot_sector(cache_dir), payload_sectors,
                                     after, chunk_sectors)
    path = Path(path)
    state = DemoChecksum()
    with open(path, "wb") as f:
        f.write(sector)
        for block in _payload_blocks(payload_sectors, seed, message):
            state.update(block)
            f.write(block)
        f.truncate(image_size(payload_sectors))
    return DemoDisk(path=path, sectors=payload_sectors, checksum=state.value,
                    message=message if payload_sectors else None, after=after, seed=seed,
                    chunk_sectors=chunk_sectors)


# --------------------------------------------------------------------------
# Reading the serial log

# CSI, OSC and the other ESC sequences (SeaBIOS's sercon sends "ESC c" and CSI).
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[ -/]*[0-~])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_READ = re.compile(r"read (\d+) sectors checksum ([0-9A-Fa-f]{8})\s*$")
_ERROR = re.compile(r"(read error AH=[0-9A-Fa-f]{2} at LBA \d+|bad params)")


def _clean(text: str) -> list[str]:
    text = _ANSI.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    return [_CONTROL.sub("", line) for line in text.split("\n")]


def parse_demo_runs(text: str) -> list[DemoResult]:
    """One :class:`DemoResult` per ``booted`` banner in ``text``, in order.

    ``text`` is a serial log: ANSI escapes, CR, other control characters and
    SeaBIOS's own lines around the program's are ignored; a program line may
    start in the middle of a log line.  Every result's ``boots`` is the total
    number of banners.
    """
    runs: list[dict[str, Any]] = []
    for line in _clean(text):
        at = line.find(PREFIX)
        if at < 0:
            continue
        body = line[at + len(PREFIX):]
        if body.rstrip() == "booted":
            runs.append({})
            continue
        if not runs:
            continue
        run = runs[-1]
        if body.startswith("message: ") or body.rstrip() == "message:":
            run.setdefault("message", body[len("message: "):])
        elif (m := _READ.match(body)) is not None:
            run["sectors"], run["checksum"] = int(m.group(1)), int(m.group(2), 16)
        elif body.rstrip() == "done":
            run["done"] = True
        elif (m := _ERROR.match(body)) is not None:
            run.setdefault("error", m.group(1))
    return [DemoResult(boots=len(runs), **run) for run in runs]


def parse_demo_output(text: str) -> DemoResult | None:
    """The first boot's result in a serial log, or None without a banner.

    ``boots`` counts every ``dvmm-demo: booted`` banner in the log, so a
    reset action shows up as ``boots >= 2``.
    """
    runs = parse_demo_runs(text)
    return runs[0] if runs else None


# --------------------------------------------------------------------------
# dvmm demo-disk


DESCRIPTION = """\
Write a demo boot disk: a 512-byte boot sector (assembled from source with
binutils) that SeaBIOS boots from any disk, followed by a deterministic
payload.  The program reads the payload with BIOS int 13h extended reads,
prints on COM1 what it read and a checksum, then halts or resets.
"""


def _count(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dvmm demo-disk PATH`` on an ``add_subparsers()`` object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo-disk", help="write the demo boot disk (int 13h reads + checksum on COM1)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, metavar="PATH", help="image file to write (raw)")
    parser.add_argument("--sectors", type=_count, default=DEFAULT_SECTORS, metavar="N",
                        help=f"payload sectors read from LBA 1 (default {DEFAULT_SECTORS})")
    parser.add_argument("--after", choices=list(AFTER_ACTIONS), default="halt",
                        help="what the program does at the end (default halt)")
    parser.add_argument("--chunk", type=_count, default=DEFAULT_CHUNK, metavar="N",
                        help=f"sectors per int 13h call, 1..{MAX_CHUNK} "
                             f"(default {DEFAULT_CHUNK})")
    parser.add_argument("--seed", type=_count, default=1, help="payload seed (default 1)")
    parser.add_argument("--message", default=DEFAULT_MESSAGE,
                        help="first line of the payload, printed by the program")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """``dvmm demo-disk``: write the image, print what the guest must print."""
    try:
        disk = make_demo_disk(args.path, args.sectors, args.after, args.seed, args.message,
                              args.chunk)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot write the demo disk: {one_line(exc)}") from None
    print(f"{disk.path}: {disk.size} bytes, {disk.sectors} payload sectors, "
          f"after={disk.after}, checksum {disk.checksum_hex}")
    print("expected serial output:")
    for line in disk.expected_lines():
        print(f"  {line}")
    return 0
