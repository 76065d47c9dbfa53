"""``dvmm bench net``: vhost-user-net backends driven by a synthetic guest driver.

Owns one measurement: the same four workloads (TX and RX of 64-byte and
1500-byte Ethernet frames), run in one invocation against dvmm's net backend
(``python -m dvmm_net``) and against dpdk-testpmd's vhost PMD forwarding to
a TAP (``--forward-mode=io``), one backend after the other.  There is no VM:
the frontend is :class:`dvmm_shared.synthetic.SyntheticVM` with two rings
(RX queue 0, TX queue 1) speaking the real vhost-user protocol, and
:class:`NetDriver` plays the guest's virtio-net driver (VERSION_1, plus
MRG_RXBUF and EVENT_IDX when offered, no offloads: the 12-byte
virtio_net_hdr_v1 is all zeros on TX).

Everything runs inside a network namespace the bench creates (and deletes).
The host side is a small helper process in that namespace with an
AF_PACKET socket on the backend's TAP: for TX it counts the frames that
come out of the TAP (frames/s and Gbit/s received on the host), for RX it
writes frames into the TAP as fast as it can while the driver keeps RX
buffers posted and counts the frames delivered into them.  Gbit/s counts
Ethernet frame bytes (no FCS, no virtio header).  Not a test: nothing here
asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from dvmm_shared.driver import Buf
from dvmm_shared.procs import log_tail, spawn, stop
from dvmm_shared.synthetic import SyntheticVM
from dvmm_shared.virtio import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    bit,
)

from .report import (
    HIGHER,
    Compared,
    add_progress_args,
    load_line,
    machine_line,
    median,
    process_cpu_seconds,
    progress_printer,
    table,
)

PEER = "testpmd"
BACKENDS = ("dvmm", PEER)
WANTED = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_F_RING_EVENT_IDX)
QUEUE_SIZE = 256
RX_Q, TX_Q = 0, 1
NET_HDR = 12              # struct virtio_net_hdr_v1 (VERSION_1: always 12 bytes)
BUF_SIZE = 2048           # one descriptor per frame: header + up to 1514 bytes
ETHERTYPE = 0x88B5        # IEEE local experimental
SRC_MAC = bytes.fromhex("020000000001")
STALL_MS = 100
DPDK_PMDS = "/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0"
DPDK_PACKAGES = "dpdk-dev librte-net-vhost23 librte-net-tap23 librte-mempool-ring23"


@dataclass(frozen=True)
class Workload:
    name: str
    tx: bool        # frontend -> TAP (else TAP -> frontend)
    size: int       # Ethernet frame bytes (header + payload, no FCS)


WORKLOADS = (
    Workload("tx-64", True, 64),
    Workload("tx-1500", True, 1500),
    Workload("rx-64", False, 64),
    Workload("rx-1500", False, 1500),
)


def frame(size: int, seq: int = 0) -> bytes:
    head = b"\xff" * 6 + SRC_MAC + struct.pack("!H", ETHERTYPE)
    body = struct.pack("!I", seq) + bytes(i & 0xFF for i in range(size - len(head) - 4))
    return head + body


@dataclass(frozen=True)
class Sample:
    """One timed run of one workload against one backend."""

    frames: int      # counted at the far end (host for TX, RX ring for RX)
    nbytes: int      # Ethernet bytes of those frames
    seconds: float
    driver: int      # frames the driver posted (TX) / reaped, any kind (RX)
    stalls: int
    busy: float = 0.0   # the driver's CPU time / elapsed (near 1: the driver is the limit)
    cpu: float = 0.0    # the backend process's CPU seconds (user + system) in the run

    @property
    def cpu_per_frame(self) -> float:
        """Backend CPU seconds per frame it handled: what other work on a
        shared machine changes least (throughput depends on the CPU it gets)."""
        return self.cpu / self.driver if self.driver else 0.0

    @property
    def fps(self) -> float:
        return self.frames / self.seconds

    @property
    def gbps(self) -> float:
        return self.nbytes * 8 / self.seconds / 1e9


# --- the driver ---------------------------------------------------------------------

class NetDriver:
    """The guest's virtio-net driver over one RX and one TX ring."""

    def __init__(self, socket_path: str) -> None:
        self.vm = SyntheticVM(mem_size=4 * QUEUE_SIZE * BUF_SIZE + (1 << 20))
        try:
            self.features = self.vm.connect(socket_path, WANTED, num_queues=2,
                                            queue_size=QUEUE_SIZE)
            if not self.features & bit(VIRTIO_F_VERSION_1):
                raise RuntimeError("the backend does not offer VIRTIO_F_VERSION_1")
        except BaseException:
            self.vm.close()
            raise
        assert self.vm.region is not None
        self.view = self.vm.region.view
        self.rx, self.tx = self.vm.rings[RX_Q], self.vm.rings[TX_Q]
        self.tx_slots = [self.vm.alloc(BUF_SIZE, 64) for _ in range(QUEUE_SIZE)]
        self.rx_slots = [self.vm.alloc(BUF_SIZE, 64) for _ in range(QUEUE_SIZE)]
        self._rx_by_head: dict[int, int] = {}
        for addr in self.rx_slots:
            self._post_rx(addr)
        self.rx.kick.signal()
        self._stalls = 0

    def close(self) -> None:
        self.vm.close()

    def _post_rx(self, addr: int) -> None:
        self._rx_by_head[self.rx.queue.add([Buf(addr, BUF_SIZE, write=True)])] = addr

    def _wait(self, ring: Any, count: bool = True) -> None:
        """Sleep on ``ring``'s call eventfd; a silent STALL_MS is kicked and, with
        ``count`` (TX: buffers were outstanding), counted as a lost notification.
        On RX silence may just mean no traffic arrived."""
        r, _, _ = select.select([ring.call.fd], [], [], STALL_MS / 1000)
        if not r:
            self._stalls += int(count)
            ring.kick.signal()
        else:
            ring.call.consume()

    def drain_rx(self) -> int:
        """Reap and re-post whatever the RX ring holds; the number of frames."""
        n = 0
        for head, _ in self.rx.queue.get_used():
            self._post_rx(self._rx_by_head.pop(head))
            n += 1
        if n:
            self.rx.kick_if_needed()
        return n

    def run_tx(self, size: int, seconds: float) -> tuple[int, float, int]:
        """Post ``size``-byte frames on the TX ring for ``seconds``; (posted, elapsed, stalls)."""
        data = bytes(NET_HDR) + frame(size)
        for addr in self.tx_slots:
            self.view[addr:addr + len(data)] = data
        queue, ring = self.tx.queue, self.tx
        free = list(self.tx_slots)
        by_head: dict[int, int] = {}
        posted = 0
        self._stalls = 0
        start = time.perf_counter()
        deadline = start + seconds
        length = len(data)
        while True:
            now = time.perf_counter()
            if now >= deadline:
                break
            while free:
                addr = free.pop()
                by_head[queue.add([Buf(addr, length)])] = addr
                posted += 1
            ring.kick_if_needed()
            used = queue.get_used()
            if not used:
                self._wait(ring)
                used = queue.get_used()
            for head, _ in used:
                free.append(by_head.pop(head))
        elapsed = time.perf_counter() - start
        end = time.monotonic() + 2
        while by_head and time.monotonic() < end:  # let the ring drain
            for head, _ in queue.get_used():
                free.append(by_head.pop(head))
            if by_head:
                self._wait(ring)
        if by_head:
            raise RuntimeError(f"{len(by_head)} TX buffers never came back")
        return posted, elapsed, self._stalls

    def run_rx(self, seconds: float) -> tuple[int, int, int, float, int]:
        """Reap and re-post RX buffers for ``seconds``;
        (our frames, their bytes, all frames, elapsed, stalls)."""
        queue, ring, view = self.rx.queue, self.rx, self.view
        ours = nbytes = total = 0
        self._stalls = 0
        et = struct.pack("!H", ETHERTYPE)
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            used = queue.get_used()
            if not used:
                self._wait(ring, count=False)
                continue
            for head, written in used:
                addr = self._rx_by_head.pop(head)
                total += 1
                if view[addr + NET_HDR + 12:addr + NET_HDR + 14] == et:
                    ours += 1
                    nbytes += written - NET_HDR
                self._post_rx(addr)
            ring.kick_if_needed()
        return ours, nbytes, total, time.perf_counter() - start, self._stalls


