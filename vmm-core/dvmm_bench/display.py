"""``dvmm bench display``: full-screen changes delivered to a VNC client, dvmm vs QEMU.

Owns one measurement, run in one invocation against both VMMs: SeaBIOS
boots the screen disk (:mod:`dvmm_core.boot.screen`) under ``dvmm run
--display vnc=...`` (the display process scans ramfb out of guest RAM) and
under QEMU + KVM with ``-vga none -device ramfb -vnc`` (QEMU's own VNC
server reading the same kind of ramfb), both with 128 MiB.  Once the boot
program has drawn its screen, the bench finds the framebuffer in each VM's
RAM memfd (opened through ``/proc/PID/fd``: the row a VNC capture shows is
searched for) and becomes the "guest": it writes a whole new 1024x768
XRGB8888 frame there (two random pictures, alternating: every pixel
changes), then a VNC client of its own (RFB 3.8, 32 bpp true colour, Raw
encoding, incremental update requests) reads updates until its copy of the
screen equals that frame; then the next frame.  Closed loop, one frame in
flight: frames/s is how fast a full-screen change reaches a client.

CPU per frame is the whole VMM's (user + system, psutil): QEMU's process;
dvmm's core, display process and disk backend together -- and the display
process alone, as a line of its own.  Both servers poll the framebuffer
(dvmm every 40 ms, QEMU's VNC refresh timer from 30 ms), which bounds
frames/s for both.  Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from dvmm_shared.procs import log_tail, spawn, stop

from .report import (
    HIGHER,
    LOWER,
    Compared,
    add_progress_args,
    load_line,
    machine_line,
    median,
    progress_printer,
    table,
)

PEER = "qemu"
W, H = 1024, 768  # SeaBIOS's ramfb mode
MEMORY_MIB = 128
BOOT_TIMEOUT = 120.0
FRAME_TIMEOUT = 10.0
DRAWN = "dvmm-screen: drawn"


@dataclass(frozen=True)
class Settings:
    seconds: float = 10.0
    rounds: int = 3


QUICK = Settings(seconds=1.5, rounds=1)


@dataclass
class Result:
    frames: int = 0
    seconds: float = 0.0
    cpu: float = 0.0        # the whole VMM, seconds
    cpu_display: float = 0.0  # dvmm's display process alone
    received: int = 0       # bytes from the VNC server

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0

    def per_frame_ms(self, cpu: float) -> float:
        return cpu * 1e3 / self.frames if self.frames else 0.0


# -- a minimal RFB client: Raw only, what the measurement needs -------------------------

class RfbError(RuntimeError):
    pass


class RawClient:
    """RFB 3.8, security None, 32 bpp little-endian true colour, Raw."""

    def __init__(self, port: int, timeout: float = FRAME_TIMEOUT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.received = 0
        self._exact(12)
        self.sock.sendall(b"RFB 003.008\n")
        types = self._exact(self._exact(1)[0])
        if 1 not in types:
            raise RfbError(f"the server wants authentication (types {list(types)})")
        self.sock.sendall(b"\x01")
        if struct.unpack(">I", self._exact(4))[0] != 0:
            raise RfbError("security handshake failed")
        self.sock.sendall(b"\x01")  # ClientInit, shared
        self.width, self.height = struct.unpack(">HH", self._exact(4))
        self._exact(16)
        self._exact(struct.unpack(">I", self._exact(4))[0])
        # SetPixelFormat: 32 bpp, depth 24, little endian, true colour, RGB 8:8:8 at 16/8/0
        self.sock.sendall(b"\0\0\0\0" + struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255,
                                                   255, 16, 8, 0))
        self.sock.sendall(struct.pack(">BxHi", 2, 1, 0))  # SetEncodings: Raw
        self.screen = bytearray(self.width * self.height * 4)

    def _exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise RfbError("the VNC server closed the connection")
            got += k
        self.received += n
        return bytes(buf)

    def request(self, incremental: bool) -> None:
        self.sock.sendall(struct.pack(">BBHHHH", 3, incremental, 0, 0, self.width, self.height))

    def read_update(self) -> None:
        """One server message; a FramebufferUpdate is applied to :attr:`screen`."""
        kind = self._exact(1)[0]
        if kind == 2:  # Bell
            return
        if kind == 3:  # ServerCutText
            self._exact(struct.unpack(">3xI", self._exact(7))[0])
            return
        if kind != 0:
            raise RfbError(f"unexpected server message {kind}")
        (count,) = struct.unpack(">xH", self._exact(3))
        for _ in range(count):
            x, y, w, h, enc = struct.unpack(">HHHHi", self._exact(12))
            if enc != 0:
                raise RfbError(f"unexpected encoding {enc}")
            data = self._exact(w * h * 4)
            stride, row = self.width * 4, w * 4
            for r in range(h):
                o = (y + r) * stride + x * 4
                self.screen[o:o + row] = data[r * row:(r + 1) * row]

    def close(self) -> None:
        self.sock.close()


# -- the VMs ------------------------------------------------------------------------------

def free_vnc_port() -> int:
    """A free port of 5901..6899 (QEMU's -vnc takes a display number)."""
    for port in range(5901 + os.getpid() % 500, 6900):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free VNC port")


@dataclass
class Vm:
    """A booted VM: its processes, VNC port and the framebuffer mapping."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    serial: Path
    log: Path
    fb: mmap.mmap | None = None
    fb_offset: int = 0

    def processes(self) -> list[psutil.Process]:
        main = psutil.Process(self.proc.pid)
        return [main, *main.children(recursive=True)]

    def cpu(self) -> float:
        total = 0.0
        for p in self.processes():
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
        return total

    def display_cpu(self) -> float:
        """dvmm's display processes (the serving one and an idle warm standby)."""
        total = 0.0
        for p in self.processes():
            try:
                if "dvmm_display" in " ".join(p.cmdline()):
                    t = p.cpu_times()
                    total += t.user + t.system
            except psutil.Error:
                continue
        return total


def wait_drawn(vm: Vm) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while DRAWN not in (vm.serial.read_text(errors="replace") if vm.serial.exists() else ""):
        if vm.proc.poll() is not None:
            raise RuntimeError(f"{vm.name} exited before the screen was drawn; "
                               f"{log_tail(vm.log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{vm.name}: no {DRAWN!r} on the serial port within "
                               f"{BOOT_TIMEOUT:.0f} s; {log_tail(vm.log)}")
        time.sleep(0.1)


@contextmanager
def dvmm_vm(work: Path, disk: Path) -> Iterator[Vm]:
    port = free_vnc_port()
    serial, log = work / "dvmm-serial.log", work / "dvmm.log"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(work)}
    proc = spawn([sys.executable, "-m", "dvmm_core.cli", "run", "--firmware", "seabios",
                  "--memory", str(MEMORY_MIB), "--display", f"vnc=127.0.0.1:{port}",
                  "--disk", str(disk), "--serial", f"file:{serial}"], log, env=env)
    vm = Vm("dvmm", proc, port, serial, log)
    try:
        yield vm
    finally:
        close_fb(vm)
        stop(proc, timeout=15)


