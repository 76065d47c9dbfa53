"""The QEMU VM kind of a campaign: QEMU (TCG) + the Debian test guest + dvmm backends.

Owns starting it — a dvmm blk backend serving a qcow2 image (``blk0``) and
a dvmm net backend on a TAP in a network namespace of its own (``net0``),
each kept alive by a :class:`~.backend_loop.BackendLoop` (no dvmm core
supervises them here), then ``qemu-system-x86_64 -accel tcg`` with
``vhost-user-blk-pci`` and ``virtio-net-pci`` on ``-chardev socket,reconnect=1``
— and the guest's workloads with their oracles:

* ``blkverify``: the guest tool of that name writes, flushes and re-reads
  numbered, checksummed blocks with O_DIRECT, passes without end; its lines
  (on the guest's ttyS1, a file here) give progress (blocks verified), EIO
  lines (errors the guest saw) and MISMATCH lines (never allowed).  After
  the VM stopped: ``qemu-img check`` clean, and every block of the image is
  the block the last pass wrote (or, if the guest could not finish its pass,
  of the pass under way).
* ``net-stream``: the guest tool ``netverify`` and the host side of
  :mod:`.workload_net` exchange sequenced, checksummed records over TCP both
  ways (the guest's lines on ttyS2).

It is a :class:`~.vmbase.ChaosVmKind`: process faults signal the backend's
pid, the other faults go to its ``--control`` endpoint, and the events the
core would publish are synthesized by the backend loops.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from dvmm_shared.procs import Started, log_tail, spawn, stop

from dvmm_core.guest import build_guest
from dvmm_core.guest.console import GuestConsole

from . import image_check
from .backend_loop import BackendLoop
from .vmbase import View, VmError, poll_until
from .workload_net import GUEST_IP, HOST_IP, PORT, PREFIX, NetNamespace, NetStream

WORKLOADS = {"blkverify": "blk0", "net-stream": "net0"}
START_TIMEOUT = 180.0
BLK_SIZE = 8 << 20          # the qcow2 image's virtual size, all of it verified
GUEST_NET_RATE = 200         # guest -> host records per second
MAC = "52:54:00:12:34:56"
GUEST_APPEND = "console=ttyS0 quiet loglevel=0 panic=-1"
STOP_PASS_TIMEOUT = 60.0     # the guest finishing its blkverify pass after SIGUSR1
_PASS = re.compile(r"^blkverify: pass (\d+)/\d+ .* verified (\d+) .* bad (\d+) eio (\d+)",
                   re.M)


class QemuChaosVm(Started):
    """One QEMU VM for (part of) a campaign; a context manager that stops every
    process it started, by pid."""

    kind = "qemu"

    def __init__(self, work: Path, seed: int, workloads: set[str]) -> None:
        unknown = workloads - set(WORKLOADS)
        if unknown or not workloads:
            raise VmError(f"QEMU workloads are {', '.join(WORKLOADS)}; got {sorted(workloads)}")
        self.work, self.seed, self.workloads = work, seed, workloads
        self.image = work / "blk0.qcow2"
        self.blk_out, self.net_out = work / "guest-blk0.log", work / "guest-net0.log"
        self.serial_log, self.qemu_log = work / "serial.log", work / "qemu.log"
        self.loops: dict[str, BackendLoop] = {}
        self.ns: NetNamespace | None = None
        self.stream: NetStream | None = None
        self.qemu: subprocess.Popen[bytes] | None = None
        self.chan: socket.socket | None = None
        self.console: GuestConsole | None = None
        self.events: list[dict[str, Any]] = []
        self._seen: dict[str, int] = {}
        self.blk_done = False      # blkverify finished its pass after SIGUSR1
        self.start_s = 0.0

    # -- lifecycle ------------------------------------------------------------------
    def targets(self) -> tuple[str, ...]:
        return tuple(t for w, t in WORKLOADS.items() if w in self.workloads)

    def start(self) -> None:
        t0 = time.monotonic()
        self.work.mkdir(parents=True, exist_ok=True)
        artifacts = build_guest(log=lambda _m: None)
        if "blk0" in self.targets():
            self._start_blk()
        if "net0" in self.targets():
            self._start_net()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.chan = ours
        kernel = artifacts.vmlinux or artifacts.kernel  # vmlinux: PVH, boots faster
        with theirs:  # QEMU holds the only other end: its exit is EOF here
            self.qemu = spawn([*self._qemu_argv(theirs.fileno()), "-kernel", str(kernel),
                               "-initrd", str(artifacts.initrd)], self.qemu_log,
                              pass_fds=[theirs.fileno()])
        self.console = GuestConsole(ours, self.serial_log, self.check, self.qemu_log)
        self.console.wait_ready(START_TIMEOUT)
        if "blk0" in self.targets():
            self.console.command(f"blkverify /dev/vda {BLK_SIZE} 0 {self.seed} "
                                 ">/dev/ttyS1 2>&1 & echo $! >/run/blkverify.pid")
        if "net0" in self.targets():
            self.console.command(f"ip link set eth0 up && ip addr add {GUEST_IP}/{PREFIX} "
                                 f"dev eth0 && (netverify {HOST_IP} {PORT} {self.seed} "
                                 f"{GUEST_NET_RATE} >/dev/ttyS2 2>&1 &)")
        for t in self.targets():
            self.wait(f"{t}'s first completions", lambda t=t: self.completions(t) > 0)
        self.start_s = time.monotonic() - t0

    def _start_blk(self) -> None:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.image),
                        str(BLK_SIZE)], check=True, capture_output=True, timeout=30)
        loop = BackendLoop("blk0", lambda ctl: [
            sys.executable, "-m", "dvmm_blk", "--socket", str(self.work / "blk0.sock"),
            "--image", str(self.image), "--format", "qcow2", "--control", ctl, "-q"],
            self.work / "blk0.sock", self.work)
        self.loops["blk0"] = loop
        loop.start()

    def _start_net(self) -> None:
        self.ns = ns = NetNamespace("qemu")
        ns.create()
        loop = BackendLoop("net0", lambda ctl: ns.argv(
            sys.executable, "-m", "dvmm_net", "--socket", str(self.work / "net0.sock"),
            "--tap", ns.tap, "--mac", MAC, "--no-config-space", "--control", ctl, "-q"),
            self.work / "net0.sock", self.work)
        self.loops["net0"] = loop
        loop.start()
        self.stream = NetStream(ns, self.seed)

    def _qemu_argv(self, serial_fd: int) -> list[str]:
        argv = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-accel", "tcg",
                "-M", "q35", "-m", "256", "-smp", "1",
                "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
                "-numa", "node,memdev=mem", "-display", "none", "-no-reboot",
                "-chardev", f"socket,id=ser0,fd={serial_fd}", "-serial", "chardev:ser0",
                "-chardev", f"file,id=ser1,path={self.blk_out}", "-serial", "chardev:ser1",
                "-chardev", f"file,id=ser2,path={self.net_out}", "-serial", "chardev:ser2",
                "-append", GUEST_APPEND]
        if "blk0" in self.loops:
            argv += ["-chardev", f"socket,id=c0,path={self.work / 'blk0.sock'},reconnect=1",
                     "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"]
        if "net0" in self.loops:
            # vectors=0: QEMU 7.2 under TCG crashes when a vhost-user-net MSI-X
            # vector is unmasked (no KVM irqfds); legacy INTx works.
            argv += ["-chardev", f"socket,id=c1,path={self.work / 'net0.sock'},reconnect=1",
                     "-netdev", "vhost-user,id=n0,chardev=c1",
                     "-device", f"virtio-net-pci,netdev=n0,mac={MAC},vectors=0"]
        return argv

    def close(self) -> None:
        """Let blkverify finish its pass (bounded), then stop everything by pid."""
        try:
            if self.alive() and self.console is not None and "blk0" in self.loops:
                self._finish_blkverify()
        except Exception:   # the final checks fall back to the looser pattern check
            pass
        finally:
            if self.qemu is not None:
                stop(self.qemu, timeout=5)
            for loop in self.loops.values():
                loop.stop()
            if self.stream is not None:
                self.stream.close()
            if self.ns is not None:
                self.ns.delete()
            if self.chan is not None:
                self.chan.close()

    def _finish_blkverify(self) -> None:
        assert self.console is not None
        self.console.command("kill -USR1 $(cat /run/blkverify.pid)")
        deadline = time.monotonic() + STOP_PASS_TIMEOUT
        while not self.blk_done and time.monotonic() < deadline and self.alive():
            self.blk_done = "blkverify: done" in self._text(self.blk_out)
            time.sleep(0.1)

    # -- observing ------------------------------------------------------------------
    def wait(self, what: str, ready: Any, timeout: float = START_TIMEOUT) -> Any:
        return poll_until(what, ready, self.check, timeout)

    def alive(self) -> bool:
        return self.qemu is not None and self.qemu.poll() is None

    def check(self) -> None:
        if self.qemu is not None and self.qemu.poll() is not None:
            raise VmError(f"qemu-system-x86_64 exited with status {self.qemu.returncode}:\n"
                          f"{log_tail(self.qemu_log)}")
        for loop in self.loops.values():
            loop.check()

    def completions(self, target: str) -> int:
        """blk0: requests the backends served; net0: guest records the host verified."""
        if target == "net0" and self.stream is not None:
            return self.stream.state.verified
        return self._loop(target).requests()

    def oracle(self, target: str) -> str | None:
        if target == "net0" and self.stream is not None and self.stream.state.mismatches:
            return self.stream.state.mismatches[-1]
        return None

    def poll_events(self) -> list[dict[str, Any]]:
        new: list[dict[str, Any]] = []
        for name, loop in self.loops.items():
            seen = self._seen.get(name, 0)
            new += loop.events[seen:]
            self._seen[name] = seen + len(loop.events[seen:])
        new.sort(key=lambda e: float(e["ts"]))
        self.events += new
        return new

    @staticmethod
    def _text(path: Path) -> str:
        return path.read_text(errors="replace") if path.exists() else ""

    def view(self) -> View:
        progress: dict[str, int] = {}
        errors: dict[str, int] = {}
        mismatches = 0
        stopped = None
        if "blk0" in self.loops:
            text = self._text(self.blk_out)
            passes = [tuple(map(int, m.groups())) for m in _PASS.finditer(text)]
            progress["blk0"] = sum(p[1] for p in passes)
            errors["blk0"] = text.count("blkverify: EIO")
            mismatches += text.count("blkverify: MISMATCH")
            if "blkverify: done" in text and not self.blk_done:
                stopped = "blkverify ended"
        if "net0" in self.loops and self.stream is not None:
            text = self._text(self.net_out)
            progress["net0"] = self.stream.state.verified
            errors["net0"] = text.count("netverify: ERROR")
            mismatches += text.count("netverify: MISMATCH") + len(self.stream.state.mismatches)
        return View(progress, errors, mismatches, stopped)

    def rss_mb(self) -> dict[str, float]:
        pids = {"qemu": self.qemu.pid if self.qemu else None,
                **{name: loop.pid for name, loop in self.loops.items()}}
        out = {}
        for name, pid in pids.items():
            try:
                if pid:
                    out[name] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
            except psutil.Error:
                continue
        return out

    # -- faults ---------------------------------------------------------------------
    def _loop(self, target: str) -> BackendLoop:
        try:
            return self.loops[target]
        except KeyError:
            raise VmError(f"no target {target!r} in this QEMU VM "
                          f"({', '.join(self.loops)})") from None

    def backend_pid(self, target: str) -> int | None:
        return self._loop(target).pid

    def core_fault(self, target: str, action: str) -> dict[str, Any]:
        """Signals to the backend (the restart loop brings up the next run)."""
        return self._loop(target).signal(action)

    def backend_fault(self, target: str, **args: Any) -> dict[str, Any]:
        return self._loop(target).command("fault", **args)

    def backend_stats(self, target: str) -> dict[str, Any]:
        return self._loop(target).command("stats")

    def final(self) -> dict[str, bool]:
        """After close: the qcow2 image is clean and holds the blkverify pattern."""
        if "blk0" not in self.loops:
            return {}
        check = image_check.qemu_img_check(self.image)
        passes = [int(m.group(1)) for m in _PASS.finditer(self._text(self.blk_out))]
        bad = image_check.pattern_check(self.image, self.work / "blk0.raw", BLK_SIZE,
                                        max(passes, default=0), self.seed, exact=self.blk_done)
        (self.work / "final.json").write_text(json.dumps({"qemu_img_check": check,
                                                          "bad_blocks": bad[:20]}, indent=1))
        return {"qcow2_check": check["clean"], "image_pattern": not bad}
