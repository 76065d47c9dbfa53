"""vhost-user-blk conformance: QEMU (TCG) + Debian's Linux driver against our backend.

Every test runs twice: against dvmm's blk backend and against
qemu-storage-daemon's vhost-user-blk export (the known-good peer), with the
same guest and the same checks, so the harness itself is proven.  The guest
is reached through its serial command channel; the host checks the image
file directly.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from blk_backends import BACKENDS, blk_backend
from dvmm_core.guest import GuestArtifacts, build_guest, make_disk_image
from dvmm_testing import QemuGuest

pytestmark = pytest.mark.conformance

MIB = 1 << 20
DISK_SIZE = 64 * MIB


@pytest.fixture(scope="module")
def artifacts() -> GuestArtifacts:
    return build_guest(log=lambda _m: None)


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "qsd" and shutil.which("qemu-storage-daemon") is None:
        pytest.fail("qemu-storage-daemon is not installed (apt-get install qemu-system-x86)")
    return str(request.param)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    make_disk_image(path, DISK_SIZE, pattern_seed=3)
    return path


def sha256_file_range(path: Path, offset: int, length: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).hexdigest()


def guest_sha(out: str) -> str:
    match = re.search(r"\b([0-9a-f]{64})\b", out)
    assert match, f"no sha256 in {out!r}"
    return match.group(1)


@pytest.fixture
def guest(kind: str, image: Path, tmp_path: Path, artifacts: GuestArtifacts
          ) -> Iterator[QemuGuest]:
    with blk_backend(kind, image, tmp_path, queues=2) as backend, \
            QemuGuest(backend.qemu_args(queues=2), artifacts=artifacts, cpus=2,
                      log_dir=tmp_path / "guest") as vm:
        vm.backend = backend  # type: ignore[attr-defined]
        yield vm


def test_size_serial_and_data_both_ways(guest: QemuGuest, image: Path) -> None:
    assert guest.check("blockdev --getsize64 /dev/vda").strip() == str(DISK_SIZE)
    assert guest.check("cat /sys/block/vda/serial").strip() == guest.backend.serial  # type: ignore[attr-defined]
    # guest -> host: 6 MiB of random bytes at a 2 MiB offset, synced.
    out = guest.check("dd if=/dev/urandom of=/tmp/p bs=1M count=6 2>/dev/null && "
                      "sha256sum /tmp/p && "
                      "dd if=/tmp/p of=/dev/vda bs=1M seek=2 conv=fsync 2>/dev/null")
    assert sha256_file_range(image, 2 * MIB, 6 * MIB) == guest_sha(out)
    # host -> guest: write on the host, drop the guest's cache, read it back.
    data = os.urandom(3 * MIB)
    with image.open("r+b") as f:
        f.seek(20 * MIB)
        f.write(data)
    out = guest.check("echo 3 > /proc/sys/vm/drop_caches && "
                      "dd if=/dev/vda bs=1M skip=20 count=3 2>/dev/null | sha256sum")
    assert guest_sha(out) == hashlib.sha256(data).hexdigest()


def test_two_queues_carry_traffic(guest: QemuGuest) -> None:
    assert guest.check("ls /sys/block/vda/mq").split() == ["0", "1"]
    before = queue_interrupts(guest)
    for cpu in (0, 1):  # blk-mq maps each CPU to its own hardware queue
        guest.check(f"taskset -c {cpu} dd if=/dev/vda of=/dev/null bs=4k count=256 "
                    f"skip={1024 * (cpu + 1)} iflag=direct 2>/dev/null")
    after = queue_interrupts(guest)
    assert sorted(after) == ["req.0", "req.1"], after
    assert all(after[q] > before.get(q, 0) for q in after), (before, after)


def queue_interrupts(guest: QemuGuest) -> dict[str, int]:
    """Completions per request queue: each has its own MSI-X vector."""
    counts: dict[str, int] = {}
    for line in guest.check("grep -- '-req\\.' /proc/interrupts").splitlines():
        fields = line.split()
        name = fields[-1].rsplit("-", 1)[-1]
        counts[name] = sum(int(f) for f in fields[1:] if f.isdigit())
    return counts


def test_discard_punches_holes_and_write_zeroes_zeroes(guest: QemuGuest, image: Path) -> None:
    before = os.stat(image).st_blocks
    guest.check(f"blkdiscard -o {8 * MIB} -l {16 * MIB} /dev/vda")
    guest.check("sync")
    assert os.stat(image).st_blocks <= before - (16 * MIB // 512) + 64
    with image.open("rb") as f:
        assert os.lseek(f.fileno(), 8 * MIB, os.SEEK_HOLE) < 24 * MIB
    # write-zeroes: BLKZEROOUT on a region full of pattern bytes
    assert sha256_file_range(image, 40 * MIB, MIB) != hashlib.sha256(bytes(MIB)).hexdigest()
    guest.check(f"blkzero {40 * MIB} {MIB} /dev/vda")
    assert sha256_file_range(image, 40 * MIB, MIB) == hashlib.sha256(bytes(MIB)).hexdigest()
    assert int(guest.check("cat /sys/block/vda/queue/write_zeroes_max_bytes")) > 0


def test_filesystem_made_in_guest_checks_clean_on_host(kind: str, image: Path, tmp_path: Path,
                                                       artifacts: GuestArtifacts) -> None:
    with blk_backend(kind, image, tmp_path) as backend, \
            QemuGuest(backend.qemu_args(), artifacts=artifacts, log_dir=tmp_path / "g") as vm:
        vm.check("mke2fs -q /dev/vda >/dev/null 2>&1 || mke2fs /dev/vda")
        vm.check("mkdir -p /mnt && mount -t ext2 /dev/vda /mnt && mkdir /mnt/d && "
                 "for i in 1 2 3 4 5 6 7 8; do "
                 "dd if=/dev/urandom of=/mnt/d/f$i bs=64k count=$((i*3)) 2>/dev/null; done")
        out = vm.check("sha256sum /mnt/d/f5 && umount /mnt && sync")
    e2fsck = shutil.which("e2fsck") or "/usr/sbin/e2fsck"
    fsck = subprocess.run([e2fsck, "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    debugfs = shutil.which("debugfs") or "/usr/sbin/debugfs"
    content = subprocess.run([debugfs, "-R", "cat /d/f5", str(image)], capture_output=True,
                             check=True).stdout
    assert len(content) == 15 * 64 * 1024
    assert hashlib.sha256(content).hexdigest() == guest_sha(out)


def test_read_only_disk(kind: str, image: Path, tmp_path: Path,
                        artifacts: GuestArtifacts) -> None:
    digest = sha256_file_range(image, 0, DISK_SIZE)
    with blk_backend(kind, image, tmp_path, read_only=True) as backend, \
            QemuGuest(backend.qemu_args(), artifacts=artifacts, log_dir=tmp_path / "g") as vm:
        assert vm.check("cat /sys/block/vda/ro").strip() == "1"
        result = vm.run("dd if=/dev/zero of=/dev/vda bs=4k count=16 conv=fsync")
        assert result.rc != 0, result.output
        assert vm.run("blkdiscard /dev/vda").rc != 0
        vm.check("dd if=/dev/vda of=/dev/null bs=1M count=4 2>/dev/null")
    assert sha256_file_range(image, 0, DISK_SIZE) == digest
