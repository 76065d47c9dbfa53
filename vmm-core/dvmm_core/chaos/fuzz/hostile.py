"""Hostile values and the checks every fuzz target shares.

Owns how a target draws numbers from its input (:func:`pick`: mostly values
near the ones a real frontend or driver uses, so that deep code is reached,
and sometimes anything at all), the guard that the code under test closes
every file descriptor it was handed (:class:`FdGuard`), and
:class:`FuzzFinding`, what a target raises for a bug it sees itself (a
leaked fd, an error reply that hides an internal exception).
"""

from __future__ import annotations

import gc
import mmap
import os
import types
from collections.abc import Sequence

from ._atheris import Provider


class FuzzFinding(Exception):
    """A bug a target found that is not an exception of the code under test."""


def pick(p: Provider, plausible: Sequence[int], bits: int = 64) -> int:
    """One of ``plausible`` (3 times in 4), else any ``bits``-bit value."""
    if plausible and p.ConsumeIntInRange(0, 3):
        return plausible[p.ConsumeIntInRange(0, len(plausible) - 1)]
    return p.ConsumeIntInRange(0, (1 << bits) - 1)


def choose(p: Provider, count: int) -> int:
    """An index in ``range(count)``."""
    return p.ConsumeIntInRange(0, count - 1)


def open_fds() -> dict[int, str]:
    """This process's open fds and what they are."""
    out: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own fd, closed by now
            pass
    return out


class FdGuard:
    """Raises :class:`FuzzFinding` when an input leaves more fds open than
    the first one did (the code under test must close what it was handed,
    whatever the input)."""

    def __init__(self) -> None:
        self.baseline: int | None = None

    def check(self) -> None:
        count = len(os.listdir("/proc/self/fd")) - 1  # not the listing's own fd
        if self.baseline is None:
            self.baseline = count
            return
        if count <= self.baseline:
            return
        gc.collect()  # a cycle may still hold a socket or a mapping
        fds = open_fds()
        if len(fds) > self.baseline:
            kinds = sorted({v for v in fds.values()})
            raise FuzzFinding(f"fd leak: {len(fds)} fds open, {self.baseline} before; "
                              f"kinds: {', '.join(kinds)[:300]}; {_holders()}")


def _holders() -> str:
    """Who keeps the mappings alive (a mapping holds a dup of its fd)."""
    live = [o for o in gc.get_objects() if isinstance(o, mmap.mmap) and not o.closed]
    out = []
    for m in live:
        out.append(f"mmap of {len(m)} bytes <- {' <- '.join(_referrers(m, id(live)))}")
    return "; ".join(out)[:2000] or "no live mapping"


def _referrers(obj: object, ignore: int, depth: int = 12) -> list[str]:
    """One chain of objects that refer to ``obj``, outwards (for the report)."""
    chain, seen = [], {id(obj), ignore}
    for _ in range(depth):
        refs = [r for r in gc.get_referrers(obj)
                if id(r) not in seen and not isinstance(r, types.FrameType)]
        if not refs:
            break
        obj = refs[0]
        seen.add(id(obj))
        chain.append(_describe(obj))
    return chain


def _describe(obj: object) -> str:
    if isinstance(obj, types.GeneratorType):
        frame = obj.gi_frame
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame else "finished"
        return f"generator {obj.__qualname__} at {where}"
    return type(obj).__qualname__