@contextmanager
def qemu_vm(work: Path, disk: Path) -> Iterator[Vm]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise RuntimeError("qemu-system-x86_64 is not installed")
    port = free_vnc_port()
    serial, log = work / "qemu-serial.log", work / "qemu.log"
    proc = spawn([qemu, "-nodefaults", "-enable-kvm", "-cpu", "host,-arch-capabilities",
                  "-M", "pc,memory-backend=ram", "-global", "apic-common.vapic=off",
                  "-m", str(MEMORY_MIB),
                  "-object", f"memory-backend-memfd,id=ram,size={MEMORY_MIB}M,share=on",
                  "-bios", "/usr/share/seabios/bios.bin", "-vga", "none", "-device", "ramfb",
                  "-drive", f"file={disk},if=none,id=d0,format=raw,readonly=on",
                  "-device", "virtio-blk-pci,drive=d0,addr=2", "-display", "none",
                  "-vnc", f"127.0.0.1:{port - 5900}", "-serial", f"file:{serial}"], log)
    vm = Vm(PEER, proc, port, serial, log)
    try:
        yield vm
    finally:
        close_fb(vm)
        stop(proc, timeout=15)


def close_fb(vm: Vm) -> None:
    if vm.fb is not None:
        vm.fb.close()
        vm.fb = None


def ram_memfds(vm: Vm) -> list[str]:
    """``/proc/PID/fd/N`` of the VM's RAM memfds, largest first."""
    found = []
    for p in vm.processes():
        fd_dir = f"/proc/{p.pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for n in names:
            try:
                target = os.readlink(f"{fd_dir}/{n}")
            except OSError:
                continue
            if target.startswith(("/memfd:dvmm-ram", "/memfd:memory-backend-memfd")):
                path = f"{fd_dir}/{n}"
                found.append((os.stat(path).st_size, path))
    return [path for _, path in sorted(found, reverse=True)]


def map_framebuffer(vm: Vm) -> None:
    """Find the framebuffer in RAM: a distinctive row of what a VNC client
    sees now is searched for, and the frame starts that many rows earlier."""
    client = RawClient(vm.port)
    try:
        client.request(incremental=False)
        client.read_update()
        screen = bytes(client.screen)
    finally:
        client.close()
    stride = W * 4
    row = max(range(H), key=lambda y: len(set(screen[y * stride:(y + 1) * stride:4])))
    needle = screen[row * stride:(row + 1) * stride]
    for path in ram_memfds(vm):
        fd = os.open(path, os.O_RDWR)
        try:
            ram = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        at = ram.find(needle)
        if at >= 0 and at - row * stride >= 0:
            vm.fb, vm.fb_offset = ram, at - row * stride
            return
        ram.close()
    raise RuntimeError(f"{vm.name}: the framebuffer shown over VNC is not in its RAM")


