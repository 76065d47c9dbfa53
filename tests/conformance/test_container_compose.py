"""``docker compose up`` then ``dvmm run``: the demo disk boots (issue 12).

The backends run as docker/compose.yaml says (one container each, no
network, read-only, no capabilities, the socket directory shared); the
dvmm core runs on the host with KVM and SeaBIOS and connects to the blk
container's socket with ``--vhost-user-blk``.  SeaBIOS boots the demo disk
from it and the boot program's checksum of what it read matches the disk.
Compose is Docker's ``compose`` plugin where installed, else Debian's
``docker-compose`` (v1), which reads the same file.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dvmm_core.boot.demo import make_demo_disk, parse_demo_output
from dvmm_testing.dockerd import Dockerd, docker_images  # noqa: F401 - the fixture

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from corevm import CoreVM, wait_until  # the core tier's VM helper

pytestmark = pytest.mark.core

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker" / "compose.yaml"


def compose_command(env: dict[str, str]) -> list[str]:
    if subprocess.run(["docker", "compose", "version"], env=env, capture_output=True,
                      check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither 'docker compose' nor docker-compose is installed "
                "(setup.sh installs docker-compose)")


@contextmanager
def compose_up(daemon: Dockerd, sockets: Path, disk: Path) -> Iterator[list[str]]:
    env = {**daemon.env(), "DVMM_SOCKETS": str(sockets), "DVMM_DISK": str(disk)}
    base = [*compose_command(env), "-p", "dvmmtest", "-f", str(COMPOSE_FILE)]
    up = subprocess.run([*base, "up", "-d"], env=env, capture_output=True, text=True,
                        check=False)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield base
    finally:
        subprocess.run([*base, "down", "-t", "5"], env=env, capture_output=True, check=False)


def test_compose_up_then_dvmm_run_boots_the_demo_disk(tmp_path: Path,
                                                      request: pytest.FixtureRequest) -> None:
    daemon: Dockerd = request.getfixturevalue("docker_images")
    disk = make_demo_disk(tmp_path / "demo.img", payload_sectors=2048, seed=12)
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    with compose_up(daemon, sockets, disk.path):
        for name in ("blk", "net", "display"):
            wait_until(lambda n=name: (sockets / f"{n}.sock").exists(), 60,
                       f"the {name} container's socket")
        with CoreVM(tmp_path, ["--firmware", "seabios", "--vhost-user-blk",
                               str(sockets / "blk.sock")]) as vm:
            text = vm.wait_serial("dvmm-demo: done", timeout=120)
            result = parse_demo_output(text)
            assert result is not None and result.checksum == disk.checksum, vm.diagnostics()
            assert vm.stop() == 0
        ps = subprocess.run(["docker", "ps", "--filter", "label=com.docker.compose.project="
                             "dvmmtest", "--format", "{{.Names}} {{.Status}}"],
                            env=daemon.env(), capture_output=True, text=True, check=True)
        assert len([ln for ln in ps.stdout.splitlines() if " Up " in f" {ln} "]) == 3, ps.stdout
