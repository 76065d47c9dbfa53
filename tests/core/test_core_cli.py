"""``dvmm run`` refuses bad input with one line and a non-zero exit (issue 3 (f)),
and the README's first command (``dvmm demo``) runs the dvmm core (g)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from corevm import dvmm_argv

pytestmark = pytest.mark.core


def run_dvmm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(dvmm_argv(*args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def assert_one_line_error(out: subprocess.CompletedProcess[str], *words: str) -> None:
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert lines[0].startswith("dvmm"), lines
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    return path


def test_missing_kvm_device(image: Path) -> None:
    assert_one_line_error(run_dvmm("run", "-q", "--kvm", "/nonexistent/kvm", "--disk",
                                   str(image)), "/nonexistent/kvm")


def test_kvm_path_that_is_not_kvm(image: Path) -> None:
    assert_one_line_error(run_dvmm("run", "-q", "--kvm", "/dev/null", "--disk", str(image)),
                          "KVM")


@pytest.mark.parametrize("option", ["--kernel", "--firmware", "--initrd"])
def test_missing_files(option: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    assert_one_line_error(run_dvmm("run", "-q", option, missing), missing)


def test_missing_disk_image(tmp_path: Path) -> None:
    assert_one_line_error(run_dvmm("run", "-q", "--disk", str(tmp_path / "nope.img")),
                          "nope.img")


def test_socket_nobody_listens_on(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))  # a socket file exists, but nobody listens on it
    sock.close()
    assert_one_line_error(run_dvmm("run", "-q", "--vhost-user-blk", str(path)), str(path))


def test_memory_larger_than_the_host(image: Path) -> None:
    assert_one_line_error(run_dvmm("run", "-q", "--memory", str(1 << 26), "--disk",
                                   str(image)), "more than the host can give")


def test_unknown_option() -> None:
    out = run_dvmm("run", "--no-such-option")
    assert out.returncode == 2
    assert "unrecognized arguments: --no-such-option" in out.stderr
    assert "Traceback" not in out.stderr


def test_help_explains() -> None:
    out = run_dvmm("run", "--help")
    assert out.returncode == 0
    for word in ("--disk", "--vhost-user-blk", "--firmware", "--kernel", "--cpus", "Ctrl-A"):
        assert word in out.stdout


def test_firmware_default_vm_of_the_readme(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "dvmm_core.cli", "demo", "-q", "--work-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=180,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert "dvmm-demo: read 12288 sectors checksum" in out.stdout
    assert "dvmm demo: OK" in out.stderr and "matches the host's" in out.stderr
    # The backend was killed during the reads (at least once: the guest may
    # finish before the last kill on a loaded machine) and nothing was lost.
    assert "dvmm demo: SIGKILL #1 to the blk backend" in out.stderr
    assert re.search(r"the backend was killed [123] time\(s\) during the reads and came back",
                     out.stderr), out.stderr
