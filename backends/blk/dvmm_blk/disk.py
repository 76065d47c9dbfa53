"""Disk I/O engines: where virtio-blk requests meet a file.

Owns the image file descriptor and the system calls: ``os.preadv`` and
``os.pwritev`` straight between the file and guest-memory slices (zero
copy), ``fdatasync`` for FLUSH, ``fallocate`` hole punching and zero ranges
for DISCARD and WRITE_ZEROES.  The :class:`Disk` protocol is what the device
depends on, so a unit test can hand it a fake.  :class:`FaultyDisk` wraps any
disk to fail chosen operations with a chosen errno on command (the control
endpoint's ``fault error``): the device turns that into VIRTIO_BLK_S_IOERR;
it also tears a write on command (:mod:`.iofaults`), and every vector call
here can be made short on command to prove the continuation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import threading
from dataclasses import dataclass
from typing import Protocol

from dvmm_shared.virtio import VIRTIO_BLK_SECTOR_SIZE

from .iofaults import IO, crash_process, head, maybe_short

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
IOV_MAX = 1024
_ZERO_CHUNK = bytes(1 << 20)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
#: statfs f_type of filesystems whose files live in memory (linux/magic.h):
#: tmpfs, hugetlbfs, ramfs.  Their reads and writes are copies that never
#: wait for a device.
MEMORY_FS = frozenset({0x01021994, 0x958458F6, 0x858458F6})


def filesystem_type(fd: int) -> int | None:
    """``fstatfs(fd).f_type`` (the first field of struct statfs), or None."""
    buf = ctypes.create_string_buffer(256)
    if _libc.fstatfs(fd, buf) != 0:
        return None
    return int.from_bytes(buf.raw[:ctypes.sizeof(ctypes.c_long)], "little")


class DiskError(Exception):
    """The image cannot be opened or used."""


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Disk(Protocol):
    """What the blk device needs from its storage."""

    size: int
    read_only: bool

    def read(self, offset: int, bufs: list[memoryview]) -> None: ...
    def write(self, offset: int, bufs: list[memoryview]) -> None: ...
    def flush(self) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None: ...
    def close(self) -> None: ...


class CachedReads(Protocol):
    """A disk that can tell a read that would wait for the device from one
    that would not (the engines serve the second kind at once)."""

    def try_read(self, offset: int, bufs: list[memoryview]) -> bool:
        """Read now if every byte is in the page cache; False (nothing
        promised about ``bufs``) if the read would wait or cannot tell."""


class RawDisk:
    """A raw image file (or block device) accessed with positioned vector I/O."""

    def __init__(self, path: str, read_only: bool = False, lock: bool = True) -> None:
        self.path = path
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            raise DiskError(f"cannot open image {path}: {exc.strerror}") from None
        try:
            if lock:
                self._lock()
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self.fd)
            raise
        self._punch_ok = True
        self._nowait_ok = hasattr(os, "RWF_NOWAIT")
        #: Reads and writes are memory copies (tmpfs): none waits for a device.
        self.memory_backed = filesystem_type(self.fd) in MEMORY_FS

    def _lock(self) -> None:
        # Shared for readers, exclusive for a writer: two backends writing one
        # image would corrupt it, so refuse that up front.
        mode = fcntl.LOCK_SH if self.read_only else fcntl.LOCK_EX
        try:
            fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DiskError(f"image {self.path} is in use by another process") from None

    @property
    def sectors(self) -> int:
        return self.size // VIRTIO_BLK_SECTOR_SIZE

    def read(self, offset: int, bufs: list[memoryview]) -> None:
        _vector_io(os.preadv, self.fd, offset, bufs, "read")

    def try_read(self, offset: int, bufs: list[memoryview]) -> bool:
        """``preadv(RWF_NOWAIT)``: the page-cache hit of a read, without waiting
        (EAGAIN, or a short read, when a page would have to come from the
        device).  Filesystems without it (tmpfs: EOPNOTSUPP) say so once."""
        if not self._nowait_ok or len(bufs) > IOV_MAX:
            return False
        try:
            done = os.preadv(self.fd, bufs, offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                self._nowait_ok = False
                return False
            raise
        return done == sum(map(len, bufs))

    def write(self, offset: int, bufs: list[memoryview]) -> None:
        _vector_io(os.pwritev, self.fd, offset, bufs, "write")

    def native(self, op: str, offset: int, bufs: list[memoryview]
               ) -> tuple[str, int, int, list[memoryview]] | None:
        """A read/write/flush as ``(op, fd, offset, buffers)`` for an engine that
        makes the system call itself; None when only :meth:`read` etc. will do."""
        bufs = [b for b in bufs if len(b)]
        if len(bufs) > IOV_MAX:
            return None
        return op, self.fd, offset, bufs

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Drop the range if the filesystem can; discard is only a hint."""
        if self._punch_ok:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._punch_ok = False

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        modes = [FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if unmap else []
        modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        self._write_zero_bytes(offset, length)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        while length:
            n = os.pwrite(self.fd, _ZERO_CHUNK[:min(length, len(_ZERO_CHUNK))], offset)
            if n <= 0:
                raise OSError(errno.EIO, f"short write at offset {offset}")
            offset += n
            length -= n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


#: Which disk operations each ``op`` of an injected error matches.  Flush,
#: discard and write-zeroes count as writes: they are where a full or failing
#: disk reports a write error (an fsync is where Linux surfaces ENOSPC).
FAULT_OPS = {
    "read": frozenset({"read"}),
    "write": frozenset({"write", "flush", "discard", "write_zeroes"}),
    "any": frozenset({"read", "write", "flush", "discard", "write_zeroes"}),
}
FAULT_ERRNOS = {"EIO": errno.EIO, "ENOSPC": errno.ENOSPC}


@dataclass
class InjectedError:
    """An armed error: fail ``ops`` with ``err``, ``remaining`` times (None: until cleared)."""

    err: int
    ops: frozenset[str]
    remaining: int | None


class FaultyDisk:
    """A :class:`Disk` that fails matching operations while an error is armed.

    Armed and cleared from the control thread, consumed on the daemon's loop:
    a lock guards the armed error (the unarmed fast path reads one attribute)."""

    def __init__(self, disk: Disk) -> None:
        self.disk = disk
        self.size = disk.size
        self.read_only = disk.read_only
        self.memory_backed = bool(getattr(disk, "memory_backed", False))
        self.native_is_stable = bool(getattr(disk, "native_is_stable", True))
        self.injected = 0  # operations failed on purpose, for stats
        self._armed: InjectedError | None = None
        self._lock = threading.Lock()

    def inject_error(self, err: int, op: str, count: int | None) -> None:
        if op not in FAULT_OPS:
            raise ValueError(f"op must be one of {', '.join(FAULT_OPS)}, not {op!r}")
        if count is not None and count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        with self._lock:
            self._armed = InjectedError(err, FAULT_OPS[op], count)

    def clear(self) -> None:
        with self._lock:
            self._armed = None

    @property
    def armed(self) -> InjectedError | None:
        return self._armed

    def describe(self) -> dict[str, object] | None:
        """The armed error for the control plane's stats, or None."""
        armed = self._armed
        if armed is None:
            return None
        return {"errno": errno.errorcode.get(armed.err, str(armed.err)),
                "ops": sorted(armed.ops), "remaining": armed.remaining}

    def _check(self, op: str) -> None:
        if self._armed is None:
            return
        with self._lock:
            armed = self._armed
            if armed is None or op not in armed.ops:
                return
            if armed.remaining is not None:
                armed.remaining -= 1
                if armed.remaining <= 0:
                    self._armed = None
            self.injected += 1
        raise OSError(armed.err, f"injected fault: {os.strerror(armed.err)} on {op}")

    def read(self, offset: int, bufs: list[memoryview]) -> None:
        self._check("read")
        self.disk.read(offset, bufs)

    def native(self, op: str, offset: int, bufs: list[memoryview]
               ) -> tuple[str, int, int, list[memoryview]] | None:
        """The call for io_uring while no error is armed; armed, the engine
        goes through :meth:`read` etc., which fail as asked."""
        native = getattr(self.disk, "native", None)
        if self._armed is not None or native is None or (op == "write" and IO.torn_armed()):
            return None
        result: tuple[str, int, int, list[memoryview]] | None = native(op, offset, bufs)
        return result

    def try_read(self, offset: int, bufs: list[memoryview]) -> bool:
        """A cached read, unless an error is armed (then the engine's read fails)."""
        try_read = getattr(self.disk, "try_read", None)
        return (self._armed is None and try_read is not None and not IO.short_armed("read")
                and bool(try_read(offset, bufs)))

    def write(self, offset: int, bufs: list[memoryview]) -> None:
        self._check("write")
        if IO.armed and IO.torn_armed():
            self._tear(offset, bufs)
        self.disk.write(offset, bufs)

    def _tear(self, offset: int, bufs: list[memoryview]) -> None:
        """An armed torn write: the first part of the data, then a crash."""
        percent = IO.take_torn()
        if percent is None:  # another thread took it
            return
        total = sum(map(len, bufs))
        keep = total * percent // 100
        if keep:
            self.disk.write(offset, head(bufs, keep))
        crash_process(f"after a torn write ({keep} of {total} bytes at offset {offset})")

    def flush(self) -> None:
        self._check("flush")
        self.disk.flush()

    def discard(self, offset: int, length: int) -> None:
        self._check("discard")
        self.disk.discard(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._check("write_zeroes")
        self.disk.write_zeroes(offset, length, unmap)

    def close(self) -> None:
        self.disk.close()


def _vector_io(call: object, fd: int, offset: int, bufs: list[memoryview], what: str) -> None:
    """preadv/pwritev all of ``bufs``, resuming after short transfers."""
    fn = call  # os.preadv or os.pwritev
    assert callable(fn)
    if len(bufs) <= IOV_MAX:  # the hot path: one call does it all
        done = fn(fd, maybe_short(what, bufs) if IO.armed else bufs, offset)
        total = sum(map(len, bufs))
        if done == total:
            return
        if done <= 0:
            raise OSError(errno.EIO, f"short {what} at offset {offset}")
        offset += done
        pending = _advance([b for b in bufs if len(b)], done)
    else:
        pending = [b for b in bufs if len(b)]
    while pending:
        batch = pending[:IOV_MAX]
        done = fn(fd, maybe_short(what, batch) if IO.armed else batch, offset)
        if done <= 0:
            raise OSError(errno.EIO, f"short {what} at offset {offset}")
        offset += done
        pending = _advance(pending, done)


def _advance(bufs: list[memoryview], done: int) -> list[memoryview]:
    for i, b in enumerate(bufs):
        if done < len(b):
            return [b[done:], *bufs[i + 1:]]
        done -= len(b)
    return []
