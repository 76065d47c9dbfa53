"""Self-test of the QEMU harness and the Linux test guest.

Boots the cached guest under QEMU (TCG) with QEMU's *own* virtio-blk
(``-drive if=virtio``), so a failure here is the harness's or the guest's,
never a dvmm backend's.  Checks the command channel frames output and exit
status exactly, and that boot failures, panics and timeouts are reported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from dvmm_core.guest import GuestArtifacts, build_guest, make_disk_image, pattern_bytes
from dvmm_testing import (
    CommandFailed,
    GuestPanic,
    GuestTimeout,
    QemuGuest,
    QemuStartError,
)
from dvmm_testing.qemu import State

pytestmark = [
    pytest.mark.conformance,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
    ),
]

DISK_SIZE = 8 << 20
SEED = 7


@pytest.fixture(scope="module")
def artifacts() -> GuestArtifacts:
    return build_guest(log=lambda _m: None)


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("disk") / "disk.img"
    make_disk_image(path, DISK_SIZE, pattern_seed=SEED)
    return path


@pytest.fixture(scope="module")
def ext4_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    mkfs = shutil.which("mkfs.ext4", path=f"{os.environ.get('PATH', '')}:/sbin:/usr/sbin")
    if mkfs is None:
        pytest.skip("mkfs.ext4 not installed (e2fsprogs)")
    path = tmp_path_factory.mktemp("ext4") / "ext4.img"
    make_disk_image(path, 32 << 20)
    subprocess.run([mkfs, "-q", "-F", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def vm(artifacts: GuestArtifacts, disk: Path, ext4_disk: Path) -> Iterator[QemuGuest]:
    scratch = disk.with_name("scratch.img")
    make_disk_image(scratch, 16 << 20)
    drives = [
        "-drive", f"file={disk},if=virtio,format=raw,cache=none,aio=threads",  # vda
        "-drive", f"file={ext4_disk},if=virtio,format=raw",  # vdb
        "-drive", f"file={scratch},if=virtio,format=raw",  # vdc
    ]  # fmt: skip
    with QemuGuest(drives, artifacts=artifacts) as guest:
        yield guest


# -- command channel ----------------------------------------------------------------


def test_exit_status_and_output_come_back_exactly(vm: QemuGuest) -> None:
    assert vm.run("echo one; echo two; echo three").output == "one\ntwo\nthree\n"
    assert vm.run("printf 'no newline'").output == "no newline"
    assert vm.run("printf 'blank lines\\n\\n\\n'").output == "blank lines\n\n\n"
    assert vm.run("true").output == ""
    failed = vm.run("echo out; echo err >&2; exit 3")
    assert (failed.rc, failed.output) == (3, "out\nerr\n")


def test_commands_reach_the_guest_unmangled(vm: QemuGuest) -> None:
    tricky = "a 'single' \"double\" $HOME `x` \\back\\slash \t tab; | & ~ *"
    quoted = tricky.replace("'", "'\\''")
    assert vm.check(f"printf '%s' '{quoted}'") == tricky
    assert vm.check("for i in 1 2\ndo\n  echo line$i\ndone") == "line1\nline2\n"
    assert vm.check("printf '\\x03\\x04\\x1b[0m\\r\\n'") == "\x03\x04\x1b[0m\r\n"


def test_commands_do_not_read_the_channel(vm: QemuGuest) -> None:
    assert vm.run("cat").output == ""  # stdin is /dev/null, not the serial port
    assert vm.check("echo still here") == "still here\n"


def test_large_output(vm: QemuGuest) -> None:
    out = vm.check("seq 1 20000")
    assert out == "".join(f"{i}\n" for i in range(1, 20001))


def test_check_raises_with_output_and_log_path(vm: QemuGuest) -> None:
    with pytest.raises(CommandFailed) as info:
        vm.check("echo boom; exit 5")
    assert info.value.result.rc == 5
    assert "boom" in str(info.value)
    assert str(vm.serial_log) in str(info.value)


# -- the guest: modules and QEMU's own virtio-blk ------------------------------------


def test_virtio_blk_size_and_pattern(vm: QemuGuest) -> None:
    assert vm.check("blockdev --getsize64 /dev/vda") == f"{DISK_SIZE}\n"
    want = pattern_bytes(SEED, 3 << 20, 4096)
    got = vm.check("dd if=/dev/vda bs=4096 skip=768 count=1 2>/dev/null | od -An -tx1 -v")
    assert bytes.fromhex(got.replace("\n", " ")) == want


def test_virtio_blk_write_read(vm: QemuGuest, disk: Path) -> None:
    vm.check("echo dvmm-selftest-data | dd of=/dev/vda bs=512 seek=100 conv=fsync 2>/dev/null")
    vm.check("echo 3 > /proc/sys/vm/drop_caches")
    out = vm.check("dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | head -c 19")
    assert out == "dvmm-selftest-data\n"
    with disk.open("rb") as f:  # cache=none + fsync: the bytes are in the file
        assert os.pread(f.fileno(), 19, 100 * 512) == b"dvmm-selftest-data\n"


def test_ext4_on_virtio_blk(vm: QemuGuest) -> None:
    # busybox mke2fs only makes ext2 (no -t); the host's mkfs.ext4 made vdb.
    vm.check("mkdir -p /mnt/d && mount -t ext4 /dev/vdb /mnt/d")
    vm.check("echo hello > /mnt/d/f && umount /mnt/d && mount -t ext4 /dev/vdb /mnt/d")
    assert vm.check("cat /mnt/d/f && umount /mnt/d") == "hello\n"


def test_ext2_through_the_ext4_driver(vm: QemuGuest) -> None:
    vm.check("mke2fs -q -F /dev/vdc >/dev/null && mkdir -p /mnt/e")
    vm.check("mount -t ext2 /dev/vdc /mnt/e && echo hi > /mnt/e/f && umount /mnt/e")


def test_virtio_modules_loaded(vm: QemuGuest) -> None:
    loaded = vm.check("cut -d' ' -f1 /proc/modules").split()
    for module in ("virtio_pci", "virtio_blk", "virtio_net", "virtio_gpu", "ext4"):
        assert module in loaded


# -- failures are reported, nothing leaks --------------------------------------------


def test_poweroff_ends_qemu(artifacts: GuestArtifacts) -> None:
    with QemuGuest(artifacts=artifacts) as guest:
        pid = guest.pid
        assert guest.poweroff() == 0
    assert not Path(f"/proc/{pid}").exists()


def test_qemu_start_failure_shows_stderr(artifacts: GuestArtifacts, tmp_path: Path) -> None:
    guest = QemuGuest(["-device", "no-such-device"], artifacts=artifacts, log_dir=tmp_path)
    with pytest.raises(QemuStartError, match="no-such-device"):
        guest.start()
    assert guest.state is State.STOPPED


def test_kernel_panic_is_reported(artifacts: GuestArtifacts, tmp_path: Path) -> None:
    guest = QemuGuest(artifacts=artifacts, log_dir=tmp_path)
    with pytest.raises(GuestPanic, match="sysrq triggered crash") as info, guest:
        guest.run("echo c > /proc/sysrq-trigger")
    assert str(guest.serial_log) in str(info.value)
    assert not Path(f"/proc/{guest.pid}").exists()


def test_command_timeout_then_clean_stop(artifacts: GuestArtifacts, tmp_path: Path) -> None:
    guest = QemuGuest(artifacts=artifacts, log_dir=tmp_path)
    with pytest.raises(GuestTimeout, match="sleep 600"), guest:
        guest.run("sleep 600", timeout=1.0)
    assert guest.stop() is not None  # idempotent: QEMU's status
    assert not Path(f"/proc/{guest.pid}").exists()
