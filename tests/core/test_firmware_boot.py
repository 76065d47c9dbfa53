"""The dvmm core boots SeaBIOS on real KVM; SeaBIOS's virtio-blk driver reads
the demo disk through the core's virtio-pci transport and a vhost-user
backend process; the boot program prints a checksum of what it read.

Acceptance (issue 3): (a) dvmm blk backend, (b) qemu-storage-daemon,
(c) 2 vCPUs, (d) guest reset and clean SIGTERM, (e) backend SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from corevm import CoreVM, dvmm_argv, wait_until
from dvmm_core.boot.demo import DemoDisk, make_demo_disk, parse_demo_output

SECTORS = 2048  # 1 MiB, the acceptance minimum


@pytest.fixture
def demo(tmp_path: Path) -> DemoDisk:
    return make_demo_disk(tmp_path / "demo.img", payload_sectors=SECTORS, seed=7)


def assert_checksum(vm: CoreVM, disk: DemoDisk) -> None:
    text = vm.wait_serial("dvmm-demo: done", timeout=90)
    result = parse_demo_output(text)
    assert disk.mismatches(result) == [], vm.diagnostics()
    assert result is not None and result.checksum == disk.checksum
    assert result.sectors == SECTORS


def test_firmware_reads_disk_through_dvmm_blk_backend(tmp_path: Path, demo: DemoDisk) -> None:
    with CoreVM(tmp_path, ["--firmware", "seabios", "--disk", str(demo.path)]) as vm:
        assert_checksum(vm, demo)
        assert "found virtio-blk at 00:02.0" in vm.firmware()
        backends = vm.backends()
        assert any("dvmm_blk" in " ".join(p.cmdline()) for p in backends)
        assert vm.stop() == 0
    for p in backends:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE


@pytest.fixture
def qsd(tmp_path: Path, demo: DemoDisk) -> Iterator[str]:
    sock = str(tmp_path / "qsd.sock")
    proc = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev",
         f"driver=file,node-name=f0,filename={demo.path}", "--export",
         f"type=vhost-user-blk,id=e0,addr.type=unix,addr.path={sock},node-name=f0,writable=on"],
        stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: os.path.exists(sock), 15, "qemu-storage-daemon's socket", proc)
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_firmware_reads_disk_through_qemu_storage_daemon(tmp_path: Path, demo: DemoDisk,
                                                         qsd: str) -> None:
    with CoreVM(tmp_path, ["--firmware", "seabios", "--vhost-user-blk", qsd]) as vm:
        assert_checksum(vm, demo)
        assert vm.stop() == 0


def test_firmware_finds_two_cpus(tmp_path: Path, demo: DemoDisk) -> None:
    with CoreVM(tmp_path, ["--cpus", "2", "--disk", str(demo.path)]) as vm:
        log = vm.wait_firmware("cpu(s)", timeout=60)
        assert "Found 2 cpu(s)" in log, vm.diagnostics()
        assert_checksum(vm, demo)


@pytest.mark.parametrize("after", ["reset-cf9", "reset-kbd"])
def test_firmware_guest_reset_reboots_and_sigterm_is_clean(tmp_path: Path, after: str) -> None:
    disk = make_demo_disk(tmp_path / "reset.img", payload_sectors=64, after=after)
    with CoreVM(tmp_path, ["--disk", str(disk.path)]) as vm:
        text = vm.wait_serial("dvmm-demo: booted", count=2, timeout=90)
        assert text.count("SeaBIOS (version") >= 2
        assert "resetting the machine" in vm.stderr()
        backends = vm.backends()
        assert backends, "the core should have a blk backend child"
        assert vm.stop() == 0
        assert "Traceback" not in vm.stderr()
    wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                               for p in backends), 10, "backends to exit")


def test_firmware_backend_sigkill_core_survives(tmp_path: Path) -> None:
    # after=reset keeps the guest doing disk I/O (every boot reads the disk).
    disk = make_demo_disk(tmp_path / "kill.img", payload_sectors=256, after="reset-cf9")
    with CoreVM(tmp_path, ["--disk", str(disk.path)]) as vm:
        vm.wait_serial("dvmm-demo: done", timeout=90)
        (backend,) = [p for p in vm.backends() if "dvmm_blk" in " ".join(p.cmdline())
                      and "--standby-fd" not in p.cmdline()]
        os.kill(backend.pid, signal.SIGKILL)
        err = vm.wait_stderr("killed by SIGKILL", timeout=30)
        assert "blk0" in err and "restarting in" in err
        vm.wait_stderr("blk0: backend restored after", timeout=30)
        # The guest goes on booting from the disk the restarted backend serves.
        boots = vm.serial().count("dvmm-demo: done")
        vm.wait_serial("dvmm-demo: done", timeout=120, count=boots + 2)
        assert vm.proc is not None and vm.proc.poll() is None, vm.diagnostics()
        assert vm.stop() == 0


@pytest.fixture
def hugepages() -> Iterator[None]:
    """Reserve 2 MiB hugepages for one test (root), restoring the old count."""
    knob = Path("/proc/sys/vm/nr_hugepages")
    old = knob.read_text().strip()
    try:
        knob.write_text("96")
    except OSError as exc:
        pytest.skip(f"cannot reserve hugepages: {exc}")
    try:
        yield
    finally:
        knob.write_text(old)


def test_firmware_boots_with_hugepage_backed_ram(tmp_path: Path, demo: DemoDisk,
                                                  hugepages: None) -> None:
    with CoreVM(tmp_path, ["--hugepages", "--memory", "128", "--disk", str(demo.path)]) as vm:
        assert_checksum(vm, demo)
        assert vm.stop() == 0


def test_hugepages_without_a_reservation_is_a_one_line_error(tmp_path: Path,
                                                            demo: DemoDisk) -> None:
    knob = Path("/proc/sys/vm/nr_hugepages")
    if int(knob.read_text()) != 0:
        pytest.skip("hugepages are reserved on this host; the error path needs none")
    out = subprocess.run(dvmm_argv("run", "-q", "--hugepages", "--disk", str(demo.path)),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "free hugepages" in out.stderr and "nr_hugepages" in out.stderr


def test_firmware_sees_ram_above_4g(tmp_path: Path, demo: DemoDisk) -> None:
    """5 GiB: 3 GiB below the PCI hole, 2 GiB from 4 GiB up, in e820 and
    in the vhost-user memory table (the backend still serves the disk)."""
    with CoreVM(tmp_path, ["--memory", "5120", "--disk", str(demo.path)]) as vm:
        assert_checksum(vm, demo)
        log = vm.firmware()
        assert "addr 0x0000000000000000 len 0x00000000c0000000 [RAM]" in log, log[:2000]
        assert "addr 0x0000000100000000 len 0x0000000080000000 [RAM]" in log, log[:2000]
        assert vm.stop() == 0
