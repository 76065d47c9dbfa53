"""``dvmm bench recovery``: how long a guest waits when its blk backend is SIGKILLed.

Owns one measurement: the time from ``kill(backend, SIGKILL)`` to the first
guest request completed after it, over many kills, for two VMs run in the
same invocation (:mod:`.recovery_vms`): the dvmm core (KVM + SeaBIOS, its
supervisor restarting the backend, its vhost-user link reconnecting), and
QEMU (TCG) + the same dvmm blk backend (restarted here at once, QEMU
reconnecting with ``-chardev socket,reconnect=1``).  It prints p50 and p99
per VM, the goal of issue 8 (p50 < 100 ms, p99 < 500 ms) and the ratio
dvmm core / QEMU.  Not a test: nothing here asserts a speed.

How a completion is seen.  The frontend (the core, or QEMU) keeps the
backend's in-flight region (vhost-user INFLIGHT_SHMFD, a memfd) for the
life of the device and hands it to every restarted backend.  The backend
stores ``used_idx`` in that region's queue header right after it publishes
a used element to the guest (vhost-user.rst, "Inflight I/O tracking").  The
benchmark maps the same memfd read-only through ``/proc/FRONTEND/fd``,
takes the kill time just before ``kill(2)``, reads ``used_idx`` once the
process is gone (a pidfd; what the dying process still completed does not
count) and polls it every :data:`POLL` seconds: the first change is the
first request completed for the guest after the kill (a resubmitted one or
a new one).  Resolution: the poll interval achieved (printed).  Caveat: a
kill that lands in the microseconds between a used-ring store and the
``used_idx`` store shows up as the successor's catch-up store, one request's
service time before the guest's next completion.

Kills come PAUSE..PAUSE+0.5 s (seeded; ``--pause``, default 1 s) after the
previous recovery: at a random point of the guest's request cycle, after
the core supervisor's ``stable_after`` (1 s: its restart back-off stays at
the first step), and after the new warm standby it prepares shortly after
a restart (``STANDBY_DELAY``) has loaded.  Phases printed per kill: ``dead`` (the pidfd), the
core's events (``exit seen``, ``respawned``, ``restored``: their own
timestamps) and ``listening`` (the socket file replaced; polled).
"""

from __future__ import annotations

import argparse
import math
import mmap
import os
import random
import select
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvmm_shared.inflight import queue_region_size

from .recovery_vms import CoreVm, QemuVm, RecoveryVm, wait_for
from .report import LOWER, Compared, load_line, machine_line, table

POLL = 0.0005           # seconds between reads of used_idx
KILL_TIMEOUT = 60.0     # no completion this long after a kill: the run fails
PAUSE = 1.0             # seconds from one recovery to the next kill: PAUSE..PAUSE+0.5
LATE_EVENTS = 2.0       # seconds to wait for the core's recovery events after a completion
GOAL_P50, GOAL_P99 = 0.100, 0.500
MAX_KILLS = 10_000
MAX_PAUSE = 600.0
HEADER = struct.Struct("<QHHHH")   # u64 features; u16 version, desc_num, last_batch_head, used_idx
INFLIGHT_NAME = "/memfd:dvmm-inflight"
VMS = ("core", "qemu")


