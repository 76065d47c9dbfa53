"""What the benchmarks share: compared metrics, the ratio table, the plot, the machine.

Owns the shape of a result (:class:`Compared`: one metric measured for dvmm
and for a peer in the same run, and which direction is better), the one
table format every benchmark prints (so tests and ``dvmm bench all`` parse
one layout), the goals of issue 9 checked against measured ratios, a PNG of
ratio per workload (matplotlib, optional: ``pip install dvmm[bench]``), the
description of the machine the numbers came from, and the child-process
conventions of the benchmarks (die with the parent, SIGTERM then SIGKILL).
It measures nothing itself.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psutil

HIGHER, LOWER = "higher", "lower"
TABLE_HEADER = ("group", "workload", "metric", "dvmm", "peer", "dvmm/peer", "better")


@dataclass(frozen=True)
class Compared:
    """One metric of one workload, measured for dvmm and for ``peer`` in the same run."""

    group: str        # "blk shm", "blk disk", "core"
    workload: str     # "randread-4k-qd32"
    metric: str       # "IOPS", "p50 lat (us)"
    dvmm: float
    peer: float
    peer_name: str    # "qsd", "qemu"
    better: str = HIGHER

    @property
    def ratio(self) -> float:
        """dvmm / peer (inf when the peer measured 0)."""
        return self.dvmm / self.peer if self.peer else float("inf")

    @property
    def key(self) -> str:
        return f"{self.group} {self.workload} {self.metric}"


def fmt(value: float) -> str:
    """At least three significant digits, never an exponent for benchmark magnitudes."""
    mag = abs(value)
    if mag >= 1000:
        return f"{value:.0f}"
    if mag >= 100:
        return f"{value:.1f}"
    if mag >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"


def table(rows: Sequence[Compared]) -> str:
    """The ratio table every benchmark prints: one line per compared metric.

    Columns: group, workload, metric, dvmm, peer (named in the line), the
    ratio dvmm/peer and which direction is better.  A ratio above 1 is good
    when ``better`` is "higher", bad when it is "lower".
    """
    cells = [[r.group, r.workload, r.metric, fmt(r.dvmm), f"{fmt(r.peer)} {r.peer_name}",
              f"{r.ratio:.2f}", r.better] for r in rows]
    head = list(TABLE_HEADER)
    widths = [max(len(str(c[i])) for c in [head, *cells]) for i in range(len(head))]
    right = {3, 4, 5}

    def line(c: Sequence[str]) -> str:
        return "  ".join(str(x).rjust(w) if i in right else str(x).ljust(w)
                         for i, (x, w) in enumerate(zip(c, widths, strict=True))).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, cells)])


def markdown_table(rows: Sequence[Compared]) -> str:
    out = ["| group | workload | metric | dvmm | peer | dvmm/peer | better |",
           "|---|---|---|---:|---:|---:|---|"]
    out += [f"| {r.group} | {r.workload} | {r.metric} | {fmt(r.dvmm)} | "
            f"{fmt(r.peer)} ({r.peer_name}) | {r.ratio:.2f} | {r.better} |" for r in rows]
    return "\n".join(out)


# --- goals (issue 9) ---------------------------------------------------------------

@dataclass(frozen=True)
class Goal:
    """A target ratio for one compared metric (``key`` as in :attr:`Compared.key`)."""

    label: str
    key: str | None     # None: the benchmark does not exist yet
    target: float
    better: str

    def met(self, ratio: float) -> bool:
        return ratio >= self.target if self.better == HIGHER else ratio <= self.target


GOALS = (  # issue 9's table (issue 5's targets were lower: 0.6 for QD32, 1.5 for QD1, ...)
    Goal("blk 128 KiB seq read MB/s vs qsd (tmpfs image)",
         "blk shm seqread-128k-qd8 MB/s", 1.0, HIGHER),
    Goal("blk 128 KiB seq write MB/s vs qsd (tmpfs image)",
         "blk shm seqwrite-128k-qd8 MB/s", 1.0, HIGHER),
    Goal("blk 4 KiB randread QD32 MB/s vs qsd (disk image)",
         "blk disk randread-4k-qd32 MB/s", 1.0, HIGHER),
    Goal("blk 4 KiB randread QD1 p50 latency vs qsd (tmpfs image)",
         "blk shm randread-4k-qd1 p50 lat (us)", 1.0, LOWER),
    Goal("blk 4 KiB randread QD1 p50 latency vs qsd (disk image)",
         "blk disk randread-4k-qd1 p50 lat (us)", 1.0, LOWER),
    Goal("net 64-byte frames/s TX vs testpmd", "net tx-64 frames/s", 0.6, HIGHER),
    Goal("net 1500-byte frames/s TX vs testpmd", "net tx-1500 frames/s", 0.6, HIGHER),
    Goal("net 64-byte frames/s RX vs testpmd", "net rx-64 frames/s", 1.0, HIGHER),
    Goal("net 1500-byte frames/s RX vs testpmd", "net rx-1500 frames/s", 1.0, HIGHER),
    Goal("core exit round trip vs QEMU", "core port-exit-loop exit time (us)", 1.3, LOWER),
    Goal("core start-up to first guest instruction vs QEMU",
         "core tiny-bios start to first insn (ms)", 1.5, LOWER),
)


def goals_markdown(rows: Sequence[Compared]) -> str:
    """The goals table with the measured ratio and a verdict (or "pending")."""
    by_key = {r.key: r for r in rows}
    out = ["| goal | target (dvmm/peer) | measured | met |", "|---|---|---:|---|"]
    for g in GOALS:
        sign = ">=" if g.better == HIGHER else "<="
        target = f"{sign} {g.target:.1f} ({g.better} is better)"
        r = by_key.get(g.key) if g.key else None
        if r is None:
            out.append(f"| {g.label} | {target} | pending (no such benchmark yet) | pending |")
        else:
            out.append(f"| {g.label} | {target} | {r.ratio:.2f} | "
                       f"{'yes' if g.met(r.ratio) else 'no'} |")
    return "\n".join(out)


# --- plot ----------------------------------------------------------------------------

def plotted(rows: Sequence[Compared]) -> list[Compared]:
    """The rows worth a bar: IOPS and MB/s of one workload are the same ratio, so
    small-block workloads show IOPS and large-block ones MB/s."""
    return [r for r in rows if not (r.metric == "MB/s" and "-4k-" in r.workload)
            and not (r.metric == "IOPS" and "-128k-" in r.workload)]


def plot(rows: Sequence[Compared], path: Path, title: str) -> None:
    """A horizontal bar per compared metric: dvmm/peer, with the parity line at 1
    and a red tick at the goal of issue 9 where there is one.

    Bars are coloured by direction (higher-better vs lower-better) so a reader
    does not misread a latency ratio.  Needs matplotlib (the ``bench`` extra).
    """
    try:  # imported by name: matplotlib is optional, and mypy must pass without it
        importlib.import_module("matplotlib").use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'dvmm[bench]'") from None
    rows = plotted(rows)
    goals = {g.key: g.target for g in GOALS if g.key}
    ratios = [r.ratio for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.26 * len(rows) + 1.8))
    ax.barh(range(len(rows)), ratios,
            color=["tab:blue" if r.better == HIGHER else "tab:orange" for r in rows])
    for i, r in enumerate(rows):
        ax.text(r.ratio, i, f" {r.ratio:.2f}", va="center", fontsize=7)
        if r.key in goals:
            ax.plot([goals[r.key]], [i], marker="|", color="red", markersize=14, mew=2)
    ax.set_yticks(range(len(rows)), [r.key for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ticks = [t for t in (0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 7, 10)
             if min(ratios) / 1.5 <= t <= max(ratios) * 1.5]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("dvmm / peer (log scale).  Blue: higher is better; orange: lower is "
                  "better; red tick: goal")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_problem(path: Path) -> str | None:
    """Why ``--plot PATH`` cannot work, checked before any benchmark runs
    (not after minutes of them): matplotlib missing, or no such directory."""
    if importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib: pip install 'dvmm[bench]'"
    parent = path.resolve().parent
    if not parent.is_dir():
        return f"--plot {path}: directory {parent} does not exist"
    return None


# --- progress -------------------------------------------------------------------------

def add_progress_args(p: argparse.ArgumentParser) -> None:
    """``-q``: no progress; by default every finished run prints one line on stderr."""
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress lines (by default each finished run prints one on stderr)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print every run as it ends on stderr (the default; kept for scripts)")


def progress_printer(args: argparse.Namespace) -> Callable[[str], None]:
    """One line per finished run on stderr, flushed (so a pipe shows it at once)."""
    if getattr(args, "quiet", False):
        return lambda line: None

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)
    return say


# --- the machine -----------------------------------------------------------------------

def machine() -> dict[str, str]:
    """What the numbers depend on: CPUs, CPU model, kernel, which KVM module."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f
                          if ln.startswith("model name")), model)
    except OSError:
        pass
    kvm = "kvm_pvm" if os.path.isdir("/sys/module/kvm_pvm") else (
        "kvm" if os.path.exists("/dev/kvm") else "none")
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return {"cpus": str(os.cpu_count() or 0), "cpu model": model,
            "kernel": platform.release(), "kvm module": kvm,
            "memory": f"{mem_gib:.0f} GiB", "python": platform.python_version()}


