"""Crash recovery of the blk backend, with QEMU (TCG) as the frontend and Linux as the driver.

Issue 8, acceptance (a): the dvmm blk backend is SIGKILLed 20 times, at
random moments while the guest's I/O flows, and a small supervisor loop in
the test (:class:`dvmm_testing.restart_loop.RestartLoop`) starts it again on
the same socket with the same image.  QEMU's ``-chardev socket,reconnect=1``
reconnects to each new run (it retries once a second) and replays the set-up.
What QEMU 7.2 sends then (seen with strace on the backend): no
``GET_INFLIGHT_FD`` (it asked once, at the first start, and keeps the
region); ``SET_INFLIGHT_FD`` with that region right after ``SET_FEATURES``,
before the memory table and the rings; and ``SET_VRING_BASE`` = the ring's
*used* index, because its ``GET_VRING_BASE`` on the dead connection failed
and it rewound ``last_avail_idx`` to ``used->idx``
(``virtio_queue_restore_last_avail_idx``).  A request the dead run had
popped but not completed is found in the region and served again.

Meanwhile the guest runs ``blkverify`` (``vmm-core/dvmm_core/guest/blkverify.c``):
pass after pass it writes 64 MiB of numbered, checksummed 4 KiB blocks with
O_DIRECT from 4 threads, fsyncs, and reads every block back, verifying it.
What must hold: the guest saw no I/O error (neither blkverify nor the
kernel's log), every block verified in every pass, and the image on the host
holds exactly the blocks of the last pass (recomputed here, on the host).

The kill schedule is seeded (``DVMM_RECOVERY_SEED``, random by default) and
printed: each kill waits until the run it kills has moved some data (so it
lands during I/O: writes, flushes or reads), then a random 0..1.5 s more,
and then for the next instant the backend is seen on a CPU rather than
waiting for a kick (most likely in the middle of a request: the guest's
emulated CPU is the bottleneck here, and the backend sleeps ~80% of the
time).  Kills that left a request in flight show in the backend's log
("served again") and in the report.
"""

from __future__ import annotations

import os
import random
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dvmm_core.guest import GuestArtifacts, build_guest, make_disk_image
from dvmm_testing import QemuGuest, blkpattern
from dvmm_testing.restart_loop import RestartLoop

pytestmark = pytest.mark.conformance

MIB = 1 << 20
DISK_SIZE = 64 * MIB
KILLS = 20
MAX_DELAY = 1.5  # seconds after I/O resumed; a pass takes about 1.5 s here
BUSY_WAIT = 0.5  # seconds to wait for the backend to be on a CPU before a kill
IO_RESUMED = MIB  # bytes a run moves before it counts as serving I/O
SERVE_TIMEOUT = 60.0  # a restarted run gets QEMU back (reconnect=1: every 1 s)
# What Linux logs when a block request fails or hangs (blk_update_request is
# the 5.x name of the I/O error line, "timed out"/"timeout" the blk-mq one),
# and what virtio_ring's BAD_RING says about a used entry it never handed out
# (a completion given twice) before it marks the queue broken.
KERNEL_IO_TROUBLE = re.compile(r"I/O error|blk_update_request|timed out|timeout|"
                               r"virtio_blk.*(reset|error)|is not a head|out of range|"
                               r"broken|WARNING:|BUG:|Oops", re.I)
# What the backend must never log, in any run.
BACKEND_TROUBLE = re.compile(r"Traceback|broken|bad request|request dropped|I/O error| E ")


@pytest.fixture(scope="module")
def artifacts() -> GuestArtifacts:
    return build_guest(log=lambda _m: None)


def recovery_seed() -> int:
    value = os.environ.get("DVMM_RECOVERY_SEED")
    return int(value) if value else random.SystemRandom().randrange(1, 1 << 31)


@dataclass
class Outage:
    """One kill: which run, how long after its I/O began, and how long until I/O again."""

    generation: int
    delay: float
    busy: bool  # the backend was seen running (not waiting for a kick) just before
    killed_at: float
    resumed_at: float = 0.0

    @property
    def seconds(self) -> float:
        return self.resumed_at - self.killed_at


@dataclass
class Campaign:
    seed: int
    outages: list[Outage] = field(default_factory=list)


def blk_loop(image: Path, workdir: Path) -> RestartLoop:
    sock = workdir / "blk.sock"
    argv = [sys.executable, "-m", "dvmm_blk", "--socket", str(sock), "--image", str(image),
            "--serial", "dvmm-recovery", "-v"]
    return RestartLoop(argv, sock, workdir / "backend", "blk")


def qemu_args(sock: Path) -> list[str]:
    return ["-chardev", f"socket,id=c0,path={sock},reconnect=1",
            "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"]


