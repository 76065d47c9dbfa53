"""Backend runners (issue 12): command lines, layouts, status mapping, options.

The bwrap runner is exercised for real (a sandboxed ``python -c`` reports
what it sees); the Docker runner's command line is checked here and run
for real in the core and conformance tiers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from dvmm_core import runners
from dvmm_core.run import parse_disk, parse_net
from dvmm_core.runners import Runner, RunnerKind, make_runner, signal_status
from dvmm_core.runners_resources import disk_args, image_serial
from dvmm_shared.cli import UsageError
from dvmm_shared.procs import die_with_parent


def test_runner_kinds_parse_and_refuse_unknown() -> None:
    assert RunnerKind.parse("bwrap") is RunnerKind.BWRAP
    with pytest.raises(ValueError,
                       match=r"unknown backend runner 'lxc' \(known: process, bwrap, docker\)"):
        RunnerKind.parse("lxc")


@pytest.mark.parametrize(("rc", "expected"), [(0, 0), (1, 1), (137, -9), (159, -31),
                                              (128, 128), (125, 125), (255, 255)])
def test_wrapper_status_128_plus_n_is_signal_n(rc: int, expected: int) -> None:
    assert signal_status(rc) == expected


def test_disk_and_net_take_a_runner_per_device(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    assert parse_disk(f"{img},runner=bwrap,read-only").runner == "bwrap"
    assert parse_net("tap=tap0,runner=docker").runner == "docker"
    with pytest.raises(UsageError, match="unknown backend runner 'vm'"):
        parse_disk(f"{img},runner=vm")
    with pytest.raises(UsageError, match="--net tap=t0,runner=: "):
        parse_net("tap=t0,runner=")


def test_plain_runner_keeps_paths_and_the_runtime_layout(tmp_path: Path) -> None:
    r = Runner()
    assert r.prepare(str(tmp_path), "blk0") == (f"{tmp_path}/blk0.sock",
                                                f"ipc://{tmp_path}/blk0.ctl")
    assert disk_args(r, "/x/disk.img", False) == ["--image", "/x/disk.img"]
    assert r.resource_args() == ([], ())


def test_sandboxed_runner_gets_the_image_as_an_fd(tmp_path: Path) -> None:
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is not installed (setup.sh installs it)")
    img = tmp_path / "a-very-long-image-name.img"
    img.write_bytes(bytes(4096))
    r = make_runner(RunnerKind.BWRAP)
    try:
        sock, ctl = r.prepare(str(tmp_path), "blk0")
        assert sock == f"{tmp_path}/blk0/vhost.sock" and ctl == f"ipc://{tmp_path}/blk0/control"
        assert (tmp_path / "blk0").stat().st_mode & 0o777 == 0o700
        args = disk_args(r, str(img), True)
        assert args == ["--serial", image_serial(str(img))] and len(args[1]) <= 20
        (fd,) = r.fds["image-fd"]
        assert os.readlink(f"/proc/self/fd/{fd}") == str(img)
        assert r.resource_args() == (["--image-fd", str(fd)], (fd,))
    finally:
        r.close()
    assert r.fds == {}


def bwrap_run(tmp_path: Path, code: str) -> tuple[int, dict[str, object]]:
    r = make_runner(RunnerKind.BWRAP)
    r.prepare(str(tmp_path), "probe")
    out = tmp_path / "probe" / "out.json"
    child = r.launch([sys.executable, "-c", code, str(out)], (), die_with_parent())
    rc = child.wait(30)
    r.close()
    return rc, json.loads(out.read_text()) if out.exists() else {}


PROBE = """
import json, os, socket, sys
seen = {"pid": os.getpid(), "root": sorted(os.listdir("/")),
        "home": os.path.exists(os.path.expanduser("~/.bashrc")),
        "run": os.path.exists("/run"), "etc_passwd": os.path.exists("/etc/passwd"),
        "ifaces": [n for _, n in socket.if_nameindex()],
        "caps": [l for l in open("/proc/self/status") if l.startswith("CapEff")][0].split()[1]}
json.dump(seen, open(sys.argv[1], "w"))
"""


def test_bwrap_sandbox_sees_only_system_dirs_and_its_own_directory(tmp_path: Path) -> None:
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is not installed (setup.sh installs it)")
    rc, seen = bwrap_run(tmp_path, PROBE)
    assert rc == 0, seen
    assert seen["pid"] == 2  # bwrap's init is 1 (see runners_bwrap)
    assert not seen["home"] and not seen["run"] and not seen["etc_passwd"]
    assert isinstance(seen["root"], list)
    # System directories, plus the first component of each path the runner binds
    # read-only (the venv and dvmm's source: /work, /check, /tmp … wherever the
    # checkout lies) and of the backend's own directory.
    from dvmm_core.runners_bwrap import read_only_paths

    own = {p.split("/")[1] for p in [*read_only_paths(), str(tmp_path)]}
    assert set(seen["root"]) <= {"usr", "lib", "lib64", "bin", "sbin", "etc", "proc", "dev",
                                 "tmp"} | own
    assert not {"home", "root", "var", "srv", "mnt", "boot"} & (set(seen["root"]) - own)
    assert seen["ifaces"] == ["lo"]  # a network namespace of its own
    assert int(str(seen["caps"]), 16) == 0


def test_bwrap_child_is_signalled_by_its_own_pid_and_reports_signals(tmp_path: Path) -> None:
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is not installed (setup.sh installs it)")
    r = make_runner(RunnerKind.BWRAP)
    r.prepare(str(tmp_path), "sleeper")
    child = r.launch([sys.executable, "-c", "import time; time.sleep(60)"], (),
                     die_with_parent())
    try:
        with open(f"/proc/{child.pid}/cmdline", "rb") as f:
            assert b"time.sleep(60)" in f.read()  # the backend, not bwrap
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        child.kill()
        r.close()


def test_docker_run_line_has_every_restriction(tmp_path: Path) -> None:
    if shutil.which("docker") is None:
        pytest.fail("docker is not installed (setup.sh installs docker.io)")
    from dvmm_core.runners_docker import DockerRunner, image_for

    r = DockerRunner({})
    try:
        r.prepare(str(tmp_path / "dvmm-1-abc"), "net0")
        assert r.program("dvmm_net") == ["python3", "-m", "dvmm_net"]
        assert r.image == image_for("dvmm_net") == "dvmm-net:latest"
        args, fds = r.resource_args()
        assert args == ["--fds-from", f"{tmp_path}/dvmm-1-abc/net0/fds.sock"] and fds == ()
        line = r.run_args("c1")
        joined = " ".join(line)
        for flag in ("--network none", "--read-only", "--cap-drop ALL",
                     "--security-opt no-new-privileges", "--rm", "--tmpfs /tmp"):
            assert flag in joined
        volumes = [line[i + 1] for i, a in enumerate(line) if a == "--volume"]
        assert volumes == [f"{tmp_path}/dvmm-1-abc/net0:{tmp_path}/dvmm-1-abc/net0"]
        assert not r.standby
    finally:
        r.close()


def test_runner_module_does_not_import_the_sandboxed_runners() -> None:
    """``dvmm run`` with plain processes pays nothing for bwrap or Docker."""
    code = ("import sys, dvmm_core.run; "
            "print(sorted(m for m in sys.modules if m.startswith('dvmm_core.runners')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "['dvmm_core.runners']"
    assert runners.Runner.by_fd is False