# -- the measurement ----------------------------------------------------------------------

def frames() -> tuple[bytes, bytes]:
    """Two pictures differing in every pixel (X bytes 0, as a client receives them)."""
    a = bytearray(random.Random(1050).randbytes(W * H * 4))
    a[3::4] = bytes(W * H)
    b = bytearray(a)
    b[0::4] = bytes(a[0::4]).translate(bytes(i ^ 0x80 for i in range(256)))  # blue flipped
    return bytes(a), bytes(b)


def measure(vm: Vm, pictures: tuple[bytes, bytes], seconds: float) -> Result:
    """Closed loop: write a frame, read updates until the client shows it."""
    assert vm.fb is not None
    fb, off, size = vm.fb, vm.fb_offset, W * H * 4
    client = RawClient(vm.port)
    try:
        client.request(incremental=False)
        client.read_update()
        res = Result()
        cpu0, disp0 = vm.cpu(), vm.display_cpu()
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            picture = pictures[res.frames % 2]
            fb[off:off + size] = picture
            deadline = time.monotonic() + FRAME_TIMEOUT
            while client.screen != picture:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{vm.name}: a frame did not reach the VNC client "
                                       f"within {FRAME_TIMEOUT:.0f} s")
                client.request(incremental=True)
                client.read_update()
            res.frames += 1
        res.seconds = time.monotonic() - t0
        res.cpu, res.cpu_display = vm.cpu() - cpu0, vm.display_cpu() - disp0
        res.received = client.received
        return res
    finally:
        client.close()


@contextmanager
def booted(kind: str, work: Path, disk: Path) -> Iterator[Vm]:
    ctx = dvmm_vm if kind == "dvmm" else qemu_vm
    sub = work / kind
    sub.mkdir(exist_ok=True)
    with ctx(sub, disk) as vm:
        wait_drawn(vm)
        map_framebuffer(vm)
        yield vm


def run(settings: Settings, work: Path, progress: Callable[[str], None]
        ) -> dict[str, list[Result]]:
    from dvmm_core.boot.screen import make_screen_disk

    disk = make_screen_disk(work / "screen.img")
    pictures = frames()
    results: dict[str, list[Result]] = {"dvmm": [], PEER: []}
    # Both VMs up at once, measured in turn (the other one idles): the same
    # machine state for both, alternating which goes first each round.
    with booted("dvmm", work, disk) as dvmm, booted(PEER, work, disk) as qemu:
        vms = {"dvmm": dvmm, PEER: qemu}
        for r in range(settings.rounds):
            order = ["dvmm", PEER] if r % 2 == 0 else [PEER, "dvmm"]
            for name in order:
                res = measure(vms[name], pictures, settings.seconds)
                results[name].append(res)
                progress(f"round {r + 1} {name:4}: {res.fps:6.1f} frames/s, "
                         f"{res.per_frame_ms(res.cpu):6.2f} ms CPU/frame")
    return results


def rows(results: dict[str, list[Result]]) -> list[Compared]:
    ours, theirs = results["dvmm"], results[PEER]
    wl = f"full-screen {W}x{H} raw"

    def med(rs: list[Result], f: Callable[[Result], float]) -> float:
        return median(f(r) for r in rs)

    return [
        Compared("display", wl, "frames/s", med(ours, lambda r: r.fps),
                 med(theirs, lambda r: r.fps), PEER, HIGHER),
        Compared("display", wl, "CPU ms/frame (VMM)", med(ours, lambda r: r.per_frame_ms(r.cpu)),
                 med(theirs, lambda r: r.per_frame_ms(r.cpu)), PEER, LOWER),
        Compared("display", wl, "CPU ms/frame (display proc)",
                 med(ours, lambda r: r.per_frame_ms(r.cpu_display)),
                 med(theirs, lambda r: r.per_frame_ms(r.cpu)), PEER, LOWER),
        Compared("display", wl, "MB/s to the client",
                 med(ours, lambda r: r.received / r.seconds / 1e6),
                 med(theirs, lambda r: r.received / r.seconds / 1e6), PEER, HIGHER),
    ]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("display", help="VNC full-screen frames: dvmm's display vs QEMU's VNC",
                       description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=Settings.seconds,
                   help="measured time per VMM and round (default %(default)s)")
    p.add_argument("--rounds", type=int, default=Settings.rounds,
                   help="rounds, alternating which VMM goes first; medians are shown "
                        "(default %(default)s)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    add_progress_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    settings = QUICK if args.quick else Settings(max(0.5, args.seconds), max(1, args.rounds))
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("dvmm bench display: needs /dev/kvm (SeaBIOS under dvmm and QEMU)",
              file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="dvmm-bench-display-") as tmp:
        results = run(settings, Path(tmp), progress_printer(args))
    print(f"dvmm bench display: {settings.rounds} round(s) of {settings.seconds:g} s; "
          f"the VNC client is this process (Raw, closed loop, one frame in flight)")
    print(table(rows(results)))
    print(machine_line())
    print(load_line())
    return 0