def kill_during_io(loop: RestartLoop, campaign: Campaign) -> None:
    """KILLS times: wait for I/O to flow in the current run, a random moment more, SIGKILL."""
    rng = random.Random(campaign.seed)
    for gen in range(KILLS):
        loop.wait_io(gen, IO_RESUMED, SERVE_TIMEOUT)
        if campaign.outages:
            campaign.outages[-1].resumed_at = time.monotonic()
        delay = rng.uniform(0.0, MAX_DELAY)
        time.sleep(delay)  # the chosen kill moment, not a wait for an event
        busy = loop.wait_running(BUSY_WAIT)  # ... made the next instant it is mid-request
        outage = Outage(gen, delay, busy, time.monotonic())
        loop.kill()
        campaign.outages.append(outage)
    loop.wait_io(KILLS, IO_RESUMED, SERVE_TIMEOUT)
    campaign.outages[-1].resumed_at = time.monotonic()


def stop_blkverify(vm: QemuGuest, pid: str, timeout: float = 120.0) -> str:
    """SIGUSR1: blkverify finishes its pass and prints the summary; its whole output."""
    vm.check(f"kill -USR1 {pid}")
    deadline = time.monotonic() + timeout
    while "blkverify: done" not in (out := vm.check("cat /tmp/blkverify.out")):
        assert time.monotonic() < deadline, f"blkverify did not finish:\n{out}"
        time.sleep(0.2)  # polling the guest for its summary line
    return out


def test_blk_backend_killed_20_times_during_io(tmp_path: Path, artifacts: GuestArtifacts,
                                               record_property: Callable[[str, object], None]
                                               ) -> None:
    t0 = time.monotonic()
    campaign = Campaign(recovery_seed())
    print(f"\nrecovery seed {campaign.seed} (DVMM_RECOVERY_SEED={campaign.seed} repeats "
          f"the kill schedule)")
    image = tmp_path / "disk.img"
    make_disk_image(image, DISK_SIZE, pattern_seed=3)
    loop = blk_loop(image, tmp_path)
    with loop:
        with QemuGuest(qemu_args(loop.socket_path), artifacts=artifacts,
                       log_dir=tmp_path / "guest") as vm:
            pid = vm.check(f"blkverify /dev/vda {DISK_SIZE} 0 {campaign.seed} 4 "
                           ">/tmp/blkverify.out 2>&1 & echo $!").strip()
            kill_during_io(loop, campaign)
            output = stop_blkverify(vm, pid)
            dmesg = vm.check("dmesg")
        guest_gone = time.monotonic() - t0
    duration = time.monotonic() - t0
    summary = blkpattern.parse_output(output)
    report(campaign, summary, resubmissions(loop), duration, record_property)

    exits = [f"run {e.generation} status {e.status} at {e.at - t0:.2f} s" for e in loop.exits]
    assert [e.status for e in loop.exits] == [-signal.SIGKILL] * KILLS, \
        f"{exits}; guest powered off at {guest_gone:.2f} s"
    assert not re.search(r"EIO|MISMATCH", output), output
    assert (summary.bad, summary.eio) == (0, 0), output
    assert summary.pass_lines == summary.passes >= 2, output
    assert summary.blocks_verified == summary.passes * (DISK_SIZE // blkpattern.BLOCK)
    trouble = [ln for ln in dmesg.splitlines() if KERNEL_IO_TROUBLE.search(ln)]
    assert not trouble, "\n".join(trouble)
    for gen in range(KILLS + 1):
        text = loop.log_path(gen).read_text(errors="replace")
        assert not BACKEND_TROUBLE.search(text), f"{loop.log_path(gen)}:\n{text}"
    bad = blkpattern.compare_image(image, DISK_SIZE // blkpattern.BLOCK, summary.passes,
                                   campaign.seed)
    assert not bad, f"{len(bad)} blocks of the image differ from pass {summary.passes}: " \
        + "; ".join(map(str, bad[:10]))


def resubmissions(loop: RestartLoop) -> list[int]:
    """Per run: requests the previous run left in flight that this one served again."""
    pattern = re.compile(r"(\d+) requests in flight are served again")
    return [sum(int(n) for n in pattern.findall(loop.log_path(gen).read_text(errors="replace")))
            for gen in range(loop.generation + 1)]


def report(campaign: Campaign, summary: blkpattern.Summary, resubmitted: list[int],
           duration: float, record_property: Callable[[str, object], None]) -> None:
    outages = [o.seconds for o in campaign.outages]
    print(f"{len(campaign.outages)} kills, {summary.passes} passes, "
          f"{summary.blocks_verified} blocks verified, bad {summary.bad}, eio {summary.eio}; "
          f"{sum(1 for n in resubmitted if n)} kills left requests in flight "
          f"({sum(resubmitted)} served again by the next run); "
          f"outage (kill -> I/O again) min {min(outages):.2f} s, max {max(outages):.2f} s; "
          f"test {duration:.0f} s")
    for o in campaign.outages:
        print(f"  kill {o.generation + 1:2}: {o.delay:.2f} s into the run's I/O"
              f"{', backend running' if o.busy else ''}; "
              f"I/O again {o.seconds:.2f} s after the kill")
    record_property("kills", len(campaign.outages))
    record_property("passes", summary.passes)
    record_property("blocks_verified", summary.blocks_verified)
    record_property("resubmitted", sum(resubmitted))
    record_property("seed", campaign.seed)
    record_property("seconds", round(duration, 1))
