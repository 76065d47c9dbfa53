"""``dvmm bench startup``: start-up time and memory of the core against QEMU.

Owns one measurement: the same SeaBIOS and the same demo disk booted by
``dvmm run`` (disk served by a dvmm blk backend process) and by
``qemu-system-x86_64 -enable-kvm -M pc`` (QEMU's built-in virtio-blk), in
the same invocation, alternating runs.  For each it records the time from
process start to the first byte on the serial console, the time until the
demo program prints its checksum, and the VMM's resident memory then (the
core alone, and the core plus its backends).  It prints medians and the
ratio dvmm / QEMU.  dvmm starts with its bytecode cached, as an installed
package does (``core.cached_env``; a warm-up run is not counted).  Every
finished run prints one line on stderr (``-q``: none).  Not a test: nothing
here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from dvmm_core.boot.demo import make_demo_disk

from .core import cached_env
from .report import add_progress_args, progress_printer

SEABIOS = "/usr/share/seabios/bios.bin"
DONE = b"dvmm-demo: done"


@dataclass
class Sample:
    first_byte: float
    done: float
    rss: int          # the VMM process
    rss_total: int    # plus its child processes (dvmm's backends)


def qemu_argv(disk: Path) -> list[str]:
    return ["qemu-system-x86_64", "-enable-kvm", "-cpu", "host,-arch-capabilities",
            "-M", "pc", "-m", "128", "-bios", SEABIOS, "-nodefaults", "-nographic",
            "-serial", "stdio", "-drive", f"file={disk},if=virtio,format=raw"]


def dvmm_argv(disk: Path) -> list[str]:
    return [sys.executable, "-m", "dvmm_core.cli", "run", "-q", "--memory", "128",
            "--firmware", "seabios", "--disk", str(disk), "--serial", "stdio"]


def measure(argv: list[str], timeout: float = 120.0,
            env: dict[str, str] | None = None) -> Sample:
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    seen = b""
    first = None
    try:
        while DONE not in seen:
            if time.monotonic() - start > timeout or (not sel.select(timeout=1.0) and \
                    proc.poll() is not None):
                raise RuntimeError(f"{argv[0]} did not finish: {seen[-300:]!r}")
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"{argv[0]} closed its output: {seen[-300:]!r}")
            if first is None:
                first = time.monotonic() - start
            seen += chunk
        done = time.monotonic() - start
        p = psutil.Process(proc.pid)
        rss = p.memory_info().rss
        total = rss + sum(c.memory_info().rss for c in p.children(recursive=True))
        return Sample(first or done, done, rss, total)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        sel.close()


def run_bench(runs: int, work: Path,
              progress: Callable[[str], None] = lambda line: None) -> dict[str, list[Sample]]:
    disk = make_demo_disk(work / "bench.img", payload_sectors=2048)
    env = cached_env(work)
    measure(dvmm_argv(disk.path), env=env)  # warm-up: fills the bytecode cache
    results: dict[str, list[Sample]] = {"dvmm": [], "qemu": []}
    for r in range(runs):
        for vmm, argv, venv in (("dvmm", dvmm_argv(disk.path), env),
                                ("qemu", qemu_argv(disk.path), None)):
            sample = measure(argv, env=venv)
            results[vmm].append(sample)
            progress(f"run {r + 1} {vmm:4}: first byte {sample.first_byte * 1e3:6.1f} ms, "
                     f"checksum {sample.done:6.3f} s")
    return results


def report(results: dict[str, list[Sample]]) -> str:
    rows = [("time to first serial byte (s)", "first_byte", 1.0),
            ("time to demo checksum (s)", "done", 1.0),
            ("VMM process RSS (MiB)", "rss", 1 / (1 << 20)),
            ("RSS incl. backends (MiB)", "rss_total", 1 / (1 << 20))]
    out = [f"{'metric':34} {'dvmm':>10} {'qemu':>10} {'dvmm/qemu':>10}"]
    for label, attr, scale in rows:
        d = statistics.median(getattr(s, attr) for s in results["dvmm"]) * scale
        q = statistics.median(getattr(s, attr) for s in results["qemu"]) * scale
        out.append(f"{label:34} {d:10.2f} {q:10.2f} {d / q:10.2f}")
    n = len(results["dvmm"])
    out.append(f"(medians of {n} alternating run{'s' if n > 1 else ''}; lower is better)")
    return "\n".join(out)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("startup", help="start-up time and RSS of the core vs QEMU+KVM",
                       description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=3, help="runs of each VMM (default 3)")
    add_progress_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="dvmm-bench-") as tmp:
        results = run_bench(max(1, args.runs), Path(tmp), progress_printer(args))
    print(report(results))
    return 0
