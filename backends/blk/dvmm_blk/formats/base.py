"""What every image format shares: the error type, the checked file, extents.

Owns :class:`ImageFile` (the one place a format reads or writes its file:
every read of metadata is bounds-checked against the file's size, so a
hostile table entry becomes an :class:`ImageError`, never an out-of-file
access) and :class:`BlockImage`, the base of every format: it turns
``read(offset, bufs)`` into the format's *extents* (a run of guest bytes
that is file data, zeros, the backing image, or bytes produced in memory
such as a decompressed cluster) and moves the bytes straight between the
file and the caller's memoryviews with ``os.preadv`` (zero copy).

A :class:`BlockImage` is a :class:`dvmm_blk.disk.Disk`: the blk device and
its engines use it as they use a raw file.  Formats say where bytes are;
they do not know about virtio.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator
from typing import NamedTuple

from ..disk import MEMORY_FS, _vector_io, filesystem_type

SECTOR = 512
_ZEROS = bytes(1 << 20)


class ImageError(Exception):
    """An image that cannot be used: the message is one line naming the problem."""


class ImageCorrupt(ImageError):
    """A header field or table entry is out of range, misaligned or inconsistent."""


class ImageUnsupported(ImageError):
    """A valid image using a feature dvmm does not implement."""


def corrupt_io(exc: ImageError) -> OSError:
    """What a request that met a bad table entry fails with (the guest sees EIO)."""
    return OSError(errno.EIO, str(exc))


class ImageFile:
    """An image file opened for a format: checked metadata reads, data I/O."""

    def __init__(self, path: str, read_only: bool) -> None:
        self.path = path
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            raise ImageError(f"cannot open image {path}: {exc.strerror}") from None
        st = os.fstat(self.fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(self.fd)
            raise ImageError(f"cannot open image {path}: it is a directory")
        self.size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(self.fd, 0, os.SEEK_END)
        self.memory_backed = filesystem_type(self.fd) in MEMORY_FS
        self._size_lock = threading.Lock()

    def read(self, offset: int, length: int, what: str) -> bytes:
        """``length`` bytes at ``offset`` that must lie inside the file."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageCorrupt(f"{what} at offset {offset} (+{length}) lies beyond the "
                               f"end of the file ({self.size} bytes)")
        data = self._pread(offset, length)
        if len(data) != length:
            raise ImageCorrupt(f"{what} at offset {offset}: short read (file truncated?)")
        return data

    def _pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes, fewer only at the end of the file: a short
        read is carried on (POSIX lets any read return less than asked)."""
        data = os.pread(self.fd, length, offset)
        while 0 < len(data) < length:
            more = os.pread(self.fd, length - len(data), offset + len(data))
            if not more:
                break
            data += more
        return data

    def read_upto(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer at the end of the file)."""
        if offset < 0 or offset >= self.size:
            return b""
        return self._pread(offset, min(length, self.size - offset))

    def write(self, offset: int, data: bytes | memoryview) -> None:
        # (through _vector_io: a short write is carried on, not an error)
        _vector_io(os.pwritev, self.fd, offset, [memoryview(data)], "write")
        self._grew(offset + len(data))

    def writev(self, offset: int, bufs: list[memoryview]) -> None:
        _vector_io(os.pwritev, self.fd, offset, bufs, "write")
        end = offset + sum(map(len, bufs))
        if end > self.size:
            self._grew(end)

    def readv(self, offset: int, bufs: list[memoryview]) -> None:
        """Data into ``bufs``; bytes past the end of the file read as zeros
        (a cluster whose tail was never written)."""
        total = sum(map(len, bufs))
        if offset + total <= self.size:
            _vector_io(os.preadv, self.fd, offset, bufs, "read")
            return
        avail = max(0, self.size - offset)
        head, tail = split_views(bufs, avail)
        if head:
            self.readv(offset, head)
        zero_views(tail)

    def _grew(self, end: int) -> None:
        if end > self.size:
            with self._size_lock:
                self.size = max(self.size, end)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.size = size

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def split_views(bufs: list[memoryview], n: int) -> tuple[list[memoryview], list[memoryview]]:
    """``bufs`` cut after ``n`` bytes: (the first n bytes, the rest)."""
    head: list[memoryview] = []
    for i, b in enumerate(bufs):
        if n <= 0:
            return head, bufs[i:]
        if len(b) <= n:
            head.append(b)
            n -= len(b)
        else:
            head.append(b[:n])
            return head, [b[n:], *bufs[i + 1:]]
    return head, []


