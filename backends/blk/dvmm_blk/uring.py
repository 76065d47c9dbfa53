"""An io_uring engine, through the raw system calls (ctypes), for comparison.

Owns one io_uring instance: the submission and completion rings mapped from
the kernel, an eventfd registered with the ring (the daemon's selector wakes
on it), and a :class:`~.engine.ThreadEngine` for the jobs io_uring does not
take (discard, write-zeroes, fault-injected disks, short transfers).  Reads
and writes become ``IORING_OP_READV``/``WRITEV`` straight into guest memory,
FLUSH ``IORING_OP_FSYNC`` with ``IORING_FSYNC_DATASYNC``; a batch of
requests is one ``io_uring_enter``.  Layouts are linux/io_uring.h's.

Why raw calls: the maintained Python bindings were tried on these machines
and do not run (``liburing`` 2026.3.30's wheel dies with SIGILL in
``Ring()``; ``pyuring`` 0.3.3 does not build against Debian 12's liburing
2.3).  It is the default (``--engine auto``), measured ahead of the thread
pool on cache-missing reads; the thread pool is the fallback wherever
io_uring is unavailable (``io_uring_setup`` fails: old kernel, seccomp,
``kernel.io_uring_disabled``).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select
import struct
from collections import deque

from dvmm_shared.eventfd import EventFd

from .engine import EngineError, Job, ThreadEngine
from .iofaults import IO, maybe_short

_SYS_SETUP, _SYS_ENTER, _SYS_REGISTER = 425, 426, 427  # x86_64
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
_FEAT_SINGLE_MMAP = 1
_REGISTER_EVENTFD = 4
OP_READV, OP_WRITEV, OP_FSYNC = 1, 2, 3
_OPCODES = {"read": OP_READV, "write": OP_WRITEV, "flush": OP_FSYNC}
FSYNC_DATASYNC = 1
_PARAMS = struct.Struct("<10I8IQ8IQ")  # io_uring_params, sq_off, cq_off: 120 bytes
_SQE = struct.Struct("<BBHiQQIIQ24x")    # 64 bytes: the fields used, rest zero
_CQE = struct.Struct("<QiI")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class UringEngine:
    """Reads, writes and flushes through io_uring; other jobs on threads."""

    wants_native = True

    def __init__(self, entries: int = 256, fallback_threads: int = 4) -> None:
        params = ctypes.create_string_buffer(_PARAMS.size)
        try:
            self._fd = _check(_libc.syscall(_SYS_SETUP, entries, params), "io_uring_setup")
        except OSError as exc:
            raise EngineError(f"io_uring is not available here: {exc.strerror}") from None
        p = _PARAMS.unpack(params.raw)
        sq_entries, cq_entries, features = p[0], p[1], p[5]
        sq_off, cq_off = p[10:18], p[19:27]
        sq_size = sq_off[6] + 4 * sq_entries
        cq_size = cq_off[5] + 16 * cq_entries
        if features & _FEAT_SINGLE_MMAP:
            sq_size = cq_size = max(sq_size, cq_size)
        self._sq_map = mmap.mmap(self._fd, sq_size, offset=_OFF_SQ_RING)
        self._cq_map = (self._sq_map if features & _FEAT_SINGLE_MMAP
                        else mmap.mmap(self._fd, cq_size, offset=_OFF_CQ_RING))
        self._sqes = mmap.mmap(self._fd, 64 * sq_entries, offset=_OFF_SQES)
        sq, cq = memoryview(self._sq_map).cast("I"), memoryview(self._cq_map).cast("I")
        self._sq, self._cq = sq, cq
        self._sq_tail_i, self._sq_mask = sq_off[1] // 4, sq[sq_off[2] // 4]
        self._sq_array_i = sq_off[6] // 4
        self._cq_head_i, self._cq_tail_i = cq_off[0] // 4, cq_off[1] // 4
        self._cq_mask, self._cqes_off = cq[cq_off[2] // 4], cq_off[5]
        self._cq_view = memoryview(self._cq_map)
        self._entries = sq_entries
        self._efd = EventFd()
        efd = ctypes.c_int32(self._efd.fd)
        _check(_libc.syscall(_SYS_REGISTER, self._fd, _REGISTER_EVENTFD,
                             ctypes.byref(efd), 1), "IORING_REGISTER_EVENTFD")
        self.fd = self._efd.fd
        self._fallback = ThreadEngine(fallback_threads, name="blk-uring-fallback",
                                      wakeup=self._efd)
        self._inflight: dict[int, tuple[Job, object, int]] = {}  # user_data -> job, iovecs
        self._free = list(range(sq_entries))
        self._waiting: deque[Job] = deque()  # ring full: submitted at the next reap
        self._to_submit = 0

    # -- submission -------------------------------------------------------------
    def submit(self, job: Job) -> None:
        native = job.native
        if native is None:
            self._fallback.submit(job)
            return
        if not self._free:
            self._waiting.append(job)
            return
        self._queue(job, native)

    def push(self) -> None:
        self._enter()

    def _queue(self, job: Job, native: tuple[str, int, int, list[memoryview]]) -> None:
        name, fd, offset, bufs = native
        op = _OPCODES[name]
        if op == OP_FSYNC:
            iov: object = None
            addr, count, total, rw_flags = 0, 0, 0, FSYNC_DATASYNC
        else:
            # an armed short-read/-write (fault injection, .iofaults): the
            # kernel is given only the head, the completion looks short
            issued = maybe_short(name, bufs) if IO.armed else bufs
            try:
                arr, keep, total = _iovecs(issued)
            except (TypeError, ValueError):  # a read-only or empty buffer
                job.native = None
                self._fallback.submit(job)
                return
            if issued is not bufs:
                total = sum(map(len, bufs))
            iov = (arr, keep)  # alive until the completion: the kernel reads them
            addr, count, rw_flags = ctypes.addressof(arr), len(issued), 0
        slot = self._free.pop()
        _SQE.pack_into(self._sqes, 64 * slot, op, 0, 0, fd, offset, addr, count, rw_flags,
                       slot)
        self._inflight[slot] = (job, iov, total)
        tail = self._sq[self._sq_tail_i]
        self._sq[self._sq_array_i + (tail & self._sq_mask)] = slot
        self._sq[self._sq_tail_i] = (tail + 1) & 0xFFFFFFFF  # x86: after the SQE stores
        self._to_submit += 1

    def _enter(self) -> None:
        n, self._to_submit = self._to_submit, 0
        if n:
            _check(_libc.syscall(_SYS_ENTER, self._fd, n, 0, 0, None, 0), "io_uring_enter")

    # -- completion -------------------------------------------------------------
    def reap(self) -> list[Job]:
        out = self._fallback.reap()  # reads the shared eventfd too
        cq, view = self._cq, self._cq_view
        head, tail = cq[self._cq_head_i], cq[self._cq_tail_i]
        while head != tail:
            slot, res, _flags = _CQE.unpack_from(
                view, self._cqes_off + 16 * (head & self._cq_mask))
            head = (head + 1) & 0xFFFFFFFF
            job, _iov, total = self._inflight.pop(slot)
            self._free.append(slot)
            if res < 0:
                job.error = OSError(-res, os.strerror(-res))
            elif res != total and job.native is not None and job.native[0] != "flush":
                job.native = None  # short: the thread path finishes it or reports EIO
                self._fallback.submit(job)
                continue
            out.append(job)
        cq[self._cq_head_i] = head
        while self._waiting and self._free:
            job = self._waiting.popleft()
            assert job.native is not None
            self._queue(job, job.native)
        self._enter()
        return out

    def wait(self, timeout: float) -> None:
        select.select([self.fd], [], [], timeout)

    def close(self) -> None:
        while self._inflight:  # the kernel still writes into their buffers
            select.select([self.fd], [], [], 1.0)
            self.reap()
        self._fallback.close()  # closes the shared eventfd
        os.close(self._fd)


def _iovecs(bufs: list[memoryview]) -> tuple[ctypes.Array[_Iovec], list[ctypes.c_char], int]:
    """A struct iovec array over ``bufs``, the objects that pin them, the total."""
    arr = (_Iovec * len(bufs))()
    keep = []
    total = 0
    for i, b in enumerate(bufs):
        c = ctypes.c_char.from_buffer(b)
        keep.append(c)
        arr[i].base = ctypes.addressof(c)
        arr[i].len = len(b)
        total += len(b)
    return arr, keep, total


def probe() -> bool:
    """Whether io_uring can be set up in this process."""
    params = ctypes.create_string_buffer(_PARAMS.size)
    fd = _libc.syscall(_SYS_SETUP, 1, params)
    if fd < 0:
        return ctypes.get_errno() not in (errno.ENOSYS, errno.EPERM)
    os.close(fd)
    return True
