"""Disk image formats under a real guest: Linux writes qcow2 through the dvmm blk backend.

QEMU (TCG) boots the Debian guest with a vhost-user-blk disk served by
``dvmm backend blk`` on a qcow2 image (detected, ``--format auto``), the top
of a backing chain of three (raw <- qcow2 <- qcow2).  The guest's
``blkverify`` writes and verifies numbered blocks; discard and write-zeroes
go through ``blkdiscard`` and ``blkzero``.  Afterwards the image must pass
``qemu-img check`` with no errors and no leaks, and ``qemu-img compare``
must find it equal to the expected raw content, recomputed on the host.

The crash test kills the backend 20 times during the guest's writes (the
restart loop and QEMU's reconnect of the crash-recovery test).  Each run of
the backend starts with ``qemu-img check`` of the image as the previous run
left it (the wrapper runs it before exec'ing the backend): no run may find
an error; leaks are allowed and reported (the next read-write open reclaims
them, as qemu does for a dirty image).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from blk_backends import blk_backend
from dvmm_core.guest import GuestArtifacts, build_guest
from dvmm_testing import QemuGuest, blkpattern
from dvmm_testing.restart_loop import RestartLoop
from test_recovery_blk import (
    BACKEND_TROUBLE,
    KERNEL_IO_TROUBLE,
    KILLS,
    Campaign,
    kill_during_io,
    qemu_args,
    recovery_seed,
    stop_blkverify,
)

pytestmark = pytest.mark.conformance

MIB = 1 << 20
DISK_SIZE = 64 * MIB
BLOCKS = DISK_SIZE // blkpattern.BLOCK


@pytest.fixture(scope="module")
def artifacts() -> GuestArtifacts:
    return build_guest(log=lambda _m: None)


def qemu_img(*args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode in ok, f"qemu-img {' '.join(args)}: {done.stdout}{done.stderr}"
    return done


def chain_of_three(tmp: Path) -> Path:
    """raw base (a byte pattern) <- qcow2 v2 (qemu-io data) <- qcow2 v3 (empty)."""
    base = tmp / "base.raw"
    base.write_bytes(bytes(range(256)) * (DISK_SIZE // 256))
    mid, top = tmp / "mid.qcow2", tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", base.name, "-F", "raw",
             str(mid))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 40M 3M", str(mid)],
                   check=True, capture_output=True)
    qemu_img("create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", str(top))
    return top


def expected_raw(tmp: Path, passes: int, seed: int, zeroed: list[tuple[int, int]]) -> Path:
    """The disk after blkverify's last pass, with the zeroed ranges."""
    out = bytearray(b"".join(blkpattern.block(n, passes, seed) for n in range(BLOCKS)))
    for offset, length in zeroed:
        out[offset:offset + length] = bytes(length)
    path = tmp / "expected.raw"
    path.write_bytes(out)
    return path


def run_blkverify(vm: QemuGuest, seed: int, passes: int) -> blkpattern.Summary:
    out = vm.check(f"blkverify /dev/vda {DISK_SIZE} {passes} {seed} 4 2>&1", timeout=600)
    summary = blkpattern.parse_output(out)
    assert (summary.bad, summary.eio) == (0, 0), out
    return summary


def test_guest_writes_a_qcow2_chain_that_qemu_img_accepts(tmp_path: Path,
                                                           artifacts: GuestArtifacts) -> None:
    top = chain_of_three(tmp_path)
    seed = 1313
    qemu_img("convert", "-O", "raw", str(top), str(tmp_path / "before.raw"))
    before = (tmp_path / "before.raw").read_bytes()
    with blk_backend("dvmm", top, tmp_path) as backend, \
            QemuGuest(backend.qemu_args(), artifacts=artifacts, log_dir=tmp_path / "g") as vm:
        # the chain reads through: the middle image's data over the raw base's pattern
        out = vm.check("dd if=/dev/vda bs=1M skip=39 count=5 2>/dev/null | sha256sum")
        assert hashlib.sha256(before[39 * MIB:44 * MIB]).hexdigest() in out
        summary = run_blkverify(vm, seed, 2)
        vm.check(f"blkdiscard -o {8 * MIB} -l {4 * MIB} /dev/vda")
        vm.check(f"blkzero {20 * MIB} {MIB + 4096} /dev/vda && sync")
        dmesg = vm.check("dmesg")
    log = (tmp_path / "dvmm-blk.log").read_text(errors="replace")
    assert "qcow2" in log and not BACKEND_TROUBLE.search(log), log
    assert not [ln for ln in dmesg.splitlines() if KERNEL_IO_TROUBLE.search(ln)], dmesg
    check = qemu_img("check", "--output=json", str(top))
    result = json.loads(check.stdout)
    assert result["check-errors"] == 0 and "corruptions" not in result \
        and "leaks" not in result, result
    expected = expected_raw(tmp_path, summary.passes, seed,
                            [(8 * MIB, 4 * MIB), (20 * MIB, MIB + 4096)])
    qemu_img("compare", "-f", "qcow2", "-F", "raw", str(top), str(expected))
    assert qemu_img("info", "--output=json", str(top)).stdout.count('"dirty-flag": false')