def zero_views(bufs: list[memoryview]) -> None:
    for b in bufs:
        for i in range(0, len(b), len(_ZEROS)):
            n = min(len(b) - i, len(_ZEROS))
            b[i:i + n] = _ZEROS[:n]


def copy_into(bufs: list[memoryview], data: bytes | memoryview) -> None:
    pos = 0
    for b in bufs:
        b[:] = data[pos:pos + len(b)]
        pos += len(b)


def gather(bufs: list[memoryview]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


class Extent(NamedTuple):
    """A run of guest bytes and where they are.

    ``kind``: ``data`` (``arg`` = file offset), ``zero``, ``backing`` (the
    same guest offset in the backing image), ``bytes`` (``arg`` = a bytes
    object, ``arg2`` = the offset in it)."""

    length: int
    kind: str
    arg: object = None
    arg2: int = 0


class BlockImage:
    """A format's view of its image: the :class:`dvmm_blk.disk.Disk` calls.

    Subclasses implement :meth:`extents`; writable formats override
    :meth:`write` and friends.  ``read`` walks the extents."""

    format_name = "raw"

    def __init__(self, file: ImageFile, size: int, backing: BlockImage | None = None) -> None:
        self.file = file
        self.size = size
        self.read_only = file.read_only
        self.backing = backing
        self.memory_backed = file.memory_backed
        self.backing_name: str | None = None
        self.backing_format: str | None = None

    @property
    def path(self) -> str:
        return self.file.path

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        """Where the guest bytes ``[offset, offset+length)`` are, in order."""
        yield Extent(length, "data", offset)

    def read(self, offset: int, bufs: list[memoryview]) -> None:
        total = sum(map(len, bufs))
        if offset < 0 or offset + total > self.size:
            raise OSError(errno.EINVAL, f"read of {total} bytes at {offset} is past the "
                          f"end of the disk ({self.size})")
        try:
            self._read_extents(offset, total, bufs)
        except ImageError as exc:
            raise corrupt_io(exc) from None

    def _read_extents(self, offset: int, total: int, bufs: list[memoryview]) -> None:
        for ext in self.extents(offset, total):
            part, bufs = split_views(bufs, ext.length)
            if ext.kind == "data":
                assert isinstance(ext.arg, int)
                self.file.readv(ext.arg, part)
            elif ext.kind == "zero":
                zero_views(part)
            elif ext.kind == "backing":
                self.read_backing(offset, part, ext.length)
            else:
                assert isinstance(ext.arg, bytes | bytearray)
                copy_into(part, memoryview(ext.arg)[ext.arg2:ext.arg2 + ext.length])
            offset += ext.length

    def read_backing(self, offset: int, bufs: list[memoryview], length: int) -> None:
        """Bytes of the backing image (zeros where it has none or is shorter)."""
        backing = self.backing
        inside = 0 if backing is None else max(0, min(length, backing.size - offset))
        head, tail = split_views(bufs, inside)
        if head and backing is not None:
            backing.read(offset, head)
        zero_views(tail)

    def read_bytes(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read(offset, [memoryview(buf)])
        return bytes(buf)

    # -- writes: read-only formats refuse them ------------------------------------
    def write(self, offset: int, bufs: list[memoryview]) -> None:
        raise OSError(errno.EROFS, f"{self.format_name} images are read-only in dvmm")

    def flush(self) -> None:
        if not self.read_only:
            self.file.flush()

    def discard(self, offset: int, length: int) -> None:
        raise OSError(errno.EROFS, f"{self.format_name} images are read-only in dvmm")

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        raise OSError(errno.EROFS, f"{self.format_name} images are read-only in dvmm")

    def close(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        self.file.close()

    def __enter__(self) -> BlockImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def chain(self) -> list[BlockImage]:
        """This image and its backing images, top first."""
        out: list[BlockImage] = []
        img: BlockImage | None = self
        while img is not None:
            out.append(img)
            img = img.backing
        return out
