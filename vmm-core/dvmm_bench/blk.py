"""``dvmm bench blk``: vhost-user-blk backends driven by a synthetic guest driver.

Owns one measurement: the same workloads, with the same parameters, run in
one invocation against dvmm's blk backend (``python -m dvmm_blk``) and
against qemu-storage-daemon's vhost-user-blk export, alternating, each on its
own copy of the same pre-filled image.  There is no VM: the frontend is
:class:`dvmm_shared.synthetic.SyntheticVM` (memfd guest memory, driver-side
rings, kick/call eventfds) speaking the real vhost-user protocol, and
:class:`BlkDriver` plays the guest's virtio-blk driver — it keeps ``depth``
requests in flight (post, kick when the device asks for it, wait on the call
eventfd, reap, re-post) and times each request from post to reap.

Per workload it reports IOPS, MB/s, p50/p99 latency, the backend process's
CPU seconds per GB moved (psutil, user + system, all its threads) and how
busy the driver itself was (a driver near 100 % means the number is a floor
for that backend, not its limit).  Reads are checked: every 4 KiB block of
the image starts with its own byte offset, so a backend that returns the
wrong block, or none, fails the run instead of looking fast.

Targets: a file in /dev/shm (tmpfs: the backend's own cost) and a file
under /var/tmp ("disk": a normal buffered file; before every run both images
are flushed and dropped from the page cache, so reads start cold and warm up
during the run, and writes land in the page cache).  Not a test: nothing
here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from dvmm_shared.driver import Buf
from dvmm_shared.procs import log_tail, spawn, stop
from dvmm_shared.synthetic import SyntheticVM
from dvmm_shared.virtio import (
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_SECTOR_SIZE,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VirtioBlkReqType,
    bit,
)

from .report import (
    HIGHER,
    LOWER,
    Compared,
    add_progress_args,
    load_line,
    machine_line,
    median,
    process_cpu_seconds,
    progress_printer,
    table,
)

PEER = "qsd"
BACKENDS = ("dvmm", PEER)
WANTED = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_EVENT_IDX) | bit(VIRTIO_BLK_F_FLUSH)
QUEUE_SIZE = 128          # 32 requests x 3 descriptors fit
BLOCK = 4096              # the stamp granule: every 4 KiB block starts with its offset
HEADER = struct.Struct("<IIQ")   # struct virtio_blk_req header (5.2.6)
STAMP = struct.Struct("<Q")
POISON = 0xDEADBEEFDEADBEEF
STALL_MS = 1000           # no completion for this long with requests in flight: a stall
TORN_RETRIES = 1000       # re-reads of an impossible used index before giving up


@dataclass(frozen=True)
class Workload:
    name: str
    read: bool
    size: int       # bytes per request
    depth: int      # requests kept in flight
    random: bool


WORKLOADS = (
    Workload("randread-4k-qd1", True, 4096, 1, True),
    Workload("randread-4k-qd32", True, 4096, 32, True),
    Workload("randwrite-4k-qd32", False, 4096, 32, True),
    Workload("seqread-128k-qd8", True, 128 << 10, 8, False),
    Workload("seqwrite-128k-qd8", False, 128 << 10, 8, False),
)
MAX_DEPTH = max(w.depth for w in WORKLOADS)
MAX_SIZE = max(w.size for w in WORKLOADS)


@dataclass(frozen=True)
class Target:
    name: str
    directory: str
    cold: bool      # flush and drop the images from the page cache before each run


TARGETS = {"shm": Target("shm", "/dev/shm", False), "disk": Target("disk", "/var/tmp", True)}


@dataclass(frozen=True)
class Sample:
    """One timed run of one workload against one backend."""

    ios: int
    nbytes: int
    seconds: float
    p50: float
    p99: float
    backend_cpu: float
    driver_cpu: float
    failed: int
    stalls: int
    torn: int

    @property
    def iops(self) -> float:
        return self.ios / self.seconds

    @property
    def mbps(self) -> float:
        return self.nbytes / self.seconds / 1e6

    @property
    def cpu_per_gb(self) -> float:
        return self.backend_cpu / (self.nbytes / 1e9) if self.nbytes else 0.0

    @property
    def driver_busy(self) -> float:
        return self.driver_cpu / self.seconds


# --- the driver ---------------------------------------------------------------------

@dataclass
class Slot:
    """One request's buffers in guest memory, reused for every post."""

    hdr: int
    data: int
    status: int
    offset: int = 0
    posted: float = 0.0


class BadBlock(Exception):
    """The backend broke the ring: completions that were never posted, or lost ones."""


