"""Crash recovery of the net backend, with QEMU (TCG) as the frontend and Linux's virtio_net.

Issue 8, acceptance (c): the guest pings the host every 100 ms for 20 s
while its dvmm net backend (on a TAP in a network namespace of the test's
own) is SIGKILLed 3 times and started again by the test's restart loop
(:class:`dvmm_testing.restart_loop.RestartLoop`) on the same socket and
the same TAP.  QEMU (``-chardev socket,reconnect=1``) reconnects to each
new run; its vhost-user netdev takes the link down on the disconnect and
up on the reconnect, which is a link change, not a device reset.

What must hold: pings come back after every restart (the host sees the
guest's echo requests again and the guest gets the replies), and the
guest's kernel log shows no virtio-net reset, no ``NETDEV WATCHDOG`` and
no transmit-queue timeout.  Frames in flight at a kill may be lost, as on
a wire: the loss per outage is reported, not asserted.

The host side watches the guest's echo requests with a raw ICMP socket in
the namespace (a raw socket gets a copy of every ICMP packet the host
receives), so each request has a host timestamp to place it before or
after a kill.  The kill schedule is seeded (``DVMM_RECOVERY_SEED``, random
by default) and printed.
"""

from __future__ import annotations

import os
import random
import re
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dvmm_core.guest import GuestArtifacts, build_guest
from dvmm_testing import QemuGuest
from dvmm_testing.restart_loop import RestartLoop
from net_env import GUEST_IP, HOST_IP, NetNs, netns

pytestmark = pytest.mark.conformance

MAC = "52:54:00:12:34:56"
KILLS = 3
PINGS = 200  # every 100 ms: 20 s
FIRST_KILL = (1.0, 3.0)  # seconds after the pings start
UP_BEFORE_KILL = (1.0, 2.5)  # seconds of pings after a restart before the next kill
RESUME_TIMEOUT = 30.0
# What Linux logs when it resets a virtio-net device or gives up on a queue,
# and virtio_ring's BAD_RING complaints (a buffer completed twice, say).
RESET_SIGNS = re.compile(r"virtio_net.*reset|NETDEV WATCHDOG|transmit queue \d+ timed out|"
                         r"TX timeout|is not a head|out of range|broken|WARNING:|BUG:|Oops",
                         re.I)
BACKEND_TROUBLE = re.compile(r"Traceback|broken|bad request| E ")
ICMP_ECHO_REQUEST = 8


@pytest.fixture(scope="module")
def artifacts() -> GuestArtifacts:
    return build_guest(log=lambda _m: None)


def recovery_seed() -> int:
    value = os.environ.get("DVMM_RECOVERY_SEED")
    return int(value) if value else random.SystemRandom().randrange(1, 1 << 31)


class EchoWatch(threading.Thread):
    """Every ICMP echo request the host receives from the guest: (monotonic time, seq)."""

    def __init__(self, ns: NetNs) -> None:
        super().__init__(name="echo-watch", daemon=True)
        self.sock = ns.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.seen: list[tuple[float, int]] = []
        self._done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self._done.is_set():
                if select.select([self.sock], [], [], 0.1)[0]:
                    self._note(self.sock.recv(65536), time.monotonic())
        except BaseException as exc:
            self.error = exc

    def _note(self, packet: bytes, at: float) -> None:
        ihl = (packet[0] & 0x0F) * 4
        kind, _, _, _, seq = struct.unpack_from("!BBHHH", packet, ihl)
        if kind == ICMP_ECHO_REQUEST and socket.inet_ntoa(packet[12:16]) == GUEST_IP:
            self.seen.append((at, seq))

    def first_after(self, t: float) -> tuple[float, int] | None:
        return next(((at, seq) for at, seq in list(self.seen) if at > t), None)

    def wait_after(self, t: float, timeout: float) -> tuple[float, int]:
        """Until a request arrives after time *t* (the guest's pings get through again)."""
        deadline = time.monotonic() + timeout
        while (hit := self.first_after(t)) is None:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"no echo request from the guest since {t}"
            time.sleep(0.02)
        return hit

    def stop(self) -> None:
        self._done.set()
        self.join(5)
        self.sock.close()


@contextmanager
def echo_watch(ns: NetNs) -> Iterator[EchoWatch]:
    watch = EchoWatch(ns)
    watch.start()
    try:
        yield watch
    finally:
        watch.stop()


@dataclass
class Outage:
    killed_at: float
    resumed_at: float = 0.0
    first_seq_after: int = -1  # first echo request the host saw after the restart


@dataclass
class Campaign:
    seed: int
    outages: list[Outage] = field(default_factory=list)


def net_loop(ns: NetNs, workdir: Path) -> RestartLoop:
    sock = workdir / "net.sock"
    argv = ns.argv(sys.executable, "-m", "dvmm_net", "--socket", str(sock), "--tap", "t0",
                   "--mac", MAC, "--no-config-space", "-v")
    return RestartLoop(argv, sock, workdir / "backend", "net")


