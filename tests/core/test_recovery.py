"""Crash recovery on the dvmm core (KVM + SeaBIOS), issue #8 (b) and (d).

The guest is the re-read boot program (``dvmm_core.boot.reread``): SeaBIOS
boots it from a virtio-blk disk and it reads one region thousands of times
through int 13h, comparing every read with the first.  SeaBIOS's virtio-blk
driver waits for each completion without a timeout, so a request that is
lost would hang the program, one completed twice or with wrong data would
show as a mismatch, a failed one as a read error.  Meanwhile the test kills
the backend, and ``dvmm events`` (a real subscriber process) records what
the core saw.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
from corevm import CoreVM, dvmm_argv, wait_until
from dvmm_core.boot.reread import make_reread_disk, parse_reread_output
from dvmm_shared.control import command, runtime_endpoint

pytestmark = pytest.mark.core

KILLS = 10


def runtime_dir(vm: CoreVM) -> str:
    """The VM's runtime directory: ``dvmm-<core pid>-*`` with its core.ctl."""
    assert vm.proc is not None
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    pattern = f"dvmm-{vm.proc.pid}-*"

    def found() -> list[Path]:
        return [p for p in base.glob(pattern) if (p / "core.ctl").exists()]

    wait_until(lambda: bool(found()), 30, "the core's control endpoint", vm.proc,
               vm.diagnostics)
    return str(found()[0])


def status(runtime: str) -> dict[str, Any]:
    return command(runtime_endpoint(runtime, "core"), "status", timeout=5)


