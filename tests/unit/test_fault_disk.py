"""FaultyDisk: injected errors hit the chosen operations, the chosen number of times."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import pytest
from dvmm_blk.disk import FaultyDisk, RawDisk

from .helpers import make_image


@pytest.fixture
def disk(tmp_path: Path) -> FaultyDisk:
    return FaultyDisk(RawDisk(str(make_image(tmp_path / "d.img", 8 * 512))))


def ops(disk: FaultyDisk) -> dict[str, int | None]:
    """Run every operation once: the errno each one failed with (None: it worked)."""
    buf = memoryview(bytearray(512))
    calls: dict[str, Callable[[], None]] = {
        "read": lambda: disk.read(0, [buf]),
        "write": lambda: disk.write(512, [buf]),
        "flush": disk.flush,
        "discard": lambda: disk.discard(0, 512),
        "write_zeroes": lambda: disk.write_zeroes(1024, 512, False),
    }
    result: dict[str, int | None] = {}
    for name, call in calls.items():
        try:
            call()
            result[name] = None
        except OSError as exc:
            result[name] = exc.errno
    return result


def test_unarmed_disk_works(disk: FaultyDisk) -> None:
    assert set(ops(disk).values()) == {None}
    assert disk.injected == 0


def test_read_errors_only_hit_reads(disk: FaultyDisk) -> None:
    disk.inject_error(errno.EIO, "read", None)
    assert ops(disk) == {"read": errno.EIO, "write": None, "flush": None, "discard": None,
                         "write_zeroes": None}
    assert ops(disk)["read"] == errno.EIO  # until cleared
    disk.clear()
    assert ops(disk)["read"] is None
    assert disk.injected == 2


def test_write_errors_hit_every_kind_of_write(disk: FaultyDisk) -> None:
    disk.inject_error(errno.ENOSPC, "write", None)
    assert ops(disk) == {"read": None, "write": errno.ENOSPC, "flush": errno.ENOSPC,
                         "discard": errno.ENOSPC, "write_zeroes": errno.ENOSPC}


def test_count_runs_out(disk: FaultyDisk) -> None:
    disk.inject_error(errno.EIO, "any", 3)
    result = ops(disk)
    assert [result[k] for k in ("read", "write", "flush")] == [errno.EIO] * 3
    assert result["discard"] is None and result["write_zeroes"] is None
    assert disk.armed is None and disk.injected == 3


def test_bad_arguments(disk: FaultyDisk) -> None:
    with pytest.raises(ValueError, match="op must be one of"):
        disk.inject_error(errno.EIO, "trim", None)
    with pytest.raises(ValueError, match="count must be at least 1"):
        disk.inject_error(errno.EIO, "read", 0)
    assert disk.armed is None
