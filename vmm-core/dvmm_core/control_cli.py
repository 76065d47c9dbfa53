"""``dvmm events``, ``dvmm status`` and ``dvmm fault``: the control plane from a shell.

Owns finding a running VM (its runtime directory, by ``--vm DIR``, by
``--pid CORE_PID``, or the only live one) and turning the control plane's
maps (:mod:`dvmm_shared.control`) into lines a person reads or JSON a
script reads.  It never touches a VM's processes directly except to read
their RSS and CPU with psutil: every command goes to the core's endpoint
(``ipc://RUNTIME/core.ctl``) or a backend's (``ipc://RUNTIME/NAME.ctl``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any, TextIO

import psutil
from dvmm_shared.cli import UsageError
from dvmm_shared.control import (
    ControlError,
    EventSubscriber,
    command,
    events_endpoint,
    ipc_path,
    runtime_endpoint,
)

from .control_format import format_event, status_table

PROCESS_FAULTS = ("kill", "stop", "cont", "restart")
LINK_FAULTS = ("corrupt-msg",)  # carried out by the core's vhost-user link
BACKEND_FAULTS = ("delay", "error", "close-socket", "crash-at", "clear", "short-read",
                  "short-write", "torn-write", "drop-kick", "delay-kick", "drop-call",
                  "delay-call")
FAULT_ARG = {"delay": "MS", "error": "ERRNO", "crash-at": "POINT", "delay-kick": "MS",
             "delay-call": "MS"}
#: Faults whose ARG may be left out, and the request key it fills.
OPTIONAL_ARG = {"short-read": "count", "short-write": "count", "drop-kick": "count",
                "drop-call": "count", "torn-write": "percent", "corrupt-msg": "mode"}
_RUNTIME_NAME = re.compile(r"dvmm-(\d+)-[^/]+")


# -- finding the VM -------------------------------------------------------------
@dataclass(frozen=True)
class VmDir:
    """One VM's runtime directory."""

    path: str
    pid: int | None  # the core's pid, from the directory name

    @property
    def core(self) -> str:
        return runtime_endpoint(self.path, "core")

    @property
    def events(self) -> str:
        return events_endpoint(self.path)


def search_bases() -> list[str]:
    """Where cores create runtime directories: $XDG_RUNTIME_DIR, else the temp
    dir (/tmp unless $TMPDIR says otherwise), as the supervisor does."""
    return [os.path.realpath(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())]


def vm_dirs() -> list[VmDir]:
    """Every ``dvmm-<pid>-*`` directory under the search bases."""
    found = []
    for base in search_bases():
        for path in sorted(glob.glob(os.path.join(base, "dvmm-*-*"))):
            m = _RUNTIME_NAME.fullmatch(os.path.basename(path))
            if m and os.path.isdir(path):
                found.append(VmDir(path, int(m.group(1))))
    return found


def _live(vm: VmDir) -> bool:
    return vm.pid is not None and psutil.pid_exists(vm.pid)


def find_vm(vm: str | None, pid: int | None) -> VmDir:
    """The VM named by ``--vm``/``--pid``, or the only live one; UsageError otherwise."""
    if vm is not None:
        if not os.path.isdir(vm):
            raise UsageError(f"no VM runtime directory {vm}")
        m = _RUNTIME_NAME.fullmatch(os.path.basename(os.path.normpath(vm)))
        return VmDir(os.path.realpath(vm), int(m.group(1)) if m else None)
    dirs = vm_dirs()
    where = " or ".join(search_bases())
    if pid is not None:
        mine = [d for d in dirs if d.pid == pid]
        if not mine:
            raise UsageError(f"no VM with core pid {pid} (no dvmm-{pid}-* in {where})")
        if len(mine) > 1:
            raise UsageError(f"several runtime directories for pid {pid}: "
                             f"{', '.join(d.path for d in mine)}; choose one with --vm")
        return mine[0]
    live = [d for d in dirs if _live(d)]
    if len(live) == 1:
        return live[0]
    if not live:
        raise UsageError(f"no running VM found (no live dvmm-PID-* in {where})")
    raise UsageError("several VMs are running: " + ", ".join(
        f"{d.path} (pid {d.pid})" for d in live) + "; choose one with --vm DIR or --pid N")