class InflightWatch:
    """A read-only view of the frontend's in-flight region: ``used_idx`` per queue."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        desc_num = HEADER.unpack_from(self._map, 0)[2] if size >= HEADER.size else 0
        stride = queue_region_size(desc_num) if desc_num else 0
        if not stride or stride > size:
            self._map.close()
            raise RuntimeError(f"{path}: not an in-flight region ({size} bytes)")
        self._offsets = [q * stride + 14 for q in range(size // stride)]

    @classmethod
    def find(cls, pid: int) -> InflightWatch | None:
        """The region a frontend process holds (None until the device started)."""
        seen: set[int] = set()
        found: list[str] = []
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                path = f"/proc/{pid}/fd/{fd}"
                try:
                    if os.readlink(path).startswith(INFLIGHT_NAME):
                        ino = os.stat(path).st_ino
                        found += [] if ino in seen else [path]
                        seen.add(ino)
                except OSError:
                    continue
        except OSError:
            return None
        if len(found) > 1:
            raise RuntimeError(f"process {pid} holds {len(found)} in-flight regions; "
                               "the benchmark watches a VM with one disk")
        return cls(found[0]) if found else None

    def used(self) -> tuple[int, ...]:
        m = self._map
        return tuple(m[o] | m[o + 1] << 8 for o in self._offsets)

    def close(self) -> None:
        self._map.close()


@dataclass
class Sample:
    seconds: float                     # kill to the first completion after it
    phases: dict[str, float]           # seconds after the kill
    polls: int


@dataclass
class Outcome:
    name: str
    label: str
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def times(self) -> list[float]:
        return sorted(s.seconds for s in self.samples)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least ``p`` % of the values at or below it."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` is now (tmpfs reuses inode numbers at once: ctime too)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_ctime_ns


def one_kill(vm: RecoveryVm, watch: InflightWatch) -> Sample:
    """SIGKILL the backend; wait for the first completion after it."""
    pid, sock = vm.backend_pid(), vm.socket_path()
    old_sock = _identity(sock)
    pidfd = os.pidfd_open(pid)
    try:
        wall, t0 = time.time(), time.monotonic()
        os.kill(pid, signal.SIGKILL)
        if not select.select([pidfd], [], [], 10)[0]:
            raise RuntimeError(f"backend {pid} did not die within 10 s of SIGKILL")
        phases = {"dead": time.monotonic() - t0}
    finally:
        os.close(pidfd)
    # Only now: until SIGKILL has taken effect, the dying backend may still
    # complete a request, and that one does not count.  Nothing completes
    # from here until a successor has started and been reconnected.
    base = watch.used()
    vm.backend_dead()
    polls = 0
    while watch.used() == base:
        now = time.monotonic()
        if now - t0 > KILL_TIMEOUT:
            vm.check()
            raise RuntimeError(f"{vm.label}: no request completed {KILL_TIMEOUT:.0f} s after "
                               f"the kill (phases so far: {phases})")
        if "listening" not in phases and _identity(sock) not in (None, old_sock):
            phases["listening"] = now - t0
        vm.event_phases(wall, phases)
        polls += 1
        time.sleep(POLL)
    done = time.monotonic() - t0
    _late_events(vm, wall, phases)
    return Sample(done, phases, polls)


def _late_events(vm: RecoveryVm, wall: float, phases: dict[str, float]) -> None:
    """The core publishes ``device-restored`` once its replay is done, and the
    backend may complete the guest's request a moment before that: wait for
    it (its timestamp is the core's, so waiting does not change it)."""
    deadline = time.monotonic() + LATE_EVENTS
    while not all(p in phases for p in vm.expected_phases) and time.monotonic() < deadline:
        vm.event_phases(wall, phases)
        time.sleep(0.01)


def run_vm(vm: RecoveryVm, kills: int, pause: float, rng: random.Random,
           progress: Callable[[str], None]) -> Outcome:
    """Boot to the first requests, then ``kills`` kills, each after a settle time."""
    out = Outcome(vm.name, vm.label)
    watch = wait_for("the disk's in-flight region", lambda: InflightWatch.find(
        vm.frontend_pid()), vm)
    try:
        first = watch.used()
        wait_for("the guest's first requests", lambda: watch.used() != first, vm)
        for k in range(1, kills + 1):
            _settle(vm, rng.uniform(pause, pause + 0.5))
            s = one_kill(vm, watch)
            out.samples.append(s)
            steps = ", ".join(f"{n} {v * 1e3:.1f}" for n, v in sorted(
                s.phases.items(), key=lambda kv: kv[1]))
            progress(f"{vm.name} kill {k}/{kills}: {s.seconds * 1e3:7.1f} ms to the first "
                     f"completion ({steps} ms)")
        verdict = vm.verdict()
        if verdict:
            out.problems.append(f"{vm.label}: {verdict}")
    finally:
        watch.close()
    return out


def _settle(vm: RecoveryVm, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        vm.check()
        time.sleep(min(left, 0.1))


# --- the run -------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    kills: int = 50
    vms: tuple[str, ...] = VMS
    seed: int = 1
    pause: float = PAUSE
    standby: bool = True   # the core's warm standby backends (dvmm run --no-standby)


def run(settings: Settings, progress: Callable[[str], None]) -> tuple[list[Outcome], float]:
    """Every VM in turn, each in its own temporary directory."""
    artifacts = None
    if "qemu" in settings.vms:  # before any long work: a guest that cannot be built
        from dvmm_core.guest import build_guest
        artifacts = build_guest(log=progress)
    rng = random.Random(settings.seed)
    outcomes = []
    started = time.monotonic()
    for name in settings.vms:
        with ExitStack() as stack:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix=f"dvmm-bench-recovery-{name}-")))
            chosen: CoreVm | QemuVm = CoreVm(work, settings.standby) \
                if artifacts is None or name == "core" else QemuVm(work, artifacts)
            stack.enter_context(chosen)
            vm: RecoveryVm = chosen
            progress(f"{vm.label}: up; {settings.kills} kills")
            outcomes.append(run_vm(vm, settings.kills, settings.pause, rng, progress))
    return outcomes, time.monotonic() - started