@contextmanager
def event_log(tmp_path: Path, runtime: str) -> Iterator[Path]:
    """``dvmm events --json --history`` running for the whole test."""
    out = tmp_path / "events.jsonl"
    with open(out, "wb") as f:
        proc = subprocess.Popen(dvmm_argv("events", "--vm", runtime, "--json", "--history"),
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(10) == 0, out.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def count(evs: list[dict[str, Any]], name: str) -> int:
    return sum(1 for e in evs if e["event"] == name)


def backend_pid(runtime: str, name: str = "blk0") -> int:
    (b,) = [b for b in status(runtime)["backends"] if b["name"] == name]
    return int(b["pid"]) if b["pid"] and b["state"] == "running" else -1


def test_blk_backend_killed_10_times_guest_reads_all_equal(tmp_path: Path) -> None:
    seed = int(os.environ.get("DVMM_TEST_SEED", time.time_ns() % 10_000))
    print(f"DVMM_TEST_SEED={seed}")
    rng = random.Random(seed)
    disk = tmp_path / "reread.img"
    make_reread_disk(disk, reads=2500, count=8, seed=seed)
    with CoreVM(tmp_path, ["--disk", str(disk)]) as vm:
        runtime = runtime_dir(vm)
        with event_log(tmp_path, runtime) as log:
            vm.wait_serial("dvmm-reread: booted", timeout=90)
            for k in range(1, KILLS + 1):
                # At a random moment while the program reads (a seeded pause).
                time.sleep(rng.uniform(0.05, 1.2))
                pid = backend_pid(runtime)
                assert pid > 0, status(runtime)
                os.kill(pid, signal.SIGKILL)
                wait_until(lambda k=k: count(events(log), "device-restored") >= k, 60,
                           f"restore #{k} (seed {seed})", vm.proc, vm.diagnostics)
            vm.wait_serial("dvmm-reread: done", timeout=300)
            result = parse_reread_output(vm.serial())
            assert result.failure is None, f"seed {seed}: {result.failure}\n{vm.diagnostics()}"
            assert result.done == 2500
            evs = events(log)
        info = status(runtime)["backends"][0]
        assert vm.stop() == 0
    assert count(evs, "backend-exited") == KILLS, evs
    assert count(evs, "backend-restarted") == KILLS
    assert count(evs, "device-lost") == KILLS and count(evs, "device-restored") == KILLS
    assert all(e["how"] == "killed by SIGKILL" for e in evs if e["event"] == "backend-exited")
    seqs = [e["seq"] for e in evs]
    assert seqs == sorted(set(seqs)), "events out of order or repeated"
    assert info["restarts"] == KILLS and info["state"] == "running"


def test_a_crash_between_data_and_used_ring_is_replayed_once(tmp_path: Path) -> None:
    """The backend dies at a named point of a request (after the data was
    read into guest memory, before the used element): the restarted backend
    finds it in the in-flight region and completes it exactly once."""
    disk = tmp_path / "reread.img"
    make_reread_disk(disk, reads=400, count=8)
    with CoreVM(tmp_path, ["--disk", str(disk)]) as vm:
        runtime = runtime_dir(vm)
        with event_log(tmp_path, runtime) as log:
            vm.wait_serial("dvmm-reread: booted", timeout=90)
            fault = subprocess.run(dvmm_argv("fault", "--vm", runtime, "blk0", "crash-at",
                                             "after-data"), capture_output=True, text=True)
            assert fault.returncode == 0, fault.stderr
            wait_until(lambda: count(events(log), "device-restored") >= 1, 60,
                       "the restore after the crash", vm.proc, vm.diagnostics)
            vm.wait_serial("dvmm-reread: done", timeout=300)
            result = parse_reread_output(vm.serial())
            assert result.failure is None and result.done == 400, vm.diagnostics()
            (restored,) = [e for e in events(log) if e["event"] == "device-restored"]
        assert restored["replayed"] == 1, restored
        assert vm.stop() == 0


def test_a_backend_that_crashes_at_start_is_given_up(tmp_path: Path) -> None:
    """(d): the image vanishes, so every restart dies at once; after the cap
    the device is offline, the VM runs on, and events and status say why."""
    disk = tmp_path / "reread.img"
    make_reread_disk(disk, reads=1_000_000, count=8)
    with CoreVM(tmp_path, ["--disk", str(disk), "--restart-limit", "3/60"]) as vm:
        runtime = runtime_dir(vm)
        with event_log(tmp_path, runtime) as log:
            vm.wait_serial("dvmm-reread: booted", timeout=90)
            disk.rename(tmp_path / "gone.img")
            os.kill(backend_pid(runtime), signal.SIGKILL)
            wait_until(lambda: count(events(log), "backend-given-up") == 1, 60,
                       "the backend to be given up", vm.proc, vm.diagnostics)
            wait_until(lambda: count(events(log), "device-offline") == 1, 10,
                       "the device to go offline", vm.proc, vm.diagnostics)
            evs = events(log)
        (gave_up,) = [e for e in evs if e["event"] == "backend-given-up"]
        assert "restarted 3 times in 60 s" in gave_up["reason"]
        assert count(evs, "backend-exited") == 4
        (info,) = status(runtime)["backends"]
        assert info["state"] == "given-up" and info["given_up_reason"] == gave_up["reason"]
        shown = subprocess.run(dvmm_argv("status", "--vm", runtime), capture_output=True,
                               text=True)
        assert shown.returncode == 0 and "given-up" in shown.stdout, shown
        assert "restarted 3 times" in shown.stdout
        assert vm.proc is not None and psutil.Process(vm.proc.pid).is_running()
        with event_log(tmp_path, runtime) as log:
            # (subscribed once it printed the history it asks for after connecting)
            wait_until(lambda: count(events(log), "backend-given-up") == 1, 10,
                       "a new subscriber's history")
            assert vm.stop() == 0
            wait_until(lambda: count(events(log), "vm-stopped") == 1, 10,
                       "the vm-stopped event")


def start_qsd(image: Path, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(
            ["qemu-storage-daemon", "--blockdev",
             f"driver=file,node-name=f0,filename={image}", "--export",
             f"type=vhost-user-blk,id=e0,addr.type=unix,addr.path={sock},node-name=f0,"
             "writable=on"], stdin=subprocess.DEVNULL, stdout=f, stderr=f)


def test_qemu_storage_daemon_killed_and_started_again_by_someone_else(tmp_path: Path) -> None:
    """A third-party backend: dvmm does not restart it, but reconnects to it
    (and hands it the in-flight region) whenever it listens again."""
    seed = int(os.environ.get("DVMM_TEST_SEED", time.time_ns() % 10_000))
    print(f"DVMM_TEST_SEED={seed}")
    rng = random.Random(seed)
    disk, sock, qlog = tmp_path / "reread.img", tmp_path / "qsd.sock", tmp_path / "qsd.log"
    make_reread_disk(disk, reads=2500, count=8, seed=seed)
    qsd = start_qsd(disk, sock, qlog)
    try:
        wait_until(lambda: sock.exists(), 15, "qemu-storage-daemon's socket", qsd)
        with CoreVM(tmp_path, ["--vhost-user-blk", str(sock)]) as vm:
            runtime = runtime_dir(vm)
            with event_log(tmp_path, runtime) as log:
                vm.wait_serial("dvmm-reread: booted", timeout=90)
                for k in range(1, KILLS + 1):
                    time.sleep(rng.uniform(0.05, 1.2))
                    qsd.kill()
                    qsd.wait(10)
                    wait_until(lambda k=k: count(events(log), "device-lost") >= k, 30,
                               f"loss #{k}", vm.proc, vm.diagnostics)
                    time.sleep(rng.uniform(0.0, 0.5))  # the daemon is away a while
                    qsd = start_qsd(disk, sock, qlog)
                    wait_until(lambda k=k: count(events(log), "device-restored") >= k, 60,
                               f"restore #{k} (seed {seed})", vm.proc, vm.diagnostics)
                vm.wait_serial("dvmm-reread: done", timeout=300)
                result = parse_reread_output(vm.serial())
                assert result.failure is None, f"seed {seed}: {result.failure}"
                assert result.done == 2500
                evs = events(log)
            (info,) = status(runtime)["backends"]
            assert vm.stop() == 0
    finally:
        qsd.terminate()
        qsd.wait(15)
    assert info["external"] and info["link"] == "connected" and info["restores"] == KILLS
    assert count(evs, "device-lost") == KILLS and count(evs, "device-restored") == KILLS
    assert count(evs, "backend-exited") == 0  # not ours to supervise
