"""The hugepage reservation check that turns a would-be SIGBUS into one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from dvmm_core.machine.pc import MachineError, check_hugepages

MEMINFO = ("HugePages_Total: {total}\nHugePages_Free: {free}\n"
           "Hugepagesize: 2048 kB\n")


def meminfo(tmp_path: Path, total: int, free: int) -> str:
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO.format(total=total, free=free))
    return str(path)


def test_enough_free_hugepages_pass(tmp_path: Path) -> None:
    check_hugepages(128 << 20, meminfo(tmp_path, 100, 64))


def test_too_few_free_hugepages_are_refused(tmp_path: Path) -> None:
    with pytest.raises(MachineError, match=r"needs 64 free hugepages of 2048 KiB, the host has 63"):
        check_hugepages(128 << 20, meminfo(tmp_path, 100, 63))


def test_size_not_a_multiple_of_the_hugepage_size(tmp_path: Path) -> None:
    with pytest.raises(MachineError, match="not a multiple"):
        check_hugepages((128 << 20) + 4096, meminfo(tmp_path, 100, 100))


def test_unreadable_meminfo(tmp_path: Path) -> None:
    with pytest.raises(MachineError, match="cannot read"):
        check_hugepages(2 << 20, str(tmp_path / "missing"))
