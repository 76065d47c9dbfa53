"""Full stack: the dvmm core boots the Debian Linux guest directly (--kernel/--initrd)
with a dvmm blk disk, and the guest reads and writes /dev/vda.

Needs a host where guest kernel code runs at hardware speed.  The probe
measures that; on kvm_pvm (guest kernel code emulated in software, where a
stock Linux kernel cannot boot) these tests skip and print the measured
reason.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dvmm_core.guest import build_guest, make_disk_image
from dvmm_core.kvm import kvm_available, probe_host
from dvmm_testing import procs
from dvmm_testing.serial import CommandChannel

pytestmark = pytest.mark.hwkvm
DISK_SIZE = 32 << 20


def _skip_reason() -> str | None:
    why = kvm_available()
    if why is not None:
        return why
    probe = probe_host()
    return None if probe.hardware_speed else probe.reason


@pytest.fixture(scope="module")
def hw() -> None:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(f"hwkvm: {reason}")


@pytest.fixture
def linux_vm(hw: None, tmp_path: Path) -> Iterator[tuple[CommandChannel, Path]]:
    arts = build_guest(log=lambda _m: None)
    disk = tmp_path / "disk.img"
    make_disk_image(disk, DISK_SIZE, pattern_seed=5)
    ours, theirs = socket.socketpair()
    argv = [sys.executable, "-m", "dvmm_core.cli", "run", "--memory", "512",
            "--kernel", str(arts.kernel), "--initrd", str(arts.initrd),
            "--cmdline", "console=ttyS0 quiet loglevel=0 panic=-1 pci=conf1 reboot=k",
            "--disk", str(disk), "--serial", "stdio"]
    proc = subprocess.Popen(argv, stdin=theirs, stdout=theirs,
                            stderr=(tmp_path / "dvmm.log").open("wb"))
    theirs.close()
    channel = CommandChannel(ours, tmp_path / "serial.log")
    try:
        channel.wait_ready(120)
        yield channel, disk
    finally:
        channel.close()
        procs.stop(proc, timeout=15)


def test_linux_guest_reads_and_writes_vda(linux_vm: tuple[CommandChannel, Path]) -> None:
    channel, disk = linux_vm
    assert channel.run("blockdev --getsize64 /dev/vda").output.strip() == str(DISK_SIZE)
    out = channel.run("dd if=/dev/urandom of=/tmp/p bs=1M count=2 2>/dev/null && "
                      "sha256sum /tmp/p && dd if=/tmp/p of=/dev/vda bs=1M seek=1 "
                      "conv=fsync 2>/dev/null")
    assert out.rc == 0, out.output
    with disk.open("rb") as f:
        f.seek(1 << 20)
        assert hashlib.sha256(f.read(2 << 20)).hexdigest() in out.output