# --- results ---------------------------------------------------------------------------

QEMU_NOTE = ("QEMU's -chardev socket,reconnect=1 tries the socket again once per second after "
             "a hang-up: that timer is QEMU's own floor (about 1000 ms), whatever the backend "
             "does, so the ratio compares the two frontends' reconnect policies as much as "
             "anything")


def _ms(value: float) -> str:
    return f"{value * 1e3:.1f}"


def _met(value: float, goal: float) -> str:
    return "met" if value < goal else "not met"


def summary(out: Outcome) -> str:
    """The p50/p99 line of one VM, with the goal verdicts."""
    t = out.times()
    p50, p99 = percentile(t, 50), percentile(t, 99)
    return (f"{out.name:5} p50 {_ms(p50):>7} ms  p99 {_ms(p99):>7} ms  ({len(t)} kills; "
            f"goal p50 < {GOAL_P50 * 1e3:.0f} ms {_met(p50, GOAL_P50)}, "
            f"p99 < {GOAL_P99 * 1e3:.0f} ms {_met(p99, GOAL_P99)})  {out.label}")


def detail(outcomes: list[Outcome]) -> str:
    """Per VM: the spread, and the median time of each recovery step."""
    lines = [f"{'vm':5} {'kills':>5} {'min ms':>8} {'p50 ms':>8} {'mean ms':>8} {'p99 ms':>8} "
             f"{'max ms':>8}"]
    for o in outcomes:
        t = o.times()
        lines.append(f"{o.name:5} {len(t):5d} {_ms(t[0]):>8} {_ms(percentile(t, 50)):>8} "
                     f"{_ms(statistics.fmean(t)):>8} {_ms(percentile(t, 99)):>8} "
                     f"{_ms(t[-1]):>8}")
    lines.append("")
    for o in outcomes:
        names = {n for s in o.samples for n in s.phases}
        steps = sorted((statistics.median(s.phases[n] for s in o.samples if n in s.phases), n)
                        for n in names)
        text = ", ".join(f"{n} {_ms(v)}" for v, n in steps)
        lines.append(f"{o.name} steps (median ms after the kill): {text}, first completion "
                     f"{_ms(percentile(o.times(), 50))}")
    return "\n".join(lines)


def compared(outcomes: list[Outcome]) -> list[Compared]:
    """dvmm core against QEMU + the dvmm backend, when both ran."""
    by = {o.name: o.times() for o in outcomes}
    if set(by) != set(VMS):
        return []
    return [Compared("recovery", "blk-sigkill", f"p{p} (ms)", percentile(by["core"], p) * 1e3,
                     percentile(by["qemu"], p) * 1e3, "qemu", LOWER) for p in (50, 99)]