# --- the host side: a helper in the namespace -------------------------------------------

HELPER = r"""
import signal, socket, struct, sys
mode, iface, size, et = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
class Done(Exception):
    pass
def done(*_):
    raise Done
n = nbytes = 0
try:
    signal.signal(signal.SIGTERM, done)
    if mode == "read":
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(et))
        s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
        s.bind((iface, et))
        buf = bytearray(65536)
        print("ready", flush=True)
        while True:
            k = s.recv_into(buf)
            n += 1
            nbytes += k
    elif mode == "write":
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        s.bind((iface, 0))
        head = b"\xff" * 6 + bytes.fromhex("020000000002") + struct.pack("!H", et)
        f = head + bytes(i & 0xFF for i in range(size - len(head)))
        print("ready", flush=True)
        send = s.send
        while True:
            try:
                send(f)
                n += 1
            except OSError:
                pass
    elif mode in ("tapwrite", "tapread"):
        import fcntl, os
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", iface.encode(), 0x0002 | 0x1000))
        print("ready", flush=True)
        if mode == "tapread":
            want = struct.pack("!H", et)
            while True:
                f = os.read(fd, 65536)
                if f[12:14] == want:
                    n += 1
                    nbytes += len(f)
        head = b"\xff" * 6 + bytes.fromhex("020000000003") + struct.pack("!H", et)
        f = head + bytes(i & 0xFF for i in range(size - len(head)))
        while True:
            os.write(fd, f)
            n += 1
            nbytes += size
except Done:
    pass
print(n, nbytes, flush=True)
"""