def qemu_args(sock: Path) -> list[str]:
    """vectors=0: QEMU 7.2 under TCG crashes when a vhost-user-net MSI-X vector is unmasked."""
    return ["-chardev", f"socket,id=c1,path={sock},reconnect=1",
            "-netdev", "vhost-user,id=n0,chardev=c1",
            "-device", f"virtio-net-pci,netdev=n0,mac={MAC},vectors=0"]


def kill_while_pinging(loop: RestartLoop, watch: EchoWatch, campaign: Campaign) -> None:
    rng = random.Random(campaign.seed)
    watch.wait_after(0.0, RESUME_TIMEOUT)  # the pings are flowing
    time.sleep(rng.uniform(*FIRST_KILL))  # the chosen kill moments, not waits for events
    for gen in range(KILLS):
        outage = Outage(time.monotonic())
        loop.kill()
        campaign.outages.append(outage)
        loop.wait_log("frontend connected", gen + 1, RESUME_TIMEOUT)
        outage.resumed_at, outage.first_seq_after = watch.wait_after(outage.killed_at,
                                                                     RESUME_TIMEOUT)
        if gen + 1 < KILLS:
            time.sleep(rng.uniform(*UP_BEFORE_KILL))


def replied_seqs(ping_output: str) -> set[int]:
    return {int(m) for m in re.findall(r"bytes from [\d.]+: seq=(\d+)", ping_output)}


def test_net_backend_killed_3_times_while_pinging(tmp_path: Path, artifacts: GuestArtifacts,
                                                  record_property: Callable[[str, object],
                                                                            None]) -> None:
    t0 = time.monotonic()
    campaign = Campaign(recovery_seed())
    print(f"\nrecovery seed {campaign.seed} (DVMM_RECOVERY_SEED={campaign.seed} repeats "
          f"the kill schedule)")
    with netns("recovery") as ns:
        ns.add_tap("t0")
        loop = net_loop(ns, tmp_path)
        with loop, QemuGuest(qemu_args(loop.socket_path), artifacts=artifacts,
                             log_dir=tmp_path / "guest") as vm, echo_watch(ns) as watch, \
                ThreadPoolExecutor(1) as pool:
            vm.check(f"ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 && "
                     f"ping -c 1 -W 10 {HOST_IP} >/dev/null")
            before = vm.check("cat /sys/class/net/eth0/carrier_changes").strip()
            pinging = pool.submit(vm.run, f"ping -i 0.1 -c {PINGS} -W 2 {HOST_IP}", 120)
            kill_while_pinging(loop, watch, campaign)
            result = pinging.result(120)
            after = vm.check("cat /sys/class/net/eth0/carrier_changes").strip()
            dmesg = vm.check("dmesg")
    duration = time.monotonic() - t0
    replied = replied_seqs(result.output)
    counts = per_outage(campaign, watch, replied)
    report(campaign, counts, len(replied), duration, (before, after), record_property)

    assert [e.status for e in loop.exits] == [-signal.SIGKILL] * KILLS, loop.exits
    assert re.search(rf"{PINGS} packets transmitted", result.output), result.output
    for i, (replies_after, _lost) in enumerate(counts):
        assert replies_after > 0, f"no ping replies after restart {i + 1}:\n{result.output}"
    resets = [ln for ln in dmesg.splitlines() if RESET_SIGNS.search(ln)]
    assert not resets, "\n".join(resets)
    for gen in range(KILLS + 1):
        text = loop.log_path(gen).read_text(errors="replace")
        assert not BACKEND_TROUBLE.search(text), f"{loop.log_path(gen)}:\n{text}"


def per_outage(campaign: Campaign, watch: EchoWatch, replied: set[int]
               ) -> list[tuple[int, int]]:
    """(replies the guest got after restart i, pings lost around kill i), per outage.

    A request belongs after restart i if the host saw it after kill i and
    before kill i+1; lost = sequence numbers between the last reply before
    the kill and the first reply after it."""
    ends = [o.killed_at for o in campaign.outages[1:]] + [float("inf")]
    counts = []
    for outage, end in zip(campaign.outages, ends, strict=True):
        after = {seq for at, seq in watch.seen if outage.killed_at < at < end} & replied
        before = [seq for at, seq in watch.seen if at < outage.killed_at and seq in replied]
        first_after = min(after, default=PINGS)
        last_before = max(before, default=-1)
        counts.append((len(after), max(0, first_after - last_before - 1)))
    return counts


def report(campaign: Campaign, counts: list[tuple[int, int]], replies: int, duration: float,
           carrier: tuple[str, str], record_property: Callable[[str, object], None]) -> None:
    print(f"{len(campaign.outages)} kills, {replies}/{PINGS} ping replies, "
          f"carrier changes {carrier[0]} -> {carrier[1]}, test {duration:.0f} s")
    for i, (outage, (after, lost)) in enumerate(zip(campaign.outages, counts, strict=True)):
        print(f"  kill {i + 1}: pings through again {outage.resumed_at - outage.killed_at:.2f} s "
              f"after the kill; {lost} pings lost; {after} replies after the restart")
    record_property("kills", len(campaign.outages))
    record_property("replies", replies)
    record_property("lost_per_outage", [lost for _, lost in counts])
    record_property("seconds", round(duration, 1))
