"""Fixtures of the unit tier: an echo device served by an in-thread daemon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dvmm_shared.synthetic import SyntheticVM

from .helpers import DaemonThread, EchoBackend


@pytest.fixture
def backend() -> EchoBackend:
    return EchoBackend()


@pytest.fixture
def daemon(tmp_path: Path, backend: EchoBackend) -> Iterator[DaemonThread]:
    with DaemonThread(backend, tmp_path / "echo.sock") as dt:
        yield dt


@pytest.fixture
def vm() -> Iterator[SyntheticVM]:
    with SyntheticVM(mem_size=4 << 20) as v:
        yield v
