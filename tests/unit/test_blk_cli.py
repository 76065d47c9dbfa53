"""The ``dvmm backend blk`` program: arguments, one-line errors, signals, sockets."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from dvmm_shared.synthetic import SyntheticVM
from dvmm_shared.vhost_user.frontend import Frontend

from .helpers import BLK_PROG, ERROR_PREFIX, blk_backend, make_image, run_blk, wait_for_socket


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img", 16 * 512)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]


def test_help() -> None:
    result = run_blk("--help")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("usage: dvmm backend blk")
    for option in ("--socket", "--image", "--read-only", "--queues", "--print-capabilities"):
        assert option in result.stdout


def test_print_capabilities() -> None:
    result = run_blk("--print-capabilities")
    assert result.returncode == 0 and result.stderr == ""
    caps = json.loads(result.stdout)
    assert caps["type"] == "block"
    assert "read-only" in caps["features"]


def test_missing_image_file(tmp_path: Path) -> None:
    result = run_blk("--socket", str(tmp_path / "s.sock"), "--image", str(tmp_path / "nope"))
    assert_one_line_error(result, "cannot open image", "nope")
    assert result.returncode == 1
    assert not (tmp_path / "s.sock").exists()


def test_missing_image_option(tmp_path: Path) -> None:
    assert_one_line_error(run_blk("--socket", str(tmp_path / "s.sock")), "--image")


@pytest.mark.parametrize("where", ["no-such-dir/blk.sock", "/proc/dvmm-blk.sock"])
def test_socket_path_that_cannot_be_bound(tmp_path: Path, image: Path, where: str) -> None:
    path = where if where.startswith("/") else str(tmp_path / where)
    assert_one_line_error(run_blk("--socket", path, "--image", str(image)), "cannot listen")


def test_socket_path_that_is_a_regular_file(tmp_path: Path, image: Path) -> None:
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    assert_one_line_error(run_blk("--socket", str(path), "--image", str(image)), "not a socket")
    assert path.read_text() == "keep me"


def test_socket_path_too_long(tmp_path: Path, image: Path) -> None:
    assert_one_line_error(run_blk("--socket", str(tmp_path / ("s" * 200)), "--image",
                                  str(image)), "cannot listen")


@pytest.mark.parametrize("value", ["0", "65", "-1", "abc", ""])
def test_bad_queue_count(tmp_path: Path, image: Path, value: str) -> None:
    result = run_blk("--socket", str(tmp_path / "s.sock"), "--image", str(image),
                     "--queues", value)
    assert_one_line_error(result, "--queues")


@pytest.mark.parametrize("args", [["--bogus"], ["--fd"], ["extra-positional"]])
def test_bad_arguments(args: list[str]) -> None:
    assert_one_line_error(run_blk(*args))


def test_socket_and_fd_are_exclusive(tmp_path: Path, image: Path) -> None:
    both = run_blk("--socket", str(tmp_path / "s.sock"), "--fd", "3", "--image", str(image))
    assert_one_line_error(both, "exactly one of")
    assert_one_line_error(run_blk("--image", str(image)), "exactly one of")


def test_image_in_use_by_another_writer(tmp_path: Path, image: Path) -> None:
    with open(image, "rb+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_blk("--socket", str(tmp_path / "s.sock"), "--image", str(image))
    assert_one_line_error(result, "in use")


# -- a running backend --------------------------------------------------------------------
def test_sigterm_exits_cleanly_and_removes_the_socket(tmp_path: Path, image: Path) -> None:
    with blk_backend(tmp_path, image) as b:
        fe = Frontend.connect(str(b.socket))
        assert fe.get_features() != 0  # serving
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(10) == 0
        fe.close()
    assert not b.socket.exists()
    assert "Traceback" not in b.stderr()


def test_sigterm_while_idle(tmp_path: Path, image: Path) -> None:
    with blk_backend(tmp_path, image) as b:
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(10) == 0
    assert not b.socket.exists()


def test_sigint_also_exits_cleanly(tmp_path: Path, image: Path) -> None:
    with blk_backend(tmp_path, image) as b:
        b.proc.send_signal(signal.SIGINT)
        assert b.proc.wait(10) == 0
    assert not b.socket.exists()
    assert "Traceback" not in b.stderr()


def test_stale_socket_file_is_replaced(tmp_path: Path, image: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "blk.sock"))
    stale.close()  # the file stays behind, nobody listens
    with blk_backend(tmp_path, image) as b, SyntheticVM(mem_size=1 << 20) as vm:
        vm.connect(str(b.socket), (1 << 40) - 1)
        assert vm.frontend is not None and vm.frontend.get_queue_num() == 1


def test_inherited_listening_fd(tmp_path: Path, image: Path) -> None:
    path = tmp_path / "inherited.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    fd = listener.fileno()
    proc = subprocess.Popen([*BLK_PROG, "--fd", str(fd), "--image", str(image), "-q"],
                            pass_fds=[fd], stderr=subprocess.PIPE, text=True)
    listener.close()
    try:
        wait_for_socket(path, proc)
        with SyntheticVM(mem_size=1 << 20) as vm:
            vm.connect(str(path), (1 << 40) - 1)
            assert vm.frontend is not None and vm.frontend.get_queue_num() == 1
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "Traceback" not in err
    assert path.exists()  # an inherited socket is not ours to unlink


def test_no_daemonizing(tmp_path: Path, image: Path) -> None:
    with blk_backend(tmp_path, image) as b:
        assert b.proc.poll() is None  # still our child, in the foreground
        assert os.getpgid(b.proc.pid) == os.getpgid(os.getpid())