def describe(settings: Settings, outcomes: list[Outcome], wall: float) -> str:
    polls = sum(s.polls for o in outcomes for s in o.samples)
    polled = sum(s.seconds - s.phases["dead"] for o in outcomes for s in o.samples)
    return (f"machine: {machine_line()}\n{load_line()}\n"
            f"dvmm bench recovery: SIGKILL of the blk backend -> the first guest request "
            f"completed after it; {settings.kills} kills per VM, each {settings.pause:g}-"
            f"{settings.pause + 0.5:g} s after the previous recovery (seed {settings.seed}); "
            f"core {'with' if settings.standby else 'without'} warm standby; took "
            f"{wall:.0f} s\n"
            f"completion seen as: used_idx in the frontend's in-flight region (vhost-user "
            f"INFLIGHT_SHMFD, mapped read-only), polled every {POLL * 1e3:g} ms "
            f"(achieved {polled / max(polls, 1) * 1e3:.2f} ms); kill timed just before "
            f"kill(2); p99 is the nearest rank")


# --- command line ---------------------------------------------------------------------

def add_parser(sub: Any) -> None:
    p = sub.add_parser("recovery", help="SIGKILL of a blk backend to the next guest I/O: "
                       "dvmm core vs QEMU + dvmm backend",
                       description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--kills", type=int, default=Settings.kills,
                   help="kills per VM (default %(default)s; p99 wants at least 50)")
    p.add_argument("--vm", action="append", choices=VMS, dest="vms",
                   help="core and/or qemu (default both; the ratio needs both)")
    p.add_argument("--seed", type=int, default=Settings.seed,
                   help="seed of the pauses between kills (default %(default)s)")
    p.add_argument("--pause", type=float, default=PAUSE, metavar="SECONDS",
                   help="kill PAUSE..PAUSE+0.5 s (seeded) after the previous recovery "
                   "(default %(default)s; below 1 s the supervisor counts a backend as "
                   "crashing at start and backs off, and its next warm standby may still "
                   "be loading)")
    p.add_argument("--no-standby", action="store_true",
                   help="run the core with dvmm run --no-standby: restarts start a new "
                   "interpreter instead of activating a warm standby backend")
    p.set_defaults(func=main)


def preflight(settings: Settings) -> str | None:
    """Why the benchmark cannot run, in one line, before any long work."""
    if not 1 <= settings.kills <= MAX_KILLS:
        return f"--kills must be 1..{MAX_KILLS}, not {settings.kills}"
    if not 0 <= settings.pause <= MAX_PAUSE:
        return f"--pause must be 0..{MAX_PAUSE:g} seconds, not {settings.pause:g}"
    if "core" in settings.vms:
        from dvmm_core.kvm import kvm_available
        if (why := kvm_available()) is not None:
            return f"the dvmm core needs KVM: {why}"
    if "qemu" in settings.vms and shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    return None


def main(args: argparse.Namespace) -> int:
    settings = Settings(kills=args.kills, vms=tuple(v for v in VMS if v in (args.vms or VMS)),
                        seed=args.seed, pause=args.pause, standby=not args.no_standby)
    if (why := preflight(settings)) is not None:
        print(f"dvmm bench recovery: {why}", file=sys.stderr)
        return 1

    def say(s: str) -> None:
        print(s, file=sys.stderr, flush=True)
    outcomes, wall = run(settings, say)
    print(describe(settings, outcomes, wall))
    print()
    print(detail(outcomes))
    print()
    for o in outcomes:
        print(summary(o))
    print(f"goal (issue 8): p50 < {GOAL_P50 * 1e3:.0f} ms, p99 < {GOAL_P99 * 1e3:.0f} ms")
    rows = compared(outcomes)
    if rows:
        print()
        print(table(rows))
    if "qemu" in settings.vms:
        print(f"note: {QEMU_NOTE}")
    problems = [p for o in outcomes for p in o.problems]
    for msg in problems:
        print(f"warning: {msg}")
    return 1 if problems else 0


__all__ = ["InflightWatch", "Settings", "compared", "percentile", "run"]
