"""The ``dvmm backend net`` program: arguments, one-line errors, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from dvmm_core import cli
from dvmm_shared.vhost_user.frontend import Frontend
from dvmm_shared.vhost_user.message import ProtocolFeature

from .helpers import wait_for_socket

NET_PROG = [sys.executable, "-m", "dvmm_net"]
ERROR_PREFIX = "dvmm backend net: error:"


def run_net(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NET_PROG, *args], capture_output=True, text=True, timeout=20,
                          stdin=subprocess.DEVNULL, check=False)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(("dvmm backend net: error:", "usage:")), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help() -> None:
    result = run_net("--help")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("usage: dvmm backend net")
    for option in ("--socket", "--tap", "--tap-fd", "--peer", "--mac", "--mtu", "--queues",
                   "--print-capabilities", "--no-config-space"):
        assert option in result.stdout


def test_dvmm_backend_net_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["backend", "net", "--help"])
    assert exc.value.code == 0
    assert "--peer PATH" in capsys.readouterr().out


def test_print_capabilities() -> None:
    result = run_net("--print-capabilities")
    assert result.returncode == 0 and result.stderr == ""
    caps = json.loads(result.stdout)
    assert caps["type"] == "net" and "tap" in caps["features"]


@pytest.mark.parametrize("args, fragments", [
    ([], ["exactly one of --tap NAME, --tap-fd N or --peer PATH"]),
    (["--tap", "a", "--peer", "/tmp/x"], ["exactly one of"]),
    (["--tap", "dvmmnosuch0"], ["no network interface dvmmnosuch0", "ip tuntap add"]),
    (["--tap", "lo"], ["lo is not a TAP device"]),
    (["--peer", "/tmp/x", "--mac", "52:54:00:12:34"], ["not a MAC address"]),
    (["--peer", "/tmp/x", "--mac", "01:00:5e:00:00:01"], ["multicast"]),
    (["--peer", "/tmp/x", "--mtu", "10"], ["--mtu must be 68..65535"]),
    (["--peer", "/tmp/x", "--queues", "0"], ["--queues must be 1..64"]),
    (["--peer", "/tmp/x", "--queues", "2"], ["one queue pair"]),
    (["--tap-fd", "x"], ["not a list of fd numbers"]),
    (["--tap-fd", "3,3"], ["distinct"]),
    (["--tap-fd", "7,8", "--queues", "3"], ["needs 3 --tap-fd fds, got 2"]),
    (["--tap-fd", "97"], ["--tap-fd 97 is not an open file descriptor"]),
    (["--peer", "/nonexistent-dir/link.sock"], ["cannot use peer socket"]),
])
def test_one_line_errors(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    result = run_net("--socket", str(tmp_path / "n.sock"), *args)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "n.sock").exists()


def test_bad_option_is_one_line_usage_error() -> None:
    result = run_net("--frobnicate")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "unrecognized" in result.stderr


def test_socket_that_cannot_be_bound(tmp_path: Path) -> None:
    result = run_net("--socket", str(tmp_path / "no" / "n.sock"), "--peer",
                     str(tmp_path / "link.sock"))
    assert_one_line_error(result, "cannot listen on")
    assert not (tmp_path / "link.sock").exists()  # the peer socket was cleaned up


def test_sigterm_exits_cleanly_with_counters(tmp_path: Path) -> None:
    sock, link, log = tmp_path / "n.sock", tmp_path / "link.sock", tmp_path / "net.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([*NET_PROG, "--socket", str(sock), "--peer", str(link),
                                 "--no-config-space"],
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        wait_for_socket(sock, proc)
        fe = Frontend.connect(str(sock))
        # --no-config-space: QEMU 7.2's vhost-user-net crashes on F_CONFIG
        assert not fe.get_protocol_features() & 1 << ProtocolFeature.CONFIG
        assert fe.get_queue_num() == 3  # one pair and the control queue
        fe.close()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Traceback" not in text
    assert "stopped: pair0: rx 0 frames" in text
    assert not sock.exists() and not link.exists()
