"""A backend's command endpoint, against real ``dvmm_blk``/``dvmm_net`` processes.

The blk backend serves a real image to a SyntheticVM (real vhost-user, real
rings); the test drives its ``--control`` endpoint with the control library
and watches the guest-visible result: an injected EIO fails requests with
VIRTIO_BLK_S_IOERR until cleared, counters move, ``shutdown`` exits 0.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dvmm_shared.control import ControlError, command, runtime_endpoint
from dvmm_shared.synthetic import SyntheticVM
from dvmm_shared.virtio import VirtioBlkReqType as T

from .helpers import BlkProcess, blk_backend, make_image, run_blk, wait_for_socket
from .test_blk_e2e import ALL_FEATURES, IOERR, OK, complete, post, status

SECTORS = 64


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"backend exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img", SECTORS * 512)


@pytest.fixture
def blk(tmp_path: Path, image: Path) -> Iterator[tuple[BlkProcess, str]]:
    endpoint = runtime_endpoint(str(tmp_path), "blk0")
    with blk_backend(tmp_path, image, "--control", endpoint) as b:
        wait_for_file(tmp_path / "blk0.ctl", b.proc)
        yield b, endpoint
    assert "Traceback" not in b.stderr()


def rw(vm: SyntheticVM, sector: int, data: bytes) -> tuple[int, int, bytes]:
    """One write then one read of ``sector``: (write status, read status, data read)."""
    ring = vm.rings[0]
    w = post(vm, ring, T.OUT, sector, out=data)
    complete(ring, 1)
    r = post(vm, ring, T.IN, sector, in_len=len(data))
    complete(ring, 1)
    return status(vm, w), status(vm, r), vm.mem.read(r.data_addr, len(data))


def test_health_and_stats_move(blk: tuple[BlkProcess, str]) -> None:
    b, ep = blk
    health = command(ep, "health")
    assert health["pid"] == b.proc.pid and health["connections"] == 0
    assert health["frontend"] is False and health["uptime"] >= 0
    with SyntheticVM(mem_size=1 << 20) as vm:
        vm.connect(str(b.socket), ALL_FEATURES)
        assert rw(vm, 3, b"A" * 1024) == (OK, OK, b"A" * 1024)
        stats = command(ep, "stats")
    assert stats["connections"] == 1 and stats["protocol_errors"] == 0
    assert stats["queues"][0]["index"] == 0 and stats["queues"][0]["requests"] == 2
    dev = stats["device"]
    assert (dev["reads"], dev["writes"], dev["bytes_read"], dev["bytes_written"]) == (
        1, 1, 1024, 1024)
    assert dev["errors"] == 0 and dev["injected_errors"] == 0


def test_injected_eio_fails_reads_until_cleared(blk: tuple[BlkProcess, str],
                                                image: Path) -> None:
    b, ep = blk
    with SyntheticVM(mem_size=1 << 20) as vm:
        vm.connect(str(b.socket), ALL_FEATURES)
        armed = command(ep, "fault", kind="error", errno="EIO", op="read")
        assert armed["count"] is None
        assert rw(vm, 5, b"B" * 512)[:2] == (OK, IOERR)  # writes still pass
        assert rw(vm, 6, b"C" * 512)[:2] == (OK, IOERR)
        command(ep, "fault", kind="clear")
        assert rw(vm, 5, b"D" * 512) == (OK, OK, b"D" * 512)
        dev = command(ep, "stats")["device"]
    assert dev["errors"] == 2 and dev["injected_errors"] == 2
    assert image.read_bytes()[6 * 512:7 * 512] == b"C" * 512


def test_counted_enospc_on_writes(blk: tuple[BlkProcess, str], image: Path) -> None:
    b, ep = blk
    before = image.read_bytes()[9 * 512:10 * 512]
    with SyntheticVM(mem_size=1 << 20) as vm:
        vm.connect(str(b.socket), ALL_FEATURES)
        command(ep, "fault", kind="error", errno="ENOSPC", op="write", count=1)
        assert rw(vm, 9, b"E" * 512) == (IOERR, OK, before)  # the write never happened
        assert rw(vm, 9, b"F" * 512) == (OK, OK, b"F" * 512)  # count used up
    assert "injected fault" in b.stderr()


@pytest.mark.parametrize(("args", "text"), [
    ({}, "fault kind must be one of"),
    ({"kind": "melt"}, "fault kind must be one of"),
    ({"kind": "error", "errno": "EBADF"}, "errno must be one of EIO, ENOSPC"),
    ({"kind": "error", "op": "trim"}, "op must be one of read, write, any"),
    ({"kind": "error", "count": 0}, "count must be an integer"),
    ({"kind": "error", "count": True}, "count must be an integer"),
    ({"kind": "delay"}, "fault delay needs ms"),
    ({"kind": "delay", "ms": -1}, "ms must be an integer"),
    ({"kind": "crash-at", "point": "never"}, "point must be one of after-pop, after-data"),
    ({"kind": "short-read", "count": -2}, "fault short-read: count must be an integer 1.."),
    ({"kind": "torn-write", "percent": 1.5}, "fault torn-write: percent must be an integer"),
    ({"kind": "drop-kick", "count": "1"}, "fault drop-kick: count must be an integer"),
    ({"kind": "delay-call", "ms": 0}, "fault delay-call: ms must be an integer 1..60000"),
])
def test_bad_fault_arguments(blk: tuple[BlkProcess, str], args: dict[str, Any],
                             text: str) -> None:
    _, ep = blk
    with pytest.raises(ControlError, match=text):
        command(ep, "fault", **args)
    assert command(ep, "health")["ok"] is True


def wait_health(ep: str, frontend: bool, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (health := command(ep, "health"))["frontend"] is not frontend:
        assert time.monotonic() < deadline, f"frontend never became {frontend}"
        time.sleep(0.01)
    return health


def test_close_socket_drops_the_frontend(blk: tuple[BlkProcess, str]) -> None:
    b, ep = blk
    with SyntheticVM(mem_size=1 << 20) as vm:
        vm.connect(str(b.socket), ALL_FEATURES)
        assert wait_health(ep, True)["connections"] == 1
        assert command(ep, "fault", kind="close-socket")["frontend"] is True
        wait_health(ep, False)
    with SyntheticVM(mem_size=1 << 20) as vm:  # the backend serves the next frontend
        vm.connect(str(b.socket), ALL_FEATURES)
        assert rw(vm, 2, b"G" * 512) == (OK, OK, b"G" * 512)
    assert command(ep, "stats")["connections"] == 2


def test_delay_is_armed_and_cleared(blk: tuple[BlkProcess, str]) -> None:
    b, ep = blk
    assert command(ep, "fault", kind="delay", ms=30)["ms"] == 30
    command(ep, "fault", kind="crash-at", point="after-used")
    command(ep, "fault", kind="error", errno="ENOSPC", op="write", count=4)
    command(ep, "fault", kind="short-read", count=2)
    command(ep, "fault", kind="drop-call", count=3)
    faults = command(ep, "stats")["faults"]
    assert faults["channel"]["drop_calls"] == 3
    assert faults["device"] == {"short_read": 2, "short_write": 0, "torn_write": None}
    assert {k: faults[k] for k in ("delay_ms", "crash_point", "error")} == {
        "delay_ms": 30, "crash_point": "after-used",
        "error": {"errno": "ENOSPC", "ops": ["discard", "flush", "write", "write_zeroes"],
                  "remaining": 4}}
    with SyntheticVM(mem_size=1 << 20) as vm:
        vm.connect(str(b.socket), ALL_FEATURES)
        command(ep, "fault", kind="crash-at", point="after-used")
        command(ep, "fault", kind="clear")
        faults = command(ep, "stats")["faults"]
        assert {k: faults[k] for k in ("delay_ms", "crash_point", "error", "device")} == {
            "delay_ms": 0, "crash_point": None, "error": None, "device": None}
        assert faults["channel"]["drop_calls"] == 0
        command(ep, "fault", kind="delay", ms=30)
        assert rw(vm, 4, b"H" * 512) == (OK, OK, b"H" * 512)  # slower, still served


@pytest.mark.parametrize("point", ["after-data", "after-used"])
def test_crash_at_kills_mid_request(blk: tuple[BlkProcess, str], point: str) -> None:
    b, ep = blk
    with SyntheticVM(mem_size=1 << 20) as vm:
        vm.connect(str(b.socket), ALL_FEATURES)
        command(ep, "fault", kind="crash-at", point=point)
        ring = vm.rings[0]
        post(vm, ring, T.IN, 1, in_len=512)
        ring.kick.signal()
        assert b.proc.wait(10) == -signal.SIGKILL
        # after-used: the completion was published before the crash; after-data: not
        assert len(ring.queue.get_used()) == (1 if point == "after-used" else 0)


def test_shutdown_exits_cleanly(blk: tuple[BlkProcess, str], tmp_path: Path) -> None:
    b, ep = blk
    assert command(ep, "shutdown")["stopping"] is True
    assert b.proc.wait(10) == 0
    assert not (tmp_path / "blk0.ctl").exists()
    assert not b.socket.exists()


def test_fault_kill_answers_then_dies(blk: tuple[BlkProcess, str]) -> None:
    b, ep = blk
    assert command(ep, "fault", kind="kill")["pid"] == b.proc.pid
    assert b.proc.wait(10) == -signal.SIGKILL


def test_no_endpoint_without_the_option(tmp_path: Path, image: Path) -> None:
    with blk_backend(tmp_path, image):
        assert not list(tmp_path.glob("*.ctl"))


def test_unbindable_endpoint_is_one_line_error(tmp_path: Path, image: Path) -> None:
    out = run_blk("--socket", str(tmp_path / "s.sock"), "--image", str(image),
                  "--control", f"ipc://{tmp_path}/missing/blk.ctl")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"dvmm backend blk: error: cannot bind ipc://{tmp_path}/missing/blk.ctl: "
        "No such file or directory"]
    assert not (tmp_path / "s.sock").exists()


def test_net_backend_endpoint(tmp_path: Path) -> None:
    sock, ctl = tmp_path / "net.sock", tmp_path / "net0.ctl"
    ep = runtime_endpoint(str(tmp_path), "net0")
    with open(tmp_path / "net.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dvmm_net", "--socket", str(sock),
             "--peer", str(tmp_path / "link.sock"), "--control", ep],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        wait_for_socket(sock, proc)
        wait_for_file(ctl, proc)
        assert command(ep, "health")["pid"] == proc.pid
        stats = command(ep, "stats")
        assert stats["device"]["pairs"][0]["tx_frames"] == 0
        with pytest.raises(ControlError, match="no I/O error injection"):
            command(ep, "fault", kind="error")
        command(ep, "shutdown")
        assert proc.wait(10) == 0
        assert not ctl.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