def checked_backend(image: Path, workdir: Path) -> RestartLoop:
    """The blk backend, each run preceded by ``qemu-img check`` of the image."""
    sock = workdir / "blk.sock"
    backend = [sys.executable, "-m", "dvmm_blk", "--socket", str(sock), "--image", str(image),
               "--serial", "dvmm-qcow2-recovery", "-v"]
    script = (f"qemu-img check --output=json {shlex.quote(str(image))}; "
              f"echo \"qemu-img check status $?\"; exec {shlex.join(backend)}")
    return RestartLoop(["sh", "-c", script], sock, workdir / "backend", "blk")


def check_results(loop: RestartLoop) -> list[tuple[int, dict[str, int]]]:
    """Per run: the status and JSON of the check run before it."""
    out = []
    for gen in range(loop.generation + 1):
        text = loop.log_path(gen).read_text(errors="replace")
        status = re.search(r"qemu-img check status (\d+)", text)
        body = re.search(r"^\{.*?^\}", text, re.S | re.M)
        assert status and body, f"{loop.log_path(gen)}:\n{text[:2000]}"
        out.append((int(status.group(1)), json.loads(body.group(0))))
    return out


def test_qcow2_backend_killed_20_times_during_guest_writes(tmp_path: Path,
                                                           artifacts: GuestArtifacts) -> None:
    campaign = Campaign(recovery_seed())
    print(f"\nrecovery seed {campaign.seed} (DVMM_RECOVERY_SEED={campaign.seed} repeats it)")
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), str(DISK_SIZE))
    loop = checked_backend(image, tmp_path)
    with loop, QemuGuest(qemu_args(loop.socket_path), artifacts=artifacts,
                         log_dir=tmp_path / "guest") as vm:
        pid = vm.check(f"blkverify /dev/vda {DISK_SIZE} 0 {campaign.seed} 4 "
                       ">/tmp/blkverify.out 2>&1 & echo $!").strip()
        kill_during_io(loop, campaign)
        output = stop_blkverify(vm, pid)
        dmesg = vm.check("dmesg")
    summary = blkpattern.parse_output(output)
    assert [e.status for e in loop.exits] == [-signal.SIGKILL] * KILLS
    assert (summary.bad, summary.eio) == (0, 0) and not re.search(r"EIO|MISMATCH", output), \
        output
    assert not [ln for ln in dmesg.splitlines() if KERNEL_IO_TROUBLE.search(ln)], dmesg
    checks = check_results(loop)
    leaky = [gen for gen, (status, _) in enumerate(checks) if status == 3]
    print(f"{KILLS} kills, {summary.passes} passes; qemu-img check after each kill: "
          f"no errors, leaks after {len(leaky)} kills (runs {leaky}: "
          f"{[checks[g][1].get('leaks') for g in leaky]} clusters), reclaimed on reopen")
    for gen, (status, result) in enumerate(checks):
        assert status in (0, 3) and "corruptions" not in result, (gen, result)
        text = loop.log_path(gen).read_text(errors="replace")
        assert not BACKEND_TROUBLE.search(text), f"{loop.log_path(gen)}:\n{text}"
    final = qemu_img("check", "--output=json", str(image))  # after the clean last stop
    assert json.loads(final.stdout).get("leaks") is None, final.stdout
    raw = tmp_path / "final.raw"
    qemu_img("convert", "-O", "raw", str(image), str(raw))
    bad = blkpattern.compare_image(raw, BLOCKS, summary.passes, campaign.seed)
    assert not bad, f"{len(bad)} blocks differ from pass {summary.passes}: " \
        + "; ".join(map(str, bad[:10]))
