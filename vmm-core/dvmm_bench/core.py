"""``dvmm bench core``: guest exits and start-up of the core against QEMU.

Owns one guest and the measurements made with it.  The guest is a 64 KiB
"BIOS" generated here: its reset vector jumps to code that writes ``S`` to
COM1, does ``out dx, al`` to the POST port 0x80 ``N`` times in a loop, writes
``D`` to COM1, then writes port 0xF4 (QEMU's ``isa-debug-exit`` ends QEMU
there) and halts.  The same image runs, in the same invocation, alternating:

* under ``dvmm run --firmware IMAGE`` (the whole dvmm core: machine, buses,
  serial, the vCPU thread) and under ``qemu-system-x86_64 -enable-kvm -M pc
  -bios IMAGE`` — the host timestamps ``S`` and ``D`` as they arrive on each
  VMM's stdout, so process start to ``S`` is start-up to the first guest
  instruction (RSS is read then), and ``S`` to ``D`` is the loop;
* in this process on dvmm's KVM layer alone (``Vm``, ``Vcpu``, ``VcpuRunner``
  and a bare port bus), to separate the machine's cost from the run loop's.

dvmm is started the way an installed Python package starts: with its
modules' bytecode cached (a private ``PYTHONPYCACHEPREFIX`` in the work
directory, filled by a warm-up start that is not counted).  A start with the
environment as given -- where ``PYTHONDONTWRITEBYTECODE=1`` makes every start
compile every dvmm module -- is measured too and shown in the detail table.

Each loop is also run with ``nop`` in place of the ``out``: same instructions,
no exit.  On kvm_pvm guest code at CPL0 (real mode included) is emulated in
software, so the loop's own instructions cost about as much as an exit; the
exit round trip reported is (fastest loop with out - fastest loop with nop) / N,
and the raw exits/s of the loop is printed too.  When noise makes a loop with
exits look no slower than the loop without, those loops are measured again
(a few extra rounds) and, failing that, the bench says so and exits 1.
Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from dvmm_core.kvm import Kvm, VcpuRunner
from dvmm_core.machine.bus import Bus
from dvmm_shared.procs import log_tail

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
ROM_SIZE = 0x10000
CODE_OFFSET = 0xF000
RESET_OFFSET = 0xFFF0
COM1, POST_PORT, EXIT_PORT = 0x3F8, 0x80, 0xF4
OUT_DX_AL, NOP = 0xEE, 0x90
FOUR_GIB = 1 << 32
TSS_ADDR = 0xFEFFD000


def guest_image(turns: int, exit_insn: int = OUT_DX_AL) -> bytes:
    """The tiny BIOS: reset vector -> F000:F000 (listing checked with objdump -mi8086)."""
    if not 1 <= turns < 1 << 32:
        raise ValueError(f"loop turns must be 1..2**32-1, not {turns}")
    code = (bytes.fromhex("baf803" "b053" "ee")         # mov dx, 0x3f8; mov al, 'S'; out
            + b"\x66\xb9" + struct.pack("<I", turns)    # mov ecx, turns
            + bytes.fromhex("ba8000")                   # mov dx, 0x80
            + bytes([exit_insn])                        # loop: out dx, al  (or nop)
            + bytes.fromhex("6649" "75fb")              # dec ecx; jnz loop
            + bytes.fromhex("baf803" "b044" "ee")       # mov dx, 0x3f8; mov al, 'D'; out
            + bytes.fromhex("b000" "e6f4")              # mov al, 0; out 0xf4, al
            + bytes.fromhex("fa" "f4" "ebfd"))          # cli; hlt; jmp hlt
    rom = bytearray(b"\xff" * ROM_SIZE)
    rom[CODE_OFFSET:CODE_OFFSET + len(code)] = code
    # Reset: CS base 0xFFFF0000, IP 0xFFF0; jmp near rel16 to 0xF000.
    rel = (CODE_OFFSET - (RESET_OFFSET + 3)) & 0xFFFF
    rom[RESET_OFFSET:RESET_OFFSET + 3] = b"\xe9" + struct.pack("<H", rel)
    return bytes(rom)


# --- measuring a VMM process -----------------------------------------------------------

@dataclass(frozen=True)
class Timeline:
    """What the host saw of one run: seconds from spawn to S and D, RSS at S."""

    first: float
    done: float
    rss: int
    rss_total: int


def qemu_argv(image: Path) -> list[str]:
    return ["qemu-system-x86_64", "-enable-kvm", "-cpu", "host,-arch-capabilities",
            "-M", "pc", "-m", "32", "-bios", str(image), "-nodefaults", "-display", "none",
            "-serial", "stdio", "-device", f"isa-debug-exit,iobase={EXIT_PORT:#x},iosize=0x04"]


def dvmm_argv(image: Path) -> list[str]:
    return [sys.executable, "-m", "dvmm_core.cli", "run", "-q", "--memory", "32",
            "--firmware", str(image), "--serial", "stdio"]


def cached_env(work: Path) -> dict[str, str]:
    """The environment of a dvmm whose bytecode is cached (see the module doc)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    return env


