"""The host's copy of the guest tool ``blkverify``'s block pattern and its output.

Owns recomputing, on the host, the exact 4 KiB blocks the guest's
``blkverify`` (``blkverify.c`` beside this module, whose header comment
is the specification) writes in a given pass, comparing a disk image with
them, and parsing the tool's pass and summary lines.  Keep the two in step:
a change of layout shows up here as every block differing.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

BLOCK = 4096
MAGIC = b"DVMMBLK1"
WORDS = 507
CRC_AT = 4088
_M64 = (1 << 64) - 1
_HEADER = struct.Struct("<8sQQQ")


def splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


# The payload is tag ^ table word by word: one big-int XOR per block.
_TABLE = int.from_bytes(b"".join(splitmix64(j).to_bytes(8, "little") for j in range(WORDS)),
                        "little")
_ONES = int.from_bytes(b"\1\0\0\0\0\0\0\0" * WORDS, "little")  # tag * _ONES repeats tag


def block(number: int, pass_no: int, seed: int) -> bytes:
    """Block *number* as written by pass *pass_no* with *seed*."""
    tag = splitmix64(seed ^ (pass_no << 32) ^ number)
    payload = (_TABLE ^ (tag * _ONES)).to_bytes(WORDS * 8, "little")
    head = _HEADER.pack(MAGIC, number, pass_no, seed) + payload
    return head + struct.pack("<II", zlib.crc32(head), 0)


@dataclass(frozen=True)
class BadBlock:
    """A block of the image that is not what the last pass wrote."""

    number: int
    found_block: int | None
    found_pass: int | None

    def __str__(self) -> str:
        if self.found_block is None:
            return f"block {self.number}: no blkverify header"
        return f"block {self.number}: holds block {self.found_block} of pass {self.found_pass}"


def compare_image(image: Path, nblocks: int, pass_no: int, seed: int) -> list[BadBlock]:
    """Every block among the first *nblocks* of *image* that differs from pass *pass_no*."""
    bad = []
    with image.open("rb") as f:
        for n in range(nblocks):
            got = f.read(BLOCK)
            if got != block(n, pass_no, seed):
                bad.append(_describe(n, got))
    return bad


def _describe(number: int, got: bytes) -> BadBlock:
    if len(got) < _HEADER.size or got[:8] != MAGIC:
        return BadBlock(number, None, None)
    _, found_block, found_pass, _ = _HEADER.unpack_from(got)
    return BadBlock(number, found_block, found_pass)


_PASS = re.compile(r"^blkverify: pass (\d+)/(\d+) .* verified (\d+) .* bad (\d+) eio (\d+)$",
                   re.M)
_DONE = re.compile(r"^blkverify: done passes=(\d+) blocks_verified=(\d+) bad=(\d+) eio=(\d+) "
                   r"seed=(\d+)$", re.M)


@dataclass(frozen=True)
class Summary:
    """The tool's final line, and how many per-pass lines came before it."""

    passes: int
    blocks_verified: int
    bad: int
    eio: int
    seed: int
    pass_lines: int


def parse_output(output: str) -> Summary:
    """The summary of a finished run; ValueError if the tool did not finish."""
    done = _DONE.search(output)
    if done is None:
        raise ValueError(f"no blkverify summary line in:\n{output}")
    passes, verified, bad, eio, seed = (int(g) for g in done.groups())
    return Summary(passes, verified, bad, eio, seed, len(_PASS.findall(output)))
