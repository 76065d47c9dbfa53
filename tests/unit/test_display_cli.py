"""The ``dvmm backend display`` program: arguments, one-line errors, SIGTERM,
the warm standby, and the vhost-user side a frontend sees (virtio-gpu's
queues and config space)."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dvmm_display.device import CONFIG, CTRL_HDR
from dvmm_shared.control import command
from dvmm_shared.driver import Buf
from dvmm_shared.procs import log_tail, spawn, stop
from dvmm_shared.synthetic import SyntheticVM
from dvmm_shared.virtio import VIRTIO_F_VERSION_1, bit

PROG = [sys.executable, "-m", "dvmm_display"]
DVMM = [str(Path(sys.executable).parent / "dvmm"), "backend", "display"]


def run(*args: str, prog: list[str] = PROG) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prog, *args], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, check=False)


def one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def wait_for(cond: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.parametrize("prog", [PROG, DVMM])
def test_help(prog: list[str]) -> None:
    result = run("--help", prog=prog)
    assert result.returncode == 0 and result.stderr == ""
    for option in ("--socket", "--vnc", "--password-file", "--control", "--core-control",
                   "--print-capabilities", "--standby-fd"):
        assert option in result.stdout


def test_print_capabilities() -> None:
    result = run("--print-capabilities")
    assert result.returncode == 0 and json.loads(result.stdout) == {"type": "gpu", "features": []}


@pytest.mark.parametrize(("args", "fragment"), [
    (["--vnc", "127.0.0.1:0"], "--socket"),
    (["--socket", "S"], "--vnc"),
    (["--socket", "S", "--vnc", "nonsense"], "HOST:PORT"),
    (["--socket", "S", "--vnc", "127.0.0.1:0", "--password-file", "/nonexistent/pw"],
     "/nonexistent/pw"),
    (["--socket", "S", "--vnc", "127.0.0.1:0", "--client-timeout", "0"], "--client-timeout"),
    (["--socket", "S", "--vnc", "192.0.2.1:5900"], "cannot listen on 192.0.2.1:5900"),
    (["--socket", "/nonexistent/dir/s.sock", "--vnc", "127.0.0.1:0"], "cannot listen on"),
    (["--bogus"], "unrecognized arguments"),
])
def test_one_line_errors(tmp_path: Path, args: list[str], fragment: str) -> None:
    args = [str(tmp_path / a) if a == "S" else a for a in args]
    one_line_error(run(*args), fragment)


def test_empty_password_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("\n")
    one_line_error(run("--socket", str(tmp_path / "s"), "--vnc", "127.0.0.1:0",
                       "--password-file", str(tmp_path / "pw")), "empty")


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, str]]:
    sock, control, log = tmp_path / "gpu.sock", f"ipc://{tmp_path}/d.ctl", tmp_path / "log"
    proc = spawn([*PROG, "--socket", str(sock), "--vnc", "127.0.0.1:0", "--control", control],
                 log)
    try:
        wait_for(lambda: (sock.exists() and os.path.exists(control[6:]))
                 or proc.poll() is not None, "the display to listen")
        assert proc.poll() is None, log_tail(log)
        yield proc, sock, control
    finally:
        stop(proc)


def test_sigterm_exits_cleanly_and_removes_the_socket(
        running: tuple[subprocess.Popen[bytes], Path, str]) -> None:
    proc, sock, control = running
    port = command(control, "stats")["device"]["vnc"]["port"]
    vnc = socket.create_connection(("127.0.0.1", port))
    assert vnc.recv(12) == b"RFB 003.008\n"
    assert stop(proc) == 0
    assert not sock.exists() and not os.path.exists(control[6:])
    assert vnc.recv(10) == b""  # the VNC client was closed too
    vnc.close()


def test_virtio_gpu_queues_and_config(running: tuple[subprocess.Popen[bytes], Path, str]) -> None:
    _, sock, _ = running
    with SyntheticVM(mem_size=4 << 20) as vm:
        vm.connect(str(sock), bit(VIRTIO_F_VERSION_1), num_queues=2)
        assert vm.frontend is not None
        cfg = vm.frontend.get_config(0, CONFIG.size)
        assert CONFIG.unpack(cfg)[2] == 1  # num_scanouts
        ring = vm.rings[0]
        req, resp = vm.alloc(CTRL_HDR.size), vm.alloc(CTRL_HDR.size + 16 * 24)
        vm.mem.write(req, CTRL_HDR.pack(0x0100, 0, 0, 0, 0))  # GET_DISPLAY_INFO
        ring.queue.add([Buf(req, CTRL_HDR.size), Buf(resp, CTRL_HDR.size + 16 * 24, write=True)])
        ring.kick_if_needed()
        assert ring.wait_used()[0][1] == CTRL_HDR.size + 16 * 24
        head = vm.mem.read(resp, CTRL_HDR.size + 24)
        assert struct.unpack_from("<I", head)[0] == 0x1101  # OK_DISPLAY_INFO
        assert struct.unpack_from("<IIII", head, CTRL_HDR.size)[2:] == (1024, 768)


def test_standby_waits_then_runs(tmp_path: Path) -> None:
    r, w = os.pipe()
    log = tmp_path / "log"
    sock = tmp_path / "gpu.sock"
    proc = spawn([*PROG, "--standby-fd", str(r), "--socket", str(sock), "--vnc", "127.0.0.1:0"],
                 log, pass_fds=[r])
    os.close(r)
    try:
        assert not sock.exists()  # (the released-standby test shows nothing runs before)
        os.write(w, b"g")
        wait_for(lambda: sock.exists() or proc.poll() is not None, "activation")
        assert proc.poll() is None, log_tail(log)
    finally:
        os.close(w)
        assert stop(proc) == 0


def test_standby_released_exits_quietly(tmp_path: Path) -> None:
    """Closing the standby fd ends the process before it checks its arguments."""
    r, w = os.pipe()
    proc = subprocess.Popen([*PROG, "--standby-fd", str(r), "--socket", "x", "--vnc", "bad"],
                            pass_fds=[r], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    os.close(r)
    os.close(w)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and err == ""