def environment_note() -> str:
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        return "no bytecode cache (PYTHONDONTWRITEBYTECODE)"
    return "environment as given"


def timeline(argv: list[str], log: Path, timeout: float = 120.0,
             env: dict[str, str] | None = None) -> Timeline:
    """Spawn ``argv`` and timestamp the guest's S and D on its stdout."""
    start = time.monotonic()
    with log.open("ab") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, env=env)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    seen: dict[int, float] = {}
    rss = (0, 0)
    try:
        while ord("D") not in seen:
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"{argv[0]}: no 'D' from the guest in {timeout:.0f} s")
            if not sel.select(timeout=1.0):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            now = time.monotonic() - start
            if not chunk:
                raise RuntimeError(f"{argv[0]} ended before the guest finished:\n"
                                   f"{log_tail(log)}")
            for byte in chunk:
                seen.setdefault(byte, now)
            if ord("S") in seen and not rss[0]:
                rss = _rss(proc.pid)
        return Timeline(seen[ord("S")], seen[ord("D")], *rss)
    finally:
        sel.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _rss(pid: int) -> tuple[int, int]:
    p = psutil.Process(pid)
    own = p.memory_info().rss
    return own, own + sum(c.memory_info().rss for c in p.children(recursive=True))


# --- dvmm's KVM layer alone ---------------------------------------------------------------

class _Port:
    """A port that does nothing, or timestamps the bytes written to it."""

    def __init__(self, marks: dict[int, float] | None = None) -> None:
        self.marks = marks

    def read(self, offset: int, size: int) -> int:
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        if self.marks is not None:
            self.marks.setdefault(value & 0xFF, time.perf_counter())


def kvm_layer_loop(image: bytes) -> float:
    """Seconds from S to D with the image run on Vm/Vcpu/VcpuRunner and a bare bus."""
    from dvmm_shared.memory import memfd_region

    marks: dict[int, float] = {}
    ended = threading.Event()
    pio, mmio = Bus("pio", serialize=False), Bus("mmio", serialize=False)  # one vCPU, as dvmm
    pio.register(COM1, 8, _Port(marks), "com1")
    pio.register(POST_PORT, 1, _Port(), "post")
    pio.register(EXIT_PORT, 4, _Port(), "exit")
    ram_fd, ram = memfd_region(1 << 20, name="dvmm-bench-ram")
    rom_fd, rom = memfd_region(ROM_SIZE, name="dvmm-bench-rom")
    rom.view[:] = image
    ram.view[(1 << 20) - ROM_SIZE:] = image     # the low alias at 0xF0000
    try:
        with Kvm() as kvm, kvm.create_vm() as vm:
            vm.set_tss_addr(TSS_ADDR)
            vm.set_user_memory_region(0, 0, 1 << 20, ram.user_addr)
            vm.set_user_memory_region(1, FOUR_GIB - ROM_SIZE, ROM_SIZE, rom.user_addr,
                                      readonly=True)
            vcpu = vm.create_vcpu(0)       # KVM's reset state: F000:FFF0, base FFFF0000
            vcpu.setup_cpuid(kvm.supported_cpuid(), 1)
            runner = VcpuRunner(vcpu, pio, mmio, lambda kind, detail: ended.set())
            runner.start()
            if not ended.wait(120):
                runner.stop()
                raise RuntimeError("the guest did not halt on dvmm's KVM layer")
            runner.stop()
    finally:
        os.close(ram_fd)
        os.close(rom_fd)
    if ord("S") not in marks or ord("D") not in marks:
        raise RuntimeError(f"the guest wrote {sorted(marks)} to COM1, not S and D")
    return marks[ord("D")] - marks[ord("S")]