def machine_line() -> str:
    return "; ".join(f"{k}: {v}" for k, v in machine().items())


def load_line() -> str:
    """The host's load now: other work on the same CPUs makes every ratio noisier."""
    one, five, _ = os.getloadavg()
    cpus = os.cpu_count() or 1
    busy = " (other work shares these CPUs: expect noisier ratios)" if five > cpus / 2 else ""
    return f"load average at the end: {one:.2f} (1 min), {five:.2f} (5 min){busy}"


# --- child processes: dvmm_shared.procs (spawn, stop, log_tail) -------------------------


def process_cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU seconds of *proc*, all its threads.

    ``cpu_times`` counts in clock ticks (10 ms here), so a short run of an
    idle-ish backend can read 0; the scheduler's per-thread run time
    (``/proc/PID/task/TID/schedstat``, nanoseconds) is exact but forgets
    threads that ended.  The larger of the two is the better reading."""
    t = proc.cpu_times()
    ticks = float(t.user + t.system)
    exact = 0
    try:
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            try:
                with open(f"/proc/{proc.pid}/task/{tid}/schedstat") as f:
                    exact += int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue  # a thread that just ended
    except FileNotFoundError:
        return ticks
    return max(ticks, exact / 1e9)


def median(values: Iterable[float]) -> float:
    vals = sorted(values)
    if not vals:
        raise ValueError("median of nothing")
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def parse_table(text: str) -> list[Compared]:
    """Read back the rows :func:`table` printed (for tests and tools)."""
    rows = []
    lines = text.splitlines()
    for i, ln in enumerate(lines):
        if re.split(r"\s{2,}", ln.strip()) == list(TABLE_HEADER):
            for row in lines[i + 2:]:
                cells = re.split(r"\s{2,}", row.strip())
                if len(cells) != len(TABLE_HEADER):
                    break
                group, workload, metric, dvmm, peer, _ratio, better = cells
                value, name = peer.rsplit(" ", 1)
                rows.append(Compared(group, workload, metric, float(dvmm), float(value), name,
                                     better))
    return rows


# --- dvmm bench all: every benchmark, and BENCHMARKS.md -----------------------------------

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
COMMAND = "dvmm bench all --write BENCHMARKS.md --plot BENCHMARKS.png"


@dataclass
class Report:
    rows: list[Compared]
    raw: list[str]        # each benchmark's header and detail table, as printed


def run_all(quick: bool, progress: Callable[[str], None]) -> Report:
    from . import blk, core, net

    bs = blk.QUICK if quick else blk.Settings()
    out = blk.run(bs, progress)
    cs = core.QUICK if quick else core.Settings()
    samples, wall = core.measure(cs, progress)
    ns = net.QUICK if quick else net.Settings()
    nout = net.run(ns, progress)
    rows = blk.compared(out, bs) + core.compared(samples, cs) + net.compared(nout, ns)
    raw = [blk.describe(bs, out) + "\n\n" + blk.detail(out, bs),
           core.describe(cs, wall) + "\n\n" + core.detail(samples, cs),
           net.describe(ns, nout) + "\n\n" + net.detail(nout, ns)]
    raw += [f"warning: {m}" for m in blk.problems(out)]
    return Report(rows, raw)


def markdown(rep: Report, plot_name: str | None) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        rev = "unknown"
    parts = [BEGIN,
             f"_Generated by `{COMMAND}` on {when}, source {rev}. "
             "Everything between the bench markers is rewritten by that command._", "",
             "Machine: " + machine_line() + ".", "", load_line().capitalize() + ".", "",
             "### Goals (issue 9)", "", goals_markdown(rep.rows), "",
             "### Ratios (dvmm / peer, same invocation)", "", markdown_table(rep.rows), ""]
    if plot_name:
        parts += [f"![dvmm / peer per workload]({plot_name})", ""]
    parts += ["### Raw numbers", "", "```text", "\n\n".join(rep.raw), "```", END]
    return "\n".join(parts)


def write_section(path: Path, section: str) -> None:
    """Replace the text between the bench markers of ``path``; refuse without them."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise RuntimeError(f"{path} has no {BEGIN} ... {END} section to rewrite")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(head + section + tail)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("all",
                       help="every ratio benchmark (blk, core, net); can rewrite BENCHMARKS.md",
                       description="Run dvmm bench blk, core and net with their defaults, "
                       "print one ratio table and the goals of issue 9; optionally rewrite "
                       "the generated section of BENCHMARKS.md and draw the ratios to a PNG.")
    p.add_argument("--quick", action="store_true", help="the benchmarks' smoke settings")
    p.add_argument("--write", type=Path, metavar="MARKDOWN",
                   help=f"rewrite the section between {BEGIN} and {END} of this file")
    p.add_argument("--plot", type=Path, metavar="PNG", help="draw the ratios to this PNG")
    add_progress_args(p)
    p.set_defaults(func=main_all)


def main_all(args: argparse.Namespace) -> int:
    rep = run_all(args.quick, progress_printer(args))
    print("\n\n".join(rep.raw))
    print()
    print(table(rep.rows))
    if args.plot:
        m = machine()
        plot(rep.rows, args.plot, "dvmm / peer (blk: qemu-storage-daemon, core: QEMU), same "
             f"invocation\n{m['cpus']} CPUs {m['cpu model']}, Linux {m['kernel']}, "
             f"{m['kvm module']}")
    if args.write:
        name = None
        if args.plot:
            name = os.path.relpath(args.plot.resolve(), args.write.resolve().parent)
        write_section(args.write, markdown(rep, name))
    return 0