@contextmanager
def helper(ns: str, mode: str, iface: str, size: int) -> Iterator[list[int]]:
    """The reader or writer, ready; on exit SIGTERM, and its counts in the yielded list."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", HELPER, mode,
                             iface, str(size), str(ETHERTYPE)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    counts: list[int] = []
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"host {mode}er on {iface} failed: {line}{proc.communicate()[1]}")
        yield counts
        proc.terminate()
        out, err = proc.communicate(timeout=10)
        fields = out.split()
        if len(fields) != 2:
            raise RuntimeError(f"host {mode}er on {iface}: no counts ({out!r} {err!r})")
        counts.extend(int(x) for x in fields)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- namespace and backends -------------------------------------------------------------

def sh(*argv: str) -> None:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")


@contextmanager
def netns() -> Iterator[str]:
    ns = f"dvmm-bnet-{os.getpid()}"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # no IPv6 chatter (router solicitations, MLD) on the TAPs
        subprocess.run(["ip", "netns", "exec", ns, "sh", "-c",
                        "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; "
                        "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"],
                       capture_output=True, check=False)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def tap_exists(ns: str, name: str) -> bool:
    return subprocess.run(["ip", "-n", ns, "link", "show", name], capture_output=True,
                          check=False).returncode == 0


@dataclass
class Backend:
    kind: str
    tap: str
    driver: NetDriver
    process: psutil.Process  # ``ip netns exec`` execs the backend in place

    def cpu(self) -> float:
        return process_cpu_seconds(self.process)


@contextmanager
def backend(kind: str, ns: str, work: Path) -> Iterator[Backend]:
    sock, log = work / f"{kind}.sock", work / f"{kind}.log"
    if kind == "dvmm":
        tap = "dvbn0"
        sh("ip", "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap")
        sh("ip", "-n", ns, "link", "set", tap, "up")
        argv = [sys.executable, "-m", "dvmm_net", "--socket", str(sock), "--tap", tap,
                "--quiet"]
    else:
        tap = "dvbn1"
        argv = ["dpdk-testpmd", "--no-huge", "-m", "1024", "--no-pci", "-d", DPDK_PMDS,
                "--file-prefix", f"dvmm-bnet-{os.getpid()}",
                "--vdev", f"net_vhost0,iface={sock},queues=1",
                "--vdev", f"net_tap0,iface={tap}", "--", "--forward-mode=io",
                "--total-num-mbufs=16384", "--stats-period", "3600"]
    sock.unlink(missing_ok=True)  # left by the previous round's process
    proc = spawn(["ip", "netns", "exec", ns, *argv], log)
    try:
        deadline = time.monotonic() + 30
        while not (sock.exists() and tap_exists(ns, tap)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} backend did not start (socket {sock}, TAP {tap}):\n"
                                   f"{log_tail(log)}")
            time.sleep(0.05)
        sh("ip", "-n", ns, "link", "set", tap, "up")
        driver = _connect(proc, sock, log, kind)
        try:
            time.sleep(0.2)   # testpmd: the port sees the device become ready
            yield Backend(kind, tap, driver, psutil.Process(proc.pid))
        finally:
            driver.close()
    finally:
        stop(proc)
        if kind == "dvmm":
            subprocess.run(["ip", "-n", ns, "link", "del", "dvbn0"], capture_output=True,
                           check=False)


def _connect(proc: Any, sock: Path, log: Path, kind: str) -> NetDriver:
    deadline = time.monotonic() + 20
    while True:
        try:
            return NetDriver(str(sock))
        except (FileNotFoundError, ConnectionRefusedError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} backend did not accept on {sock}:\n"
                                   f"{log_tail(log)}") from None
            time.sleep(0.05)


def measure(be: Backend, ns: str, wl: Workload, seconds: float) -> Sample:
    drv = be.driver
    cpu0 = time.process_time()
    if wl.tx:
        with helper(ns, "read", be.tap, wl.size) as counts:
            backend0 = be.cpu()
            posted, elapsed, stalls = drv.run_tx(wl.size, seconds)
            backend = be.cpu() - backend0
            busy = (time.process_time() - cpu0) / elapsed
            time.sleep(0.1)   # frames still in the backend or the socket
        drv.drain_rx()
        return Sample(counts[0], counts[1], elapsed, posted, stalls, busy, backend)
    drv.drain_rx()
    with helper(ns, "write", be.tap, wl.size):
        time.sleep(0.05)
        drv.drain_rx()
        cpu0, backend0 = time.process_time(), be.cpu()
        ours, nbytes, total, elapsed, stalls = drv.run_rx(seconds)
        busy = (time.process_time() - cpu0) / elapsed
        backend = be.cpu() - backend0
    time.sleep(0.05)
    drv.drain_rx()
    return Sample(ours, nbytes, elapsed, total, stalls, busy, backend)


KERNEL_TAP = "dvbn2"


def measure_kernel(ns: str, wl: Workload, seconds: float) -> Sample:
    """The fallback peer: a plain Python loop on the TAP's file descriptor (write
    for TX, read for RX), with the same host-side helper at the other end."""
    if wl.tx:
        with helper(ns, "read", KERNEL_TAP, wl.size) as counts:
            with helper(ns, "tapwrite", KERNEL_TAP, wl.size) as wrote:
                start = time.perf_counter()
                time.sleep(seconds)
            elapsed = time.perf_counter() - start
            time.sleep(0.1)
        return Sample(counts[0], counts[1], elapsed, wrote[0], 0)
    with helper(ns, "tapread", KERNEL_TAP, wl.size) as counts, \
            helper(ns, "write", KERNEL_TAP, wl.size):
        start = time.perf_counter()
        time.sleep(seconds)
        elapsed = time.perf_counter() - start
    return Sample(counts[0], counts[1], elapsed, counts[0], 0)


# --- the run plan ----------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    seconds: float = 3.0
    rounds: int = 3
    warmup: float = 0.3
    workloads: tuple[Workload, ...] = WORKLOADS
    peer: str = PEER     # or "kernel-tap": skip testpmd and use the fallback


Results = dict[tuple[str, str], list[Sample]]   # (workload, backend): one per round


@dataclass
class Outcome:
    results: Results
    features: dict[str, int]
    wall: float
    peer: str = PEER
    why: str = ""        # why the fallback peer was used


def _record(out: Outcome, progress: Callable[[str], None], wl: Workload, kind: str, r: int,
            s: Sample) -> None:
    out.results.setdefault((wl.name, kind), []).append(s)
    progress(f"{wl.name:8} {kind:10} round {r + 1}: {s.fps:10.0f} frames/s {s.gbps:7.3f} "
             f"Gbit/s (driver {s.driver}, stalls {s.stalls})")


def _backend_round(kind: str, ns: str, work: Path, settings: Settings, out: Outcome, r: int,
                   progress: Callable[[str], None]) -> None:
    with backend(kind, ns, work) as be:
        out.features[kind] = be.driver.features
        measure(be, ns, WORKLOADS[0], settings.warmup)  # first-use costs out of the numbers
        for wl in settings.workloads:
            try:
                s = measure(be, ns, wl, settings.seconds)
            except RuntimeError as exc:
                raise BenchError(f"{kind}, {wl.name}: {exc}") from exc
            _record(out, progress, wl, kind, r, s)


def _kernel_round(ns: str, settings: Settings, out: Outcome, r: int,
                  progress: Callable[[str], None]) -> None:
    if not tap_exists(ns, KERNEL_TAP):
        sh("ip", "-n", ns, "tuntap", "add", "dev", KERNEL_TAP, "mode", "tap")
        sh("ip", "-n", ns, "link", "set", KERNEL_TAP, "up")
    for wl in settings.workloads:
        _record(out, progress, wl, FALLBACK, r, measure_kernel(ns, wl, settings.seconds))


def run(settings: Settings, progress: Callable[[str], None] = lambda s: None) -> Outcome:
    """Every round: each backend in turn (alternating which goes first), started
    fresh, every workload.  One backend at a time: testpmd busy-polls a CPU."""
    out = Outcome({}, {}, 0.0)
    if settings.peer != PEER:
        out.peer, out.why = FALLBACK, f"--peer {settings.peer} was given"
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="dvmm-bench-net-"))
    try:
        with netns() as ns:
            for r in range(settings.rounds):
                for kind in BACKENDS if r % 2 == 0 else BACKENDS[::-1]:
                    if kind == PEER and out.peer == FALLBACK:
                        _kernel_round(ns, settings, out, r, progress)
                        continue
                    try:
                        _backend_round(kind, ns, work, settings, out, r, progress)
                    except RuntimeError as exc:
                        if (kind != PEER or isinstance(exc, BenchError)
                                or any(k == PEER for _, k in out.results)):
                            raise
                        out.peer, out.why = FALLBACK, f"dpdk-testpmd could not run: {exc}"
                        progress(out.why)
                        _kernel_round(ns, settings, out, r, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.wall = time.monotonic() - started
    return out


class BenchError(RuntimeError):
    """A measurement failed (not the peer failing to start)."""


FALLBACK = "kernel-tap"


METRICS: tuple[tuple[str, Callable[[Sample], float]], ...] = (
    ("frames/s", lambda s: s.fps),
    ("Gbit/s", lambda s: s.gbps),
)


def compared(out: Outcome, settings: Settings) -> list[Compared]:
    """Medians over the rounds, dvmm against the peer."""
    return [Compared("net", wl.name, metric, median(map(get, out.results[(wl.name, "dvmm")])),
                     median(map(get, out.results[(wl.name, out.peer)])), out.peer, HIGHER)
            for wl in settings.workloads for metric, get in METRICS]


def detail(out: Outcome, settings: Settings) -> str:
    lines = [f"{'workload':8} {'backend':10} {'frames/s':>10} {'Gbit/s':>8} {'counted':>9} "
             f"{'driver':>9} {'stalls':>6} {'busy':>5} {'us/frame':>8}"]
    for wl in settings.workloads:
        for kind in ("dvmm", out.peer):
            ss = out.results[(wl.name, kind)]
            fallback = kind == FALLBACK
            busy = f"{median(s.busy for s in ss):5.0%}" if not fallback else "    -"
            us = median(s.cpu_per_frame for s in ss) * 1e6
            cpu = f"{us:8.2f}" if not fallback else "       -"
            lines.append(f"{wl.name:8} {kind:10} {median(s.fps for s in ss):10.0f} "
                         f"{median(s.gbps for s in ss):8.3f} "
                         f"{median(s.frames for s in ss):9.0f} "
                         f"{median(s.driver for s in ss):9.0f} "
                         f"{sum(s.stalls for s in ss):6d} {busy} {cpu}")
    lines.append("medians over the rounds (stalls: the sum); counted: frames seen at the "
                 "far end (host AF_PACKET reader for TX, the RX ring for RX); driver: frames "
                 "posted on TX / RX buffers used (any frame); "
                 "busy: the synthetic driver's CPU / elapsed (near 100 %: the Python driver, "
                 "not the backend, is the limit); us/frame: the backend process's CPU "
                 "(user + system) per driver frame, which load from other work changes "
                 "least (a polling backend such as testpmd spends its whole CPU)")
    return "\n".join(lines)


def feature_names(features: int) -> str:
    names = {VIRTIO_F_VERSION_1: "VERSION_1", VIRTIO_NET_F_MRG_RXBUF: "MRG_RXBUF",
             VIRTIO_F_RING_EVENT_IDX: "EVENT_IDX"}
    return "+".join(n for b, n in names.items() if features & bit(b))


def describe(settings: Settings, out: Outcome) -> str:
    feats = ", ".join(f"{k}: {feature_names(f)}" for k, f in out.features.items())
    if out.peer == PEER:
        peer = "dpdk-testpmd (vhost PMD server, io forwarding to net_tap)"
    else:
        peer = (f"{FALLBACK}: a plain Python loop writing/reading the TAP's fd "
                f"(fallback: {out.why})")
    return (f"machine: {machine_line()}\n{load_line()}\n"
            f"dvmm bench net: {settings.seconds:g} s per workload and backend, "
            f"{settings.rounds} round(s), queue size "
            f"{QUEUE_SIZE}, {len(frame(64))}/{len(frame(1500))}-byte Ethernet frames "
            f"(ethertype {ETHERTYPE:#06x}), negotiated {feats}; peer: {peer}; "
            f"took {out.wall:.0f} s")


# --- command line ---------------------------------------------------------------------

QUICK = Settings(seconds=0.5, rounds=1, warmup=0.1)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("net", help="vhost-user-net backends: dvmm vs dpdk-testpmd",
                       description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=Settings.seconds,
                   help="measured time per workload and backend (default %(default)s)")
    p.add_argument("--rounds", type=int, default=Settings.rounds,
                   help="rounds, each backend restarted, alternating which goes first; the "
                   "table shows medians (default %(default)s)")
    p.add_argument("--workload", action="append", choices=[w.name for w in WORKLOADS],
                   dest="workloads", help="run only these workloads (default all)")
    p.add_argument("--peer", choices=[PEER, FALLBACK], default=PEER,
                   help="the peer: dpdk-testpmd (default), or the kernel's TAP read/write "
                   "rate from a plain Python loop (used anyway when testpmd cannot run)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    add_progress_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    base = QUICK if args.quick else Settings(seconds=args.seconds, rounds=max(1, args.rounds))
    wls = tuple(w for w in WORKLOADS if not args.workloads or w.name in args.workloads)
    peer = args.peer
    if os.geteuid() != 0:
        print("dvmm bench net: needs root (ip netns, TAP devices)", file=sys.stderr)
        return 1
    if peer == PEER and shutil.which("dpdk-testpmd") is None:
        print(f"dvmm bench net: dpdk-testpmd is not installed (apt-get install {DPDK_PACKAGES});"
              f" comparing against {FALLBACK} instead", file=sys.stderr)
        peer = FALLBACK
    settings = Settings(base.seconds, base.rounds, base.warmup, wls, peer)

    try:
        out = run(settings, progress_printer(args))
    except RuntimeError as exc:
        print(f"dvmm bench net: error: {exc}", file=sys.stderr)
        return 1
    if peer != args.peer:
        out.why = f"dpdk-testpmd is not installed (apt-get install {DPDK_PACKAGES})"
    print(describe(settings, out))
    print()
    print(detail(out, settings))
    print()
    print(table(compared(out, settings)))
    stalls = sum(s.stalls for ss in out.results.values() for s in ss)
    if stalls:
        print(f"warning: {stalls} waits of {STALL_MS} ms for a lost TX completion interrupt "
              "(the driver kicked again each time)")
    return 0


__all__ = ["WORKLOADS", "NetDriver", "Settings", "compared", "run"]