# --- the run plan ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    turns: int = 200_000
    runs: int = 3


@dataclass
class Samples:
    """Per VMM ("dvmm", "qemu", "kvm-layer"): loops with out and with nop, and timelines
    (``start["dvmm-as-is"]``: dvmm started with the environment as given)."""

    out: dict[str, list[float]]
    nop: dict[str, list[float]]
    start: dict[str, list[Timeline]]


AS_IS = "dvmm-as-is"


def run(settings: Settings, work: Path, progress: Callable[[str], None]) -> Samples:
    images = {}
    for name, insn, turns in (("out", OUT_DX_AL, settings.turns), ("nop", NOP, settings.turns),
                              ("start", NOP, 1)):
        images[name] = work / f"tiny-bios-{name}.bin"
        images[name].write_bytes(guest_image(turns, insn))
    s = Samples({}, {}, {})
    argvs = {"dvmm": dvmm_argv, PEER: qemu_argv}
    envs = {"dvmm": cached_env(work), PEER: None}
    timeline(dvmm_argv(images["start"]), work / "dvmm.log", env=envs["dvmm"])  # warm-up
    for r in range(settings.runs):
        order = ["dvmm", PEER] if r % 2 == 0 else [PEER, "dvmm"]
        for vmm in order:
            for name, store in (("out", s.out), ("nop", s.nop)):
                t = timeline(argvs[vmm](images[name]), work / f"{vmm}.log", env=envs[vmm])
                store.setdefault(vmm, []).append(t.done - t.first)
                if name == "out":
                    s.start.setdefault(vmm, []).append(t)
                progress(f"run {r + 1} {vmm:4} {name}: start {t.first * 1e3:6.1f} ms, "
                         f"loop {t.done - t.first:6.3f} s")
        t = timeline(dvmm_argv(images["start"]), work / "dvmm.log")
        s.start.setdefault(AS_IS, []).append(t)
        progress(f"run {r + 1} dvmm start, {environment_note()}: {t.first * 1e3:6.1f} ms")
        kvm_layer_round(s, images, f"run {r + 1}", progress)
    for extra in range(1, EXTRA_ROUNDS + 1):
        noisy = [v for v in s.out if min(s.out[v]) <= min(s.nop[v])]
        if not noisy:
            break
        # A loop with exits that was not slower than the same loop without
        # them means something else had the CPU: measure those loops again.
        progress(f"extra round {extra}: {', '.join(noisy)} loop with exits not slower "
                 f"than without (machine busy); measuring again")
        for vmm in noisy:
            if vmm == "kvm-layer":
                kvm_layer_round(s, images, f"extra {extra}", progress)
                continue
            for name, store in (("out", s.out), ("nop", s.nop)):
                t = timeline(argvs[vmm](images[name]), work / f"{vmm}.log", env=envs[vmm])
                store[vmm].append(t.done - t.first)
    return s


EXTRA_ROUNDS = 3  # loop-only re-measurements when noise swamped an exit-time difference


def kvm_layer_round(s: Samples, images: dict[str, Path], label: str,
                    progress: Callable[[str], None]) -> None:
    for name, store in (("out", s.out), ("nop", s.nop)):
        loop = kvm_layer_loop(images[name].read_bytes())
        store.setdefault("kvm-layer", []).append(loop)
        progress(f"{label} kvm-layer {name}: loop {loop:6.3f} s")


class TooNoisy(Exception):
    """The exit time could not be told from the machine's noise."""


def exit_us(s: Samples, vmm: str, turns: int) -> float:
    """(fastest loop with out - fastest loop with nop) per turn, in microseconds.

    The fastest run of a loop is the one least disturbed by the rest of the
    machine, so minima, not medians, are subtracted."""
    diff = min(s.out[vmm]) - min(s.nop[vmm])
    if diff <= 0:
        raise TooNoisy(f"{vmm}: the loop with exits ({min(s.out[vmm]):.3f} s) was never slower "
                       f"than the loop without ({min(s.nop[vmm]):.3f} s); the machine is too "
                       f"busy to measure exits, try again with more --runs")
    return diff / turns * 1e6