#: How long a command waits for the core or a backend: generous, because a
#: busy machine (or a backend replaying after a restart) can take seconds to
#: answer, and a false "no answer" is worse than a wait.
ASK_TIMEOUT = 10.0


def ask(endpoint: str, cmd: str, timeout: float = ASK_TIMEOUT, **args: Any) -> dict[str, Any]:
    """A command whose failure is the user's one-line error."""
    try:
        return command(endpoint, cmd, timeout=timeout, **args)
    except ControlError as exc:
        raise UsageError(str(exc)) from None


def add_vm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--vm", metavar="RUNTIME_DIR", help="the VM's runtime directory")
    g.add_argument("--pid", type=int, metavar="N", help="the VM's core process id")


# -- dvmm events ----------------------------------------------------------------
class _Stop(Exception):
    """SIGTERM or SIGINT: end the stream quietly."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def run_events(args: argparse.Namespace) -> int:
    vm = find_vm(args.vm, args.pid)
    path = ipc_path(vm.events)
    if path is not None and not os.path.exists(path):
        raise UsageError(f"VM {vm.path} has no event stream (is its core running?)")
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    sub = EventSubscriber(vm.events)
    try:
        return _stream(args, vm, sub, sys.stdout)
    except _Stop:
        return 0
    except BrokenPipeError:  # the reader went away (| head): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second complaint at interpreter exit
        return 0
    finally:
        sub.close()
        for s, handler in old.items():
            signal.signal(s, handler)


def _stream(args: argparse.Namespace, vm: VmDir, sub: EventSubscriber, out: TextIO) -> int:
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    printed, last_seq = 0, 0
    sub.wait_connected(min(2.0, args.timeout or 2.0))
    if args.history:
        for event in ask(vm.core, "events").get("events", []):
            if isinstance(event, dict) and _emit(event, args.json, out):
                printed += 1
                last_seq = max(last_seq, _seq(event))
                if args.count is not None and printed >= args.count:
                    return 0
    while args.count is None or printed < args.count:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        # short waits: a closed stdout or a signal is noticed between events too
        event = sub.recv(timeout=0.25 if left is None else min(0.25, left))
        if event is None or 0 < _seq(event) <= last_seq:
            continue  # nothing yet, or already printed from the history
        _emit(event, args.json, out)
        printed += 1
    if args.count is not None and printed < args.count:
        raise UsageError(f"timed out after {printed} of {args.count} events")
    return 0


def _seq(event: dict[str, Any]) -> int:
    seq = event.get("seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else 0


def _emit(event: dict[str, Any], as_json: bool, out: TextIO) -> bool:
    line = json.dumps(event, default=repr, sort_keys=False) if as_json else format_event(event)
    out.write(line + "\n")
    out.flush()
    return True


# -- dvmm status ----------------------------------------------------------------
def run_status(args: argparse.Namespace) -> int:
    vm = find_vm(args.vm, args.pid)
    status = ask(vm.core, "status")
    backends = [b for b in status.get("backends", []) if isinstance(b, dict)]
    _add_process_usage(backends)
    for b in backends:
        b["stats"] = _backend_stats(b)
    report = {"runtime_dir": vm.path, "vm": status.get("vm", {}), "backends": backends}
    if args.json:
        print(json.dumps(report, default=repr))
    else:
        print(status_table(report))
    return 0


def _add_process_usage(backends: list[dict[str, Any]]) -> None:
    """RSS, CPU seconds, and CPU % over one short window shared by all backends."""
    procs: dict[int, psutil.Process] = {}
    for b in backends:
        b["rss"] = b["cpu_s"] = b["cpu_percent"] = None
        pid = b.get("pid")
        if isinstance(pid, int) and pid > 0:
            try:
                procs[id(b)] = psutil.Process(pid)
                procs[id(b)].cpu_percent(None)
            except psutil.Error:
                pass
    if procs:
        time.sleep(0.2)  # psutil measures CPU % between two calls
    for b in backends:
        proc = procs.get(id(b))
        if proc is None:
            continue
        try:
            with proc.oneshot():
                b["rss"] = proc.memory_info().rss
                times = proc.cpu_times()
                b["cpu_s"] = round(times.user + times.system, 2)
                b["cpu_percent"] = proc.cpu_percent(None)
        except psutil.Error:
            pass


def _backend_stats(backend: dict[str, Any]) -> dict[str, Any] | None:
    control = backend.get("control")
    if not isinstance(control, str) or not backend.get("pid"):
        return None
    try:
        stats = command(control, "stats", timeout=1.0)
        stats.pop("ok", None)
        return stats
    except ControlError:
        return None  # shown as "-": the backend is down, stopped or busy


# -- dvmm fault -----------------------------------------------------------------
def run_fault(args: argparse.Namespace) -> int:
    action = args.action
    known = PROCESS_FAULTS + LINK_FAULTS + BACKEND_FAULTS
    if action not in known:
        raise UsageError(f"unknown fault {action!r}; one of: " + ", ".join(known))
    _check_fault_args(args)
    vm = find_vm(args.vm, args.pid)
    if action in PROCESS_FAULTS:
        reply = ask(vm.core, "fault", name=args.name, action=action)
    elif action in LINK_FAULTS:
        mode = {"mode": args.arg} if args.arg is not None else {}
        reply = ask(vm.core, "fault", name=args.name, action=action, **mode)
    else:
        reply = ask(_backend_endpoint(vm, args.name), "fault", **_backend_fault(args))
    details = " ".join(f"{k}={v}" for k, v in reply.items()
                       if k not in ("ok", "kind", "name", "action"))
    print(f"{args.name}: {action} done{' (' + details + ')' if details else ''}")
    return 0


def _check_fault_args(args: argparse.Namespace) -> None:
    wanted = FAULT_ARG.get(args.action)
    if wanted is None and args.arg is not None and args.action not in OPTIONAL_ARG:
        raise UsageError(f"fault {args.action} takes no argument (got {args.arg!r})")
    if wanted is not None and args.arg is None:
        raise UsageError(f"fault {args.action} needs {wanted}")
    if args.action != "error" and (args.op is not None or args.count is not None):
        raise UsageError("--op and --count go with fault error only")


def _backend_fault(args: argparse.Namespace) -> dict[str, Any]:
    if args.action == "delay":
        try:
            return {"kind": "delay", "ms": int(args.arg)}
        except ValueError:
            raise UsageError(f"fault delay: MS must be an integer, not {args.arg!r}") from None
    if args.action == "error":
        fault: dict[str, Any] = {"kind": "error", "errno": args.arg.upper(),
                                 "op": args.op or "any"}
        if args.count is not None:
            fault["count"] = args.count
        return fault
    if args.action == "crash-at":
        return {"kind": "crash-at", "point": args.arg}
    key = "ms" if args.action in FAULT_ARG else OPTIONAL_ARG.get(args.action)
    if key is None or args.arg is None:
        return {"kind": args.action}
    try:
        return {"kind": args.action, key: int(args.arg)}
    except ValueError:
        raise UsageError(f"fault {args.action}: {key.upper()} must be an integer, "
                         f"not {args.arg!r}") from None


def _backend_endpoint(vm: VmDir, name: str) -> str:
    """The backend's own command endpoint, as the core's status reports it."""
    backends = [b for b in ask(vm.core, "status").get("backends", []) if isinstance(b, dict)]
    match = [b for b in backends if b.get("name") == name]
    if not match:
        names = ", ".join(str(b.get("name")) for b in backends) or "none"
        raise UsageError(f"no backend named {name!r} in VM {vm.path} (backends: {names})")
    control = match[0].get("control")
    if not isinstance(control, str):
        raise UsageError(f"backend {name!r} has no control endpoint")
    return control


# -- the subcommands --------------------------------------------------------------
def add_parsers(sub: Any) -> None:
    """Register ``events``, ``status`` and ``fault`` on the ``dvmm`` command."""
    formatter = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("events", help="print a VM's event stream", formatter_class=formatter,
                       description="Print the core's events (backend exits, restarts, device "
                       "lost/restored, ...), one line each: time, #sequence, event, fields.")
    add_vm_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--history", action="store_true",
                   help="first print the events the core already sent (its last 1000)")
    p.add_argument("--count", type=int, metavar="N", help="exit after N events")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="stop after S seconds (an error if --count N was not reached)")
    p.set_defaults(func=run_events)

    p = sub.add_parser("status", help="show a VM's backends: state, restarts, RSS, CPU, I/O",
                       description="Ask the core for its backends and each backend for its "
                       "counters; a backend that does not answer shows '-'.")
    add_vm_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=run_status)

    p = sub.add_parser("fault", help="inject a fault into one backend",
                       formatter_class=formatter, description=FAULT_HELP)
    p.add_argument("name", metavar="NAME", help="the backend, as `dvmm status` names it")
    p.add_argument("action", metavar="ACTION",
                   help="kill|stop|cont|restart|corrupt-msg|delay|error|close-socket|"
                   "crash-at|short-read|short-write|torn-write|drop-kick|delay-kick|"
                   "drop-call|delay-call|clear")
    p.add_argument("arg", nargs="?", metavar="ARG", help="MS for delay, delay-kick and "
                   "delay-call, ERRNO for error (EIO, ENOSPC), POINT for crash-at "
                   "(after-pop, after-data, before-used, after-used); optional: N for "
                   "short-read, short-write, drop-kick, drop-call, PERCENT for torn-write, "
                   "MODE for corrupt-msg (version, size)")
    p.add_argument("--op", choices=["read", "write", "any"], help="error: which I/O fails")
    p.add_argument("--count", type=int, metavar="N", help="error: fail N times (default: "
                   "until `clear`)")
    add_vm_args(p)
    p.set_defaults(func=run_fault)


FAULT_HELP = """\
Inject a fault into one backend of a running VM.

process faults (carried out by the core's supervisor):
  kill        SIGKILL the backend (the supervisor restarts it by its policy)
  stop, cont  SIGSTOP / SIGCONT it
  restart     stop it cleanly and start it again
  corrupt-msg [MODE]  the core's link sends the backend one corrupted vhost-user
              message (version or size); the backend drops the session, the core
              reconnects and replays
backend faults (sent to the backend's own control endpoint):
  delay MS    sleep MS milliseconds before each ring service pass (0 clears)
  error ERRNO fail disk I/O with EIO or ENOSPC (--op read|write|any, --count N)
  close-socket  drop the vhost-user connection (the core reconnects)
  crash-at POINT  SIGKILL itself at that step of the next request: after-pop,
              after-data, before-used or after-used
  short-read [N], short-write [N]  the next N disk reads / writes transfer only
              part of their bytes (the engine carries on; default 1)
  torn-write [PERCENT]  the next disk write stores PERCENT % (default 50), then
              the backend SIGKILLs itself; the restarted one replays it
  drop-kick [N], drop-call [N]  lose the next N kicks / calls (the backend's
              safety net finds the work within 0.25-0.5 s)
  delay-kick MS, delay-call MS  deliver the next kick / call MS late
  clear       switch every backend fault off
"""
