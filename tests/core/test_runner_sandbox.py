"""Backends under the sandboxed runners on the dvmm core (issue 12, core tier).

The dvmm core (KVM) boots SeaBIOS, which reads the disk through a dvmm blk
backend started with ``--backend-runner bwrap`` or ``docker``; the same for
the net backend with Debian's iPXE ROM on a TAP in a test namespace.  Then
what the sandbox must hold: the backend process (its host pid, from ``dvmm
status``) has no capabilities, no new privileges and a seccomp filter; a
backend killed under its runner is restarted and the re-read program loses
nothing; and a hostile backend (``--backend-test-hooks``, the ``hostile``
command on its control endpoint) is refused every escape, logged, and the
VM runs on.  The Docker half needs a daemon: :mod:`dockerd` starts one for
the session (or skips with the reason when the engine cannot run here).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from corevm import CoreVM, wait_until
from dvmm_core.boot.demo import DemoDisk, make_demo_disk, parse_demo_output
from dvmm_core.boot.reread import make_reread_disk, parse_reread_output
from dvmm_shared.control import command
from dvmm_testing.dockerd import docker_images  # noqa: F401 - the fixture
from test_firmware_ipxe import MAC, NetnsCoreVM, netns  # noqa: F401 - netns: the fixture
from test_recovery import count, event_log, events, runtime_dir, status

pytestmark = pytest.mark.core

KILLS = 3


@pytest.fixture(params=["bwrap", "docker"])
def runner(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """``dvmm run`` options (and environment) for one runner."""
    if request.param == "docker":
        docker = request.getfixturevalue("docker_images")
        os.environ["DOCKER_HOST"] = docker.host
        try:
            yield ["--backend-runner", "docker"]
        finally:
            del os.environ["DOCKER_HOST"]
    else:
        yield ["--backend-runner", "bwrap"]


def backend(runtime: str, name: str = "blk0") -> dict[str, Any]:
    (b,) = [b for b in status(runtime)["backends"] if b["name"] == name]
    return b  # type: ignore[no-any-return]


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def assert_confined(pid: int) -> None:
    st = proc_status(pid)
    assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0, st
    assert int(st["CapBnd"], 16) == 0, st
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", st


def test_seabios_reads_demo_disk_through_sandboxed_blk(tmp_path: Path,
                                                       runner: list[str]) -> None:
    disk: DemoDisk = make_demo_disk(tmp_path / "demo.img", payload_sectors=2048, seed=3)
    with CoreVM(tmp_path, ["--firmware", "seabios", "--disk", str(disk.path), *runner]) as vm:
        text = vm.wait_serial("dvmm-demo: done", timeout=120)
        result = parse_demo_output(text)
        assert result is not None and result.checksum == disk.checksum, vm.diagnostics()
        runtime = runtime_dir(vm)
        info = backend(runtime)
        assert info["runner"] == runner[1] and info["state"] == "running"
        assert_confined(int(info["pid"]))
        # Its sockets live in its own directory, the only one its sandbox sees.
        assert info["socket"] == os.path.join(runtime, "blk0", "vhost.sock")
        assert vm.stop() == 0


def test_sandboxed_blk_killed_restarts_and_guest_loses_nothing(tmp_path: Path,
                                                              runner: list[str]) -> None:
    disk = tmp_path / "reread.img"
    make_reread_disk(disk, reads=600, count=8, seed=5)
    with CoreVM(tmp_path, ["--disk", str(disk), *runner]) as vm:
        runtime = runtime_dir(vm)
        with event_log(tmp_path, runtime) as log:
            vm.wait_serial("dvmm-reread: booted", timeout=120)
            for k in range(1, KILLS + 1):
                kill_backend(runner[1], runtime)
                wait_until(lambda k=k: count(events(log), "device-restored") >= k, 90,
                           f"restore #{k}", vm.proc, vm.diagnostics)
            vm.wait_serial("dvmm-reread: done", timeout=300)
            result = parse_reread_output(vm.serial())
            assert result.failure is None and result.done == 600, vm.diagnostics()
            evs = events(log)
        info = backend(runtime)
        assert_confined(int(info["pid"]))
        assert vm.stop() == 0
    assert count(evs, "backend-exited") == KILLS and count(evs, "backend-restarted") == KILLS
    assert all(e["how"] == "killed by SIGKILL" for e in evs if e["event"] == "backend-exited")
    assert info["restarts"] == KILLS


def kill_backend(kind: str, runtime: str) -> None:
    """SIGKILL the backend the way its runner's users would: ``docker kill``
    for a container, the host pid otherwise."""
    info = backend(runtime)
    assert info["state"] == "running", info
    if kind == "docker":
        subprocess.run(["docker", "kill", container_of(runtime)], check=True,
                       capture_output=True)
    else:
        os.kill(int(info["pid"]), signal.SIGKILL)


def container_of(runtime: str, name: str = "blk0") -> str:
    """The running container of backend ``name`` (found by the runner's label)."""
    from dvmm_core.runners_docker import LABEL, container_prefix

    out = subprocess.run(["docker", "ps", "-q", "--filter",
                          f"label={LABEL}={container_prefix(runtime, name)}"],
                         capture_output=True, text=True, check=True)
    (container,) = out.stdout.split()
    return container


def test_hostile_sandboxed_backend_is_refused_and_vm_runs_on(tmp_path: Path,
                                                            runner: list[str]) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("not for backends\n")
    disk = tmp_path / "reread.img"
    make_reread_disk(disk, reads=1500, count=8, seed=9)
    with CoreVM(tmp_path, ["--disk", str(disk), "--backend-test-hooks", *runner]) as vm:
        runtime = runtime_dir(vm)
        with event_log(tmp_path, runtime) as log:
            vm.wait_serial("dvmm-reread: booted", timeout=120)
            endpoint = backend(runtime)["control"]
            assert vm.proc is not None
            core_pid = vm.proc.pid
            for req in ({"kind": "open", "path": str(secret)},
                        {"kind": "open", "path": f"/proc/{core_pid}/mem"},
                        {"kind": "connect", "host": "127.0.0.1", "port": 9},
                        {"kind": "fork"},
                        {"kind": "guest-write", "addr": 1 << 44}):
                reply = command(endpoint, "hostile", timeout=10, **req)
                assert reply["refused"], (req, reply)
            for k, kind in enumerate(("exec", "ptrace"), start=1):
                with pytest.raises(Exception, match="no answer"):
                    command(backend(runtime)["control"], "hostile", timeout=3, kind=kind)
                wait_until(lambda k=k: count(events(log), "device-restored") >= k, 90,
                           f"the restart after hostile {kind}", vm.proc, vm.diagnostics)
            vm.wait_serial("dvmm-reread: done", timeout=300)
            result = parse_reread_output(vm.serial())
            assert result.failure is None and result.done == 1500, vm.diagnostics()
            evs = events(log)
        assert vm.stop() == 0
    exits = [e["how"] for e in evs if e["event"] == "backend-exited"]
    assert exits == ["killed by SIGSYS", "killed by SIGSYS"], exits
    err = vm.stderr()
    assert err.count("test hook: hostile") >= 7 and "was NOT refused" not in err, err[-3000:]


def test_ipxe_initialises_sandboxed_net(tmp_path: Path, runner: list[str],
                                        request: pytest.FixtureRequest) -> None:
    """SeaBIOS runs iPXE's ROM on the virtio-net function whose backend is
    confined; the core attached the TAP and handed the backend its fd."""
    ns, tap, _ = request.getfixturevalue("netns")  # (test_firmware_ipxe's namespace + TAP)
    vm = NetnsCoreVM(tmp_path, ["--memory", "128", "--net", f"tap={tap},mac={MAC}", *runner])
    vm.ns = ns
    with vm:
        text = vm.wait_serial("iPXE initialising devices...ok", timeout=120)
        assert "iPXE (http://ipxe.org) 00:02.0" in text
        runtime = runtime_dir(vm)
        info = backend(runtime, "net0")
        assert info["runner"] == runner[1] and info["state"] == "running"
        assert_confined(int(info["pid"]))
        # No /dev/net/tun in its sandbox: the TAP arrived as an fd.
        assert not os.path.exists(f"/proc/{info['pid']}/root/dev/net/tun")
        assert vm.stop() == 0
