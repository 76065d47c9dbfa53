"""dvmm backends in containers and sandboxes, serving QEMU (TCG) and Linux (issue 12).

The backends are started the way the dvmm core starts them -- its
:class:`~dvmm_core.supervisor.Supervisor` with a bubblewrap or Docker
runner, the image or the TAP opened here and handed over as fds -- but the
frontend is QEMU with the Debian guest, so what is checked is that a
confined backend still speaks vhost-user and virtio exactly as Linux and
QEMU expect:

* blk: the guest reads the size and serial, writes data the host reads
  back from the image and reads what the host wrote;
* net: the guest pings the host over the TAP (in a test namespace) and the
  host pings the guest;
* recovery, issue 8's acceptance (a) in a container: the guest's
  ``blkverify`` writes, fsyncs and re-reads 64 MiB while the test ``docker
  kill``s the container 20 times at random moments; the supervisor starts a
  new container each time, QEMU (``reconnect=1``) replays the set-up and the
  in-flight requests; no I/O error, every block verifies, and the image
  equals what the guest wrote.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dvmm_core.guest import GuestArtifacts, build_guest, make_disk_image
from dvmm_core.runners import RunnerKind, make_runner
from dvmm_core.runners_resources import disk_args, tap_args
from dvmm_core.supervisor import Backend, BackendState, RestartPolicy, RestartSpec, Supervisor
from dvmm_shared.control import command
from dvmm_testing import QemuGuest, blkpattern
from dvmm_testing.dockerd import docker_images  # noqa: F401 - the fixture
from net_env import GUEST_IP, HOST_IP, NetNs, netns, ping, vhost_user_net_args
from test_recovery_blk import KERNEL_IO_TROUBLE, recovery_seed, stop_blkverify

pytestmark = pytest.mark.conformance

MIB = 1 << 20
DISK_SIZE = 64 * MIB
MAC = "52:54:00:12:34:77"
KILLS = 20


@pytest.fixture(scope="module")
def artifacts() -> GuestArtifacts:
    return build_guest(log=lambda _m: None)


@pytest.fixture(params=["bwrap", "docker"])
def kind(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "docker":
        daemon = request.getfixturevalue("docker_images")
        os.environ["DOCKER_HOST"] = daemon.host
        try:
            yield "docker"
        finally:
            del os.environ["DOCKER_HOST"]
    else:
        yield "bwrap"


@contextmanager
def supervised(kind: str, workdir: Path, name: str, module: str, args: list[str],
               runner_args: object = None) -> Iterator[tuple[Supervisor, Backend]]:
    """One backend under the core's supervisor and ``kind``'s runner
    (``runner_args(runner)`` returns the resource options and sets its fds)."""
    runtime = workdir / "runtime"
    runtime.mkdir()
    sup = Supervisor(runtime_dir=str(runtime))
    try:
        runner = make_runner(RunnerKind(kind))
        extra = runner_args(runner) if callable(runner_args) else []
        backend = sup.spawn_python(name, module, [*extra, *args], control=True,
                                   restart=RestartSpec(RestartPolicy.ALWAYS, limit=100),
                                   runner=runner)
        sup.wait_for_socket(backend, timeout=60)
        yield sup, backend
    finally:
        sup.stop_all()


def test_blk_in_sandbox_serves_linux(kind: str, tmp_path: Path,
                                     artifacts: GuestArtifacts) -> None:
    image = tmp_path / "disk.img"
    make_disk_image(image, DISK_SIZE, pattern_seed=1)
    with supervised(kind, tmp_path, "blk0", "dvmm_blk", [],
                    lambda r: disk_args(r, str(image), False)) as (_, backend), \
            QemuGuest(["-chardev", f"socket,id=c0,path={backend.socket}",
                       "-device", "vhost-user-blk-pci,chardev=c0"], artifacts=artifacts,
                      log_dir=tmp_path / "guest") as vm:
        assert vm.check("blockdev --getsize64 /dev/vda").strip() == str(DISK_SIZE)
        assert vm.check("cat /sys/block/vda/serial").strip() == "dvmm-disk.img"
        out = vm.check("dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null && "
                       "sha256sum /tmp/p && "
                       "dd if=/tmp/p of=/dev/vda bs=1M seek=3 conv=fsync 2>/dev/null")
        with image.open("rb") as f:
            f.seek(3 * MIB)
            assert hashlib.sha256(f.read(4 * MIB)).hexdigest() in out
        data = os.urandom(MIB)
        with image.open("r+b") as f:
            f.seek(30 * MIB)
            f.write(data)
        out = vm.check("echo 3 > /proc/sys/vm/drop_caches && "
                       "dd if=/dev/vda bs=1M skip=30 count=1 2>/dev/null | sha256sum")
        assert hashlib.sha256(data).hexdigest() in out
        assert backend.runner.kind.value == kind
        health = command(backend.control or "", "health", timeout=10)
        assert health["frontend"] is True


@contextmanager
def in_netns(ns: NetNs) -> Iterator[None]:
    """This thread inside ``ns`` (the TAP is attached where it lives)."""
    from net_env import _setns

    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(f"/run/netns/{ns.name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)


def test_net_in_sandbox_pings_both_ways(kind: str, tmp_path: Path,
                                        artifacts: GuestArtifacts) -> None:
    with netns(f"ct{kind[:2]}") as ns:
        ns.add_tap("t0")
        with in_netns(ns):
            runner = make_runner(RunnerKind(kind))
            resources = tap_args(runner, "t0", 1)  # the core's side: attach, hand fds
        runtime = tmp_path / "runtime"
        runtime.mkdir()
        sup = Supervisor(runtime_dir=str(runtime))
        try:
            backend = sup.spawn_python("net0", "dvmm_net",
                                       [*resources, "--mac", MAC, "--no-config-space"],
                                       control=True, runner=runner)
            sup.wait_for_socket(backend, timeout=60)
            with QemuGuest(vhost_user_net_args(backend.socket, MAC), artifacts=artifacts,
                           log_dir=tmp_path / "guest") as vm:
                vm.check(f"ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0")
                vm.check(f"ping -c 1 -W 10 {HOST_IP} >/dev/null")
                out = vm.check(f"ping -c 10 -i 0.05 -W 5 {HOST_IP}")
                assert "10 packets received" in out, out
                result = ping(ns, GUEST_IP, count=10, interval=0.05)
                assert (result.sent, result.received) == (10, 10)
            stats = command(backend.control or "", "stats", timeout=10)
            assert stats["device"], stats
        finally:
            sup.stop_all()


def container_of(backend: Backend) -> str:
    from dvmm_core.runners_docker import LABEL, DockerRunner

    runner = backend.runner
    assert isinstance(runner, DockerRunner)
    out = subprocess.run(["docker", "ps", "-q", "--filter", f"label={LABEL}={runner.prefix}"],
                         capture_output=True, text=True, check=True)
    (container,) = out.stdout.split()
    return container


def wait_serving(backend: Backend, restarts: int, since: int, timeout: float = 90) -> int:
    """Until run ``restarts`` runs with QEMU connected and has moved data
    beyond ``since`` bytes of its own; its byte count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if backend.restarts == restarts and backend.state is BackendState.RUNNING:
            try:
                st = command(backend.control or "", "stats", timeout=5)
            except Exception:  # the new run's endpoint is not bound yet
                st = {}
            dev = st.get("device", {})
            moved = int(dev.get("bytes_read", 0)) + int(dev.get("bytes_written", 0))
            if moved > since:
                return moved
        time.sleep(0.1)  # polling the backend's counters
    raise AssertionError(f"run {restarts} did not serve I/O within {timeout:.0f} s "
                         f"({backend.state.value}, {backend.restarts} restarts)")