def compared(s: Samples, settings: Settings) -> list[Compared]:
    n = settings.turns
    q_exit = exit_us(s, PEER, n)
    rate = {v: n / min(s.out[v]) for v in s.out}
    first = {v: median(t.first for t in s.start[v]) * 1e3 for v in s.start}
    rss = {v: median(t.rss for t in s.start[v]) / (1 << 20) for v in s.start}
    total = {v: median(t.rss_total for t in s.start[v]) / (1 << 20) for v in s.start}
    return [
        Compared("core", "port-exit-loop", "exit time (us)", exit_us(s, "dvmm", n), q_exit,
                 PEER, LOWER),
        Compared("core", "port-exit-loop", "exits/s", rate["dvmm"], rate[PEER], PEER, HIGHER),
        Compared("core", "kvm-layer-exit-loop", "exit time (us)", exit_us(s, "kvm-layer", n),
                 q_exit, PEER, LOWER),
        Compared("core", "kvm-layer-exit-loop", "exits/s", rate["kvm-layer"], rate[PEER], PEER,
                 HIGHER),
        Compared("core", "tiny-bios", "start to first insn (ms)", first["dvmm"], first[PEER],
                 PEER, LOWER),
        Compared("core", "tiny-bios", "VMM RSS at first insn (MiB)", rss["dvmm"], rss[PEER],
                 PEER, LOWER),
        Compared("core", "tiny-bios", "RSS incl. children (MiB)", total["dvmm"], total[PEER],
                 PEER, LOWER),
    ]


def detail(s: Samples, settings: Settings) -> str:
    lines = [f"{'VMM':10} {'loop out (s)':>12} {'loop nop (s)':>12} {'exit (us)':>10} "
             f"{'emulated turn (us)':>18}"]
    for v in ("dvmm", PEER, "kvm-layer"):
        lines.append(f"{v:10} {min(s.out[v]):12.3f} {min(s.nop[v]):12.3f} "
                     f"{exit_us(s, v, settings.turns):10.2f} "
                     f"{min(s.nop[v]) / settings.turns * 1e6:18.2f}")
    lines.append("")
    lines.append(f"{'start to first insn (ms)':52} {'median':>7} {'min':>7} {'max':>7}")
    for label, key in (("dvmm, bytecode cached", "dvmm"),
                       (f"dvmm, {environment_note()}", AS_IS), (PEER, PEER)):
        firsts = [t.first * 1e3 for t in s.start[key]]
        lines.append(f"  {label:50} {median(firsts):7.1f} {min(firsts):7.1f} {max(firsts):7.1f}")
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------

QUICK = Settings(turns=20_000, runs=2)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("core", help="guest exit round trip and start-up of the core vs QEMU",
                       description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--turns", type=int, default=Settings.turns,
                   help="port writes (exits) per loop (default %(default)s)")
    p.add_argument("--runs", type=int, default=Settings.runs,
                   help="alternating runs of each VMM: fastest loop, median start-up "
                        "(default %(default)s)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--plot", type=Path, metavar="PNG", help="also draw the ratios to PNG")
    add_progress_args(p)
    p.set_defaults(func=main)


def settings_from(args: argparse.Namespace) -> Settings:
    return QUICK if args.quick else Settings(max(2, args.turns), max(1, args.runs))


def describe(settings: Settings, wall: float) -> str:
    return (f"machine: {machine_line()}\n{load_line()}\n"
            f"dvmm bench core: {settings.turns} port exits per loop, {settings.runs} "
            f"alternating run(s) per VMM, fastest loop and median start-up; took {wall:.0f} s")


def measure(settings: Settings, progress: Callable[[str], None]) -> tuple[Samples, float]:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dvmm-bench-core-") as tmp:
        samples = run(settings, Path(tmp), progress)
    return samples, time.monotonic() - started


def main(args: argparse.Namespace) -> int:
    if shutil.which("qemu-system-x86_64") is None:
        print("dvmm bench core: qemu-system-x86_64 is not installed", file=sys.stderr)
        return 1
    settings = settings_from(args)
    samples, wall = measure(settings, progress_printer(args))
    try:
        rows = compared(samples, settings)
    except TooNoisy as e:
        print(f"dvmm bench core: {e}", file=sys.stderr)
        return 1
    print(describe(settings, wall))
    print()
    print(detail(samples, settings))
    print()
    print(table(rows))
    if args.plot:
        from .report import plot
        plot(rows, args.plot, "dvmm bench core: dvmm / QEMU")
    return 0
