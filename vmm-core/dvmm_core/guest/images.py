"""Disk images for test guests: blank (sparse) or filled with a known pattern.

Owns the deterministic test pattern, so a test can recompute the bytes of
any range (``pattern_bytes``) and compare them with what the guest reads.
The pattern is SHAKE-256 over (seed, 1 MiB chunk index): stable across Python
versions and machines, fast (C), and needs no state to seek into.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PATTERN_CHUNK = 1 << 20


def _chunk(seed: int, index: int) -> bytes:
    return hashlib.shake_256(f"dvmm-disk:{seed}:{index}".encode()).digest(PATTERN_CHUNK)


def pattern_bytes(seed: int, offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of the image ``make_disk_image`` fills with *seed*."""
    if offset < 0 or length < 0:
        raise ValueError("offset and length must not be negative")
    out = bytearray()
    first, last = offset // PATTERN_CHUNK, (offset + length - 1) // PATTERN_CHUNK
    for index in range(first, last + 1 if length else first):
        out += _chunk(seed, index)
    start = offset - first * PATTERN_CHUNK
    return bytes(out[start : start + length])


def make_disk_image(path: Path, size: int, pattern_seed: int | None = None) -> None:
    """Create a raw image of *size* bytes at *path* (replacing it atomically).

    With *pattern_seed* None the image is sparse and reads as zeros; otherwise
    every byte is ``pattern_bytes(pattern_seed, 0, size)``.
    """
    if size < 0:
        raise ValueError(f"image size must not be negative: {size}")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            if pattern_seed is not None:
                _fill(f.fileno(), size, pattern_seed)
            f.truncate(size)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fill(fd: int, size: int, seed: int) -> None:
    for index in range((size + PATTERN_CHUNK - 1) // PATTERN_CHUNK):
        data = _chunk(seed, index)[: size - index * PATTERN_CHUNK]
        os.pwrite(fd, data, index * PATTERN_CHUNK)
