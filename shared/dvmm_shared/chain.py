"""Byte-stream views over a descriptor chain's buffers.

Devices consume a chain as two streams, the device-readable part and the
device-writable part, and never look at descriptors.  ``take(n)`` hands out
the next ``n`` bytes as a list of ``memoryview`` slices of guest memory
(zero copy, ready for ``os.preadv``/``os.pwritev``); ``read``/``write`` copy
small headers and trailers.
"""

from __future__ import annotations

from collections.abc import Sequence


class ChainShortError(Exception):
    """The chain holds fewer bytes than the device needs."""


class _Stream:
    def __init__(self, bufs: Sequence[memoryview]) -> None:
        self._bufs = [b for b in bufs if len(b)]
        self._i = 0
        self._off = 0
        self.total = sum(len(b) for b in self._bufs)
        self.consumed = 0

    @property
    def remaining(self) -> int:
        return self.total - self.consumed

    def take(self, n: int) -> list[memoryview]:
        """The next ``n`` bytes as slices of guest memory."""
        if n < 0 or n > self.remaining:
            raise ChainShortError(f"need {n} bytes, chain has {self.remaining} left")
        out: list[memoryview] = []
        while n:
            buf = self._bufs[self._i]
            step = min(n, len(buf) - self._off)
            out.append(buf[self._off:self._off + step])
            n -= step
            self.consumed += step
            self._off += step
            if self._off == len(buf):
                self._i += 1
                self._off = 0
        return out

    def take_rest(self) -> list[memoryview]:
        return self.take(self.remaining)

    def take_tail(self, n: int) -> list[memoryview]:
        """The last ``n`` bytes, which are then no longer available to take()."""
        if n < 0 or n > self.remaining:
            raise ChainShortError(f"need {n} trailing bytes, chain has {self.remaining} left")
        self.total -= n
        out: list[memoryview] = []
        end = self.total
        pos = 0
        for buf in self._bufs:
            lo, hi = pos, pos + len(buf)
            a, b = max(lo, end), min(hi, end + n)
            if a < b:
                out.append(buf[a - lo:b - lo])
            pos = hi
        # Truncate the buffer list so take() cannot reach the tail.
        self._truncate(end)
        return out

    def _truncate(self, end: int) -> None:
        bufs: list[memoryview] = []
        pos = 0
        for buf in self._bufs:
            if pos >= end:
                break
            bufs.append(buf[:end - pos] if pos + len(buf) > end else buf)
            pos += len(buf)
        self._bufs = bufs


class ChainReader(_Stream):
    """The device-readable bytes of a chain."""

    def read(self, n: int) -> bytes:
        return b"".join(self.take(n))


class ChainWriter(_Stream):
    """The device-writable bytes of a chain."""

    def write(self, data: bytes | memoryview) -> None:
        pos = 0
        for view in self.take(len(data)):
            view[:] = data[pos:pos + len(view)]
            pos += len(view)


def write_views(views: Sequence[memoryview], data: bytes | memoryview) -> None:
    """Copy ``data`` across ``views`` (whose lengths add up to ``len(data)``)."""
    pos = 0
    for view in views:
        view[:] = data[pos:pos + len(view)]
        pos += len(view)