def test_blk_container_docker_killed_20_times_during_io(tmp_path: Path,
                                                        artifacts: GuestArtifacts,
                                                        request: pytest.FixtureRequest) -> None:
    os.environ["DOCKER_HOST"] = request.getfixturevalue("docker_images").host
    seed = recovery_seed()
    print(f"\nrecovery seed {seed} (DVMM_RECOVERY_SEED={seed} repeats the kill schedule)")
    rng = random.Random(seed)
    image = tmp_path / "disk.img"
    make_disk_image(image, DISK_SIZE, pattern_seed=3)
    outages: list[float] = []
    try:
        with supervised("docker", tmp_path, "blk0", "dvmm_blk", ["--serial", "dvmm-recovery"],
                        lambda r: disk_args(r, str(image), False)) as (_, backend), \
                QemuGuest(["-chardev", f"socket,id=c0,path={backend.socket},reconnect=1",
                           "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"],
                          artifacts=artifacts, log_dir=tmp_path / "guest") as vm:
            pid = vm.check(f"blkverify /dev/vda {DISK_SIZE} 0 {seed} 4 "
                           ">/tmp/blkverify.out 2>&1 & echo $!").strip()
            for k in range(KILLS):
                wait_serving(backend, k, MIB)
                time.sleep(rng.uniform(0.0, 1.5))  # the chosen kill moment
                killed = time.monotonic()
                subprocess.run(["docker", "kill", container_of(backend)], check=True,
                               capture_output=True)
                wait_serving(backend, k + 1, 0)
                outages.append(time.monotonic() - killed)
            output = stop_blkverify(vm, pid, timeout=300)
            dmesg = vm.check("dmesg")
            exits = backend.restarts
    finally:
        del os.environ["DOCKER_HOST"]
    print(f"{KILLS} docker kills; outage (kill -> I/O again) min {min(outages):.2f} s, "
          f"max {max(outages):.2f} s")
    assert exits == KILLS
    summary = blkpattern.parse_output(output)
    assert not re.search(r"EIO|MISMATCH", output), output
    assert (summary.bad, summary.eio) == (0, 0), output
    assert summary.pass_lines == summary.passes >= 1, output
    trouble = [ln for ln in dmesg.splitlines() if KERNEL_IO_TROUBLE.search(ln)]
    assert not trouble, "\n".join(trouble)
    bad = blkpattern.compare_image(image, DISK_SIZE // blkpattern.BLOCK, summary.passes, seed)
    assert not bad, f"{len(bad)} blocks differ from pass {summary.passes}"

