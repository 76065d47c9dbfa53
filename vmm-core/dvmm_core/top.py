"""``dvmm top``: a live terminal view of one VM and its backends.

Owns the view: the VM (core pid, run state, uptime, the core's own RSS and
CPU), one row per backend (state, vhost-user link, restarts, RSS, CPU time
and share, I/O counters) and the last recovery events (backend exits,
restarts, devices lost and restored).  Every figure comes from the control
plane, refreshed each interval: the core's ``status`` and ``events``, each
backend's ``stats`` (:mod:`.vm_report`), plus psutil for the processes.
The VM is found as ``dvmm status`` finds it (``--vm``, ``--pid``, or the
only one running).

``--once`` prints one snapshot (CPU shares measured over ``--interval``)
and exits: for scripts and tests.  Otherwise the ``rich`` library redraws
it in place on a terminal (one snapshot after another into a pipe, as
``top -b``) until Ctrl-C, SIGTERM, or the VM goes away.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from types import FrameType
from typing import Any

from dvmm_shared.cli import UsageError

from .control_format import format_event, human_bytes, human_seconds, io_summary
from .vm_report import ReportError, UsageSampler, backend_stats, core_status, shape_backend

DESCRIPTION = """\
A live view of a running VM and its device backends: state, restarts, RSS,
CPU, I/O counters and the latest recovery events, refreshed from the VM's
control plane.  q is not needed: Ctrl-C ends it.
"""

#: Events shown under the table: what recovery did.
RECOVERY = ("backend-exited", "backend-restarted", "backend-given-up", "device-lost",
            "device-restored", "device-offline", "guest-reset", "fault-injected")
EVENT_LINES = 8
#: Columns when the output is not a terminal (rich would assume 80 and wrap).
PIPE_WIDTH = 140


def add_parser(sub: Any) -> None:
    from .control_cli import add_vm_args

    p = sub.add_parser("top", help="a live view of a VM and its backends (state, RSS, CPU, I/O)",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_vm_args(p)
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--interval", type=float, default=1.0, metavar="S",
                   help="seconds between refreshes (and the CPU %% window; default 1)")
    p.set_defaults(func=run_top)


class Snapshot:
    """One refresh: the VM, its backends, recent recovery events."""

    def __init__(self, runtime_dir: str, sampler: UsageSampler) -> None:
        from dvmm_shared.control import runtime_endpoint

        from .vm_report import ask

        status = core_status(runtime_dir)
        self.runtime_dir = runtime_dir
        vm = status.get("vm")
        self.vm: dict[str, Any] = vm if isinstance(vm, dict) else {}
        self.core = sampler.sample(self.vm.get("pid"))
        raw = [b for b in status.get("backends", []) if isinstance(b, dict)]
        self.backends = [shape_backend(b, sampler.sample(b.get("pid")), backend_stats(b))
                         for b in raw]
        try:
            history = ask(runtime_endpoint(runtime_dir, "core"), "events").get("events", [])
        except ReportError:
            history = []
        self.events = [e for e in history if isinstance(e, dict)
                       and e.get("event") in RECOVERY][-EVENT_LINES:]


def _cpu(usage: dict[str, Any]) -> str:
    seconds, percent = usage.get("cpu-seconds"), usage.get("cpu-percent")
    if not isinstance(seconds, int | float):
        return "-"
    return f"{seconds:.2f}s" + (f" {percent:.0f}%" if isinstance(percent, int | float) else "")


def render(snap: Snapshot) -> Any:
    """The snapshot as a rich renderable (a table with a title and a caption)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    vm, core = snap.vm, snap.core
    title = (f"VM pid {vm.get('pid', '?')}  {vm.get('state', '?')}  up "
             f"{human_seconds(vm.get('uptime'))}  core RSS {human_bytes(core.get('rss'))}  "
             f"CPU {_cpu(core)}")
    table = Table(title=title, title_justify="left", caption=snap.runtime_dir,
                  caption_justify="left", expand=False)
    for column in ("NAME", "PID", "STATE", "LINK", "RESTARTS", "RSS", "CPU", "I/O"):
        table.add_column(column, no_wrap=column != "I/O")
    for b in snap.backends:
        table.add_row(str(b["name"]), str(b["pid"] or "-"), _state(b), str(b["link"] or "-"),
                      str(b["restarts"]), human_bytes(b["rss"]), _cpu(b),
                      io_summary(b["counters"]))
    if not snap.backends:
        table.add_row("(no backends)", *[""] * 7)
    lines = [Text(format_event(e), style="dim") for e in snap.events]
    return Group(table, *lines) if lines else table


def _state(b: dict[str, Any]) -> str:
    state = str(b.get("state"))
    return {"running": "[green]running[/]", "restarting": "[yellow]restarting[/]",
            "given-up": "[red]given-up[/]", "exited": "[red]exited[/]"}.get(state, state)


class _Stop(Exception):
    """SIGTERM: leave the live view."""


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def run_top(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .control_cli import find_vm

    if not args.interval > 0:
        raise UsageError(f"--interval must be positive, not {args.interval}")
    vm = find_vm(args.vm, args.pid)
    sampler = UsageSampler()
    console = Console() if sys.stdout.isatty() else Console(width=PIPE_WIDTH)
    try:
        if args.once:
            Snapshot(vm.path, sampler)  # starts the CPU % window
            time.sleep(min(args.interval, 1.0))
            console.print(render(Snapshot(vm.path, sampler)))
            return 0
        return _live(console, vm.path, sampler, args.interval)
    except ReportError as exc:
        raise UsageError(f"VM {vm.path}: {exc}") from None


def _live(console: Any, runtime_dir: str, sampler: UsageSampler, interval: float) -> int:
    from rich.live import Live

    old = signal.signal(signal.SIGTERM, _on_term)
    try:
        if not console.is_terminal:  # a pipe or a file: one snapshot after another (top -b)
            while True:
                console.print(render(Snapshot(runtime_dir, sampler)))
                console.file.flush()
                time.sleep(interval)
        with Live(render(Snapshot(runtime_dir, sampler)), console=console,
                  auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(Snapshot(runtime_dir, sampler)), refresh=True)
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        signal.signal(signal.SIGTERM, old)
