"""Fuzz target ``selftest-crash``: crashes on purpose, so the runner's crash
report can be tested (a fuzzer that cannot fail proves nothing)."""

from __future__ import annotations

from collections.abc import Callable


class SelfTestCrash(Exception):
    """The deliberate crash."""


def _one(data: bytes) -> None:
    # One byte to find: libFuzzer's first mutations hit it within a few runs.
    if len(data) >= 2 and data[0] == ord("C"):
        raise SelfTestCrash(f"deliberate crash on {data[:8]!r}")


def target(arg: str, work: str) -> Callable[[bytes], None]:
    return _one
