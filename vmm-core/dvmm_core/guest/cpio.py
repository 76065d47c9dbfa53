"""A reproducible ``newc`` cpio writer for the initramfs.

Owns the archive format only (what the kernel's ``init/initramfs.c`` unpacks,
see Linux ``Documentation/driver-api/early-userspace/buffer-format.rst``):
directories, regular files, symlinks and device nodes from a staging tree plus
synthetic entries.  Writing in Python rather than with ``cpio(1)`` means
device nodes (``/dev/console``) need no ``mknod`` privilege and the archive is
byte-for-byte reproducible (owner root, mtime 0, sorted names).
"""

from __future__ import annotations

import gzip
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


class _Writer(Protocol):
    def write(self, data: bytes, /) -> int: ...


@dataclass(frozen=True)
class CpioEntry:
    """One archive member; *name* is relative (``bin/busybox``), no leading slash."""

    name: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0


def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
    """A character device node entry such as ``dev/console`` (5, 1)."""
    return CpioEntry(name, stat.S_IFCHR | perm, b"", major, minor)


def tree_entries(root: Path) -> Iterator[CpioEntry]:
    """Entries for everything under *root*, parents before children, sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            yield _entry_for(path, path.relative_to(root).as_posix())


def _entry_for(path: Path, name: str) -> CpioEntry:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return CpioEntry(name, stat.S_IFLNK | 0o777, os.readlink(path).encode())
    if stat.S_ISDIR(st.st_mode):
        return CpioEntry(name, stat.S_IFDIR | stat.S_IMODE(st.st_mode))
    if stat.S_ISREG(st.st_mode):
        return CpioEntry(name, stat.S_IFREG | stat.S_IMODE(st.st_mode), path.read_bytes())
    raise ValueError(f"unsupported file type in initramfs tree: {path}")


def _header(entry: CpioEntry, ino: int) -> bytes:
    name = entry.name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino, entry.mode, 0, 0, nlink, 0, len(entry.data),
        0, 0, entry.rdev_major, entry.rdev_minor, len(name), 0,
    )  # fmt: skip
    return _MAGIC + b"".join(b"%08X" % f for f in fields) + name


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_entries(out: _Writer, entries: Iterator[CpioEntry]) -> None:
    """Write *entries* and the trailer as a newc archive to *out*."""
    ino = 1
    for entry in [*entries, CpioEntry(_TRAILER, 0)]:
        header = _header(entry, ino if entry.name != _TRAILER else 0)
        out.write(header + _pad4(len(header)))
        out.write(entry.data + _pad4(len(entry.data)))
        ino += 1


def write_gzip_cpio(path: Path, entries: Iterator[CpioEntry]) -> None:
    """Write a gzip-compressed newc archive (what Debian's kernel unpacks: RD_GZIP)."""
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        write_entries(gz, entries)
