"""QMP against the real dvmm core (issue 11): SeaBIOS on KVM, the counter boot
program on a dvmm blk backend, real QMP clients (``qemu.qmp``, ``qmp-shell``).

The counter program (``dvmm_core.boot.counter``) prints ``dvmm-count: N``
a few times a second, so the serial log shows whether the guest runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
from corevm import CoreVM, wait_until
from dvmm_core.boot.counter import BOOTED, make_counter_disk, parse_counter
from qemu.qmp import ExecuteError, QMPClient

#: How long a stopped guest must show no progress (the acceptance's 3 s).
PAUSE = 3.0


@asynccontextmanager
async def qmp_client(path: str | tuple[str, int]) -> AsyncIterator[QMPClient]:
    client = QMPClient("dvmm-core-test")
    await client.connect(path)
    try:
        yield client
    finally:
        await client.disconnect()


def counts(vm: CoreVM) -> list[int]:
    return parse_counter(vm.serial()).counts


def wait_count_above(vm: CoreVM, value: int, timeout: float = 60) -> int:
    wait_until(lambda: bool(counts(vm)) and counts(vm)[-1] > value, timeout,
               f"the counter to pass {value}", vm.proc, vm.diagnostics)
    return counts(vm)[-1]


async def hmp(client: QMPClient, line: str) -> str:
    out = await client.execute("human-monitor-command", {"command-line": line})
    assert isinstance(out, str)
    return out


async def next_event(client: QMPClient, names: set[str], timeout: float = 60) -> dict[str, Any]:
    """The next event named in ``names`` (others are skipped)."""
    async def wait() -> dict[str, Any]:
        async for ev in client.events:
            if ev["event"] in names:
                return dict(ev)
        raise AssertionError("event stream ended")
    return await asyncio.wait_for(wait(), timeout)


@pytest.fixture
def counter_disk(tmp_path: Path) -> Path:
    return make_counter_disk(tmp_path / "counter.img")


def test_firmware_qmp_stop_cont_reset_kill_quit(tmp_path: Path, counter_disk: Path) -> None:
    sock = str(tmp_path / "qmp.sock")
    vm = CoreVM(tmp_path, ["--firmware", "seabios", "--disk", str(counter_disk),
                           "--qmp", f"unix:{sock},server=on,wait=off", "--name", "counter"])
    with vm:
        vm.wait_serial(BOOTED, timeout=90)
        wait_count_above(vm, 2)
        wait_until(lambda: os.path.exists(sock), 30, "the QMP socket", vm.proc, vm.diagnostics)
        backends = vm.backends()
        asyncio.run(_drive(vm, sock))
        assert vm.proc is not None
        assert vm.proc.wait(timeout=60) == 0, vm.diagnostics()
        assert "Traceback" not in vm.stderr(), vm.stderr()
    wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                               for p in backends), 15, "the backends to exit")
    assert not os.path.exists(sock)


async def _drive(vm: CoreVM, sock: str) -> None:
    async with qmp_client(sock) as qmp:
        assert await qmp.execute("query-status") == {"running": True, "singlestep": False,
                                                     "status": "running"}
        assert await qmp.execute("query-name") == {"name": "counter"}
        await _stop_and_cont(vm, qmp)
        with pytest.raises(ExecuteError) as err:
            await qmp.execute("no-such-command")
        assert err.value.error_class == "CommandNotFound"
        backends = await qmp.execute("x-dvmm-query-backends")
        assert isinstance(backends, list)
        (blk,) = [b for b in backends if b["name"] == "blk0"]
        assert blk["state"] == "running" and blk["rss"] > 0 and blk["pid"] > 0
        await qmp.execute("x-dvmm-backend-kill", {"name": "blk0"})
        lost = await next_event(qmp, {"X_DVMM_BACKEND_LOST"})
        restored = await next_event(qmp, {"X_DVMM_BACKEND_RESTORED"})
        assert lost["data"]["name"] == restored["data"]["name"] == "blk0"
        with pytest.raises(ExecuteError) as err:
            await qmp.execute("x-dvmm-backend-kill", {"name": "nope"})
        assert err.value.error_class == "DeviceNotFound"
        banners = vm.serial().count("SeaBIOS (version")
        await qmp.execute("system_reset")
        reset = await next_event(qmp, {"RESET"})
        assert reset["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
        vm.wait_serial("SeaBIOS (version", count=banners + 1, timeout=60)
        vm.wait_serial(BOOTED, count=2, timeout=90)
        await qmp.execute("quit")
        shutdown = await next_event(qmp, {"SHUTDOWN"})
        assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}


async def _stop_and_cont(vm: CoreVM, qmp: QMPClient) -> None:
    await qmp.execute("stop")
    await next_event(qmp, {"STOP"})
    assert (await qmp.execute("query-status"))["status"] == "paused"  # type: ignore[index]
    regs = await hmp(qmp, "info registers")
    held = counts(vm)
    await asyncio.sleep(PAUSE)
    assert counts(vm) == held, "the guest printed while stopped"
    assert await hmp(qmp, "info registers") == regs, "the vCPU moved while stopped"
    assert await hmp(qmp, "info status") == "VM status: paused\n"
    await qmp.execute("cont")
    await next_event(qmp, {"RESUME"})
    assert (await qmp.execute("query-status"))["status"] == "running"  # type: ignore[index]
    await asyncio.to_thread(wait_count_above, vm, held[-1] + 2)
    out = parse_counter(vm.serial())
    # Guest state intact: the same program went on counting (no reboot, no gap).
    assert out.boots == 1 and out.counts == list(range(1, len(out.counts) + 1))


def vcpu_threads_alive(pid: int, tids: list[int]) -> list[int]:
    return [t for t in tids if os.path.exists(f"/proc/{pid}/task/{t}")]


def test_firmware_qmp_two_vcpus_tcp_shell_and_hostile_clients(tmp_path: Path,
                                                               counter_disk: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    vm = CoreVM(tmp_path, ["--cpus", "2", "--disk", str(counter_disk),
                           "--qmp", f"tcp:127.0.0.1:{port}", "--qmp",
                           f"unix:{tmp_path / 'second.sock'}"])
    with vm:
        vm.wait_serial(BOOTED, timeout=120)
        wait_count_above(vm, 1)
        assert vm.proc is not None
        asyncio.run(_two_vcpus(vm, ("127.0.0.1", port)))
        _hostile_and_shell(vm, str(tmp_path / "second.sock"), ("127.0.0.1", port))
        assert vm.stop() == 0, vm.diagnostics()


async def _two_vcpus(vm: CoreVM, addr: tuple[str, int]) -> None:
    assert vm.proc is not None
    async with qmp_client(addr) as qmp:
        cpus = await qmp.execute("query-cpus-fast")
        assert isinstance(cpus, list) and [c["cpu-index"] for c in cpus] == [0, 1]
        tids = [c["thread-id"] for c in cpus]
        assert vcpu_threads_alive(vm.proc.pid, tids) == tids
        await qmp.execute("stop")
        # Every vCPU thread left KVM_RUN and ended (SIGUSR1 kick): none runs.  `stop`
        # answers once each Python thread has ended; the kernel task may outlive
        # that by a moment (the thread's last steps after its state lock is freed).
        deadline = time.monotonic() + 5
        while (alive := vcpu_threads_alive(vm.proc.pid, tids)) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert alive == []
        held = counts(vm)
        await asyncio.sleep(PAUSE)
        assert counts(vm) == held
        await qmp.execute("cont")
        await asyncio.to_thread(wait_count_above, vm, held[-1])
        assert "CPU#1" in await hmp(qmp, "info registers")


def _hostile_and_shell(vm: CoreVM, unix: str, addr: tuple[str, int]) -> None:
    idle = socket.create_connection(addr)            # never negotiates
    junk = socket.socket(socket.AF_UNIX)
    junk.connect(unix)
    junk.sendall(b'{"execute": "qmp_capabilities"}{"execute": 5}\x00{"x": ' + b"[" * 5000)
    shell = Path(sys.executable).with_name("qmp-shell")
    out = subprocess.run([str(shell), unix], input="query-status\n", capture_output=True,
                         text=True, timeout=60, env={**os.environ, "HOME": str(vm.workdir)})
    assert out.returncode == 0, out.stderr
    assert '"status": "running"' in out.stdout, out.stdout
    raw = socket.create_connection(addr)
    raw.settimeout(30)
    stream = raw.makefile("rb")
    assert b'"QMP"' in stream.readline()
    for msg in (b'{"execute": "qmp_capabilities"}', b'{"execute": "query-status", "id": 1}'):
        raw.sendall(msg)
    assert json.loads(stream.readline()) == {"return": {}}
    assert json.loads(stream.readline())["return"]["running"] is True
    for s in (idle, junk, raw):
        s.close()