class BlkDriver:
    """The guest's virtio-blk driver over one ring of one backend."""

    def __init__(self, socket_path: str) -> None:
        self.vm = SyntheticVM(mem_size=MAX_DEPTH * MAX_SIZE + (4 << 20))
        try:
            self.features = self.vm.connect(socket_path, WANTED, queue_size=QUEUE_SIZE)
        except BaseException:
            self.vm.close()
            raise
        if not self.features & bit(VIRTIO_F_VERSION_1):
            self.vm.close()
            raise RuntimeError("the backend does not offer VIRTIO_F_VERSION_1")
        assert self.vm.region is not None
        self.view = self.vm.region.view  # guest-physical 0 is offset 0 of the memfd
        self.ring = self.vm.rings[0]
        self.slots = [Slot(self.vm.alloc(16, 16), self.vm.alloc(MAX_SIZE), self.vm.alloc(1, 16))
                      for _ in range(MAX_DEPTH)]
        self._poll = select.poll()
        self._poll.register(self.ring.call.fd, select.POLLIN)
        self._seq = 0
        self._failed = self._stalls = self._torn = 0

    def close(self) -> None:
        self.vm.close()

    def run(self, wl: Workload, seconds: float, image_size: int, rng: random.Random,
            cpu: Callable[[], float]) -> Sample:
        """Keep ``wl.depth`` requests in flight for ``seconds``; ``cpu`` reads the
        backend's CPU seconds so far."""
        nblocks = image_size // wl.size
        offsets = (self._random(rng, nblocks, wl.size) if wl.random
                   else self._sequential(nblocks * wl.size, wl.size))
        self._failed = self._stalls = self._torn = 0
        cpu0, driver0 = cpu(), time.process_time()
        start = time.perf_counter()
        lat = self._loop(wl, start + seconds, offsets)
        elapsed = time.perf_counter() - start
        busy, backend = time.process_time() - driver0, cpu() - cpu0
        lat.sort()
        return Sample(len(lat), len(lat) * wl.size, elapsed, lat[len(lat) // 2],
                      lat[min(len(lat) - 1, int(len(lat) * 0.99))], backend, busy,
                      self._failed, self._stalls, self._torn)

    @staticmethod
    def _random(rng: random.Random, nblocks: int, size: int) -> Iterator[int]:
        while True:
            yield rng.randrange(nblocks) * size

    def _sequential(self, end: int, size: int) -> Iterator[int]:
        while True:
            if self._seq + size > end:
                self._seq = 0
            yield self._seq
            self._seq += size

    def _loop(self, wl: Workload, deadline: float, offsets: Iterator[int]) -> list[float]:
        """Post ``wl.depth`` requests, then reap and re-post until ``deadline``;
        the latencies of every completed request."""
        queue, ring, view = self.ring.queue, self.ring, self.view
        chains = [[Buf(s.hdr, 16), Buf(s.data, wl.size, write=wl.read),
                   Buf(s.status, 1, write=True)] for s in self.slots[:wl.depth]]
        inflight: dict[int, tuple[Slot, list[Buf]]] = {}
        lat: list[float] = []
        for slot, chain in zip(self.slots, chains, strict=False):
            self._prepare(slot, wl, next(offsets))
            inflight[queue.add(chain)] = (slot, chain)
        ring.kick_if_needed()
        while inflight:
            used = self._reap(len(inflight))
            while not used:
                used = self._wait(len(inflight))
            now = time.perf_counter()
            for head, _ in used:
                entry = inflight.pop(head, None)
                if entry is None:
                    raise BadBlock(f"the backend completed descriptor {head}, which is not "
                                   "in flight (a chain completed twice?)")
                slot, chain = entry
                lat.append(now - slot.posted)
                if view[slot.status] != 0 or (
                        wl.read and STAMP.unpack_from(view, slot.data)[0] != slot.offset):
                    self._failed += 1
                if now < deadline:
                    self._prepare(slot, wl, next(offsets))
                    inflight[queue.add(chain)] = (slot, chain)
            ring.kick_if_needed()
        if queue.free_descriptors != queue.size:
            raise BadBlock(f"{queue.size - queue.free_descriptors} descriptors never came back "
                           "after the queue drained")
        return lat

    def _wait(self, inflight: int) -> list[tuple[int, int]]:
        """Sleep on the call eventfd.  get_used has just re-armed used_event, and
        re-reading after the wait covers a completion that raced with it (2.7.10).

        Nothing for STALL_MS with requests in flight is a lost notification,
        a lost kick or very slow I/O: it is counted, reported, and the driver
        kicks again so a lost kick cannot hang the run."""
        if not self._poll.poll(STALL_MS):
            self._stalls += 1
            self.ring.kick.signal()
        self.ring.call.consume()
        return self._reap(inflight)

    def _reap(self, inflight: int) -> list[tuple[int, int]]:
        """The new used elements, once the device's used index is plausible.

        A backend cannot complete more than is in flight.  An index that says
        it did is a store caught half done (a 16-bit index written a byte at a
        time reads 0x7D00 between 0x7DFF and 0x7E00): it is counted, reported,
        and read again until it settles; one that never settles fails the run."""
        queue = self.ring.queue
        for _ in range(TORN_RETRIES):
            if (queue.used_idx() - queue.last_used) & 0xFFFF <= inflight:
                return queue.get_used()
            self._torn += 1
            time.sleep(0)
        raise BadBlock(f"used index {queue.used_idx()} is past the last reaped "
                       f"({queue.last_used}) by more than the {inflight} requests in flight")

    def _prepare(self, slot: Slot, wl: Workload, offset: int) -> None:
        view = self.view
        kind = VirtioBlkReqType.IN if wl.read else VirtioBlkReqType.OUT
        HEADER.pack_into(view, slot.hdr, kind, 0, offset // VIRTIO_BLK_SECTOR_SIZE)
        view[slot.status] = 0xFF
        if wl.read:
            STAMP.pack_into(view, slot.data, POISON)
        else:  # keep the image self-describing: every block still starts with its offset
            for off in range(0, wl.size, BLOCK):
                STAMP.pack_into(view, slot.data + off, offset + off)
        slot.offset = offset
        slot.posted = time.perf_counter()


# --- backends and images ---------------------------------------------------------------

def backend_argv(kind: str, image: Path, sock: Path, qsd_aio: str | None) -> list[str]:
    if kind == "dvmm":  # the image format is detected
        return [sys.executable, "-m", "dvmm_blk", "--socket", str(sock), "--image", str(image),
                "--quiet"]
    aio = f",aio={qsd_aio}" if qsd_aio else ""
    node, fmt = "f0", []
    if image.suffix == ".qcow2":
        node, fmt = "q0", ["--blockdev", "driver=qcow2,node-name=q0,file=f0"]
    return ["qemu-storage-daemon", "--blockdev",
            f"driver=file,node-name=f0,filename={image}{aio}", *fmt, "--export",
            f"type=vhost-user-blk,id=e0,addr.type=unix,addr.path={sock},node-name={node},"
            "writable=on"]


@dataclass
class Backend:
    """A backend process with its image and a driver connected to it."""

    kind: str
    image: Path
    driver: BlkDriver
    process: psutil.Process

    def cpu(self) -> float:
        return process_cpu_seconds(self.process)


@contextmanager
def backend(kind: str, image: Path, work: Path, qsd_aio: str | None) -> Iterator[Backend]:
    sock, log = work / f"{kind}.sock", work / f"{kind}.log"
    proc = spawn(backend_argv(kind, image, sock, qsd_aio), log)
    try:
        driver = _connect(proc, sock, log, kind)
        try:
            yield Backend(kind, image, driver, psutil.Process(proc.pid))
        finally:
            driver.close()
    finally:
        stop(proc)


def _connect(proc: Any, sock: Path, log: Path, kind: str) -> BlkDriver:
    deadline = time.monotonic() + 20
    while True:
        try:
            return BlkDriver(str(sock))
        except (FileNotFoundError, ConnectionRefusedError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} backend did not listen on {sock}:\n"
                                   f"{log_tail(log)}") from None
            time.sleep(0.02)


def make_image(path: Path, size: int) -> Path:
    """``size`` bytes of random data, every 4 KiB block starting with its own offset."""
    chunk = bytearray(os.urandom(1 << 20))
    with path.open("wb") as f:
        for base in range(0, size, len(chunk)):
            n = min(len(chunk), size - base)
            for off in range(0, n, BLOCK):
                STAMP.pack_into(chunk, off, base + off)
            f.write(memoryview(chunk)[:n])
        f.flush()
        os.fsync(f.fileno())
    return path


def drop_cache(paths: Sequence[Path]) -> None:
    """Write back and evict these files' pages (POSIX_FADV_DONTNEED: no root needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --- the run plan ----------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    seconds: float = 3.0
    rounds: int = 3
    image_size: int = 256 << 20
    warmup: float = 0.5
    targets: tuple[str, ...] = ("shm", "disk")
    workloads: tuple[Workload, ...] = WORKLOADS
    qsd_aio: str | None = None
    seed: int = 1
    image_format: str = "raw"  # or qcow2: the same data in a qcow2 image for both backends


Results = dict[tuple[str, str, str], list[Sample]]   # (target, workload, backend)


@dataclass
class Outcome:
    results: Results
    features: dict[str, int]
    wall: float


def run(settings: Settings, progress: Callable[[str], None] = lambda s: None) -> Outcome:
    """Every target, every round, every workload, each backend in alternating order."""
    results: Results = {}
    features: dict[str, int] = {}
    started = time.monotonic()
    for name in settings.targets:
        target = TARGETS[name]
        work = Path(tempfile.mkdtemp(prefix="dvmm-bench-blk-", dir=target.directory))
        try:
            with ExitStack() as stack:
                bes = {k: stack.enter_context(backend(
                    k, _image(work / f"{k}.img", settings), work,
                    settings.qsd_aio)) for k in BACKENDS}
                features.update({k: b.driver.features for k, b in bes.items()})
                _run_target(target, bes, settings, results, progress)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return Outcome(results, features, time.monotonic() - started)


def _image(path: Path, settings: Settings) -> Path:
    raw = make_image(path, settings.image_size)
    if settings.image_format == "raw":
        return raw
    out = path.with_suffix(".qcow2")  # every cluster allocated: the data is random
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)],
                   check=True)
    raw.unlink()
    return out


def _run_target(target: Target, bes: dict[str, Backend], settings: Settings,
                results: Results, progress: Callable[[str], None]) -> None:
    rng = random.Random(settings.seed)
    for be in bes.values():  # first-use costs (imports, page faults) out of the numbers
        be.driver.run(WORKLOADS[0], settings.warmup, settings.image_size, rng, be.cpu)
    images = [be.image for be in bes.values()]
    for r in range(settings.rounds):
        for i, wl in enumerate(settings.workloads):
            order = BACKENDS if (r + i) % 2 == 0 else BACKENDS[::-1]
            for kind in order:
                if target.cold:
                    drop_cache(images)
                be = bes[kind]
                try:
                    s = be.driver.run(wl, settings.seconds, settings.image_size, rng, be.cpu)
                except (BadBlock, RuntimeError) as exc:
                    raise BadBlock(f"{kind} on {target.name}, {wl.name}: {exc}") from exc
                results.setdefault((target.name, wl.name, kind), []).append(s)
                progress(f"{target.name:4} {wl.name:18} {kind:4} round {r + 1}: "
                         f"{s.iops:9.0f} IOPS {s.mbps:8.1f} MB/s")


# --- results ----------------------------------------------------------------------------

METRICS: tuple[tuple[str, Callable[[Sample], float], str], ...] = (
    ("IOPS", lambda s: s.iops, HIGHER),
    ("MB/s", lambda s: s.mbps, HIGHER),
    ("p50 lat (us)", lambda s: s.p50 * 1e6, LOWER),
    ("p99 lat (us)", lambda s: s.p99 * 1e6, LOWER),
    ("CPU s/GB", lambda s: s.cpu_per_gb, LOWER),
)


def compared(out: Outcome, settings: Settings) -> list[Compared]:
    """Medians over the rounds, dvmm against qsd, for every metric."""
    rows = []
    for target in settings.targets:
        for wl in settings.workloads:
            d, q = (out.results[(target, wl.name, k)] for k in BACKENDS)
            for metric, get, better in METRICS:
                label = f"blk {target}" + ("" if settings.image_format == "raw"
                                           else f" {settings.image_format}")
                rows.append(Compared(label, wl.name, metric, median(map(get, d)),
                                     median(map(get, q)), PEER, better))
    return rows


def detail(out: Outcome, settings: Settings) -> str:
    """Per backend: the medians, plus how busy the driver was and any anomalies."""
    head = (f"{'target':6} {'workload':18} {'backend':7} {'IOPS':>9} {'MB/s':>8} "
            f"{'p50 us':>8} {'p99 us':>8} {'CPU s/GB':>9} {'driver':>7}")
    lines = [head]
    for target in settings.targets:
        for wl in settings.workloads:
            for kind in BACKENDS:
                ss = out.results[(target, wl.name, kind)]
                busy = median(s.driver_busy for s in ss)
                lines.append(
                    f"{target:6} {wl.name:18} {kind:7} {median(s.iops for s in ss):9.0f} "
                    f"{median(s.mbps for s in ss):8.1f} {median(s.p50 for s in ss) * 1e6:8.1f} "
                    f"{median(s.p99 for s in ss) * 1e6:8.1f} "
                    f"{median(s.cpu_per_gb for s in ss):9.2f} {busy:6.0%}")
    return "\n".join(lines)


def problems(out: Outcome) -> list[str]:
    msgs = []
    for (target, wl, kind), ss in out.results.items():
        failed, stalls = sum(s.failed for s in ss), sum(s.stalls for s in ss)
        if failed:
            msgs.append(f"{kind} on {target}, {wl}: {failed} requests failed or returned "
                        "the wrong data")
        if stalls:
            msgs.append(f"{kind} on {target}, {wl}: {stalls} waits of over {STALL_MS} ms with "
                        "requests in flight (a lost interrupt or kick, or very slow I/O; the "
                        "driver kicked again each time)")
        torn = sum(s.torn for s in ss)
        if torn:
            msgs.append(f"{kind} on {target}, {wl}: {torn} reads of an impossible used index "
                        "(a store caught half done; re-read until it settled)")
    return msgs


def feature_names(features: int) -> str:
    names = {VIRTIO_F_VERSION_1: "VERSION_1", VIRTIO_F_RING_EVENT_IDX: "EVENT_IDX",
             VIRTIO_BLK_F_FLUSH: "FLUSH"}
    return "+".join(n for b, n in names.items() if features & bit(b))


def describe(settings: Settings, out: Outcome) -> str:
    feats = ", ".join(f"{k}: {feature_names(f)}" for k, f in out.features.items())
    return (f"machine: {machine_line()}\n{load_line()}\n"
            f"dvmm bench blk: {settings.seconds:g} s per run, {settings.rounds} round(s), "
            f"image {settings.image_size >> 20} MiB per backend, queue size {QUEUE_SIZE}, "
            f"negotiated {feats}; qsd aio={settings.qsd_aio or 'default (threads)'}; "
            f"took {out.wall:.0f} s")


# --- command line ---------------------------------------------------------------------

QUICK = Settings(seconds=0.25, rounds=1, image_size=16 << 20, warmup=0.1)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("blk", help="vhost-user-blk backends: dvmm vs qemu-storage-daemon",
                       description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=Settings.seconds,
                   help="measured time per workload and backend (default %(default)s)")
    p.add_argument("--rounds", type=int, default=Settings.rounds,
                   help="alternating rounds; the table shows medians (default %(default)s)")
    p.add_argument("--image-mib", type=int, default=Settings.image_size >> 20,
                   help="image size per backend in MiB (default %(default)s)")
    p.add_argument("--target", action="append", choices=sorted(TARGETS), dest="targets",
                   help="shm and/or disk (default both)")
    p.add_argument("--workload", action="append", choices=[w.name for w in WORKLOADS],
                   dest="workloads", help="run only these workloads (default all)")
    p.add_argument("--qsd-aio", choices=["threads", "io_uring"],
                   help="qemu-storage-daemon's file aio= (default: its default, threads; "
                   "native would need O_DIRECT, which dvmm does not use)")
    p.add_argument("--format", choices=("raw", "qcow2"), default="raw", dest="image_format",
                   help="image format of both backends' images (default raw)")
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long smoke run (small image, short runs, one round)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="also draw the ratios to PNG")
    add_progress_args(p)
    p.set_defaults(func=main)


def settings_from(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else Settings(
        seconds=args.seconds, rounds=max(1, args.rounds), image_size=args.image_mib << 20)
    wls = tuple(w for w in WORKLOADS if not args.workloads or w.name in args.workloads)
    return Settings(base.seconds, base.rounds, base.image_size, base.warmup,
                    tuple(args.targets or base.targets), wls, args.qsd_aio,
                    image_format=getattr(args, "image_format", "raw"))


def main(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if shutil.which("qemu-storage-daemon") is None:
        print("dvmm bench blk: qemu-storage-daemon is not installed (apt-get install "
              "qemu-system-x86 or qemu-utils)", file=sys.stderr)
        return 1
    if settings.image_size < MAX_SIZE * 4:
        print(f"dvmm bench blk: the image must be at least {MAX_SIZE * 4 >> 20} MiB",
              file=sys.stderr)
        return 1
    try:
        out = run(settings, progress_printer(args))
    except (BadBlock, RuntimeError) as exc:
        print(f"dvmm bench blk: error: {exc}", file=sys.stderr)
        return 1
    rows = compared(out, settings)
    print(describe(settings, out))
    print()
    print(detail(out, settings))
    print()
    print(table(rows))
    bad = problems(out)
    for msg in bad:
        print(f"warning: {msg}")
    if args.plot:
        from .report import plot
        plot(rows, args.plot, "dvmm bench blk: dvmm / qemu-storage-daemon")
    return 1 if any(s.failed for ss in out.results.values() for s in ss) else 0


__all__ = ["WORKLOADS", "BlkDriver", "Settings", "compared", "run"]
